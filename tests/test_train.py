"""The engine on tiny models: what trains in each stage, losses, checkpoints, export, resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from genrecal_cli.errors import GenrecalError
from genrecal_cli.recipe import recipe_from_dict
from genrecal_cli.commands.distill import distill

from .conftest import run_cli


def _recipe(out, stages=("align", "distill", "finetune"), steps=3, eval_items=0, **train):
    raw = {
        "teacher": {"path": "zoo:tiny-teacher"},
        "student": {"path": "zoo:tiny-student"},
        "data": {"shapes_size": 32, "max_length": 256},
        "stages": {s: {"steps": steps, "batch_size": 4, "lr": 1e-3, "lr_end": 1e-4} for s in stages},
        "train": {"output_dir": str(out), "log_every": 1, "eval_items": eval_items, **train},
    }
    return recipe_from_dict(raw)


class Recorder:
    """A reporter that keeps every logged metric."""

    def __init__(self):
        self.rows, self.notes = [], []

    def stage_start(self, *a):
        pass

    def step(self, stage, step, metrics):
        self.rows.append((stage, step, dict(metrics)))

    def stage_end(self, *a):
        pass

    def note(self, text, style=""):
        self.notes.append(text)


def _student_weights(path):
    """The saved student's parameters, reloaded the way a user would (names as in state_dict)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_pair):
    out = tmp_path_factory.mktemp("run")
    rec = Recorder()
    result = distill(_recipe(out, eval_items=6), reporter=rec)
    return out, result, rec


def test_accuracy_is_measured_before_and_after(tmp_path, monkeypatch, tiny_pair):
    """A stub generator whose answers are known: the teacher answers everything right, the
    student wrong before training and right after: 1.0 / 0.0 / 1.0, per group too."""
    from genrecal_cli.engine import accuracy as accuracy_module
    from genrecal_cli.commands.distill import load_rows

    asked = []
    recipe = _recipe(tmp_path, stages=("align", "finetune"), steps=1, eval_items=6)
    references = [r["answer"] for r in load_rows(recipe.data, "validation").select(range(6))]

    def stub(vlm, prompts, images, **kwargs):  # one process: the items in order
        who = "teacher" if vlm.family == "qwen2_vl" else "student"
        asked.append((who, len(prompts)))
        assert [p.messages[-1]["role"] for p in prompts] == ["user"] * len(prompts) and all(len(i) == 1 for i in images)
        wrong = who == "student" and len(asked) == 2  # the student before any stage
        return ["nothing" if wrong else ref for ref in references[: len(prompts)]]

    monkeypatch.setattr(accuracy_module, "generate_answers", stub)
    result = distill(recipe, reporter=Recorder())
    assert asked == [("teacher", 6), ("student", 6), ("student", 6)]
    assert {k: v["accuracy"] for k, v in result.accuracy.items()} == {"teacher": 1.0, "student before": 0.0, "student after": 1.0}
    rows = load_rows(recipe.data, "validation").select(range(6))
    groups = {f"form:{r['form']}" for r in rows} | {f"kind:{r['kind']}" for r in rows}
    assert set(result.accuracy["student after"]["groups"]) == groups
    assert set(result.accuracy["student before"]["groups"].values()) == {0.0}
    assert set(result.accuracy["teacher"]["groups"].values()) == {1.0}
    saved = json.loads((tmp_path / "student" / "genrecal.json").read_text())["accuracy"]
    assert saved == json.loads(json.dumps(result.accuracy))


def test_accuracy_on_other_data_is_exact_match(tmp_path, monkeypatch, tiny_pair):
    """Data that is not the built-in shapes: normalised exact match with the answer column, no groups."""
    from PIL import Image

    from genrecal_cli.engine import accuracy as accuracy_module

    data = tmp_path / "data"  # a folder of split files: the table reads validation.jsonl
    data.mkdir()
    items = []
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(data / f"{i}.png")
        items.append({"image": f"{i}.png", "question": f"What is item {i}?", "answer": f"Item {i}."})
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    # right for three items (once with other case and punctuation), wrong for the last
    monkeypatch.setattr(accuracy_module, "generate_answers",
                        lambda vlm, prompts, images, **kw: ["item 0", "ITEM 1!", "Item 2.", "something else"])
    raw = _recipe(tmp_path / "out", stages=("finetune",), steps=1, eval_items=4).to_dict()
    raw.pop("teacher")
    raw["data"] = {"source": str(data), "max_length": 256}
    result = distill(recipe_from_dict(raw), reporter=Recorder())
    for name in ("student before", "student after"):
        assert result.accuracy[name] == {"accuracy": 0.75, "n": 4, "groups": {}}


