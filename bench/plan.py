"""The memory plan (genrecal_cli/commands/plan/) against the measured peak memory of tiny runs of the
real engine on CPU: per stage, the plan's estimate (static + the largest phase, no margin)
against the peak resident memory the run adds.

CPU has no allocator counter, so each run goes in a fresh process and measures what the engine
records per stage (`peak_rss_mb`: VmHWM from /proc/self/status, reset through
/proc/self/clear_refs at the stage's start) minus the resident memory after the imports and
before anything loads. The child runs with MALLOC_MMAP_THRESHOLD_=65536 so that glibc maps
every large block and unmaps it when freed: its default threshold grows after the first free
and then keeps freed tensors in the heap, where resident memory no longer follows live tensors
(--default-malloc runs without it too, for scale).

The pair is built from configs with tiny_vlm.build_tiny_vlm (no pretraining): a Qwen2-VL-style
teacher (hidden 768, 4 layers) and a LLaVA-style student (hidden 512, 6 layers), weights, AdamW
states and activations of hundreds of MB. The data are shapes images with answers long enough
that every item fills data.max_length on both sides, as the plan assumes; the reliance probe
runs at each stage's last step, as in a real run.

    .venv/bin/python bench/plan.py                     # fp32 and bf16 autocast, ~4 min on 2 cores
    .venv/bin/python bench/plan.py --precision fp32 --json bench/results/plan-cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a clone without installing

STAGES = ("align", "distill", "finetune")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def build_world(folder: Path, teacher: tuple[int, int], student: tuple[int, int], items: int) -> dict:
    """The pair and the data set (shapes images, answers long enough to fill max_length)."""
    from genrecal_cli.world.shapes import make_split
    from genrecal_cli.world.tiny_vlm import build_tiny_vlm

    paths = {"teacher": folder / "teacher", "student": folder / "student", "data": folder / "data",
             "warm_teacher": folder / "warm-teacher", "warm_student": folder / "warm-student"}
    if not paths["data"].exists():
        build_tiny_vlm("qwen2_vl", paths["teacher"], hidden_size=teacher[0], num_layers=teacher[1], seed=0)
        build_tiny_vlm("llava", paths["student"], hidden_size=student[0], num_layers=student[1], seed=1)
        build_tiny_vlm("qwen2_vl", paths["warm_teacher"], hidden_size=64, num_layers=1, seed=0)
        build_tiny_vlm("llava", paths["warm_student"], hidden_size=64, num_layers=1, seed=1)
        rows = make_split("train", items, seed=0)
        rows = rows.map(lambda r: {"answer": " ".join([r["answer"]] * 60)})
        rows.save_to_disk(str(paths["data"]))
    return {k: str(v) for k, v in paths.items()}


def recipe_for(paths: dict, precision: str, batch: int, steps: int, max_length: int, out: Path):
    from genrecal_cli.recipe import recipe_from_dict

    stage = {"steps": steps, "batch_size": batch, "lr": 1e-4, "lr_end": 1e-5}
    return recipe_from_dict({
        "teacher": {"path": paths["teacher"], "dtype": "float32"},
        "student": {"path": paths["student"], "dtype": "float32"},
        "data": {"source": paths["data"], "max_length": max_length},
        "stages": {s: dict(stage) for s in STAGES},
        "train": {"output_dir": str(out), "precision": precision, "eval_items": 0, "save_every": 0, "log_every": 1},
    })


def child(args) -> None:
    """One run in this process; prints its JSON result on the last line."""
    import torch  # noqa: F401  (imported before the baseline, as the run needs them)
    import transformers  # noqa: F401

    from genrecal_cli.commands import distill as run_module  # noqa: F401
    from genrecal_cli.engine import distill as engine  # noqa: F401
    from genrecal_cli.commands.plan import make_plan

    torch.set_num_threads(os.cpu_count() or 1)
    paths = json.loads(args.paths)
    with tempfile.TemporaryDirectory() as tmp:
        # A warm-up run of the same families at toy size: the library code the run executes
        # (libtorch's kernels, file-backed pages) becomes resident before the baseline instead
        # of counting as growth (about 240 MB here).
        warm = {"teacher": paths["warm_teacher"], "student": paths["warm_student"], "data": paths["data"]}
        run_module.distill(recipe_for(warm, args.child, 2, 1, args.max_length, Path(tmp) / "warm"))
        gc.collect()
        recipe = recipe_for(paths, args.child, args.batch, args.steps, args.max_length, Path(tmp) / "run")
        plan = make_plan(recipe, 1, 1000.0)
        baseline = rss_mb()
        t0 = time.perf_counter()
        result = run_module.distill(recipe)
        seconds = time.perf_counter() - t0
    stages = {}
    for m in plan.stages:
        measured = result.stages[m.stage]["peak_rss_mb"] - baseline
        stages[m.stage] = {"estimate_mb": round(m.total / 2**20, 1), "measured_mb": round(measured, 1),
                           "ratio": round(m.total / 2**20 / measured, 3), "peak_phase": m.peak_phase,
                           "static_mb": {k: round(v / 2**20, 1) for k, v in m.static.items()},
                           "phase_mb": {k: round(v / 2**20, 1) for k, v in m.phases[m.peak_phase].items()}}
    print(json.dumps({"precision": args.child, "malloc_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                      "baseline_mb": round(baseline, 1), "seconds": round(seconds, 1), "stages": stages}))


def logits_child(args) -> None:
    """One logits chunk of L_ar + L_kl (and of L_sft) forward and backward: its peak in bytes
    per (row x vocabulary), against the plan's constants K_REC and K_SFT."""
    import torch

    from genrecal_cli.engine import losses
    from genrecal_cli.engine.teacher import head_fn
    from genrecal_cli.commands.plan.estimate import K_REC, K_SFT

    rows, vocab, d = 1024, 32_000, 256
    out = {}
    for precision in ("fp32", "bf16"):
        e = 2 if precision == "bf16" else 4
        for term in ("rec", "sft"):
            torch.manual_seed(0)
            head = torch.nn.Linear(d, vocab, bias=False)
            if term == "rec":
                head = head.to(torch.bfloat16 if e == 2 else torch.float32).requires_grad_(False)
            x = torch.randn(rows, d, requires_grad=True)
            teacher_rows, targets = torch.randn(rows, d), torch.randint(0, vocab, (rows,))
            gc.collect()
            base = rss_mb()
            Path("/proc/self/clear_refs").write_text("5")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=e == 2):
                if term == "rec":
                    loss = sum(losses.recalibration_terms(head_fn(head), x, teacher_rows, targets))
                else:
                    loss = losses.sft(head, x, targets)
            loss.backward()
            peak = hwm_mb() - base - (vocab * d * 4 / 2**20 if term == "sft" else 0)  # the head's grad is a trained weight's
            constant = K_REC[e] if term == "rec" else K_SFT
            out[f"{term}_{precision}"] = {"measured": round(peak * 2**20 / (rows * vocab), 1), "plan": constant}
            del loss, head, x
    print(json.dumps(out))


def hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run_child(paths: dict, precision: str, args, mmap_threshold: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, __file__, "--child", precision, "--paths", json.dumps(paths), "--batch", str(args.batch),
           "--steps", str(args.steps), "--max-length", str(args.max_length)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"child run failed ({precision}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="updates per stage")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--teacher", default="768x4", help="hidden x layers of the Qwen2-VL-style teacher")
    parser.add_argument("--student", default="512x6", help="hidden x layers of the LLaVA-style student")
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "genrecal-bench-plan"))
    parser.add_argument("--default-malloc", action="store_true", help="also run without MALLOC_MMAP_THRESHOLD_, for scale")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "logits":
        return logits_child(args)
    if args.child:
        return child(args)

    dims = lambda s: tuple(int(x) for x in s.split("x"))  # noqa: E731
    folder = Path(args.cache) / f"t{args.teacher}-s{args.student}-n{args.items}"
    paths = build_world(folder, dims(args.teacher), dims(args.student), args.items)
    results = []
    for precision in args.precision:
        for mmap_threshold in (True, False) if args.default_malloc else (True,):
            results.append(run_child(paths, precision, args, mmap_threshold))
    print(f"teacher qwen2_vl {args.teacher}, student llava {args.student}, batch {args.batch} x max_length "
          f"{args.max_length}, {args.steps} updates per stage (CPU; MiB added to the resident set at each stage's peak)")
    print(f"{'precision':9} {'malloc':8} {'stage':9} {'estimate':>9} {'measured':>9} {'ratio':>6}  largest phase")
    for r in results:
        malloc = "mmap64k" if r["malloc_threshold"] else "default"
        for stage, s in r["stages"].items():
            print(f"{r['precision']:9} {malloc:8} {stage:9} {s['estimate_mb']:9.1f} {s['measured_mb']:9.1f} "
                  f"{s['ratio']:6.2f}  {s['peak_phase']}")
        print(f"{'':9} {'':8} (run {r['seconds']:.0f} s, resident after imports {r['baseline_mb']:.0f} MiB)")
    first = results[0]["stages"]
    print("\nestimate of the first run, by component (MiB):")
    for stage, s in first.items():
        parts = ", ".join(f"{k} {v:.0f}" for k, v in {**s["static_mb"], **s["phase_mb"]}.items() if v >= 0.5)
        print(f"  {stage}: {parts}")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    got = subprocess.run([sys.executable, __file__, "--child", "logits"], capture_output=True, text=True, env=env, cwd=ROOT)
    if got.returncode != 0:
        raise SystemExit(f"logits measurement failed:\n{got.stderr[-3000:]}")
    logits = json.loads(got.stdout.strip().splitlines()[-1])
    print("\nlogits chunk, peak bytes per (row x vocabulary) of one chunk's forward + backward (1024 rows, 32k vocabulary):")
    for key, v in logits.items():
        print(f"  {key:9} measured {v['measured']:5.1f}  plan {v['plan']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "logits": logits}, indent=2),
                                   encoding="utf-8")


if __name__ == "__main__":
    main()
