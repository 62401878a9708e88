"""The teacher-feature cache's storage: items cut out of a batch's teacher features, written in
shards, read back and joined into the same batch (fp32 exactly; bf16 and fp8 within stated
tolerances); resumable; a changed setup or a damaged shard named in one line."""

from __future__ import annotations

import pytest
import torch

from genrecal_cli.engine.cache import CacheReader, CacheWriter, join_items, size_estimate, split_items
from genrecal_cli.engine.teacher import TeacherFeatures, gather_rows
from genrecal_cli.engine.turns import select
from genrecal_cli.errors import DataError

FP = {"teacher": "w1", "tokenizer": "t1", "data": "d1", "max_length": "256"}


def _features(seed=0, batch=5, d=8) -> TeacherFeatures:
    """Teacher features as teacher_features cuts them, from random z and 1-2 turns per item."""
    g = torch.Generator().manual_seed(seed)
    segs = []
    for b in range(batch):
        turns = 1 + b % 2
        seg = []
        for k in range(turns):
            seg += [2 * k] * (3 + b) + [2 * k + 1] * (2 + (b + k) % 3)
        segs.append(seg)
    length = max(map(len, segs)) + 2
    segment = torch.full((batch, length), -1)
    for b, seg in enumerate(segs):
        segment[b, : len(seg)] = torch.tensor(seg)
    # hidden states span magnitudes (outlier tokens in the hundreds, quiet ones near zero)
    z = torch.randn(batch, length, d, generator=g) * torch.logspace(-3, 3, length)[None, :, None]
    ids = torch.randint(0, 50, (batch, length), generator=g)
    question, answer = select(z, segment, answer=False), select(z, segment, answer=True)
    rows = gather_rows(z, (answer.pos - 1).clamp(min=0))[answer.mask]
    return TeacherFeatures(question, answer, rows, ids.gather(1, answer.pos)[answer.mask])


def _same(a: TeacherFeatures, b: TeacherFeatures, tol=0.0):
    for name in ("question", "answer"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x.turn, y.turn) and torch.equal(x.pos[x.mask], y.pos[y.mask])
        err = (x.x[x.mask] - y.x[y.mask]).norm(dim=-1) / x.x[x.mask].norm(dim=-1)
        assert err.max() <= tol, (name, err.max())
    assert torch.equal(a.targets, b.targets)
    assert ((a.rows - b.rows).norm(dim=-1) / a.rows.norm(dim=-1)).max() <= tol


@pytest.mark.parametrize("storage,tol", [("fp32", 0.0), ("bf16", 0.005), ("fp8", 0.07)])
def test_items_written_in_shards_read_back_as_the_same_batch(tmp_path, storage, tol):
    tf = _features()
    writer = CacheWriter(tmp_path / "c", FP, storage=storage, items_per_shard=2)
    for index, item in zip([10, 11, 12, 13, 14], split_items(tf, with_question=True)):
        writer.add(index, item)
    writer.flush()
    assert len(writer.shards) == 3  # 2 + 2 + 1
    reader = CacheReader(tmp_path / "c", FP)
    _same(tf, join_items(reader.items([10, 11, 12, 13, 14])), tol)
    # another order is another batch: item 12 first
    again = join_items(reader.items([12, 10]))
    assert torch.equal(again.targets[: int(again.answer.mask[0].sum())], split_items(tf, True)[2].targets)


def test_without_question_features_the_question_is_empty(tmp_path):
    tf = _features()
    writer = CacheWriter(tmp_path / "c", FP, storage="fp32", with_question=False)
    for index, item in enumerate(split_items(tf, with_question=False)):
        writer.add(index, item)
    writer.flush()
    back = join_items(CacheReader(tmp_path / "c").items(range(5)))
    assert not back.question.mask.any() and torch.equal(back.rows, tf.rows)


def test_a_resumed_writer_keeps_finished_shards_and_writes_only_the_rest(tmp_path):
    items = split_items(_features(), with_question=True)
    first = CacheWriter(tmp_path / "c", FP, storage="fp32", items_per_shard=2)
    for index in range(3):  # killed after one finished shard and one pending item
        first.add(index, items[index])
    again = CacheWriter(tmp_path / "c", FP, storage="fp32", items_per_shard=2)
    assert again.done == {0, 1}
    for index in range(5):
        if index not in again.done:
            again.add(index, items[index])
    again.flush()
    _same(join_items(items), join_items(CacheReader(tmp_path / "c", FP).items(range(5))))
    with pytest.raises(DataError, match=r"holds a cache for another setup \(teacher\)"):
        CacheWriter(tmp_path / "c", {**FP, "teacher": "w2"})


def test_a_cache_for_another_setup_is_refused_naming_what_changed(tmp_path):
    writer = CacheWriter(tmp_path / "c", FP, storage="fp32")
    writer.add(0, split_items(_features(), True)[0])
    writer.flush()
    with pytest.raises(DataError, match=r"written for another setup: teacher, max_length changed"):
        CacheReader(tmp_path / "c", {**FP, "teacher": "w2", "max_length": "512"})
    with pytest.raises(DataError, match=r"item 7 is not in the cache"):
        CacheReader(tmp_path / "c", FP).items([7])
    with pytest.raises(DataError, match=r"not a teacher-feature cache \(no index.json\)"):
        CacheReader(tmp_path)


def test_a_cut_or_missing_shard_is_named_in_one_line(tmp_path):
    writer = CacheWriter(tmp_path / "c", FP, storage="bf16", items_per_shard=2)
    for index, item in enumerate(split_items(_features(), True)):
        writer.add(index, item)
    writer.flush()
    shard = tmp_path / "c" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-40])
    reader = CacheReader(tmp_path / "c", FP)
    reader.items([0, 1])  # the other shards still read
    with pytest.raises(DataError) as err:
        reader.items([2])
    assert "shard-00001.safetensors: cache shard is cut short or corrupt" in str(err.value)
    assert "\n" not in str(err.value)
    (tmp_path / "c" / "shard-00002.safetensors").unlink()
    with pytest.raises(DataError, match=r"shard-00002.safetensors: cache shard missing"):
        CacheReader(tmp_path / "c", FP).items([4])


def test_size_arithmetic():
    # 1,000 answer tokens, 4,000 question tokens, hidden 8192, bf16
    size = size_estimate(1000, 4000, 8192, "bf16")
    assert size["answer"] == 2 * 1000 * 8192 * 2 + 1000 * 16
    assert size["question"] == 4000 * 8192 * 2 + 4000 * 8
    assert size_estimate(1000, 0, 8192, "fp8")["answer"] == 2 * 1000 * (8192 + 4) + 1000 * 16
