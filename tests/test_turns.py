"""engine/turns.py: selecting a side's question / answer tokens, interleaving them turn by turn,
the next-token shift over the interleaved sequence, and (end to end, on a real Recalibrator)
causality across turns (METHOD.md, "Several turns")."""

from __future__ import annotations

import torch

from genrecal_cli.engine.recalibrator import Recalibrator
from genrecal_cli.engine.turns import Tokens, first_of_turn, interleave, predictive_rows, select

PAD = 777.0  # a value no real token row has here


# ---------------------------------------------------------------- select


def _numbered(b: int, length: int, d: int = 2) -> torch.Tensor:
    """x[i, l] = [100 i + l, -(100 i + l)]: every row names its item and position."""
    v = (100 * torch.arange(b)[:, None] + torch.arange(length)[None, :]).float()
    return torch.stack([v, -v], -1)[..., :d]


SEGMENT = torch.tensor([
    [0, 0, 1, 1, 2, 3, 3, -1],      # two turns, one padding token
    [0, 0, 0, 1, -1, -1, -1, -1],   # one turn, shorter
])


def _check_selected(tok: Tokens, x, want_turn, want_pos):
    """tok holds exactly the listed tokens per item (turn, pos, x = the source row), then padding."""
    width = max(len(t) for t in want_turn)
    assert tok.x.shape == (2, width, x.shape[-1]) and tok.segment.shape == tok.pos.shape == (2, width)
    for i, (turns, poss) in enumerate(zip(want_turn, want_pos)):
        n = len(turns)
        assert tok.segment[i].tolist() == turns + [-1] * (width - n)
        assert tok.mask[i].tolist() == [True] * n + [False] * (width - n)
        assert tok.pos[i, :n].tolist() == poss
        assert torch.equal(tok.x[i, :n], x[i, poss])


def test_select_question_tokens():
    x = _numbered(2, 8)
    _check_selected(select(x, SEGMENT, answer=False), x,
                    want_turn=[[0, 0, 2], [0, 0, 0]], want_pos=[[0, 1, 4], [0, 1, 2]])


def test_select_answer_tokens():
    x = _numbered(2, 8)
    _check_selected(select(x, SEGMENT, answer=True), x,
                    want_turn=[[1, 1, 3, 3], [1]], want_pos=[[2, 3, 5, 6], [3]])


# ---------------------------------------------------------------- interleave / predictive_rows


def _two_sides():
    """Item 0: two turns, q seg0 (3 tokens), a seg1 (2), q seg2 (2), a seg3 (3); item 1: one turn,
    q seg0 (2), a seg1 (1). Question rows are 1000 + 10 i + k, answer rows 2000 + 10 i + k,
    padding rows PAD; pos are where the tokens stood in their sides' sequences."""
    d = 3
    q = torch.full((2, 5, d), PAD)
    a = torch.full((2, 5, d), PAD)
    for i, (nq, na) in enumerate([(5, 5), (2, 1)]):
        q[i, :nq] = (1000 + 10 * i + torch.arange(nq).float())[:, None]
        a[i, :na] = (2000 + 10 * i + torch.arange(na).float())[:, None]
    question = Tokens(q, torch.tensor([[0, 0, 0, 2, 2], [0, 0, -1, -1, -1]]),
                      torch.tensor([[0, 1, 2, 5, 6], [0, 1, 0, 0, 0]]))
    answer = Tokens(a, torch.tensor([[1, 1, 3, 3, 3], [1, -1, -1, -1, -1]]),
                    torch.tensor([[3, 4, 7, 8, 9], [2, 0, 0, 0, 0]]))
    return question, answer


def test_interleave_orders_segments_turn_by_turn():
    question, answer = _two_sides()
    packed, valid, is_answer, source_pos = interleave(question, answer)
    q, a = question.x, answer.x
    # item 0: [q seg0, a seg1, q seg2, a seg3]; item 1: [q seg0, a seg1], then padding (zeros)
    want0 = [q[0, 0], q[0, 1], q[0, 2], a[0, 0], a[0, 1], q[0, 3], q[0, 4], a[0, 2], a[0, 3], a[0, 4]]
    want1 = [q[1, 0], q[1, 1], a[1, 0]] + [torch.zeros(3)] * 7
    assert packed.shape == (2, 10, 3)
    assert torch.equal(packed[0], torch.stack(want0))
    assert torch.equal(packed[1], torch.stack(want1))
    assert valid.tolist() == [[True] * 10, [True] * 3 + [False] * 7]
    F, T = False, True
    assert is_answer.tolist() == [[F, F, F, T, T, F, F, T, T, T], [F, F, T] + [F] * 7]
    assert source_pos[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert source_pos[1, :3].tolist() == [0, 1, 2]


def test_predictive_rows_take_the_row_before_each_answer_token():
    question, answer = _two_sides()
    _, _, is_answer, _ = interleave(question, answer)
    h = _numbered(2, 10)  # row i, l = 100 i + l
    rows = predictive_rows(h, is_answer)
    # item 0's answer tokens stand at 3, 4 (turn 1) and 7, 8, 9 (turn 2): predicted from 2, 3,
    # then 6 (the last student token of question segment 2), 7, 8; item 1's at 2: from 1
    assert rows[:, 0].tolist() == [2, 3, 6, 7, 8, 101]
    assert rows.shape == (int(answer.mask.sum()), 2)


def test_first_of_turn_marks_each_answers_first_token():
    question, answer = _two_sides()
    assert first_of_turn(answer).tolist() == [True, False, True, False, False, True]
    # and those are exactly the answer tokens predicted from a student (question) row
    _, _, is_answer, _ = interleave(question, answer)
    from_question = predictive_rows((~is_answer)[..., None].float(), is_answer)[:, 0].bool()
    assert torch.equal(from_question, first_of_turn(answer))


# ---------------------------------------------------------------- end to end, two turns


def _recalibrator():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=100, initializer_range=0.05)
    return Recalibrator(48, cfg, LlamaDecoderLayer, num_blocks=2).eval()


