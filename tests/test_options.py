"""Recipe options through the whole engine, each with its effect checked: the learning-rate
schedules and warm-up, epochs and max_steps, answer_input = "embeddings", new_positions = false."""

from __future__ import annotations

import json
import math

import pytest
import torch

from genrecal_cli.recipe import recipe_from_dict
from genrecal_cli.commands.distill import distill

from .test_train import Recorder, _recipe


def _finetune(tmp_path, **stage):
    raw = _recipe(tmp_path, stages=("finetune",), steps=6).to_dict()
    raw.pop("teacher")
    raw["data"]["shapes_size"] = 16
    raw["stages"]["finetune"].update(stage)
    raw["stages"]["finetune"] = {k: v for k, v in raw["stages"]["finetune"].items() if v is not None}
    rec = Recorder()
    distill(recipe_from_dict(raw), reporter=rec)
    return rec.rows


def _expected(schedule: str, lr=1e-3, end=1e-4, warmup=2, total=6) -> list[float]:
    """The schedule written out independently: warm-up k/warmup, then from lr to lr_end over the
    remaining updates, the last update at lr_end."""
    out = []
    for s in range(total):
        if s < warmup:
            out.append(lr * (s + 1) / warmup)
            continue
        t = (s - warmup) / (total - warmup - 1)
        out.append({"constant": lr, "linear": lr + (end - lr) * t,
                    "cosine": end + (lr - end) * (1 + math.cos(math.pi * t)) / 2}[schedule])
    return out


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedules_with_warmup_give_the_written_rates(tmp_path, schedule):
    rows = _finetune(tmp_path, schedule=schedule, warmup_steps=2)
    assert [m["lr"] for _, _, m in rows] == pytest.approx(_expected(schedule), rel=1e-9)


def test_epochs_count_passes_and_max_steps_caps_them(tmp_path):
    # 16 items, batch 4: 4 updates an epoch; 1.5 epochs -> 6 updates; max_steps 5 caps it
    rows = _finetune(tmp_path / "a", steps=None, epochs=1.5)
    assert [s for _, s, _ in rows] == [1, 2, 3, 4, 5, 6]
    rows = _finetune(tmp_path / "b", steps=None, epochs=1.5, max_steps=5)
    assert [s for _, s, _ in rows] == [1, 2, 3, 4, 5]
    assert json.loads((tmp_path / "b" / "finetune" / "meta.json").read_text())["total_steps"] == 5


def _spy_align(tmp_path, monkeypatch, **recalibrator):
    """One align step; what the Recalibrator and its rotary were given on their first call, and
    the `segment` of the student and teacher batches behind it."""
    from genrecal_cli.engine import objective
    from genrecal_cli.engine.recalibrator import Recalibrator, Rotary1D
    from genrecal_cli.engine.teacher import source

    seen = {}
    real_forward, real_rotary = Recalibrator.forward, Rotary1D.forward
    real_teacher, real_question = source.teacher_features, objective.student_question

    def forward(self, question, answer, **kw):
        seen.setdefault("call", dict(question=_copy(question), answer=_copy(answer), **kw))
        return real_forward(self, question, answer, **kw)

    def rotary(self, x, position_ids):
        seen.setdefault("positions", position_ids.clone())
        return real_rotary(self, x, position_ids)

    def teacher_features(teacher, batch, answer_input):
        seen.setdefault("teacher_segment", batch["segment"].clone())
        seen.setdefault("teacher_ids", batch["input_ids"].clone())
        return real_teacher(teacher, batch, answer_input)

    def student_question(z_s, sbatch):
        seen.setdefault("student_segment", sbatch["segment"].clone())
        return real_question(z_s, sbatch)

    monkeypatch.setattr(Recalibrator, "forward", forward)
    monkeypatch.setattr(Rotary1D, "forward", rotary)
    monkeypatch.setattr(source, "teacher_features", teacher_features)
    monkeypatch.setattr(objective, "student_question", student_question)
    raw = _recipe(tmp_path, stages=("align",), steps=1).to_dict()
    raw["recalibrator"] = recalibrator
    raw["train"]["probe_every"] = 0  # the first Recalibrator call is the training forward's
    distill(recipe_from_dict(raw), reporter=Recorder())
    return seen


