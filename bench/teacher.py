"""How good a teacher can the shapes world have here? One teacher variant per call (issue 7).

bench/replicate.py needs a strong teacher; this script measures what a tiny teacher learns, so
that the sizing decisions in docs/results.md (section 2) can be rerun and extended:

    .venv/bin/python bench/teacher.py colour-short --kinds colour --forms short --train-items 8000 --steps 2000
    .venv/bin/python bench/teacher.py mix --steps 24000 --eval-every 4000 --positions

Each call builds (or reuses) the model and the data in --work/NAME, trains with the engine
(`genrecal distill`'s finetune stage), and measures greedy accuracy per question kind and answer
form on validation items of the same kinds and forms (layouts training never saw). With
--eval-every the training runs in chunks, each continuing from the last, and every chunk is
measured: a learning curve (at a constant learning rate, or with --lr-end one linear decay across
the chunks; each chunk starts a fresh optimizer). Results: one JSON line per measurement in
--work/NAME/results.jsonl, and printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing
sys.path.insert(0, str(ROOT / "bench"))


def parse(argv: list[str] | None) -> argparse.Namespace:
    from genrecal_cli.world.shapes import FORMS, KINDS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="the variant's folder under --work (reused when present)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "teacher")
    ap.add_argument("--family", default="qwen2_vl")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=48, help="48: one Qwen image token per grid cell")
    ap.add_argument("--pretrain-steps", type=int, default=900, help="vision pretraining (world/pretrain.py)")
    ap.add_argument("--positions", action="store_true", help="vision pretraining also teaches each token its cell")
    ap.add_argument("--init", default=None, help="start from this checkpoint instead of building a model")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--train-items", type=int, default=24000)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-end", type=float, default=None,
                    help="default lr / 10; with --eval-every: lr (constant), else one linear decay across the chunks")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=0, help="measure every N steps (chunks continuing each other)")
    ap.add_argument("--eval-items", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    a.kinds, a.forms = tuple(a.kinds.split(",")), tuple(a.forms.split(","))
    for value, allowed, flag in ((a.kinds, KINDS, "--kinds"), (a.forms, FORMS, "--forms")):
        bad = [v for v in value if v not in allowed]
        if bad:
            ap.error(f"{flag}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    if a.eval_every < 0 or a.steps < 1 or (a.eval_every and a.steps % a.eval_every):
        ap.error("--steps must be >= 1 and a multiple of --eval-every")
    return a


def items(split: str, n: int, kinds: tuple[str, ...], forms: tuple[str, ...]):
    """n drawn items of the given kinds and forms (kinds cycle in make_items: draw, then keep)."""
    from genrecal_cli.world.shapes import KINDS, make_split

    ds = make_split(split, -(-n * len(KINDS) // len(kinds)), seed=0, forms=forms)
    return ds.filter(lambda kind: kind in kinds, input_columns="kind").select(range(n))


def build(a: argparse.Namespace, folder: Path, log) -> str:
    """The starting checkpoint: --init, or a fresh model built once into folder/init."""
    from replicate import build_once

    return a.init or build_once(folder / "init", a.family, a.hidden, a.layers, log, image_size=a.image_size,
                                pretrain_steps=a.pretrain_steps, cell_positions=a.positions)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    import torch

    from genrecal_cli.models import load_vlm
    from genrecal_cli.engine.accuracy import accuracy
    from genrecal_cli.world.shapes import scorer
    from replicate import PRESETS, base_recipe, quiet, train

    if a.threads:
        torch.set_num_threads(a.threads)
    quiet()
    folder = (a.work / a.name).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    data = folder / "data"
    if not (data / "train.parquet").exists():
        data.mkdir(exist_ok=True)
        for split, n in (("train", a.train_items), ("validation", 40)):
            items(split, n, a.kinds, a.forms).to_parquet(str(data / f".{split}.tmp"))
            (data / f".{split}.tmp").replace(data / f"{split}.parquet")
        log(f"data: {a.train_items} training items, kinds {','.join(a.kinds)}, forms {','.join(a.forms)}")
    validation = items("validation", a.eval_items, a.kinds, a.forms)

    start = build(a, folder, log)
    chunk = a.eval_every or a.steps
    lr_end = a.lr_end if a.lr_end is not None else (a.lr if a.eval_every else a.lr / 10)

    def lr_at(step: int) -> float:  # one linear decay over all the chunks
        return a.lr + (lr_end - a.lr) * step / a.steps

    results = folder / "results.jsonl"
    for done in range(chunk, a.steps + 1, chunk):
        out = folder / f"step{done}"
        raw = base_recipe(start, str(data), out, 0, PRESETS["full"])
        raw["train"]["probe_every"] = 0
        raw["stages"] = {"finetune": {"steps": chunk, "lr": lr_at(done - chunk), "lr_end": lr_at(done),
                                      "batch_size": a.batch_size, "schedule": "linear",
                                      "warmup_steps": a.warmup if done == chunk else 0}}
        seconds = train(raw, a.threads).get("seconds")
        acc = accuracy(load_vlm(str(out / "student")), validation, score=scorer)
        row = {"name": a.name, "steps": done, "accuracy": round(acc.value, 4), "n": acc.total,
               "groups": {k: round(v, 3) for k, v in acc.to_dict()["groups"].items()},
               "train_seconds": None if seconds is None else round(seconds), "args": {k: str(v) for k, v in vars(a).items()}}
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log(f"step {done}: accuracy {acc.value:.3f} " + " ".join(f"{k} {v:.2f}" for k, v in row["groups"].items()))
        start = str(out / "student")
    return 0


if __name__ == "__main__":
    sys.exit(main())
