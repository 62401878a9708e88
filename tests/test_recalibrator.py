"""The Recalibrator: shapes, padding invariance, causality, rotary, initialisation, both paths."""

from __future__ import annotations

import pytest
import torch

from genrecal_cli.engine.recalibrator import Recalibrator, Rotary1D
from genrecal_cli.engine.turns import Tokens


def _llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=100, initializer_range=0.05)
    return cfg, LlamaDecoderLayer


def _qwen2vl():
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer

    cfg = Qwen2VLConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=2, num_hidden_layers=2, vocab_size=100,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}))
    return cfg.text_config, Qwen2VLDecoderLayer


BUILDERS = {"llama": _llama, "qwen2_vl": _qwen2vl}


def _tokens(x: torch.Tensor, mask: torch.Tensor, turn: int, start=0) -> Tokens:
    """Single-turn Tokens from (x [B, K, d], mask [B, K], valid tokens first): every real token in
    segment `turn` (question 0, answer 1), at positions start + 0..K-1 (start: int or [B])."""
    b, k = mask.shape
    start = torch.as_tensor(start).reshape(-1, 1).expand(b, 1)
    seg = torch.where(mask.bool(), torch.full((b, k), turn), torch.full((b, k), -1))
    return Tokens(x, seg, start + torch.arange(k)[None, :])


def _pair(q, qm, a, am, answer_start=None):
    """The question (turn 0) and answer (turn 1) Tokens of one-turn items; by default the answer
    stands right after the question in its own side's sequence."""
    return _tokens(q, qm, 0), _tokens(a, am, 1, qm.sum(1) if answer_start is None else answer_start)


def _batch(seed=0, d_s=32, d_l=48):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 7, d_s, generator=g)
    qm = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 5 + [0] * 2])
    a = torch.randn(3, 5, d_l, generator=g)
    am = torch.tensor([[1] * 5, [1] * 2 + [0] * 3, [1] * 4 + [0]])
    return q, qm, a, am


def _per_item(out: torch.Tensor, am: torch.Tensor) -> list[torch.Tensor]:
    """The [N, d] output cut into each item's rows (one per answer token, in order)."""
    return list(out.split(am.sum(1).tolist()))


@pytest.fixture(params=list(BUILDERS))
def rec(request):
    torch.manual_seed(0)
    cfg, layer = BUILDERS[request.param]()
    return Recalibrator(48, cfg, layer, num_blocks=2).eval()


def test_shapes_and_parts(rec):
    q, qm, a, am = _batch()
    out = rec(*_pair(q, qm, a, am))
    assert out.shape == (int(am.sum()), 48)  # one row per real answer token: 5 + 2 + 4
    assert rec.proj_pre.weight.shape == (32, 48) and rec.proj_pre.bias is None
    assert rec.proj_post.weight.shape == (48, 32) and rec.proj_post.bias is None
    assert len(rec.rec_body) == 2 and isinstance(rec.norm, torch.nn.LayerNorm)


def test_batched_equals_one_by_one(rec):
    q, qm, a, am = _batch()
    with torch.no_grad():
        out = _per_item(rec(*_pair(q, qm, a, am)), am)
        for i in range(3):
            lq, la = int(qm[i].sum()), int(am[i].sum())
            alone = rec(*_pair(q[i : i + 1, :lq], qm[i : i + 1, :lq], a[i : i + 1, :la], am[i : i + 1, :la]))
            assert alone.shape == (la, 48)
            assert torch.allclose(alone, out[i], atol=1e-5)


