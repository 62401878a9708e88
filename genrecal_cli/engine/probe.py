"""Diagnostics of a run, never part of the loss: token-alignment statistics of a batch and the
reliance probe (does the Recalibrator's output depend on the student at all?)."""

from __future__ import annotations

from typing import Callable

import torch

from ..data import model_inputs
from . import losses
from .objective import GenRecal, student_question
from .teacher import TeacherFeatures


def reliance(module: GenRecal, sbatch: dict, tf: TeacherFeatures, head: Callable) -> dict[str, float]:
    """The Recalibrator's loss (L_ar) and teacher top-1 agreement on one batch with the student's
    question features real, another item's (each item gets its neighbour's, mask included) and
    zeroed; separately for the first answer token (predicted from the last student question
    position) and the later ones. Equal numbers across the three mean the output ignores the
    student. Keys `rely_{first|later}_{top1|ar}_{real|other|zero}`."""
    import torch.nn.functional as F

    with torch.no_grad():
        q, q_mask = student_question(module.student.model(**model_inputs(sbatch)).last_hidden_state, sbatch)
        answer = tf.answer_mask.bool()
        first = torch.zeros_like(answer)
        first[:, 0] = True
        first = first[answer]
        teacher_top1 = head(tf.rows).argmax(-1)
        variants = {"real": (q, q_mask), "other": (q.roll(1, 0), q_mask.roll(1, 0)), "zero": (torch.zeros_like(q), q_mask)}
        out = {}
        for name, (question, mask) in variants.items():
            rec = module.recalibrator(question, mask, tf.answer_in, tf.answer_mask, answer_offset=tf.answer_start)
            logits = head(rec[answer]).float()
            ar = F.cross_entropy(logits, tf.targets, reduction="none")
            agree = (logits.argmax(-1) == teacher_top1).float()
            for part, sel in (("first", first), ("later", ~first)):
                if sel.any():
                    out[f"rely_{part}_top1_{name}"] = float(agree[sel].mean())
                    out[f"rely_{part}_ar_{name}"] = float(ar[sel].mean())
    return out


def alignment_stats(batch: dict, tf: TeacherFeatures, recalibrated: torch.Tensor | None, head: Callable) -> dict[str, float]:
    """Token-alignment statistics of one batch ({"teacher": ..., "student": ...} as collated) for
    the live display and metrics.jsonl: tokens per side, shared answer-token boundaries and,
    given the Recalibrator's rows, their top-1 agreement with the teacher's own rows."""
    from ..vocab import SplitStats, split_stats

    t, s = batch["teacher"], batch["student"]
    stats = {
        "teacher_q_tokens": float(t["answer_start"].float().mean()),
        "student_q_tokens": float(s["answer_start"].float().mean()),
        "teacher_a_tokens": float(t["answer_mask"].sum(1).float().mean()),
        "student_a_tokens": float(s["answer_mask"].sum(1).float().mean()),
    }
    stats["a_token_ratio"] = stats["teacher_a_tokens"] / max(stats["student_a_tokens"], 1e-9)
    total = SplitStats()
    for r in range(len(t["answer_text"])):
        (ts, te), (ss, se) = t["answer_span"][r], s["answer_span"][r]
        answer = t["answer_text"][r][ts:te]
        total = total + split_stats(answer, _within(t["answer_offsets"][r], ts, te), _within(s["answer_offsets"][r], ss, se))
    stats["boundary_agreement"] = total.boundary_agreement
    if recalibrated is not None:
        stats["top1"] = losses.top1_agreement(head, recalibrated, tf.rows)
    return stats


def _within(offsets, start: int, end: int) -> list[tuple[int, int]]:
    """Token offsets clipped to text[start:end] and made relative to `start`."""
    return [(max(a, start) - start, min(b, end) - start) for a, b in offsets if b > start and a < end]
