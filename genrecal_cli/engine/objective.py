"""Everything that trains, as one module (so accelerate can wrap it for DDP / FSDP): the student
and the Recalibrator; its forward computes one stage's loss terms (METHOD.md, "Losses")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..data.loader import model_inputs
from ..errors import GenrecalError
from ..models import image_features
from ..recipe import LossSpec
from . import losses
from .recalibrator import Recalibrator
from .teacher import TeacherFeatures
from .turns import Tokens, select

TEACHER_STAGES = ("align", "distill")


@dataclass
class Output:
    """One forward's result: the weighted `loss`, each term unweighted in `terms` (scalars), and
    `recalibrated` [N, d_l], the Recalibrator's rows predicting the teacher's answer tokens
    (detached; for the top-1 agreement statistic), when the stage uses the Recalibrator."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    recalibrated: torch.Tensor | None = None


class StudentAndRecalibrator(nn.Module):
    """The student and (in align and distill) the Recalibrator.

    The frozen teacher is not part of this module: its features and its head come in as
    arguments, so wrapping this module (DDP, FSDP) never touches the teacher.
    """

    def __init__(self, student_model: nn.Module, recalibrator: Recalibrator | None, weights: LossSpec,
                 blank_images: dict | None = None):
        super().__init__()
        self.student = student_model
        self.recalibrator = recalibrator
        self.weights = weights
        # Several processes: a micro-batch without images still runs the student's vision side
        # (on one blank image, weighted 0), so every process makes the same collectives (FSDP
        # all-gathers in the same order) and has a gradient for the same parameters (DDP, FSDP).
        self.blank_images = blank_images

    def forward(
        self,
        sbatch: dict,
        features: TeacherFeatures | None,
        teacher_head: Callable[[torch.Tensor], torch.Tensor] | None,
        *,
        stage: str,
        reg: bool = True,
    ) -> Output:
        weights = self.weights
        touch = None
        with torch.set_grad_enabled(torch.is_grad_enabled() and stage != "align"):  # align: student frozen
            if self.blank_images is not None and "pixel_values" not in sbatch:  # first, as images go first
                touch = sum(t.float().sum() for t in image_features(self.student, **self.blank_images)) * 0.0
            z_s = self.student.model(**model_inputs(sbatch)).last_hidden_state
        terms: dict[str, torch.Tensor] = {}
        recalibrated = None
        if stage in TEACHER_STAGES and self.recalibrator is not None:
            rec = self.recalibrator(student_question(z_s, sbatch), features.answer)
            terms["ar"], terms["kl"] = losses.recalibration_terms(
                teacher_head, rec, features.rows, features.targets, temperature=weights.temperature
            )
            if reg:  # align, and distill unless stages.distill.reg = false; not without question features
                reg_rec = self.recalibrator(features.question, features.answer, question_from_teacher=True)
                ar, kl = losses.recalibration_terms(teacher_head, reg_rec, features.rows, features.targets,
                                                    temperature=weights.temperature)
                terms["reg"] = ar + kl
            recalibrated = rec.detach()
        if stage in ("distill", "finetune"):
            rows, targets = losses.answer_rows(z_s, sbatch["labels"])
            head = self.student.get_output_embeddings()
            terms["sft"] = losses.sft(head, rows, targets)
            if stage == "distill" and (weights.uld or weights.kd) and isinstance(features.rows, losses.TopK):
                raise GenrecalError("loss.kd and loss.uld score the teacher's full rows; its top K (a top-K cache) "
                                    "cannot serve them: distill from the teacher online or from a cache with rows")
            if stage == "distill" and weights.uld:
                terms["uld"] = losses.uld(
                    head, rows, (sbatch["labels"][:, 1:] != -100).sum(1),
                    teacher_head, features.rows, features.answer.mask.sum(1), temperature=weights.temperature,
                )
            if stage == "distill" and weights.kd:
                same_answers(targets, features.targets)
                terms["kd"] = losses.kd(head, rows, teacher_head, features.rows, temperature=weights.temperature)
        weight = {name: getattr(weights, name) for name in ("ar", "kl", "reg", "sft", "uld", "kd")}
        loss = sum(weight[k] * v for k, v in terms.items())
        if touch is not None and touch.requires_grad:
            loss = loss + touch
        return Output(loss, terms, recalibrated)


def same_answers(student_targets: torch.Tensor, teacher_targets: torch.Tensor) -> None:
    """loss.kd pairs the i-th answer token of each side: both must have tokenized the same ones."""
    if student_targets.shape != teacher_targets.shape or not torch.equal(student_targets, teacher_targets):
        raise GenrecalError(
            f"loss.kd: the student's answers tokenize to {student_targets.numel()} tokens and the teacher's to "
            f"{teacher_targets.numel()}{'' if student_targets.shape != teacher_targets.shape else ' other ones'}: "
            "classic KD needs one tokenizer and template on both sides; for other token types use GenRecal "
            "(loss.ar, loss.kl) or ULD (loss.uld)")


def student_question(z_s: torch.Tensor, sbatch: dict) -> Tokens:
    """The student's question tokens z_qs (every turn's system/user segments), x [B, Kq, d_s]."""
    return select(z_s, sbatch["segment"], answer=False)
