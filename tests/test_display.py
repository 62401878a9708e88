"""The training display: one plain line per logged step, metrics.jsonl, silence off the main
process, and a live display that runs through a stage on a fake terminal."""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
import time

import pytest
from rich.console import Console

from genrecal_cli.commands.display import METRICS_FILE, Reporter

from .conftest import ROOT

FULL = {
    "loss": 2.3141,
    "ar": 1.1,
    "kl": 0.41,
    "reg": 0.52,
    "sft": 0.28,
    "lr": 4.1e-4,
    "items_per_s": 14.2,
    "tokens_per_s": 1830.4,
    "pad_share": 0.21,
    "skipped_items": 3,
    "truncated_items": 0,
    "top1": 0.62,
    "teacher_q_tokens": 412.0,
    "student_q_tokens": 598.5,
    "teacher_a_tokens": 31.2,
    "student_a_tokens": 24.5,
    "a_token_ratio": 1.27,
    "boundary_agreement": 0.71,
    "grad_norm": 0.875,
}


def plain_console() -> Console:
    return Console(file=io.StringIO(), width=80)


def run_stage(reporter: Reporter, stage: str, total: int, metrics=FULL, start_step: int = 0) -> None:
    reporter.stage_start(stage, total, start_step=start_step)
    for step in range(start_step + 1, total + 1):
        reporter.step(stage, step, dict(metrics))
    reporter.stage_end(stage)


def step_lines(output: str, stage: str) -> list[str]:
    return [line for line in output.splitlines() if re.match(rf"{stage}\s+\d+/\d+\s", line)]


def test_plain_mode_prints_one_line_per_logged_step_and_always_the_last(tmp_path):
    console = plain_console()
    with Reporter(tmp_path, console=console, log_every=10) as r:
        assert not r.live  # a StringIO console is not a terminal
        run_stage(r, "distill", 25)
    out = console.file.getvalue()
    lines = step_lines(out, "distill")
    assert [re.search(r"(\d+)/25", line).group(1) for line in lines] == ["10", "20", "25"]
    assert len(out.strip().splitlines()) == 3 + 2  # plus the stage start and stage done lines
    first = lines[0]
    assert "loss 2.314" in first
    for piece in ("ar 1.10", "kl 0.41", "reg 0.52", "sft 0.28", "lr 4.1e-04", "14.2 items/s", "1,830 tok/s", "pad 21%",
                  "skipped 3"):
        assert piece in first
    assert "top1 0.62" in first and "boundaries 71%" in first and "grad_norm 0.875" in first
    assert re.search(r"distill done\s+25 steps in", out)


