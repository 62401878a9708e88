"""Smoke runs of the benchmark scripts (tiny sizes, a few steps): they run end to end and write
what they promise. The figures themselves come from the full presets (docs/results.md)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def test_noisy_answers_are_wrong_in_every_form_and_kind():
    from replicate import noisy_answer

    from genrecal_cli.world.shapes import make_items, score

    rng = random.Random(0)
    items = make_items("train", 60)  # every kind x form, four times over
    for item in items:
        row = item.row()
        noisy = noisy_answer(row, rng)
        assert noisy["answer"] != row["answer"]
        assert not score(noisy["answer"], row), (row["answer"], noisy["answer"])
        assert score(noisy["answer"], noisy)  # still a well-formed answer, to a different truth


def test_replicate_smoke_runs_every_arm_and_writes_tables_and_plot(tmp_path):
    from PIL import Image

    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "replicate.py"), "--preset", "smoke", "--work", str(tmp_path), "--jobs", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "replicate-smoke.json").read_text())
    arms = {(r["condition"], r["arm"]) for r in result["rows"]}
    main, ablations = ("sft", "genrecal", "uld"), ("no-reg", "kl-without-ar", "no-new-positions", "depth-1", "depth-4", "embeddings")
    assert arms == {(c, a) for c in ("clean", "noisy") for a in main} | {("clean", a) for a in ablations}
    # what each arm ran, read from the recipe its own exported student carries
    runs = tmp_path / "runs"

    def ran(cond, arm, student="student"):
        return json.loads((runs / cond / arm / "seed0" / student / "genrecal.json").read_text())["recipe"]

    default = {"ar": 1.0, "kl": 1.0, "reg": 1.0, "uld": 0.0}
    expected = {"genrecal": ({}, {}), "no-reg": ({"reg": 0.0}, {}), "kl-without-ar": ({"ar": 0.0}, {}),
                "no-new-positions": ({}, {"new_positions": False}), "depth-1": ({}, {"num_blocks": 1}),
                "depth-4": ({}, {"num_blocks": 4}), "embeddings": ({}, {"answer_input": "embeddings"})}
    for arm, (loss, recal) in expected.items():
        r = ran("clean", arm)
        assert {k: r["loss"][k] for k in default} == {**default, **loss}, arm
        assert r["recalibrator"] == {"num_blocks": 2, "answer_input": "hidden", "new_positions": True, "answer_dropout": 0.0,
                                     **recal}, arm
        assert [s for s in ("align", "distill", "finetune") if r["stages"][s]["enabled"]] == ["align", "distill", "finetune"]
    # the teacher's features were computed once per condition and answer input; every arm that
    # reads the teacher read them from that cache
    assert result["teacher_features"].startswith("cache")
    assert {k for k in result["seconds"] if k.startswith("teach ")} == {"teach clean-hidden", "teach noisy-hidden",
                                                                        "teach clean-embeddings"}
    for cond, arm in [(c, a) for c in ("clean", "noisy") for a in ("genrecal", "uld")] + [("clean", a) for a in expected]:
        which = "embeddings" if arm == "embeddings" else "hidden"
        assert ran(cond, arm)["teacher"]["cache"] == str(tmp_path / "features" / f"{cond}-{which}"), (cond, arm)
        assert (tmp_path / "features" / f"{cond}-{which}" / "index.json").is_file()
    depth4 = set(load_file(str(runs / "clean" / "depth-4" / "seed0" / "distill" / "recalibrator.safetensors")))
    assert {k.split(".")[1] for k in depth4 if k.startswith("rec_body.")} == {"0", "1", "2", "3"}
    for cond in ("clean", "noisy"):
        uld = ran(cond, "uld")
        assert {k: uld["loss"][k] for k in default} == {"ar": 0.0, "kl": 0.0, "reg": 0.0, "uld": 1.0}
        assert not uld["stages"]["align"]["enabled"] and uld["data"]["source"].endswith(f"data/{cond}")
        assert not (runs / cond / "uld" / "seed0" / "distill" / "recalibrator.safetensors").exists()
        sft = [ran(cond, "sft", f"{phase}/student") for phase in ("phase1", "phase2")]
        assert all("teacher" not in r and [s for s in ("align", "distill", "finetune") if r["stages"][s]["enabled"]] == ["finetune"]
                   for r in sft)
    for row in result["rows"]:
        assert 0.0 <= row["mean"] <= 1.0 and 0.0 <= row["after_distill_mean"] <= 1.0
    assert result["accuracy"]["teacher"]["n"] == 3  # the smoke preset's --limit reached genrecal eval
    probes = result["probes"]
    assert {"clean/genrecal/seed0", "clean/embeddings/seed0"} <= set(probes)
    assert {"rely_first_top1_real", "rely_later_top1_zero"} <= set(probes["clean/genrecal/seed0"]["distill"])
    table = (tmp_path / "results" / "replicate-smoke.md").read_text()
    assert "| clean | genrecal |" in table and "| noisy | uld |" in table
    with Image.open(tmp_path / "results" / "replicate-smoke.png") as img:
        assert img.size == (1100, 520)
    # the SFT arm's two phases restart the schedule where GenRecal's stages do
    sft = json.loads((tmp_path / "runs" / "clean" / "sft" / "seed0" / "phase2" / "student" / "genrecal.json").read_text())
    assert sft["recipe"]["student"]["path"].endswith("phase1/student")


def test_speed_smoke_reports_steps_ratios_and_memory(tmp_path):
    out = tmp_path / "speed.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "speed.py"), "--preset", "tiny", "--reps", "2", "--no-extras", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out.read_text())
    steps = summary["steps"]
    assert set(steps) == {"teacher_forward", "sft_step", "rec_student_path", "rec_teacher_path", "align_step", "distill_step"}
    assert all(s["ms"] > 0 and s["peak_rss_gib"] > 0 for s in steps.values())
    ms = {k: v["ms"] for k, v in steps.items()}
    # the ratios are the ones its docstring defines, recomputed from the reported times
    assert summary["ratio_a_distill_over_sft"] == pytest.approx(ms["distill_step"] / ms["sft_step"])
    parts = ms["teacher_forward"] + ms["sft_step"] + ms["rec_student_path"] + ms["rec_teacher_path"]
    assert summary["ratio_b_glue"] == pytest.approx(ms["distill_step"] / parts)
    # a distill step does more than an SFT step (the teacher forward and the Recalibrator)
    assert ms["distill_step"] > ms["sft_step"] and ms["align_step"] > ms["rec_student_path"]


def test_teacher_sizing_smoke_measures_each_chunk_on_the_chosen_kinds(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "teacher.py"), "t", "--work", str(tmp_path), "--hidden", "32",
           "--layers", "1", "--pretrain-steps", "2", "--positions", "--kinds", "colour,count", "--forms", "short",
           "--train-items", "16", "--steps", "4", "--eval-every", "2", "--eval-items", "6", "--batch-size", "4",
           "--lr", "1e-3", "--lr-end", "1e-4"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "t" / "results.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in rows] == [2, 4]
    assert all(r["n"] == 6 and set(r["groups"]) == {"form:short", "kind:colour", "kind:count"} for r in rows)
    # the second chunk continued from the first one's student
    second = json.loads((tmp_path / "t" / "step4" / "student" / "genrecal.json").read_text())
    assert second["recipe"]["student"]["path"].endswith("step2/student")
    # with --lr-end the chunks follow one linear decay: 1e-3 -> 5.5e-4, then 5.5e-4 -> 1e-4
    first = json.loads((tmp_path / "t" / "step2" / "student" / "genrecal.json").read_text())
    lrs = [(r["recipe"]["stages"]["finetune"]["lr"], r["recipe"]["stages"]["finetune"]["lr_end"]) for r in (first, second)]
    assert lrs == [pytest.approx((1e-3, 5.5e-4)), pytest.approx((5.5e-4, 1e-4))]
    bad = subprocess.run(cmd[:3] + ["--kinds", "colour,size"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--kinds: unknown size" in bad.stderr


def test_replicate_can_take_a_trained_teacher(tmp_path):
    from replicate import PRESETS, describe, plan, prerequisite_recipes

    # the shipped reference teacher is there, and the report names what it is
    assert describe(ROOT / "genrecal_cli" / "world" / "assets" / "shapes-teacher") == ("qwen2_vl", 128, 8)

    p = PRESETS["smoke"]
    data = {"clean": str(tmp_path / "clean"), "noisy": str(tmp_path / "noisy")}
    runs = plan(tmp_path, data, p, "/elsewhere/teacher")
    teachers = {raw["teacher"]["path"] for run in runs for raw in run.recipes if "teacher" in raw}
    assert teachers == {"/elsewhere/teacher"}
    models = {"student": str(tmp_path / "student-init")}  # no teacher to build or train
    only = prerequisite_recipes(tmp_path, models, data, p, with_teacher=False)
    assert [Path(r["train"]["output_dir"]).name for r in only] == ["baseline"]
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "replicate.py"), "--work", str(tmp_path), "--teacher", str(tmp_path / "nope")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no config.json" in bad.stderr
    assert not (tmp_path / "data").exists()  # refused before any work


def test_replicate_rerun_evaluates_only_the_new_models(tmp_path, monkeypatch):
    import replicate

    asked = []

    def fake_eval(cmd, **kwargs):  # stands in for `genrecal eval`: acc = 0.1 * the model's number
        paths = cmd[cmd.index(str(out.with_name(out.stem + ".part.json"))) + 1:]
        asked.append(paths)
        models = [{"path": q, "label": q, "results": [{"benchmark": "shapes", "metric": "acc", "value": int(q[-1]) / 10, "n": 3}]}
                  for q in paths]
        Path(cmd[cmd.index("--output") + 1]).write_text(json.dumps({"protocol": {}, "models": models}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(replicate.subprocess, "run", fake_eval)
    out, p = tmp_path / "eval.json", replicate.PRESETS["smoke"]
    first = replicate.evaluate({"a": "/m1", "b": "/m2"}, out, p, print)
    again = replicate.evaluate({"a": "/m1", "b": "/m2", "c": "/m3"}, out, p, print)
    assert asked == [["/m1", "/m2"], ["/m3"]]
    assert first["b"]["acc"] == again["b"]["acc"] == pytest.approx(0.2) and again["c"]["acc"] == pytest.approx(0.3)
    report = json.loads(out.read_text())
    assert [m["path"] for m in report["models"]] == ["/m1", "/m2", "/m3"]
    assert report["comparison"][0]["values"] == pytest.approx({"/m1": 0.1, "/m2": 0.2, "/m3": 0.3})


def test_gpu_check_smoke_runs_the_engine_and_reports_its_figures(tmp_path):
    """bench/gpu_check.py with tiny shapes on CPU: the pair is built, items have the sizes it
    reports on both sides, the distill updates are timed, the plan's estimate is there, losses
    are finite."""
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--small", "--device", "cpu", "--warmup", "1",
         "--steps", "1", "--batch", "2", "--work", str(tmp_path), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    sides = figures["tokens_per_item"]
    assert sides["student"]["tokens"] > sides["student"]["answer"] >= 24 and sides["teacher"]["answer"] > 0
    assert figures["distill_s_per_update"] > 0 and figures["student_tokens_per_s"] > 0
    assert figures["model_tflops_per_update"] > 0 and figures["mfu"] is None  # no peak known for a CPU
    assert figures["peak_memory_mib"]["planned"] > 0
    assert set(figures["losses"]) == {"ar", "kl", "reg", "sft"}
    cache = figures["cache"]  # the same recipe again, its teacher's features from a cache
    assert cache["items"] == 2 * (1 + 1 + 2) and cache["bytes"] > 0 and cache["teach_s"] > 0
    assert cache["distill_s_per_update"] > 0 and cache["online_over_cached"] > 0
    assert set(cache["losses"]) == {"ar", "kl", "reg", "sft"}
    assert done.stdout.count("teacher features from the cache") == 1  # the second run read it


def test_data_bench_smoke_measures_workers_padding_and_first_step(tmp_path):
    out = tmp_path / "data.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "data.py"), "--smoke", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    for name in ("shapes", "chats"):
        rows = result["throughput"][name]
        assert [r["workers"] for r in rows] == [0, 1, 2]
        assert all(r["items"] > 0 and r["items_per_s"] > 0 for r in rows)
        pad = result["padding"][name]
        assert 0 <= pad["group_by_length"] <= pad["plain"] < 1
    assert result["padding"]["chats"]["group_by_length"] < result["padding"]["chats"]["plain"]
    assert [(r["items"], r["streaming"], r["files"]) for r in result["first_step"]] == [
        (200, streaming, files) for streaming, files in ((False, 1), (True, 1), (True, 10))]
    assert all(r["seconds_to_first_step"] > 0 for r in result["first_step"])


def test_cache_bench_smoke_times_teach_online_and_cached(tmp_path):
    out = tmp_path / "cache.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "cache.py"), "--smoke", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["teach_s"] > 0 and result["cache_bytes"] > 0
    for arm in ("online", "cached"):
        assert len(result[arm]) == 2 and all(r["align_step_s"] > 0 and r["distill_step_s"] > 0 for r in result[arm])
    assert set(result["two_students_s"]) == {"online", "cache (teach + two runs)"}


def test_welch_t_and_its_p_value():
    sys.path.insert(0, str(ROOT / "bench"))
    from sweep import two_sided_p, welch

    assert two_sided_p(2.776, 4) == pytest.approx(0.05, abs=2e-4)  # t tables: df 4, two-sided 5%
    assert two_sided_p(1.960, 1e6) == pytest.approx(0.05, abs=2e-4)  # the normal limit
    w = welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert w["t"] == pytest.approx(-3 / (2 / 3) ** 0.5) and w["df"] == pytest.approx(4.0)
    assert w["p"] == pytest.approx(0.0213, abs=5e-4)
    assert welch([1.0], [2.0, 3.0]) is None


def test_sweep_smoke_covers_every_axis_reads_one_cache_and_runs_gold(tmp_path):
    """bench/sweep.py --preset smoke: three student sizes, SFT and GenRecal clean and noisy, the
    stretched size at twice the updates, ULD and embeddings on one size, TRL's GOLD on the
    largest; the teacher's features written once and read by every teacher arm of every size."""
    from PIL import Image

    done = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep.py"), "--preset", "smoke", "--work", str(tmp_path),
                           "--jobs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "sweep-smoke.json").read_text())
    points = {(r["size"], r["factor"], r["condition"], r["arm"]) for r in result["rows"]}
    expected = {(s, 1, c, a) for s in "SML" for c in ("clean", "noisy") for a in ("sft", "genrecal")}
    expected |= {("M", 2, "clean", "sft"), ("M", 2, "clean", "genrecal"), ("M", 1, "clean", "uld"), ("M", 1, "clean", "embeddings")}
    assert points == expected
    assert result["params"]["S"] < result["params"]["M"] < result["params"]["L"]
    assert all("vs_sft" in r for r in result["rows"] if r["arm"] == "genrecal")

    def ran(name):
        return json.loads((tmp_path / "runs" / name / "student" / "genrecal.json").read_text())["recipe"]

    once, twice = ran("M/x1/clean/genrecal/seed0"), ran("M/x2/clean/genrecal/seed0")
    for st in ("align", "distill", "finetune"):
        assert twice["stages"][st]["steps"] == 2 * once["stages"][st]["steps"] > 0
    for name in ["S/x1/clean/genrecal/seed0", "L/x1/noisy/genrecal/seed0", "M/x1/clean/uld/seed0", "M/x1/clean/embeddings/seed0"]:
        cond, which = name.split("/")[2], "embeddings" if "embeddings" in name else "hidden"
        assert ran(name)["teacher"]["cache"] == str(tmp_path / "features" / f"{cond}-{which}"), name
    assert sorted(p.name for p in (tmp_path / "features").iterdir() if p.name != "recipe") == [
        "clean-embeddings", "clean-hidden", "noisy-hidden"]
    gold = result["gold"]  # the test extras install trl: GOLD must have run, not just been named
    assert "L/x1/clean/gold/seed0" in result["seconds"]  # as one of the pool's jobs, beside the runs
    assert "error" not in gold, gold.get("error")
    assert 0.0 <= gold["acc"] <= 1.0 and gold["seconds_per_update"] > 0 and gold["gold_over_genrecal"] > 0
    assert json.loads((tmp_path / "runs" / "L/x1/clean/gold/seed0" / "student" / "config.json").read_text())["model_type"] == "llava"
    table = (tmp_path / "results" / "sweep-smoke.md").read_text()
    assert "| L | " in table and "TRL GOLDTrainer" in table and "Welch t" in table
    with Image.open(tmp_path / "results" / "sweep-smoke.png") as img:
        assert img.size[0] > 1000


