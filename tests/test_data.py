"""One item tokenized twice: answer masks, collation, truncation and skipping, data sources."""

from __future__ import annotations

import json

import pytest
import torch

from genrecal_cli.data import Collator, PairDataset, encode, model_inputs, SkipItem
from genrecal_cli.run import load_rows as load_split  # shapes or an external source, as a run loads it
from genrecal_cli.errors import DataError
from genrecal_cli.recipe import DataSpec


@pytest.fixture(scope="module")
def pair_ds(tiny_pair):
    teacher, student = tiny_pair
    spec = DataSpec(max_length=256, shapes_size=60)
    procs = {"teacher": teacher.processor, "student": student.processor}
    return PairDataset(load_split(spec, "train"), spec, procs).scan(), Collator(procs)


def test_both_answer_masks_decode_to_the_same_answer(tiny_pair, pair_ds):
    teacher, student = tiny_pair
    ds, collate = pair_ds
    batch = collate([ds[i] for i in range(8)])
    for r in range(8):
        answer = ds.rows[ds.keep[r]]["answer"]
        texts = {}
        for side, vlm in (("teacher", teacher), ("student", student)):
            ids = batch[side]["input_ids"][r][batch[side]["answer_mask"][r]]
            texts[side] = vlm.tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert texts["teacher"] == texts["student"] == answer
        # different tokenizers: the same answer is not the same id sequence
    t_ids = batch["teacher"]["labels"][0][batch["teacher"]["answer_mask"][0]].tolist()
    s_ids = batch["student"]["labels"][0][batch["student"]["answer_mask"][0]].tolist()
    assert t_ids != s_ids


def test_collated_batch_shapes_and_image_tokens(tiny_pair, pair_ds):
    teacher, student = tiny_pair
    ds, collate = pair_ds
    batch = collate([ds[i] for i in range(3)])
    for side, vlm in (("teacher", teacher), ("student", student)):
        b = batch[side]
        assert b["input_ids"].shape == b["attention_mask"].shape == b["labels"].shape
        n_img = (b["input_ids"] == vlm.image_token_id).sum(1)
        assert n_img.tolist() == [vlm.image_tokens_per_image()] * 3
        # answers start right after the prompt and labels are -100 before
        for r in range(3):
            start = int(b["answer_start"][r])
            assert (b["labels"][r, :start] == -100).all() and b["labels"][r, start] != -100
        with torch.no_grad():
            hidden = vlm.body(**model_inputs(b))
        assert hidden.shape == (*b["input_ids"].shape, vlm.hidden_size)


def test_offsets_cover_the_answer_text(pair_ds):
    ds, _ = pair_ds
    item = ds[0]
    for enc in item.values():
        assert len(enc.answer_offsets) == enc.num_answer_tokens
        assert enc.answer_offsets[0][0] <= enc.answer_offsets[-1][1] <= len(enc.answer_text)


def test_long_answers_are_cut_but_never_the_question(tiny_pair):
    teacher, _ = tiny_pair
    rows = load_split(DataSpec(shapes_size=20), "train")
    row = next(r for r in rows if r["form"] == "long")
    full = encode(teacher.processor, row["image"].convert("RGB"), row["question"], row["answer"], 512)
    cut = encode(teacher.processor, row["image"].convert("RGB"), row["question"], row["answer"], full.answer_start + 2)
    assert cut.input_ids == full.input_ids[: full.answer_start + 2]
    assert cut.num_answer_tokens == 2
    with pytest.raises(SkipItem, match="longer than max_length"):
        encode(teacher.processor, row["image"].convert("RGB"), row["question"], row["answer"], full.answer_start)


def test_items_are_skipped_and_counted(tiny_pair, tmp_path):
    teacher, student = tiny_pair
    img = tmp_path / "img.png"
    load_split(DataSpec(shapes_size=5), "train")[0]["image"].save(img)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [
        {"image": "img.png", "question": "What colour is it?", "answer": "red"},
        {"image": "broken.png", "question": "What colour is it?", "answer": "red"},
        {"image": "missing.png", "question": "What colour is it?", "answer": "blue"},
        {"image": "img.png", "question": "How many?", "answer": "2"},
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    spec = DataSpec(source=str(data))
    ds = PairDataset(load_split(spec, "train"), spec, {"teacher": teacher.processor, "student": student.processor})
    ds.scan()
    assert len(ds) == 2 and sum(ds.skipped.values()) == 2
    assert ds.skipped["unreadable image (UnidentifiedImageError)"] == 1
    assert ds.skipped["unreadable image (FileNotFoundError)"] == 1
    assert ds.skip_summary().startswith("skipped 2 of 4 items: ")


def test_missing_column_names_file_and_column(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"img": "x.png", "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError) as info:
        load_split(DataSpec(source=str(data)), "train")
    msg = str(info.value)
    assert str(data) in msg and "'image'" in msg and "img" in msg


def test_parquet_source_round_trip(tmp_path):
    from genrecal_cli.world.shapes import build_shapes

    out = build_shapes(tmp_path / "shapes", sizes={"train": 12, "validation": 4, "test": 4})
    rows = load_split(DataSpec(source=str(out / "train.parquet")), "train")
    assert len(rows) == 12 and {"image", "question", "answer"} <= set(rows.column_names)


def test_every_item_skipped_is_an_error(tiny_pair):
    teacher, _ = tiny_pair
    spec = DataSpec(max_length=8, shapes_size=6)
    with pytest.raises(DataError, match="every item was skipped"):
        PairDataset(load_split(spec, "train"), spec, {"teacher": teacher.processor}).scan()
