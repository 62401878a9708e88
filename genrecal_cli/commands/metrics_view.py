"""How a training step's metrics read: the keys a run reports, in the order `metrics.jsonl` lists
them, as one plain log line or as the live display's panel. Standard library and rich only."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Mapping

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from .display import _Stage

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
# Written to metrics.jsonl on every row, not shown: how many processes, items per update, and the
# rest of the stage's data layout (what a resume must match: stages.data_layout).
RUN_KEYS = ("processes", "global_batch", "batch_size", "grad_accum", "seed", "group_by_length", "num_workers")
# Known keys first, in this order, then any others sorted: every line of metrics.jsonl lists its
# keys in the same order, so the file reads well with `tail -f` and diffs cleanly.
KNOWN_KEYS = ("loss", *LOSS_TERMS, *SPEED_KEYS, *DATA_KEYS, *ALIGN_KEYS, *PROBE_KEYS, *RUN_KEYS)
# With several [[teachers]] each teacher's terms, alignment statistics and probe are `NAME/key`.
TEACHER_KEYS = (*LOSS_TERMS, *ALIGN_KEYS, *PROBE_KEYS)
RESERVED = ("stage", "step", "time")

_PANEL_WIDTH = 80


# ---------------------------------------------------------------------------------------------
# numbers


def clean(value: Any) -> Any:
    """A JSON-safe scalar: NaN and inf become None; 0-d tensors and numpy scalars become Python numbers."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # a 0-d tensor or numpy scalar sent by mistake; don't make it crash a run
        return clean(value.item())
    try:
        return clean(float(value))
    except (TypeError, ValueError):
        return str(value)


def number(value: Any) -> float | int | None:
    """The value as a number to display, or None when it is missing or not numeric (NaN is kept)."""
    if value is None or isinstance(value, (bool, str)):
        return None
    if isinstance(value, (int, float)):
        return value
    if hasattr(value, "item"):
        return number(value.item())
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


def general(v: float | int) -> str:
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


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _value_text(v: float | int, formatted: str) -> Text:
    bad = isinstance(v, float) and not math.isfinite(v)
    return Text(formatted, style="bold red" if bad else "")


def split_key(key: str) -> tuple[str | None, str]:
    """`NAME/ar` -> ("NAME", "ar") (one of several teachers' keys); `ar` -> (None, "ar")."""
    name, sep, base = key.partition("/")
    return (name, base) if sep and base in TEACHER_KEYS else (None, key)


def teacher_names(metrics: Mapping[str, Any]) -> list[str]:
    """The teachers whose keys `metrics` holds (several teachers), in the order they first appear."""
    names: dict[str, None] = {}
    for key in metrics:
        name = split_key(key)[0]
        if name is not None:
            names.setdefault(name)
    return list(names)


def of_teacher(metrics: Mapping[str, Any], name: str) -> dict[str, Any]:
    """One teacher's keys of `metrics`, without its `NAME/`."""
    cut = len(name) + 1
    return {k[cut:]: v for k, v in metrics.items() if split_key(k)[0] == name}


def is_known(key: str) -> bool:
    return key in KNOWN_KEYS or split_key(key)[0] is not None


def ordered_keys(metrics: Mapping[str, Any]) -> list[str]:
    known = [k for k in KNOWN_KEYS if k in metrics]
    for name in teacher_names(metrics):  # each teacher's keys after the run's, in the known order
        known += [f"{name}/{k}" for k in TEACHER_KEYS if f"{name}/{k}" in metrics]
    return known + sorted(k for k in metrics if k not in known)


def probed(metrics: Mapping[str, Any]) -> bool:
    """Whether the step carries the reliance probe (any teacher's)."""
    return any(split_key(k)[1] in PROBE_KEYS for k in metrics)