def test_a_stopped_bench_run_continues_from_its_last_checkpoint(tmp_path):
    """replicate.train (every run of replicate.py and sweep.py): a run whose student was not
    exported yet (a killed benchmark) continues after its last checkpoint, not from step 0."""
    import shutil

    import replicate

    out = tmp_path / "run"
    raw = {"teacher": {"path": "zoo:tiny-teacher"}, "student": {"path": "zoo:tiny-student"}, "data": {"shapes_size": 16},
           "stages": {"align": {"steps": 2, "batch_size": 4}, "distill": {"steps": 4, "batch_size": 4}},
           "train": {"output_dir": str(out), "log_every": 1, "eval_items": 0, "probe_every": 0, "save_every": 2,
                     "keep_checkpoints": 3}}
    assert replicate.train(raw, threads=1)["resumed"] is False
    first = (out / "metrics.jsonl").read_text().splitlines()
    # Stopped after distill's checkpoint at step 2: the later checkpoint, the stage and the student gone.
    for late in [*(p for p in (out / "checkpoints").iterdir() if not p.name.endswith("-0000002") or "distill" not in p.name),
                 out / "distill", out / "student"]:
        shutil.rmtree(late)
    assert replicate.train(raw, threads=1)["resumed"] is True
    again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[len(first):]]
    assert [(r["stage"], r["step"]) for r in again if "loss" in r] == [("distill", 3), ("distill", 4)]
    assert (out / "student" / "genrecal.json").exists()
    assert replicate.train(raw, threads=1) == {"skipped": True}