# Both sides render the same two conversations (item 0: two turns; item 1: one) with their own
# lengths per segment; -1 is padding.
STUDENT_SEG = torch.tensor([
    [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, -1],
    [0, 0, 1, 1, -1, -1, -1, -1, -1, -1, -1],
])
TEACHER_SEG = torch.tensor([
    [0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3],
    [0, 0, 0, 1, -1, -1, -1, -1, -1, -1, -1, -1],
])


def _run(rec, z_s, z_t):
    with torch.no_grad():
        return rec(select(z_s, STUDENT_SEG, answer=False), select(z_t, TEACHER_SEG, answer=True))


def test_two_turns_are_causal_across_turns():
    """Rows: item 0's answer 1 (2 tokens), answer 3 (3 tokens), then item 1's answer 1 (1)."""
    rec = _recalibrator()
    g = torch.Generator().manual_seed(1)
    z_s, z_t = torch.randn(2, 11, 32, generator=g), torch.randn(2, 12, 48, generator=g)
    base = _run(rec, z_s, z_t)
    assert base.shape == (6, 48)

    # turn 2's tokens changed: the student's question segment 2 and the teacher's answer 3
    z_s2, z_t2 = z_s.clone(), z_t.clone()
    z_s2[0][STUDENT_SEG[0] == 2] += 3.0
    z_t2[0][TEACHER_SEG[0] == 3] += 3.0
    later = _run(rec, z_s2, z_t2)
    diff = (later - base).abs().amax(-1)
    assert torch.all(diff[:2] < 1e-6), diff  # rows predicting answer 1's tokens: unchanged
    assert torch.all(diff[2:5] > 1e-4), diff  # answer 3's: changed
    assert diff[5] < 1e-6, diff  # the other item: unchanged

    # the first token of answer 3 is predicted from the student's question segment 2 ...
    z_s3 = z_s.clone()
    z_s3[0][STUDENT_SEG[0] == 2] += 3.0
    diff = (_run(rec, z_s3, z_t) - base).abs().amax(-1)
    assert diff[2] > 1e-4, diff
    assert torch.all(diff[:2] < 1e-6), diff
    # ... and not from answer 3 itself
    z_t3 = z_t.clone()
    z_t3[0][TEACHER_SEG[0] == 3] += 3.0
    diff = (_run(rec, z_s, z_t3) - base).abs().amax(-1)
    assert torch.all(diff[:3] < 1e-6), diff
    assert torch.all(diff[3:5] > 1e-4), diff


def test_student_answers_and_teacher_questions_are_not_used():
    """Student features stand only for question segments, teacher features only for answers."""
    rec = _recalibrator()
    g = torch.Generator().manual_seed(2)
    z_s, z_t = torch.randn(2, 11, 32, generator=g), torch.randn(2, 12, 48, generator=g)
    base = _run(rec, z_s, z_t)
    z_s2, z_t2 = z_s.clone(), z_t.clone()
    z_s2[STUDENT_SEG % 2 == 1] += 3.0
    z_t2[TEACHER_SEG % 2 == 0] += 3.0
    assert torch.allclose(_run(rec, z_s2, z_t2), base, atol=1e-6)


def test_positions_run_over_the_real_tokens_of_every_turn():
    """New positions 0..n-1 over each item's interleaved sequence, both turns, reach the rotary
    and every block (break: the positions restart at 0 at each turn)."""
    rec = _recalibrator()
    seen = {"rotary": [], "blocks": []}
    rec.rotary.register_forward_pre_hook(lambda m, args: seen["rotary"].append(args[1].clone()))
    for layer in rec.rec_body:
        layer.register_forward_pre_hook(lambda m, args, kw: seen["blocks"].append(kw["position_ids"].clone()),
                                        with_kwargs=True)
    g = torch.Generator().manual_seed(3)
    _run(rec, torch.randn(2, 11, 32, generator=g), torch.randn(2, 12, 48, generator=g))
    # item 0: question segment 0 (3 student tokens), answer 1 (2 teacher tokens), question 2 (2),
    # answer 3 (3): ten real tokens; item 1: 2 + 1
    real = {0: 10, 1: 3}
    (positions,) = seen["rotary"]
    assert len(seen["blocks"]) == len(rec.rec_body) >= 2
    for p in [positions, *seen["blocks"]]:
        for i, n in real.items():
            assert p[i, :n].tolist() == list(range(n))


def test_one_reading_of_the_segment_convention():
    """data/render.py's is_answer / is_question: 2k+1 answer k, 2k the question before it, -1
    padding neither; for a tensor and for one segment (Python's -1 % 2 is 1: padding must not
    pass for an answer)."""
    from genrecal_cli.data.render import is_answer, is_question

    seg = torch.tensor([0, 0, 1, 2, 3, 3, -1])
    assert is_answer(seg).tolist() == [False, False, True, False, True, True, False]
    assert is_question(seg).tolist() == [True, True, False, True, False, False, False]
    assert [bool(is_answer(s)) for s in (0, 1, 2, 3, -1)] == [False, True, False, True, False]
    assert not is_question(-1)
