"""Several teachers, one student (issue 31): teachers of different families (Qwen2-VL-style and
InternVL-style) into a LLaVA-style student through every stage, one from its cache and one online;
a teacher of weight 0 changes nothing; kill -9 and --resume with two teachers."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from genrecal_cli.commands.distill import distill, teach
from genrecal_cli.recipe import recipe_from_dict

from .conftest import run_cli
from .test_faults import ENV, _start, _wait_for
from .test_train import Recorder

pytestmark = pytest.mark.usefixtures("tiny_pair")


def _raw(out, teachers, stages=("align", "distill", "finetune"), steps=3, eval_items=0, **train) -> dict:
    return {
        "teachers": teachers,
        "student": {"path": "zoo:tiny-student"},
        "data": {"shapes_size": 32, "max_length": 1024},
        "stages": {s: {"steps": steps, "batch_size": 4, "lr": 1e-3, "lr_end": 1e-4} for s in stages},
        "train": {"output_dir": str(out), "log_every": 1, "eval_items": eval_items, **train},
    }


def _weights(path):
    return load_file(str(path))


def _moved(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Teacher `qwen` (zoo:tiny-teacher) from its cache, teacher `intern` (zoo:internvl) online."""
    base = tmp_path_factory.mktemp("two")
    teachers = [{"name": "qwen", "path": "zoo:tiny-teacher", "cache": str(base / "cache-qwen")},
                {"name": "intern", "path": "zoo:internvl", "weight": 0.5}]
    recipe = recipe_from_dict(_raw(base / "out", teachers, eval_items=4, save_every=1, keep_checkpoints=10))
    teach(recipe.teacher_views()[0].recipe, base / "cache-qwen", storage="fp32")
    rec = Recorder()
    result = distill(recipe, reporter=rec)
    return base / "out", rec, result


def test_two_teachers_of_other_families_train_every_stage_each_with_its_recalibrator(two):
    out, rec, result = two
    by_stage = {}
    for stage, _, metrics in rec.rows:
        by_stage.setdefault(stage, []).append(metrics)
    for stage in ("align", "distill"):
        last = by_stage[stage][-1]
        for name in ("qwen", "intern"):
            assert {f"{name}/ar", f"{name}/kl", f"{name}/reg", f"{name}/top1"} <= set(last), sorted(last)
            assert f"{name}/rely_first_top1_real" in last  # each teacher's reliance probe
        assert "ar" not in last and "teacher_q_tokens" not in last  # no unnamed teacher term
    assert "sft" in by_stage["distill"][-1] and not any("/" in k for k in by_stage["finetune"][-1])
    # each Recalibrator moves in align (step 1 -> the end) and again in distill
    for name in ("qwen", "intern"):
        first = _weights(out / "checkpoints" / "align-0000001" / "recalibrators" / f"{name}.safetensors")
        aligned = _weights(out / "align" / "recalibrators" / f"{name}.safetensors")
        distilled = _weights(out / "distill" / "recalibrators" / f"{name}.safetensors")
        assert _moved(first, aligned) and _moved(aligned, distilled), name
    assert not (out / "distill" / "recalibrator.safetensors").exists()
    meta = json.loads((out / "distill" / "meta.json").read_text())
    assert meta["teachers"] == ["qwen", "intern"]
    # the accuracy table: the online teacher's row; the cached one is skipped, said so
    assert "teacher intern" in result.accuracy and "teacher qwen" not in result.accuracy
    assert {"student before", "student after"} <= set(result.accuracy)
    assert any(n.startswith("teacher qwen features from the cache") for n in rec.notes)
    assert any(n.startswith("teacher qwen accuracy skipped") for n in rec.notes)
    # the export is a plain student: its own architecture, no Recalibrator
    from transformers import AutoModelForImageTextToText

    exported = sorted(p.name for p in (out / "student").iterdir())
    assert not any("recalibrator" in n for n in exported)
    assert AutoModelForImageTextToText.from_pretrained(out / "student").config.model_type == "llava"


