"""Speed of the engine's steps on random text models of fixed sizes (no data, no processors).

Median milliseconds per step of: teacher forward alone, student SFT step, Recalibrator
forward+backward alone (student-question path and teacher-only path), align step, distill step;
then (a) distill / SFT step, what distillation costs a user, and (b) distill / (teacher forward
+ SFT step + Recalibrator alone), the glue overhead above the compute the method needs.

Also the peak resident memory of each (CPU: the process's VmHWM, reset before each; GPU: peak
allocated), the wall time of `genrecal --help`, and (with the test extras installed) inspect-vocab
on two large vocabularies (bench/inspect_vocab.py: Qwen2 151k vs Qwen3.6 248k, 1 MB of text).

    .venv/bin/python bench/speed.py --json bench/results/speed-cpu-small.json   # CPU, small models
    python bench/speed.py --device cuda --dtype bfloat16 --preset large
    .venv/bin/python bench/speed.py --preset tiny --reps 2 --no-extras           # seconds (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from genrecal_cli.engine import losses  # noqa: E402
from genrecal_cli.engine.recalibrator import Recalibrator  # noqa: E402
from genrecal_cli.recipe import recipe_from_dict  # noqa: E402
from genrecal_cli.engine.objective import StudentAndRecalibrator, student_question  # noqa: E402
from genrecal_cli.engine.teacher import head_fn, teacher_features  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a clone without installing

PRESETS = {
    "tiny": dict(t=(64, 1, 500), s=(32, 1, 400), batch=2, tq=24, ta=6, sq=28, sa=8),
    # teacher (hidden, layers, vocab), student (hidden, layers, vocab), batch, question/answer tokens
    "small": dict(t=(256, 4, 3000), s=(128, 2, 2000), batch=8, tq=96, ta=24, sq=110, sa=28),
    "large": dict(t=(2048, 16, 151_936), s=(1024, 8, 32_000), batch=8, tq=512, ta=128, sq=600, sa=150),
}


def build(kind, hidden, layers, vocab, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if kind == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = cfg_cls(hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers, vocab_size=vocab,
                  num_attention_heads=max(2, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                  max_position_embeddings=4096, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model = model_cls(cfg).to(device=device, dtype=dtype)
    layer_cls = type(model.model.layers[0])
    # The same attributes the engine reads off a VLM view.
    return SimpleNamespace(model=model, head=model.get_output_embeddings(), input_embeddings=model.get_input_embeddings(),
                           hidden_size=hidden, text_config=cfg, decoder_layer_class=layer_cls,
                           body=lambda **kw: model.model(**kw).last_hidden_state)


def batch(vocab, b, q, a, device, seed):
    g = torch.Generator().manual_seed(seed)
    qlen = torch.randint(q * 3 // 4, q + 1, (b,), generator=g)
    alen = torch.randint(a // 2, a + 1, (b,), generator=g)
    width = int((qlen + alen).max())
    ids = torch.zeros(b, width, dtype=torch.long)
    att = torch.zeros(b, width, dtype=torch.long)
    labels = torch.full((b, width), -100)
    for r in range(b):
        n = int(qlen[r] + alen[r])
        ids[r, :n] = torch.randint(5, vocab, (n,), generator=g)
        att[r, :n] = 1
        labels[r, qlen[r]:n] = ids[r, qlen[r]:n]
    # one turn: segment 0 the question, 1 the answer, -1 padding (data/render.py)
    segment = torch.where(labels != -100, 1, torch.where(att.bool(), 0, -1))
    out = {"input_ids": ids, "attention_mask": att, "labels": labels, "segment": segment}
    return {k: v.to(device) for k, v in out.items()}


def timed(fn, reps, sync):
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) on Linux, so each measurement gets its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def help_wall_time(reps: int = 3) -> float:
    """Median seconds of `genrecal --help` in a fresh interpreter (imports neither torch nor transformers)."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "genrecal_cli", "--help"], cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def inspect_vocab_time() -> dict:
    """bench/inspect_vocab.py on Qwen2 (151k) vs Qwen3.6 (248k); needs the test extras."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "inspect_vocab.py"), "--student", "qwen3.6", "--repeat", "3"],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        return {"skipped": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    best = next(line for line in done.stdout.splitlines() if line.startswith("inspect_vocab"))
    return {"output": done.stdout.strip().splitlines(), "best_s": float(best.split("best ")[1].split("s")[0])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--no-extras", action="store_true", help="skip the --help and inspect-vocab timings")
    args = ap.parse_args()
    p, dev, dtype = PRESETS[args.preset], torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    # As the engine trains: the frozen teacher in --dtype, the student and the Recalibrator with
    # fp32 masters, compute under autocast in --dtype.
    teacher = build("qwen2", *p["t"], dtype, dev)
    student = build("llama", *p["s"], torch.float32, dev)
    teacher.model.requires_grad_(False)
    rec = Recalibrator(teacher.hidden_size, student.text_config, student.decoder_layer_class).to(dev, torch.float32)
    autocast = lambda: torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
    tb = batch(p["t"][2], p["batch"], p["tq"], p["ta"], dev, 1)
    sb = batch(p["s"][2], p["batch"], p["sq"], p["sa"], dev, 2)
    recipe = recipe_from_dict({"teacher": {"path": "zoo:x"}, "student": {"path": "zoo:y"},
                               "stages": {s: {"steps": 1} for s in ("align", "distill", "finetune")}})
    module = StudentAndRecalibrator(student.model, rec, recipe.loss)
    head = head_fn(teacher.head)
    opt = torch.optim.AdamW([p_ for p_ in module.parameters()], lr=1e-5)

    def step(stage):
        student.model.requires_grad_(stage != "align")
        with autocast():
            tf = teacher_features(teacher, tb, "hidden") if stage != "finetune" else None
            loss = module(sb, tf, head, stage=stage).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def teacher_forward():
        with autocast():
            teacher_features(teacher, tb, "hidden")

    with autocast():
        tf_fixed = teacher_features(teacher, tb, "hidden")
    with torch.no_grad(), autocast():
        zs = student.body(input_ids=sb["input_ids"], attention_mask=sb["attention_mask"])
    zq = student_question(zs.float(), sb)

    def rec_alone(teacher_only):
        def f():
            with autocast():
                if teacher_only:
                    r = rec(tf_fixed.question, tf_fixed.answer, question_from_teacher=True)
                else:
                    r = rec(zq, tf_fixed.answer)
                ar, kl = losses.recalibration_terms(head, r, tf_fixed.rows, tf_fixed.targets)
            (ar + kl).backward()
            rec.zero_grad(set_to_none=True)
        return f

    results = {}
    for name, fn in [("teacher_forward", teacher_forward), ("sft_step", lambda: step("finetune")),
                     ("rec_student_path", rec_alone(False)), ("rec_teacher_path", rec_alone(True)),
                     ("align_step", lambda: step("align")), ("distill_step", lambda: step("distill"))]:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rss_reset = reset_peak_rss()
        results[name] = {"ms": timed(fn, args.reps, sync)}
        if dev.type == "cuda":
            results[name]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if rss_reset:
            results[name]["peak_rss_gib"] = peak_rss_gib()
    ms = {k: v["ms"] for k, v in results.items()}
    tokens = int(sb["attention_mask"].sum())
    summary = {
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "preset": args.preset, "dtype": args.dtype, "sizes": p, "steps": results,
        "ratio_a_distill_over_sft": ms["distill_step"] / ms["sft_step"],
        "ratio_b_glue": ms["distill_step"] / (ms["teacher_forward"] + ms["sft_step"] + ms["rec_student_path"] + ms["rec_teacher_path"]),
        "distill_student_tokens_per_s": tokens / (ms["distill_step"] / 1000),
    }
    if not args.no_extras:
        summary["help_wall_s"] = help_wall_time()
        summary["inspect_vocab_151k_vs_248k"] = inspect_vocab_time()
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
