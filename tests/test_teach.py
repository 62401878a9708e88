"""`genrecal teach` and `[teacher] cache`: one teacher pass written to a cache, read by align
and distill instead of the teacher; from an fp32 cache a student reaches the weights the online
teacher gives it; the cache is refused for another setup; a killed writer resumes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from genrecal_cli.engine.teacher.cache import CacheReader
from genrecal_cli.errors import DataError
from genrecal_cli.recipe import recipe_from_dict
from genrecal_cli.commands.distill import distill

from .conftest import run_cli


def _raw(tmp_path, out="online", cache=None, **data):
    raw = {
        "teacher": {"path": "zoo:tiny-teacher", **({"cache": str(cache)} if cache else {})},
        "student": {"path": "zoo:tiny-student"},
        "data": {"shapes_size": 12, "max_length": 256, **data},
        "stages": {"align": {"steps": 2, "batch_size": 4, "lr": 1e-3}, "distill": {"steps": 2, "batch_size": 4, "lr": 1e-3}},
        "train": {"output_dir": str(tmp_path / out), "log_every": 1, "eval_items": 0, "probe_every": 1},
    }
    return raw


def _toml(tmp_path, raw) -> str:
    def value(v):
        return json.dumps(v)

    lines = []
    for table, body in raw.items():
        if table == "stages":
            for name, st in body.items():
                lines.append(f"[stages.{name}]")
                lines += [f"{k} = {value(v)}" for k, v in st.items()]
            continue
        lines.append(f"[{table}]")
        lines += [f"{k} = {value(v)}" for k, v in body.items()]
    path = tmp_path / "r.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_pair):
    tmp = tmp_path_factory.mktemp("teach")
    recipe = _toml(tmp, _raw(tmp, cache=tmp / "cache"))
    out = run_cli("teach", recipe, "--storage", "fp32", "--batch-size", "5")
    assert out.returncode == 0, out.stderr
    return tmp, out


def test_teach_states_the_size_and_writes_every_item(written):
    tmp, out = written
    assert "12 items x" in out.stdout and "in fp32: answers" in out.stdout and "question features" in out.stdout
    reader = CacheReader(tmp / "cache")
    assert sorted(reader.where) == list(range(12)) and reader.storage == "fp32" and reader.with_question
    index = json.loads((tmp / "cache" / "index.json").read_text())
    assert {"the teacher's weights", "the data", "data.max_length"} <= set(index["fingerprint"])


class Recorder:
    """Keeps every step's loss terms."""

    def __init__(self):
        self.rows = []

    def stage_start(self, *a):
        pass

    def step(self, stage, step, metrics):
        self.rows.append((stage, step, {k: metrics[k] for k in ("ar", "kl", "reg", "sft") if k in metrics}))

    def stage_end(self, *a):
        pass

    def note(self, text, style=""):
        pass


def _run(tmp, out, cache=None, **data):
    rec = Recorder()
    raw = _raw(tmp, out=out, cache=cache)
    raw["data"].update(data)
    result = distill(recipe_from_dict(raw), reporter=rec)
    return result, rec.rows


@pytest.fixture(scope="module")
def online(written):
    tmp, _ = written
    return _run(tmp, "online")


def test_a_student_from_an_fp32_cache_reaches_the_online_weights(written, online):
    tmp, _ = written
    (result, rows), (cached, cached_rows) = online, _run(tmp, "cached", tmp / "cache", num_workers=1)
    assert [(s, n) for s, n, _ in rows] == [("align", 1), ("align", 2), ("distill", 1), ("distill", 2)]
    for (_, _, a), (_, _, b) in zip(rows, cached_rows):  # L_ar, L_kl, L_reg (and L_sft) of every step
        assert a.keys() == b.keys() and {"ar", "kl", "reg"} <= a.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
    a = load_file(str(result.student_dir / "model.safetensors"))
    b = load_file(str(cached.student_dir / "model.safetensors"))
    before = load_file(str(result.output_dir / "align" / "student" / "model.safetensors"))
    assert any(not torch.equal(a[k], before[k]) for k in a)  # distill trained the student
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)  # float noise: the teacher saw other batches


