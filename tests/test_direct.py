"""The engine against direct computations on two-turn items, not against another run of itself
(a comparison of two runs passes when both carry the same mistake). Each test names the break
it catches; each was watched failing under that break."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from genrecal_cli.data.loader import Collator, PairDataset, model_inputs
from genrecal_cli.data.sources import load_split
from genrecal_cli.errors import GenrecalError
from genrecal_cli.recipe import DataSpec, LossSpec, recipe_from_dict


def _two_turns(i: int) -> dict:
    return {"messages": [
        {"role": "user", "content": f"Is {i} an even number?"},
        {"role": "assistant", "content": "yes" if i % 2 == 0 else "no"},
        {"role": "user", "content": f"And what is {i} plus one?"},
        {"role": "assistant", "content": f"It is {i + 1}, an {'odd' if i % 2 == 0 else 'even'} number."},
    ]}


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def two_turn_batch(tmp_path, tiny_pair):
    """Three two-turn items (answers of different lengths), collated for both sides."""
    teacher, student = tiny_pair
    spec = DataSpec(source=_write(tmp_path / "chat.jsonl", [_two_turns(i) for i in (3, 10, 7)]), max_length=256)
    sides = {"teacher": teacher.processor, "student": student.processor}
    ds = PairDataset(load_split(spec, "train"), spec, sides)
    return Collator(sides)([ds[i] for i in range(3)])


def _genrecal(tiny_pair):
    from genrecal_cli.engine.objective import StudentAndRecalibrator
    from genrecal_cli.engine.recalibrator import Recalibrator

    teacher, student = tiny_pair
    torch.manual_seed(0)
    rec = Recalibrator(teacher.hidden_size, student.text_config, student.decoder_layer_class)
    return StudentAndRecalibrator(student.model, rec, LossSpec()).eval()


def _recording(module) -> list[dict]:
    """Every call of the module's Recalibrator, its arguments kept."""
    calls, real = [], module.recalibrator.forward

    def record(question, answer, **kw):
        calls.append({"question": question, "answer": answer, **kw})
        return real(question, answer, **kw)

    module.recalibrator.forward = record
    return calls


def test_the_recalibrator_reads_every_question_turn_of_the_student(tiny_pair, two_turn_batch):
    """Break: the objective's student_question keeps only the first turn's question."""
    from genrecal_cli.engine.teacher import head_fn, teacher_features

    teacher, _ = tiny_pair
    module = _genrecal(tiny_pair)
    sbatch = two_turn_batch["student"]
    calls = _recording(module)
    with torch.no_grad():
        module(sbatch, teacher_features(teacher, two_turn_batch["teacher"], "hidden"), head_fn(teacher.head),
               stage="distill")
        z_s = module.student.model(**model_inputs(sbatch)).last_hidden_state
    question = next(c["question"] for c in calls if not c.get("question_from_teacher"))
    seg = sbatch["segment"]
    for i in range(len(seg)):
        where = ((seg[i] >= 0) & (seg[i] % 2 == 0)).nonzero()[:, 0]  # every system/user token, both turns
        assert set(seg[i, where].tolist()) == {0, 2}
        n = len(where)
        assert int(question.mask[i].sum()) == n
        assert question.segment[i, :n].tolist() == seg[i, where].tolist()
        assert question.pos[i, :n].tolist() == where.tolist()
        assert torch.allclose(question.x[i, :n], z_s[i, where], atol=1e-6)