def test_stage_checkpoints_have_the_exact_file_set(full_run):
    out, _, _ = full_run
    for stage in ("align", "distill"):
        assert sorted(p.name for p in (out / stage).iterdir()) == sorted(
            ["student", "recalibrator.safetensors", "recipe.json", "meta.json"]
        )
    assert sorted(p.name for p in (out / "finetune").iterdir()) == ["meta.json", "recipe.json", "student"]
    assert not (out / "checkpoints").exists()  # 3 steps, save_every 500: no mid-stage checkpoint
    meta = json.loads((out / "distill" / "meta.json").read_text())
    assert meta["step"] == meta["total_steps"] == 3 and meta["finished"] is True
    assert meta["processes"] == 1 and meta["global_batch"] == 4
    assert {"genrecal", "torch", "transformers"} <= set(meta["versions"])


def test_align_trains_only_the_recalibrator(full_run, tiny_pair):
    """After align the student is untouched and the Recalibrator is not the one it started as
    (rebuilt here from the same seed)."""
    from accelerate.utils import set_seed

    from genrecal_cli.engine.recalibrator import Recalibrator

    out, _, _ = full_run
    teacher, student = tiny_pair  # the untouched built-in pair
    before = student.model.state_dict()
    after_align = _student_weights(out / "align" / "student")
    assert all(torch.equal(before[k], v) for k, v in after_align.items())
    set_seed(0)  # train.seed, as the run seeds it before building the Recalibrator
    fresh = Recalibrator(teacher.hidden_size, student.text_config, student.decoder_layer_class).state_dict()
    aligned = load_file(str(out / "align" / "recalibrator.safetensors"))
    assert aligned.keys() == fresh.keys()
    moved = [k for k in fresh if not torch.equal(fresh[k], aligned[k])]
    assert len(moved) > len(fresh) // 2, moved


def _parts(weights: dict, family: str) -> dict[str, list[str]]:
    """Parameter names of the student's vision encoder (projector excluded), projector, language body."""
    enc, proj = {"llava": ("vision_tower", "multi_modal_projector"), "qwen2_vl": ("visual", "visual.merger")}[family]
    projector = [k for k in weights if f".{proj}." in k]
    encoder = [k for k in weights if f".{enc}." in k and k not in projector]
    language = [k for k in weights if ".language_model." in k]
    assert projector and encoder and language
    return {"encoder": encoder, "projector": projector, "language": language}


def _moved(a: dict, b: dict, keys: list[str]) -> int:
    return sum(not torch.equal(a[k], b[k]) for k in keys)


def test_distill_trains_the_language_body_not_the_vision_encoder(full_run):
    out, _, _ = full_run
    a = _student_weights(out / "align" / "student")
    d = _student_weights(out / "distill" / "student")
    parts = _parts(a, "llava")
    assert _moved(a, d, parts["encoder"]) == 0 and _moved(a, d, parts["projector"]) == 0  # projector frozen by default
    assert _moved(a, d, parts["language"]) > len(parts["language"]) // 2


@pytest.mark.parametrize("student", ["zoo:tiny-student", "zoo:qwen2_vl"])
def test_train_projector_trains_the_projector_in_distill(tmp_path, student):
    raw = _recipe(tmp_path, stages=("distill",), steps=2).to_dict()
    raw["student"]["path"] = student
    raw["stages"]["distill"]["train_projector"] = True
    distill(recipe_from_dict(raw), reporter=Recorder())
    from genrecal_cli.world.zoo import resolve_source

    family = "llava" if student == "zoo:tiny-student" else "qwen2_vl"
    before, after = _student_weights(resolve_source(student)), _student_weights(tmp_path / "distill" / "student")
    parts = _parts(before, family)
    assert _moved(before, after, parts["encoder"]) == 0
    assert _moved(before, after, parts["projector"]) == len(parts["projector"])
    assert _moved(before, after, parts["language"]) > len(parts["language"]) // 2


def test_a_qwen2_vl_student_through_every_stage(tmp_path):
    """A Qwen2-VL student (its projector inside its vision encoder, M-RoPE text rotary): align
    leaves it alone, distill trains the language body only, finetune the projector too."""
    raw = _recipe(tmp_path, steps=2).to_dict()
    raw["student"]["path"] = "zoo:qwen2_vl"
    rec = Recorder()
    distill(recipe_from_dict(raw), reporter=rec)
    from genrecal_cli.world.zoo import resolve_source

    w = {name: _student_weights(path) for name, path in (
        ("start", resolve_source("zoo:qwen2_vl")), ("align", tmp_path / "align" / "student"),
        ("distill", tmp_path / "distill" / "student"), ("finetune", tmp_path / "finetune" / "student"))}
    parts = _parts(w["start"], "qwen2_vl")
    every = [k for keys in parts.values() for k in keys]
    assert _moved(w["start"], w["align"], every) == 0
    assert _moved(w["align"], w["distill"], parts["encoder"] + parts["projector"]) == 0
    assert _moved(w["align"], w["distill"], parts["language"]) > len(parts["language"]) // 2
    assert _moved(w["distill"], w["finetune"], parts["encoder"]) == 0
    assert _moved(w["distill"], w["finetune"], parts["projector"]) == len(parts["projector"])
    for stage, _, m in rec.rows:
        assert all(torch.isfinite(torch.tensor(m[k])) for k in ("loss",))


