"""The run's picture (report.png, `genrecal report`): drawn from metrics.jsonl and the exported
student's genrecal.json, also for a run still going; without matplotlib the run still ends."""

from __future__ import annotations

import builtins
import json

import pytest

from genrecal_cli.commands.report import ReportUnavailable, figure, read_run, write_report

from .conftest import run_cli

ACCURACY = {"teacher": {"accuracy": 0.905, "n": 200}, "student before": {"accuracy": 0.0, "n": 200},
            "student after": {"accuracy": 0.425, "n": 200}}


def _run_folder(tmp_path, finished=True, half_line=False):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"stage": "align", "step": s, "loss": 1.0 / s, "ar": 0.5 / s, "kl": 0.4 / s, "reg": 0.1 / s, "lr": 1e-3,
             "boundary_agreement": 0.9, "top1": 0.5 + s / 100} for s in (10, 20)]
    rows += [{"stage": "distill", "step": s, "loss": 2.0 / s, "ar": 0.2, "kl": 0.2, "reg": 0.01, "sft": 1.5 / s,
              "lr": 5e-4, "rely_first_top1_real": 0.6, "rely_first_top1_other": 0.2, "rely_first_top1_zero": 0.0}
             for s in (10, 20, 30)]
    rows += [{"stage": "finetune", "step": 10, "loss": 0.3, "sft": 0.3, "lr": 2e-4, "items_per_s": 300.0}]
    rows.append({"stage": "distill", "step": 20, "loss": 9.0, "sft": 9.0})  # a resumed run logs step 20 again
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (run / "metrics.jsonl").write_text(text + ('{"stage": "finetune", "st' if half_line else ""))
    if finished:
        (run / "student").mkdir()
        (run / "student" / "genrecal.json").write_text(json.dumps(
            {"recipe": {"teacher": {"path": "T"}, "student": {"path": "S"}, "data": {"source": "shapes"}},
             "accuracy": ACCURACY}))
    return run


def _line(ax, label):
    return next(line for line in ax.get_lines() if line.get_label() == label)


def test_the_picture_shows_each_stage_on_one_axis_and_the_accuracy(tmp_path):
    record = read_run(_run_folder(tmp_path))
    assert [s[0] for s in record.stages] == ["align", "distill", "finetune"]
    fig = figure(record)
    losses, lr, align, probe, speed, acc = fig.axes
    ar = _line(losses, "ar")
    # distill's steps follow align's last; its step 20, logged again by a resumed run without ar, has none
    assert list(ar.get_xdata()) == [10, 20, 30, 50]
    assert list(ar.get_ydata()) == pytest.approx([0.05, 0.025, 0.2, 0.2])
    sft = _line(losses, "sft")
    assert list(sft.get_xdata()) == [30, 40, 50, 60] and sft.get_ydata()[1] == 9.0  # the resumed step's value
    assert list(_line(align, "top-1 agreement with the teacher").get_ydata()) == pytest.approx([0.6, 0.7])
    assert _line(probe, "first answer token, student features real").get_ydata()[0] == pytest.approx(0.6)
    assert [round(b.get_height(), 1) for b in acc.patches] == [90.5, 0.0, 42.5]
    assert [t.get_text() for t in acc.get_xticklabels()] == ["teacher", "student before", "student after"]


def test_several_teachers_are_drawn_each_under_its_name(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"stage": "distill", "step": s, "loss": 2.0 / s, "sft": 1.0 / s, "A/ar": 0.3, "A/kl": 0.2, "B/ar": 0.6,
             "B/kl": 0.5, "A/top1": 0.7, "B/top1": 0.4, "B/rely_first_top1_real": 0.8} for s in (10, 20)]
    rows.append({"stage": "teachers[1]/finetune", "step": 5, "loss": 1.0, "sft": 1.0})  # B built first by its recipe
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "student").mkdir()
    (run / "student" / "genrecal.json").write_text(json.dumps(
        {"recipe": {"teachers": [{"name": "A", "path": "TA"}, {"name": "B", "path": "TB"}], "student": {"path": "S"}},
         "accuracy": {"teacher A": {"accuracy": 0.8}, "teacher B": {"accuracy": 0.6},
                      "student before": {"accuracy": 0.1}, "student after": {"accuracy": 0.5}}}))
    record = read_run(run)
    assert record.teachers == ["A", "B"]
    assert [s[0] for s in record.stages] == ["teachers[1]/finetune", "distill"]  # the prerequisite ran first
    fig = figure(record)
    losses, _, align, probe, _, acc = fig.axes
    assert list(_line(losses, "B: ar").get_ydata()) == pytest.approx([0.6, 0.6]) and _line(losses, "sft")
    assert list(_line(align, "A: top-1 agreement with the teacher").get_ydata()) == pytest.approx([0.7, 0.7])
    assert _line(probe, "B: first answer token, student features real").get_ydata()[0] == pytest.approx(0.8)
    assert [t.get_text() for t in acc.get_xticklabels()] == ["teacher A", "teacher B", "student before", "student after"]
    assert "teachers A TA, B TB -> student S" in fig._suptitle.get_text()


def test_a_run_still_going_is_drawn_as_far_as_it_got(tmp_path):
    from PIL import Image

    run = _run_folder(tmp_path, finished=False, half_line=True)
    path = write_report(run)
    assert path == run / "report.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 1000
    acc = figure(read_run(run)).axes[-1]
    assert not acc.patches and "no accuracy yet" in acc.texts[0].get_text()
    assert not list(run.glob(".*tmp"))


def test_genrecal_report_draws_a_folder_and_names_a_bad_one(tmp_path):
    run = _run_folder(tmp_path)
    out = run_cli("report", str(run), "--output", str(tmp_path / "pic.png"))
    assert out.returncode == 0, out.stderr
    assert "pic.png" in out.stdout and (tmp_path / "pic.png").stat().st_size > 10_000
    bad = run_cli("report", str(tmp_path / "nothing"))
    assert bad.returncode == 1 and "nothing: no such run folder" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "empty").mkdir()
    empty = run_cli("report", str(tmp_path / "empty"))
    assert empty.returncode == 1 and "no metrics.jsonl" in empty.stderr


def test_without_matplotlib_the_picture_says_how_to_get_it(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    run = _run_folder(tmp_path)
    with pytest.raises(ReportUnavailable, match=r"pip install 'genrecal\[report\]'"):
        write_report(run)
    from io import StringIO

    from rich.console import Console

    from genrecal_cli.cli import _draw_report

    console = Console(file=StringIO(), width=200)
    _draw_report(run, console)  # what distill does at its end: a hint, not a failure
    assert "genrecal[report]" in console.file.getvalue() and f"genrecal report {run}" in console.file.getvalue()
    assert not (run / "report.png").exists()