def test_causal_no_answer_leak(rec):
    """Changing answer token k may change only rows > k (row k+1 is predicted from position k)."""
    q, qm, a, am = _batch()
    with torch.no_grad():
        base = _per_item(rec(*_pair(q, qm, a, am)), am)
        a2 = a.clone()
        a2[0, 2] += 3.0
        moved = _per_item(rec(*_pair(q, qm, a2, am)), am)
    diff = (moved[0] - base[0]).abs().amax(-1)
    assert torch.all(diff[:3] == 0), diff
    assert torch.all(diff[3:] > 1e-4), diff
    for i in (1, 2):  # other items are untouched
        assert torch.equal(moved[i], base[i])
    # and the first row (predicting answer token 0) depends on the student's question
    q2 = q.clone()
    q2[0, 6] += 3.0
    with torch.no_grad():
        assert (_per_item(rec(*_pair(q2, qm, a, am)), am)[0][0] - base[0][0]).abs().max() > 1e-4


def test_padding_values_do_not_matter(rec):
    q, qm, a, am = _batch()
    q2, a2 = q.clone(), a.clone()
    q2[1, 4:] = 99.0
    a2[1, 2:] = -99.0
    with torch.no_grad():
        assert torch.allclose(rec(*_pair(q, qm, a, am)), rec(*_pair(q2, qm, a2, am)), atol=1e-6)


