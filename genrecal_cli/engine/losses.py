"""GenRecal's loss terms as pure functions over answer positions only (METHOD.md, "Losses").

Logits are never formed for question positions: callers select the rows that predict answer
tokens (`answer_rows`), and the head is applied chunk by chunk, recomputed in backward, so
a 150k vocabulary costs [chunk, V] floats at a time rather than [batch, tokens, V].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TopK:
    """The teacher's distribution at N answer tokens as its K most likely ids [N, K] (most likely
    first) and their log-probabilities [N, K] at the loss temperature: what a top-K cache keeps
    instead of the teacher's rows (issue 30)."""

    ids: torch.Tensor
    logprobs: torch.Tensor

    def __getitem__(self, rows: slice) -> "TopK":
        return TopK(self.ids[rows], self.logprobs[rows])

    def map(self, f: Callable[[torch.Tensor], torch.Tensor]) -> "TopK":
        return TopK(f(self.ids), f(self.logprobs))

    @classmethod
    def of(cls, head: Head, rows: torch.Tensor, k: int, temperature: float = 1.0) -> "TopK":
        """The top K of head(rows) [N, d] at `temperature` (no grad)."""
        with torch.no_grad():
            log_p = F.log_softmax(head(rows).float() / temperature, dim=-1)
            top = log_p.topk(k, dim=-1)
        return cls(top.indices, top.values)


# The teacher's side of L_kl: its own rows [N, d_l] (scored by its head) or its top K.
TeacherRows = Union[torch.Tensor, TopK]


def answer_rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `hidden` [B, L, d] that predict each answer token, with those tokens as targets.

    labels [B, L]: answer token ids, -100 elsewhere. With the next-token shift, position t-1
    predicts token t, so the first answer token is predicted from the last question position.
    Returns (rows [N, d], targets [N]) for the N answer tokens of the batch, in reading order.
    """
    targets = labels[:, 1:]
    keep = targets != -100
    return hidden[:, :-1][keep], targets[keep]


def ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy. logits [N, V], targets [N] -> scalar."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def kl(teacher_logits: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Summed forward KL(teacher || model) at a temperature, scaled by T^2 (Hinton) so that its
    gradient scale does not shrink with T. teacher_logits, logits [N, V] -> scalar."""
    t = temperature
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    log_q = F.log_softmax(logits.float() / t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum() * (t * t)


def kl_topk(teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor, logits: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Summed forward KL(teacher || model) from the teacher's top K only (issue 30), scaled by T^2
    as `kl`: over K + 1 bins, the teacher's K most likely ids and one tail bucket holding the rest
    of each distribution's mass.

    teacher_logprobs [N, K]: the teacher's log-probabilities of teacher_ids [N, K] (distinct per
    row) at this temperature; logits [N, V]: the model's. Equal to `kl` when K = V; with K < V it
    is the KL of the two distributions with the tail merged into one bin, never more than `kl`.
    The tail bucket, not renormalising the top K: a model that puts mass outside the teacher's
    top K is pushed back by exactly what the teacher left there.
    """
    t = temperature
    log_q_all = F.log_softmax(logits.float() / t, dim=-1)
    log_q = log_q_all.gather(1, teacher_ids)
    log_p = teacher_logprobs.float()
    total = (log_p.exp() * (log_p - log_q)).sum()
    if teacher_ids.shape[-1] < logits.shape[-1]:  # a non-empty tail: its mass on both sides
        p_tail = (1 - log_p.exp().sum(-1)).clamp(min=0)
        log_q_tail = torch.logsumexp(log_q_all.scatter(1, teacher_ids, float("-inf")), dim=-1)
        total = total + (torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail).sum()
    return total * (t * t)


def recalibration_terms(
    head: Head,
    recalibrated: torch.Tensor,
    teacher_hidden: TeacherRows,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_ar, L_kl), each the mean over N answer tokens.

    recalibrated [N, d_l]: the Recalibrator's rows that predict each answer token;
    teacher_hidden [N, d_l]: the teacher's own rows at the same shift (no grad needed), or its
    top K (`TopK`: L_kl is then `kl_topk`); targets [N]: the teacher's answer ids.
    L_ar = CE(head(recalibrated), targets);
    L_kl = KL(softmax(head(teacher_hidden)) || softmax(head(recalibrated))).
    """
    n = targets.numel()
    if n == 0:
        zero = recalibrated.sum() * 0.0
        return zero, zero
    ar_sum = recalibrated.new_zeros((), dtype=torch.float32)
    kl_sum = recalibrated.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk_size):
        rec, tgt = recalibrated[s : s + chunk_size], targets[s : s + chunk_size]
        tch = teacher_hidden[s : s + chunk_size]
        if isinstance(tch, TopK):
            a, k = _maybe_checkpoint(_ar_kl_topk_chunk, head, rec, tch.logprobs, tch.ids, tgt, temperature)
        else:
            with torch.no_grad():
                teacher_logits = head(tch)
            a, k = _maybe_checkpoint(_ar_kl_chunk, head, rec, teacher_logits, tgt, temperature)
        ar_sum = ar_sum + a
        kl_sum = kl_sum + k
    return ar_sum / n, kl_sum / n