def test_a_bf16_cache_gives_the_loss_terms_within_a_thousandth(written, online):
    tmp, _ = written
    recipe = _toml(tmp, _raw(tmp, cache=tmp / "cache-bf16"))
    out = run_cli("teach", recipe, "--storage", "bf16")
    assert out.returncode == 0, out.stderr
    _, rows = online
    _, bf16_rows = _run(tmp, "bf16", tmp / "cache-bf16")
    for (_, _, a), (_, _, b) in zip(rows, bf16_rows):
        for k in ("ar", "kl", "reg"):
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-5), k  # measured: at most 2.9e-4


def test_a_cache_for_other_data_or_length_is_refused_naming_it(written):
    tmp, _ = written
    with pytest.raises(DataError, match=r"another setup: data.max_length changed"):
        distill(recipe_from_dict({**_raw(tmp, out="x", cache=tmp / "cache"),
                                  "data": {"shapes_size": 12, "max_length": 200}}))
    with pytest.raises(DataError, match=r"another setup: the data changed"):
        distill(recipe_from_dict({**_raw(tmp, out="y", cache=tmp / "cache"),
                                  "data": {"shapes_size": 14, "max_length": 256}}))
    other_seed = _raw(tmp, out="z", cache=tmp / "cache")
    other_seed["train"]["seed"] = 5  # the built-in shapes are drawn with the run's seed
    with pytest.raises(DataError, match=r"another setup: the data changed"):
        distill(recipe_from_dict(other_seed))


def test_dry_run_states_the_size_and_writes_nothing(tmp_path, tiny_pair):
    recipe = _toml(tmp_path, _raw(tmp_path, cache=tmp_path / "c"))
    out = run_cli("teach", recipe, "--dry-run", "--no-question")
    assert out.returncode == 0, out.stderr
    assert "12 items x" in out.stdout and "in bf16: answers" in out.stdout and "L_reg off" in out.stdout
    assert "data preflight: 12 items" in " ".join(out.stdout.split())  # the data preflight, both sides
    assert not (tmp_path / "c").exists()
    table = out.stdout[out.stdout.index("in each form"):]
    for form in ("fp32", "bf16", "fp8", "full", "topk:32"):
        assert form in table, form
    assert "ids" not in table  # answer_input = "hidden": no id-only form
    bad = run_cli("teach", _toml(tmp_path, _raw(tmp_path)))
    assert bad.returncode == 1 and "set teacher.cache in the recipe or give --output DIR" in bad.stderr


