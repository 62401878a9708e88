"""The teacher-feature cache's storage: items cut out of a batch's teacher features, written in
shards, read back and joined into the same batch (fp32 exactly; bf16 and fp8 within stated
tolerances); resumable; refused while unfinished; a changed setup, a damaged shard or a flipped
byte named in one line; a resumed writer drops damaged shards; the weights digest sees values."""

from __future__ import annotations

import pytest
import torch

from genrecal_cli.engine.teacher.cache import (CacheReader, CacheWriter, complete, join_items, size_estimate, split_items,
                                      verify)
from genrecal_cli.engine.teacher import TeacherFeatures, take_rows
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
    rows = take_rows(z, (answer.pos - 1).clamp(min=0))[answer.mask]
    return TeacherFeatures(question, answer, rows, ids.gather(1, answer.pos)[answer.mask])


def _same(a: TeacherFeatures, b: TeacherFeatures, tol=0.0):
    for name in ("question", "answer"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x.segment, y.segment) and torch.equal(x.pos[x.mask], y.pos[y.mask])
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
    complete(tmp_path / "c", 5)
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
    complete(tmp_path / "c", 5)
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
    complete(tmp_path / "c", 5)
    _same(join_items(items), join_items(CacheReader(tmp_path / "c", FP).items(range(5))))
    with pytest.raises(DataError, match=r"holds a cache for another setup \(teacher\)"):
        CacheWriter(tmp_path / "c", {**FP, "teacher": "w2"})


def test_a_cache_for_another_setup_is_refused_naming_what_changed(tmp_path):
    writer = CacheWriter(tmp_path / "c", FP, storage="fp32")
    writer.add(0, split_items(_features(), True)[0])
    writer.flush()
    complete(tmp_path / "c", 1)
    with pytest.raises(DataError, match=r"written for another setup: teacher, max_length changed"):
        CacheReader(tmp_path / "c", {**FP, "teacher": "w2", "max_length": "512"})
    with pytest.raises(DataError, match=r"item 7 is not in the cache"):
        CacheReader(tmp_path / "c", FP).items([7])
    with pytest.raises(DataError, match=r"not a teacher-feature cache \(no index.json\)"):
        CacheReader(tmp_path)


def _written(folder, storage="bf16", finish=True):
    writer = CacheWriter(folder, FP, storage=storage, items_per_shard=2, command="genrecal teach r.toml")
    for index, item in enumerate(split_items(_features(), True)):
        writer.add(index, item)
    writer.flush()
    if finish:
        complete(folder, 5)
    return writer


def test_a_cut_or_missing_shard_is_named_in_one_line(tmp_path):
    _written(tmp_path / "c")
    shard = tmp_path / "c" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-40])
    reader = CacheReader(tmp_path / "c", FP)
    reader.items([0, 1])  # the other shards still read
    with pytest.raises(DataError) as err:
        reader.items([2])
    assert "shard-00001.safetensors: cache shard is cut short or corrupt" in str(err.value)
    assert "the index says" in str(err.value) and "genrecal teach --verify" in str(err.value)
    assert "\n" not in str(err.value)
    (tmp_path / "c" / "shard-00002.safetensors").unlink()
    with pytest.raises(DataError, match=r"shard-00002.safetensors: cache shard missing"):
        CacheReader(tmp_path / "c", FP).items([4])


def _overwrite_middle(path, data: bytes):
    """`data` written over the middle of the file's values (the file keeps its length)."""
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    at = header + (len(raw) - header) // 2 - len(data) // 2
    raw[at:at + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("what", ["random bytes", "bf16 NaNs"])
def test_a_flipped_byte_inside_a_shard_is_named_with_its_item(tmp_path, what):
    """256 bytes overwritten in the middle of a shard (its length kept): the item that holds them
    fails its checksum when first read, named with its shard; every other item still reads;
    `verify` names exactly that shard."""
    import os

    _written(tmp_path / "c")
    shard = tmp_path / "c" / "shard-00001.safetensors"
    _overwrite_middle(shard, os.urandom(256) if what == "random bytes" else b"\xc0\x7f" * 128)
    reader = CacheReader(tmp_path / "c", FP)
    failed = []
    for i in range(5):
        try:
            reader.items([i])
        except DataError as exc:
            failed.append(i)
            assert "shard-00001.safetensors: item" in str(exc) and "fails its checksum" in str(exc)
            assert "\n" not in str(exc)
    assert failed and set(failed) <= {2, 3}  # shard 1 holds items 2 and 3
    report = verify(tmp_path / "c")
    assert [line.split(":")[0] for line in report["damaged"]] == ["shard-00001.safetensors"]
    assert report["shards"] == 3 and report["items"] == 5 and report["complete"]["cached"] == 5


def test_changed_item_keys_or_an_appended_byte_are_named(tmp_path):
    import json

    _written(tmp_path / "c")
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    index["shards"][0]["items"] = [0, 9]  # the index and the shard disagree
    (tmp_path / "c" / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"shard-00000.safetensors: cache shard is corrupt \(its item keys"):
        CacheReader(tmp_path / "c", FP).items([0])
    shard = tmp_path / "c" / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes() + b"\0")
    with pytest.raises(DataError, match=r"shard-00002.safetensors: cache shard is cut short or corrupt \([\d,]+ bytes"):
        CacheReader(tmp_path / "c", FP).items([4])