def _ar_kl_chunk(head, rec, teacher_logits, targets, temperature):
    logits = head(rec)
    return ce(logits, targets), kl(teacher_logits, logits, temperature)


def _ar_kl_topk_chunk(head, rec, teacher_logprobs, teacher_ids, targets, temperature):
    logits = head(rec)
    return ce(logits, targets), kl_topk(teacher_logprobs, teacher_ids, logits, temperature)


def sft(head: Head, rows: torch.Tensor, targets: torch.Tensor, *, chunk_size: int = 1024) -> torch.Tensor:
    """The student's own L_sft: mean CE of head(rows) [N, d_s] against its answer ids [N]."""
    n = targets.numel()
    if n == 0:
        return rows.sum() * 0.0
    total = rows.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk_size):
        total = total + _maybe_checkpoint(_ce_chunk, head, rows[s : s + chunk_size], targets[s : s + chunk_size])
    return total / n


def _ce_chunk(head, rows, targets):
    return ce(head(rows), targets)


def _maybe_checkpoint(fn, head, rows, *args):
    # Recompute the chunk's logits in backward instead of keeping [chunk, V] floats alive.
    if torch.is_grad_enabled() and rows.requires_grad:
        return checkpoint(fn, head, rows, *args, use_reentrant=False)
    return fn(head, rows, *args)


def kd(
    student_head: Head,
    student_rows: torch.Tensor,
    teacher_head: Head,
    teacher_rows: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """L_kd: classic token-level distillation for a pair that shares a tokenizer, mean over N.

    student_rows [N, d_s] / teacher_rows [N, d_l]: each side's rows predicting the same N answer
    tokens (one vocabulary, one template: the i-th row of each predicts the same token).
    L_kd = KL(softmax(teacher_head(teacher_rows)) || softmax(student_head(student_rows))) at the
    temperature, forward KL with the teacher first, as L_kl. Both heads must share a vocabulary.
    """
    n = student_rows.shape[0]
    if n != teacher_rows.shape[0]:
        raise ValueError(f"kd: {n} student rows against {teacher_rows.shape[0]} teacher rows; "
                         "the two sides must predict the same answer tokens")
    if n == 0:
        return student_rows.sum() * 0.0
    total = student_rows.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk_size):
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_rows[s : s + chunk_size])
        total = total + _maybe_checkpoint(_kd_chunk, student_head, student_rows[s : s + chunk_size], teacher_logits,
                                          temperature)
    return total / n


