"""What trains in each stage: the parameters each stage unfreezes (METHOD.md, "Stages"), and the
learning-rate schedule over its updates."""

from __future__ import annotations

import math

from torch import nn

from ..recipe import StageSpec
from .objective import TEACHER_STAGES
from .recalibrator import Recalibrator


def set_trainable(stage: str, student, recalibrators: list[Recalibrator], spec: StageSpec) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze what `stage` trains (of the student, and each teacher's
    Recalibrator in align and distill); returns the trainable parameters, the student's first."""
    student.model.requires_grad_(False)
    for recalibrator in recalibrators:
        recalibrator.requires_grad_(stage in TEACHER_STAGES)
    if stage == "distill":
        student.language_model.requires_grad_(True)
        student.head.requires_grad_(True)
        if spec.train_projector:
            student.vision_projector.requires_grad_(True)
    elif stage == "finetune":
        student.model.requires_grad_(True)
        student.vision_encoder.requires_grad_(False)
        student.vision_projector.requires_grad_(True)  # Qwen's projector sits inside its vision encoder
    params = [p for p in student.model.parameters() if p.requires_grad]
    for recalibrator in recalibrators if stage in TEACHER_STAGES else ():
        params += [p for p in recalibrator.parameters() if p.requires_grad]
    return params


def lr_lambda(spec: StageSpec, total: int):
    """Multiplier of spec.lr at update `step` (0-based): linear warmup, then linear / cosine decay to
    lr_end at the last update. A function of the update alone, whatever the number of processes."""
    floor = spec.lr_end / spec.lr

    def f(step: int) -> float:
        if spec.warmup_steps and step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if spec.schedule == "constant":
            return 1.0
        span = max(1, total - spec.warmup_steps - 1)
        t = min(1.0, (step - spec.warmup_steps) / span)
        if spec.schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0 - (1.0 - floor) * t

    return f