def test_an_unfinished_cache_is_refused_with_the_command_that_finishes_it(tmp_path):
    _written(tmp_path / "c", finish=False)
    with pytest.raises(DataError) as err:
        CacheReader(tmp_path / "c", FP)
    assert "an unfinished cache (5 items written" in str(err.value)
    assert "run `genrecal teach r.toml` again to finish it" in str(err.value)
    assert verify(tmp_path / "c")["complete"] is None
    complete(tmp_path / "c", 6)
    assert CacheReader(tmp_path / "c", FP).where.keys() == set(range(5))
    assert verify(tmp_path / "c")["complete"] == {"items": 6, "cached": 5, "skipped": 1}


def test_a_resumed_writer_removes_damaged_shards_and_writes_their_items_again(tmp_path):
    import os

    _written(tmp_path / "c")
    _overwrite_middle(tmp_path / "c" / "shard-00001.safetensors", os.urandom(256))
    (tmp_path / "c" / "shard-00002.safetensors").unlink()
    again = CacheWriter(tmp_path / "c", FP, storage="bf16", items_per_shard=2)
    damaged = again.check()
    assert [line.split(":")[0] for line in damaged] == ["shard-00001.safetensors", "shard-00002.safetensors"]
    assert "fail their checksum" in damaged[0] and "missing" in damaged[1]
    assert again.done == {0, 1} and not (tmp_path / "c" / "shard-00001.safetensors").exists()
    items = split_items(_features(), True)
    for i in (2, 3, 4):
        again.add(i, items[i])
    again.flush()
    complete(tmp_path / "c", 5)
    assert not {"shard-00001.safetensors", "shard-00002.safetensors"} & {s["file"] for s in again.shards}  # new names
    assert verify(tmp_path / "c")["damaged"] == []
    _same(join_items(items), join_items(CacheReader(tmp_path / "c", FP).items(range(5))), tol=0.005)