def test_transfer_smoke_runs_every_arm_on_both_students_from_one_cache(tmp_path):
    """bench/transfer.py --preset smoke: the SFT budget ladder on each student, then every arm at
    the chosen budget (same-tokenizer student: sft, kd, genrecal, embeddings, dropout, no_finetune; cross-tokenizer
    student: sft, genrecal, embeddings, dropout, uld, gold), teacher features written once per answer
    input and read by every teacher arm, and a rerun that trains nothing."""
    from PIL import Image

    cmd = [sys.executable, str(ROOT / "bench" / "transfer.py"), "--preset", "smoke", "--work", str(tmp_path), "--jobs", "2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "transfer-smoke.json").read_text())
    points = {(r["student"], r["arm"]) for r in result["rows"]}
    assert points == {("same", a) for a in ("sft", "kd", "genrecal", "embeddings", "dropout", "no_finetune")} | {
        ("cross", a) for a in ("sft", "genrecal", "embeddings", "dropout", "uld", "gold")}
    assert all("vs_sft" in r for r in result["rows"] if r["arm"] != "sft")
    row = {(r["student"], r["arm"]): r for r in result["rows"]}
    assert "vs_genrecal" in row[("cross", "embeddings")] and "vs_genrecal" in row[("cross", "dropout")]
    assert "vs_kd" in row[("same", "genrecal")]
    for s, lad in result["ladder"].items():  # the ladder's budgets, each measured on validation
        assert [b for b, _ in lad["curve"]] == [3, 6] and lad["budget"] in (3, 6)
        assert all(0.0 <= a <= 1.0 for _, a in lad["curve"])

    def ran(name):
        return json.loads((tmp_path / "runs" / "noisy" / name / "student" / "genrecal.json").read_text())["recipe"]

    assert result["condition"] == "noisy"  # the default: the transfer set's answers 30% wrong
    budget = result["ladder"]["same"]["budget"]
    kd = ran(f"same/b{budget}/kd/seed0")
    assert kd["loss"]["kd"] == 1.0 and kd["loss"]["ar"] == kd["loss"]["kl"] == 0.0 and not kd["stages"]["align"]["enabled"]
    assert kd["stages"]["distill"]["steps"] == budget and not kd["stages"]["finetune"]["enabled"]  # KD throughout
    assert ran(f"same/b{budget}/sft/seed0")["stages"]["finetune"]["steps"] == budget
    genrecal = ran(f"same/b{budget}/genrecal/seed0")
    assert genrecal["loss"].get("kd", 0.0) == 0.0 and genrecal["stages"]["align"]["steps"] == 2
    # every arm makes the same student updates: GenRecal's distill + finetune = the budget
    assert genrecal["stages"]["distill"]["steps"] + genrecal["stages"]["finetune"]["steps"] == budget
    whole = ran(f"same/b{budget}/no_finetune/seed0")["stages"]  # the whole budget in distill
    assert whole["distill"]["steps"] == budget and not whole["finetune"]["enabled"] and whole["align"]["steps"] == 2
    assert "vs_genrecal" in row[("same", "no_finetune")]
    for name in (f"same/b{budget}/kd/seed0", f"cross/b{result['ladder']['cross']['budget']}/uld/seed0"):
        assert ran(name)["teacher"]["cache"] == str(tmp_path / "features" / "noisy-hidden"), name
    assert ran(f"same/b{budget}/dropout/seed0")["recalibrator"]["answer_dropout"] == 0.5
    assert ran(f"same/b{budget}/embeddings/seed0")["teacher"]["cache"] == str(tmp_path / "features" / "noisy-embeddings")
    assert sorted(p.name for p in (tmp_path / "features").iterdir() if p.name != "recipe") == [
        "noisy-embeddings", "noisy-hidden"]
    same = json.loads((tmp_path / "models" / "student-same" / "config.json").read_text())
    assert same["model_type"] == "qwen2_vl"
    with Image.open(tmp_path / "results" / "transfer-smoke.png") as img:
        assert img.size[0] > 1000
    table = (tmp_path / "results" / "transfer-smoke.md").read_text()
    assert "| same | kd |" in table and "| cross | gold |" in table and "Reliance probe" in table
    # A later sitting on another machine (no run folders, only the results file): nothing is
    # trained again, and the report still holds every run measured before.
    later = tmp_path.parent / (tmp_path.name + "-later")
    again = subprocess.run([*cmd[:5], str(later), "--out", str(tmp_path / "results"), "--only", "kd", "--students", "same"],
                           cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert not (later / "runs").exists() and "runs measured in an earlier sitting" in again.stdout
    reported = json.loads((tmp_path / "results" / "transfer-smoke.json").read_text())
    assert reported["rows"] == result["rows"] and reported["ladder"] == result["ladder"]
    assert reported["probes"] == result["probes"] and len(reported["earlier_sittings"]) == len(result["rows"])


def test_the_budget_is_where_doubling_stops_raising_validation_accuracy():
    sys.path.insert(0, str(ROOT / "bench"))
    from transfer import STILL_RISING, choose_budget

    # the noisy transfer set's SFT ladder (docs/results.md section 8): 2,000 -> 4,000 added nothing
    budget, why = choose_budget([(500, 0.31), (1000, 0.367), (2000, 0.437), (4000, 0.437)], 0.01)
    assert budget == 2000 and "+0.0 points" in why
    assert choose_budget([(500, 0.30), (1000, 0.305), (2000, 0.5)], 0.01)[0] == 500  # the first pair that stops
    assert choose_budget([(500, 0.307), (1000, 0.477), (2000, 0.547), (4000, 0.62)], 0.01) == (4000, STILL_RISING)
    assert choose_budget([(500, 0.5), (1000, 0.45)], 0.01)[0] == 500  # falling counts as stopped


def test_cache_forms_smoke(tmp_path):
    """bench/cache_forms.py --preset smoke: every cache form (full rows, top 8 / 32 / 128, fp8 z_al,
    answer ids) written and trained from once, evaluated, its bytes per token read from the shards
    and its step time taken; the bytes are the size arithmetic's."""
    cmd = [sys.executable, str(ROOT / "bench" / "cache_forms.py"), "--preset", "smoke", "--work", str(tmp_path),
           "--jobs", "2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "cache-forms-smoke.json").read_text())
    rows = {r["form"]: r for r in result["rows"]}
    assert set(rows) == {"full", "topk8", "topk32", "topk128", "fp8-topk32", "emb-full", "ids-topk32", "full-again"}
    from genrecal_cli.engine.teacher.cache import size_estimate

    width = json.loads((ROOT / "genrecal_cli" / "world" / "assets" / "shapes-teacher" / "config.json").read_text())
    d = width.get("text_config", width).get("hidden_size")  # the shipped teacher's hidden size
    assert rows["ids-topk32"]["bytes"]["answer"] == size_estimate(1, 0, d, "fp32", 32, answer_ids=True)["answer"]
    assert rows["topk8"]["bytes"]["answer"] == size_estimate(1, 0, d, "fp32", 8)["answer"]
    assert rows["full"]["bytes"]["answer"] == size_estimate(1, 0, d, "fp32")["answer"]
    assert all(r["step_s"] > 0 for name, r in rows.items() if name != "full-again")
    assert all({"ar", "kl", "reg", "sft"} <= set(r["terms"]) for r in rows.values())


def test_an_uninformed_teacher_answers_its_unknown_kinds_at_random():
    """bench/teachers.py's relabelling: every row of an unknown kind a well-formed answer of its
    kind and form, drawn uniformly (the right one included); rows of a known kind keep their
    answer, a long one losing its "why" where it tells of an unknown kind."""
    from collections import Counter

    from teachers import uninformed

    from genrecal_cli.world.shapes import CANDIDATES, make_items, score

    rng = random.Random(0)
    rows = [item.row() for item in make_items("train", 600)]  # every kind x form, 40 times over
    new = [uninformed(row, ("colour", "position"), rng) for row in rows]
    right = Counter()
    for row, out in zip(rows, new):
        if row["kind"] in ("colour", "position"):
            assert out == row
            continue
        assert score(out["answer"], out), (row, out)  # a well-formed answer to its own target
        assert out["target"] in (CANDIDATES[row["kind"]] if row["form"] != "mc" else "ABCD")
        right[row["kind"]] += score(out["answer"], row)
    # 120 items per kind: right about as often as chance (shape, count 1/3, existence 1/2), not always
    assert 20 < right["shape"] < 65 and 20 < right["count"] < 65 and 40 < right["existence"] < 85
    # a teacher that knows existence but not positions is not told where the object is
    row = next(r for r in rows if r["kind"] == "existence" and r["form"] == "long" and r["target"] == "yes")
    out = uninformed(row, ("shape", "count", "existence"), rng)
    assert out["target"] == "yes" and out["answer"] == row["answer"].split(". ")[0] + "."
    assert " in the " in row["answer"] and " in the " not in out["answer"]


def test_teachers_smoke(tmp_path):
    """bench/teachers.py --preset smoke: two teachers finetuned from the reference one, a cache
    each, the single-teacher arms trained from their own teacher and cache, every student scored
    overall and per kind; the `both` arm from two [[teachers]] tables, each with its cache."""
    cmd = [sys.executable, str(ROOT / "bench" / "teachers.py"), "--preset", "smoke", "--work", str(tmp_path),
           "--jobs", "2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "teachers-smoke.json").read_text())
    rows = {r["arm"]: r for r in result["rows"]}
    kinds = ("colour", "shape", "count", "position", "existence")
    assert set(rows) == {"sft", "genrecal", "A", "B", "both"}
    ran = json.loads((tmp_path / "runs" / "both" / "seed0" / "student" / "genrecal.json").read_text())["recipe"]
    assert [t["name"] for t in ran["teachers"]] == ["A", "B"]
    assert [t["cache"] for t in ran["teachers"]] == [str(tmp_path / "features" / n) for n in "AB"]
    assert {"sft", "better single"} <= set(rows["both"]["versus"])
    for arm in ("A", "B"):
        ran = json.loads((tmp_path / "runs" / arm / "seed0" / "student" / "genrecal.json").read_text())["recipe"]
        assert ran["teacher"]["path"] == str(tmp_path / "teachers" / arm / "student")
        assert ran["teacher"]["cache"] == str(tmp_path / "features" / arm)
        assert (tmp_path / "features" / arm / "index.json").is_file()
    assert set(result["teachers"]) == {"reference", "A", "B"}
    assert {"A", "B"} <= set(result["first_tokens"]) and all(set(v) == set(kinds) for v in result["first_tokens"].values())
    assert all(set(t["validation"]["kinds"]) == set(kinds) for t in result["teachers"].values())
    for row in rows.values():
        assert len(row["seeds"]) == 2 and all(len(row[k]) == 2 for k in ("overall", *kinds))
    assert (tmp_path / "results" / "teachers-smoke.png").is_file() and (tmp_path / "results" / "teachers-smoke.md").is_file()
