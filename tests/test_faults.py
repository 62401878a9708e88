"""Faults in the middle of a stage, on the real CLI in a subprocess: `kill -9` after a mid-stage
checkpoint, Ctrl-C (SIGINT) and SIGTERM; `--resume` then reaches the same weights, bit for bit,
as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import ROOT, run_cli

ENV = {"OMP_NUM_THREADS": "1"}  # the same thread count in every run: bit-identical sums


def _recipe(path: Path, out: Path, *, align=2, distill=8, grad_accum=1) -> Path:
    # 16 items, batch 4: an epoch is 4 micro-batches, so 8 distill updates cross an epoch end.
    path.write_text(
        '[teacher]\npath = "zoo:tiny-teacher"\n[student]\npath = "zoo:tiny-student"\n[data]\nshapes_size = 16\n'
        f"[stages.align]\nsteps = {align}\nbatch_size = 4\ngrad_accum = {grad_accum}\n"
        f"[stages.distill]\nsteps = {distill}\nbatch_size = 4\ngrad_accum = {grad_accum}\n"
        f'[train]\noutput_dir = "{out}"\nlog_every = 1\neval_items = 0\nsave_every = 2\nkeep_checkpoints = 2\n'
    )
    return path


ENTRY = Path(__file__).with_name("cli_entry.py")


def _start(recipe: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "genrecal_cli", "distill", str(recipe), *extra], cwd=ROOT,
                            env={**os.environ, **ENV, "COLUMNS": "200"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(check, proc, timeout=300) -> None:
    deadline = time.time() + timeout
    while not check():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def _logged(out: Path, stage: str, step: int):
    def check():
        metrics = out / "metrics.jsonl"
        if not metrics.exists():
            return False
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        return any(r["stage"] == stage and r["step"] >= step for r in rows)

    return check


def _same_weights(a: Path, b: Path) -> None:
    for name in ("student/model.safetensors", "distill/recalibrator.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys()
        different = [k for k in x if not torch.equal(x[k], y[k])]
        assert not different, (name, different[:5])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted runs, one per grad_accum."""
    runs = {}
    for accum in (1, 2):
        base = tmp_path_factory.mktemp(f"straight{accum}")
        done = run_cli("distill", str(_recipe(base / "r.toml", base / "out", grad_accum=accum)), env=ENV)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[accum] = base / "out"
    return runs