def test_a_teacher_of_weight_zero_reaches_the_single_teacher_run(tmp_path):
    """Two teachers, the second weighted 0, end on the weights of the first alone, bit for bit
    (its terms are computed, scaled by 0: nothing reaches the student or the first Recalibrator)."""
    quiet = {"answer_dropout": 0.0}
    stages = {"max_grad_norm": 0.0}
    alone = _raw(tmp_path / "alone", [], stages=("align", "distill"), steps=2)
    alone.pop("teachers")
    alone.update(teacher={"path": "zoo:tiny-teacher"}, recalibrator=quiet)
    both = _raw(tmp_path / "both", [{"name": "qwen", "path": "zoo:tiny-teacher"},
                                    {"name": "intern", "path": "zoo:internvl", "weight": 0.0}],
                stages=("align", "distill"), steps=2)
    both["recalibrator"] = quiet
    for raw in (alone, both):
        for s in raw["stages"].values():
            s.update(stages)
    distill(recipe_from_dict(alone))
    distill(recipe_from_dict(both))
    a, b = _weights(tmp_path / "alone" / "student" / "model.safetensors"), _weights(tmp_path / "both" / "student" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = _weights(tmp_path / "alone" / "distill" / "recalibrator.safetensors")
    rb = _weights(tmp_path / "both" / "distill" / "recalibrators" / "qwen.safetensors")
    assert all(torch.equal(ra[k], rb[k]) for k in ra)


def _two_recipe(path, out, cache) -> str:
    path.write_text(
        '[student]\npath = "zoo:tiny-student"\n[data]\nshapes_size = 16\nmax_length = 1024\n'
        '[[teachers]]\nname = "qwen"\npath = "zoo:tiny-teacher"\n'
        f'cache = "{cache}"\n'
        '[[teachers]]\nname = "intern"\npath = "zoo:internvl"\nweight = 0.5\n'
        "[stages.align]\nsteps = 2\nbatch_size = 4\n[stages.distill]\nsteps = 6\nbatch_size = 4\n"
        f'[train]\noutput_dir = "{out}"\nlog_every = 1\neval_items = 0\nsave_every = 2\nkeep_checkpoints = 2\n')
    return str(path)


def test_kill_9_with_two_teachers_then_resume_reaches_the_uninterrupted_weights(tmp_path):
    cache = tmp_path / "cache-qwen"
    straight = _two_recipe(tmp_path / "straight.toml", tmp_path / "straight", cache)
    written = run_cli("teach", straight, "--teacher", "qwen", "--storage", "fp32", env=ENV)
    assert written.returncode == 0, written.stderr[-2000:]
    done = run_cli("distill", straight, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "killed"
    killed = _two_recipe(tmp_path / "killed.toml", out, cache)
    proc = _start(killed)
    _wait_for(lambda: (out / "checkpoints" / "distill-0000004").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_cli("distill", killed, "--resume", env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after distill step" in resumed.stdout
    for name in ("student/model.safetensors", "distill/recalibrators/qwen.safetensors",
                 "distill/recalibrators/intern.safetensors"):
        x, y = _weights(tmp_path / "straight" / name), _weights(out / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def _two_rank_recipe(path, out, batch: int, parallel: str = "") -> str:
    path.write_text(
        '[student]\npath = "zoo:tiny-student"\n[data]\nshapes_size = 32\nmax_length = 1024\n'
        '[[teachers]]\nname = "qwen"\npath = "zoo:tiny-teacher"\n'
        '[[teachers]]\nname = "intern"\npath = "zoo:internvl"\nweight = 0.5\n'
        f"[stages.align]\nsteps = 2\nbatch_size = {batch}\n[stages.distill]\nsteps = 3\nbatch_size = {batch}\n"
        f'[train]\noutput_dir = "{out}"\nlog_every = 1\neval_items = 0\n{parallel}')
    return str(path)


def test_two_teachers_on_two_ranks_follow_one_process_and_shard(tmp_path):
    """Two online teachers on 1 process x batch 8, on 2 ranks x batch 4 (DDP), and on 2 ranks with
    every teacher and the student sharded (FSDP2: each Recalibrator sharded too): each teacher's
    terms agree update by update, and the sharded run ends on the DDP run's student."""
    from .test_parallel import _assert_two_ranks, _rows, _torchrun

    one = run_cli("distill", _two_rank_recipe(tmp_path / "one.toml", tmp_path / "one", 8), env=ENV, timeout=420)
    assert one.returncode == 0, one.stderr[-2000:]
    ddp = _torchrun(["distill", _two_rank_recipe(tmp_path / "ddp.toml", tmp_path / "ddp", 4)], record=tmp_path / "r1")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    _assert_two_ranks(tmp_path / "r1")
    shard = '[parallel]\nteacher = "shard"\nstudent = "shard"\n'
    sharded = _torchrun(["distill", _two_rank_recipe(tmp_path / "s.toml", tmp_path / "shard", 4, shard)],
                        record=tmp_path / "r2")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    _assert_two_ranks(tmp_path / "r2")
    a, b, c = _rows(tmp_path / "one"), _rows(tmp_path / "ddp"), _rows(tmp_path / "shard")
    assert [r["processes"] for r in b] == [2] * 5 and [r["global_batch"] for r in a] == [r["global_batch"] for r in b]
    terms = [f"{t}/{k}" for t in ("qwen", "intern") for k in ("ar", "kl", "reg")]
    # 2 ranks x 4 items: a mean of two 4-item token means, not one 8-item mean (seen: the large
    # terms within 0.6%, the small kl ~0.03 within 0.001)
    for ra, rb, rc in zip(a, b, c):
        for term in terms:
            assert rb[term] == pytest.approx(ra[term], rel=1.5e-2, abs=3e-3), (ra["stage"], ra["step"], term)
            assert rc[term] == pytest.approx(rb[term], rel=1e-4, abs=1e-6), (ra["stage"], ra["step"], term)
    x = _weights(tmp_path / "ddp" / "student" / "model.safetensors")
    y = _weights(tmp_path / "shard" / "student" / "model.safetensors")
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=1e-5, atol=1e-6)
    for name in ("qwen", "intern"):  # each Recalibrator gathered whole from its shards at the stage's end
        p, q = (_weights(tmp_path / run / "distill" / "recalibrators" / f"{name}.safetensors") for run in ("ddp", "shard"))
        assert p.keys() == q.keys() and all(torch.allclose(p[k], q[k], rtol=1e-4, atol=1e-5) for k in p)


def test_teach_picks_one_teacher_and_the_preflight_measures_every_side(tmp_path):
    """`genrecal teach --teacher NAME` writes one teacher's cache (the recipe as a run of that
    teacher alone, its `cache` the default folder); a wrong or missing name is one line naming
    the choices. The data preflight renders every teacher's side and the student's."""
    from genrecal_cli.commands.preflight_view import run_preflight
    from genrecal_cli.commands.teach import one_teacher
    from genrecal_cli.errors import GenrecalError

    two = recipe_from_dict(_raw(tmp_path, [{"name": "qwen", "path": "zoo:tiny-teacher", "cache": str(tmp_path / "q")},
                                           {"name": "intern", "path": "zoo:internvl"}]))
    picked = one_teacher(two, "qwen")
    assert picked.teacher.path == "zoo:tiny-teacher" and picked.teacher.cache == str(tmp_path / "q")
    assert not picked.several_teachers
    with pytest.raises(GenrecalError, match=r"has 2 \[\[teachers\]\] \(qwen, intern\): choose whose cache"):
        one_teacher(two, None)
    with pytest.raises(GenrecalError, match="--teacher ocr is not one of them"):
        one_teacher(two, "ocr")
    with pytest.raises(GenrecalError, match="leave --teacher out"):
        one_teacher(picked, "qwen")
    report = run_preflight(two, 8)
    assert set(report["sides"]) == {"teacher:qwen", "teacher:intern", "student"}
    assert report["models"]["teacher:intern"] == "zoo:internvl"


def test_two_teachers_train_in_bf16_from_a_bf16_cache_and_online(tmp_path):
    """train.precision = "bf16" (on the CLI: a process of its own, as accelerate's precision is
    fixed per process): one teacher from a bf16 cache, one online; align and distill run and
    every teacher's terms are finite."""
    import math

    recipe = _two_recipe(tmp_path / "r.toml", tmp_path / "out", tmp_path / "cache")
    recipe_path = tmp_path / "r.toml"
    recipe_path.write_text(recipe_path.read_text().replace("save_every = 2", 'save_every = 0\nprecision = "bf16"')
                           .replace("steps = 6", "steps = 2"))
    written = run_cli("teach", recipe, "--teacher", "qwen", "--storage", "bf16", env=ENV)
    assert written.returncode == 0, written.stderr[-2000:]
    done = run_cli("distill", recipe, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["stage"] == "distill"][-1]
    terms = [f"{t}/{k}" for t in ("qwen", "intern") for k in ("ar", "kl", "reg")]
    assert all(last.get(k) is not None and math.isfinite(last[k]) for k in [*terms, "sft", "loss"]), last
    assert (tmp_path / "out" / "student" / "config.json").is_file()
    assert json.loads((tmp_path / "out" / "distill" / "recipe.json").read_text())["train"]["precision"] == "bf16"
