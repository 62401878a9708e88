"""Checkpoints: atomic saves of a stage's state, finding the furthest one to resume from, and
the export of the plain student.

Layout of a run's output folder:
    OUTPUT/<stage>/                      a finished stage: student/ (save_pretrained),
                                         recalibrator.safetensors (several teachers:
                                         recalibrators/NAME.safetensors), recipe.json, meta.json
    OUTPUT/checkpoints/<stage>-<step>/   a stage in progress (train.save_every, Ctrl-C, SIGTERM):
                                         the same plus optimizer.pt, scheduler.pt and
                                         rng/rank-<r>.pt for every process; the newest
                                         train.keep_checkpoints are kept. With a sharded
                                         student (parallel.student = "shard") the student,
                                         Recalibrator and optimizer are state/ instead, a
                                         torch.distributed.checkpoint folder every process
                                         writes its own shards into
    OUTPUT/student/                      the exported student: its own architecture, processor
    OUTPUT/metrics.jsonl                 one JSON object per logged step
Every folder is written under a temporary name and renamed into place, so a crash never leaves
a half-written checkpoint where a finished one stood. Tensors load with weights_only=True.
"""

from __future__ import annotations

import json
import math
import platform
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import GenrecalError

STAGES = ("align", "distill", "finetune")
CHECKPOINTS = "checkpoints"
# a run's Recalibrators as a checkpoint holds them: file -> (their names in the trained module's state, the module)
Recalibrators = dict[str, tuple[str, Any]]


# ---------------------------------------------------------------------------------------------
# atomic folders


def replace_dir(target: Path, tmp: Path) -> None:
    """Put the finished folder `tmp` where `target` is, in renames only."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)  # a folder cannot be replaced in one rename; keep it until the new one is in
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def fresh_tmp(target: Path) -> Path:
    """An empty temporary folder beside `target`, at a name every process can compute."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target`; on success it replaces `target`."""
    target = Path(target)
    tmp = fresh_tmp(target)
    try:
        yield tmp
        replace_dir(target, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# what a checkpoint holds


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
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(_to_tuples(state["python"]))
    if "numpy" in state:
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def _finite(x):
    """NaN and inf become null: strict JSON readers reject them."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _write_common(folder: Path, stage: str, student, processor, recalibrators: Recalibrators | None, recipe: dict,
                  meta: dict, student_state: dict | None = None, recalibrator_states: dict | None = None) -> None:
    """`recalibrators`: file -> (state prefix, module), each written to its file
    (recalibrator.safetensors; with several teachers recalibrators/NAME.safetensors).
    `student_state` / `recalibrator_states` (by file): whole state dicts gathered from sharded
    modules (gathered_states), written instead of the modules' own (sharded) ones."""
    from safetensors.torch import save_file

    if student is not None:
        student.save_pretrained(folder / "student", safe_serialization=True, state_dict=student_state)
        processor.save_pretrained(folder / "student")
    for file, (_, recalibrator) in (recalibrators or {}).items():
        state = recalibrator_states[file] if recalibrator_states is not None else recalibrator.state_dict()
        (folder / file).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / file))
    (folder / "recipe.json").write_text(json.dumps(recipe, indent=2))
    full_meta = {"stage": stage, "saved_at": time.time(), "versions": versions(), **meta}
    (folder / "meta.json").write_text(json.dumps(_finite(full_meta), indent=2, default=str))


# ---------------------------------------------------------------------------------------------
# saving


def save_stage(output_dir: Path, stage: str, *, student, processor, recalibrators: Recalibrators | None, recipe: dict,
               meta: dict, student_state: dict | None = None, recalibrator_states: dict | None = None) -> Path:
    """OUTPUT/<stage>/ for a finished stage, atomically. Call on the main process only."""
    target = Path(output_dir) / stage
    with atomic_dir(target) as tmp:
        _write_common(tmp, stage, student, processor, recalibrators, recipe, meta, student_state, recalibrator_states)
    return target


def gathered_states(module, recalibrators: Recalibrators) -> dict[str, dict | None]:
    """A sharded objective.StudentAndRecalibrator's student and Recalibrators as whole state
    dicts on the main process (save_stage's student_state / recalibrator_states). Every process
    must call it."""
    from .parallel import full_state, sub_state

    state = full_state(module)
    if not state:  # not the main process
        return {}
    return {"student_state": sub_state(state, "student"),
            "recalibrator_states": {file: sub_state(state, prefix) for file, (prefix, _) in recalibrators.items()}}