def test_the_weights_digest_sees_a_retrained_tensor_not_a_copy(tmp_path):
    """weights_digest reads headers and three windows of every tensor: a tensor whose values all
    moved (retraining) changes it, as does a value inside a window; a copy of the same file
    elsewhere (another mtime) does not. A value between the windows does not: stated limit."""
    import shutil

    from safetensors.torch import save_file

    from genrecal_cli.engine.teacher.cache.fingerprint import SAMPLE, weights_digest

    a = tmp_path / "a"
    a.mkdir()
    w = {"big": torch.randn(4 * SAMPLE), "small": torch.randn(3)}
    save_file(w, str(a / "model.safetensors"))
    base = weights_digest(a)
    shutil.copytree(a, tmp_path / "copy")
    assert weights_digest(tmp_path / "copy") == base
    for change in ({"big": w["big"] + 1e-3}, {"small": w["small"] * 0.5}):
        save_file({**w, **change}, str(a / "model.safetensors"))
        assert weights_digest(a) != base, change.keys()
    between = w["big"].clone()
    between[SAMPLE // 4 + 100] += 1.0  # past the first window (SAMPLE bytes: SAMPLE / 4 floats), before the middle one
    save_file({**w, "big": between}, str(a / "model.safetensors"))
    assert weights_digest(a) == base


def test_hub_sources_are_fingerprinted_by_their_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from genrecal_cli.engine.teacher.cache import hub_commit

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "models--org--teacher" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    assert hub_commit("org/teacher", None, "model") == "a" * 40
    (refs / "main").write_text("b" * 40)  # the repo moved on: another commit
    assert hub_commit("org/teacher", None, "model") == "b" * 40
    assert hub_commit("org/teacher", "c" * 40, "model") == "c" * 40  # a pinned commit is itself
    with pytest.raises(DataError, match=r"org/data: not in this machine's hub cache"):
        hub_commit("org/data", None, "dataset")


def test_size_arithmetic():
    # 1,000 answer tokens, 4,000 question tokens, hidden 8192, bf16
    size = size_estimate(1000, 4000, 8192, "bf16")
    assert size["answer"] == 2 * 1000 * 8192 * 2 + 1000 * 12  # + segment, position, target (int32 each)
    assert size["question"] == 4000 * 8192 * 2 + 4000 * 8
    assert size_estimate(1000, 0, 8192, "fp8")["answer"] == 2 * 1000 * (8192 + 4) + 1000 * 12
    assert size_estimate(1000, 0, 8192, "bf16", top_k=32)["answer"] == 1000 * (8192 * 2 + 32 * 6) + 1000 * 12
    # an id-only cache with the top 32: 204 bytes an answer token, 1/160 of the rows' 32,780
    assert size_estimate(1000, 0, 8192, "bf16", top_k=32, answer_ids=True)["answer"] == 1000 * (32 * 6 + 12)


def test_cached_answer_ids_are_compared_with_the_rendered_ones():
    """The cache stores each answer's token ids: a changed id (another tokenizer or template,
    the same count) is refused naming the item and the token, not only a changed count."""
    from genrecal_cli.engine.teacher.cache import check_answers

    segment = torch.tensor([[0, 0, 1, 1, -1], [0, 1, 1, 1, -1]])
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 9, 10, 11, 0]])
    z = torch.randn(2, 5, 4)
    answer = select(z, segment, answer=True)
    cached = TeacherFeatures(select(z, segment, answer=False), answer, torch.zeros(5, 4), ids.gather(1, answer.pos)[answer.mask])
    check_answers(cached, {"segment": segment, "input_ids": ids}, [30, 31], "c")  # the same: passes
    other = ids.clone()
    other[1, 2] = 12
    with pytest.raises(DataError, match=r"c: item 31's answer token 1 is 10 in the cache but 12 as rendered now"):
        check_answers(cached, {"segment": segment, "input_ids": other}, [30, 31], "c")
    shorter = segment.clone()
    shorter[1, 3] = -1
    with pytest.raises(DataError, match=r"c: item 31 has 3 answer tokens in the cache but 2 as rendered now"):
        check_answers(cached, {"segment": shorter, "input_ids": ids}, [30, 31], "c")


def test_a_cache_written_before_top_k_and_ids_still_reads(tmp_path):
    """A cache from before issue 30 (no `rows` or `answers` in its index, target ids as int64, its
    checksums over those bytes) reads as rows and answer features, the same batch as before.
    Break: the reader's defaults for the missing keys."""
    import json

    from safetensors.torch import load_file, save_file

    from genrecal_cli.engine.teacher.cache.format import base_name, is_data, item_checksum, shard_offsets

    folder = tmp_path / "c"
    _written(folder, storage="fp32")
    index = json.loads((folder / "index.json").read_text())
    for shard in index["shards"]:  # as the writer of before stored it
        path = folder / shard["file"]
        tensors = load_file(str(path))
        tensors["targets"] = tensors["targets"].long()
        offsets = shard_offsets(tensors)
        tensors["checksum"] = torch.tensor([item_checksum(key, {
            n: t[offsets[base_name(n)][k]:offsets[base_name(n)][k + 1]] for n, t in tensors.items() if is_data(n)})
            for k, key in enumerate(tensors["index"].tolist())], dtype=torch.long)
        save_file(tensors, str(path))
        shard["bytes"] = path.stat().st_size
    del index["rows"], index["answers"]
    (folder / "index.json").write_text(json.dumps(index))
    reader = CacheReader(folder, FP)
    assert (reader.rows, reader.answers) == ("full", "features")
    assert verify(folder)["damaged"] == [] and verify(folder)["form"] == {"storage": "fp32", "rows": "full",
                                                                          "answers": "features"}
    _same(join_items(split_items(_features(), True)), join_items(reader.items(range(5))))
