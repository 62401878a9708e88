"""The frozen teacher's forward on a batch (no activations kept), cut into what the Recalibrator
and the losses take from it (METHOD.md, "Forward", steps 1, 4)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ...data.loader import model_inputs
from ..losses import TeacherRows, TopK
from ..parallel import gathered
from ..turns import Tokens, select


@dataclass
class TeacherFeatures:
    """What one batch's teacher pass hands to the Recalibrator and the losses.

    question: the teacher's question tokens z_ql (x [B, Kq, d_l], every turn's); answer: z_al
    (or the answer's input embeddings under answer_input = "embeddings"), x [B, Ka, d_l];
    rows [N, d_l]: the teacher's own rows predicting its N answer tokens (L_kl's teacher
    distribution), in reading order, or their top K (losses.TopK, from a top-K cache); targets [N]:
    those tokens.
    """

    question: Tokens
    answer: Tokens
    rows: TeacherRows
    targets: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "TeacherFeatures":
        """On `device` (what accelerate's send_to_device calls on a batch's cached features)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TeacherFeatures":
        """In pinned memory (what a DataLoader with pin_memory calls)."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, f: Callable[[torch.Tensor], torch.Tensor]) -> "TeacherFeatures":
        def tokens(t: Tokens) -> Tokens:
            return Tokens(f(t.x), f(t.segment), f(t.pos))

        rows = self.rows.map(f) if isinstance(self.rows, TopK) else f(self.rows)

        return TeacherFeatures(tokens(self.question), tokens(self.answer), rows, f(self.targets))


def teacher_features(teacher, batch: dict, answer_input: str) -> TeacherFeatures:
    """Run the teacher body on one collated side (`batch["teacher"]`) and cut out its features.

    Call it under the run's autocast, like the training forward. The features come back as
    float32 whatever the teacher's dtype: they feed trainable fp32 modules (the Recalibrator).
    """
    with torch.no_grad():  # not inference_mode: a sharded teacher's gathered weights must stay normal tensors
        z = teacher.body(**model_inputs(batch))
        emb = _input_embeddings(teacher, batch["input_ids"]) if answer_input == "embeddings" else None
    # A float32 copy: these feed a graph that trains, and must not alias the teacher's buffers.
    z = z.to(torch.float32, copy=True)
    segment = batch["segment"]
    question = select(z, segment, answer=False)
    answer = select(emb.to(torch.float32, copy=True) if emb is not None else z, segment, answer=True)
    mask = answer.mask
    rows = take_rows(z, (answer.pos - 1).clamp(min=0))[mask]  # the next-token shift
    targets = batch["input_ids"].gather(1, answer.pos)[mask]
    return TeacherFeatures(question, answer, rows, targets)


def with_answer_embeddings(features: TeacherFeatures, embeddings: torch.nn.Module) -> TeacherFeatures:
    """Features read from an id-only cache given their answer inputs: the teacher's input
    embeddings of the answer ids (`targets`, in the answer mask's reading order), as
    `teacher_features` takes them under answer_input = "embeddings"."""
    mask = features.answer.mask
    with torch.no_grad():
        rows = embeddings(features.targets).to(torch.float32)
    x = rows.new_zeros(*mask.shape, rows.shape[-1])
    x[mask] = rows
    return replace(features, answer=Tokens(x, features.answer.segment, features.answer.pos))


def _input_embeddings(teacher, ids: torch.Tensor) -> torch.Tensor:
    """The teacher's input embeddings of `ids`. Sharded (FSDP2), they belong to the inner model's
    own parameters: gathered for this call (on every process: it is collective) and released."""
    with gathered(teacher.model.model):
        return teacher.input_embeddings(ids)


def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, L, d] at positions idx [B, K] -> [B, K, d]."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def head_fn(head: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The frozen teacher head as the losses call it: rows [N, d_l] -> logits [N, V].

    Rows are cast to the head's dtype first, so a bf16 teacher scores fp32 rows with or without
    autocast; gradients still flow through the cast to the Recalibrator.
    """
    dtype = head.weight.dtype

    def apply(rows: torch.Tensor) -> torch.Tensor:
        return head(rows if torch.is_autocast_enabled(rows.device.type) else rows.to(dtype))

    return apply
