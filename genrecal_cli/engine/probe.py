"""Diagnostics of a run, never part of the loss: token-alignment statistics of a batch and the
reliance probe (does the Recalibrator's output depend on the student at all?)."""

from __future__ import annotations

import itertools
from typing import Callable

import torch

from ..data.loader import Collator, Item, model_inputs, raise_carried
from ..data.render import is_answer, is_question
from . import losses
from ..recipe import Recipe
from .objective import StudentAndRecalibrator, student_question
from .parallel import gathered
from .teacher import TeacherFeatures
from .teacher.source import TeacherSource
from .turns import first_of_turn


def reliance(module: StudentAndRecalibrator, sbatch: dict, features: TeacherFeatures,
             head: Callable, teacher: str = "teacher") -> dict[str, float]:
    """The Recalibrator's loss (L_ar) and teacher top-1 agreement on one batch with the student's
    question features real, another item's (each item gets its neighbour's, turns included) and
    zeroed; separately for the first token of each answer turn (predicted from the last student
    position of the question before it) and the later ones. Equal numbers across the three mean the output ignores the
    student. Keys `rely_{first|later}_{top1|ar}_{real|other|zero}`. `teacher`: whose Recalibrator
    (its name with several teachers)."""
    import torch.nn.functional as F

    recalibrator = module.named_recalibrators()[teacher]
    with torch.no_grad():
        q = student_question(module.student.model(**model_inputs(sbatch)).last_hidden_state, sbatch)
        first = first_of_turn(features.answer)
        teacher_top1 = losses.teacher_top1(head, features.rows)
        variants = {"real": q, "other": q.roll(1), "zero": q.with_x(torch.zeros_like(q.x))}
        out = {}
        for name, question in variants.items():
            logits = head(recalibrator(question, features.answer)).float()
            ar = F.cross_entropy(logits, features.targets, reduction="none")
            agree = (logits.argmax(-1) == teacher_top1).float()
            for part, sel in (("first", first), ("later", ~first)):
                if sel.any():
                    out[f"rely_{part}_top1_{name}"] = float(agree[sel].mean())
                    out[f"rely_{part}_ar_{name}"] = float(ar[sel].mean())
    return out


def alignment_stats(batch: dict, features: TeacherFeatures, recalibrated: torch.Tensor | None,
                    head: Callable, side: str = "teacher") -> dict[str, float]:
    """Token-alignment statistics of one batch ({side: ..., "student": ...} as collated) for
    the live display and metrics.jsonl: tokens per item and side (all turns), shared answer-token
    boundaries over every answer turn and, given the Recalibrator's rows, their top-1 agreement
    with the teacher's own rows."""
    from ..data.splits import SplitStats, split_stats

    t, s = batch[side], batch["student"]

    def mean_count(side: dict, answer: bool) -> float:
        seg = side["segment"]
        return float((is_answer(seg) if answer else is_question(seg)).sum(1).float().mean())

    stats = {
        "teacher_q_tokens": mean_count(t, False),
        "student_q_tokens": mean_count(s, False),
        "teacher_a_tokens": mean_count(t, True),
        "student_a_tokens": mean_count(s, True),
    }
    stats["a_token_ratio"] = stats["teacher_a_tokens"] / max(stats["student_a_tokens"], 1e-9)
    total = SplitStats()
    for t_answers, s_answers in zip(t["answers"], s["answers"]):  # items
        for ta, sa in zip(t_answers, s_answers):  # their turns (the same on both sides)
            (ts, te), (ss, se) = ta.span, sa.span
            total = total + split_stats(ta.text[ts:te], _within(ta.offsets, ts, te), _within(sa.offsets, ss, se))
    stats["boundary_agreement"] = total.boundary_agreement
    if recalibrated is not None:
        stats["top1"] = losses.top1_agreement(head, recalibrated, features.rows)
    return stats


def _within(offsets, start: int, end: int) -> list[tuple[int, int]]:
    """Token offsets clipped to text[start:end] and made relative to `start`."""
    return [(max(a, start) - start, min(b, end) - start) for a, b in offsets if b > start and a < end]


def probe_batch(dataset, sides, recipe: Recipe, accelerator, attach=None) -> dict | None:
    """The reliance probe's fixed batch: the first train.probe_items usable training items (the
    same on every process)."""
    from accelerate.utils import send_to_device

    if recipe.train.probe_every == 0:
        return None
    usable = (item for item in dataset.first() if isinstance(item, Item))  # the same on every process
    items = list(itertools.islice(usable, recipe.train.probe_items))
    if len(items) < 2:
        return None
    batch = Collator(sides, attach)(items)
    raise_carried(batch)
    return send_to_device(batch, accelerator.device)


def run_probe(accelerator, module, probe: dict, source: TeacherSource, head, teacher: str = "teacher") -> dict[str, float]:
    """The reliance probe of one teacher's Recalibrator on its fixed batch, the module in eval mode for it."""
    module = accelerator.unwrap_model(module)
    was_training = module.training
    module.eval()
    try:
        with accelerator.autocast():  # the same precision as the training forward
            features = source.features(probe)
            with gathered(module):  # the probe calls the parts directly, outside the root's forward
                return reliance(module, probe["student"], features, head, teacher)
    finally:
        module.train(was_training)