def test_finetune_trains_the_projector_but_not_the_vision_encoder(full_run):
    out, _, _ = full_run
    d = _student_weights(out / "distill" / "student")
    f = _student_weights(out / "finetune" / "student")
    assert all(torch.equal(d[k], f[k]) for k in d if "vision_tower" in k)
    assert any(not torch.equal(d[k], f[k]) for k in d if "multi_modal_projector" in k)


def test_losses_are_finite_and_logged(full_run):
    out, _, rec = full_run
    stages = {s for s, _, _ in rec.rows}
    assert stages == {"align", "distill", "finetune"}
    for stage, _, m in rec.rows:
        expected = {"align": {"ar", "kl", "reg"}, "distill": {"ar", "kl", "reg", "sft"}, "finetune": {"sft"}}[stage]
        assert expected <= set(m) and all(torch.isfinite(torch.tensor(m[k])) for k in expected)
        if stage != "finetune":  # their values: test_direct.py computes them by hand
            assert {"boundary_agreement", "top1", "a_token_ratio"} <= set(m)


_FRESH_EXPORT = """
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
out = {}
for folder in sys.argv[1:]:
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}],
        add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[[image]], return_tensors="pt")
    image_id = model.config.image_token_id if hasattr(model.config, "image_token_id") else model.config.image_token_index
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    out[folder] = {"processor": type(processor).__name__, "image_tokens": int((inputs["input_ids"] == image_id).sum()),
                   "logits": logits.tolist()}
out["genrecal imported"] = any(m.startswith("genrecal_cli") for m in sys.modules)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_pair):
    """One finetune step per family; the exported students."""
    from genrecal_cli.models import FAMILIES

    folders = {}
    for family in FAMILIES:
        out = tmp_path_factory.mktemp(f"export-{family}")
        raw = _recipe(out, stages=("finetune",), steps=1).to_dict()
        raw.pop("teacher")
        raw["student"]["path"] = f"zoo:{family}"
        distill(recipe_from_dict(raw), reporter=Recorder())
        folders[family] = out
    return folders


def test_exported_student_is_plain_and_generates(exports):
    """Each family's export, loaded in a fresh process without genrecal by the plain Auto classes,
    with an image: no Recalibrator inside, the processor class and image-token count the model
    expects, and the same next-token logits as the trained student seen through genrecal."""
    import subprocess
    import sys

    from PIL import Image

    from genrecal_cli.models import load_vlm

    for family, out in exports.items():
        saved = load_file(str(out / "student" / "model.safetensors"))
        assert not any("recalibrator" in k or "rec_body" in k or "proj_pre" in k for k in saved)
    done = subprocess.run([sys.executable, "-c", _FRESH_EXPORT, *(str(o / "student") for o in exports.values())],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert fresh.pop("genrecal imported") is False
    for family, out in exports.items():
        seen = fresh[str(out / "student")]
        trained = load_vlm(str(out / "finetune" / "student"))  # the trained weights, through genrecal's own view
        config_class = json.loads((out / "student" / "processor_config.json").read_text()).get("processor_class")
        assert seen["processor"] == config_class, family
        assert seen["image_tokens"] == trained.image_tokens_per_image((64, 64)), family
        prompt = trained.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}],
            add_generation_prompt=True)
        inputs = trained.processor(text=[prompt], images=[[Image.new("RGB", (64, 64), (200, 30, 30))]], return_tensors="pt")
        with torch.no_grad():
            expected = trained.model(**inputs).logits[0, -1]
        torch.testing.assert_close(torch.tensor(seen["logits"]), expected, rtol=1e-4, atol=1e-4, msg=family)


def test_align_loss_falls(tmp_path, tiny_pair):
    raw = _recipe(tmp_path, stages=("align",), steps=25).to_dict()
    raw["stages"]["align"].update(lr=3e-3, lr_end=3e-3, batch_size=8)
    raw["data"]["shapes_size"] = 16
    rec = Recorder()
    distill(recipe_from_dict(raw), reporter=rec)
    ar = [m["ar"] for _, _, m in rec.rows]
    assert sum(ar[-5:]) / 5 < 0.8 * sum(ar[:5]) / 5, ar


def test_finetune_only_loads_no_teacher(tmp_path, monkeypatch):
    import genrecal_cli.models as models

    loaded = []
    real = models.load_vlm
    monkeypatch.setattr(models, "load_vlm", lambda path, **kw: loaded.append(path) or real(path, **kw))
    raw = _recipe(tmp_path, stages=("finetune",), steps=2).to_dict()
    raw.pop("teacher")
    distill(recipe_from_dict(raw), reporter=Recorder())
    assert len(loaded) == 1 and "tiny-student" in loaded[0]


def test_cli_distill_plain_output_and_metrics(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[teacher]\npath = "zoo:tiny-teacher"\n[student]\npath = "zoo:tiny-student"\n[data]\nshapes_size = 16\n'
        f'[stages.align]\nsteps = 2\nbatch_size = 4\n[train]\noutput_dir = "{tmp_path / "out"}"\nlog_every = 1\neval_items = 4\n'
    )
    out = run_cli("distill", str(recipe))
    assert out.returncode == 0, out.stderr
    assert "align  2/2" in out.stdout and "student exported to" in out.stdout
    assert "accuracy on the validation split" in out.stdout and "student after" in out.stdout
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("boundary_agreement" in r for r in rows)
    assert f"report: {tmp_path / 'out' / 'report.png'}" in out.stdout and (tmp_path / "out" / "report.png").is_file()
    again = run_cli("distill", str(recipe))
    assert again.returncode == 1 and "already holds a run" in again.stderr


def test_a_failed_run_leaves_no_empty_output_folder(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "q", "reply": "a"}\n')
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[teacher]\npath = "zoo:tiny-teacher"\n[student]\npath = "zoo:tiny-student"\n[data]\nsource = "{data}"\n'
                      f'[stages.align]\nsteps = 2\nbatch_size = 4\n[train]\noutput_dir = "{tmp_path / "out"}"\n')
    out = run_cli("distill", str(recipe))
    assert out.returncode == 1 and "d.jsonl" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_non_finite_loss_stops_and_names_the_step(tmp_path, monkeypatch):
    from genrecal_cli.engine import objective

    real = objective.losses.sft
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return value * float("nan") if len(calls) == 2 else value

    monkeypatch.setattr(objective.losses, "sft", poisoned)
    raw = _recipe(tmp_path, stages=("finetune",), steps=3).to_dict()
    raw.pop("teacher")
    with pytest.raises(GenrecalError, match=r"finetune: loss became non-finite at step 2 on process 0"):
        distill(recipe_from_dict(raw), reporter=Recorder())


def test_swapped_teacher_and_student_warns_but_runs(tmp_path):
    raw = _recipe(tmp_path, stages=("align",), steps=1).to_dict()
    raw["teacher"]["path"], raw["student"]["path"] = "zoo:tiny-student", "zoo:tiny-teacher"
    rec = Recorder()
    distill(recipe_from_dict(raw), reporter=rec)
    assert any("smaller than the student" in n and "swapped" in n for n in rec.notes)


def test_empty_data_split_is_a_clear_error(tmp_path):
    from genrecal_cli.errors import DataError

    data = tmp_path / "empty.jsonl"
    data.write_text("")
    raw = _recipe(tmp_path / "out", stages=("finetune",), steps=1).to_dict()
    raw.pop("teacher")
    raw["data"] = {"source": str(data)}
    with pytest.raises(DataError, match="empty"):
        distill(recipe_from_dict(raw), reporter=Recorder())


def test_prerequisite_recipe_builds_a_missing_teacher(tmp_path):
    """A model whose `recipe` says how to make it is trained first, then used."""
    teacher_out = tmp_path / "teacher-run"
    teacher_recipe = tmp_path / "teacher.toml"
    teacher_recipe.write_text(
        '[student]\npath = "zoo:tiny-teacher"\n[data]\nshapes_size = 16\n[stages.finetune]\nsteps = 2\nbatch_size = 4\n'
        f'[train]\noutput_dir = "{teacher_out}"\neval_items = 0\n'
    )
    raw = _recipe(tmp_path / "out", stages=("align",), steps=1).to_dict()
    raw["teacher"] = {"path": str(teacher_out / "student"), "recipe": str(teacher_recipe)}
    rec = Recorder()
    distill(recipe_from_dict(raw), reporter=rec)
    assert [s for s, *_ in rec.rows] == ["teacher/finetune", "teacher/finetune", "align"]
    assert (teacher_out / "student" / "model.safetensors").exists()
    rec2 = Recorder()  # second time: the teacher exists and is reused
    distill(recipe_from_dict(raw), reporter=rec2, overwrite=True)
    assert [s for s, *_ in rec2.rows] == ["align"]


def test_distill_stage_leaves_the_teacher_bit_identical(tmp_path, tiny_pair):
    """run_stage on a loaded teacher: its weights and the student's vision encoder do not move."""
    from accelerate import Accelerator

    from genrecal_cli.models import load_vlm
    from genrecal_cli.engine.recalibrator import Recalibrator
    from genrecal_cli.engine.stages import Run, run_stage
    from genrecal_cli.engine.teacher.part import TeacherPart
    from genrecal_cli.engine.teacher.source import OnlineTeacher
    from genrecal_cli.commands.distill import load_rows
    from genrecal_cli.world.zoo import resolve_source

    teacher = load_vlm(resolve_source("zoo:tiny-teacher"))
    student = load_vlm(resolve_source("zoo:tiny-student"))
    teacher.model.requires_grad_(False)
    before_t = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    before_s = {k: v.clone() for k, v in student.model.state_dict().items()}
    rec = Recalibrator(teacher.hidden_size, student.text_config, student.decoder_layer_class)
    recipe = _recipe(tmp_path, stages=("distill",), steps=2)
    part = TeacherPart(recipe.teacher_views()[0], teacher, OnlineTeacher(teacher, "hidden"), recalibrator=rec)
    run_stage(Run(recipe, Accelerator(cpu=True), student, [part], load_rows(recipe.data, "train")), "distill")
    after_t, after_s = teacher.model.state_dict(), student.model.state_dict()
    assert all(torch.equal(before_t[k], after_t[k]) for k in before_t)
    assert all(torch.equal(before_s[k], after_s[k]) for k in before_s if "vision_tower" in k)
    assert any(not torch.equal(before_s[k], after_s[k]) for k in before_s if "language_model" in k)


