"""A picture of a run (`OUTPUT/report.png`): the loss terms of each stage, the learning rate,
the token-alignment statistics, the reliance probe and the before / after accuracy, read from
what the run writes (metrics.jsonl; the exported student's genrecal.json once it is done). It
draws a run still going as far as it got. matplotlib is an extra (`genrecal[report]`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GenrecalError

REPORT_FILE = "report.png"
STAGE_ORDER = ("align", "distill", "finetune")
LOSS_KEYS = ("loss", "ar", "kl", "reg", "sft")
INSTALL_HINT = "pip install 'genrecal[report]' (matplotlib)"


class ReportUnavailable(GenrecalError):
    """matplotlib is not installed: the picture cannot be drawn (the run itself is fine)."""


@dataclass
class RunRecord:
    """What a run folder says about the run: its logged steps, in order, on one step axis
    (each stage's steps follow the stages before it), and its accuracy table when done."""

    folder: Path
    rows: list[dict[str, Any]]
    stages: list[tuple[str, int, int]] = field(default_factory=list)  # (stage, first x, last x)
    accuracy: dict[str, Any] | None = None
    accuracy_on: str = "the validation split"  # the table's rows
    recipe: dict[str, Any] | None = None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """x (the run's step axis) and the values of `key` where logged."""
        pts = [(r["x"], r[key]) for r in self.rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [float(p[1]) for p in pts]

    @property
    def teachers(self) -> list[str]:
        """The names of several teachers whose keys (`NAME/ar`) the run logged; [] with one teacher."""
        from .metrics_view import teacher_names

        names: dict[str, None] = {}
        for row in self.rows:
            names.update(dict.fromkeys(teacher_names(row)))
        return list(names)

    def each_teacher(self, keys, labels: dict | None = None) -> tuple[tuple, dict]:
        """`keys` (and their labels) as logged: as they are with one teacher, once per teacher
        (`NAME/key`, labelled "NAME: label") with several."""
        labels = labels or {}
        if not self.teachers:
            return tuple(keys), labels
        out = {f"{t}/{k}": f"{t}: {labels.get(k, k)}" for t in self.teachers for k in keys}
        return tuple(out), out


def read_run(folder: str | Path) -> RunRecord:
    """The run in `folder` (a genrecal distill output_dir), finished or still going."""
    folder = Path(folder)
    metrics = folder / "metrics.jsonl"
    if not folder.is_dir():
        raise GenrecalError(f"{folder}: no such run folder")
    if not metrics.is_file():
        raise GenrecalError(f"{folder}: no metrics.jsonl (is this a genrecal distill output_dir, and has its "
                            "first logged step been reached?)")
    latest: dict[tuple[str, int], dict[str, Any]] = {}  # a resumed run logs some steps again: keep the last
    lines = metrics.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            latest[(str(row["stage"]), int(row["step"]))] = row
        except (ValueError, KeyError, TypeError):
            if n < len(lines):  # the last line of a run still going may be half written
                raise GenrecalError(f"{metrics}: line {n} is not a metrics record") from None
    # a prerequisite run's stages ("teacher/finetune": a model built by its own recipe) ran first
    names = sorted({s for s, _ in latest}, key=lambda s: ("/" not in s, STAGE_ORDER.index(s.split("/")[-1])
                                                          if s.split("/")[-1] in STAGE_ORDER else 9, s))
    record = RunRecord(folder, [])
    offset = 0
    for stage in names:
        steps = sorted(step for s, step in latest if s == stage)
        for step in steps:
            record.rows.append({**latest[(stage, step)], "x": offset + step})
        record.stages.append((stage, offset, offset + steps[-1]))
        offset += steps[-1]
    meta = folder / "student" / "genrecal.json"
    if meta.is_file():
        try:
            done = json.loads(meta.read_text(encoding="utf-8"))
            record.accuracy, record.recipe = done.get("accuracy") or None, done.get("recipe")
            record.accuracy_on = done.get("accuracy_on", record.accuracy_on)
        except ValueError:
            pass
    return record


def figure(record: RunRecord):
    """The report as a matplotlib Figure (six panels)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportUnavailable(f"the run's picture needs matplotlib: {INSTALL_HINT}") from None

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), layout="constrained")
    title = f"genrecal run: {record.folder}"
    if record.recipe:
        several = record.recipe.get("teachers") or []
        teacher = (", ".join(f"{t.get('name')} {t.get('path', '?')}" for t in several) if several
                   else record.recipe.get("teacher", {}).get("path", "?"))
        title += f"\nteacher{'s' if several else ''} {teacher} -> student " \
                 f"{record.recipe.get('student', {}).get('path', '?')}, data {record.recipe.get('data', {}).get('source', '?')}"
    fig.suptitle(title, fontsize=11)

    def stage_marks(ax):
        for stage, start, end in record.stages:
            ax.axvline(start, color="0.8", lw=0.8, ls="--")
            ax.text((start + end) / 2, 1.0, stage, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    fontsize=8, color="0.4")

    def lines(ax, keys, labels=None, title="", ylabel="", log=False, styles=None):
        drawn = 0
        for i, key in enumerate(keys):
            x, y = record.series(key)
            if x:
                ax.plot(x, y, (styles or {}).get(key, "-"), label=(labels or {}).get(key, key), lw=1.2, ms=3)
                drawn += 1
        ax.set_title(title, fontsize=10, pad=14)
        ax.set_xlabel("update (stages one after another)", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        if log and drawn:
            ax.set_yscale("log")
        if drawn:
            ax.legend(fontsize=7, loc="best")
            stage_marks(ax)
        else:
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes, color="0.5")
        if record.stages:  # every panel on the whole run's axis, so the stages line up
            ax.set_xlim(0, max(1, record.stages[-1][2]))
        ax.tick_params(labelsize=7)
        return drawn

    per_teacher, labels = record.each_teacher(("ar", "kl", "reg"))
    lines(axes[0, 0], ("loss", "sft", *per_teacher) if record.teachers else LOSS_KEYS, labels, title="loss terms",
          ylabel="loss", log=True)
    lines(axes[0, 1], ("lr",), title="learning rate", ylabel="lr")
    lines(axes[0, 2], *record.each_teacher(("boundary_agreement", "top1"), {
          "boundary_agreement": "answer-token boundaries shared", "top1": "top-1 agreement with the teacher"}),
          title="token alignment (teacher stages)", ylabel="share")
    variants = ("real", "other") if record.teachers else ("real", "other", "zero")  # (fewer lines for several)
    probe_keys, probe = record.each_teacher(
        [f"rely_{part}_top1_{v}" for part in ("first", "later") for v in variants],
        {f"rely_{part}_top1_{v}": f"{part} answer token, student features {v}" for part in ("first", "later")
         for v in variants})
    styles = {k: ("-o" if k.endswith("real") else "--" if k.endswith("other") else ":") for k in probe}
    lines(axes[1, 0], probe_keys, probe, title="reliance probe: Recalibrator top-1 with the student's features",
          ylabel="top-1 agreement", styles=styles)
    lines(axes[1, 1], ("items_per_s",), {"items_per_s": "items/s"}, title="throughput", ylabel="items/s")

    ax = axes[1, 2]
    ax.set_title(f"accuracy on {record.accuracy_on}", fontsize=10, pad=14)
    table = record.accuracy or {}
    teachers = [n for n in table if n == "teacher" or n.startswith("teacher ")]  # one, or one row per teacher
    names = [n for n in (*teachers, "student before", "student after") if isinstance(table.get(n), dict)]
    if names:
        values = [100 * float(table[n]["accuracy"]) for n in names]
        colours = {"student before": "#c9a227", "student after": "#2a7ab9"}
        bars = ax.bar(names, values, color=[colours.get(n, "0.55") for n in names])
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, v + 1, f"{v:.1f}%", ha="center", fontsize=9)
        ax.set_ylim(0, 105)
        ax.set_ylabel("% correct (greedy)", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no accuracy yet: it is measured\nat the end of the run" if not record.recipe
                else "no accuracy table in this run (train.eval_items = 0)", ha="center", va="center",
                transform=ax.transAxes, color="0.5")
        ax.set_xticks([])
        ax.set_yticks([])
    ax.tick_params(labelsize=8)
    return fig


def write_report(folder: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run in `folder` into `out` (default folder/report.png), written atomically."""
    record = read_run(folder)
    fig = figure(record)
    target = Path(out) if out is not None else record.folder / REPORT_FILE
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        tmp.replace(target)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return target
