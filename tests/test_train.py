"""The engine on tiny models: what trains in each stage, losses, checkpoints, export, resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from genrecal_cli.errors import GenrecalError
from genrecal_cli.recipe import recipe_from_dict
from genrecal_cli.run import distill

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


def test_accuracy_is_measured_before_and_after(full_run):
    _, result, _ = full_run
    assert set(result.accuracy) == {"teacher", "student before", "student after"}
    for acc in result.accuracy.values():
        assert acc["n"] == 6 and 0.0 <= acc["accuracy"] <= 1.0


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
    out, _, _ = full_run
    _, student = tiny_pair  # the untouched built-in student
    before = student.model.state_dict()
    after_align = _student_weights(out / "align" / "student")
    assert all(torch.equal(before[k], v) for k, v in after_align.items())
    rec_align = load_file(str(out / "align" / "recalibrator.safetensors"))
    rec_distill = load_file(str(out / "distill" / "recalibrator.safetensors"))
    assert any(not torch.equal(rec_align[k], rec_distill[k]) for k in rec_align)


def test_distill_trains_the_language_body_not_the_vision_encoder(full_run):
    out, _, _ = full_run
    a = _student_weights(out / "align" / "student")
    d = _student_weights(out / "distill" / "student")
    vision = [k for k in a if "vision_tower" in k]
    language = [k for k in a if "language_model" in k]
    assert vision and language
    assert all(torch.equal(a[k], d[k]) for k in vision)
    assert sum(not torch.equal(a[k], d[k]) for k in language) > len(language) // 2


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
        if stage != "finetune":
            assert 0.0 <= m["boundary_agreement"] <= 1.0 and 0.0 <= m["top1"] <= 1.0


def test_exported_student_is_plain_and_generates(full_run):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out, result, _ = full_run
    assert result.student_dir == out / "student"
    saved = load_file(str(out / "student" / "model.safetensors"))
    assert not any("recalibrator" in k or "rec_body" in k or "proj_pre" in k for k in saved)
    weights = _student_weights(out / "student")
    assert torch.equal(weights["lm_head.weight"], _student_weights(out / "finetune" / "student")["lm_head.weight"])
    model = AutoModelForImageTextToText.from_pretrained(out / "student")
    processor = AutoProcessor.from_pretrained(out / "student")
    assert processor.chat_template
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "How many shapes are there?"}]}], add_generation_prompt=True
    )
    ids = processor(text=[prompt], return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]


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
    again = run_cli("distill", str(recipe))
    assert again.returncode == 1 and "already holds a run" in again.stderr


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
    from genrecal_cli.run import load_rows
    from genrecal_cli.world.zoo import resolve_source

    teacher = load_vlm(resolve_source("zoo:tiny-teacher"))
    student = load_vlm(resolve_source("zoo:tiny-student"))
    teacher.model.requires_grad_(False)
    before_t = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    before_s = {k: v.clone() for k, v in student.model.state_dict().items()}
    rec = Recalibrator(teacher.hidden_size, student.text_config, student.decoder_layer_class)
    recipe = _recipe(tmp_path, stages=("distill",), steps=2)
    run_stage(Run(recipe, Accelerator(cpu=True), student, teacher, rec, load_rows(recipe.data, "train")), "distill")
    after_t, after_s = teacher.model.state_dict(), student.model.state_dict()
    assert all(torch.equal(before_t[k], after_t[k]) for k in before_t)
    assert all(torch.equal(before_s[k], after_s[k]) for k in before_s if "vision_tower" in k)
    assert any(not torch.equal(before_s[k], after_s[k]) for k in before_s if "language_model" in k)


def test_gradient_accumulation_draws_accum_batches_per_update(tmp_path, monkeypatch, tiny_pair):
    from genrecal_cli.data import Collator

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


def test_reliance_probe_is_logged_in_teacher_stages_only(full_run):
    _, _, rec = full_run
    from genrecal_cli.display import PROBE_KEYS

    probed = {(stage, step) for stage, step, m in rec.rows if set(PROBE_KEYS) <= set(m)}
    assert probed == {("align", 3), ("distill", 3)}  # probe_every 50 > 3 steps: the last step only
    for stage, step, m in rec.rows:
        if (stage, step) in probed:
            assert all(0.0 <= m[k] <= 1.0 for k in PROBE_KEYS if "_top1_" in k)
            assert all(m[k] > 0 for k in PROBE_KEYS if "_ar_" in k)


def _probe_setup(tiny_pair, answer_input="hidden"):
    from genrecal_cli.data import Collator, PairDataset
    from genrecal_cli.engine.objective import GenRecal
    from genrecal_cli.engine.recalibrator import Recalibrator
    from genrecal_cli.engine.teacher import head_fn, teacher_features
    from genrecal_cli.run import load_rows

    teacher, student = tiny_pair
    recipe = _recipe("unused", stages=("align",))
    sides = {"teacher": teacher.processor, "student": student.processor}
    ds = PairDataset(load_rows(recipe.data, "train").select(range(6)), recipe.data, sides).scan()
    batch = Collator(sides)([ds[i] for i in range(len(ds))])
    torch.manual_seed(0)
    rec = Recalibrator(teacher.hidden_size, student.text_config, student.decoder_layer_class)
    module = GenRecal(student.model, rec, recipe.loss).eval()
    return module, batch["student"], teacher_features(teacher, batch["teacher"], answer_input), head_fn(teacher.head)


def test_reliance_real_matches_the_training_loss_and_a_blind_recalibrator_shows_no_reliance(tiny_pair):
    from genrecal_cli.engine import losses
    from genrecal_cli.data import model_inputs
    from genrecal_cli.engine.objective import student_question
    from genrecal_cli.engine.probe import reliance

    module, sbatch, tf, head = _probe_setup(tiny_pair)
    out = reliance(module, sbatch, tf, head)
    # "real" is the training forward: its per-token L_ar, weighted by token counts, is L_ar
    with torch.no_grad():
        q, mask = student_question(module.student.model(**model_inputs(sbatch)).last_hidden_state, sbatch)
        rows = module.recalibrator(q, mask, tf.answer_in, tf.answer_mask)[tf.answer_mask.bool()]
        ar, _ = losses.recalibration_terms(head, rows, tf.rows, tf.targets)
    n_first = len(sbatch["answer_start"])
    n_later = len(tf.targets) - n_first
    mixed = (out["rely_first_ar_real"] * n_first + out["rely_later_ar_real"] * n_later) / len(tf.targets)
    assert abs(mixed - ar.item()) < 1e-4
    # a random Recalibrator already reads the student: the first token changes with its features
    assert out["rely_first_ar_real"] != out["rely_first_ar_zero"]

    # one that never looks at the student's features: every variant gives the same numbers
    real_forward = module.recalibrator.forward
    module.recalibrator.forward = lambda question, *a, **k: real_forward(torch.ones_like(question), *a, **k)
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


def test_the_engine_never_imports_the_tiny_world():
    """zoo: models and the shapes data are resolved at the edge (run.py) and handed in."""
    import ast

    from .conftest import ROOT

    offenders = []
    for path in sorted((ROOT / "genrecal_cli" / "engine").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(part in ("world", "zoo", "shapes") for n in names for part in n.replace(".", " ").split()):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders
    assert "object.__setattr__" not in "".join(p.read_text() for p in (ROOT / "genrecal_cli" / "engine").glob("*.py"))
