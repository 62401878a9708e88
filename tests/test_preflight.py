"""The data preflight of `genrecal distill --dry-run` (issue 29): a sample rendered through both
processors, no weights loaded; its per-item token counts are the loader's, its skip and cut
counts are what training would skip and cut, and a recipe that would skip most items is warned
about with the `--set` line that fits 99%."""

from __future__ import annotations

import json

from genrecal_cli.commands.distill import built_in_data, load_rows
from genrecal_cli.data.formats import to_conversation
from genrecal_cli.data.loader import Item, PairDataset, Skipped
from genrecal_cli.data.preflight import measure_sample, sample_indices, summarise
from genrecal_cli.models import ProcessorSettings, load_vlm
from genrecal_cli.recipe import recipe_from_dict
from genrecal_cli.world.zoo import resolve_source

from .conftest import run_cli


def _recipe(**data):
    return recipe_from_dict({
        "teacher": {"path": "zoo:tiny-teacher", "processor": {"max_pixels": 32 * 32}},
        "student": {"path": "zoo:tiny-student"},
        "data": {"source": "chats", "shapes_size": 40, **data},
        "stages": {"distill": {"steps": 1, "batch_size": 4}},
    })


def test_the_preflight_counts_what_the_loader_renders(tiny_pair):
    """Multi-turn conversations with images, max_length so tight that some items are skipped and
    some lose turns: every sampled item's kept tokens per side equal the loader's rendering of
    it (the teacher with its [teacher.processor] settings), and the skipped and cut counts are
    the loader's. Break: Lengths.fit, measure's image count, the settings on the preflight side."""
    recipe = built_in_data(_recipe(max_length=120))
    models = {r: load_vlm(resolve_source(getattr(recipe, r).path), empty=True, settings=ProcessorSettings.of(recipe, r))
              for r in ("teacher", "student")}
    rows = load_rows(recipe.data, recipe.data.train_split)
    dataset = PairDataset(rows, recipe.data, {r: m.processor for r, m in models.items()})
    measured = measure_sample(dataset, {r: m.image_token_id for r, m in models.items()}, 25)
    assert [m.index for m in measured] == sample_indices(len(rows), 25) and len(measured) == 25
    skipped = cut = 0
    for m in measured:
        item = dataset[m.index]
        if isinstance(item, Skipped):
            skipped += 1
            assert min(m.sides[s].fit(120) for s in m.sides) == 0
            continue
        assert isinstance(item, Item)
        cut += item.dropped > 0
        turns = min(m.sides[s].fit(120) for s in m.sides)
        for side, enc in item.sides.items():
            assert len(enc.input_ids) == sum(m.sides[side].turns[:turns]), (m.index, side)
            assert sum(i == models[side].image_token_id for i in enc.input_ids) <= m.sides[side].image
    shown = 0
    for m in measured:  # the teacher at 32 x 32 pixels: 4 image tokens an image
        images = len(to_conversation(rows[m.index], dataset.format, recipe.data, m.index).images)
        assert m.sides["teacher"].image == 4 * images
        shown += images
    assert shown > 0
    report = summarise(measured, 120, 4)
    assert sum(report["skipped"].values()) == skipped and report["cut"] == cut
    assert skipped > 0 and cut > 0  # the case is the one it is meant to be
    assert report["usable"] == 25 - skipped
    wide = summarise(measured, report["fits_99"], 4)
    assert sum(wide["skipped"].values()) + wide["cut"] <= 0.01 * 25 + 1e-9  # the suggested max_length fits 99%


def test_dry_run_warns_when_most_items_would_be_skipped_and_writes_json(tmp_path, tiny_pair):
    import textwrap

    recipe = tmp_path / "r.toml"
    recipe.write_text(textwrap.dedent("""
        [teacher]
        path = "zoo:tiny-teacher"
        [student]
        path = "zoo:tiny-student"
        [data]
        shapes_size = 40
        max_length = 60
        [stages.distill]
        steps = 1
        batch_size = 4
    """))
    out = run_cli("distill", str(recipe), "--dry-run", "--sample", "20")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "data preflight: 20 items of 40 of shapes" in text
    assert "warning: " in text and "most of the data would not train" in text
    assert "99% of the sample fits whole with --set data.max_length=" in text
    as_json = run_cli("distill", str(recipe), "--dry-run", "--sample", "20", "--json", "-")
    assert as_json.returncode == 0, as_json.stderr
    found = json.loads(as_json.stdout)["preflight"]
    assert found["items"] == 20 and sum(found["skipped"].values()) > 10 and found["fits_99"] > 60
    assert set(found["sides"]) == {"teacher", "student"}
    planned = run_cli("distill", str(recipe), "--dry-run", "--sample", "20", "--set", "data.max_length=512",
                      "--gpus", "1", "--gpu-memory", "8", "--json", "-")
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    p99 = max(side["kept_tokens"]["p99"] for side in plan["preflight"]["sides"].values())
    assert plan["lengths"]["used"] == "measured" and plan["lengths"]["tokens"] == p99 < 512
    assert plan["lengths"]["worst_case_needed_bytes"] > plan["needed_bytes"]  # every item at 512 tokens needs more
    assert "the data preflight's p99 of 20 sampled items" in plan["assumptions"][0]
