"""Everything that trains, as one module (so accelerate can wrap it for DDP / FSDP): the student
and the Recalibrator; its forward computes one stage's loss terms (METHOD.md, "Losses")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..data import model_inputs
from ..recipe import LossSpec
from . import losses
from .recalibrator import Recalibrator
from .teacher import TeacherFeatures

TEACHER_STAGES = ("align", "distill")


@dataclass
class Output:
    """One forward's result: the weighted `loss`, each term unweighted in `terms` (scalars), and
    `recalibrated` [N, d_l], the Recalibrator's rows predicting the teacher's answer tokens
    (detached; for the top-1 agreement statistic), when the stage uses the Recalibrator."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    recalibrated: torch.Tensor | None = None


class GenRecal(nn.Module):
    """The student and (in align and distill) the Recalibrator.

    The frozen teacher is not part of this module: its features and its head come in as
    arguments, so wrapping this module (DDP, FSDP) never touches the teacher.
    """

    def __init__(self, student_model: nn.Module, recalibrator: Recalibrator | None, weights: LossSpec):
        super().__init__()
        self.student = student_model
        self.recalibrator = recalibrator
        self.weights = weights

    def forward(
        self,
        sbatch: dict,
        teacher: TeacherFeatures | None,
        teacher_head: Callable[[torch.Tensor], torch.Tensor] | None,
        *,
        stage: str,
        reg_in_distill: bool = True,
    ) -> Output:
        w = self.weights
        with torch.set_grad_enabled(torch.is_grad_enabled() and stage != "align"):  # align: student frozen
            z_s = self.student.model(**model_inputs(sbatch)).last_hidden_state
        terms: dict[str, torch.Tensor] = {}
        recalibrated = None
        if stage in TEACHER_STAGES and self.recalibrator is not None:
            tf = teacher  # the method's name for them: teacher features
            q, q_mask = student_question(z_s, sbatch)
            answer = tf.answer_mask.bool()
            rec = self.recalibrator(q, q_mask, tf.answer_in, tf.answer_mask, answer_offset=tf.answer_start)[answer]
            terms["ar"], terms["kl"] = losses.recalibration_terms(
                teacher_head, rec, tf.rows, tf.targets, temperature=w.temperature
            )
            if stage == "align" or reg_in_distill:
                reg_rec = self.recalibrator(
                    tf.question, tf.question_mask, tf.answer_in, tf.answer_mask,
                    question_from_teacher=True, answer_offset=tf.answer_start,
                )
                ar, kl = losses.recalibration_terms(
                    teacher_head, reg_rec[answer], tf.rows, tf.targets, temperature=w.temperature
                )
                terms["reg"] = ar + kl
            recalibrated = rec.detach()
        if stage in ("distill", "finetune"):
            rows, targets = losses.answer_rows(z_s, sbatch["labels"])
            head = self.student.get_output_embeddings()
            terms["sft"] = losses.sft(head, rows, targets)
            if stage == "distill" and w.uld:
                terms["uld"] = losses.uld(
                    head, rows, (sbatch["labels"][:, 1:] != -100).sum(1),
                    teacher_head, teacher.rows, teacher.answer_mask.sum(1), temperature=w.temperature,
                )
        weight = {"ar": w.ar, "kl": w.kl, "reg": w.reg, "sft": w.sft, "uld": w.uld}
        loss = sum(weight[k] * v for k, v in terms.items())
        return Output(loss, terms, recalibrated)


def student_question(z_s: torch.Tensor, sbatch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's question features z_qs [B, Lq, d_s] and their mask [B, Lq] (1 = real)."""
    start = sbatch["answer_start"]
    lq = int(start.max())
    return z_s[:, :lq], (torch.arange(lq, device=z_s.device)[None, :] < start[:, None]).long()