def test_a_killed_teach_resumes_and_a_cache_without_questions_turns_reg_off(tmp_path, tiny_pair):
    import os
    import signal
    import subprocess
    import sys
    import time

    from .conftest import ROOT

    raw = _raw(tmp_path, cache=tmp_path / "c")
    raw["data"]["shapes_size"] = 160
    recipe = _toml(tmp_path, raw)
    args = [sys.executable, "-m", "genrecal_cli", "teach", recipe, "--storage", "fp32", "--no-question",
            "--batch-size", "4", "--shard-items", "4"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (tmp_path / "c" / "shard-00001.safetensors").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # killed part-way: the cache is refused as unfinished, with the command that finishes it
    with pytest.raises(DataError, match=r"an unfinished cache \(\d+ items written, then its writer stopped\); "
                                        r"run `genrecal teach .*r.toml --storage fp32 --no-question .*` again"):
        CacheReader(tmp_path / "c")
    kept = {i for s in json.loads((tmp_path / "c" / "index.json").read_text())["shards"] for i in s["items"]}
    assert 8 <= len(kept) < 160  # finished shards kept
    again = run_cli("teach", recipe, "--storage", "fp32", "--no-question", "--batch-size", "4", "--shard-items", "4")
    assert again.returncode == 0, again.stderr
    assert f"resuming: {len(kept)} of 160 items already in the cache" in again.stdout
    reader = CacheReader(tmp_path / "c")
    assert sorted(reader.where) == list(range(160)) and not reader.with_question
    assert len(json.loads((tmp_path / "c" / "index.json").read_text())["shards"]) == 40  # none written twice
    whole = tmp_path / "whole"
    fresh = run_cli("teach", recipe, "--output", str(whole), "--storage", "fp32", "--no-question", "--batch-size", "4")
    assert fresh.returncode == 0, fresh.stderr
    for a, b in zip(reader.items(range(160)), CacheReader(whole).items(range(160))):
        assert torch.equal(a.answer, b.answer) and torch.equal(a.rows, b.rows) and torch.equal(a.targets, b.targets)
    raw["data"]["shapes_size"] = 160
    rec = Recorder()
    distill(recipe_from_dict({**raw, "train": {**raw["train"], "output_dir": str(tmp_path / "run")}}), reporter=rec)
    assert rec.rows and all("reg" not in terms and "ar" in terms for _, _, terms in rec.rows)


def test_a_cache_with_a_stream_is_refused_in_the_recipe(tmp_path):
    from genrecal_cli.errors import RecipeError

    raw = _raw(tmp_path, cache=tmp_path / "c")
    raw["data"]["streaming"] = True
    with pytest.raises(RecipeError, match=r"teacher.cache: the cache finds items by their row number"):
        recipe_from_dict(raw)


def test_writers_of_several_processes_merge_and_an_unfinished_cache_is_refused(tmp_path):
    """Two writers (processes 0 and 1 of 2) each write their own shards and partial index; until
    the main process merges them the cache is refused as unfinished; a later writer on one
    process counts both parts as done and its merge leaves one index."""
    from genrecal_cli.engine.teacher.cache import CacheWriter, ItemFeatures, complete, merge_index

    def item(i):
        return ItemFeatures(answer=torch.full((2, 4), float(i)), answer_turn=torch.ones(2, dtype=torch.long),
                            answer_pos=torch.arange(2), rows=torch.full((2, 4), -float(i)), targets=torch.tensor([i, i]))

    fp = {"the data": "x"}
    writers = [CacheWriter(tmp_path, fp, storage="fp32", with_question=False, items_per_shard=2, part=r, parts=2)
               for r in (0, 1)]
    for i in range(6):
        writers[i % 2].add(i, item(i))
    for w in writers:
        w.flush()
    assert sorted(p.name for p in tmp_path.glob("index*")) == ["index-r0.json", "index-r1.json"]
    with pytest.raises(DataError, match=r"an unfinished cache .* run the same `genrecal teach` again"):
        CacheReader(tmp_path)
    again = CacheWriter(tmp_path, fp, storage="fp32", with_question=False, items_per_shard=2)
    assert again.done == set(range(6))  # a resumed writer on one process: both parts are done
    again.add(6, item(6))
    again.flush()
    merge_index(tmp_path)
    assert [p.name for p in tmp_path.glob("index*")] == ["index.json"]
    with pytest.raises(DataError, match=r"an unfinished cache \(7 items written"):
        CacheReader(tmp_path)  # merged, but no completion record yet
    complete(tmp_path, 7)
    reader = CacheReader(tmp_path, fp)
    assert sorted(reader.where) == list(range(7))
    assert [float(it.answer[0, 0]) for it in reader.items(range(7))] == [float(i) for i in range(7)]
    assert len({s for s in reader.where.values()}) == 5  # r0: 2 shards, r1: 2 shards, the resumed one: 1


@pytest.mark.parametrize("placement", ["replicate", "shard"])
def test_two_ranks_write_the_cache_one_process_writes(written, tmp_path, placement):
    """`genrecal teach` under torchrun: each rank computes its share (every item once across the
    ranks), writes its shards, the index is merged; the features equal the one-process cache's.
    Sharded (FSDP2), each rank holds half the teacher and a rank whose share ran out runs the
    forward with the other on a stand-in batch (12 items in batches of 5: 2 batches and 1)."""
    from .test_parallel import _assert_two_ranks, _torchrun

    src, _ = written
    raw = _raw(src, cache=tmp_path / "cache")
    raw["parallel"] = {"teacher": placement}
    recipe = _toml(tmp_path, raw)
    done = _torchrun(["teach", recipe, "--storage", "fp32", "--batch-size", "5", "--shard-items", "2"],
                     record=tmp_path / "rec", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_two_ranks(tmp_path / "rec")
    assert "written by 2 processes" in done.stdout
    seen = [{int(x) for x in (tmp_path / "rec" / f"items-{r}.txt").read_text().split()} for r in (0, 1)]
    assert seen[0] | seen[1] == set(range(12)) and not seen[0] & seen[1] and seen[0] and seen[1]
    assert sorted(p.name for p in (tmp_path / "cache").glob("index*")) == ["index.json"]
    files = {p.name for p in (tmp_path / "cache").glob("shard-*")}
    assert any(f.startswith("shard-r0-") for f in files) and any(f.startswith("shard-r1-") for f in files)
    if placement == "shard":
        shares = [json.loads((tmp_path / "rec" / f"teacher-{r}.json").read_text()) for r in (0, 1)]
        assert [s["inner"] for s in shares] == pytest.approx([0.5, 0.5], abs=0.02) and shares[1]["loaded_on_meta"]
    ours, one = CacheReader(tmp_path / "cache"), CacheReader(src / "cache")
    assert sorted(ours.where) == list(range(12))
    for a, b in zip(ours.items(range(12)), one.items(range(12))):
        for k, v in b.tensors().items():
            torch.testing.assert_close(a.tensors()[k], v, rtol=1e-4, atol=1e-5)  # other batch compositions: float noise


def test_loader_workers_read_the_cache_and_carry_its_errors(written, monkeypatch):
    """Training batches arrive with their cached features read and checked by the loader worker
    that collated them (the loop never reads the cache itself, except for the probe's fixed batch);
    a shard that went missing stops the run with the cache's one line, not a worker traceback."""
    import os
    import shutil

    tmp, _ = written
    readers = tmp / "readers.txt"  # the process of every cache read (the workers are forked: patched too)
    real = CacheReader.items

    def recorded(self, indices):
        with open(readers, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(self, indices)

    monkeypatch.setattr(CacheReader, "items", recorded)
    raw = _raw(tmp, out="workers", cache=tmp / "cache")
    raw["data"]["num_workers"] = 1
    raw["train"]["probe_every"] = 0
    rec = Recorder()
    distill(recipe_from_dict(raw), reporter=rec)
    assert [s for s, _, _ in rec.rows] == ["align", "align", "distill", "distill"]
    pids = set(readers.read_text().split())
    assert pids and str(os.getpid()) not in pids, "the training loop read the cache itself"
    broken = tmp / "cache-broken"
    shutil.copytree(tmp / "cache", broken)
    first = json.loads((broken / "index.json").read_text())["shards"][0]["file"]
    (broken / first).unlink()
    raw = _raw(tmp, out="broken", cache=broken)
    raw["data"]["num_workers"] = 1
    raw["train"]["probe_every"] = 0
    with pytest.raises(DataError, match=rf"{first}: cache shard missing") as caught:
        distill(recipe_from_dict(raw))
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)


def test_a_flipped_byte_is_refused_by_distill_named_by_verify_and_rewritten_by_teach(written, tmp_path):
    """256 bytes overwritten in the middle of a shard of a written cache: `distill` from it stops
    in one line naming the shard and the item (the check runs in the loader worker), `genrecal
    teach --verify` names the shard and exits 1, and the same `genrecal teach` rewrites it."""
    import os
    import shutil

    from .test_cache import _overwrite_middle

    src, _ = written
    cache = tmp_path / "cache"
    shutil.copytree(src / "cache", cache)
    intact = run_cli("teach", "--verify", str(cache))
    assert intact.returncode == 0, intact.stderr
    assert "12 items" in intact.stdout and "complete: 12 items, 12 cached, 0 skipped" in intact.stdout
    shards = json.loads((cache / "index.json").read_text())["shards"]
    _overwrite_middle(cache / shards[0]["file"], os.urandom(256))
    raw = _raw(src, out="flipped", cache=cache)
    raw["data"]["num_workers"] = 1
    raw["train"]["probe_every"] = 0
    with pytest.raises(DataError) as caught:
        distill(recipe_from_dict(raw))
    assert f"{shards[0]['file']}: item" in str(caught.value) and "fails its checksum" in str(caught.value)
    assert "\n" not in str(caught.value)
    found = run_cli("teach", "--verify", str(cache))
    assert found.returncode == 1 and f"damaged {shards[0]['file']}: " in found.stdout
    assert found.stderr.strip().count("\n") == 0 and "1 damaged shard(s)" in found.stderr
    redo = run_cli("teach", _toml(tmp_path, _raw(src, cache=cache)), "--storage", "fp32", "--batch-size", "5")
    assert redo.returncode == 0, redo.stderr
    assert f"damaged shard {shards[0]['file']}" in redo.stdout.replace("\n", " ")
    assert run_cli("teach", "--verify", str(cache)).returncode == 0
    for a, b in zip(CacheReader(cache).items(range(12)), CacheReader(src / "cache").items(range(12))):
        assert torch.equal(a.rows, b.rows) and torch.equal(a.targets, b.targets)


def test_a_top_k_cache_keeps_k_ids_per_answer_token_and_trains_like_the_rows(written, online, tiny_pair):
    """`genrecal teach --rows topk:K` (issue 30): per answer token the teacher's K most likely ids
    (int32) and their log-probabilities (float16), no rows; with K the whole vocabulary, align and
    distill from it give the online run's loss terms; it depends on loss.temperature, a cache of
    rows does not. Break: kl_topk's tail, the float16 log-probabilities, the fingerprint."""
    tmp, _ = written
    vocab = tiny_pair[0].head.weight.shape[0]
    bad = run_cli("teach", _toml(tmp, _raw(tmp, cache=tmp / "bad")), "--rows", "top:8")
    assert bad.returncode == 1 and "--rows top:8: expected `full` or `topk:K`" in bad.stderr
    for k in (vocab, 8):
        recipe = _toml(tmp, _raw(tmp, cache=tmp / f"cache-top{k}"))
        out = run_cli("teach", recipe, "--storage", "fp32", "--rows", f"topk:{k}", "--batch-size", "5")
        assert out.returncode == 0, out.stderr
        assert f"(rows topk:{k}, answers features)" in out.stdout
    index = json.loads((tmp / "cache-top8" / "index.json").read_text())
    assert index["rows"] == "topk:8" and "loss.temperature" in index["fingerprint"]
    checked = run_cli("teach", "--verify", str(tmp / "cache-top8"))  # every item's checksum, the form named
    assert checked.returncode == 0 and "rows topk:8, answers features); complete" in checked.stdout
    import os
    import shutil

    from .test_cache import _overwrite_middle

    shutil.copytree(tmp / "cache-top8", tmp / "top8-damaged")
    _overwrite_middle(tmp / "top8-damaged" / index["shards"][0]["file"], os.urandom(64))  # ids or log-probabilities
    found = run_cli("teach", "--verify", str(tmp / "top8-damaged"))
    assert found.returncode == 1 and f"damaged {index['shards'][0]['file']}: " in found.stdout
    shard = load_file(str(tmp / "cache-top8" / index["shards"][0]["file"]))
    assert "rows" not in shard and shard["top_ids"].dtype == torch.int32 and shard["top_ids"].shape[1] == 8
    assert shard["top_logprobs"].dtype == torch.float16 and bool((shard["top_logprobs"] <= 0).all())
    assert bool((shard["top_logprobs"][:, :-1] >= shard["top_logprobs"][:, 1:]).all())  # most likely first
    _, rows = online
    _, every = _run(tmp, "top-all", tmp / f"cache-top{vocab}")
    _, top8 = _run(tmp, "top-8", tmp / "cache-top8")
    for (_, _, a), (_, _, b), (stage, n, c) in zip(rows, every, top8):
        assert a.keys() == b.keys() == c.keys()
        for name in ("ar", "kl", "reg"):
            assert b[name] == pytest.approx(a[name], rel=2e-3, abs=1e-5), name  # float16 log-probabilities
        if (stage, n) == ("align", 1):  # the same Recalibrator: the same L_ar; L_kl over 9 bins is less
            assert c["ar"] == pytest.approx(a["ar"], rel=1e-5) and c["kl"] < a["kl"]
    raw = _raw(tmp, out="hotter", cache=tmp / "cache-top8")
    raw["loss"] = {"temperature": 2.0}
    with pytest.raises(DataError, match="loss.temperature changed"):
        distill(recipe_from_dict(raw))
    raw = _raw(tmp, out="hotter-rows", cache=tmp / "cache")
    raw["loss"] = {"temperature": 2.0}
    raw["stages"] = {"align": {"steps": 1, "batch_size": 4, "lr": 1e-3}}
    distill(recipe_from_dict(raw))  # a cache of rows serves any temperature


def test_an_id_only_cache_keeps_no_answer_features_and_trains_like_the_embeddings(written, tiny_pair):
    """Under answer_input = "embeddings" `genrecal teach` keeps no answer inputs by default (issue
    30): per answer token its id only, looked up in the teacher's input embeddings when read;
    align and distill from it give the online run's loss terms. `--answers ids` is refused for
    "hidden" in one line. Break: with_answer_embeddings' order, the ids' lookup table."""
    tmp, _ = written

    def raw(out, cache=None):
        r = _raw(tmp, out=out, cache=cache)
        r["recalibrator"] = {"answer_input": "embeddings"}
        return r

    refused = run_cli("teach", _toml(tmp, _raw(tmp, cache=tmp / "no")), "--answers", "ids")
    assert refused.returncode == 1 and "recalibrator.answer_input is 'hidden'" in refused.stderr
    assert refused.stderr.strip().count("\n") == 0 and not (tmp / "no").exists()
    out = run_cli("teach", _toml(tmp, raw("w", tmp / "ids")), "--storage", "fp32", "--batch-size", "5")
    assert out.returncode == 0, out.stderr
    assert "answers ids" in out.stdout
    index = json.loads((tmp / "ids" / "index.json").read_text())
    assert index["answers"] == "ids" and index["fingerprint"]["recalibrator.answer_input"] == "embeddings"
    shard = load_file(str(tmp / "ids" / index["shards"][0]["file"]))
    assert "answer" not in shard and "rows" in shard and shard["targets"].dtype == torch.int32
    checked = run_cli("teach", "--verify", str(tmp / "ids"))
    assert checked.returncode == 0 and "(fp32, rows full, answers ids); complete: 12 items" in checked.stdout
    online, cached = Recorder(), Recorder()
    distill(recipe_from_dict(raw("emb-online")), reporter=online)
    distill(recipe_from_dict(raw("emb-ids", tmp / "ids")), reporter=cached)
    assert [(s, n) for s, n, _ in cached.rows] == [("align", 1), ("align", 2), ("distill", 1), ("distill", 2)]
    for (_, _, a), (_, _, b) in zip(online.rows, cached.rows):
        assert a.keys() == b.keys() and {"ar", "kl", "reg"} <= a.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
    with pytest.raises(DataError, match="recalibrator.answer_input changed"):
        distill(recipe_from_dict(_raw(tmp, out="hidden-from-ids", cache=tmp / "ids")))
    worker = raw("emb-ids-worker", tmp / "ids")  # read in a loader worker: it gets the reader, not the table
    worker["data"]["num_workers"] = 1
    worker["stages"] = {"align": {"steps": 1, "batch_size": 4, "lr": 1e-3}}
    in_worker = Recorder()
    distill(recipe_from_dict(worker), reporter=in_worker)
    assert in_worker.rows[0][2]["ar"] == pytest.approx(online.rows[0][2]["ar"], rel=1e-5)