def test_kill_9_mid_stage_then_resume_is_bit_identical(tmp_path, straight):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path / "r.toml", out)
    proc = _start(recipe)
    _wait_for(lambda: (out / "checkpoints" / "distill-0000004").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    assert 1 <= len(kept) <= 2 and "distill-0000004" in kept  # keep_checkpoints = 2
    resumed = run_cli("distill", str(recipe), "--resume", env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after distill step" in resumed.stdout
    step = int(resumed.stdout.split("resuming after distill step ")[1].split("/")[0])
    assert step >= 4
    _same_weights(straight[1], out)


@pytest.mark.parametrize(
    ("sig", "stage", "accum", "code"),
    [(signal.SIGTERM, "distill", 1, 143), (signal.SIGINT, "align", 2, 130), (signal.SIGINT, "distill", 2, 130)],
    ids=["sigterm-distill", "sigint-align-accum2", "sigint-distill-accum2"],
)
def test_signal_saves_then_resume_is_bit_identical(tmp_path, straight, sig, stage, accum, code):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path / "r.toml", out, grad_accum=accum)
    proc = _start(recipe)
    _wait_for(_logged(out, stage, 1), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    assert proc.returncode == code, err[-2000:]
    assert f"{stage}: stopped by {name} at step" in err and "--resume" in err, err[-2000:]
    assert "Traceback" not in err
    step = int(err.split(" at step ")[1].split("/")[0])
    saved = json.loads((out / "checkpoints" / f"{stage}-{step:07d}" / "meta.json").read_text())
    assert saved["step"] == step and saved["finished"] is False
    resumed = run_cli("distill", str(recipe), "--resume", env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _same_weights(straight[accum], out)


def test_sigterm_inside_an_optimizer_step_saves_after_that_update(tmp_path, straight):
    """The signal lands inside the 5th optimizer step (distill's 3rd: align has 2): that update
    completes, the checkpoint holds it, and the resumed run ends bit-identical."""
    out = tmp_path / "out"
    recipe = _recipe(tmp_path / "r.toml", out)
    env = {**os.environ, **ENV, "GENRECAL_TEST_SIGNAL": "SIGTERM:5"}
    done = subprocess.run([sys.executable, str(ENTRY), "distill", str(recipe)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr[-2000:]
    assert "distill: stopped by SIGTERM at step 3/8" in done.stderr
    assert json.loads((out / "checkpoints" / "distill-0000003" / "meta.json").read_text())["step"] == 3
    resumed = run_cli("distill", str(recipe), "--resume", env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after distill step 3/8" in resumed.stdout
    _same_weights(straight[1], out)


def test_a_streamed_run_stopped_mid_epoch_resumes_bit_identical(tmp_path):
    """data.streaming with a loader worker: SIGTERM inside distill's 3rd update (16 items, batch 4:
    an epoch is 4 micro-batches, so the stop falls in the first epoch and the resumed run crosses
    into the second); the checkpoint holds the worker's place in the stream, and the resumed run
    ends with the weights of an uninterrupted streamed run."""
    streamed = '[data]\nshapes_size = 16\nstreaming = true\nnum_workers = 1\n'

    def recipe(name):
        path = _recipe(tmp_path / f"{name}.toml", tmp_path / name)
        path.write_text(path.read_text().replace("[data]\nshapes_size = 16\n", streamed))
        return path

    straight = run_cli("distill", str(recipe("straight")), env=ENV)
    assert straight.returncode == 0, straight.stderr[-2000:]
    stopped = recipe("stopped")
    env = {**os.environ, **ENV, "GENRECAL_TEST_SIGNAL": "SIGTERM:5"}
    done = subprocess.run([sys.executable, str(ENTRY), "distill", str(stopped)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr[-2000:]
    rng = torch.load(tmp_path / "stopped" / "checkpoints" / "distill-0000003" / "rng" / "rank-0.pt", weights_only=True)
    assert rng["data"]["position"] == {"epoch": 0, "workers": {0: 3}, "num_workers": 1}
    resumed = run_cli("distill", str(stopped), "--resume", env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after distill step 3/8" in resumed.stdout
    _same_weights(tmp_path / "straight", tmp_path / "stopped")


def test_resuming_under_another_batch_split_is_refused_naming_what_changed(tmp_path, tiny_pair):
    """A run stopped by SIGTERM with batch_size 4 x grad_accum 2, resumed as 8 x 1 (the same
    global batch): its saved data position counts micro-batches of 4, so the resumed run would
    continue on other items. Refused in one line naming both keys; nothing trains. (tiny_pair:
    the zoo models are built before, so the signal's step count is the run's own.)"""
    out = tmp_path / "out"
    recipe = _recipe(tmp_path / "r.toml", out, grad_accum=2)
    env = {**os.environ, **ENV, "GENRECAL_TEST_SIGNAL": "SIGTERM:4"}
    done = subprocess.run([sys.executable, str(ENTRY), "distill", str(recipe)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr[-2000:]
    text = recipe.read_text().replace("batch_size = 4\ngrad_accum = 2", "batch_size = 8\ngrad_accum = 1")
    recipe.write_text(text)
    before = (out / "metrics.jsonl").read_text()
    resumed = run_cli("distill", str(recipe), "--resume", env=ENV)
    assert resumed.returncode == 1
    err = resumed.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "stages.distill.batch_size 4 -> 8" in err and "stages.distill.grad_accum 2 -> 1" in err, err
    assert (out / "metrics.jsonl").read_text() == before


def test_every_data_setting_a_position_depends_on_is_checked():
    from genrecal_cli.engine.checkpoint import Found
    from genrecal_cli.engine.stages import _check_layout, data_layout
    from genrecal_cli.errors import GenrecalError
    from genrecal_cli.recipe import recipe_from_dict

    def layout(**data):
        raw = {"teacher": {"path": "zoo:tiny-teacher"}, "student": {"path": "zoo:tiny-student"}, "data": data,
               "stages": {"distill": {"steps": 4, "batch_size": 4, "grad_accum": 2}}}
        recipe = recipe_from_dict(raw)
        return data_layout(recipe, recipe.stages.distill, 7, 2, 3)

    saved = layout()
    _check_layout(Found("distill", Path("c"), dict(saved)), layout(), False, "distill", "distill")  # the same: passes
    for meta, named in ((dict(saved, seed=8), "train.seed (this stage's seed) 8 -> 7"),
                        (dict(saved, group_by_length=True), "data.group_by_length True -> False"),
                        (dict(saved, processes=1), "the number of processes 1 -> 2")):
        with pytest.raises(GenrecalError, match=named.replace("(", r"\(").replace(")", r"\)")):
            _check_layout(Found("distill", Path("c"), meta), layout(), False, "distill", "distill")
    streamed = layout(streaming=True)
    assert streamed["num_workers"] == 3 and "num_workers" not in saved  # workers split a stream's shards only
    with pytest.raises(GenrecalError, match=r"data.num_workers \(a stream's loader workers\) 1 -> 3"):
        _check_layout(Found("distill", Path("c"), dict(streamed, num_workers=1)), streamed, False, "distill", "distill")
