"""The memory plan (`genrecal distill --dry-run --gpus N --gpu-memory GIB`): parameter counts
from published configs and safetensors headers, what sharding and checkpointing change, the
activation formula against the tensors PyTorch keeps, verdicts and suggestions, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from genrecal_cli.errors import GenrecalError
from genrecal_cli.commands.plan.estimate import estimate, layer_activations
from genrecal_cli.commands.plan.model_shape import Decoder, read_shape, shape_from_config
from genrecal_cli.commands.plan.make import GIB, make_plan
from genrecal_cli.recipe import ModelSpec, load_recipe

from .conftest import ROOT, heavy_imports

CONFIGS = ROOT / "tests" / "fixtures" / "configs"
# Published sizes (model cards; the Qwen2-VL-2B and -7B ones are their index.json total_size / 2).
PUBLISHED = {"Qwen2-VL-2B-Instruct": 2.21e9, "Qwen2-VL-7B-Instruct": 8.29e9, "Qwen2-VL-72B-Instruct": 73.4e9,
             "InternVL3-78B-hf": 78.4e9}
INTERNVL = ("recipes/internvl-to-qwen.toml", "InternVL3-78B-hf", "Qwen2-VL-2B-Instruct")
QWEN72 = ("recipes/qwen2vl-72b-to-2b.toml", "Qwen2-VL-72B-Instruct", "Qwen2-VL-2B-Instruct")


def fixture_recipe(recipe: str, teacher: str, student: str, *sets: str):
    return load_recipe(ROOT / recipe, [f"teacher.path={CONFIGS / teacher}", f"student.path={CONFIGS / student}", *sets])


def stage(plan, name):
    return next(m for m in plan.stages if m.stage == name)


def config(name: str) -> dict:
    return json.loads((CONFIGS / name / "config.json").read_text())


# ---------------------------------------------------------------------------------------------
# parameter counts


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_counts_from_published_configs_match_the_published_sizes(name):
    shape = shape_from_config(config(name), name)
    assert abs(shape.total / PUBLISHED[name] - 1) < 0.03, shape.total
    assert shape.counted == "from config"


def test_config_arithmetic_equals_transformers_on_the_meta_device():
    """Every family's arithmetic against the model transformers builds from the same config."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from genrecal_cli.world.zoo import DEFAULT_STYLE, resolve_source

    folders = [CONFIGS / n for n in sorted(PUBLISHED)] + [Path(resolve_source(f"zoo:{f}")) for f in DEFAULT_STYLE]
    for folder in folders:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder))
        shape = shape_from_config(json.loads((folder / "config.json").read_text()), str(folder))
        assert shape.total == sum(p.numel() for p in model.parameters()), folder.name
        image_side = sum(p.numel() for n, p in model.named_parameters() if n.startswith(
            ("model.visual.", "model.vision_tower.", "model.vision_model.", "model.multi_modal_projector.", "model.connector.")))
        assert shape.parts["vision"] + shape.parts["projector"] == image_side, folder.name


def test_safetensors_headers_count_every_parameter_of_a_zoo_model():
    from transformers import AutoModelForImageTextToText

    from genrecal_cli.world.zoo import resolve_source

    for name in ("zoo:qwen2_vl", "zoo:llava", "zoo:internvl"):
        shape = read_shape(ModelSpec(path=name), "student")
        model = AutoModelForImageTextToText.from_pretrained(resolve_source(name))
        assert shape.counted == "from weights"
        assert shape.total == sum(p.numel() for p in model.parameters()), name
        assert shape.weight_bytes == sum(p.numel() * p.element_size() for p in model.parameters()), name
        assert shape.parts == shape_from_config(json.loads((Path(resolve_source(name)) / "config.json").read_text()), name).parts


def test_the_old_and_the_transformers_5_qwen2_vl_layouts_count_the_same():
    old = config("Qwen2-VL-7B-Instruct")
    text = {k: old.pop(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                    "num_key_value_heads", "vocab_size")}
    new = {**old, "text_config": {"model_type": "qwen2_vl_text", **text}}
    assert shape_from_config(new, "new").total == shape_from_config(config("Qwen2-VL-7B-Instruct"), "old").total


# ---------------------------------------------------------------------------------------------
# the estimate


def test_a_sharded_teacher_holds_an_eighth_plus_its_whole_head():
    replicated = make_plan(fixture_recipe(*INTERNVL, "parallel.teacher=replicate"), 8, 80)
    sharded = make_plan(fixture_recipe(*INTERNVL), 8, 80)
    t = sharded.job.teacher
    whole = stage(replicated, "distill").static["teacher weights"]
    eighth = stage(sharded, "distill").static["teacher weights (1/8 + LM head whole)"]
    assert whole == 2 * t.total
    assert eighth == int(2 * ((t.total - t.parts["head"]) / 8 + t.parts["head"]))
    assert 0.125 < eighth / whole < 0.14
    gathered = stage(sharded, "distill").phases["teacher forward"]["teacher gathered (FSDP: root + 2 units)"]
    assert gathered == 2 * (t.root + 2 * t.unit) and gathered < eighth


