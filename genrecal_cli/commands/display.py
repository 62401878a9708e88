"""What a training run shows while it runs (a rich live display, or one plain line per logged step
when the output is not a terminal), with every logged step appended to `metrics.jsonl`.

Standard library plus rich only, so the loop can report without the display pulling in torch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from .metrics_view import (
    RESERVED,
    clean,
    duration,
    general,
    number,
    ordered_keys,
    probed,
    progress_line,
    step_line,
    step_panel,
)

METRICS_FILE = "metrics.jsonl"


class _EtaColumn(ProgressColumn):
    """`eta 0:01:03` while running, `done` once finished or stopped (a finished bar stays on screen)."""

    def render(self, task: Task) -> Text:
        if task.finished or task.stop_time is not None:
            return Text("done", style="green")
        remaining = task.time_remaining
        if remaining is None:
            return Text("eta -:--:--", style="cyan")
        return Text(f"eta {duration(remaining)}", style="cyan")


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
        tracked = _Stage(stage, total_steps, start_step, last_step=start_step)
        self._stages[stage] = tracked
        if self.live:
            self._start_live()  # in case the loop did not use `with`
            assert self._progress is not None
            tracked.task_id = self._progress.add_task(stage, total=total_steps, completed=start_step)
            self._panel = None
        else:
            resumed = f", resuming after step {start_step}" if start_step else ""
            steps = f"{total_steps:,} steps" if total_steps is not None else "steps"
            self._print(Text(f"{stage}: {steps}{resumed}", style="bold"))

    def step(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
        """Called after every optimizer step (1-based); logs every `log_every` steps and on the last."""
        if not self.enabled:
            return
        tracked = self._stages.get(stage)
        if tracked is None:  # the loop forgot stage_start: show what we can rather than fail the run
            self.stage_start(stage, None)
            tracked = self._stages[stage]
        first = tracked.last_step == tracked.start_step
        tracked.last_step = step
        last = tracked.total is not None and step >= tracked.total
        # A step that carries the reliance probe is always logged: the probe is rare and costly.
        logged = step % self.log_every == 0 or last or probed(metrics)
        if self.live:
            assert self._progress is not None
            self._progress.update(tracked.task_id, completed=step)
        tracked.unlogged = None if logged else dict(metrics)  # a copy: the loop may reuse its dict
        if logged:
            self._log(tracked, step, metrics)
        elif not self.live and time.monotonic() - tracked.printed >= self.progress_every:
            self._print(Text(progress_line(tracked, step)), tracked)
        elif self.live and first:
            # The live panel also shows the first step, so a slow stage is not blank until step 10.
            self._panel = step_panel(tracked, step, metrics, self.console.width)

    def _log(self, tracked: _Stage, step: int, metrics: Mapping[str, Any]) -> None:
        self._write(tracked.name, step, metrics)
        if self.live:
            self._panel = step_panel(tracked, step, metrics, self.console.width)
            if self._live is not None:
                self._live.refresh()
        else:
            self._print(Text(step_line(tracked, step, metrics)), tracked)

    def stage_end(self, stage: str, summary: Mapping[str, Any] | None = None) -> None:
        """One line: the stage is done, how many steps it ran and how long it took, plus `summary`.

        A stage that stopped before `total_steps` gets its last step logged here if it was not yet.
        """
        if not self.enabled:
            return
        tracked = self._stages.get(stage)
        parts = [f"✓ {stage} done"]
        if tracked is not None:
            if tracked.unlogged is not None:  # stopped early (a time limit): its last step is still logged
                self._log(tracked, tracked.last_step, tracked.unlogged)
                tracked.unlogged = None
            ran = tracked.last_step - tracked.start_step
            parts.append(f"{ran:,} step{'s' if ran != 1 else ''} in {duration(time.monotonic() - tracked.t0)}")
            if self.live and tracked.task_id is not None:
                assert self._progress is not None
                self._progress.stop_task(tracked.task_id)  # freezes elapsed; an early stop keeps its partial bar
        for key, value in (summary or {}).items():
            num = number(value)
            parts.append(f"{key} {general(num) if num is not None else value}")
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

    def _write(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
        record: dict[str, Any] = {"stage": stage, "step": step, "time": round(time.time(), 3)}
        for key in ordered_keys(metrics):
            if key not in RESERVED:
                record[key] = clean(metrics[key])
        if self.metrics_path is not None:
            if self._file is None:
                # Line-buffered append: a resumed run continues the same file, and a crash loses nothing.
                self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.metrics_path, "a", encoding="utf-8", buffering=1)
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
        for sink in self.sinks:
            sink(record)