def _copy(tokens):
    from genrecal_cli.engine.turns import Tokens

    return Tokens(tokens.x.detach().clone(), tokens.segment.clone(), tokens.pos.clone())


@pytest.mark.parametrize("answer_input", ["hidden", "embeddings"])
def test_answer_input_chooses_what_stands_for_the_teacher_answer(tmp_path, monkeypatch, tiny_pair, answer_input):
    """"embeddings": the Recalibrator's answer input is the teacher's input embeddings of its
    answer tokens; "hidden": the teacher's last hidden states there (something else)."""
    teacher, _ = tiny_pair
    seen = _spy_align(tmp_path, monkeypatch, answer_input=answer_input)
    answer = seen["call"]["answer"]
    # the answer's tokens: those of the teacher's answer segments, where they stand
    t_seg = seen["teacher_segment"]
    assert answer.mask.sum(1).tolist() == ((t_seg >= 0) & (t_seg % 2 == 1)).sum(1).tolist()
    ids = seen["teacher_ids"].gather(1, answer.pos)[answer.mask]
    assert torch.equal(t_seg.gather(1, answer.pos)[answer.mask], answer.segment[answer.mask])
    # the answer tokens are the embedding rows the input equals (embeddings) or not (hidden)
    table = teacher.input_embeddings.weight.detach()
    given = answer.x[answer.mask]
    nearest = (given[:, None, :] - table[None]).abs().amax(-1).min(1).values  # exact, unlike cdist
    if answer_input == "embeddings":
        assert float(nearest.max()) == 0.0
        assert torch.equal(given, table[ids])  # each its own token's row
    else:
        assert float(nearest.min()) > 1e-3


@pytest.mark.parametrize("new_positions", [True, False])
def test_new_positions_off_keeps_the_teacher_answer_positions(tmp_path, monkeypatch, new_positions):
    """Off, every token keeps its position in its own side's sequence (`pos`): the student's
    question tokens where they stand in the student's sequence, the teacher's answer tokens where
    they stand in the teacher's (not right after the student's question); on, 0..n-1."""
    seen = _spy_align(tmp_path, monkeypatch, new_positions=new_positions)
    positions, call = seen["positions"], seen["call"]
    s_seg, t_seg = seen["student_segment"].cpu(), seen["teacher_segment"].cpu()
    assert call["question"].mask.sum(1).tolist() == ((s_seg >= 0) & (s_seg % 2 == 0)).sum(1).tolist()
    n = positions.shape[1]
    contiguous = torch.arange(n)[None].expand_as(positions)
    if new_positions:
        assert torch.equal(positions.cpu(), contiguous)
        return
    for r in range(positions.shape[0]):
        # segment by segment: the student's positions for question segments, the teacher's for answers
        want = []
        for k in range(int(max(s_seg[r].max(), t_seg[r].max())) + 1):
            seg = s_seg[r] if k % 2 == 0 else t_seg[r]
            want += (seg == k).nonzero().flatten().tolist()
        assert positions[r, : len(want)].tolist() == want
        first = int((s_seg[r] == 0).sum())
        assert want[:first] == list(range(first))  # the student's first question segment from 0
    assert not torch.equal(positions.cpu(), contiguous)


def test_gradient_checkpointing_recomputes_the_student_layers_and_changes_no_result(tmp_path, monkeypatch):
    """train.gradient_checkpointing: the inside of every student decoder layer runs twice per
    training forward (forward, then again in backward), and the losses equal those of a run
    without it. (Counted on the layers' MLP: transformers wraps the layer's own forward.)"""
    from transformers.models.llama.modeling_llama import LlamaMLP

    calls = []
    real = LlamaMLP.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LlamaMLP, "forward", counting)
    runs = {}
    for on in (False, True):
        calls.clear()
        raw = _recipe(tmp_path / str(on), stages=("finetune",), steps=2).to_dict()
        raw.pop("teacher")
        raw["data"]["shapes_size"] = 8
        raw["train"].update(gradient_checkpointing=on, eval_items=0, probe_every=0)
        rec = Recorder()
        distill(recipe_from_dict(raw), reporter=rec)
        runs[on] = ([m["sft"] for _, _, m in rec.rows], len(calls))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6)
    assert runs[False][1] > 0 and runs[True][1] == 2 * runs[False][1]
