"""The shapes chats: deterministic files in both layouts, the promised mix of rows, answers that
follow from the pictures, disjoint splits, a scorer for the last answer and a reusable build."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from genrecal_cli.data.formats import to_conversation
from genrecal_cli.world import chats
from genrecal_cli.world.chats import build_chats, last_turn_reference, make_chats, scorer, write_chats
from genrecal_cli.world.shapes import CANDIDATES, draw_scene, score, split_of

from .test_shapes import _solve as solve_shapes

FACT_ANSWERS = {
    "How many sides does a triangle have?": "three",
    "What colour do you get by mixing red and yellow?": "orange",
}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _text(content) -> str:
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")


def _solve(question: str, scene) -> str:
    """The answer worked out from the scene alone (shapes' own checker, after the lead-in a
    follow-up question about a second picture starts with)."""
    q = re.sub(r"^(And in this picture\?|What about this picture\?|Now look at this one\.) ", "", question)
    return solve_shapes(q, scene)


def test_same_arguments_give_byte_identical_files(tmp_path):
    for style in chats.STYLES:
        a = write_chats(tmp_path / f"{style}-a", "train", 30, seed=2, style=style)
        b = write_chats(tmp_path / f"{style}-b", "train", 30, seed=2, style=style)
        assert a.name == "train.jsonl"
        assert _files(a.parent) == _files(b.parent)
    # another seed, other conversations and other pictures
    c = write_chats(tmp_path / "c", "train", 30, seed=3)
    assert c.read_bytes() != (tmp_path / "messages-a" / "train.jsonl").read_bytes()
    pictures = {k: v for k, v in _files(tmp_path / "messages-a").items() if k.endswith(".png")}
    assert not set(pictures.values()) & {v for k, v in _files(c.parent).items() if k.endswith(".png")}


def test_messages_rows_have_the_described_structure(tmp_path):
    path = write_chats(tmp_path, "train", 60, style="messages")
    content_types = Counter()
    systems = 0
    for row in _rows(path):
        assert set(row) >= {"id", "messages", "images"}
        messages = row["messages"]
        if messages[0]["role"] == "system":
            assert messages[0]["content"] == chats.SYSTEM
            messages, systems = messages[1:], systems + 1
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        parts = [p for m in messages if not isinstance(m["content"], str) for p in m["content"]]
        assert all(p["type"] in ("image", "text") for p in parts)
        assert sum(p["type"] == "image" for p in parts) == len(row["images"])
        assert row["images"] == [f"images/{row['id']}-{k}.png" for k in range(len(row["images"]))]
        assert all((tmp_path / p).is_file() for p in row["images"])
        for m in messages:
            if m["role"] == "assistant":
                content_types[type(m["content"]).__name__] += 1
                assert _text(m["content"]).strip()
    assert content_types["str"] and content_types["list"]  # both forms real data has
    assert 0 < systems < 60 // 3


def test_llava_rows_have_one_placeholder_per_image(tmp_path):
    path = write_chats(tmp_path, "train", 60, style="llava")
    kinds = Counter()
    for row in _rows(path):
        image = row.get("image")
        paths = [] if image is None else [image] if isinstance(image, str) else image
        kinds[type(image).__name__] += 1
        assert not isinstance(image, list) or len(image) == 2  # one picture is a plain string
        turns = row["conversations"]
        if turns[0]["from"] == "system":
            turns = turns[1:]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert sum(t["value"].count("<image>") for t in turns if t["from"] == "human") == len(paths)
        assert not any("<image>" in t["value"] for t in turns if t["from"] == "gpt")
        assert all((tmp_path / p).is_file() for p in paths)
    assert set(kinds) == {"str", "list", "NoneType"}


def test_the_mix_has_one_picture_two_picture_and_text_only_rows():
    mix = Counter()
    for chat in make_chats("train", 200):
        shown = [t.image for t in chat.turns]
        if len(chat.scenes) == 1:
            assert len(chat.turns) in (2, 3) and shown == [True] + [False] * (len(chat.turns) - 1)
        elif len(chat.scenes) == 2:
            # the second picture arrives with the second question; a third turn compares the two
            assert shown[:2] == [True, True] and len(chat.turns) in (2, 3)
            assert len(chat.turns) == 2 or chat.turns[2].kind == "compare"
        else:
            assert len(chat.turns) in (1, 2) and not any(shown)
        mix[len(chat.scenes), len(chat.turns)] += 1
    assert mix[1, 2] + mix[1, 3] == 110 and mix[1, 2] and mix[1, 3]
    assert mix[2, 2] + mix[2, 3] == 60 and mix[2, 2] and mix[2, 3]
    assert mix[0, 1] + mix[0, 2] == 30 and mix[0, 1] and mix[0, 2]


@pytest.mark.parametrize("split", ["train", "validation"])
def test_every_answer_follows_from_its_picture(split):
    forms = Counter()
    for chat in make_chats(split, 120, seed=1):
        shown = -1
        for turn in chat.turns:
            shown += turn.image
            if turn.kind == "fact":
                assert FACT_ANSWERS.get(turn.question.splitlines()[0], turn.answer) == turn.answer
                continue
            if turn.kind == "compare":
                a, b = (len(s) for s in chat.scenes)
                assert turn.answer == ("the first" if a > b else "the second" if b > a else "the same")
                continue
            truth = _solve(turn.question, chat.scenes[shown])
            item = {"form": turn.form, "kind": turn.kind, "options": turn.options,
                    "target": truth if turn.form != "mc" else next(
                        line[0] for line in turn.options.splitlines() if line[3:] == truth)}
            assert score(turn.answer, item), (turn, chat.scenes[shown])
            if turn.form == "long" and turn.kind == "count":  # the listing must be of this picture
                assert all(f"{o.colour} {o.shape}" in turn.answer for o in chat.scenes[shown])
            forms[turn.form, turn.image] += 1
    # first questions and follow-ups both come in every answer form
    assert {f for f, _ in forms} == {"short", "long", "mc"}
    assert {f for f, image in forms if not image} == {"short", "long", "mc"}


def test_the_pictures_show_the_scenes_at_the_right_size(tmp_path):
    path = write_chats(tmp_path, "validation", 20, image_size=48)
    scenes = {f"images/{c.id}-{k}.png": s for c in make_chats("validation", 20) for k, s in enumerate(c.scenes)}
    assert {p for row in _rows(path) for p in row["images"]} == set(scenes)
    for rel, scene in scenes.items():
        with Image.open(tmp_path / rel) as img:
            assert (img.format, img.size, img.mode) == ("PNG", (48, 48), "RGB")
            assert img.tobytes() == draw_scene(scene, 48).tobytes()


def test_train_and_validation_scenes_are_disjoint():
    layouts = {}
    for split in ("train", "validation"):
        scenes = [s for c in make_chats(split, 150) for s in c.scenes]
        assert all(split_of(s) == split for s in scenes)
        layouts[split] = {frozenset((o.cell, o.shape, o.colour) for o in s) for s in scenes}
    assert not layouts["train"] & layouts["validation"]


@pytest.mark.parametrize("style", chats.STYLES)
def test_scorer_takes_the_reference_and_refuses_a_wrong_last_answer(tmp_path, style):
    groups = Counter()
    for row in _rows(write_chats(tmp_path, "train", 60, style=style)):
        reference = last_turn_reference(row)
        right, g = scorer(reference, row)
        assert right, (reference, row)
        groups.update(g)
        if row["form"] == "mc":
            wrong = next(line[0] for line in row["options"].splitlines() if line[0] != row["target"])
        elif row["form"] == "long":
            wrong = next(f"It is {c}." for c in CANDIDATES[row["kind"]] if c != row["target"])
        else:
            wrong = "the second" if reference == "the first" else "the first"
        assert not scorer(wrong, row)[0], (wrong, row)
        assert not scorer("", row)[0]
    expected = {"turns:1", "turns:2", "turns:3", "images:1", "images:2", "text-only", "form:mc", "kind:compare"}
    assert expected <= set(groups)
    # without the last turn's columns, the scorer falls back to exact match with the last answer
    bare = {k: v for k, v in row.items() if k not in ("form", "kind", "target", "options")}
    assert scorer(f" {reference.upper()} ", bare)[0] and not scorer("zebra", bare)[0]


def test_last_turn_reference_undoes_datasets_decoding_a_plain_answer():
    # datasets reads plain-string and list contents as one Json column, and gives a plain answer
    # that is valid JSON back decoded: "2" as 2 (seen with datasets 5.2)
    messages = [{"role": "user", "content": "How many shapes are there?"}, {"role": "assistant", "content": 2}]
    row = {"messages": messages, "images": [], "kind": "count", "form": "short", "target": "2", "options": ""}
    assert last_turn_reference(row) == "2"
    assert scorer("2", row) == (True, ["form:short", "kind:count", "turns:1", "text-only"])


@pytest.mark.parametrize("style", chats.STYLES)
def test_the_project_reads_the_rows_as_written(tmp_path, style):
    """Through the project's own reader (datasets), whose Json column turns the answer "2" into 2."""
    from genrecal_cli.data.formats import detect
    from genrecal_cli.data.sources import load_split
    from genrecal_cli.recipe import DataSpec

    spec = DataSpec(source=str(write_chats(tmp_path, "train", 200, style=style)))
    rows = load_split(spec, "train")
    fmt = detect(rows.column_names, spec)
    assert fmt == {"messages": "messages", "llava": "conversations"}[style]
    for i, row in enumerate(rows):
        conv = to_conversation(row, fmt, spec, i)
        paths = row.get("images") or ([row["image"]] if isinstance(row.get("image"), str) else row.get("image") or [])
        assert conv.images == paths
        assert f"turns:{conv.turns}" in scorer("", row)[1]
        assert conv.prompt_and_reference()[1] == last_turn_reference(row)


def test_build_chats_reuses_what_is_there_and_rebuilds_on_change(tmp_path, monkeypatch):
    root = tmp_path / "chats"
    assert build_chats(root, 20, 10) == root
    train = root / "train.jsonl"
    first = (train.stat().st_mtime_ns, train.stat().st_ino)
    assert len(_rows(train)) == 20 and len(_rows(root / "validation.jsonl")) == 10
    with monkeypatch.context() as m:  # reused means not even generated again
        m.setattr(chats, "write_chats", lambda *a, **k: pytest.fail("rebuilt an up-to-date folder"))
        build_chats(root, 20, 10)
    assert (train.stat().st_mtime_ns, train.stat().st_ino) == first
    build_chats(root, 25, 10)
    assert (train.stat().st_mtime_ns, train.stat().st_ino) != first and len(_rows(train)) == 25
    assert json.loads((root / "chats.json").read_text())["n_train"] == 25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chats"]  # no temporary folders left behind
    # a folder it did not make is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_chats(tmp_path / "mine", 5, 5)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
