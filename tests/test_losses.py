"""Loss terms against direct reference computations on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from genrecal_cli.engine import losses


def _setup(n=13, d=8, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(d, v, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, d, generator=g))
    rec = torch.randn(n, d, generator=g, requires_grad=True)
    tch = torch.randn(n, d, generator=g)
    tgt = torch.randint(0, v, (n,), generator=g)
    return head, rec, tch, tgt


def test_answer_rows_applies_the_next_token_shift():
    hidden = torch.arange(2 * 5, dtype=torch.float).view(2, 5, 1)
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 4, 5, 6, 9]])
    rows, targets = losses.answer_rows(hidden, labels)
    # item 0: tokens at 2,3 predicted from positions 1,2; item 1: tokens at 1..4 from 0..3
    assert rows.squeeze(-1).tolist() == [1.0, 2.0, 5.0, 6.0, 7.0, 8.0]
    assert targets.tolist() == [7, 8, 4, 5, 6, 9]


def test_kl_matches_direct_formula_and_is_zero_on_itself():
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    p, q = t.softmax(-1), s.softmax(-1)
    ref = (p * (p.log() - q.log())).sum()
    assert torch.allclose(losses.kl(t, s), ref, atol=1e-6)
    assert losses.kl(t, t).abs() < 1e-6
    # direction: forward KL(teacher || model), not reverse
    rev = (q * (q.log() - p.log())).sum()
    assert not torch.allclose(losses.kl(t, s), rev)
    # temperature: T^2 * KL(softmax(t/T) || softmax(s/T))
    p2, q2 = (t / 2).softmax(-1), (s / 2).softmax(-1)
    assert torch.allclose(losses.kl(t, s, 2.0), 4 * (p2 * (p2.log() - q2.log())).sum(), atol=1e-6)


def test_recalibration_terms_match_reference_and_chunking():
    head, rec, tch, tgt = _setup()
    ar, kl = losses.recalibration_terms(head, rec, tch, tgt, temperature=1.0, chunk_size=4)
    logits, tlogits = head(rec), head(tch)
    ref_ar = F.cross_entropy(logits, tgt)
    ref_kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(tlogits, -1), log_target=True, reduction="batchmean")
    assert torch.allclose(ar, ref_ar, atol=1e-5)
    assert torch.allclose(kl, ref_kl, atol=1e-5)
    (ar + kl).backward()
    g_chunked = rec.grad.clone()
    rec.grad = None
    (ref_ar + ref_kl).backward()
    assert torch.allclose(g_chunked, rec.grad, atol=1e-5)
    assert head.weight.grad is not None  # the head is usually frozen, but gradients must be correct


def test_no_gradient_reaches_the_teacher_rows():
    head, rec, tch, tgt = _setup()
    tch.requires_grad_(True)
    ar, kl = losses.recalibration_terms(head, rec, tch, tgt)
    (ar + kl).backward()
    assert tch.grad is None


def test_sft_matches_cross_entropy():
    head, rows, _, tgt = _setup(n=9)
    got = losses.sft(head, rows, tgt, chunk_size=2)
    assert torch.allclose(got, F.cross_entropy(head(rows), tgt), atol=1e-5)


def test_empty_answers_give_zero_loss_with_a_graph():
    head, rec, tch, tgt = _setup(n=0)
    ar, kl = losses.recalibration_terms(head, rec, tch, tgt)
    assert ar.item() == 0.0 and kl.item() == 0.0
    assert ar.requires_grad


def test_top1_agreement():
    head, rec, tch, _ = _setup()
    assert losses.top1_agreement(head, tch, tch) == 1.0
    ref = (head(rec).argmax(-1) == head(tch).argmax(-1)).float().mean().item()
    assert abs(losses.top1_agreement(head, rec, tch, chunk_size=3) - ref) < 1e-6


def test_aligned_pairs_pair_tokens_by_position_within_each_answer():
    # item 0: student 3 tokens, teacher 2 -> 2 pairs; item 1: student 1, teacher 4 -> 1 pair
    s_idx, t_idx = losses.aligned_pairs(torch.tensor([3, 1]), torch.tensor([2, 4]))
    assert s_idx.tolist() == [0, 1, 3]
    assert t_idx.tolist() == [0, 1, 2]
    s_idx, t_idx = losses.aligned_pairs(torch.tensor([0, 2]), torch.tensor([5, 2]))
    assert s_idx.tolist() == [0, 1] and t_idx.tolist() == [5, 6]


def test_sorted_probability_distance_matches_a_direct_loop_and_ignores_ids():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(3, 5, generator=g), torch.randn(3, 8, generator=g)
    ref = 0.0
    for r in range(3):
        ps = sorted(s[r].softmax(-1).tolist(), reverse=True) + [0.0] * 3
        pt = sorted(t[r].softmax(-1).tolist(), reverse=True)
        ref += sum(abs(a - b) for a, b in zip(ps, pt))
    assert abs(losses.sorted_probability_distance(s, t).item() - ref) < 1e-5
    # permuting a vocabulary changes nothing: only the shape of the distribution counts
    perm = torch.randperm(8, generator=g)
    assert torch.allclose(losses.sorted_probability_distance(s, t[:, perm]), losses.sorted_probability_distance(s, t))
    assert losses.sorted_probability_distance(t, t[:, perm]).item() < 1e-6
    # temperature softens both sides before sorting
    ps, pt = (s / 2).softmax(-1), F.pad((t / 2).softmax(-1), (0, 0))
    ps = F.pad(ps.sort(-1, descending=True).values, (0, 3))
    pt = pt.sort(-1, descending=True).values
    assert torch.allclose(losses.sorted_probability_distance(s, t, 2.0), (ps - pt).abs().sum(), atol=1e-5)


def test_uld_is_the_mean_distance_over_aligned_pairs_with_gradient_to_the_student_only():
    g = torch.Generator().manual_seed(4)
    s_head, t_head = torch.nn.Linear(6, 7, bias=False), torch.nn.Linear(10, 12, bias=False)
    s_rows = torch.randn(5, 6, generator=g, requires_grad=True)
    t_rows = torch.randn(6, 10, generator=g, requires_grad=True)
    s_counts, t_counts = torch.tensor([2, 3]), torch.tensor([4, 2])  # pairs: (0,0) (1,1) (2,4) (3,5)
    got = losses.uld(s_head, s_rows, s_counts, t_head, t_rows, t_counts, chunk_size=3)
    pairs = [(0, 0), (1, 1), (2, 4), (3, 5)]
    ref = sum(losses.sorted_probability_distance(s_head(s_rows[i : i + 1]), t_head(t_rows[j : j + 1])) for i, j in pairs) / 4
    assert torch.allclose(got, ref, atol=1e-5)
    got.backward()
    assert s_rows.grad is not None and s_rows.grad[4].abs().sum() == 0  # row 4 has no partner
    assert t_rows.grad is None and t_head.weight.grad is None


def test_kd_is_the_mean_forward_kl_per_token_with_gradient_to_the_student_only():
    g = torch.Generator().manual_seed(5)
    s_head, t_head = torch.nn.Linear(6, 9, bias=False), torch.nn.Linear(10, 9, bias=False)
    s_rows = torch.randn(5, 6, generator=g, requires_grad=True)
    t_rows = torch.randn(5, 10, generator=g, requires_grad=True)
    for temperature in (1.0, 2.0):
        got = losses.kd(s_head, s_rows, t_head, t_rows, temperature=temperature, chunk_size=2)
        ref = 0.0
        for i in range(5):  # the textbook formula, row by row: sum_v p_t (log p_t - log p_s), times T^2
            p_t = (t_head(t_rows[i]) / temperature).softmax(-1)
            p_s = (s_head(s_rows[i]) / temperature).softmax(-1)
            ref += (p_t * (p_t.log() - p_s.log())).sum() * temperature**2
        assert torch.allclose(got, ref / 5, atol=1e-5)
    got.backward()
    assert s_rows.grad is not None and s_rows.grad.abs().sum() > 0
    assert t_rows.grad is None and t_head.weight.grad is None
    # a student that predicts exactly the teacher's distribution has nothing left to learn
    same = losses.kd(t_head, t_rows.detach(), t_head, t_rows.detach())
    assert same.abs().item() < 1e-6


def test_kd_refuses_rows_that_do_not_pair_and_compares_padded_heads_on_the_shared_ids():
    s_head, t_head = torch.nn.Linear(4, 7, bias=False), torch.nn.Linear(4, 5, bias=False)
    with pytest.raises(ValueError, match="same answer tokens"):
        losses.kd(s_head, torch.randn(3, 4), t_head, torch.randn(2, 4))
    rows = torch.randn(3, 4)
    got = losses.kd(s_head, rows, t_head, rows)
    ref = losses.kl(t_head(rows), s_head(rows)[:, :5]) / 3
    assert torch.allclose(got, ref, atol=1e-6)


def _grouped_kl(p: torch.Tensor, q: torch.Tensor, ids: torch.Tensor) -> float:
    """KL over K + 1 bins by a direct loop: each top-K id its own bin, every other id in one."""
    total = 0.0
    for r in range(p.shape[0]):
        keep = set(ids[r].tolist())
        tail_p = sum(float(p[r, v]) for v in range(p.shape[1]) if v not in keep)
        tail_q = sum(float(q[r, v]) for v in range(q.shape[1]) if v not in keep)
        total += sum(float(p[r, v]) * math.log(float(p[r, v]) / float(q[r, v])) for v in keep)
        if tail_p > 0:
            total += tail_p * math.log(tail_p / tail_q)
    return total


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_topk_is_kl_when_k_covers_the_vocabulary_and_the_grouped_kl_below(temperature):
    torch.manual_seed(0)
    teacher, model = torch.randn(5, 11) * 3, torch.randn(5, 11, requires_grad=True)
    log_p = torch.log_softmax(teacher / temperature, -1)
    full = losses.kl(teacher, model, temperature)
    everything = torch.argsort(torch.rand(5, 11), -1)  # every id, in no particular order
    torch.testing.assert_close(losses.kl_topk(log_p.gather(1, everything), everything, model, temperature), full)
    for k in (1, 3, 8):
        top = log_p.topk(k, -1).indices
        got = losses.kl_topk(log_p.gather(1, top), top, model, temperature)
        q = torch.softmax(model.detach() / temperature, -1)
        want = _grouped_kl(log_p.exp(), q, top) * temperature**2
        assert float(got.detach()) == pytest.approx(want, rel=1e-5)
        assert float(got.detach()) <= float(full.detach()) + 1e-6
    got.backward()
    assert model.grad is not None and torch.isfinite(model.grad).all() and model.grad.abs().sum() > 0


def test_kl_topk_is_zero_on_the_teacher_itself():
    torch.manual_seed(1)
    teacher = torch.randn(4, 9) * 2
    log_p = torch.log_softmax(teacher, -1)
    top = log_p.topk(3, -1).indices
    assert float(losses.kl_topk(log_p.gather(1, top), top, teacher)) == pytest.approx(0.0, abs=1e-5)


def test_recalibration_terms_from_a_top_k_equal_the_rows_when_k_covers_the_vocabulary():
    """Break: the top-K path drops the tail, or scores the teacher's rows it does not have."""
    torch.manual_seed(2)
    head = torch.nn.Linear(6, 13, bias=False)
    rec = torch.randn(7, 6, requires_grad=True)
    teacher, targets = torch.randn(7, 6), torch.randint(0, 13, (7,))
    ar, kl = losses.recalibration_terms(head, rec, teacher, targets, temperature=2.0, chunk_size=3)
    grad = torch.autograd.grad(ar + kl, rec)[0]
    top = losses.TopK.of(head, teacher, 13, temperature=2.0)
    assert top.ids[:, 0].tolist() == head(teacher).argmax(-1).tolist()  # most likely first
    ar_k, kl_k = losses.recalibration_terms(head, rec, top, targets, temperature=2.0, chunk_size=3)
    torch.testing.assert_close((ar_k, kl_k), (ar, kl))
    torch.testing.assert_close(torch.autograd.grad(ar_k + kl_k, rec)[0], grad)
    ar_4, kl_4 = losses.recalibration_terms(head, rec, losses.TopK.of(head, teacher, 4, 2.0), targets,
                                            temperature=2.0, chunk_size=3)
    torch.testing.assert_close(ar_4, ar)  # L_ar never reads the teacher's distribution
    assert 0 < float(kl_4.detach()) < float(kl.detach())
    assert losses.top1_agreement(head, rec, top) == losses.top1_agreement(head, rec, teacher)