def _per_teacher(m: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, its keys) for the teacher (label "") or each of several teachers (label "NAME ")."""
    names = teacher_names(m)
    return [(f"{n} ", of_teacher(m, n)) for n in names] if names else [("", dict(m))]


# ---------------------------------------------------------------------------------------------
# lines and panels


def step_line(tracked: _Stage, step: int, metrics: Mapping[str, Any]) -> str:
    """e.g. `distill  120/300  loss 2.314 (ar 1.10 kl 0.41)  lr 4.1e-04  14.2 items/s  1,830 tok/s  pad 21%  top1 0.62  boundaries 71%  [00:42<01:03]`"""
    m = {k: n for k in metrics if (n := number(metrics[k])) is not None}
    if tracked.total is not None:
        parts = [f"{tracked.name}  {step:>{len(str(tracked.total))}}/{tracked.total}"]
    else:
        parts = [f"{tracked.name}  {step}"]
    terms = " ".join(f"{k} {_fixed(m[k], 2)}" for k in LOSS_TERMS if k in m)
    for name in teacher_names(m):  # several teachers: `sft 0.41 | A: ar 1.10 kl 0.41`
        t = of_teacher(m, name)
        terms += (" | " if terms else "") + f"{name}: " + " ".join(f"{k} {_fixed(t[k], 2)}" for k in LOSS_TERMS if k in t)
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
    for label, t in _per_teacher(m):
        if "top1" in t:
            parts.append(f"{label}top1 {_fixed(t['top1'], 2)}")
        if "boundary_agreement" in t:
            parts.append(f"{label}boundaries {_percent(t['boundary_agreement'])}")
        for part in ("first", "later"):
            values = [t.get(f"rely_{part}_top1_{v}") for v in PROBE_VARIANTS]
            if all(v is not None for v in values):
                parts.append(f"{label}rely {part} " + "/".join(_fixed(v, 2) for v in values))
    extras = [k for k in ordered_keys(m) if not is_known(k) and k not in RESERVED]
    parts.extend(f"{k} {general(m[k])}" for k in extras)
    elapsed = time.monotonic() - tracked.t0
    done = step - tracked.start_step
    if tracked.total is not None and step < tracked.total and done > 0 and elapsed > 0:
        parts.append(f"[{duration(elapsed)}<{duration((tracked.total - step) * elapsed / done)}]")
    else:
        parts.append(f"[{duration(elapsed)}]")
    return "  ".join(parts)


def progress_line(tracked: _Stage, step: int) -> str:
    """e.g. `distill  130/300  0.21 steps/s  [10:18<13:29]`: where a stage between logged steps stands."""
    elapsed = time.monotonic() - tracked.t0
    done = step - tracked.start_step
    rate = done / elapsed if elapsed > 0 else 0.0
    where = f"{step}/{tracked.total}" if tracked.total is not None else f"{step}"
    left = f"<{duration((tracked.total - step) / rate)}" if tracked.total is not None and rate > 0 else ""
    return f"{tracked.name}  {where}  {general(rate)} steps/s  [{duration(elapsed)}{left}]"


def step_panel(tracked: _Stage, step: int, metrics: Mapping[str, Any], width: int) -> Panel:
    """The live display's panel for a step: loss terms, speed, token alignment, the reliance probe."""
    m = {k: n for k in metrics if (n := number(metrics[k])) is not None}

    left = Table.grid(padding=(0, 1))
    left.add_column(no_wrap=True)
    left.add_column(justify="right", min_width=7)
    left.add_column(style="dim")
    left.add_column(justify="right")
    losses = []
    if "loss" in m:
        losses.append((Text("loss", style="bold"), _value_text(m["loss"], _fixed(m["loss"], 3))))
    indent = "  " if "loss" in m else ""
    losses += [(Text(f"{indent}{k}", style="dim"), _value_text(m[k], _fixed(m[k], 3))) for k in LOSS_TERMS if k in m]
    for name in teacher_names(m):  # several teachers: each one's terms under its name
        t = of_teacher(m, name)
        losses += [(Text(f"{indent}{name} {k}", style="dim"), _value_text(t[k], _fixed(t[k], 3)))
                   for k in LOSS_TERMS if k in t]
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

    groups = _per_teacher(m)
    right = None
    if any(k in t for _, t in groups for k in ALIGN_KEYS):
        right = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
        right.add_column("token alignment", style="dim")
        for label, _ in groups:  # the teacher, or each of several
            right.add_column(label.strip() or "teacher", justify="right")
        right.add_column("student", justify="right")
        student = groups[0][1]  # (the student's counts are the same beside every teacher)
        for label, t_key, s_key in (
            ("question", "teacher_q_tokens", "student_q_tokens"),
            ("answer", "teacher_a_tokens", "student_a_tokens"),
        ):
            if any(t_key in t for _, t in groups) or s_key in student:
                cells = [general(t[t_key]) if t_key in t else "–" for _, t in groups]
                right.add_row(f"{label} tokens", *cells, general(student[s_key]) if s_key in student else "–")
        for label, key, show in (("answer t/s ratio", "a_token_ratio", lambda v: _fixed(v, 2)),
                                 ("shared boundaries", "boundary_agreement", _percent),
                                 ("top-1 agreement", "top1", _percent)):
            if any(key in t for _, t in groups):
                right.add_row(label, *(show(t[key]) if key in t else "–" for _, t in groups), "")

    probe = None
    if probed(m):
        probe = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
        probe.add_column("reliance on the student (top-1)", style="dim")
        for v in PROBE_VARIANTS:
            probe.add_column(v, justify="right")
        for name, t in groups:
            for part, label in (("first", "first answer token"), ("later", "later answer tokens")):
                cells = [t.get(f"rely_{part}_top1_{v}") for v in PROBE_VARIANTS]
                if any(c is not None for c in cells):
                    probe.add_row(name + label, *(_percent(c) if c is not None else "–" for c in cells))

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

    extras = [k for k in ordered_keys(m) if not is_known(k) and k not in RESERVED]
    if extras:
        line = Text()
        for k in extras:
            line.append(f"{k} ", style="dim").append(_value_text(m[k], general(m[k]))).append("   ")
        rows.append(line)
    if not rows:
        rows.append(Text("no metrics", style="dim"))
    total = f"/{tracked.total:,}" if tracked.total is not None else ""
    return Panel(
        Group(*rows),
        title=f"[bold]{escape(tracked.name)}[/] · step {step:,}{total}",
        title_align="left",
        border_style="blue",
        width=min(_PANEL_WIDTH, width),
    )