def test_gradient_accumulation_draws_accum_batches_per_update(tmp_path, monkeypatch, tiny_pair):
    from genrecal_cli.data.loader import Collator

    batches = []
    real_call = Collator.__call__
    monkeypatch.setattr(Collator, "__call__", lambda self, items: batches.append(1) or real_call(self, items))
    raw = _recipe(tmp_path, stages=("finetune",), steps=3).to_dict()
    raw.pop("teacher")
    raw["stages"]["finetune"].update(batch_size=2, grad_accum=2)
    rec = Recorder()
    distill(recipe_from_dict(raw), reporter=rec)
    assert [s for _, s, _ in rec.rows] == [1, 2, 3]
    assert len(batches) == 6  # 3 updates x 2 micro-batches
    assert rec.rows[0][2]["lr"] == pytest.approx(1e-3) and rec.rows[-1][2]["lr"] == pytest.approx(1e-4)


def test_reliance_probe_is_logged_in_teacher_stages_only(full_run, tiny_pair):
    """The probe runs at the last step of align and distill (probe_every 50 > 3 steps), never in
    finetune, and what it logged at align's end is reliance() recomputed from align's checkpoint
    on the same batch (the first probe_items training items)."""
    from genrecal_cli.data.loader import Collator, PairDataset
    from genrecal_cli.commands.metrics_view import PROBE_KEYS
    from genrecal_cli.engine.objective import StudentAndRecalibrator
    from genrecal_cli.engine.probe import reliance
    from genrecal_cli.engine.recalibrator import Recalibrator
    from genrecal_cli.engine.teacher import head_fn, teacher_features
    from genrecal_cli.models import load_vlm
    from genrecal_cli.commands.distill import load_rows

    out, _, rec = full_run
    probed = {(stage, step) for stage, step, m in rec.rows if set(PROBE_KEYS) <= set(m)}
    assert probed == {("align", 3), ("distill", 3)}
    logged = next(m for stage, step, m in rec.rows if (stage, step) == ("align", 3))

    teacher, _ = tiny_pair
    student = load_vlm(str(out / "align" / "student"))
    recal = Recalibrator(teacher.hidden_size, student.text_config, student.decoder_layer_class)
    recal.load_state_dict(load_file(str(out / "align" / "recalibrator.safetensors")))
    recipe = _recipe(out, eval_items=6)
    sides = {"teacher": teacher.processor, "student": student.processor}
    dataset = PairDataset(load_rows(recipe.data, "train"), recipe.data, sides)
    batch = Collator(sides)([dataset[i] for i in range(recipe.train.probe_items)])  # none skipped in shapes
    module = StudentAndRecalibrator(student.model, recal, recipe.loss).eval()
    again = reliance(module, batch["student"], teacher_features(teacher, batch["teacher"], "hidden"), head_fn(teacher.head))
    assert set(again) == set(PROBE_KEYS)
    for k in PROBE_KEYS:
        assert logged[k] == pytest.approx(again[k], abs=1e-5), k


