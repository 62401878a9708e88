"""What a training run shows and records: a rich live display (or one plain line per logged step
when the output is not a terminal) and an append-only `metrics.jsonl`.

Standard library and rich only, so the loop can report without the display pulling in torch.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

METRICS_FILE = "metrics.jsonl"

LOSS_TERMS = ("ar", "kl", "reg", "sft", "uld", "kd")
SPEED_KEYS = ("lr", "items_per_s", "tokens_per_s")
DATA_KEYS = ("pad_share", "skipped_items", "truncated_items")  # padding in the batches; rows skipped / cut so far
ALIGN_KEYS = (
    "teacher_q_tokens",
    "student_q_tokens",
    "teacher_a_tokens",
    "student_a_tokens",
    "a_token_ratio",
    "boundary_agreement",
    "top1",
)
# The reliance probe (train.reliance): the Recalibrator with the student's question features
# real, another item's, zeroed; first answer token and later ones; top-1 agreement and L_ar.
PROBE_VARIANTS = ("real", "other", "zero")
PROBE_KEYS = tuple(
    f"rely_{part}_{what}_{v}" for what in ("top1", "ar") for part in ("first", "later") for v in PROBE_VARIANTS
)
# Written to metrics.jsonl on every row, not shown: how many processes, items per update.
RUN_KEYS = ("processes", "global_batch")
# Known keys first, in this order, then any others sorted: every line of metrics.jsonl lists its
# keys in the same order, so the file reads well with `tail -f` and diffs cleanly.
KNOWN_KEYS = ("loss", *LOSS_TERMS, *SPEED_KEYS, *DATA_KEYS, *ALIGN_KEYS, *PROBE_KEYS, *RUN_KEYS)
_RESERVED = ("stage", "step", "time")

_PANEL_WIDTH = 80


# ---------------------------------------------------------------------------------------------
# numbers


def _clean(value: Any) -> Any:
    """A JSON-safe scalar: NaN and inf become None; 0-d tensors and numpy scalars become Python numbers."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # a 0-d tensor or numpy scalar sent by mistake; don't make it crash a run
        return _clean(value.item())
    try:
        return _clean(float(value))
    except (TypeError, ValueError):
        return str(value)