def test_sharding_the_student_over_two_gpus_halves_its_states():
    ddp = stage(make_plan(fixture_recipe(*QWEN72, "parallel.student=ddp"), 2, 80), "distill")
    shard = stage(make_plan(fixture_recipe(*QWEN72, "parallel.student=shard"), 2, 80), "distill")
    for key in ("student weights (fp32 masters)", "student grads + AdamW states (fp32)",
                "Recalibrator: weights, grads, states"):
        assert shard.static[key] == pytest.approx(ddp.static[key] / 2, abs=1), key
    assert "DDP gradient buckets" in ddp.static and "DDP gradient buckets" not in shard.static
    one = stage(make_plan(fixture_recipe(*QWEN72, "parallel.student=shard", "parallel.teacher=replicate"), 1, 80), "distill")
    assert one.static["student weights (fp32 masters)"] == 2 * shard.static["student weights (fp32 masters)"]


def test_gradient_checkpointing_lowers_the_student_activations():
    off = make_plan(fixture_recipe(*INTERNVL), 8, 80)
    on = make_plan(fixture_recipe(*INTERNVL, "train.gradient_checkpointing=true"), 8, 80)
    for name in ("distill", "finetune"):
        a_off = stage(off, name).phases["student forward + backward"]["student activations"]
        a_on = stage(on, name).phases["student forward + backward"]["student activations"]
        assert a_on < a_off / 5
        assert stage(off, name).other_checkpointing == a_on and stage(on, name).other_checkpointing == a_off
    def student_phase(plan):
        return sum(stage(plan, "distill").phases["student forward + backward"].values())

    # the student's phase shrinks; the stage's peak may then be another phase (the probe's)
    assert student_phase(on) < student_phase(off) and stage(on, "distill").total <= stage(off, "distill").total


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_layer_activations_equal_what_pytorch_keeps_for_backward(precision):
    """The per-layer formula against the tensors autograd saves for an HF Llama layer (the
    difference between a 2- and a 1-layer model, over two batch sizes: weights cancel out)."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    h, i, heads, kv, S = 96, 256, 4, 2, 32
    torch.manual_seed(0)

    def saved(layers: int, batch: int) -> int:
        cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv, vocab_size=100)
        cfg._attn_implementation = "sdpa"
        model = LlamaModel(cfg)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 100, (batch, S))
        mask = torch.ones(batch, S, dtype=torch.long)
        mask[0, -3:] = 0
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert out.requires_grad
        return sum(seen.values())

    per_token = ((saved(2, 4) - saved(2, 2)) - (saved(1, 4) - saved(1, 2))) / (2 * S)
    dec = Decoder(h, i, 1, heads, kv, h // heads, 100, False, False, False)
    assert layer_activations(dec, 2 if precision == "bf16" else 4) == pytest.approx(per_token, rel=0.03)


# ---------------------------------------------------------------------------------------------
# verdicts and suggestions


@pytest.mark.parametrize("pair", [INTERNVL, QWEN72], ids=["internvl-to-qwen", "qwen2vl-72b-to-2b"])
def test_the_shipped_recipes_on_eight_80_gib_gpus(pair):
    shipped = make_plan(fixture_recipe(*pair), 8, 80)  # teacher and student sharded
    assert shipped.fits and shipped.suggestion is None and shipped.peak.stage == "distill"
    replicated = make_plan(fixture_recipe(*pair, "parallel.teacher=replicate"), 8, 80)
    assert not replicated.fits and replicated.needed > shipped.needed + 100 * GIB
    assert replicated.suggestion["changes"] == ["shard the teacher"]
    assert replicated.suggestion["set"] == ["parallel.teacher=shard"]
    # The student under DDP (every item at 2048 tokens, no checkpointing): a few GiB short.
    ddp = make_plan(fixture_recipe(*pair, "parallel.student=ddp"), 8, 80)
    assert not ddp.fits and ddp.needed < 90 * GIB and ddp.suggestion["changes"] == ["shard the student"]
    both = make_plan(fixture_recipe(*pair, "parallel.student=ddp", "parallel.teacher=replicate"), 8, 80)
    assert both.suggestion["changes"] == ["shard the teacher", "shard the student"]


def test_a_suggestion_is_the_plan_of_the_changed_recipe():
    """What a suggestion says is what planning the recipe with its --set changes gives."""
    cases = [(fixture_recipe(*QWEN72, "parallel.teacher=replicate", "parallel.student=ddp"), 8, 80),
             (fixture_recipe("recipes/qwen2vl-72b-to-2b.toml", "Qwen2-VL-72B-Instruct", "Qwen2-VL-7B-Instruct",
                             "parallel.student=ddp"), 8, 80)]
    for recipe, gpus, gib in cases:
        plan = make_plan(recipe, gpus, gib)
        assert not plan.fits and plan.suggestion["fits"]
        again = make_plan(load_recipe(recipe.origin, [*_sets_of(recipe), "parallel.student=ddp", *plan.suggestion["set"]]),
                          plan.suggestion["gpus"], gib)
        assert again.fits
        assert round(again.needed / GIB, 1) == plan.suggestion["needed_gib"]
    assert make_plan(cases[1][0], 8, 80).suggestion["changes"] == ["shard the student", "gradient checkpointing"]


def test_smaller_batches_then_more_gpus():
    base = ("parallel.student=shard", "train.gradient_checkpointing=true", "train.probe_every=0")  # batch-bound
    recipe = fixture_recipe(*QWEN72, *base)
    at_two = make_plan(recipe, 8, 80)
    at_one = make_plan(fixture_recipe(*QWEN72, *base, *(f"stages.{s}.batch_size=1" for s in ("align", "distill", "finetune"))), 8, 80)
    # a GPU between what batch 1 and batch 2 need: halving the batch is the change
    gib = (at_one.needed + at_two.needed) / 2 / GIB
    plan = make_plan(recipe, 8, gib)
    assert plan.suggestion["changes"] == ["smaller batch_size, larger grad_accum"]
    assert "stages.distill.batch_size=1" in plan.suggestion["set"] and "stages.distill.grad_accum=32" in plan.suggestion["set"]
    # below what batch 1 needs on 8 GPUs: more GPUs shrink the sharded copies
    tight = make_plan(fixture_recipe(*QWEN72, *base, *(f"stages.{s}.batch_size=1" for s in ("align", "distill", "finetune"))),
                      8, at_one.needed / GIB - 4)
    assert tight.suggestion["changes"] == ["more GPUs"] and tight.suggestion["gpus"] > 8


def _sets_of(recipe) -> list[str]:
    return [f"teacher.path={recipe.teacher.path}", f"student.path={recipe.student.path}"]


# ---------------------------------------------------------------------------------------------
# sources and the CLI


def test_an_offline_hub_id_is_one_line_naming_it(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection to the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(GenrecalError) as info:
        read_shape(ModelSpec(path="OpenGVLab/InternVL3-78B-hf"), "teacher")
    message = str(info.value)
    assert "\n" not in message
    assert "OpenGVLab/InternVL3-78B-hf" in message and "config.json" in message and "--set teacher.path=" in message


def test_the_plan_from_the_cli_with_json(cli, tmp_path):
    out = tmp_path / "plan.json"
    sets = ["--set", f"teacher.path={CONFIGS / 'InternVL3-78B-hf'}", "--set", f"student.path={CONFIGS / 'Qwen2-VL-2B-Instruct'}"]
    res = cli("distill", "recipes/internvl-to-qwen.toml", "--dry-run", "--gpus", "8", "--gpu-memory", "80", *sets,
              "--set", "parallel.student=ddp", "--json", str(out))
    assert res.returncode == 0, res.stderr
    assert "memory plan per GPU" in res.stdout and "teacher weights (1/8 + LM head whole)" in res.stdout
    assert "does not fit" in res.stdout and "shard the student" in res.stdout
    data = json.loads(out.read_text())
    assert {"gpus", "gpu_memory_gib", "models", "stages", "peak_stage", "needed_bytes", "fits", "suggestion", "assumptions"} <= set(data)
    assert set(data["stages"]) == {"align", "distill", "finetune"}
    assert data["models"]["teacher"]["params"] == 78_408_318_336 and data["models"]["teacher"]["counted"] == "from config"
    assert data["stages"]["distill"]["total_bytes"] == data["peak_bytes"]
    res = cli("distill", "recipes/internvl-to-qwen.toml", "--dry-run", "--gpus", "8", "--gpu-memory", "80", *sets,
              "--json", "-")  # as shipped: teacher and student sharded
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["fits"] is True


def test_cli_errors_are_one_line_exit_1(cli):
    for args, text in [
        (["--gpus", "8", "--gpu-memory", "80"], "add --dry-run"),
        (["--dry-run", "--gpus", "8"], "go together"),
        (["--json", "-"], "add --dry-run"),
        (["--dry-run", "--gpus", "0", "--gpu-memory", "80"], "at least 1"),
        (["--dry-run", "--gpus", "8", "--gpu-memory", "80"], "OpenGVLab/InternVL3-78B-hf"),  # offline hub id
    ]:
        out = cli("distill", "recipes/internvl-to-qwen.toml", *args)
        assert out.returncode == 1, (args, out.stderr)
        assert text in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_dry_run_without_gpus_keeps_the_stage_table(cli):
    out = cli("distill", "recipes/internvl-to-qwen.toml", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "distill" in out.stdout and "--gpus N --gpu-memory GIB" in out.stdout
    assert "memory plan per GPU" not in out.stdout


def test_planning_local_configs_imports_no_torch():
    argv = ["distill", "recipes/qwen2vl-72b-to-2b.toml", "--dry-run", "--gpus", "8", "--gpu-memory", "80",
            "--set", f"teacher.path={CONFIGS / 'Qwen2-VL-72B-Instruct'}",
            "--set", f"student.path={CONFIGS / 'Qwen2-VL-2B-Instruct'}", "--json", "-"]
    assert heavy_imports(argv) == []


def test_a_model_not_built_yet_is_planned_from_the_recipe_that_builds_it(tmp_path):
    (tmp_path / "builder.toml").write_text(
        f'[student]\npath = "{CONFIGS / "Qwen2-VL-7B-Instruct"}"\n[stages.finetune]\nsteps = 1\n')
    spec = ModelSpec(path=str(tmp_path / "not-yet" / "student"), recipe=str(tmp_path / "builder.toml"))
    shape = read_shape(spec, "teacher")
    assert shape.total == shape_from_config(config("Qwen2-VL-7B-Instruct"), "x").total
    assert "not built yet" in shape.note and shape.source == spec.path


def test_estimate_is_a_pure_function_of_the_settings():
    plan = make_plan(fixture_recipe(*INTERNVL), 8, 80)
    again = estimate(plan.job, plan.settings, "distill")
    assert again.total == stage(plan, "distill").total


def test_a_cached_teacher_is_planned_as_its_head_alone(tmp_path):
    """[teacher] cache: the run loads the teacher's LM head only (its input embeddings too for an
    id-only cache) and runs no teacher forward; the plan counts that, and suggests no teacher
    sharding. InternVL3-78B's untied head: 151,674 x 8,192 parameters in bf16."""
    online = make_plan(fixture_recipe(*INTERNVL), 8, 80)
    cached = make_plan(fixture_recipe(*INTERNVL, f"teacher.cache={tmp_path / 'c'}"), 8, 80)
    head = 151_674 * 8192 * 2
    distill = stage(cached, "distill")
    assert distill.static["teacher LM head (features from the cache)"] == head
    assert not any(k.startswith("teacher weights") for k in distill.static)
    assert "teacher forward" not in distill.phases and "teacher forward" in stage(online, "distill").phases
    assert cached.needed < online.needed
    assert "only its LM head loaded" in " ".join(cached.to_dict()["assumptions"])
    ids = make_plan(fixture_recipe(*INTERNVL, f"teacher.cache={tmp_path / 'c'}",
                                   "recalibrator.answer_input=embeddings"), 8, 80)
    assert stage(ids, "distill").static["teacher LM head + input embeddings (features from the cache)"] == 2 * head