def _kd_chunk(head, rows, teacher_logits, temperature):
    logits = head(rows)
    vocab = min(logits.shape[-1], teacher_logits.shape[-1])  # heads padded to different multiples
    return kl(teacher_logits[:, :vocab], logits[:, :vocab], temperature)


def aligned_pairs(student_counts: torch.Tensor, teacher_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices that pair the i-th answer token of the student with the i-th of the teacher.

    student_counts, teacher_counts [B]: answer tokens per item, rows stored item after item in
    reading order (as `answer_rows` returns them). Each item pairs its first min(n_s, n_t)
    tokens; the longer answer's tail has no partner. Returns (student_idx [P], teacher_idx [P]).
    """
    s_start = torch.cumsum(student_counts, 0) - student_counts
    t_start = torch.cumsum(teacher_counts, 0) - teacher_counts
    n = torch.minimum(student_counts, teacher_counts)
    item = torch.repeat_interleave(torch.arange(len(n), device=n.device), n)
    k = torch.arange(int(n.sum()), device=n.device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    return s_start[item] + k, t_start[item] + k


def sorted_probability_distance(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """ULD's distance (Boizard et al. 2024), summed over rows: the L1 distance between the two
    probability vectors sorted in decreasing order, the shorter vocabulary padded with zeros.
    Sorting makes the vocabularies' ids irrelevant, which is what lets it cross tokenizers.
    student_logits [P, V_s], teacher_logits [P, V_t] -> scalar."""
    p_s = F.softmax(student_logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    p_t = F.softmax(teacher_logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = F.pad(p_s, (0, width - p_s.shape[-1]))
    p_t = F.pad(p_t, (0, width - p_t.shape[-1]))
    return (p_s - p_t).abs().sum()


def uld(
    student_head: Head,
    student_rows: torch.Tensor,
    student_counts: torch.Tensor,
    teacher_head: Head,
    teacher_rows: torch.Tensor,
    teacher_counts: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """L_uld: Universal Logit Distillation, the cross-tokenizer logit baseline, mean over pairs.

    student_rows [N_s, d_s] / teacher_rows [N_t, d_l]: each side's rows predicting its own answer
    tokens, item after item; *_counts [B] how many per item. Tokens are paired by position within
    the answer (aligned_pairs), not by text: that is ULD's approximation, and why it suffers when
    the two tokenizers split an answer differently.
    """
    s_idx, t_idx = aligned_pairs(student_counts, teacher_counts)
    p = s_idx.numel()
    if p == 0:
        return student_rows.sum() * 0.0
    total = student_rows.new_zeros((), dtype=torch.float32)
    for s in range(0, p, chunk_size):
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_rows[t_idx[s : s + chunk_size]])
        total = total + _maybe_checkpoint(
            _uld_chunk, student_head, student_rows[s_idx[s : s + chunk_size]], teacher_logits, temperature
        )
    return total / p


def _uld_chunk(head, rows, teacher_logits, temperature):
    return sorted_probability_distance(head(rows), teacher_logits, temperature)


def top1_agreement(head: Head, recalibrated: torch.Tensor, teacher_hidden: TeacherRows,
                   chunk_size: int = 1024) -> float:
    """Share of answer rows where the recalibrated top-1 token equals the teacher's top-1."""
    if recalibrated.shape[0] == 0:
        return float("nan")
    agree = 0
    with torch.no_grad():
        for s in range(0, recalibrated.shape[0], chunk_size):
            r = head(recalibrated[s : s + chunk_size]).argmax(-1)
            t = teacher_top1(head, teacher_hidden[s : s + chunk_size])
            agree += int((r == t).sum())
    return agree / recalibrated.shape[0]


def teacher_top1(head: Head, teacher_hidden: TeacherRows) -> torch.Tensor:
    """The teacher's most likely id at each answer token [N] (its rows scored, or its top K's first)."""
    if isinstance(teacher_hidden, TopK):
        return teacher_hidden.ids[:, 0]
    return head(teacher_hidden).argmax(-1)