def _number(value: Any) -> float | int | None:
    """The value as a number to display, or None when it is missing or not numeric (NaN is kept)."""
    if value is None or isinstance(value, (bool, str)):
        return None
    if isinstance(value, (int, float)):
        return value
    if hasattr(value, "item"):
        return _number(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fixed(v: float, decimals: int) -> str:
    """`v` with `decimals` decimals, or in e-notation when that would print it as zero."""
    if not math.isfinite(v):
        return str(v)
    if v != 0 and abs(v) < 0.5 * 10**-decimals:
        return f"{v:.1e}"
    return f"{v:.{decimals}f}"


def _general(v: float | int) -> str:
    """Any metric, in a short form that keeps about four significant digits."""
    if isinstance(v, int):
        return f"{v:,}"
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e6 or a < 1e-3:
        return f"{v:.2e}"
    if a >= 100:
        return f"{v:,.1f}"
    return f"{v:.4g}"


def _percent(v: float) -> str:
    return f"{v:.0%}" if math.isfinite(v) else str(v)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _value_text(v: float | int, formatted: str) -> Text:
    bad = isinstance(v, float) and not math.isfinite(v)
    return Text(formatted, style="bold red" if bad else "")


# ---------------------------------------------------------------------------------------------
# the reporter


class _EtaColumn(ProgressColumn):
    """`eta 0:01:03` while running, `done` once finished or stopped (a finished bar stays on screen)."""

    def render(self, task: Task) -> Text:
        if task.finished or task.stop_time is not None:
            return Text("done", style="green")
        remaining = task.time_remaining
        if remaining is None:
            return Text("eta -:--:--", style="cyan")
        return Text(f"eta {_duration(remaining)}", style="cyan")


@dataclass
class _Stage:
    name: str
    total: int | None
    start_step: int
    t0: float = field(default_factory=lambda: time.monotonic())
    last_step: int = 0
    task_id: Any = None
    unlogged: Mapping[str, Any] | None = None  # the latest step's metrics when that step was not logged
    printed: float = field(default_factory=lambda: time.monotonic())  # when a line of this stage was last printed


class Reporter:
    """Shows and records the progress of a training run; the stage loop calls it after every step.

    `live=None` picks a rich live display when the console is a terminal, else one plain line per
    logged step (for log files and CI), and between logged steps a short progress line (step, rate,
    time left) whenever `progress_every` seconds passed without a line, so a log of long steps is
    never silent for long. `enabled=False` (non-main processes) makes every call a no-op.
    Each logged step is appended to `output_dir/metrics.jsonl` as one JSON object.
    """

    def __init__(
        self,
        output_dir: Path | None,
        *,
        console: Console | None = None,
        log_every: int = 10,
        live: bool | None = None,
        enabled: bool = True,
        progress_every: float = 30.0,
    ):
        if log_every < 1:
            raise ValueError(f"log_every must be at least 1, got {log_every}")
        self.enabled = enabled
        self.log_every = log_every
        self.progress_every = progress_every
        self.console = console or Console()
        self.live = self.console.is_terminal if live is None else live
        self.metrics_path = Path(output_dir) / METRICS_FILE if output_dir is not None else None
        self._file = None
        # Where every metrics.jsonl record also goes (experiment trackers): callables taking it.
        self.sinks: list[Callable[[dict[str, Any]], None]] = []
        self._stages: dict[str, _Stage] = {}
        self._panel: RenderableType | None = None
        self._live: Live | None = None
        self._progress: Progress | None = None
        if enabled and self.live:
            self._progress = Progress(
                TextColumn("{task.description}", style="bold", markup=False),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                _EtaColumn(),
                console=self.console,
                # Steps of big models take seconds: estimate the speed over minutes, not 30 s.
                speed_estimate_period=300.0,
            )

    # -- context ---------------------------------------------------------------------------

    def __enter__(self) -> Reporter:
        if self.enabled and self.live:
            self._start_live()
        return self

    def __exit__(self, *exc_info) -> bool:
        self.close()
        return False

    def close(self) -> None:
        """Stop the live display (its last frame stays on screen) and close metrics.jsonl."""
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def _start_live(self) -> None:
        if self._live is None:
            self._live = Live(
                console=self.console,
                get_renderable=self._render,
                refresh_per_second=4,
                transient=False,
            )
            self._live.start()

    def _render(self) -> RenderableType:
        assert self._progress is not None
        bars = self._progress.get_renderable()
        return Group(bars, self._panel) if self._panel is not None else bars

    # -- the calls the loop makes ------------------------------------------------------------

    def stage_start(self, stage: str, total_steps: int | None, start_step: int = 0) -> None:
        """A stage begins (or resumes after `start_step` steps already done) and will run to `total_steps`."""
        if not self.enabled:
            return
        st = _Stage(stage, total_steps, start_step, last_step=start_step)
        self._stages[stage] = st
        if self.live:
            self._start_live()  # in case the loop did not use `with`
            assert self._progress is not None
            st.task_id = self._progress.add_task(stage, total=total_steps, completed=start_step)
            self._panel = None
        else:
            resumed = f", resuming after step {start_step}" if start_step else ""
            steps = f"{total_steps:,} steps" if total_steps is not None else "steps"
            self._print(Text(f"{stage}: {steps}{resumed}", style="bold"))

    def step(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
        """Called after every optimizer step (1-based); logs every `log_every` steps and on the last."""
        if not self.enabled:
            return
        st = self._stages.get(stage)
        if st is None:  # the loop forgot stage_start: show what we can rather than fail the run
            self.stage_start(stage, None)
            st = self._stages[stage]
        first = st.last_step == st.start_step
        st.last_step = step
        last = st.total is not None and step >= st.total
        # A step that carries the reliance probe is always logged: the probe is rare and costly.
        logged = step % self.log_every == 0 or last or any(k in metrics for k in PROBE_KEYS)
        if self.live:
            assert self._progress is not None
            self._progress.update(st.task_id, completed=step)
        st.unlogged = None if logged else dict(metrics)  # a copy: the loop may reuse its dict
        if logged:
            self._log(st, step, metrics)
        elif not self.live and time.monotonic() - st.printed >= self.progress_every:
            self._print(Text(self._progress_line(st, step)), st)
        elif self.live and first:
            # The live panel also shows the first step, so a slow stage is not blank until step 10.
            self._panel = self._make_panel(st, step, metrics)

    def _log(self, st: _Stage, step: int, metrics: Mapping[str, Any]) -> None:
        self._write(st.name, step, metrics)
        if self.live:
            self._panel = self._make_panel(st, step, metrics)
            if self._live is not None:
                self._live.refresh()
        else:
            self._print(Text(self._line(st, step, metrics)), st)

    def stage_end(self, stage: str, summary: Mapping[str, Any] | None = None) -> None:
        """One line: the stage is done, how many steps it ran and how long it took, plus `summary`.

        A stage that stopped before `total_steps` gets its last step logged here if it was not yet.
        """
        if not self.enabled:
            return
        st = self._stages.get(stage)
        parts = [f"✓ {stage} done"]
        if st is not None:
            if st.unlogged is not None:  # stopped early (a time limit): its last step is still logged
                self._log(st, st.last_step, st.unlogged)
                st.unlogged = None
            ran = st.last_step - st.start_step
            parts.append(f"{ran:,} step{'s' if ran != 1 else ''} in {_duration(time.monotonic() - st.t0)}")
            if self.live and st.task_id is not None:
                assert self._progress is not None
                self._progress.stop_task(st.task_id)  # freezes elapsed; an early stop keeps its partial bar
        for key, value in (summary or {}).items():
            num = _number(value)
            parts.append(f"{key} {_general(num) if num is not None else value}")
        self._print(Text("  ".join(parts), style="green"))
        if self._live is not None:
            self._live.refresh()

    def note(self, text: str, style: str = "") -> None:
        """A message (a warning, a checkpoint saved) printed above the live display without breaking it."""
        if not self.enabled:
            return
        self._print(Text(text, style=style))

    # -- output ----------------------------------------------------------------------------

    def _print(self, text: Text, stage: _Stage | None = None) -> None:
        # soft_wrap: a plain log line stays one line whatever the console width.
        self.console.print(text, soft_wrap=not self.live, highlight=False)
        if stage is not None:
            stage.printed = time.monotonic()

    def _progress_line(self, st: _Stage, step: int) -> str:
        """e.g. `distill  130/300  0.21 steps/s  [10:18<13:29]`: where a stage between logged steps stands."""
        elapsed = time.monotonic() - st.t0
        done = step - st.start_step
        rate = done / elapsed if elapsed > 0 else 0.0
        where = f"{step}/{st.total}" if st.total is not None else f"{step}"
        left = f"<{_duration((st.total - step) / rate)}" if st.total is not None and rate > 0 else ""
        return f"{st.name}  {where}  {_general(rate)} steps/s  [{_duration(elapsed)}{left}]"

    def _write(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
        record: dict[str, Any] = {"stage": stage, "step": step, "time": round(time.time(), 3)}
        for key in _ordered_keys(metrics):
            if key not in _RESERVED:
                record[key] = _clean(metrics[key])
        if self.metrics_path is not None:
            if self._file is None:
                # Line-buffered append: a resumed run continues the same file, and a crash loses nothing.
                self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.metrics_path, "a", encoding="utf-8", buffering=1)
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
        for sink in self.sinks:
            sink(record)

    def _line(self, st: _Stage, step: int, metrics: Mapping[str, Any]) -> str:
        """e.g. `distill  120/300  loss 2.314 (ar 1.10 kl 0.41)  lr 4.1e-04  14.2 items/s  1,830 tok/s  pad 21%  top1 0.62  boundaries 71%  [00:42<01:03]`"""
        m = {k: n for k in metrics if (n := _number(metrics[k])) is not None}
        if st.total is not None:
            parts = [f"{st.name}  {step:>{len(str(st.total))}}/{st.total}"]
        else:
            parts = [f"{st.name}  {step}"]
        terms = " ".join(f"{k} {_fixed(m[k], 2)}" for k in LOSS_TERMS if k in m)
        if "loss" in m:
            parts.append(f"loss {_fixed(m['loss'], 3)}" + (f" ({terms})" if terms else ""))
        elif terms:
            parts.append(terms)
        if "lr" in m:
            parts.append(f"lr {m['lr']:.1e}")
        if "items_per_s" in m:
            parts.append(f"{_fixed(m['items_per_s'], 1)} items/s")
        if "tokens_per_s" in m:
            parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
        if "pad_share" in m:
            parts.append(f"pad {_percent(m['pad_share'])}")
        if m.get("skipped_items"):
            parts.append(f"skipped {m['skipped_items']:,}")
        if "top1" in m:
            parts.append(f"top1 {_fixed(m['top1'], 2)}")
        if "boundary_agreement" in m:
            parts.append(f"boundaries {_percent(m['boundary_agreement'])}")
        for part in ("first", "later"):
            values = [m.get(f"rely_{part}_top1_{v}") for v in PROBE_VARIANTS]
            if all(v is not None for v in values):
                parts.append(f"rely {part} " + "/".join(_fixed(v, 2) for v in values))
        extras = [k for k in _ordered_keys(m) if k not in KNOWN_KEYS and k not in _RESERVED]
        parts.extend(f"{k} {_general(m[k])}" for k in extras)
        elapsed = time.monotonic() - st.t0
        done = step - st.start_step
        if st.total is not None and step < st.total and done > 0 and elapsed > 0:
            parts.append(f"[{_duration(elapsed)}<{_duration((st.total - step) * elapsed / done)}]")
        else:
            parts.append(f"[{_duration(elapsed)}]")
        return "  ".join(parts)

    def _make_panel(self, st: _Stage, step: int, metrics: Mapping[str, Any]) -> Panel:
        m = {k: n for k in metrics if (n := _number(metrics[k])) is not None}

        left = Table.grid(padding=(0, 1))
        left.add_column()
        left.add_column(justify="right", min_width=7)
        left.add_column(style="dim")
        left.add_column(justify="right")
        losses = []
        if "loss" in m:
            losses.append((Text("loss", style="bold"), _value_text(m["loss"], _fixed(m["loss"], 3))))
        indent = "  " if "loss" in m else ""
        losses += [(Text(f"{indent}{k}", style="dim"), _value_text(m[k], _fixed(m[k], 3))) for k in LOSS_TERMS if k in m]
        speeds = []
        if "lr" in m:
            speeds.append(("lr", Text(f"{m['lr']:.1e}")))
        if "items_per_s" in m:
            speeds.append(("items/s", Text(_fixed(m["items_per_s"], 1))))
        if "tokens_per_s" in m:
            speeds.append(("tokens/s", Text(f"{m['tokens_per_s']:,.0f}")))
        if "pad_share" in m:
            speeds.append(("padding", Text(_percent(m["pad_share"]))))
        if m.get("skipped_items"):
            speeds.append(("skipped", Text(f"{m['skipped_items']:,}")))
        for i in range(max(len(losses), len(speeds))):
            a = losses[i] if i < len(losses) else ("", "")
            b = speeds[i] if i < len(speeds) else ("", "")
            left.add_row(a[0], a[1], (" " + b[0]) if b[0] else "", b[1])

        right = None
        if any(k in m for k in ALIGN_KEYS):
            right = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
            right.add_column("token alignment", style="dim")
            right.add_column("teacher", justify="right")
            right.add_column("student", justify="right")
            for label, t_key, s_key in (
                ("question", "teacher_q_tokens", "student_q_tokens"),
                ("answer", "teacher_a_tokens", "student_a_tokens"),
            ):
                if t_key in m or s_key in m:
                    cells = [_general(m[k]) if k in m else "–" for k in (t_key, s_key)]
                    right.add_row(f"{label} tokens", *cells)
            if "a_token_ratio" in m:
                right.add_row("answer t/s ratio", _fixed(m["a_token_ratio"], 2), "")
            if "boundary_agreement" in m:
                right.add_row("shared boundaries", _percent(m["boundary_agreement"]), "")
            if "top1" in m:
                right.add_row("top-1 agreement", _percent(m["top1"]), "")

        probe = None
        if any(k in m for k in PROBE_KEYS):
            probe = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
            probe.add_column("reliance on the student (top-1)", style="dim")
            for v in PROBE_VARIANTS:
                probe.add_column(v, justify="right")
            for part, label in (("first", "first answer token"), ("later", "later answer tokens")):
                cells = [m.get(f"rely_{part}_top1_{v}") for v in PROBE_VARIANTS]
                if any(c is not None for c in cells):
                    probe.add_row(label, *(_percent(c) if c is not None else "–" for c in cells))

        body = Table.grid(padding=(0, 3))
        body.add_column()
        body.add_column()
        if losses or speeds:
            body.add_row(left, right) if right is not None else body.add_row(left)
        elif right is not None:
            body.add_row(right)
        rows: list[RenderableType] = [body] if (losses or speeds or right is not None) else []
        if probe is not None:
            rows.append(probe)

        extras = [k for k in _ordered_keys(m) if k not in KNOWN_KEYS and k not in _RESERVED]
        if extras:
            line = Text()
            for k in extras:
                line.append(f"{k} ", style="dim").append(_value_text(m[k], _general(m[k]))).append("   ")
            rows.append(line)
        if not rows:
            rows.append(Text("no metrics", style="dim"))
        total = f"/{st.total:,}" if st.total is not None else ""
        return Panel(
            Group(*rows),
            title=f"[bold]{escape(st.name)}[/] · step {step:,}{total}",
            title_align="left",
            border_style="blue",
            width=min(_PANEL_WIDTH, self.console.width),
        )


def _ordered_keys(metrics: Mapping[str, Any]) -> list[str]:
    known = [k for k in KNOWN_KEYS if k in metrics]
    return known + sorted(k for k in metrics if k not in KNOWN_KEYS)
