"""The shapes data set: deterministic, disjoint splits, answers that follow from the pictures."""

from __future__ import annotations

import re
from collections import Counter

import datasets
import pytest
from PIL import Image, ImageChops

from genrecal_cli.world import shapes
from genrecal_cli.world.shapes import COLOURS, KINDS, POSITIONS, make_items, make_split, score


def _raw(ds: datasets.Dataset) -> list[dict]:
    """Rows with the image as its stored PNG bytes, for byte-exact comparisons."""
    return list(ds.cast_column("image", datasets.Image(decode=False)))


def _layout(scene) -> frozenset:
    return frozenset((o.cell, o.shape, o.colour) for o in scene)


def _solve(question: str, scene) -> str:
    """The answer worked out from the scene alone; asserts the question has a unique referent."""
    q = question.splitlines()[0]
    if m := re.fullmatch(r"What colour is the (\w+)\?", q):
        hits = [o for o in scene if o.shape == m[1]]
        assert len(hits) == 1, q
        return hits[0].colour
    if m := re.fullmatch(r"What shape is the (\w+) object\?", q):
        hits = [o for o in scene if o.colour == m[1]]
        assert len(hits) == 1, q
        return hits[0].shape
    if q == "How many shapes are there?":
        return str(len(scene))
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", q):
        hits = [o for o in scene if (o.colour, o.shape) == (m[1], m[2])]
        assert len(hits) == 1, q
        return POSITIONS[hits[0].cell]
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", q):
        return "yes" if any((o.colour, o.shape) == (m[1], m[2]) for o in scene) else "no"
    raise AssertionError(f"unexpected question {q!r}")


def test_same_seed_same_data_and_different_seed_differs():
    a, b = _raw(make_split("train", 40, seed=3)), _raw(make_split("train", 40, seed=3))
    assert a == b  # includes the PNG bytes
    c = _raw(make_split("train", 40, seed=4))
    assert [r["image"]["bytes"] for r in a] != [r["image"]["bytes"] for r in c]
    assert [r["question"] for r in a] != [r["question"] for r in c]


def test_longer_split_extends_shorter_one():
    assert make_items("validation", 30, seed=1)[:10] == make_items("validation", 10, seed=1)


def test_splits_share_no_layout_even_across_seeds():
    layouts = {
        split: {_layout(item.scene) for seed in (0, 1) for item in make_items(split, 600, seed)}
        for split in shapes.SPLITS
    }
    assert not layouts["train"] & layouts["validation"]
    assert not layouts["train"] & layouts["test"]
    assert not layouts["validation"] & layouts["test"]


def test_splits_share_no_image_question_pair():
    pairs = {
        split: {(r["image"]["bytes"], r["question"]) for r in _raw(make_split(split, 150))} for split in shapes.SPLITS
    }
    assert not pairs["train"] & pairs["validation"]
    assert not pairs["train"] & pairs["test"]
    assert not pairs["validation"] & pairs["test"]


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_every_answer_follows_from_the_scene(split):
    for item in make_items(split, 600, seed=2):
        truth = _solve(item.question, item.scene)
        assert 1 <= len(item.scene) <= 3 and len({o.cell for o in item.scene}) == len(item.scene)
        if item.form == "short":
            assert item.answer == item.target == truth
        elif item.form == "long":
            assert item.target == truth
            assert score(item.answer, item.row()), item.answer
            assert item.answer.count(". ") >= 1  # an answer sentence, then a reason
        else:
            letters = dict(line.split(". ", 1) for line in item.options.splitlines())
            assert item.answer == item.target and letters[item.target] == truth
            assert len(set(letters.values())) == len(letters) >= 2
            assert item.options in item.question


def test_pictures_show_the_scene():
    """Each cell holds exactly its object's colour, and the fill of its bounding box tells the shape."""
    ds = make_split("test", 60, seed=5)
    items = make_items("test", 60, seed=5)
    edges = [round(k * 64 / 3) for k in range(4)]
    for row, item in zip(ds, items):
        img = row["image"]
        objects = {o.cell: o for o in item.scene}
        for cell in range(9):
            r, c = divmod(cell, 3)
            box = (edges[c], edges[r], edges[c + 1], edges[r + 1])
            colours = {rgb for _, rgb in img.crop(box).getcolors()} - {shapes.BACKGROUND}
            if cell not in objects:
                assert not colours, (item.id, cell)
                continue
            o = objects[cell]
            assert colours == {COLOURS[o.colour]}, (item.id, cell)
            crop = img.crop(box)
            blank = Image.new("RGB", crop.size, shapes.BACKGROUND)
            mask = ImageChops.difference(crop, blank).convert("L").point(lambda v: 255 if v else 0)
            x0, y0, x1, y1 = mask.getbbox()
            fill = mask.histogram()[255] / ((x1 - x0) * (y1 - y0))
            shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
            assert shape == o.shape, (item.id, cell, fill)