def _probe_setup(tiny_pair, answer_input="hidden"):
    from genrecal_cli.data.loader import Collator, PairDataset
    from genrecal_cli.engine.objective import StudentAndRecalibrator
    from genrecal_cli.engine.recalibrator import Recalibrator
    from genrecal_cli.engine.teacher import head_fn, teacher_features
    from genrecal_cli.commands.distill import load_rows

    teacher, student = tiny_pair
    recipe = _recipe("unused", stages=("align",))
    sides = {"teacher": teacher.processor, "student": student.processor}
    ds = PairDataset(load_rows(recipe.data, "train").select(range(6)), recipe.data, sides)
    batch = Collator(sides)([ds[i] for i in range(len(ds))])
    torch.manual_seed(0)
    rec = Recalibrator(teacher.hidden_size, student.text_config, student.decoder_layer_class)
    module = StudentAndRecalibrator(student.model, rec, recipe.loss).eval()
    return module, batch["student"], teacher_features(teacher, batch["teacher"], answer_input), head_fn(teacher.head)


def test_reliance_real_matches_the_training_loss_and_a_blind_recalibrator_shows_no_reliance(tiny_pair):
    from genrecal_cli.engine import losses
    from genrecal_cli.data.loader import model_inputs
    from genrecal_cli.engine.objective import student_question
    from genrecal_cli.engine.probe import reliance

    module, sbatch, tf, head = _probe_setup(tiny_pair)
    out = reliance(module, sbatch, tf, head)
    # "real" is the training forward: its per-token L_ar, weighted by token counts, is L_ar
    with torch.no_grad():
        q = student_question(module.student.model(**model_inputs(sbatch)).last_hidden_state, sbatch)
        rows = module.recalibrator(q, tf.answer)
        ar, _ = losses.recalibration_terms(head, rows, tf.rows, tf.targets)
    n_first = len(sbatch["input_ids"])  # one turn per shapes item: one first token each
    n_later = len(tf.targets) - n_first
    mixed = (out["rely_first_ar_real"] * n_first + out["rely_later_ar_real"] * n_later) / len(tf.targets)
    assert abs(mixed - ar.item()) < 1e-4
    # a random Recalibrator already reads the student: the first token changes with its features
    assert out["rely_first_ar_real"] != out["rely_first_ar_zero"]

    # one that never looks at the student's features: every variant gives the same numbers
    real_forward = module.recalibrator.forward
    module.recalibrator.forward = lambda question, *a, **k: real_forward(question.with_x(torch.ones_like(question.x)), *a, **k)
    blind = reliance(module, sbatch, tf, head)
    for part in ("first", "later"):
        for what in ("top1", "ar"):
            values = [blind[f"rely_{part}_{what}_{v}"] for v in ("real", "other", "zero")]
            assert max(values) - min(values) < 1e-5, (part, what, values)


