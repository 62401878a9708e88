"""The data pipeline alone (no model step): items/s with 0, 1 and 2 loader workers on the shapes
data (one image, one turn) and on the built-in conversations (1-3 turns, 0-2 images); the
padding share of batches with and without `data.group_by_length`; and the time from `distill()`
to the first training step on 2,000 and on 20,000 conversations, read whole and streamed (from
one file and from ten), and on 200,000 streamed.

Both sides (the tiny Qwen2-VL-style teacher and the LLaVA-style student) are encoded, as in the
align and distill stages. CPU, offline.

    .venv/bin/python bench/data.py --json bench/results/data-cpu.json
    .venv/bin/python bench/data.py --smoke        # seconds: a few batches of each (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a clone without installing


def sides():
    from genrecal_cli.models import load_vlm
    from genrecal_cli.world.zoo import resolve_source

    teacher = load_vlm(resolve_source("zoo:tiny-teacher"))
    student = load_vlm(resolve_source("zoo:tiny-student"))
    return {"teacher": teacher.processor, "student": student.processor}, (teacher, student)


def data_sets(work: Path, n: int):
    """{name: (rows, spec)}: shapes (columns layout) and conversations (messages layout, files)."""
    from genrecal_cli.data.sources import load_split
    from genrecal_cli.recipe import DataSpec
    from genrecal_cli.commands.distill import load_rows
    from genrecal_cli.world.chats import build_chats

    shapes = DataSpec(shapes_size=n, max_length=512)
    chats = DataSpec(source=str(build_chats(work / f"chats-{n}", n, 20)), max_length=512)
    return {"shapes": (load_rows(shapes, "train"), shapes), "chats": (load_split(chats, "train"), chats)}


def throughput(rows, spec, procs, workers: int, batches: int, batch_size: int = 16) -> dict:
    """Items/s of Batches (encode + collate, both sides) over `batches` micro-batches after the
    first (which pays for starting the workers)."""
    from genrecal_cli.data.loader import Batches, PairDataset
    from genrecal_cli.data.sampler import RankBatches

    ds = PairDataset(rows, spec, procs)
    it = Batches(ds, RankBatches(len(ds), batch_size, 1, 0, seed=0), procs, workers=workers, pin_memory=False)
    t0 = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    t0, items = time.perf_counter(), 0
    for _ in range(batches):
        items += next(it)["items"]
    dt = time.perf_counter() - t0
    return {"workers": workers, "items": items, "seconds": round(dt, 2), "items_per_s": round(items / dt, 1),
            "first_batch_s": round(first, 2)}


def padding(rows, spec, procs, vlms, batch_size: int = 16) -> dict:
    """Padding share over one epoch of batches (both sides), with and without length grouping,
    from each item's real token counts (each item encoded once)."""
    from genrecal_cli.data.loader import Item, PairDataset
    from genrecal_cli.data.sampler import RankBatches, length_estimates

    ds = PairDataset(rows, spec, procs)
    lengths = {}
    for i in range(len(ds)):
        met = ds[i]
        if isinstance(met, Item):
            lengths[i] = [len(e.input_ids) for e in met.sides.values()]
    image_tokens = max(v.image_tokens_per_image() for v in vlms)
    out = {}
    for name, est in (("plain", None), ("group_by_length", length_estimates(rows, spec, image_tokens))):
        sampler = RankBatches(len(ds), batch_size, 1, 0, seed=0, lengths=est)
        real = slots = 0
        for batch in sampler:
            kept = [lengths[i] for i in batch if i in lengths]
            for side in range(len(procs)):
                widths = [k[side] for k in kept]
                real, slots = real + sum(widths), slots + max(widths) * len(widths)
        out[name] = round(1 - real / slots, 3)
    return out


def first_step(work: Path, n: int, streaming: bool, shards: int = 1) -> dict:
    """Seconds from distill() to the first training step on n conversations (data already built;
    read whole, which converts the file to Arrow once, or streamed; in one file or `shards`)."""
    from genrecal_cli.recipe import recipe_from_dict
    from genrecal_cli.commands.distill import distill
    from genrecal_cli.world.chats import build_chats

    copies = max(1, n // 20000)  # beyond 20,000: that many rows again and again (building is slow; reading is not)
    folder = build_chats(work / f"first-{n // copies}", n // copies, 20)
    if shards > 1 or copies > 1:  # the same rows as train-00000.jsonl ... (images shared through a link)
        lines = (folder / "train.jsonl").read_text().splitlines(keepends=True) * copies
        sharded = work / f"first-{n}-{shards}"
        if not sharded.exists():
            sharded.mkdir()
            (sharded / "images").symlink_to(folder / "images")
            for k in range(shards):
                (sharded / f"train-{k:05d}.jsonl").write_text("".join(lines[k::shards]))
        folder = sharded

    class Clock:
        first = None

        def stage_start(self, *a):
            pass

        def step(self, stage, step, metrics):
            self.first = self.first or time.perf_counter()

        def stage_end(self, *a):
            pass

        def note(self, *a, **k):
            pass

    raw = {"teacher": {"path": "zoo:tiny-teacher"}, "student": {"path": "zoo:tiny-student"},
           "data": {"source": str(folder), "max_length": 512, "streaming": streaming},
           "stages": {"align": {"steps": 1, "batch_size": 16, "lr": 1e-3}},
           "train": {"output_dir": str(work / f"run-{n}-{streaming}-{shards}"), "eval_items": 0, "probe_every": 0}}
    clock = Clock()
    t0 = time.perf_counter()
    distill(recipe_from_dict(raw), reporter=clock, overwrite=True)
    return {"items": n, "streaming": streaming, "files": shards, "seconds_to_first_step": round(clock.first - t0, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--smoke", action="store_true", help="a few batches of each, small data (CI)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    procs, vlms = sides()
    result = {"machine": {"cores": len(os.sched_getaffinity(0)), "torch_threads": a.threads}, "throughput": {},
              "padding": {}, "first_step": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n = 200 if a.smoke else 2000
        for name, (rows, spec) in data_sets(work, n).items():
            result["throughput"][name] = [throughput(rows, spec, procs, w, 2 if a.smoke else 40) for w in (0, 1, 2)]
            result["padding"][name] = padding(rows.select(range(min(len(rows), 200 if a.smoke else 1000))), spec, procs, vlms)
            print(name, json.dumps(result["throughput"][name]), json.dumps(result["padding"][name]), flush=True)
        for size in ((200,) if a.smoke else (2000, 20000, 200000)):
            for streaming, shards in ((False, 1), (True, 1), (True, 10)):
                if size > 20000 and not streaming:
                    continue  # read whole, 200,000 rows are converted to Arrow first: the reason to stream
                result["first_step"].append(first_step(work, size, streaming, shards))
                print(json.dumps(result["first_step"][-1]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