def test_parquet_round_trip(tmp_path):
    out = shapes.build_shapes(tmp_path / "shapes", {"train": 20, "validation": 5, "test": 5}, seed=1)
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet", "train.parquet", "validation.parquet"]
    loaded = datasets.load_dataset(
        "parquet",
        data_files={s: str(out / f"{s}.parquet") for s in shapes.SPLITS},
        cache_dir=str(tmp_path / "cache"),
    )
    train = loaded["train"]
    assert isinstance(train.features["image"], datasets.Image)
    assert set(train.column_names) == {"image", "question", "answer", "form", "kind", "options", "target", "id"}
    assert len(train) == 20 and len(loaded["test"]) == 5
    img = train[0]["image"]
    assert img.size == (64, 64) and img.mode == "RGB"
    assert _raw(train) == _raw(make_split("train", 20, seed=1))


def test_image_size_is_a_parameter():
    img = make_split("train", 1, image_size=96)[0]["image"]
    assert img.size == (96, 96) and img.mode == "RGB"


ITEM_MC = {
    "form": "mc",
    "kind": "colour",
    "target": "B",
    "options": "A. red\nB. blue\nC. green\nD. yellow",
}


@pytest.mark.parametrize("pred", ["B", "B.", " b ", "(B)", "B. blue", "B) Blue."])
def test_score_accepts_mc_letter(pred):
    assert score(pred, ITEM_MC)


@pytest.mark.parametrize("pred", ["A", "C.", "B. red", "blue", "", "Bb"])
def test_score_rejects_wrong_mc(pred):
    assert not score(pred, ITEM_MC)


def test_score_short_and_long():
    short = {"form": "short", "kind": "position", "target": "top left", "options": ""}
    assert score("Top left.", short) and score("top-left", short)
    assert not score("top right", short) and not score("the top left", short)
    long = {"form": "long", "kind": "colour", "target": "red", "options": ""}
    assert score("The square is red. It is the only square in the picture.", long)
    assert not score("The square is blue. It is not red.", long)  # target only in the reason
    assert not score("The square is red or blue.", long)  # a hedge
    assert not score("The square is reddish.", long)  # whole words only
    no = {"form": "long", "kind": "existence", "target": "no", "options": ""}
    assert score("No, there is no green triangle. The picture shows a red circle.", no)
    assert not score("Yes, there is a green triangle.", no)


def test_kinds_forms_and_answers_are_balanced():
    items = make_items("train", 1500, seed=0)
    assert set(Counter(i.kind for i in items).values()) == {300}
    assert set(Counter(i.form for i in items).values()) == {500}
    by_kind = {k: Counter(_solve(i.question, i.scene) for i in items if i.kind == k) for k in KINDS}
    assert set(by_kind["existence"]) == {"yes", "no"} and set(by_kind["count"]) == {"1", "2", "3"}
    for kind, counts in by_kind.items():
        expected = 300 / len(shapes.CANDIDATES[kind])
        assert set(counts) == set(shapes.CANDIDATES[kind]), kind
        assert all(abs(v - expected) < 0.5 * expected for v in counts.values()), (kind, counts)
    # mc letters are shuffled, not always the first option
    assert len(Counter(i.target for i in items if i.form == "mc")) >= 3


def test_forms_can_be_restricted():
    ds = make_split("train", 10, forms=("short",))
    assert set(ds["form"]) == {"short"} and set(ds["options"]) == {""}


def test_text_corpus_is_cheap_and_covers_every_form():
    corpus = shapes.text_corpus(500, seed=0)
    assert len(corpus) == 500 and corpus == shapes.text_corpus(500, seed=0)
    assert any("\nA. " in t for t in corpus) and any("It is the only" in t for t in corpus)
    assert any(t.endswith("\n2") for t in corpus)


def test_unknown_split_or_form_is_an_error():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        make_items("dev", 1)
    with pytest.raises(ValueError, match="forms"):
        make_items("train", 1, forms=("essay",))
