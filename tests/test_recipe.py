"""Recipes: shipped ones validate; every kind of bad input is reported with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from genrecal_cli.errors import RecipeError
from genrecal_cli.recipe import Recipe, StageSpec, load_recipe, parse_override, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))

MINIMAL = {"student": {"path": "zoo:tiny-student"}, "stages": {"finetune": {"steps": 5}}}


def problems_of(raw, overrides=()):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw, overrides)
    return info.value.problems


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.stages.enabled(), "a shipped recipe runs at least one stage"
    assert recipe.origin == str(path)


def test_shipped_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"tiny-shapes.toml", "internvl-to-qwen.toml"} <= names


def test_minimal_recipe_gets_defaults_and_is_frozen():
    recipe = recipe_from_dict(MINIMAL)
    assert recipe.teacher is None
    assert recipe.stages.enabled() == ["finetune"]
    assert recipe.stages.align.enabled is False
    assert recipe.recalibrator.num_blocks == 2 and recipe.recalibrator.answer_input == "hidden"
    assert recipe.loss.temperature == 1.0
    with pytest.raises(Exception):
        recipe.train.seed = 3  # frozen dataclass


def test_int_is_accepted_for_float_but_not_bool_for_int():
    recipe = recipe_from_dict({**MINIMAL, "loss": {"kl": 2}})
    assert recipe.loss.kl == 2.0 and isinstance(recipe.loss.kl, float)
    probs = problems_of({**MINIMAL, "train": {"seed": True}})
    assert probs == ["train.seed: expected an integer, got a boolean True"]


def test_all_problems_are_collected_with_full_key_paths():
    raw = {
        "student": {"path": "./definitely/not/here", "dtyp": "float32"},
        "data": {"max_length": "long"},
        "stages": {"align": {"lr": -1.0, "steps": 0}, "distil": {"steps": 3}},
        "train": {"lerning_rate": 3},
    }
    probs = problems_of(raw)
    text = "\n".join(probs)
    assert "unknown key `student.dtyp`; did you mean `dtype`?" in text
    assert "student.path: path not found: ./definitely/not/here" in text
    assert "data.max_length: expected an integer, got a string 'long'" in text
    assert "stages.align.steps: 0 must be > 0" in text
    assert "stages.align.lr: learning rate -1.0 must be > 0" in text
    assert "unknown key `stages.distil`; did you mean `distill`?" in text
    assert "unknown key `train.lerning_rate`" in text
    assert len(probs) == 7


def test_literal_choices_get_did_you_mean():
    probs = problems_of({**MINIMAL, "recalibrator": {"answer_input": "embedding"}})
    assert probs == ["recalibrator.answer_input: 'embedding' is not one of 'hidden', 'embeddings'; did you mean 'embeddings'?"]


def test_missing_student_and_all_stages_disabled():
    probs = problems_of({"stages": {"finetune": {"enabled": False}}})
    assert "missing required key `student`" in probs


def test_all_stages_disabled_is_an_error():
    probs = problems_of({"student": {"path": "zoo:x"}, "stages": {"finetune": {"enabled": False, "steps": 1}}})
    assert any("every stage is disabled" in p for p in probs)


def test_align_without_teacher_is_an_error():
    probs = problems_of({"student": {"path": "zoo:x"}, "stages": {"align": {"steps": 3}}})
    assert probs == ["teacher: stage align need a teacher; add a [teacher] table with a `path`"] or any(
        "need a teacher" in p for p in probs
    )
    assert len(probs) == 1


def test_stage_needs_exactly_one_of_steps_or_epochs():
    probs = problems_of({**MINIMAL, "stages": {"finetune": {"steps": 3, "epochs": 1}}})
    assert probs == ["stages.finetune: give exactly one of `steps` or `epochs`"]
    probs = problems_of({**MINIMAL, "stages": {"finetune": {}}})
    assert probs == ["stages.finetune: give exactly one of `steps` or `epochs`"]


def test_a_present_stage_table_is_enabled_by_default():
    recipe = recipe_from_dict(MINIMAL)
    assert recipe.stages.finetune == StageSpec(enabled=True, steps=5)


def test_hub_ids_pass_and_missing_files_fail():
    ok = recipe_from_dict({**MINIMAL, "student": {"path": "Qwen/Qwen2-VL-2B-Instruct"}})
    assert ok.student.path == "Qwen/Qwen2-VL-2B-Instruct"
    probs = problems_of({**MINIMAL, "data": {"source": "data/train.jsonl"}})
    assert probs == ["data.source: path not found: data/train.jsonl"]


def test_overrides_apply_parse_types_and_are_validated():
    recipe = recipe_from_dict(MINIMAL, ["train.seed=3", "stages.finetune.lr=2e-4", "train.output_dir=out/x"])
    assert recipe.train.seed == 3
    assert recipe.stages.finetune.lr == 2e-4
    assert recipe.train.output_dir == "out/x"
    probs = problems_of(MINIMAL, ["train.sed=3"])
    assert probs == ["unknown key `train.sed`; did you mean `seed`?"]
    probs = problems_of(MINIMAL, ["train.seed=three"])
    assert probs == ["train.seed: expected an integer, got a string 'three'"]
    probs = problems_of(MINIMAL, ["noequals"])
    assert probs and probs[0].startswith("--set:")


def test_parse_override():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override('a="x y"') == (["a"], "x y")
    assert parse_override("a=plain") == (["a"], "plain")


def test_load_recipe_errors_name_the_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[student\npath = 'x'\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(bad)
    assert str(bad) in str(info.value)
    assert "line 1, column" in str(info.value)


def test_to_dict_round_trips(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "tiny-shapes.toml")
    again = recipe_from_dict(recipe.to_dict())
    assert again == recipe


def test_align_with_every_recalibrator_term_off_is_an_error():
    raw = {"teacher": {"path": "zoo:t"}, "student": {"path": "zoo:s"}, "stages": {"align": {"steps": 3}},
           "loss": {"ar": 0.0, "kl": 0.0, "reg": 0.0, "uld": 1.0}}
    probs = problems_of(raw)
    assert any(p.startswith("stages.align: trains the Recalibrator on loss.ar, loss.kl and loss.reg") for p in probs)


def test_a_uld_only_distill_needs_no_recalibrator():
    from genrecal_cli.recipe import recipe_from_dict

    base = {"teacher": {"path": "zoo:t"}, "student": {"path": "zoo:s"}, "stages": {"distill": {"steps": 3}}}
    assert recipe_from_dict(base).uses_recalibrator
    uld = recipe_from_dict({**base, "loss": {"ar": 0.0, "kl": 0.0, "reg": 0.0, "uld": 1.0}})
    assert not uld.uses_recalibrator and uld.loss.uld == 1.0


def test_probe_settings_are_checked():
    probs = problems_of({**MINIMAL, "train": {"probe_every": -1, "probe_items": 1}})
    assert any(p.startswith("train.probe_every: -1 must be >= 0") for p in probs)
    assert any(p.startswith("train.probe_items: 1 must be >= 2") for p in probs)


def test_parallel_table_and_its_limits():
    assert recipe_from_dict(MINIMAL).parallel.teacher == "replicate"
    assert recipe_from_dict({**MINIMAL, "parallel": {"teacher": "shard"}}).parallel.teacher == "shard"
    assert problems_of({**MINIMAL, "parallel": {"teacher": "shrad"}}) == [
        "parallel.teacher: 'shrad' is not one of 'replicate', 'shard'; did you mean 'shard'?"]
    assert recipe_from_dict({**MINIMAL, "parallel": {"student": "shard", "shard_group": 8}}).parallel.shard_group == 8
    assert problems_of({**MINIMAL, "parallel": {"student": "zero3"}}) == [
        "parallel.student: 'zero3' is not one of 'ddp', 'shard'"]
    assert problems_of({**MINIMAL, "parallel": {"shard_group": 0}}) == ["parallel.shard_group: 0 must be > 0"]


def test_fp16_with_a_sharded_student_is_refused_at_load():
    """fp16 needs a GradScaler that skips overflow steps; accelerate's does not reach an FSDP2
    student (gradients would stay scaled by 65,536 and overflows would step): refused in the
    recipe, while bf16 sharded and fp16 with DDP stay accepted."""
    fp16_shard = {**MINIMAL, "train": {"precision": "fp16"}, "parallel": {"student": "shard"}}
    [problem] = problems_of(fp16_shard)
    assert problem.startswith('parallel.student: "shard" with train.precision = "fp16" is not supported')
    assert 'train.precision = "bf16"' in problem and 'parallel.student = "ddp"' in problem
    assert recipe_from_dict({**fp16_shard, "train": {"precision": "bf16"}}).parallel.student == "shard"
    assert recipe_from_dict({**fp16_shard, "parallel": {"student": "ddp"}}).train.precision == "fp16"


def test_checkpoint_settings_are_checked():
    assert problems_of({**MINIMAL, "train": {"save_every": -1, "keep_checkpoints": 0}}) == [
        "train.save_every: -1 must be >= 0 (0 = only at the end of each stage)", "train.keep_checkpoints: 0 must be > 0"]


def test_the_launch_files_the_real_recipes_name_exist_and_start_the_processes_they_say():
    """Each real recipe's header names accelerate config files that exist; each loads as an
    accelerate cluster config of plain multi-GPU processes (no FSDP or mixed precision of its
    own: the recipe chooses those), with the process count its name says."""
    import re

    from accelerate.commands.config.config_args import load_config_from_file

    named = set()
    for recipe in ("internvl-to-qwen.toml", "qwen2vl-72b-to-2b.toml"):
        named |= set(re.findall(r"recipes/accelerate/[\w.-]+\.yaml", (ROOT / "recipes" / recipe).read_text()))
    assert named == {"recipes/accelerate/one-node-8gpu.yaml", "recipes/accelerate/two-nodes-8gpu.yaml"}
    for path, (machines, processes) in (("recipes/accelerate/one-node-8gpu.yaml", (1, 8)),
                                        ("recipes/accelerate/two-nodes-8gpu.yaml", (2, 16))):
        config = load_config_from_file(str(ROOT / path))
        assert (config.num_machines, config.num_processes) == (machines, processes)
        assert config.distributed_type.value == "MULTI_GPU" and config.mixed_precision == "no"


def test_a_teacher_recipe_is_needed_only_when_the_teacher_is_missing(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    raw = {"teacher": {"path": str(teacher), "recipe": str(tmp_path / "elsewhere.toml")},
           "student": {"path": "zoo:tiny-student"}, "stages": {"align": {"steps": 1}}}
    recipe_from_dict(raw)  # a copy of a recipe moved away from the recipe that builds its teacher: fine
    teacher.rmdir()
    assert any(p.startswith("teacher.recipe: recipe file not found") and "does not exist" in p
               for p in problems_of(raw))


def _problems(raw, *overrides) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict(raw, overrides)
    return caught.value.problems


def test_one_teachers_table_is_a_teacher_table_and_errors_name_the_teacher(tmp_path):
    """[[teachers]] (issue 31): one table means exactly what [teacher] means (its own
    [teachers.recalibrator] over the recipe's); errors name the teacher by position; what
    several teachers cannot do (all weights 0, loss.kd / loss.uld) is refused in one line; each
    teacher's view is the recipe as a run of it alone."""
    stages = {"distill": {"steps": 1}}
    one = recipe_from_dict({"student": {"path": "zoo:tiny-student"}, "stages": stages, "recalibrator": {"num_blocks": 3},
                            "teachers": [{"name": "charts", "path": "zoo:tiny-teacher", "dtype": "bfloat16",
                                          "recalibrator": {"answer_input": "embeddings"}}]})
    plain = recipe_from_dict({"student": {"path": "zoo:tiny-student"}, "stages": stages,
                              "recalibrator": {"num_blocks": 3, "answer_input": "embeddings"},
                              "teacher": {"path": "zoo:tiny-teacher", "dtype": "bfloat16"}})
    assert one == plain and one.to_dict() == plain.to_dict() and "teachers" not in one.to_dict()
    lone = {"student": {"path": "zoo:tiny-student"}, "stages": stages,
            "teachers": [{"name": "a", "path": "zoo:tiny-teacher", "weight": 0.5}]}
    assert any(p.startswith("teachers[0].weight: 0.5 with one teacher would scale nothing") for p in _problems(lone))
    two = {"student": {"path": "zoo:tiny-student"}, "stages": stages,
           "teachers": [{"name": "a", "path": "zoo:tiny-teacher"}, {"name": "b", "path": str(tmp_path / "nowhere")}]}
    found = _problems(two)
    assert f"teachers[1].path: path not found: {tmp_path / 'nowhere'}" in found
    assert not any(p.startswith("teachers:") for p in found)  # two teachers are a run
    fixed = _problems(two, "teachers.1.path=zoo:tiny-teacher", "teachers.1.weight=-1", "teachers.0.name=a b")
    assert "teachers[1].weight: -1.0 must be >= 0" in fixed and any(p.startswith("teachers[0].name: 'a b'") for p in fixed)
    assert not any("path not found" in p for p in fixed)  # --set reached the second table
    same = _problems({**two, "teachers": [{"name": "a", "path": "zoo:tiny-teacher"}] * 2})
    assert "teachers: the name 'a' is given to 2 teachers; names must differ" in same
    both = _problems({**two, "teacher": {"path": "zoo:tiny-teacher"}, "teachers": two["teachers"][:1]})
    assert "teachers: a recipe has one [teacher] table or [[teachers]] tables, not both" in both
    lone = _problems({**two, "teachers": {"name": "a", "path": "zoo:tiny-teacher"}})
    assert "teachers: expected an array of tables ([[teachers]]), got one table [teachers]" in lone
    out_of_range = _problems(two, "teachers.5.weight=1")
    assert any("`5` is not one of the 2 tables' positions" in p for p in out_of_range)
    silent = _problems(two, "teachers.1.path=zoo:tiny-teacher", "teachers.0.weight=0", "teachers.1.weight=0", "loss.kd=1")
    assert any(p.startswith("teachers: every teacher's weight is 0") for p in silent)
    assert any(p.startswith("loss.kd: scores the student against one teacher's rows") for p in silent)
    ok = recipe_from_dict({**two, "recalibrator": {"num_blocks": 3}, "teachers": [
        {"name": "a", "path": "zoo:tiny-teacher", "weight": 0.25, "cache": str(tmp_path)},
        {"name": "b", "path": "zoo:internvl", "recalibrator": {"answer_input": "embeddings"}}]})
    assert ok.several_teachers and ok.teacher is None and one.several_teachers is False
    a, b = ok.teacher_views()
    assert (a.name, a.weight, b.name, b.weight) == ("a", 0.25, "b", 1.0)
    assert a.recipe.teacher.cache == str(tmp_path) and b.recipe.teacher.path == "zoo:internvl" and not a.recipe.teachers
    assert (a.recipe.recalibrator.answer_input, b.recipe.recalibrator.answer_input) == ("hidden", "embeddings")
    assert b.recipe.recalibrator.num_blocks == 3
    assert [(v.name, v.weight, v.recipe) for v in one.teacher_views()] == [("teacher", 1.0, one)]
