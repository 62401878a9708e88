"""Everything that trains, as one module (so accelerate can wrap it for DDP / FSDP): the student
and the Recalibrator; its forward computes one stage's loss terms (METHOD.md, "Losses")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

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
    `recalibrated` {teacher name: [N, d_l]}, each Recalibrator's rows predicting its teacher's
    answer tokens (detached; for the top-1 agreement statistic), where the stage uses them."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    recalibrated: dict[str, torch.Tensor] = field(default_factory=dict)


class StudentAndRecalibrator(nn.Module):
    """The student and (in align and distill) the Recalibrator, or with several teachers one
    Recalibrator per teacher (`recalibrators`, by teacher name).

    The frozen teachers are not part of this module: their features and heads come in as
    arguments, so wrapping this module (DDP, FSDP) never touches a teacher. Its state names are
    `student.*` and `recalibrator.*` (one teacher) or `recalibrators.NAME.*` (several).
    """

    def __init__(self, student_model: nn.Module, recalibrator: Recalibrator | Mapping[str, Recalibrator] | None,
                 weights: LossSpec, blank_images: dict | None = None, teacher_weights: Mapping[str, float] | None = None):
        super().__init__()
        self.student = student_model
        several = isinstance(recalibrator, Mapping)
        self.recalibrator = None if several else recalibrator
        self.recalibrators = nn.ModuleDict(recalibrator) if several else None
        self.weights = weights
        # each teacher's loss terms are scaled by its weight (several teachers; one teacher: 1)
        self.teacher_weights = dict(teacher_weights or {})
        # Several processes: a micro-batch without images still runs the student's vision side
        # (on one blank image, weighted 0), so every process makes the same collectives (FSDP
        # all-gathers in the same order) and has a gradient for the same parameters (DDP, FSDP).
        self.blank_images = blank_images

    @property
    def several(self) -> bool:
        return self.recalibrators is not None

    def named_recalibrators(self) -> dict[str, Recalibrator]:
        """Each Recalibrator by its teacher's name ("teacher" when there is one teacher)."""
        if self.recalibrators is not None:
            return dict(self.recalibrators.items())
        return {"teacher": self.recalibrator} if self.recalibrator is not None else {}

    def drop_recalibrators(self) -> None:
        """Forget every Recalibrator (no later stage reads a teacher)."""
        self.recalibrator = self.recalibrators = None

    def forward(
        self,
        sbatch: dict,
        features: TeacherFeatures | Mapping[str, TeacherFeatures] | None,
        teacher_head: Callable[[torch.Tensor], torch.Tensor] | Mapping[str, Callable] | None,
        *,
        stage: str,
        reg: bool | Mapping[str, bool] = True,
    ) -> Output:
        """One micro-batch's loss. `features`, `teacher_head` and `reg` are the teacher's; with
        several teachers, dicts of them by teacher name, and each teacher's terms are named
        `NAME/ar`, `NAME/kl`, `NAME/reg`."""
        weights = self.weights
        touch = None
        with torch.set_grad_enabled(torch.is_grad_enabled() and stage != "align"):  # align: student frozen
            if self.blank_images is not None and "pixel_values" not in sbatch:  # first, as images go first
                touch = sum(t.float().sum() for t in image_features(self.student, **self.blank_images)) * 0.0
            z_s = self.student.model(**model_inputs(sbatch)).last_hidden_state
        terms: dict[str, torch.Tensor] = {}
        recalibrated: dict[str, torch.Tensor] = {}
        recalibrators = self.named_recalibrators() if stage in TEACHER_STAGES else {}
        question = student_question(z_s, sbatch) if recalibrators else None
        for name, recalibrator in recalibrators.items():
            f, head, key = _of(features, name), _of(teacher_head, name), f"{name}/" if self.several else ""
            rec = recalibrator(question, f.answer)
            terms[key + "ar"], terms[key + "kl"] = losses.recalibration_terms(
                head, rec, f.rows, f.targets, temperature=weights.temperature
            )
            if _of(reg, name):  # align, and distill unless stages.distill.reg = false; not without question features
                reg_rec = recalibrator(f.question, f.answer, question_from_teacher=True)
                ar, kl = losses.recalibration_terms(head, reg_rec, f.rows, f.targets, temperature=weights.temperature)
                terms[key + "reg"] = ar + kl
            recalibrated[name] = rec.detach()
        if stage in ("distill", "finetune"):
            rows, targets = losses.answer_rows(z_s, sbatch["labels"])
            head = self.student.get_output_embeddings()
            terms["sft"] = losses.sft(head, rows, targets)
            if stage == "distill" and (weights.uld or weights.kd):  # one teacher (the recipe refuses them with several)
                features, teacher_head = _of(features, "teacher"), _of(teacher_head, "teacher")
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
        loss = sum(self._weight(k) * v for k, v in terms.items())
        if touch is not None and touch.requires_grad:
            loss = loss + touch
        return Output(loss, terms, recalibrated)

    def _weight(self, term: str) -> float:
        """A term's weight: the recipe's [loss] weight, times its teacher's weight (NAME/term)."""
        name, _, base = term.rpartition("/")
        weight = getattr(self.weights, base)
        return self.teacher_weights.get(name, 1.0) * weight if name else weight


def _of(value, name: str):
    """One teacher's entry of a per-teacher argument (a dict by name), or the argument itself."""
    return value[name] if isinstance(value, Mapping) else value


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
