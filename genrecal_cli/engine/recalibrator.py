"""The Recalibrator: carries student features into the teacher's space (used only in training).

proj_pre (d_l -> d_s) -> rec_body (N decoder blocks of the STUDENT's own class and config,
causal, over fresh positions 0..n-1 with a 1-D rotary of their own) -> proj_post (d_s -> d_l)
-> LayerNorm, over the student's question segments interleaved with the teacher's answers (one
pair per turn; engine/turns.py). See METHOD.md, "The Recalibrator" and "Several turns".
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .turns import Tokens, interleave, predictive_rows


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
    """proj_pre -> rec_body -> proj_post -> LayerNorm, over [z_qs^1, z_al^1, z_qs^2, z_al^2, ...].

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
        answer_dropout: float = 0.0,
    ):
        super().__init__()
        config = copy.deepcopy(student_text_config)
        config._attn_implementation = "sdpa"  # we pass an explicit mask; sdpa honours it like eager
        # Per-layer settings (Qwen2's layer_types) are indexed by layer: the Rec-body's depth is
        # its own, deeper than the student's at times (depth 4 from a 2-layer student); its blocks
        # take the student's layer types in turn.
        types = getattr(config, "layer_types", None)
        if types:
            config.layer_types = [types[i % len(types)] for i in range(num_blocks)]
        config.num_hidden_layers = num_blocks
        student_hidden = config.hidden_size
        self.new_positions = new_positions
        self.proj_pre = nn.Linear(teacher_hidden, student_hidden, bias=False)
        self.rec_body = nn.ModuleList(decoder_layer_class(config, layer_idx=i) for i in range(num_blocks))
        self.proj_post = nn.Linear(student_hidden, teacher_hidden, bias=False)
        self.norm = nn.LayerNorm(teacher_hidden)
        self.rotary = Rotary1D(config)
        # Beyond the paper (recalibrator.answer_dropout): in training, each teacher answer
        # token's input is replaced by one learned vector with this probability, so that the
        # next token must be predicted from the context, the student's question included.
        self.answer_dropout = answer_dropout
        if answer_dropout > 0:
            self.answer_mask = nn.Parameter(torch.zeros(student_hidden))
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

    def forward(self, question: Tokens, answer: Tokens, *, question_from_teacher: bool = False) -> torch.Tensor:
        """Recalibrated features that predict each teacher answer token, item after item.

        question: the student's question tokens z_qs (x [B, Kq, d_s]), or the teacher's z_ql
                  (x [B, Kq, d_l]) when `question_from_teacher` (the L_reg path; proj_pre applied).
        answer:   the teacher's answer tokens z_al or their input embeddings (x [B, Ka, d_l]).
        Both carry each token's turn, so several turns interleave (engine/turns.py).
        Returns [N, d_l], N = answer tokens in the batch, in reading order: the row before each
        answer token in the interleaved sequence (the next-token shift). With new_positions off
        (the ablation) every token keeps its position in its own side's sequence.
        """
        if question_from_teacher:
            question = question.with_x(self.proj_pre(question.x))
        packed, valid, is_answer, source_pos = interleave(question, answer.with_x(self._drop(self.proj_pre(answer.x))))
        n = packed.shape[1]
        positions = torch.arange(n, device=packed.device)[None, :].expand(packed.shape[0], -1)
        if not self.new_positions:
            positions = source_pos
        mask = _causal_padding_mask(valid, packed.dtype)
        cos_sin = self.rotary(packed, positions)
        h = packed
        for layer in self.rec_body:
            out = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
            h = out[0] if isinstance(out, tuple) else out
        # Only the predictive rows go through the (per-row) output projection and norm.
        return self.norm(self.proj_post(predictive_rows(h, is_answer)))


    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, Ka, d_s] with each token replaced by the learned mask vector with probability
        answer_dropout, in training only (evaluation and the probe see every token)."""
        if not (self.training and self.answer_dropout > 0):
            return x
        drop = torch.rand(x.shape[:-1], device=x.device) < self.answer_dropout
        return torch.where(drop[..., None], self.answer_mask.to(x.dtype), x)


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
