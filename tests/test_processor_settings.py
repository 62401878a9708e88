"""`[teacher.processor]` / `[student.processor]` (issue 29): a side's image settings set on its
processor, a bad key named with its recipe path and a did-you-mean, the settings carried into
the exported student's processor files and into the teacher cache's fingerprint."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from genrecal_cli.errors import RecipeError
from genrecal_cli.models import ProcessorSettings, load_vlm
from genrecal_cli.recipe import recipe_from_dict
from genrecal_cli.world.zoo import resolve_source


def image_tokens(processor, size=(64, 64)) -> int:
    """How many image tokens the processor gives one image of `size` (width, height)."""
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    out = processor(images=[[Image.new("RGB", size)]], text=[processor.image_token], return_tensors="pt")
    return int((out["input_ids"] == image_id).sum())


def _teacher(settings=None):
    return load_vlm(resolve_source("zoo:tiny-teacher"), empty=True,
                    settings=ProcessorSettings(settings or {}, "teacher.processor", "r.toml"))


def test_qwen_pixel_bounds_change_the_image_tokens(tiny_pair):
    """The tiny Qwen2-VL teacher (patch 8, merge 2): a 64x64 image is 16 tokens; max_pixels =
    32 x 32 makes it 4, min_pixels = 128 x 128 makes it 64."""
    assert image_tokens(_teacher().processor) == 16
    small = _teacher({"max_pixels": 32 * 32})
    assert image_tokens(small.processor) == 4
    assert small.processor_settings["max_pixels"] == 32 * 32 and small.processor_settings["size"]["longest_edge"] == 1024
    assert image_tokens(_teacher({"min_pixels": 128 * 128, "max_pixels": 128 * 128}).processor) == 64


def test_a_bad_key_or_value_is_named_with_its_recipe_path(tiny_pair):
    with pytest.raises(RecipeError) as caught:
        _teacher({"max_pixel": 1024})
    assert "unknown key `teacher.processor.max_pixel`" in str(caught.value) and "did you mean `max_pixels`?" in str(caught.value)
    assert "r.toml" in str(caught.value)
    with pytest.raises(RecipeError, match=r"teacher.processor: Qwen2VLImageProcessorPil refuses these settings"):
        _teacher({"size": {"height": 32}})  # Qwen2-VL's size takes shortest_edge / longest_edge
    with pytest.raises(RecipeError, match="unknown key `teacher.processor.return_tensors`"):
        _teacher({"return_tensors": "np"})  # per call, not a setting


def test_a_setting_the_processor_overrides_on_every_call_is_refused():
    """InternVLProcessor passes crop_to_patches = True on every call: a setting would not last."""
    from genrecal_cli.models.processor_settings import apply_settings

    internvl = load_vlm(resolve_source("zoo:internvl"), empty=True).processor
    with pytest.raises(RecipeError, match=r"student.processor.crop_to_patches: .* sets `crop_to_patches` itself"):
        apply_settings(internvl, ProcessorSettings({"crop_to_patches": False}, "student.processor", "r.toml"))
    assert apply_settings(internvl, ProcessorSettings({"max_patches": 1}, "student.processor", "r.toml"))["max_patches"] == 1


def test_a_recipe_takes_the_tables_and_rejects_a_value_that_is_not_one():
    stages = {"finetune": {"steps": 1}}
    raw = {"teacher": {"path": "zoo:tiny-teacher", "processor": {"max_pixels": 1024}},
           "student": {"path": "zoo:qwen2_vl", "processor": {"min_pixels": 256}}, "stages": stages}
    recipe = recipe_from_dict(raw)
    assert recipe.teacher.processor == {"max_pixels": 1024} and recipe.student.processor == {"min_pixels": 256}
    assert recipe_from_dict({"student": {"path": "zoo:qwen2_vl"}, "stages": stages}).student.processor == {}
    with pytest.raises(RecipeError, match=r"student.processor: expected a table, got an integer 3"):
        recipe_from_dict({"student": {"path": "zoo:qwen2_vl", "processor": 3}, "stages": stages})


def test_the_exported_student_sees_images_as_it_was_trained_and_the_cache_knows_the_teacher_settings(tmp_path, tiny_pair):
    """A Qwen2-VL-style student distilled with [student.processor] max_pixels = 32 x 32: its
    exported processor files carry the setting (reloaded by genrecal and by plain transformers:
    4 tokens a 64x64 image, not 16); a teacher cache written under one [teacher.processor] is
    refused under another, naming it."""
    from transformers import AutoProcessor

    from genrecal_cli.commands.distill import distill, teach
    from genrecal_cli.errors import DataError

    def raw(out, student_settings=None, teacher_settings=None, cache=None):
        return {
            "teacher": {"path": "zoo:tiny-teacher", **({"processor": teacher_settings} if teacher_settings else {}),
                        **({"cache": str(cache)} if cache else {})},
            "student": {"path": "zoo:qwen2_vl", **({"processor": student_settings} if student_settings else {})},
            "data": {"shapes_size": 8, "max_length": 256},
            "stages": {"align": {"steps": 1, "batch_size": 4, "lr": 1e-3}, "distill": {"steps": 1, "batch_size": 4}},
            "train": {"output_dir": str(tmp_path / out), "eval_items": 0, "probe_every": 0},
        }

    before = load_vlm(resolve_source("zoo:qwen2_vl"), empty=True)
    assert image_tokens(before.processor) == 16
    result = distill(recipe_from_dict(raw("small", {"max_pixels": 1024})))
    exported = result.student_dir
    saved = json.loads((exported / "processor_config.json").read_text())["image_processor"]
    assert saved["max_pixels"] == 1024 and saved["size"]["longest_edge"] == 1024
    assert image_tokens(load_vlm(str(exported), empty=True).processor) == 4
    assert image_tokens(AutoProcessor.from_pretrained(str(exported))) == 4
    teach(recipe_from_dict(raw("t", teacher_settings={"max_pixels": 1024}, cache=tmp_path / "c")), tmp_path / "c",
          storage="fp32")
    with pytest.raises(DataError, match="teacher.processor changed"):
        distill(recipe_from_dict(raw("other", teacher_settings={"max_pixels": 2048}, cache=tmp_path / "c")))