def test_teacher_only_path_applies_proj_pre_to_the_question(rec):
    g = torch.Generator().manual_seed(3)
    zq = torch.randn(2, 4, 48, generator=g)
    za = torch.randn(2, 3, 48, generator=g)
    m_q, m_a = torch.ones(2, 4, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    with torch.no_grad():
        via_flag = rec(*_pair(zq, m_q, za, m_a), question_from_teacher=True)
        by_hand = rec(*_pair(rec.proj_pre(zq), m_q, za, m_a))
    assert via_flag.shape == (6, 48)
    assert torch.allclose(via_flag, by_hand, atol=1e-6)


def _pair_of_recalibrators():
    torch.manual_seed(0)
    cfg, layer = _llama()
    rec_npe = Recalibrator(48, cfg, layer, new_positions=True).eval()
    rec_old = Recalibrator(48, cfg, layer, new_positions=False).eval()
    rec_old.load_state_dict(rec_npe.state_dict())
    return rec_npe, rec_old


def test_new_positions_off_uses_the_teachers_answer_positions():
    """Off, each token keeps `pos`, its position in its own side's sequence: an answer that
    stands right after the question there gives the new-positions result; one that stands 40
    further along (a longer teacher question) does not, from its second row on (the first row is
    predicted from the question, whose positions did not move)."""
    rec_npe, rec_old = _pair_of_recalibrators()
    q, qm, a, am = _batch()
    with torch.no_grad():
        same = rec_old(*_pair(q, qm, a, am, answer_start=qm.sum(1)))
        shifted = rec_old(*_pair(q, qm, a, am, answer_start=qm.sum(1) + 40))
        assert torch.allclose(same, rec_npe(*_pair(q, qm, a, am)), atol=1e-6)
        # new positions ignore pos altogether
        assert torch.allclose(rec_npe(*_pair(q, qm, a, am, answer_start=qm.sum(1) + 40)), same, atol=1e-6)
    same0, shifted0 = _per_item(same, am)[0], _per_item(shifted, am)[0]
    assert torch.allclose(shifted0[0], same0[0], atol=1e-6)
    assert not torch.allclose(shifted0[1:], same0[1:], atol=1e-3)


def test_new_positions_off_rotates_by_each_sides_own_positions(monkeypatch):
    """The rotary gets, per item, the question's pos then the answer's pos (the question's own too,
    not 0..n-1); with new positions on, 0..n-1."""
    rec_npe, rec_old = _pair_of_recalibrators()
    q, qm, a, am = _batch()
    question, answer = _pair(q, qm, a, am, answer_start=torch.tensor([30, 11, 20]))
    question.pos = question.pos + torch.tensor([[3], [0], [5]])  # e.g. a system prompt before it
    seen = []
    real = Rotary1D.forward

    def spy(self, x, position_ids):
        seen.append(position_ids.clone())
        return real(self, x, position_ids)

    monkeypatch.setattr(Rotary1D, "forward", spy)
    with torch.no_grad():
        rec_old(question, answer)
        rec_npe(question, answer)
    off, on = seen
    for i in range(3):
        lq, la = int(qm[i].sum()), int(am[i].sum())
        want = question.pos[i, :lq].tolist() + answer.pos[i, :la].tolist()
        assert off[i, : lq + la].tolist() == want
        assert on[i, : lq + la].tolist() == list(range(lq + la))


def test_rotary_1d_matches_mrope_with_equal_rows():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    cfg, _ = _qwen2vl()
    x = torch.zeros(1, 6, 32)
    pos = torch.arange(6)[None]
    cos, sin = Rotary1D(cfg)(x, pos)
    cos3, sin3 = Qwen2VLRotaryEmbedding(cfg)(x, pos[None].expand(3, -1, -1))
    assert torch.allclose(cos, cos3, atol=1e-6) and torch.allclose(sin, sin3, atol=1e-6)


def test_linear_layers_use_the_configs_initializer_range():
    torch.manual_seed(0)
    cfg, layer = _llama()  # initializer_range 0.05
    rec = Recalibrator(256, cfg, layer)
    std = rec.proj_pre.weight.std().item()
    assert 0.04 < std < 0.06, std
    assert abs(rec.rec_body[0].mlp.up_proj.weight.std().item() - 0.05) < 0.01


@pytest.mark.parametrize("family", list(BUILDERS))
def test_rec_body_may_be_deeper_than_the_student(family):
    # the depth-4 ablation on a 2-layer student: per-layer settings (Qwen2's layer_types) are
    # indexed by the block, not by the student's layers
    torch.manual_seed(0)
    cfg, layer = BUILDERS[family]()
    assert cfg.num_hidden_layers == 2
    rec = Recalibrator(48, cfg, layer, num_blocks=4).eval()
    assert len(rec.rec_body) == 4
    q, qm, a, am = _batch()
    out = rec(*_pair(q, qm, a, am))
    assert out.shape == (int(am.sum()), 48) and torch.isfinite(out).all()
    assert cfg.num_hidden_layers == 2  # the student's own config is left as it was


def test_answer_dropout_masks_answer_inputs_in_training_only():
    torch.manual_seed(0)
    cfg, layer = _llama()
    plain = Recalibrator(48, cfg, layer).eval()
    torch.manual_seed(0)
    drop = Recalibrator(48, cfg, layer, answer_dropout=0.5)
    drop.answer_mask.data.normal_()  # (zero at init; any learned value must be what replaces a token)
    q, qm, a, am = _batch()
    # evaluation (and the reliance probe) sees every answer token: the paper's Recalibrator
    assert torch.allclose(drop.eval()(*_pair(q, qm, a, am)), plain(*_pair(q, qm, a, am)), atol=1e-6)
    drop.train()
    torch.manual_seed(1)
    out = drop(*_pair(q, qm, a, am))
    assert not torch.allclose(out, plain(*_pair(q, qm, a, am)), atol=1e-4)
    out.sum().backward()
    assert drop.answer_mask.grad is not None and drop.answer_mask.grad.abs().sum() > 0
    # every token masked: the answer's own features no longer reach the output
    drop.answer_dropout = 0.999999
    torch.manual_seed(2)
    one = drop(*_pair(q, qm, a, am))
    torch.manual_seed(2)
    other = drop(*_pair(q, qm, torch.randn_like(a), am))
    assert torch.allclose(one, other, atol=1e-6)


def test_answer_dropout_is_a_probability():
    from genrecal_cli.errors import RecipeError
    from genrecal_cli.recipe import recipe_from_dict

    base = {"teacher": {"path": "zoo:tiny-teacher"}, "student": {"path": "zoo:tiny-student"},
            "stages": {"align": {"steps": 1}}}
    assert recipe_from_dict({**base, "recalibrator": {"answer_dropout": 0.3}}).recalibrator.answer_dropout == 0.3
    with pytest.raises(RecipeError, match=r"recalibrator.answer_dropout: 1.0 must be in \[0, 1\)"):
        recipe_from_dict({**base, "recalibrator": {"answer_dropout": 1.0}})
