"""Real processors on real-sized images (issue 29): transformers' own processor classes set up as
the published checkpoints ship them, on an 800x600 chart, a 1,920x1,080 screenshot and a 300x300
photo; the data preflight counts what the loader renders, finds the items data.max_length would
skip, and the recipe's [teacher.processor] / [student.processor] make them fit.

The settings below are the published checkpoints' image settings (their preprocessor files):
- Qwen/Qwen2-VL-2B-Instruct: min_pixels 3,136 (56 x 56), max_pixels 12,845,056 (16,384 x 28 x 28),
  patch 14, merge 2: one token per 28 x 28 pixels after `smart_resize` to multiples of 28;
- OpenGVLab/InternVL3-78B-hf: tiles of 448 x 448, 1 to 12 of them plus a thumbnail when there is
  more than one (InternVLProcessor crops to tiles on every call), 256 tokens a tile;
- HuggingFaceM4/Idefics3-8B-Llama3: resized to a longest edge of 1,456 (4 x 364), split into
  tiles of 364 plus the whole image, 169 tokens each.
They could not be read from the hub here (offline); they are what the model cards and the issue
state and what transformers 5.24's classes default to for these families, and the expected
counts are worked out by hand below, not read from the classes.
"""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image, ImageDraw

from genrecal_cli.world.zoo import resolve_source