def test_uld_baseline_distills_without_a_recalibrator(tmp_path, tiny_pair):
    raw = _recipe(tmp_path, stages=("distill",), steps=3).to_dict()
    raw["loss"] = {"ar": 0.0, "kl": 0.0, "reg": 0.0, "uld": 1.0, "sft": 1.0}
    rec = Recorder()
    distill(recipe_from_dict(raw), reporter=rec)
    assert not (tmp_path / "distill" / "recalibrator.safetensors").exists()
    for _, _, m in rec.rows:
        assert {"uld", "sft"} <= set(m) and not {"ar", "kl", "reg"} & set(m)
        assert 0.0 < m["uld"] <= 2.0  # an L1 distance between two probability vectors
        assert abs(m["loss"] - m["uld"] - m["sft"]) < 1e-4
    _, student = tiny_pair
    after = _student_weights(tmp_path / "distill" / "student")
    before = student.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after if "language_model" in k)


def test_classic_kd_distills_a_student_that_shares_the_teachers_tokenizer(tmp_path, tiny_pair):
    # zoo:qwen2_vl: another size of the teacher's family, with its tokenizer and ChatML template
    raw = _recipe(tmp_path, stages=("distill",), steps=3).to_dict()
    raw["student"] = {"path": "zoo:qwen2_vl"}
    raw["loss"] = {"ar": 0.0, "kl": 0.0, "reg": 0.0, "kd": 1.0, "sft": 1.0}
    rec = Recorder()
    distill(recipe_from_dict(raw), reporter=rec)
    assert not (tmp_path / "distill" / "recalibrator.safetensors").exists()
    assert rec.rows
    for _, _, m in rec.rows:
        assert {"kd", "sft"} <= set(m) and not {"ar", "kl", "reg", "uld"} & set(m)
        assert 0.0 < m["kd"] < 50.0
        assert abs(m["loss"] - m["kd"] - m["sft"]) < 1e-4
    kd_only = [m["kd"] for _, _, m in rec.rows]
    # with kd at weight 2 the logged loss counts it twice: the weight reaches the objective
    raw["loss"]["kd"] = 2.0
    raw["train"]["output_dir"] = str(tmp_path / "twice")
    rec2 = Recorder()
    distill(recipe_from_dict(raw), reporter=rec2)
    m = rec2.rows[0][2]
    assert abs(m["loss"] - 2 * m["kd"] - m["sft"]) < 1e-4 and abs(m["kd"] - kd_only[0]) < 1e-4
    # in bf16 (autocast, in a process of its own: accelerate fixes the precision per process; the
    # loss itself sums in fp32): the same first-step KD within bf16's precision
    recipe, out = tmp_path / "bf16.toml", tmp_path / "bf16"
    recipe.write_text(
        '[teacher]\npath = "zoo:tiny-teacher"\n[student]\npath = "zoo:qwen2_vl"\n[data]\nshapes_size = 32\n'
        'max_length = 256\n[loss]\nar = 0.0\nkl = 0.0\nreg = 0.0\nkd = 1.0\n'
        '[stages.distill]\nsteps = 2\nbatch_size = 4\nlr = 1e-3\nlr_end = 1e-4\n'
        f'[train]\noutput_dir = "{out}"\nlog_every = 1\neval_items = 0\nprecision = "bf16"\n')
    done = run_cli("distill", str(recipe))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[0]["kd"] == pytest.approx(kd_only[0], rel=0.05)