def test_several_teachers_are_each_planned(tmp_path):
    """[[teachers]]: InternVL3-78B online and Qwen2-VL-72B from its cache into Qwen2-VL-2B. Each
    teacher's weights (or head) and Recalibrator stay; the online one's forward is planned with
    the other's features held; the plan needs more than the InternVL teacher alone."""
    import tomllib

    raw = tomllib.loads((ROOT / INTERNVL[0]).read_text())
    intern = {**raw.pop("teacher"), "name": "intern", "path": str(CONFIGS / INTERNVL[1])}
    raw["teachers"] = [intern, {"name": "qwen", "path": str(CONFIGS / QWEN72[1]), "dtype": "bfloat16",
                                "cache": str(tmp_path / "c")}]
    raw["student"]["path"] = str(CONFIGS / INTERNVL[2])
    from genrecal_cli.recipe import recipe_from_dict

    two = make_plan(recipe_from_dict(raw), 8, 80)
    alone = make_plan(fixture_recipe(*INTERNVL), 8, 80)
    d2, d1 = stage(two, "distill"), stage(alone, "distill")
    weights = next(k for k in d1.static if k.startswith("teacher weights"))
    assert d2.static[weights.replace("teacher", "teacher intern", 1)] == d1.static[weights]
    assert d2.static["teacher qwen LM head (features from the cache)"] == 152_064 * 8192 * 2  # its vocab x hidden, bf16
    rec = d2.static["Recalibrators: weights, grads, states"]
    assert rec > d1.static["Recalibrator: weights, grads, states"]
    assert rec == 16 * sum(t.rec_params for t in two.job.teachers()) / 8  # (the student is sharded over 8)
    assert d2.phases["teacher forward"]["the other teachers' features (fp32)"] > 0
    assert two.needed > alone.needed
    assert set(two.to_dict()["models"]["teachers"]) == {"intern", "qwen"}