def test_l_sft_is_the_cross_entropy_over_every_labelled_token(tiny_pair, two_turn_batch):
    """Break: the objective's L_sft covers only the last answer turn (labels unchanged)."""
    module = _genrecal(tiny_pair)
    sbatch = two_turn_batch["student"]
    labels = sbatch["labels"]
    labelled = labels[:, 1:] != -100
    # the collator labels both answers of every item
    assert all(set(sbatch["segment"][i, 1:][labelled[i]].tolist()) == {1, 3} for i in range(len(labels)))
    with torch.no_grad():
        out = module(sbatch, None, None, stage="finetune")
        logits = module.student(**model_inputs(sbatch)).logits.float()
    direct = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert set(out.terms) == {"sft"}
    assert out.terms["sft"].item() == pytest.approx(direct.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(direct.item(), rel=1e-5)  # weight 1


def test_the_probes_other_item_is_the_neighbour(tiny_pair, two_turn_batch):
    """Break: the reliance probe's "another item's features" are the item's own."""
    from genrecal_cli.engine.probe import reliance
    from genrecal_cli.engine.teacher import head_fn, teacher_features

    teacher, _ = tiny_pair
    module = _genrecal(tiny_pair)
    calls = _recording(module)
    tf = teacher_features(teacher, two_turn_batch["teacher"], "hidden")
    out = reliance(module, two_turn_batch["student"], tf, head_fn(teacher.head))
    real, other, zero = (c["question"] for c in calls)
    assert torch.equal(other.x, real.x.roll(1, 0)) and torch.equal(other.segment, real.segment.roll(1, 0))
    assert not torch.equal(other.x, real.x)  # another item: other features
    assert torch.equal(zero.x, torch.zeros_like(real.x)) and torch.equal(zero.segment, real.segment)
    assert all(c["answer"] is tf.answer for c in calls)  # the teacher's answers stay the item's own
    assert out["rely_first_ar_real"] != out["rely_first_ar_other"]


def test_two_micro_batches_of_two_reach_the_weights_of_one_batch_of_four(tmp_path, tiny_pair):
    """Break: the optimizer steps after every micro-batch, ignoring grad_accum.

    Every answer has the same tokens, so each micro-batch's mean loss weighs its tokens as the
    batch of four does; the sampler's permutation does not depend on the batch size."""
    from genrecal_cli.commands.distill import distill

    from .test_train import Recorder, _student_weights

    rows = [{"question": f"Is the number {i} a number?", "answer": "yes"} for i in range(8)]
    data = _write(tmp_path / "yes.jsonl", rows)
    trained = {}
    for batch_size, accum in ((4, 1), (2, 2)):
        out = tmp_path / f"b{batch_size}x{accum}"
        raw = {"student": {"path": "zoo:tiny-student"}, "data": {"source": data, "max_length": 128},
               "stages": {"finetune": {"steps": 2, "batch_size": batch_size, "grad_accum": accum, "lr": 1e-3,
                                       "lr_end": 1e-3}},
               "train": {"output_dir": str(out), "eval_items": 0, "log_every": 1}}
        rec = Recorder()
        distill(recipe_from_dict(raw), reporter=rec)
        assert [s for _, s, _ in rec.rows] == [1, 2]
        trained[accum] = _student_weights(out / "student")
    before = tiny_pair[1].model.state_dict()
    moved = max((trained[1][k] - before[k]).abs().max().item() for k in before)
    apart = max((trained[1][k] - trained[2][k]).abs().max().item() for k in before)
    assert moved > 1e-4  # two AdamW steps of 1e-3 moved the weights
    assert apart < moved / 100, (apart, moved)


def test_alignment_statistics_of_a_batch_computed_by_hand():
    """The display's token-alignment statistics on a batch whose answers are split by hand (break:
    top-1 agreement compares the teacher's rows with themselves)."""
    from types import SimpleNamespace

    from genrecal_cli.data.render import Answer
    from genrecal_cli.engine.probe import alignment_stats

    # "red ball": the teacher cuts "red"|" ball", the student "r"|"ed"|" ball"; each side's
    # end-of-turn markup follows the plain answer (span 0..8) and is not counted.
    # Boundaries: teacher {0, 3, 4, 8}, student {0, 1, 3, 4, 8}: 4 shared of 5 -> 0.8.
    batch = {
        "teacher": {"segment": torch.tensor([[0, 0, 1, 1, 1]]),
                    "answers": [[Answer("red ball<end>", [(0, 3), (3, 8), (8, 13)], (0, 8))]]},
        "student": {"segment": torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1]]),
                    "answers": [[Answer("red ball</s>", [(0, 1), (1, 3), (3, 8), (8, 12)], (0, 8))]]},
    }
    head = lambda x: x[:, :3]  # noqa: E731 - logits are the first three features
    teacher_rows = torch.tensor([[5.0, 0, 0, 9], [0, 5.0, 0, 9], [0, 0, 5.0, 9], [5.0, 0, 0, 9]])  # top-1 0, 1, 2, 0
    recalibrated = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0]])  # top-1 0, 1, 0, 1
    stats = alignment_stats(batch, SimpleNamespace(rows=teacher_rows), recalibrated, head)
    assert stats == {"teacher_q_tokens": 2.0, "student_q_tokens": 3.0, "teacher_a_tokens": 3.0,
                     "student_a_tokens": 4.0, "a_token_ratio": 0.75, "boundary_agreement": pytest.approx(0.8),
                     "top1": 0.5}
    assert "top1" not in alignment_stats(batch, SimpleNamespace(rows=teacher_rows), None, head)


def test_the_objective_from_the_teachers_top_k_is_the_objective_from_its_rows(tiny_pair, two_turn_batch):
    """The stages take a top-K teacher (issue 30) as they take its rows: with K the whole
    vocabulary every term is the same; loss.kd / loss.uld, which need the rows, refuse it.
    Break: the guard before kd / uld removed (kd then fails on the top K without saying why)."""
    from dataclasses import replace

    from genrecal_cli.engine import losses
    from genrecal_cli.engine.teacher import head_fn, teacher_features

    teacher, _ = tiny_pair
    module = _genrecal(tiny_pair)
    head = head_fn(teacher.head)
    features = teacher_features(teacher, two_turn_batch["teacher"], "hidden")
    vocab = teacher.head.weight.shape[0]
    top = replace(features, rows=losses.TopK.of(head, features.rows, vocab))
    with torch.no_grad():
        for stage in ("align", "distill"):
            want = module(two_turn_batch["student"], features, head, stage=stage).terms
            got = module(two_turn_batch["student"], top, head, stage=stage).terms
            assert set(got) == set(want) and {"ar", "kl"} <= set(got)
            for name in want:
                assert float(got[name]) == pytest.approx(float(want[name]), rel=1e-5, abs=1e-6), name
        module.weights = replace(module.weights, kd=1.0)
        with pytest.raises(GenrecalError, match="loss.kd and loss.uld score the teacher's full rows"):
            module(two_turn_batch["student"], top, head, stage="distill")
