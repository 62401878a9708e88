"""The Recalibrator: carries student features into the teacher's space (used only in training).

proj_pre (d_l -> d_s) -> rec_body (N decoder blocks of the STUDENT's own class and config,
causal, over fresh positions 0..n-1 with a 1-D rotary of their own) -> proj_post (d_s -> d_l)
-> LayerNorm. See METHOD.md, "The Recalibrator".
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class Rotary1D(nn.Module):
    """Plain 1-D rotary embedding from a text config (also for M-RoPE students such as Qwen2-VL,
    whose 3-D rotary reduces to this when all three position rows are equal)."""

    def __init__(self, config):
        super().__init__()
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = params.get("rope_type", "default")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if rope_type == "default":
            base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            self.scaling = 1.0
        else:  # e.g. llama3 / yarn scaling: use transformers' own initialiser for that type
            inv_freq, self.scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, N] -> (cos, sin), each [B, N, head_dim] in x's dtype."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(x.dtype), (emb.sin() * self.scaling).to(x.dtype)


class Recalibrator(nn.Module):
    """proj_pre -> rec_body -> proj_post -> LayerNorm, over [question features, answer features].

    Built from the student's text config and decoder-layer class; the teacher's hidden size
    sets the outer projections.
    """

    def __init__(
        self,
        teacher_hidden: int,
        student_text_config,
        decoder_layer_class: type[nn.Module],
        *,
        num_blocks: int = 2,
        new_positions: bool = True,
    ):
        super().__init__()
        config = copy.deepcopy(student_text_config)
        config._attn_implementation = "sdpa"  # we pass an explicit mask; sdpa honours it like eager
        student_hidden = config.hidden_size
        self.new_positions = new_positions
        self.proj_pre = nn.Linear(teacher_hidden, student_hidden, bias=False)
        self.rec_body = nn.ModuleList(decoder_layer_class(config, layer_idx=i) for i in range(num_blocks))
        self.proj_post = nn.Linear(student_hidden, teacher_hidden, bias=False)
        self.norm = nn.LayerNorm(teacher_hidden)
        self.rotary = Rotary1D(config)
        self._init_weights(getattr(config, "initializer_range", 0.02))

    def _init_weights(self, std: float) -> None:
        # New layers would otherwise keep PyTorch's default init, not the model's own.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)

    def forward(
        self,
        question: torch.Tensor,
        question_mask: torch.Tensor,
        answer: torch.Tensor,
        answer_mask: torch.Tensor,
        *,
        question_from_teacher: bool = False,
        answer_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Recalibrated features that predict each teacher answer token.

        question:      [B, Lq, d_s] student question features z_qs, or [B, Lq, d_l] teacher
                       z_ql when `question_from_teacher` (the L_reg path; proj_pre applied here).
        answer:        [B, La, d_l] teacher answer features z_al (or its answer input embeddings).
        *_mask:        [B, L] 1 for real tokens; valid tokens first (right padding).
        answer_offset: [B] the answer's original start position; used only when new_positions
                       is off (the ablation), where question positions stay 0.. and answer
                       positions continue from the teacher's own sequence.
        Returns [B, La, d_l]: row k predicts answer token k (next-token shift: row 0 comes from the
        last question position, row k from answer position k-1). Rows past an item's answer are junk.
        """
        if question_from_teacher:
            question = self.proj_pre(question)
        answer = self.proj_pre(answer)
        packed, valid, q_len, positions = _pack(question, question_mask, answer, answer_mask)
        if not self.new_positions:
            start = answer_offset if answer_offset is not None else q_len
            k = positions - q_len[:, None]
            positions = torch.where(k < 0, positions, start[:, None] + k)
        mask = _causal_padding_mask(valid, packed.dtype)
        cos_sin = self.rotary(packed, positions)
        h = packed
        for layer in self.rec_body:
            out = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
            h = out[0] if isinstance(out, tuple) else out
        h = self.norm(self.proj_post(h))
        # Predictive rows: last question position, then every answer position but the last.
        la = answer.shape[1]
        rows = (q_len - 1)[:, None] + torch.arange(la, device=h.device)[None, :]
        rows = rows.clamp(max=h.shape[1] - 1)
        return h.gather(1, rows[..., None].expand(-1, -1, h.shape[-1]))


def _pack(question, question_mask, answer, answer_mask):
    """Concatenate each item's valid question and answer tokens contiguously, then right-pad.

    Returns packed [B, N, d], valid [B, N] bool, q_len [B], positions [B, N] (0..N-1).
    """
    q_len = question_mask.sum(1).long()
    a_len = answer_mask.sum(1).long()
    total = q_len + a_len
    n = int(total.max())
    b, lq, d = question.shape
    la = answer.shape[1]
    j = torch.arange(n, device=question.device)[None, :].expand(b, -1)
    from_q = question.gather(1, j.clamp(max=lq - 1)[..., None].expand(-1, -1, d))
    from_a = answer.gather(1, (j - q_len[:, None]).clamp(0, la - 1)[..., None].expand(-1, -1, d))
    packed = torch.where((j < q_len[:, None])[..., None], from_q, from_a)
    valid = j < total[:, None]
    packed = packed * valid[..., None].to(packed.dtype)
    return packed, valid, q_len, j


def _causal_padding_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, N, N] mask: a query sees itself and earlier valid keys only.

    Built explicitly because decoder layers called directly get no mask from the model wrapper
    and would otherwise attend both ways (leaking the answer).
    """
    n = valid.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
    allowed = causal[None, :, :] & valid[:, None, :]
    # Padding queries would see nothing; let them see themselves so softmax stays finite.
    allowed = allowed | torch.eye(n, dtype=torch.bool, device=valid.device)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None, :, :]
