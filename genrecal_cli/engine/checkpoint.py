"""Checkpoints: atomic save of a stage's state, resume, and export of the plain student.

Layout of a run's output folder:
    OUTPUT/<stage>/      student/ (save_pretrained), recalibrator.safetensors, optimizer.pt,
                         scheduler.pt, rng.pt, recipe.json, meta.json
    OUTPUT/student/      the exported student: its own architecture, processor, chat template
    OUTPUT/metrics.jsonl one JSON object per logged step
Every folder is written under a temporary name and renamed into place, so a crash never
leaves a half-written checkpoint where a finished one stood.
"""

from __future__ import annotations

import json
import math
import platform
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import GenrecalError

STAGES = ("align", "distill", "finetune")


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            target.rename(old)  # a directory cannot be replaced in one rename; keep it until the new one is in
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def versions() -> dict[str, str]:
    import accelerate
    import torch
    import transformers

    from .. import __version__

    return {
        "genrecal": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }


def rng_state() -> dict[str, Any]:
    import torch

    state = {"python": _to_lists(random.getstate()), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(_to_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def save_stage(
    output_dir: Path,
    stage: str,
    *,
    student,
    processor,
    recalibrator,
    optimizer,
    scheduler,
    recipe: dict,
    meta: dict,
) -> Path:
    """Write OUTPUT/<stage>/ atomically; returns its path. Call on the main process only."""
    import torch
    from safetensors.torch import save_file

    target = Path(output_dir) / stage
    with atomic_dir(target) as tmp:
        student.save_pretrained(tmp / "student", safe_serialization=True)
        processor.save_pretrained(tmp / "student")
        if recalibrator is not None:
            state = {k: v.detach().contiguous().cpu() for k, v in recalibrator.state_dict().items()}
            save_file(state, str(tmp / "recalibrator.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2))
        full_meta = {"stage": stage, "saved_at": time.time(), "versions": versions(), **meta}
        (tmp / "meta.json").write_text(json.dumps(_finite(full_meta), indent=2, default=str))
    return target


def _finite(x):
    """NaN and inf become null: strict JSON readers reject them."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def load_tensors(path: Path) -> dict:
    """torch.load restricted to tensors and plain data (weights_only=True)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def read_meta(stage_dir: Path) -> dict | None:
    meta = Path(stage_dir) / "meta.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def latest_checkpoint(output_dir: Path) -> tuple[str, dict] | None:
    """The furthest checkpoint in the run: (stage, meta), by stage order then step."""
    best = None
    for stage in STAGES:
        meta = read_meta(Path(output_dir) / stage)
        if meta is not None:
            best = (stage, meta)
    return best


def check_output_dir(output_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder unless asked to continue or to start over."""
    output_dir = Path(output_dir)
    taken = [p.name for p in (output_dir / s for s in (*STAGES, "student")) if p.exists()]
    if not taken or resume:
        return
    if overwrite:
        for name in (*taken, "metrics.jsonl"):
            p = output_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return
    raise GenrecalError(
        f"{output_dir} already holds a run ({', '.join(taken)}); pass --resume to continue it, "
        "--overwrite to start over, or set train.output_dir to another folder"
    )


def export_student(output_dir: Path, student, processor, meta: dict) -> Path:
    """OUTPUT/student/: a plain checkpoint of the student's own architecture (no Recalibrator)."""
    target = Path(output_dir) / "student"
    with atomic_dir(target) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "genrecal.json").write_text(json.dumps(_finite({"versions": versions(), **meta}), indent=2, default=str))
    return target
