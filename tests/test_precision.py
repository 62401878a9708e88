"""bf16 on CPU: a few steps of every stage with a bf16 teacher and student, in a subprocess (an
accelerate state of its own). Compute in bf16 under autocast, masters and optimizer states in
fp32, side computations (alignment statistics, probe, accuracy) in the same precision, the
student exported in its own dtype; losses close to the fp32 run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genrecal_cli.engine.checkpoint import load_tensors

ENTRY = Path(__file__).with_name("cli_entry.py")


def _run(tmp_path: Path, precision: str) -> Path:
    out = tmp_path / precision
    recipe = tmp_path / f"{precision}.toml"
    stages = "".join(f"[stages.{s}]\nsteps = 2\nbatch_size = 4\nlr = 1e-3\nlr_end = 1e-4\n" for s in ("align", "distill", "finetune"))
    recipe.write_text(
        '[teacher]\npath = "zoo:tiny-teacher"\ndtype = "bfloat16"\n[student]\npath = "zoo:tiny-student"\ndtype = "bfloat16"\n'
        f'[data]\nshapes_size = 16\n{stages}[train]\noutput_dir = "{out}"\nlog_every = 1\neval_items = 4\n'
        f'precision = "{precision}"\nsave_every = 1\nkeep_checkpoints = 2\nprobe_items = 4\n'
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "GENRECAL_TEST_SIDE": str(tmp_path / f"{precision}-side")}
    done = subprocess.run([sys.executable, str(ENTRY), "distill", str(recipe)], cwd=ENTRY.parents[1], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "accuracy on the validation split" in done.stdout
    return out


def _side_computations(tmp_path: Path, precision: str) -> dict[str, set]:
    """{function: {(autocast on, its dtype)}} over every call of the run's side computations."""
    seen: dict[str, set] = {}
    for line in (tmp_path / f"{precision}-side" / "side-0.jsonl").read_text().splitlines():
        r = json.loads(line)
        seen.setdefault(r["fn"], set()).add((r["autocast"], r["dtype"]))
    return seen


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_bf16_run_on_cpu_keeps_fp32_masters_and_follows_fp32(tmp_path):
    bf16, fp32 = _run(tmp_path, "bf16"), _run(tmp_path, "fp32")
    rows = _rows(bf16)
    assert [(r["stage"], r["step"]) for r in rows] == [(s, i) for s in ("align", "distill", "finetune") for i in (1, 2)]
    # the side computations ran in bf16 too (under CPU autocast in bf16): token alignment and
    # top-1 agreement, the probe, greedy generation for the accuracy table; in fp32 without it
    teacher_rows = [r for r in rows if r["stage"] != "finetune"]
    assert all("top1" in r and "boundary_agreement" in r for r in teacher_rows)
    assert all("rely_first_top1_real" in r for r in teacher_rows if r["step"] == 2)
    side = ("alignment_stats", "reliance", "generate_answers")
    assert _side_computations(tmp_path, "bf16") == {fn: {(True, "torch.bfloat16")} for fn in side}
    assert {fn: {on for on, _ in v} for fn, v in _side_computations(tmp_path, "fp32").items()} == {fn: {False} for fn in side}

    # masters and optimizer states in fp32, though the recipe loads both models in bf16
    kept = sorted(p.name for p in (bf16 / "checkpoints").iterdir())
    assert kept == ["distill-0000001", "finetune-0000001"]
    state = load_tensors(bf16 / "checkpoints" / "distill-0000001" / "optimizer.pt")["state"]
    assert state and all(s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32 for s in state.values())
    from safetensors.torch import load_file

    master = load_file(str(bf16 / "distill" / "student" / "model.safetensors"))
    assert {v.dtype for v in master.values()} == {torch.float32}
    recal = load_file(str(bf16 / "distill" / "recalibrator.safetensors"))
    assert {v.dtype for v in recal.values()} == {torch.float32}
    # the export is the student's own dtype
    exported = load_file(str(bf16 / "student" / "model.safetensors"))
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}

    # bf16 compute follows fp32 compute closely over these few steps
    for a, b in zip(_rows(fp32), rows):
        for term in ("ar", "kl", "reg", "sft"):
            if term in a:
                assert b[term] == pytest.approx(a[term], rel=0.02, abs=2e-3), (a["stage"], a["step"], term, a[term], b[term])