def test_classic_kd_across_tokenizers_is_refused_in_one_line(tmp_path):
    recipe = tmp_path / "kd.toml"
    recipe.write_text(
        '[teacher]\npath = "zoo:tiny-teacher"\n[student]\npath = "zoo:tiny-student"\n[data]\nshapes_size = 16\n'
        '[loss]\nar = 0.0\nkl = 0.0\nreg = 0.0\nkd = 1.0\n[stages.distill]\nsteps = 1\nbatch_size = 2\n'
        f'[train]\noutput_dir = "{tmp_path / "out"}"\neval_items = 0\n'
    )
    out = run_cli("distill", str(recipe))
    assert out.returncode == 1, out.stderr
    err = out.stderr.strip()
    assert "loss.kd" in err and "different vocabularies" in err and "GenRecal" in err and "ULD" in err
    assert "Traceback" not in out.stderr and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before anything was written


def _imports(folder) -> list[tuple[str, list[str]]]:
    """(file:line, the dotted names an import statement names) for every import in folder's files."""
    import ast

    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                found.append((f"{path.name}:{node.lineno}", [("." * node.level) + (node.module or "")] + [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                found.append((f"{path.name}:{node.lineno}", [a.name for a in node.names]))
    return found


def test_the_engine_never_imports_the_tiny_world():
    """zoo: models and the shapes data are resolved at the edge (commands/distill.py) and handed in."""
    from .conftest import ROOT

    offenders = [where for where, names in _imports(ROOT / "genrecal_cli" / "engine")
                 if any(part in ("world", "zoo", "shapes") for n in names for part in n.replace(".", " ").split())]
    assert not offenders
    assert "object.__setattr__" not in "".join(p.read_text() for p in (ROOT / "genrecal_cli" / "engine").glob("*.py"))


def test_the_core_never_imports_a_command():
    """engine/ and data/ feed the commands, never the other way round; the top of the package
    holds only the CLI, the recipe, the model view and the errors."""
    from .conftest import ROOT

    pkg = ROOT / "genrecal_cli"
    for part in ("engine", "data"):
        offenders = [where for where, names in _imports(pkg / part) if any("commands" in n.split(".") for n in names)]
        assert not offenders, (part, offenders)
    top = sorted(p.name for p in pkg.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file())
    assert top == ["__init__.py", "__main__.py", "cli.py", "commands", "data", "engine", "errors.py", "models",
                   "recipe", "world"]


def test_a_student_from_a_real_checkpoint_keeps_its_own_processor_files(tmp_path, tiny_pair):
    """A checkpoint as the hub ships it names its stock processor class and may carry an auto_map;
    the exported student keeps the processor files as they came (not genrecal's image-only
    stand-in class), and names no module it does not hold."""
    import shutil

    teacher, _ = tiny_pair
    real = tmp_path / "real-qwen2-vl"
    shutil.copytree(teacher.path, real)
    proc_cfg = json.loads((real / "processor_config.json").read_text())
    proc_cfg["processor_class"] = "Qwen2VLProcessor"  # what a real Qwen2-VL checkpoint says
    (real / "processor_config.json").write_text(json.dumps(proc_cfg))
    template = (real / "chat_template.jinja").read_text() + "{#- as shipped -#}"
    (real / "chat_template.jinja").write_text(template)
    config = json.loads((real / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_gone.GoneConfig"}  # its module is not in the folder
    (real / "config.json").write_text(json.dumps(config))
    tok_cfg = json.loads((real / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": ["tokenization_here.HereTokenizer", None]}
    (real / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (real / "tokenization_here.py").write_text("# the folder's own tokenizer code\n")

    raw = {"student": {"path": str(real)}, "data": {"shapes_size": 8, "max_length": 256},
           "stages": {"finetune": {"steps": 1, "batch_size": 4, "lr": 1e-4}},
           "train": {"output_dir": str(tmp_path / "out"), "eval_items": 0}}
    result = distill(recipe_from_dict(raw))
    for folder in (result.student_dir, tmp_path / "out" / "finetune" / "student"):
        assert json.loads((folder / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
        assert (folder / "chat_template.jinja").read_text() == template
        assert (folder / "tokenizer.json").read_bytes() == (real / "tokenizer.json").read_bytes()
        assert "auto_map" not in json.loads((folder / "config.json").read_text())
        assert json.loads((folder / "tokenizer_config.json").read_text())["auto_map"] == tok_cfg["auto_map"]
        assert (folder / "tokenization_here.py").is_file()
        assert sorted(p.name for p in folder.iterdir() if p.name in _PROCESSOR_SIDE) == \
            sorted(p.name for p in real.iterdir() if p.name in _PROCESSOR_SIDE)


_PROCESSOR_SIDE = {"processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "chat_template.json"}


def test_data_without_a_validation_split_holds_out_the_tables_rows_and_says_so(tmp_path, monkeypatch, tiny_pair):
    """A single file is no validation split: the table scores its first train.eval_items rows,
    which are never trained on (also streamed, and before data.num_train's cut), and says so."""
    from genrecal_cli.engine import accuracy as accuracy_module
    from genrecal_cli.engine.teacher.cache import fingerprint
    from genrecal_cli.errors import DataError
    from genrecal_cli.commands.distill import resolve

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is item {i}?", "answer": f"Item {i}."}) + "\n"
                            for i in range(10)))
    raw = _recipe(tmp_path / "out", stages=("finetune",), steps=1, eval_items=3).to_dict()
    raw.pop("teacher")
    raw["data"] = {"source": str(data), "max_length": 128}

    def questions(rows):
        return [int(r["question"].split()[-1][:-1]) for r in rows]

    inputs = resolve(recipe_from_dict(raw))
    assert questions(inputs.validation) == [0, 1, 2] and questions(inputs.train) == list(range(3, 10))
    assert inputs.held_out == 3 and inputs.validation_title == "3 items held out of the training data"
    streamed = {**raw, "data": {**raw["data"], "streaming": True}}
    inputs = resolve(recipe_from_dict(streamed))
    assert questions(inputs.validation) == [0, 1, 2] and questions(inputs.train) == list(range(3, 10))
    cut = resolve(recipe_from_dict({**raw, "data": {**raw["data"], "num_train": 2}}))
    assert questions(cut.train) == [3, 4] and questions(cut.validation) == [0, 1, 2]
    # the cache knows which rows were held out: a teacher's features for other rows are refused
    both = {**raw, "teacher": {"path": "zoo:tiny-teacher"}}
    teacher = resolve(recipe_from_dict(both), needs_teacher=True).teacher
    assert fingerprint(recipe_from_dict(both), teacher, 3)["the data"] != fingerprint(recipe_from_dict(both), teacher, 0)["the data"]

    asked = []
    monkeypatch.setattr(accuracy_module, "generate_answers",
                        lambda vlm, prompts, images, **kw: asked.extend(p.messages[-1]["content"] for p in prompts)
                        or ["Item 0."] * len(prompts))
    rec = Recorder()
    result = distill(recipe_from_dict(raw), reporter=rec)
    assert all("item 0?" in q or "item 1?" in q or "item 2?" in q for q in map(str, asked)) and len(asked) == 6
    assert result.accuracy["student after"]["n"] == 3 and result.accuracy_on == "3 items held out of the training data"
    assert any("has no 'validation' split: its first 3 rows are held out" in n for n in rec.notes)
    saved = json.loads((tmp_path / "out" / "student" / "genrecal.json").read_text())
    assert saved["accuracy_on"] == "3 items held out of the training data"

    # more rows asked for the table than the file can spare: one line naming the keys
    with pytest.raises(DataError, match=r"d\.jsonl: 10 rows and no 'validation' split: holding out train\.eval_items = 10"):
        resolve(recipe_from_dict({**raw, "train": {**raw["train"], "eval_items": 10}}))

    # a folder with a validation file: that is the table's rows, and every train row trains
    folder = tmp_path / "split"
    folder.mkdir()
    (folder / "train.jsonl").write_text(data.read_text())
    (folder / "validation.jsonl").write_text("".join(data.read_text().splitlines(keepends=True)[7:]))
    inputs = resolve(recipe_from_dict({**raw, "data": {**raw["data"], "source": str(folder)}}))
    assert questions(inputs.train) == list(range(10)) and questions(inputs.validation) == [7, 8, 9]
    assert inputs.held_out == 0 and inputs.validation_title == "the validation split"
