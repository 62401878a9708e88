"""Several processes for real: 2 gloo ranks on CPU through torchrun (ACCELERATE_USE_CPU=1, one
thread each), checked against one process. Every test asserts that 2 ranks ran."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import ROOT, run_cli

ENTRY = Path(__file__).with_name("cli_entry.py")


def _recipe(path: Path, out: Path, stages: str, **train) -> Path:
    lines = ['[teacher]\npath = "zoo:tiny-teacher"\n[student]\npath = "zoo:tiny-student"\n[data]\nshapes_size = 32\n', stages,
             f'[train]\noutput_dir = "{out}"\nlog_every = 1\neval_items = 0\n']
    lines += [f"{k} = {v}\n" for k, v in train.items()]
    path.write_text("".join(lines))
    return path


def _torchrun(args, env=None, record=None, timeout=420, wait=True):
    torchrun = Path(sys.executable).with_name("torchrun")
    full_env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200", **(env or {})}
    if record is not None:
        full_env["GENRECAL_TEST_RECORD"] = str(record)
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), str(ENTRY), *args]
    proc = subprocess.Popen(cmd, env=full_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    if not wait:
        return proc
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_all(proc)  # a hung collective leaves no orphans
        out, err = proc.communicate()
        raise AssertionError(f"2-rank run still going after {timeout} s (hung?):\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _free_port() -> int:
    """A TCP port nobody listens on now (tests may run in parallel: pytest -n)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and both ranks. torchrun starts each rank in a session of its own, so
    killing torchrun's process group would leave the ranks running."""
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children first found first."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _assert_two_ranks(record: Path) -> None:
    views = [json.loads((record / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [v["process_index"] for v in views] == [0, 1]
    assert all(v["num_processes"] == 2 and "MULTI_CPU" in v["distributed_type"] for v in views), views


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _one_then_two(tmp_path, stages: str, batch: int, student: str | None = None) -> tuple[list[dict], list[dict]]:
    """The same recipe on 1 process x batch `batch` and on 2 ranks x batch / 2 (stages: a recipe
    text with {b} for the batch size; `student` another zoo student); each run's metrics rows."""
    one = _recipe(tmp_path / "one.toml", tmp_path / "one", stages.format(b=batch))
    two = _recipe(tmp_path / "two.toml", tmp_path / "two", stages.format(b=batch // 2))
    if student is not None:
        for path in (one, two):
            path.write_text(path.read_text().replace('"zoo:tiny-student"', f'"{student}"'))
    single = run_cli("distill", str(one), env={"OMP_NUM_THREADS": "1"}, timeout=420)
    assert single.returncode == 0, single.stderr[-2000:]
    double = _torchrun(["distill", str(two)], record=tmp_path / "rec")
    assert double.returncode == 0, double.stderr[-3000:]
    _assert_two_ranks(tmp_path / "rec")
    return _rows(tmp_path / "one"), _rows(tmp_path / "two")


def test_two_ranks_follow_one_process_update_by_update(tmp_path):
    """The same recipe on 2 x batch 8 and 1 x batch 16: the same learning rate at every update
    (warm-up and decay included) and the same loss curve within a stated tolerance."""
    stages = '[stages.distill]\nsteps = 6\nwarmup_steps = 2\nlr = 5e-4\nlr_end = 5e-5\nbatch_size = {b}\n'
    a, b = _one_then_two(tmp_path, stages, 16)
    assert [r["processes"] for r in a] == [1] * 6 and [r["processes"] for r in b] == [2] * 6
    assert {r["global_batch"] for r in a} == {r["global_batch"] for r in b} == {16}
    lrs = [r["lr"] for r in a]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 5e-4, 3.5e-4, 2e-4, 5e-5])
    assert [r["lr"] for r in b] == lrs
    # The ranks see the 16 items of the one-process batch, 8 each; their loss is the mean of two
    # 8-item means, not one 16-item token mean, so the curves agree closely but not exactly (seen: within 0.1%; allowed: 0.5%).
    for ra, rb in zip(a, b):
        for term in ("ar", "kl", "reg", "sft"):
            assert rb[term] == pytest.approx(ra[term], rel=5e-3, abs=1e-3), (ra["step"], term, ra[term], rb[term])
    meta = json.loads((tmp_path / "two" / "distill" / "meta.json").read_text())
    assert meta["processes"] == 2 and meta["global_batch"] == 16


def test_one_epoch_sees_every_item_once_across_ranks(tmp_path):
    """36 items, batch 4 x 2 ranks: 4 full global batches and a last one of 4 items dealt 2 + 2;
    each item is encoded exactly once across the two ranks."""
    recipe = _recipe(tmp_path / "r.toml", tmp_path / "out", "[stages.finetune]\nepochs = 1\nbatch_size = 4\n")
    recipe.write_text(recipe.read_text().replace("shapes_size = 32", "shapes_size = 36").replace("eval_items = 0", "eval_items = 5"))
    done = _torchrun(["distill", str(recipe)], record=tmp_path / "rec")
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_two_ranks(tmp_path / "rec")
    seen = {r: [int(x) for x in (tmp_path / "rec" / f"items-{r}.txt").read_text().split()] for r in (0, 1)}
    assert len(seen[0]) == len(seen[1]) == 18
    assert sorted(seen[0] + seen[1]) == list(range(36))
    assert [r["step"] for r in _rows(tmp_path / "out")] == [1, 2, 3, 4, 5]
    # the accuracy table: 5 validation items answered 3 + 2 by the two ranks, gathered
    accuracy = json.loads((tmp_path / "out" / "student" / "genrecal.json").read_text())["accuracy"]
    assert accuracy["student before"]["n"] == accuracy["student after"]["n"] == 5
    assert "accuracy on the validation split" in done.stdout
    # the run's header and plan, once (rank 0), with the number of processes
    assert done.stdout.count("processes 2: global batch = batch per process x accum x 2") == 1
    assert done.stdout.count("finetune: 5 updates of 8 items (batch_size 4 x grad_accum 1 x 2 processes)") == 1


def test_a_nan_on_one_rank_stops_every_rank_with_one_message(tmp_path):
    recipe = _recipe(tmp_path / "r.toml", tmp_path / "out", "[stages.finetune]\nsteps = 4\nbatch_size = 2\n")
    done = _torchrun(["distill", str(recipe)], record=tmp_path / "rec", env={"GENRECAL_TEST_NAN": "1:2"}, timeout=300)
    _assert_two_ranks(tmp_path / "rec")
    assert done.returncode != 0
    message = "finetune: loss became non-finite at step 2 on process 1"
    assert done.stderr.count(message) == 1, done.stderr[-3000:]  # both ranks stopped, the line printed once
    assert "Traceback" not in done.stderr.split("error:")[0][-500:]
    assert [r["step"] for r in _rows(tmp_path / "out")] == [1]


@pytest.mark.parametrize("workers", [0, 1])
def test_an_error_on_one_rank_stops_both_at_once_with_one_message(tmp_path, workers):
    """Rank 1 alone meets an unreadable row (in its loader worker, carried out; or in the
    process itself): both ranks stop at that micro-batch, nobody waits in a collective, the
    message is printed once (by rank 1), and the run exits 1 quickly."""
    stages = f"[stages.distill]\nsteps = 6\nbatch_size = 2\n"
    recipe = _recipe(tmp_path / "r.toml", tmp_path / "out", stages)
    recipe.write_text(recipe.read_text().replace("shapes_size = 32\n", f"shapes_size = 32\nnum_workers = {workers}\n"))
    started = time.time()
    done = _torchrun(["distill", str(recipe)], record=tmp_path / "rec", env={"GENRECAL_TEST_FAIL": "1:5"}, timeout=300)
    _assert_two_ranks(tmp_path / "rec")
    assert done.returncode != 0
    assert done.stderr.count("injected: row") == 1, done.stderr[-3000:]
    assert "error: process 1: injected: row" in done.stderr
    # genrecal's line comes first; what follows it is torchrun's own report of a failed child
    # (its traceback and the ranks' exit codes), which the ranks cannot turn off
    before = done.stderr.split("Traceback (most recent call last)")[0]
    # rank 0 stopped by agreement: not by a broken connection, nor by torchrun's SIGTERM
    assert "internal error" not in done.stderr and "stopped by" not in done.stderr, before[-2000:]
    assert "error: process 1: injected: row" in before and "ChildFailedError" not in before
    rows = _rows(tmp_path / "out") if (tmp_path / "out" / "metrics.jsonl").exists() else []
    assert len(rows) <= 3  # stopped at the micro-batch holding its 5th item (batch 2: update 3 at the latest)
    assert time.time() - started < 240


def test_kill_9_on_two_ranks_then_resume_matches_an_uninterrupted_run(tmp_path):
    stages = "[stages.align]\nsteps = 2\nbatch_size = 2\n[stages.distill]\nsteps = 8\nbatch_size = 2\n"
    straight = _recipe(tmp_path / "s.toml", tmp_path / "straight", stages, save_every=2)
    broken = _recipe(tmp_path / "b.toml", tmp_path / "broken", stages, save_every=2)
    done = _torchrun(["distill", str(straight)])
    assert done.returncode == 0, done.stderr[-3000:]
    proc = _torchrun(["distill", str(broken)], wait=False)
    mark = tmp_path / "broken" / "checkpoints" / "distill-0000004"
    deadline = time.time() + 300
    while not mark.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    ranks = _descendants(proc.pid)
    _kill_all(proc)
    proc.wait()
    assert mark.exists() and len(ranks) >= 2
    time.sleep(0.5)
    assert not [pid for pid in ranks if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]  # none still running
    resumed = _torchrun(["distill", str(broken), "--resume"], record=tmp_path / "rec")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_two_ranks(tmp_path / "rec")
    assert "resuming after distill step" in resumed.stdout
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "broken" / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("n", "batch", "procs"), [(36, 4, 2), (37, 4, 2), (33, 4, 3), (25, 4, 3), (16, 4, 1), (5, 8, 2)])
def test_rank_batches_deal_every_item_once_per_epoch(n, batch, procs):
    """Pure check of the dealing: each epoch's items appear once across the ranks (all of them,
    but for fewer than `procs` left over), ranks have the same number of micro-batches, and
    another epoch is another order."""
    from genrecal_cli.data.sampler import RankBatches

    ranks = [RankBatches(n, batch, procs, r, seed=3) for r in range(procs)]
    assert len({len(r) for r in ranks}) == 1
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == len(set(seen)) == n - ranks[0].dropped and ranks[0].dropped < procs
    assert all(0 < len(b) <= batch for r in ranks for b in r)
    first = [b for b in ranks[0]]
    ranks[0].set_epoch(1)
    assert [b for b in ranks[0]] != first
    ranks[0].set_epoch(0, skip=1)
    assert [b for b in ranks[0]] == first[1:]


def test_too_few_items_for_the_processes_is_a_clear_error():
    from genrecal_cli.data.sampler import RankBatches
    from genrecal_cli.errors import DataError

    with pytest.raises(DataError, match="3 usable training item.s. cannot give each of 4 processes one"):
        RankBatches(3, 2, 4, 0, seed=0)


# The sharding tests compare against one replicated run of the three stages (2 ranks, DDP).
SHARD_STAGES = ("[stages.align]\nsteps = 2\nbatch_size = 4\n[stages.distill]\nsteps = 3\nbatch_size = 4\ngrad_accum = 2\n"
                "[stages.finetune]\nsteps = 2\nbatch_size = 4\n")


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    """Teacher replicated, student DDP: the reference every sharded run must equal."""
    tmp = tmp_path_factory.mktemp("replicated")
    recipe = _recipe(tmp / "rep.toml", tmp / "rep", SHARD_STAGES, save_every=2)
    done = _torchrun(["distill", str(recipe)], record=tmp / "rec")
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_two_ranks(tmp / "rec")
    return tmp / "rep"


def _same_run(reference: Path, other: Path, rel: float = 1e-4) -> None:
    """Every logged loss term of `other` equals the reference's, and so does the exported student."""
    from safetensors.torch import load_file

    a, b = _rows(reference), _rows(other)
    assert [(r["stage"], r["step"]) for r in a] == [(r["stage"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        for term in ("ar", "kl", "reg", "sft", "top1"):
            if term in ra:
                assert rb[term] == pytest.approx(ra[term], rel=rel, abs=1e-6), (ra["stage"], ra["step"], term)
    x = load_file(str(reference / "student" / "model.safetensors"))
    y = load_file(str(other / "student" / "model.safetensors"))
    assert x.keys() == y.keys()
    moved = [k for k in x if not torch.equal(x[k], load_file(str(reference / "align" / "student" / "model.safetensors"))[k])]
    assert moved  # the comparison is about weights that trained
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=1e-5, atol=1e-6)


def _shares(record: Path, what: str) -> list[dict]:
    return [json.loads((record / f"{what}-{r}.json").read_text()) for r in (0, 1)]


def test_a_sharded_teacher_holds_half_on_each_rank_and_trains_like_a_replicated_one(tmp_path, replicated):
    """[parallel] teacher = "shard" (FSDP2 over 2 gloo ranks): each rank holds about half of the
    teacher's inner model and the whole LM head; only rank 0 read the teacher's weights (rank 1
    built it on the meta device and received its shard); every logged loss and the final student
    equal the replicated run's; the teacher's accuracy row (the sharded teacher generating on both
    ranks in step, each its share) has every answer the whole teacher gives in this one process."""
    from genrecal_cli.data.formats import detect, text_of, to_conversation
    from genrecal_cli.data.sources import open_image
    from genrecal_cli.engine.accuracy import accuracy as greedy, generate_answers
    from genrecal_cli.models import load_vlm
    from genrecal_cli.recipe import load_recipe
    from genrecal_cli.commands.distill import resolve

    sharded = _recipe(tmp_path / "shard.toml", tmp_path / "shard", SHARD_STAGES + '[parallel]\nteacher = "shard"\n',
                      save_every=2)
    sharded.write_text(sharded.read_text().replace("eval_items = 0", "eval_items = 3"))
    done = _torchrun(["distill", str(sharded)], record=tmp_path / "rec", env={"GENRECAL_TEST_SIDE": str(tmp_path / "side")})
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_two_ranks(tmp_path / "rec")
    shares = _shares(tmp_path / "rec", "teacher")
    assert all(0.45 < s["inner"] < 0.55 and s["head"] == 1.0 for s in shares), shares
    assert [s["loaded_on_meta"] for s in shares] == [False, True]
    _same_run(replicated, tmp_path / "shard")
    accuracy = json.loads((tmp_path / "shard" / "student" / "genrecal.json").read_text())["accuracy"]
    assert accuracy["student after"]["n"] == 3 and "skipped" not in done.stdout
    recipe = load_recipe(sharded)
    inputs = resolve(recipe)
    teacher = load_vlm(inputs.teacher)
    whole = greedy(teacher, inputs.validation, spec=recipe.data, score=inputs.score).to_dict()
    assert accuracy["teacher"] == json.loads(json.dumps(whole)) and whole["n"] == 3
    # the answers themselves: the first generation on each rank is the teacher's (items 0, 2 / 1)
    fmt = detect(inputs.validation.column_names, recipe.data)
    prompts = [to_conversation(inputs.validation[i], fmt, recipe.data, i).prompt_and_reference()[0] for i in range(3)]
    images = [[open_image(v) for v in p.images] for p in prompts]
    direct = [[text_of(p.messages[-1]), a] for p, a in zip(prompts, generate_answers(teacher, prompts, images))]
    firsts = [json.loads((tmp_path / "side" / f"side-{r}.jsonl").read_text().splitlines()[0]) for r in (0, 1)]
    assert [f["fn"] for f in firsts] == ["generate_answers"] * 2
    assert firsts[0]["answers"] == [direct[0], direct[2]] and firsts[1]["answers"] == [direct[1]]


def test_a_sharded_student_trains_like_ddp_and_exports_a_plain_folder(tmp_path, replicated):
    """[parallel] student = "shard" with the teacher sharded too: each rank holds about half of the
    student and of the Recalibrator; every loss and the exported student equal the DDP run's; a
    mid-stage checkpoint is a torch.distributed.checkpoint folder with one file per rank; the
    export is a plain folder that loads with from_pretrained in this (another) process."""
    from transformers import AutoModelForImageTextToText

    both = '[parallel]\nteacher = "shard"\nstudent = "shard"\n'
    recipe = _recipe(tmp_path / "s.toml", tmp_path / "shard", SHARD_STAGES + both, save_every=2)
    recipe.write_text(recipe.read_text().replace("eval_items = 0", "eval_items = 3"))
    done = _torchrun(["distill", str(recipe)], record=tmp_path / "rec")
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_two_ranks(tmp_path / "rec")
    shares = _shares(tmp_path / "rec", "student")
    assert all(0.45 < s["student"] < 0.55 and 0.45 < s["recalibrator"] < 0.55 for s in shares), shares
    _same_run(replicated, tmp_path / "shard")
    state = tmp_path / "shard" / "checkpoints" / "distill-0000002"
    assert sorted(p.name for p in (state / "state").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (state / "optimizer.pt").exists() and not (state / "student").exists()
    assert json.loads((state / "meta.json").read_text())["sharded"] is True
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "shard" / "student", use_safetensors=True)
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())
    accuracy = json.loads((tmp_path / "shard" / "student" / "genrecal.json").read_text())["accuracy"]
    assert accuracy["student after"]["n"] == 3


def test_kill_9_under_sharding_then_resume_matches_the_uninterrupted_run(tmp_path, replicated):
    """Both models sharded: kill -9 after the distill checkpoint at step 2, resume from the
    sharded checkpoint on 2 ranks; the result equals the reference run's."""
    both = '[parallel]\nteacher = "shard"\nstudent = "shard"\n'
    recipe = _recipe(tmp_path / "b.toml", tmp_path / "broken", SHARD_STAGES + both, save_every=2)
    # optimizer steps: align 1-2, distill 3-5; both ranks die inside distill's third update
    proc = _torchrun(["distill", str(recipe)], wait=False, env={"GENRECAL_TEST_SIGNAL": "SIGKILL:5"})
    proc.communicate(timeout=420)
    assert proc.returncode != 0
    mark = tmp_path / "broken" / "checkpoints" / "distill-0000002"
    assert mark.exists() and not (tmp_path / "broken" / "distill").exists()
    resumed = _torchrun(["distill", str(recipe), "--resume"], record=tmp_path / "rec")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_two_ranks(tmp_path / "rec")
    assert "resuming after distill step 2/3" in resumed.stdout
    _same_run(replicated, tmp_path / "broken")


def test_both_models_sharded_in_bf16_train_all_three_stages(tmp_path):
    """precision = "bf16" with the teacher and the student sharded: every stage runs on 2 ranks,
    every loss is finite and falls or holds, and the export is the student's own dtype (fp32)."""
    both = '[parallel]\nteacher = "shard"\nstudent = "shard"\n'
    stages = ("[stages.align]\nsteps = 2\nbatch_size = 4\n[stages.distill]\nsteps = 2\nbatch_size = 4\n"
              "[stages.finetune]\nsteps = 2\nbatch_size = 4\n")
    recipe = _recipe(tmp_path / "bf16.toml", tmp_path / "out", stages + both, precision='"bf16"', probe_every=2)
    done = _torchrun(["distill", str(recipe)], record=tmp_path / "rec")
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_two_ranks(tmp_path / "rec")
    rows = _rows(tmp_path / "out")
    assert [(r["stage"], r["step"]) for r in rows] == [(s, k) for s in ("align", "distill", "finetune") for k in (1, 2)]
    assert all(math.isfinite(r["loss"]) for r in rows)
    probed = [r for r in rows if "rely_first_ar_real" in r]  # the reliance probe ran on the sharded modules
    assert [(r["stage"], r["step"]) for r in probed] == [("align", 2), ("distill", 2)]
    assert all(math.isfinite(r["rely_first_ar_real"]) for r in probed)
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "out" / "student" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float32}


def test_hybrid_sharding_with_groups_of_one_replicates_the_teacher(tmp_path, replicated):
    """parallel.shard_group = 1 on 2 ranks: a (2 x 1) mesh, so each rank holds the whole teacher
    and student (replicated across the groups) and trains like the reference."""
    hybrid = '[parallel]\nteacher = "shard"\nstudent = "shard"\nshard_group = 1\n'
    recipe = _recipe(tmp_path / "h.toml", tmp_path / "hybrid", SHARD_STAGES + hybrid, save_every=2)
    done = _torchrun(["distill", str(recipe)], record=tmp_path / "rec")
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_two_ranks(tmp_path / "rec")
    assert all(s["inner"] == 1.0 for s in _shares(tmp_path / "rec", "teacher"))
    assert all(s["student"] == 1.0 for s in _shares(tmp_path / "rec", "student"))
    _same_run(replicated, tmp_path / "hybrid")


def test_a_sharded_teacher_does_not_hang_when_only_one_rank_has_an_image(tmp_path):
    """Two items, one with an image and one text-only, batch 1 on each of 2 ranks: every micro-
    batch has the vision tower's work on one rank only. The rank without an image still takes
    part in the sharded vision blocks' all-gathers, so the run ends (it would wait forever)."""
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    rows = [{"image": "red.png", "question": "What colour is the square?", "answer": "red"},
            {"image": None, "question": "What is two plus two?", "answer": "four"}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stages = "[stages.align]\nsteps = 2\nbatch_size = 1\n[stages.distill]\nsteps = 2\nbatch_size = 1\n"
    recipe = _recipe(tmp_path / "r.toml", tmp_path / "out", stages + '[parallel]\nteacher = "shard"\n', probe_every=0)
    recipe.write_text(recipe.read_text().replace("shapes_size = 32", f'source = "{tmp_path / "mixed.jsonl"}"'))
    done = _torchrun(["distill", str(recipe)], record=tmp_path / "rec", timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_two_ranks(tmp_path / "rec")
    seen = {r: (tmp_path / "rec" / f"items-{r}.txt").read_text().split() for r in (0, 1)}
    assert sorted(seen[0][:1] + seen[1][:1]) == ["0", "1"]  # the first micro-batch: one item each
    assert [r["step"] for r in _rows(tmp_path / "out")] == [1, 2, 1, 2]


def test_rows_skipped_on_either_rank_in_every_epoch_and_stage_are_reported_once(tmp_path):
    """Two rows name a missing image. Over two stages of two epochs each, on 2 ranks, they are met
    several times, on either rank; the run's report counts each once, with its reason, and the
    items each rank encoded show that both ranks met them."""
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    rows = [{"image": "gone.png" if i in (2, 5) else "red.png", "question": f"What colour is square {i}?",
             "answer": "red"} for i in range(8)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stages = "".join(f"[stages.{s}]\nsteps = 4\nbatch_size = 2\n" for s in ("align", "distill"))
    recipe = _recipe(tmp_path / "r.toml", tmp_path / "out", stages, probe_every=0)
    recipe.write_text(recipe.read_text().replace("shapes_size = 32", f'source = "{tmp_path / "d.jsonl"}"'))
    done = _torchrun(["distill", str(recipe)], record=tmp_path / "rec")
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_two_ranks(tmp_path / "rec")
    met = [[int(x) for x in (tmp_path / "rec" / f"items-{r}.txt").read_text().split()] for r in (0, 1)]
    assert sum(m.count(2) + m.count(5) for m in met) >= 4  # each bad row met in more than one epoch
    data = json.loads((tmp_path / "out" / "student" / "genrecal.json").read_text())["data"]
    assert data["skipped_items"] == 2 and data["skipped_by_reason"] == {"image file not found": 2}
    assert "skipped 2 of 8 items (2 image file not found)" in done.stdout


def test_answer_embeddings_from_a_sharded_teacher_equal_the_replicated_ones(tmp_path):
    """recalibrator.answer_input = "embeddings": the sharded teacher's input embeddings are
    gathered for the call; align's losses equal those of the replicated teacher."""
    stages = '[stages.align]\nsteps = 2\nbatch_size = 4\n[recalibrator]\nanswer_input = "embeddings"\n'
    runs = {}
    for placement in ("replicate", "shard"):
        recipe = _recipe(tmp_path / f"{placement}.toml", tmp_path / placement,
                         stages + f'[parallel]\nteacher = "{placement}"\n', probe_every=0)
        done = _torchrun(["distill", str(recipe)], record=tmp_path / f"rec-{placement}")
        assert done.returncode == 0, done.stderr[-3000:]
        _assert_two_ranks(tmp_path / f"rec-{placement}")
        runs[placement] = _rows(tmp_path / placement)
    assert len(runs["shard"]) == 2
    for a, b in zip(runs["replicate"], runs["shard"]):
        for term in ("ar", "kl", "reg"):
            assert b[term] == pytest.approx(a[term], rel=1e-5), (a["step"], term)


def test_a_shard_group_that_does_not_divide_the_processes_is_refused():
    from types import SimpleNamespace

    from genrecal_cli.engine.parallel import device_mesh
    from genrecal_cli.errors import GenrecalError

    with pytest.raises(GenrecalError, match="parallel.shard_group = 3 does not divide the 8 processes"):
        device_mesh(SimpleNamespace(num_processes=8, device=torch.device("cpu")), 3)


def test_sigterm_to_torchrun_stops_both_ranks_with_one_line_and_a_checkpoint(tmp_path):
    """What a user sees when a scheduler sends SIGTERM to torchrun: torchrun forwards it to every
    rank; the ranks agree to stop after the current update, save one checkpoint, print one
    "stopped:" line (process 0) and exit 143; torchrun itself then exits 1 with its own
    SignalException report (torchrun does not pass its ranks' exit codes on: README). The
    checkpoint resumes."""
    recipe = _recipe(tmp_path / "r.toml", tmp_path / "out", "[stages.distill]\nsteps = 40\nbatch_size = 2\n")
    proc = _torchrun(["distill", str(recipe)], record=tmp_path / "rec", wait=False)
    deadline = time.time() + 240
    while not ((tmp_path / "out" / "metrics.jsonl").exists() and _rows(tmp_path / "out")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        _kill_all(proc)
        raise
    _assert_two_ranks(tmp_path / "rec")
    assert proc.returncode == 1  # torchrun's own code (SignalException), not the ranks' 143
    assert err.count("stopped: distill: stopped by SIGTERM at step") == 1, err[-3000:]
    assert "exitcode  : 143" in err or "SignalException" in err
    saved = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir() if not p.name.startswith("."))
    assert len(saved) == 1 and saved[0].startswith("distill-")
    resumed = _torchrun(["distill", str(recipe), "--resume"], record=tmp_path / "rec2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in _rows(tmp_path / "out")][-1] == 40


def test_a_recipe_problem_of_the_world_size_is_refused_once_before_any_model_loads(tmp_path):
    """parallel.shard_group = 3 on 2 processes, with nothing sharded: refused as a recipe problem
    as soon as the number of processes is known (no model loaded, nothing written), printed
    once (by process 0), not once per rank."""
    recipe = _recipe(tmp_path / "r.toml", tmp_path / "out", "[stages.distill]\nsteps = 2\nbatch_size = 2\n"
                     "[parallel]\nshard_group = 3\n")
    done = _torchrun(["distill", str(recipe)], record=tmp_path / "rec", timeout=240)
    _assert_two_ranks(tmp_path / "rec")
    assert done.returncode != 0
    assert done.stderr.count("parallel.shard_group: 3 does not divide the 2 processes") == 1, done.stderr[-3000:]
    assert "Loading weights" not in done.stderr and not (tmp_path / "out").exists()


def test_resuming_a_checkpoint_under_another_student_placement_is_refused(tmp_path):
    from genrecal_cli.engine.checkpoint import Found
    from genrecal_cli.engine.stages import _check_layout
    from genrecal_cli.errors import GenrecalError

    layout = {"processes": 2, "global_batch": 8}
    found = Found("distill", tmp_path / "c", {**layout, "sharded": True})
    _check_layout(found, layout, True, "distill", "distill")  # the same placement: fine
    with pytest.raises(GenrecalError, match='written with parallel.student = "shard"; this run has "ddp"'):
        _check_layout(found, layout, False, "distill", "distill")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava", "internvl", "idefics3"])
def test_shard_units_are_every_decoder_layer_and_vision_block(family):
    """What a sharded teacher of each family is cut into: all its decoder layers, and blocks of
    its vision encoder; never the whole language model or vision encoder as one unit."""
    from genrecal_cli.engine.parallel import shard_units
    from genrecal_cli.models import load_vlm
    from genrecal_cli.world.zoo import resolve_source

    vlm = load_vlm(resolve_source(f"zoo:{family}"))
    units = shard_units(vlm.model.model)
    ids = {id(u) for u in units}
    assert all(id(layer) in ids for layer in vlm.language_model.layers)
    vision = [u for u in units if any(u is m for m in vlm.vision_encoder.modules())]
    assert vision, family
    assert id(vlm.language_model) not in ids and id(vlm.vision_encoder) not in ids


CHAT_STAGES = ("[stages.align]\nsteps = 2\nbatch_size = 2\n[stages.distill]\nsteps = 2\nbatch_size = 2\n"
               "[stages.finetune]\nsteps = 1\nbatch_size = 2\n")


def _chat_recipe(path: Path, out: Path, extra: str = "", data: str = "", train: str = "") -> Path:
    path.write_text('[teacher]\npath = "zoo:tiny-teacher"\n[student]\npath = "zoo:tiny-student"\n'
                    f'[data]\nsource = "chats"\nshapes_size = 24\nmax_length = 180\nnum_workers = 1\n{data}'
                    f'{CHAT_STAGES}{extra}[train]\noutput_dir = "{out}"\nlog_every = 1\neval_items = 0\n'
                    f'probe_every = 2\n{train}')
    return path


def test_conversations_on_two_ranks_sharded_equal_ddp_and_stream_in_bf16(tmp_path):
    """The built-in conversations (several turns, one or two images, some text-only, so a batch
    can mix items with and without images) on 2 ranks with a loader worker each: teacher and
    student sharded train exactly like replicated + DDP; and streamed in bf16, sharded, every
    stage runs with finite losses."""
    both = '[parallel]\nteacher = "shard"\nstudent = "shard"\n'
    for name, extra in (("ddp", ""), ("shard", both)):
        done = _torchrun(["distill", str(_chat_recipe(tmp_path / f"{name}.toml", tmp_path / name, extra))],
                         record=tmp_path / f"rec-{name}")
        assert done.returncode == 0, done.stderr[-3000:]
        _assert_two_ranks(tmp_path / f"rec-{name}")
    _same_run(tmp_path / "ddp", tmp_path / "shard")
    assert any(r.get("truncated_items", 0) > 0 for r in _rows(tmp_path / "ddp"))  # max_length 180 cuts some turns
    streamed = _chat_recipe(tmp_path / "bf16.toml", tmp_path / "bf16", both, data="streaming = true\n",
                            train='precision = "bf16"\n')
    done = _torchrun(["distill", str(streamed)], record=tmp_path / "rec-bf16")
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_two_ranks(tmp_path / "rec-bf16")
    rows = _rows(tmp_path / "bf16")
    assert [(r["stage"], r["step"]) for r in rows] == [("align", 1), ("align", 2), ("distill", 1), ("distill", 2),
                                                        ("finetune", 1)]
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_classic_kd_on_two_ranks_follows_one_process(tmp_path):
    """loss.kd (a student with the teacher's tokenizer, no Recalibrator) on 2 x batch 4 and on
    1 x batch 8: the same KD and SFT terms at every update, within the tolerance of the first
    test (each rank's token mean, then their mean)."""
    stages = '[loss]\nar = 0.0\nkl = 0.0\nreg = 0.0\nkd = 1.0\n[stages.distill]\nsteps = 3\nlr = 5e-4\nbatch_size = {b}\n'
    a, b = _one_then_two(tmp_path, stages, 8, student="zoo:qwen2_vl")  # the teacher's family and tokenizer
    assert [r["processes"] for r in b] == [2] * 3 and len(a) == 3
    for ra, rb in zip(a, b):
        assert "kd" in ra and not {"ar", "kl", "reg"} & set(ra)
        for term in ("kd", "sft"):
            assert rb[term] == pytest.approx(ra[term], rel=5e-3, abs=1e-3), (ra["step"], term, ra[term], rb[term])
    assert not (tmp_path / "two" / "distill" / "recalibrator.safetensors").exists()


def test_answer_dropout_trains_its_mask_on_two_ranks_in_bf16(tmp_path):
    """recalibrator.answer_dropout on 2 ranks in bf16: each rank draws its own masks (ordinary
    dropout), the learned mask vector gets a gradient through DDP on every rank (torch.where
    keeps it in the graph even where a rank drew no mask) and moves from its zero start; every
    loss is finite."""
    stages = ('[recalibrator]\nanswer_dropout = 0.5\n[stages.align]\nsteps = 2\nbatch_size = 4\n'
              '[stages.distill]\nsteps = 2\nbatch_size = 4\n')
    recipe = _recipe(tmp_path / "drop.toml", tmp_path / "out", stages, precision='"bf16"')
    done = _torchrun(["distill", str(recipe)], record=tmp_path / "rec")
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_two_ranks(tmp_path / "rec")
    rows = _rows(tmp_path / "out")
    assert [(r["stage"], r["step"]) for r in rows] == [(s, k) for s in ("align", "distill") for k in (1, 2)]
    assert all(math.isfinite(r[t]) for r in rows for t in ("loss", "ar", "kl"))
    from safetensors.torch import load_file

    for stage in ("align", "distill"):
        mask = load_file(str(tmp_path / "out" / stage / "recalibrator.safetensors"))["answer_mask"]
        assert mask.dtype == torch.float32 and mask.abs().max() > 0, stage  # trained (starts at zero)