def test_a_long_stage_prints_a_progress_line_every_30_seconds_between_logged_steps(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    console = plain_console()
    with Reporter(tmp_path, console=console, log_every=10) as r:
        r.stage_start("distill", 40)
        for step in range(1, 41):
            now[0] += 12.0  # 12 s a step: ten steps between logged lines take two minutes
            r.step("distill", step, dict(FULL))
    out = console.file.getvalue().splitlines()
    progress = [line for line in out if re.match(r"distill\s+\d+/40\s+[\d.]+ steps/s", line)]
    # after a logged step at 10: 30 s pass at step 13 (36 s), 16, 19; then 20 is logged again
    assert [int(re.search(r"(\d+)/40", line).group(1)) for line in progress][:3] == [3, 6, 9]
    assert [int(re.search(r"(\d+)/40", line).group(1)) for line in progress][3:6] == [13, 16, 19]
    assert "0.08333 steps/s" in progress[0] and "[00:36<07:24]" in progress[0]
    assert len(step_lines("\n".join(out), "distill")) == 4 + len(progress)
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [rec["step"] for rec in records] == [10, 20, 30, 40]  # progress lines are not metrics


def test_plain_lines_stay_one_line_on_a_narrow_console(tmp_path):
    console = Console(file=io.StringIO(), width=40)
    with Reporter(None, console=console, log_every=5) as r:
        run_stage(r, "align", 10)
    assert len(step_lines(console.file.getvalue(), "align")) == 2


def test_resumed_stage_logs_on_absolute_steps_and_counts_only_the_steps_run(tmp_path):
    console = plain_console()
    with Reporter(tmp_path, console=console, log_every=4) as r:
        run_stage(r, "finetune", 10, start_step=5)
    out = console.file.getvalue()
    assert [re.search(r"(\d+)/10", line).group(1) for line in step_lines(out, "finetune")] == ["8", "10"]
    assert "resuming after step 5" in out
    assert "5 steps in" in out


def test_metrics_jsonl_has_one_object_per_logged_step_with_nan_as_null(tmp_path):
    out_dir = tmp_path / "run" / "nested"  # created on demand
    metrics = {**FULL, "kl": float("nan"), "reg": float("inf"), "sft": None}
    with Reporter(out_dir, console=plain_console(), log_every=3) as r:
        run_stage(r, "distill", 7, metrics)
    text = (out_dir / METRICS_FILE).read_text()
    assert "NaN" not in text and "Infinity" not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert [rec["step"] for rec in records] == [3, 6, 7]
    for rec in records:
        assert list(rec)[:4] == ["stage", "step", "time", "loss"]
        assert set(rec) == {"stage", "step", "time", *FULL}
        assert rec["stage"] == "distill"
        assert rec["kl"] is None and rec["reg"] is None and rec["sft"] is None
        assert rec["loss"] == pytest.approx(2.3141)
        assert abs(rec["time"] - time.time()) < 60
    assert len({tuple(rec) for rec in records}) == 1  # the same key order on every line


def test_a_stage_stopped_early_still_logs_its_last_step(tmp_path):
    console = plain_console()
    with Reporter(tmp_path, console=console, log_every=10) as r:
        r.stage_start("distill", 100)
        for step in range(1, 24):
            r.step("distill", step, {"loss": 100.0 / step})
        r.stage_end("distill")
        run_stage(r, "finetune", 10)  # ends on a logged step: nothing extra
    lines = step_lines(console.file.getvalue(), "distill")
    assert [re.search(r"(\d+)/100", line).group(1) for line in lines] == ["10", "20", "23"]
    assert "loss 4.348" in lines[-1]
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [(rec["stage"], rec["step"]) for rec in records] == [
        ("distill", 10), ("distill", 20), ("distill", 23), ("finetune", 10)
    ]


def test_metrics_jsonl_is_appended_across_runs_and_closed(tmp_path):
    for _ in range(2):
        r = Reporter(tmp_path, console=plain_console(), log_every=1)
        with r:
            run_stage(r, "align", 2, {"loss": 1.0})
        assert r._file is None
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 4


def test_no_output_dir_writes_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Reporter(None, console=plain_console(), log_every=1) as r:
        run_stage(r, "align", 3)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("live", [None, True, False])
def test_disabled_reporter_writes_and_prints_nothing(tmp_path, live):
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    out_dir = tmp_path / "out"
    with Reporter(out_dir, console=console, log_every=1, live=live, enabled=False) as r:
        run_stage(r, "distill", 5)
        r.note("checkpoint saved")
    assert console.file.getvalue() == ""
    assert not out_dir.exists()


def test_missing_and_odd_metrics_do_not_crash(tmp_path):
    console = plain_console()
    with Reporter(tmp_path, console=console, log_every=1) as r:
        r.stage_start("align", 4)
        r.step("align", 1, {})
        r.step("align", 2, {"loss": None, "ar": 0.5, "lr": None, "label": "text"})
        r.step("align", 3, {"kl": 0.25, "top1": float("nan"), "count": 7})
        r.step("align", 4, {"loss": 0.0001, "boundary_agreement": 1.0})
        r.stage_end("align", {"loss": 0.0001, "checkpoint": "runs/x"})
        r.step("unannounced", 1, {"loss": 1.5})  # the loop forgot stage_start
    out = console.file.getvalue()
    lines = step_lines(out, "align")
    assert len(lines) == 4
    assert "ar 0.50" in lines[1] and "loss" not in lines[1] and "lr" not in lines[1]
    assert "kl 0.25" in lines[2] and "top1 nan" in lines[2] and "count 7" in lines[2]
    assert "loss 1.0e-04" in lines[3] and "boundaries 100%" in lines[3]
    assert "checkpoint runs/x" in out
    assert re.search(r"unannounced\s+1\s+loss 1.500", out)
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert records[1]["label"] == "text" and records[2]["top1"] is None


def test_note_appears_in_plain_mode():
    console = plain_console()
    with Reporter(None, console=console) as r:
        r.note("checkpoint saved to runs/demo/distill [step 120]", style="yellow")
    assert "checkpoint saved to runs/demo/distill [step 120]" in console.file.getvalue()


def test_live_mode_runs_through_stages_on_a_terminal(tmp_path):
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with Reporter(tmp_path, console=console, log_every=5) as r:
        assert r.live
        run_stage(r, "align", 6, {"loss": 4.5678, "ar": 4.5678})
        r.stage_start("distill", 12)
        for step in range(1, 13):
            r.step("distill", step, FULL)
            if step == 7:
                r.note("checkpoint saved mid-stage")
        r.stage_end("distill")
    out = console.file.getvalue()
    assert "align" in out and "distill" in out
    assert "2.314" in out and "4.568" in out
    assert "token alignment" in out and "71%" in out and "grad_norm" in out
    assert "checkpoint saved mid-stage" in out
    assert "12/12" in out and "6/6" in out
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 2 + 3


def test_live_panel_fits_an_80_column_terminal():
    console = Console(file=io.StringIO(), force_terminal=True, width=80, color_system=None)
    with Reporter(None, console=console, log_every=1) as r:
        run_stage(r, "distill", 2, {**FULL, "extra_metric_with_a_long_name": 123456.0})
    lines = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", console.file.getvalue()).splitlines()
    assert lines and max(len(line) for line in lines) <= 80


def test_live_none_follows_the_console():
    assert Reporter(None, console=Console(file=io.StringIO(), force_terminal=True)).live
    assert not Reporter(None, console=Console(file=io.StringIO())).live


def test_log_every_must_be_positive():
    with pytest.raises(ValueError, match="log_every"):
        Reporter(None, log_every=0)


def test_display_does_not_import_torch():
    code = "import sys, genrecal_cli.commands.display\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_number_formats_survive_extremes():
    console = plain_console()
    with Reporter(None, console=console, log_every=1) as r:
        r.stage_start("distill", 1)
        r.step("distill", 1, {"loss": math.inf, "lr": 0.0, "tokens_per_s": 1.5e7, "big": 3e9, "tiny": 1e-7})
    line = step_lines(console.file.getvalue(), "distill")[0]
    assert "loss inf" in line and "lr 0.0e+00" in line and "15,000,000 tok/s" in line
    assert "big 3.00e+09" in line and "tiny 1.00e-07" in line


PROBE = {f"rely_{part}_{what}_{v}": value for part, base in (("first", 0.9), ("later", 0.97))
         for what in ("top1", "ar") for v, value in zip(("real", "other", "zero"), (base, base - 0.5, base - 0.6))}


def test_probe_steps_are_always_logged_and_shown_in_line_and_panel(tmp_path):
    console = plain_console()
    with Reporter(tmp_path, console=console, log_every=10) as r:
        r.stage_start("distill", 20)
        for step in range(1, 21):
            r.step("distill", step, {**FULL, **(PROBE if step == 7 else {})})
        r.stage_end("distill")
    lines = step_lines(console.file.getvalue(), "distill")
    assert [re.search(r"(\d+)/20", line).group(1) for line in lines] == ["7", "10", "20"]  # 7: the probe
    assert "rely first 0.90/0.40/0.30" in lines[0] and "rely later 0.97/0.47/0.37" in lines[0]
    assert "rely" not in lines[1]
    rows = [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert rows[0]["step"] == 7 and rows[0]["rely_first_top1_other"] == pytest.approx(0.4)

    live = Console(file=io.StringIO(), force_terminal=True, width=80, color_system=None)
    with Reporter(None, console=live, log_every=1) as r:
        run_stage(r, "distill", 1, {**FULL, **PROBE})
    out = live.file.getvalue()
    assert "reliance on the student" in out and "first answer token" in out and "40%" in out
    lines = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out).splitlines()
    assert max(len(line) for line in lines) <= 80


def test_several_teachers_show_each_teachers_terms_alignment_and_probe_under_its_name(tmp_path):
    """Several [[teachers]]: `NAME/key` metrics read as that teacher's, in the line, the panel and
    metrics.jsonl's order; a step with any teacher's probe is logged."""
    from genrecal_cli.commands.metrics_view import ordered_keys, split_key

    two = {"loss": 2.5, "sft": 0.3}
    for name, shift in (("charts", 0.0), ("ocr", 0.5)):
        two.update({f"{name}/ar": 1.0 + shift, f"{name}/kl": 0.4 + shift, f"{name}/top1": 0.6 + shift / 10,
                    f"{name}/teacher_a_tokens": 30.0 + shift, f"{name}/student_a_tokens": 24.0,
                    f"{name}/boundary_agreement": 0.7})
    two["grad_norm"] = 0.5
    assert split_key("ocr/ar") == ("ocr", "ar") and split_key("ocr/extra") == (None, "ocr/extra")
    assert ordered_keys(two)[:4] == ["loss", "sft", "charts/ar", "charts/kl"] and ordered_keys(two)[-1] == "grad_norm"
    console = plain_console()
    with Reporter(tmp_path, console=console, log_every=10) as r:
        r.stage_start("distill", 20)
        for step in range(1, 11):
            probe = {"ocr/rely_first_top1_real": 0.9, "ocr/rely_first_top1_other": 0.2,
                     "ocr/rely_first_top1_zero": 0.1} if step == 3 else {}
            r.step("distill", step, {**two, **probe})
    lines = step_lines(console.file.getvalue(), "distill")
    assert [re.search(r"(\d+)/20", line).group(1) for line in lines] == ["3", "10"]  # 3: ocr's probe
    assert "(sft 0.30 | charts: ar 1.00 kl 0.40 | ocr: ar 1.50 kl 0.90)" in lines[0]
    assert "charts top1 0.60" in lines[0] and "ocr top1 0.65" in lines[0] and "ocr rely first 0.90/0.20/0.10" in lines[0]
    assert "grad_norm 0.5" in lines[0] and "charts/ar" not in lines[0]  # a teacher's key is not an extra
    rows = [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert list(rows[0])[3:7] == ["loss", "sft", "charts/ar", "charts/kl"] and rows[0]["ocr/ar"] == 1.5

    live = Console(file=io.StringIO(), force_terminal=True, width=80, color_system=None)
    with Reporter(None, console=live, log_every=1) as r:
        run_stage(r, "distill", 1, {**two, "ocr/rely_first_top1_real": 0.9, "ocr/rely_first_top1_other": 0.2,
                                     "ocr/rely_first_top1_zero": 0.1})
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", live.file.getvalue())
    assert "charts ar" in out and "ocr kl" in out  # each teacher's terms
    assert re.search(r"top-1 agreement\s+60%\s+65%", out)  # a column per teacher
    assert "ocr first answer token" in out and "charts first answer token" not in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_the_data_layout_is_recorded_but_not_shown(tmp_path):
    """Every row carries the stage's data layout (what a resume must match) in metrics.jsonl; the
    log line does not repeat it at every step."""
    layout = {"processes": 2, "global_batch": 32, "batch_size": 16, "grad_accum": 1, "seed": 1,
              "group_by_length": False}
    console = plain_console()
    with Reporter(tmp_path, console=console, log_every=1) as r:
        run_stage(r, "distill", 1, {"loss": 1.0, **layout, "grad_norm": 0.5})
    line = step_lines(console.file.getvalue(), "distill")[0]
    assert "grad_norm 0.5" in line and not any(f"{k} " in line for k in layout)
    row = json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[0])
    assert {k: row[k] for k in layout} == layout