def load_recalibrators(folder: Path, recalibrators: Recalibrators) -> None:
    """Each Recalibrator's weights from its file in a checkpoint folder, where it is there."""
    from safetensors.torch import load_file

    for file, (_, recalibrator) in recalibrators.items():
        if (Path(folder) / file).exists():
            recalibrator.load_state_dict(load_file(str(Path(folder) / file)))


def checkpoint_dir(output_dir: Path, stage: str, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"{stage}-{step:07d}"


def save_checkpoint(
    accelerator, output_dir: Path, stage: str, step: int, *, module=None,
    student, processor, recalibrators: Recalibrators | None, optimizer, scheduler, recipe: dict, meta: dict, keep: int,
    data: dict | None = None,
) -> Path:
    """OUTPUT/checkpoints/<stage>-<step>/ for a stage in progress, atomically; every process calls
    it (each writes its own RNG state, and its shards when `module` is sharded), the main one
    writes the rest, renames the folder into place and keeps the newest `keep`. `data` (this
    process's data position and skip counts) is saved beside its RNG state."""
    import torch

    from .parallel import is_sharded

    sharded = module is not None and is_sharded(module)
    target = checkpoint_dir(output_dir, stage, step)
    tmp = target.with_name(f".{target.name}.tmp")
    if accelerator.is_main_process:
        fresh_tmp(target)
        (tmp / "rng").mkdir()
    accelerator.wait_for_everyone()
    torch.save({**rng_state(), "data": data or {}}, tmp / "rng" / f"rank-{accelerator.process_index}.pt")
    if sharded:
        _save_sharded_state(tmp / "state", module, optimizer)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            meta = {**meta, "sharded": sharded}  # resuming needs the same placement (stages._check_layout)
            if sharded:  # the student and Recalibrator are in state/
                _write_common(tmp, stage, None, processor, None, recipe, meta)
            else:
                _write_common(tmp, stage, student, processor, recalibrators, recipe, meta)
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            replace_dir(target, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in in_progress(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old.path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def _save_sharded_state(folder: Path, module, optimizer) -> None:
    """Every process writes its shards of the module and its optimizer (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def load_sharded_state(folder: Path, module, optimizer) -> None:
    """Read state/ of a sharded checkpoint into the sharded module and its optimizer (every process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, checkpoint_id=str(Path(folder) / "state"))
    except Exception as e:  # noqa: BLE001 - a damaged or foreign checkpoint, named with its cause
        raise GenrecalError(f"cannot read the sharded checkpoint {Path(folder) / 'state'}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def export_student(output_dir: Path, student, processor, meta: dict) -> Path:
    """OUTPUT/student/: a plain checkpoint of the student's own architecture (no Recalibrator)."""
    target = Path(output_dir) / "student"
    with atomic_dir(target) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "genrecal.json").write_text(json.dumps(_finite({"versions": versions(), **meta}), indent=2, default=str))
    return target


# ---------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class Found:
    """A checkpoint on disk: which stage, how far (`meta`), and whether the stage had finished."""

    stage: str
    path: Path
    meta: dict

    @property
    def finished(self) -> bool:
        return bool(self.meta.get("finished"))

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    def _order(self) -> tuple[int, int, int]:
        return STAGES.index(self.stage), int(self.finished), self.step


def load_tensors(path: Path) -> dict:
    """torch.load restricted to tensors and plain data (weights_only=True)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def read_meta(folder: Path) -> dict | None:
    meta = Path(folder) / "meta.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def in_progress(output_dir: Path) -> list[Found]:
    """The mid-stage checkpoints of a run, oldest first."""
    found = []
    folder = Path(output_dir) / CHECKPOINTS
    for path in folder.iterdir() if folder.is_dir() else []:
        meta = read_meta(path)
        if meta is not None and meta.get("stage") in STAGES and not path.name.startswith("."):
            found.append(Found(meta["stage"], path, meta))
    return sorted(found, key=Found._order)


def latest_checkpoint(output_dir: Path) -> Found | None:
    """The furthest checkpoint of the run: by stage order, then finished, then step."""
    found = in_progress(output_dir)
    for stage in STAGES:
        meta = read_meta(Path(output_dir) / stage)
        if meta is not None:
            found.append(Found(stage, Path(output_dir) / stage, meta))
    return max(found, key=Found._order, default=None)


def check_output_dir(output_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder unless asked to continue or to start over."""
    output_dir = Path(output_dir)
    taken = [p.name for p in (output_dir / s for s in (*STAGES, CHECKPOINTS, "student")) if p.exists()]
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
