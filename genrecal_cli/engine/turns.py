"""A batch's turn structure as tensors: which tokens are question or answer, per turn, and the
Recalibrator's interleaved sequence built from them (METHOD.md, "Several turns").

Every collated side carries `segment` [B, L]: 2k for the system/user tokens before answer k,
2k+1 for the tokens of answer k, -1 on padding. The Recalibrator's input for one item is

    [z_qs^1, Proj-pre(z_al^1), z_qs^2, Proj-pre(z_al^2), ...]

the student's features of each question segment followed by the teacher's of the answer that
follows it, with new positions 0..n-1 over the whole sequence (causal). With the next-token
shift, answer token j of turn k is predicted from the position just before it: the last
student position of question k for j = 0, the teacher's answer token j-1 otherwise. One turn is
the paper's case, [z_qs, Proj-pre(z_al)].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.render import is_answer, is_question


@dataclass
class Tokens:
    """Some of a side's tokens, compacted to the front of each row in reading order.

    x [B, K, d]: their features; segment [B, K]: their segment (-1 on padding); pos [B, K]: their
    position in the side's own sequence."""

    x: torch.Tensor
    segment: torch.Tensor
    pos: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """[B, K] True on real tokens."""
        return self.segment >= 0

    def roll(self, shifts: int) -> "Tokens":
        """Every item takes another item's tokens (for the reliance probe)."""
        return Tokens(self.x.roll(shifts, 0), self.segment.roll(shifts, 0), self.pos.roll(shifts, 0))

    def with_x(self, x: torch.Tensor) -> "Tokens":
        return Tokens(x, self.segment, self.pos)


def select(x: torch.Tensor, segment: torch.Tensor, answer: bool) -> Tokens:
    """The question (answer=False) or answer tokens of x [B, L, d] given segment [B, L]."""
    keep = is_answer(segment) if answer else is_question(segment)
    k = max(int(keep.sum(1).max()), 1)
    # A stable sort brings the kept positions to the front in their order.
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :k]
    kept = keep.gather(1, order)
    kept_segment = torch.where(kept, segment.gather(1, order), torch.full_like(order, -1))
    return Tokens(x.gather(1, order[..., None].expand(-1, -1, x.shape[-1])), kept_segment, order)


def interleave(question: Tokens, answer: Tokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each item's question and answer tokens merged in segment order, then right-padded.

    question.x [B, Kq, d], answer.x [B, Ka, d] (the same d). Returns packed [B, N, d] (zeros on
    padding), valid [B, N], is_answer [B, N], and source_pos [B, N]: each token's position in its
    own side's sequence (for the no-new-positions ablation)."""
    x = torch.cat([question.x, answer.x], dim=1)
    segment = torch.cat([question.segment, answer.segment], dim=1)
    pos = torch.cat([question.pos, answer.pos], dim=1)
    kq, width = question.x.shape[1], x.shape[1]
    valid_in = segment >= 0
    # Segment first, then the order within the segment (both halves are in reading order).
    key = torch.where(valid_in, segment * width + torch.arange(width, device=x.device)[None, :],
                      torch.full_like(segment, torch.iinfo(torch.long).max))
    order = key.argsort(dim=1, stable=True)
    n = int(valid_in.sum(1).max())
    order = order[:, :n]
    valid = valid_in.gather(1, order)
    packed = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1])) * valid[..., None].to(x.dtype)
    return packed, valid, (order >= kq) & valid, pos.gather(1, order)


def predictive_rows(h: torch.Tensor, is_answer: torch.Tensor) -> torch.Tensor:
    """The rows of h [B, N, d] that predict each answer token (the position before it), item
    after item in reading order: [N_answer, d]."""
    return h[:, :-1][is_answer[:, 1:]]


def first_of_turn(answer: Tokens) -> torch.Tensor:
    """[N_answer] bool over the answer tokens in reading order: True for each turn's first token
    (the one predicted from the student's own features)."""
    prev = torch.cat([torch.full_like(answer.segment[:, :1], -2), answer.segment[:, :-1]], dim=1)
    return (answer.segment != prev)[answer.mask]
