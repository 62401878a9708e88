"""Experiment trackers (train.log_with): the metrics of metrics.jsonl and the recipe reach
TensorBoard, offline, and read back; a tracker that is not installed or misspelt is named."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from genrecal_cli.commands.display import Reporter
from genrecal_cli.errors import GenrecalError, RecipeError
from genrecal_cli.recipe import recipe_from_dict
from genrecal_cli.commands.distill import distill


def _raw(out, **train):
    return {
        "teacher": {"path": "zoo:tiny-teacher"},
        "student": {"path": "zoo:tiny-student"},
        "data": {"shapes_size": 16, "max_length": 256},
        "stages": {"align": {"steps": 3, "batch_size": 4, "lr": 1e-3},
                   "finetune": {"steps": 2, "batch_size": 4, "lr": 1e-3}},
        "train": {"output_dir": str(out), "log_every": 1, "eval_items": 4, "probe_every": 0, **train},
    }


def test_tensorboard_gets_every_metrics_record_the_recipe_and_the_accuracy(tmp_path, tiny_pair):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    with Reporter(out, console=Console(file=io.StringIO()), log_every=1) as reporter:
        distill(recipe_from_dict(_raw(out, log_with=["tensorboard"])), reporter=reporter)
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events, f"no event file under {out / 'logs'}"
    scalars = {}
    for run in {e.parent for e in events}:
        acc = EventAccumulator(str(run))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for rec in records:  # every number of every record, at a step that only grows through the run
        for key in ("loss", "ar", "kl", "reg", "sft", "lr"):
            if rec.get(key) is not None:
                logged = dict(scalars[f"{rec['stage']}/{key}"])
                step = rec["step"] + (3 if rec["stage"] == "finetune" else 0)
                assert logged[step] == pytest.approx(rec[key], rel=1e-6)
    assert {"align/ar", "align/kl", "align/reg", "finetune/sft", "align/boundary_agreement"} <= set(scalars)
    assert [s for s, _ in scalars["finetune/sft"]] == [4, 5]
    assert "accuracy/student_after" in scalars and "accuracy/teacher" in scalars
    config = [p.read_text() for p in (out / "logs").rglob("hparams.yml")]  # the recipe, as the run's config
    assert config and "teacher.path: zoo:tiny-teacher" in config[0] and "stages.align.steps: 3" in config[0]


def test_a_misspelt_tracker_is_named_in_the_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match=r"train.log_with: 'tensorbord' is not one of .*did you mean 'tensorboard'"):
        recipe_from_dict(_raw(tmp_path, log_with=["tensorbord"]))


def test_a_tracker_that_is_not_installed_stops_the_run_before_it_starts(tmp_path, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(GenrecalError, match=r"train.log_with: wandb is not installed here \(pip install wandb\)"):
        distill(recipe_from_dict(_raw(tmp_path / "run", log_with=["wandb"])))
    assert not (tmp_path / "run").exists()
