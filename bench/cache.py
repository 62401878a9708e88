"""The teacher-feature cache against the online teacher: the time to write the cache
(`genrecal teach`), align + distill steps with the online teacher and from the cache, and the
end-to-end time of two students (two learning rates) distilled from one cache against two online runs.
The shipped reference teacher (zoo:shapes-teacher, 8 layers) and the tiny student on the shapes
data; CPU, offline, one process.

    .venv/bin/python bench/cache.py --json bench/results/cache-cpu.json
    .venv/bin/python bench/cache.py --smoke        # seconds (CI smoke)
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


LRS = (1e-3, 5e-4)


class Steps:
    """A reporter that keeps the seconds between the first and the last step of each stage."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}

    def stage_start(self, *a):
        pass

    def step(self, stage, step, metrics):
        self.times.setdefault(stage, []).append(time.perf_counter())

    def stage_end(self, *a):
        pass

    def note(self, *a, **k):
        pass

    def per_step(self, stage: str) -> float:
        t = self.times[stage]
        return (t[-1] - t[0]) / max(1, len(t) - 1)


def recipe(work: Path, out: str, items: int, steps: int, lr: float, cache: Path | None = None):
    from genrecal_cli.recipe import recipe_from_dict

    stage = {"steps": steps, "batch_size": 16, "lr": lr}
    return recipe_from_dict({
        "teacher": {"path": "zoo:shapes-teacher", **({"cache": str(cache)} if cache else {})},
        "student": {"path": "zoo:tiny-student"},
        "data": {"shapes_size": items, "max_length": 256},
        "stages": {"align": stage, "distill": stage},
        "train": {"output_dir": str(work / out), "eval_items": 0, "probe_every": 0, "save_every": 0},
    })


def run(work: Path, out: str, items: int, steps: int, lr: float, cache: Path | None = None) -> dict:
    from genrecal_cli.commands.distill import distill

    rep = Steps()
    t0 = time.perf_counter()
    distill(recipe(work, out, items, steps, lr, cache), reporter=rep, overwrite=True)
    return {"seconds": round(time.perf_counter() - t0, 2), "align_step_s": round(rep.per_step("align"), 4),
            "distill_step_s": round(rep.per_step("distill"), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    a = ap.parse_args()
    import torch

    from genrecal_cli.commands.distill import teach

    torch.set_num_threads(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    items, steps = (32, 3) if a.smoke else (2000, 100)
    result = {"machine": {"cores": len(os.sched_getaffinity(0)), "torch_threads": a.threads},
              "items": items, "steps_per_stage": steps, "batch_size": 16}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache = work / "cache"
        t0 = time.perf_counter()
        teach(recipe(work, "teach", items, steps, 1e-3, cache), cache, storage="bf16")
        result["teach_s"] = round(time.perf_counter() - t0, 2)
        result["cache_bytes"] = sum(f.stat().st_size for f in cache.iterdir())
        result["storage"] = "bf16"
        print(json.dumps({k: result[k] for k in ("teach_s", "cache_bytes")}), flush=True)
        # two students: the same model trained at two learning rates (an ablation); the data is the same
        result["online"] = [run(work, f"online-{lr}", items, steps, lr) for lr in LRS]
        print(json.dumps(result["online"]), flush=True)
        result["cached"] = [run(work, f"cached-{lr}", items, steps, lr, cache) for lr in LRS]
        print(json.dumps(result["cached"]), flush=True)
        online = sum(x["seconds"] for x in result["online"])
        cached = result["teach_s"] + sum(x["seconds"] for x in result["cached"])
        result["two_students_s"] = {"online": round(online, 1), "cache (teach + two runs)": round(cached, 1)}
        print(json.dumps(result["two_students_s"]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