PUBLISHED = {
    "qwen2_vl": ({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2,
                  "temporal_patch_size": 2, "size": {"shortest_edge": 3136, "longest_edge": 12845056}}, {}),
    "internvl": ({"size": {"height": 448, "width": 448}, "max_patches": 12, "min_patches": 1},
                 {"image_seq_length": 256}),
    "idefics3": ({"size": {"longest_edge": 1456}, "max_image_size": {"longest_edge": 364}, "do_image_splitting": True},
                 {"image_seq_len": 169}),
}
SIZES = {"chart": (800, 600), "screenshot": (1920, 1080), "photo": (300, 300)}
# Qwen2-VL: round(h / 28) x round(w / 28) tokens: 21 x 29 = 609; 39 x 69 = 2,691; 11 x 11 = 121.
QWEN = {"chart": 609, "screenshot": 2691, "photo": 121}
# InternVL3: the tile grid closest to the aspect ratio within 12 tiles (+ a thumbnail): 4 x 3 + 1 = 13
# tiles for 4:3, 4 x 2 + 1 = 9 for 16:9, one tile (no thumbnail) for a square that fits one.
INTERNVL = {"chart": 13 * 256, "screenshot": 9 * 256, "photo": 256}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Model folders (configs, tokenizers: the tiny world's; processors: the published settings)
    and a data set of three real-sized images with a question and an answer each."""
    root = tmp_path_factory.mktemp("real")
    models = {}
    for family, (image_settings, processor_settings) in PUBLISHED.items():
        folder = root / family
        shutil.copytree(resolve_source(f"zoo:{family}"), folder)
        path = folder / "processor_config.json"
        config = json.loads(path.read_text())
        config["image_processor"].update(image_settings)
        config.update(processor_settings)
        path.write_text(json.dumps(config, indent=2))
        models[family] = str(folder)
    (root / "data" / "images").mkdir(parents=True)
    rows = []
    for name, (w, h) in SIZES.items():
        image = Image.new("RGB", (w, h), "white")
        draw = ImageDraw.Draw(image)
        for k in range(8):  # a few bars, so that it is not blank
            draw.rectangle([k * w // 9 + 5, h - (k + 1) * h // 10, (k + 1) * w // 9, h - 5], fill=(40 * k, 90, 200))
        image.save(root / "data" / "images" / f"{name}.png")
        rows.append({"image": f"images/{name}.png", "question": f"What does this {name} show?", "answer": "bars"})
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return models, root / "data" / "train.jsonl"


def _recipe(world, teacher="internvl", student="qwen2_vl", max_length=8192, teacher_settings=None,
            student_settings=None):
    from genrecal_cli.recipe import recipe_from_dict

    models, data = world
    return recipe_from_dict({
        "teacher": {"path": models[teacher], **({"processor": teacher_settings} if teacher_settings else {})},
        "student": {"path": models[student], **({"processor": student_settings} if student_settings else {})},
        "data": {"source": str(data), "max_length": max_length},
        "stages": {"distill": {"steps": 1, "batch_size": 1}},
        "train": {"eval_items": 0},
    })


def _image_tokens(recipe):
    """Per item (chart, screenshot, photo) and side: the preflight's image tokens."""
    from genrecal_cli.commands.distill import load_rows
    from genrecal_cli.data.loader import PairDataset
    from genrecal_cli.data.preflight import measure_sample
    from genrecal_cli.models import ProcessorSettings, load_vlm

    models = {r: load_vlm(getattr(recipe, r).path, empty=True, settings=ProcessorSettings.of(recipe, r))
              for r in ("teacher", "student")}
    rows = load_rows(recipe.data, "train")
    dataset = PairDataset(rows, recipe.data, {r: m.processor for r, m in models.items()})
    measured = measure_sample(dataset, {r: m.image_token_id for r, m in models.items()}, 10)
    return measured, dataset


def test_published_processors_count_real_images_as_the_loader_renders_them(world):
    from genrecal_cli.data.loader import Item

    measured, dataset = _image_tokens(_recipe(world))
    assert [m.sides["student"].image for m in measured] == list(QWEN.values())
    assert [m.sides["teacher"].image for m in measured] == list(INTERNVL.values())
    for m in measured:  # everything fits in 8,192: the loader renders every token the preflight counted
        item = dataset[m.index]
        assert isinstance(item, Item) and item.dropped == 0
        for side, enc in item.sides.items():
            assert len(enc.input_ids) == m.sides[side].total, (m.index, side)
    idefics, _ = _image_tokens(_recipe(world, student="idefics3"))  # 3 x 4 + 1, 3 x 4 + 1, 4 x 4 + 1 tiles
    assert [m.sides["student"].image for m in idefics] == [13 * 169, 13 * 169, 17 * 169]
    unsplit, _ = _image_tokens(_recipe(world, student="idefics3", student_settings={"do_image_splitting": False}))
    assert [m.sides["student"].image for m in unsplit] == [169, 169, 169]


def test_max_length_2048_skips_what_does_not_fit_and_the_settings_make_it_fit(world):
    """At the shipped recipe's max_length (2,048) the chart and the screenshot do not fit the
    published InternVL3 (3,328 and 2,304 image tokens) and the screenshot not Qwen2-VL (2,691):
    the preflight says so, per side; with the shipped recipe's settings (InternVL at most 6 tiles,
    Qwen2-VL at most 1,003,520 pixels) all three fit."""
    from genrecal_cli.data.preflight import summarise

    measured, _ = _image_tokens(_recipe(world, max_length=2048))
    report = summarise(measured, 2048, 1)
    assert report["skipped"] == {"first turn longer than max_length on the teacher side": 1,
                                 "first turn longer than max_length on the student and teacher sides": 1}
    assert report["usable"] == 1 and report["fits_99"] > 2048
    shipped = _recipe(world, max_length=2048, teacher_settings={"max_patches": 6},
                      student_settings={"max_pixels": 1003520})
    measured, _ = _image_tokens(shipped)
    report = summarise(measured, 2048, 1)
    assert report["skipped"] == {} and report["usable"] == 3
    # at most 6 tiles: 4:3 -> 3 x 2 + 1, 16:9 -> 2 x 1 + 1 (2:1 is the closest grid), the photo one tile
    assert [m.sides["teacher"].image for m in measured] == [7 * 256, 3 * 256, 256]
    assert [m.sides["student"].image for m in measured][0] == QWEN["chart"]  # 480,000 pixels: unchanged
    # 2,073,600 pixels scaled under 1,003,520, then to multiples of 28: 728 x 1,316, 26 x 47 tokens
    assert [m.sides["student"].image for m in measured][1] == 26 * 47


def test_dry_run_on_real_processors_warns_before_anything_loads(world, tmp_path):
    """`genrecal distill RECIPE --dry-run` as a user meets it: the published processors, the three
    real-sized images, the shipped max_length 2,048: two of three items would be skipped, named by
    side, with a warning and the max_length that fits; with the recipe's settings nothing is."""
    from .conftest import run_cli

    models, data = world

    def recipe(extra: str) -> str:
        path = tmp_path / f"r{len(extra)}.toml"
        path.write_text(f'[teacher]\npath = "{models["internvl"]}"\n[student]\npath = "{models["qwen2_vl"]}"\n'
                        f'[data]\nsource = "{data}"\nmax_length = 2048\n[stages.distill]\nsteps = 1\n'
                        f'batch_size = 1\n[train]\neval_items = 0\n{extra}')
        return str(path)

    out = run_cli("distill", recipe(""), "--dry-run")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "data preflight: 3 items of 3" in text and "warning: 2 of 3 sampled items would be skipped" in text
    assert "skipped: 1 of 3 (33%): first turn longer than max_length on the teacher side" in text
    assert "skipped: 1 of 3 (33%): first turn longer than max_length on the student and teacher sides" in text
    assert "--set data.max_length=" in text
    # the largest resolution at which the sample fits max_length, found by rendering it again:
    # the shipped recipe's settings (InternVL at 9 tiles still gives the screenshot 2,304 tokens)
    assert "--set teacher.processor.max_patches=6" in text and "--set student.processor.max_pixels=1003520" in text
    fitted = run_cli("distill", recipe("[teacher.processor]\nmax_patches = 6\n[student.processor]\nmax_pixels = 1003520\n"),
                     "--dry-run")
    assert fitted.returncode == 0, fitted.stderr
    text = " ".join(fitted.stdout.split())
    assert "skipped" not in text and "99% of the sample fits whole" in text
