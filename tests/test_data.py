"""One conversation tokenized by each side: segments and answer masks per turn, several images,
truncation by whole turns, skipping and counting, collation and the loader (workers, position)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from genrecal_cli.data.formats import Conversation, to_conversation
from genrecal_cli.data.loader import Batches, Collator, Item, PairDataset, Skipped, model_inputs
from genrecal_cli.data.render import encode, encode_pair, is_answer, segment_texts
from genrecal_cli.data.sources import SkipItem
from genrecal_cli.data.sampler import RankBatches
from genrecal_cli.errors import DataError
from genrecal_cli.recipe import DataSpec
from genrecal_cli.commands.distill import load_rows as load_split  # shapes or an external source, as a run loads it

IMG, TXT = {"type": "image"}, lambda t: {"type": "text", "text": t}
RED, BLUE = Image.new("RGB", (64, 64), (220, 30, 30)), Image.new("RGB", (64, 64), (30, 70, 220))


def two_images_three_turns() -> Conversation:
    return Conversation([
        {"role": "system", "content": [TXT("Answer briefly.")]},
        {"role": "user", "content": [IMG, TXT("What colour is the square?")]},
        {"role": "assistant", "content": [TXT("red")]},
        {"role": "user", "content": [TXT("Are you sure?")]},
        {"role": "assistant", "content": [TXT("Yes, the square is red.")]},
        {"role": "user", "content": [IMG, TXT("And in this picture?")]},
        {"role": "assistant", "content": [TXT("blue")]},
    ], [RED, BLUE])


def sides(tiny_pair) -> dict:
    teacher, student = tiny_pair
    return {"teacher": teacher.processor, "student": student.processor}


def test_every_answer_turn_is_masked_token_by_token_on_both_sides(tiny_pair):
    conv = two_images_three_turns()
    encoded, dropped = encode_pair(sides(tiny_pair), conv, conv.images, 4096)
    assert dropped == 0
    batch = Collator(sides(tiny_pair))([Item(0, encoded)])
    for vlm, side in zip(tiny_pair, ("teacher", "student")):
        e, b = encoded[side], batch[side]
        texts = segment_texts(vlm.processor, conv)
        assert len(texts) == 6 and [a.text for a in e.answers] == texts[1::2]
        # segments are contiguous and in order: q1 a1 q2 a2 q3 a3
        seg = e.segment
        assert sorted(set(seg)) == list(range(6)) and seg == sorted(seg)
        ids = torch.tensor(e.input_ids)
        for k, plain in enumerate(["red", "Yes, the square is red.", "blue"]):
            mine = ids[torch.tensor(seg) == 2 * k + 1].tolist()
            # exactly the tokens of the rendered answer turn (with its end-of-turn markup) ...
            assert mine == vlm.tokenizer(texts[2 * k + 1], add_special_tokens=False)["input_ids"]
            assert vlm.tokenizer.decode(mine, skip_special_tokens=True).strip() == plain
            a = e.answers[k]
            assert a.text[a.span[0]:a.span[1]] == plain and len(a.offsets) == len(mine)
        # ... and the labels are those tokens, -100 on every system/user token
        labels = b["labels"][0]
        answer = torch.tensor([s % 2 == 1 for s in seg])
        assert torch.equal(labels[answer], ids[answer]) and (labels[~answer] == -100).all()
        assert torch.equal(is_answer(b["segment"][0][: len(seg)]), answer) and "answer_mask" not in b
        # both images, each in the question segment that shows it, none elsewhere
        img = ids == vlm.image_token_id
        per_segment = [int(img[torch.tensor(seg) == s].sum()) for s in range(6)]
        assert per_segment == [vlm.image_tokens_per_image(), 0, 0, 0, vlm.image_tokens_per_image(), 0]
        with torch.no_grad():
            hidden = vlm.body(**model_inputs(b))
        assert hidden.shape == (1, len(ids), vlm.hidden_size)
    # different tokenizers: the same answers are not the same ids
    t, s = (torch.tensor(encoded[x].input_ids)[torch.tensor(encoded[x].segment) % 2 == 1] for x in ("teacher", "student"))
    assert t.tolist() != s.tolist()


def test_text_only_and_image_items_share_a_batch(tiny_pair):
    text_only = Conversation([{"role": "user", "content": [TXT("How many sides has a triangle?")]},
                              {"role": "assistant", "content": [TXT("three")]}])
    items = [Item(i, encode_pair(sides(tiny_pair), c, c.images, 4096)[0])
             for i, c in enumerate([text_only, two_images_three_turns()])]
    batch = Collator(sides(tiny_pair))(items)
    for vlm, side in zip(tiny_pair, ("teacher", "student")):
        b = batch[side]
        assert (b["segment"][0] >= 0).sum() < (b["segment"][1] >= 0).sum()
        assert (b["segment"][0][b["attention_mask"][0] == 0] == -1).all()
        assert int((b["input_ids"][0] == vlm.image_token_id).sum()) == 0
        with torch.no_grad():
            assert torch.isfinite(vlm.body(**model_inputs(b))).all()


def test_trailing_turns_are_dropped_whole_and_the_same_on_both_sides(tiny_pair):
    conv = two_images_three_turns()
    full, _ = encode_pair(sides(tiny_pair), conv, conv.images, 4096)
    # room for two turns on the longer side, not three
    longer = max(full.values(), key=lambda e: len(e.input_ids))
    two_turns = sum(1 for s in longer.segment if s < 4)
    cut, dropped = encode_pair(sides(tiny_pair), conv, conv.images, two_turns)
    assert dropped == 1
    for side, e in cut.items():
        n = sum(1 for s in full[side].segment if s < 4)
        assert e.input_ids == full[side].input_ids[:n] and max(e.segment) == 3 and len(e.answers) == 2
    # the second image was in the dropped turn: its tensors went with it
    assert cut["student"].image_inputs["pixel_values"].shape[0] == 1
    assert cut["teacher"].image_inputs["image_grid_thw"].shape[0] == 1
    # a first turn that does not fit: skipped, never cut inside
    first = sum(1 for s in longer.segment if s < 2)
    with pytest.raises(SkipItem, match="first turn longer than max_length"):
        encode_pair(sides(tiny_pair), conv, conv.images, first - 1)


def test_a_template_that_cannot_be_cut_into_turns_is_refused():
    class Stamping:  # renders the last message differently from the same message earlier on
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return "".join(("LAST:" if i == len(messages) - 1 else "") + m["role"] for i, m in enumerate(messages))

    with pytest.raises(DataError, match="does not render .* as a continuation"):
        segment_texts(Stamping(), two_images_three_turns())


def _write(tmp_path, rows, name="train.jsonl"):
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / name)


def _scene(tmp_path):
    load_split(DataSpec(shapes_size=5), "train")[0]["image"].save(tmp_path / "img.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")


def test_each_layout_loads_from_a_file(tiny_pair, tmp_path):
    _scene(tmp_path)
    llava = {"id": "a", "image": "img.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many shapes?"}, {"from": "gpt", "value": "one"}]}
    messages = {"messages": [{"role": "user", "content": [IMG, TXT("q1")]}, {"role": "assistant", "content": "a1"},
                             {"role": "user", "content": [IMG, TXT("q2")]}, {"role": "assistant", "content": "a2"}],
                "images": ["img.png", "img.png"]}
    for rows, turns, images in (([llava], 2, 1), ([messages], 2, 2), ([{"question": "2+2?", "answer": "4"}], 1, 0)):
        folder = tmp_path / f"l{turns}{images}"
        folder.mkdir()
        (folder / "img.png").write_bytes((tmp_path / "img.png").read_bytes())
        spec = DataSpec(source=_write(folder, rows))
        item = PairDataset(load_split(spec, "train"), spec, sides(tiny_pair))[0]
        assert isinstance(item, Item)
        for vlm, side in zip(tiny_pair, ("teacher", "student")):
            e = item.sides[side]
            assert len(e.answers) == turns
            assert e.input_ids.count(vlm.image_token_id) == images * vlm.image_tokens_per_image()


def test_unusable_items_are_skipped_where_met_and_counted_once(tiny_pair, tmp_path):
    _scene(tmp_path)
    long_turns = [{"role": r, "content": "word " * 40} for r in ("user", "assistant") * 3]
    rows = [
        {"messages": [{"role": "user", "content": [IMG, TXT("What colour?")]}, {"role": "assistant", "content": "red"}], "images": ["img.png"]},
        {"messages": [{"role": "user", "content": [IMG, TXT("What colour?")]}, {"role": "assistant", "content": "red"}], "images": ["broken.png"]},
        {"messages": [{"role": "user", "content": [IMG, TXT("What colour?")]}, {"role": "assistant", "content": "red"}], "images": ["missing.png"]},
        {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "red"}]},  # first turn too long
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, *long_turns]},  # cut
    ]
    spec = DataSpec(source=_write(tmp_path, rows), max_length=200)
    ds = PairDataset(load_split(spec, "train"), spec, sides(tiny_pair))
    met = [ds[i] for i in range(len(ds))]
    assert [type(m).__name__ for m in met] == ["Item", "Skipped", "Skipped", "Skipped", "Item"]
    assert met[4].dropped >= 1
    batches = Batches(ds, RankBatches(len(ds), 5, 1, 0, seed=0), sides(tiny_pair), workers=0, pin_memory=False)
    for _ in range(3):  # three epochs: each row counted once
        batch = next(batches)
        assert batch["items"] == 2 and batch["student"]["input_ids"].shape[0] == 2
    report = batches.report
    assert sorted(report.skipped) == [1, 2, 3] and list(report.truncated) == [4]
    assert report.skipped == {1: "unreadable image (UnidentifiedImageError)", 2: "image file not found",
                              3: "first turn longer than max_length 200"}
    line = report.summary(5, 200)
    assert line.startswith("skipped 3 of 5 items (") and f"dropped {met[4].dropped} trailing turns of 1 items" in line


def test_a_malformed_row_stops_with_its_row_and_field(tiny_pair, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistent", "content": "a"}]}]
    spec = DataSpec(source=_write(tmp_path, rows))
    ds = PairDataset(load_split(spec, "train"), spec, sides(tiny_pair))
    with pytest.raises(DataError, match=r"train.jsonl: row 1 \(from 0\): messages\[1\].role: 'assistent' is not one of"):
        ds.check_start()



def test_a_malformed_row_met_in_a_loader_worker_stops_with_its_one_line(tiny_pair, tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistent", "content": "a"}]}
    spec = DataSpec(source=_write(tmp_path, [good] * 5 + [bad] + [good] * 2))
    ds = PairDataset(load_split(spec, "train"), spec, sides(tiny_pair))
    ds.check_start(4)  # the bad row is past the start check: met in training, in a worker
    batches = Batches(ds, RankBatches(len(ds), 2, 1, 0, seed=0), sides(tiny_pair), workers=1,
                      pin_memory=False)
    with pytest.raises(DataError) as err:
        for _ in range(4):
            next(batches)
    assert str(err.value).endswith("train.jsonl: row 5 (from 0): messages[1].role: 'assistent' is not one of system, user, assistant")
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_all_skipped_at_the_start_is_an_error(tiny_pair):
    spec = DataSpec(max_length=8, shapes_size=6)
    ds = PairDataset(load_split(spec, "train"), spec, sides(tiny_pair))
    with pytest.raises(DataError, match="the first 6 items were all skipped .*first turn longer than max_length 8"):
        ds.check_start()


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a if k != "data")
    return a == b


def test_workers_give_the_same_batches_and_a_saved_position_resumes(tiny_pair):
    spec = DataSpec(max_length=256, shapes_size=24)
    ds = PairDataset(load_split(spec, "train"), spec, sides(tiny_pair))

    def take(workers, position, n):
        batches = Batches(ds, RankBatches(len(ds), 4, 1, 0, seed=3), sides(tiny_pair), workers=workers,
                          pin_memory=False, state=position)
        return [next(batches) for _ in range(n)], batches.position

    plain, pos = take(0, 0, 9)  # 6 per epoch: crosses into the second epoch
    assert pos == 9
    forked, _ = take(2, 0, 9)
    assert all(_same(a, b) for a, b in zip(plain, forked))
    resumed, _ = take(2, 4, 5)  # from a checkpoint taken after 4 micro-batches
    assert all(_same(a, b) for a, b in zip(plain[4:], resumed))
    assert not _same(plain[0], plain[1])


def test_missing_columns_name_the_file_and_what_was_looked_for(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"img": "x.png", "prompt": "q", "completion": "a"}) + "\n")
    with pytest.raises(DataError) as info:
        load_split(DataSpec(source=str(data)), "train")
    msg = str(info.value)
    assert str(data) in msg and "'messages'" in msg and "'question'" in msg and "img, prompt, completion" in msg


def test_parquet_source_round_trip(tmp_path):
    from genrecal_cli.world.shapes import build_shapes

    out = build_shapes(tmp_path / "shapes", sizes={"train": 12, "validation": 4, "test": 4})
    rows = load_split(DataSpec(source=str(out / "train.parquet")), "train")
    assert len(rows) == 12 and {"image", "question", "answer"} <= set(rows.column_names)
    conv = to_conversation(rows[0], "columns", DataSpec(), 0)
    assert len(conv.images) == 1 and conv.turns == 1


def test_encode_alone_drops_turns_like_the_pair(tiny_pair):
    teacher, _ = tiny_pair
    conv = two_images_three_turns()
    full = encode(teacher.processor, conv, conv.images)
    two = sum(1 for s in full.segment if s < 4)
    assert encode(teacher.processor, conv, conv.images, two).input_ids == full.input_ids[:two]
    assert isinstance(Skipped(0, "x"), Skipped)


def _chats(tmp_path, n=120):
    from genrecal_cli.world.chats import build_chats

    root = build_chats(tmp_path / "chats", n, 20)
    spec = DataSpec(source=str(root))
    return load_split(spec, "train"), spec


def test_length_grouping_keeps_every_item_once_and_batches_similar_lengths(tmp_path):
    from genrecal_cli.data.sampler import length_estimates

    rows, spec = _chats(tmp_path)
    lengths = length_estimates(rows, spec, image_tokens=64)
    est = lengths(list(range(len(rows))))
    assert min(est) > 0 and max(est) > 2 * min(est)  # text-only, one and two pictures

    def epoch(group, rank=0, processes=2, epoch=1, skip=0):
        s = RankBatches(len(rows), 4, processes, rank, seed=5, lengths=lengths if group else None, group=4)
        s.set_epoch(epoch, skip)
        return list(s)

    for group in (False, True):
        seen = sorted(i for r in range(2) for b in epoch(group, rank=r) for i in b)
        assert seen == list(range(len(rows)))  # a permutation: each item once per epoch, across ranks

    def spread(batches):  # mean (longest - shortest) estimated length within a global batch
        pairs = [a + b for a, b in zip(epoch(batches, 0), epoch(batches, 1))]
        return sum(max(est[i] for i in p) - min(est[i] for i in p) for p in pairs) / len(pairs)

    assert spread(True) < 0.5 * spread(False)
    assert epoch(True, skip=7) == epoch(True)[7:]  # resumable mid-epoch
    assert epoch(True, epoch=2) != epoch(True, epoch=1)


def test_length_estimates_follow_the_real_token_counts(tiny_pair, tmp_path):
    from genrecal_cli.data.sampler import length_estimates

    rows, spec = _chats(tmp_path, n=40)
    teacher, student = tiny_pair
    est = length_estimates(rows, spec, image_tokens=student.image_tokens_per_image())(list(range(40)))
    ds = PairDataset(rows, spec, {"student": student.processor})
    real = [len(ds[i].sides["student"].input_ids) for i in range(40)]
    rank = lambda xs: [sorted(xs).index(x) for x in xs]  # noqa: E731
    ra, rb = torch.tensor(rank(est), dtype=torch.float), torch.tensor(rank(real), dtype=torch.float)
    assert torch.corrcoef(torch.stack([ra, rb]))[0, 1] > 0.8


def _shards(tmp_path, n=24, files=4):
    folder = tmp_path / "stream"
    folder.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(n)]
    for f in range(files):
        _write(folder, rows[f::files], name=f"train-{f:05d}.jsonl")
    return folder, rows


def test_a_stream_is_shared_by_processes_and_workers_and_resumes_mid_epoch(tiny_pair, tmp_path):
    from genrecal_cli.data.stream import StreamBatches, row_key
    from genrecal_cli.commands.distill import load_stream

    _, student = tiny_pair
    folder, rows = _shards(tmp_path)
    spec = DataSpec(source=str(folder), streaming=True, shuffle_buffer=8)
    sides = {"student": student.processor}

    def batches(rank, state=None):
        stream = load_stream(spec, "train")
        ds = PairDataset(stream, spec, sides, columns=["messages"])
        return StreamBatches(ds, stream, sides, batch_size=2, processes=2, rank=rank, seed=1, workers=2,
                             pin_memory=False, state=state)

    def epoch_keys(it, limit=None):
        keys = []
        while limit is None or len(keys) < limit:
            b = next(it)
            if it.source.epoch > 0:
                break
            keys.append(b["keys"])
        return keys

    everyone = {r: epoch_keys(batches(r)) for r in (0, 1)}
    flat = [k for r in everyone.values() for b in r for k in b]
    assert sorted(flat) == sorted(row_key(r) for r in rows)  # each row once across the processes
    assert everyone[0] and everyone[1]
    # stop rank 0 after 3 micro-batches, save its state, resume: the rest of the same epoch
    first = batches(0)
    before = epoch_keys(first, limit=3)
    state = first.state()
    assert state["epoch"] == 0 and sum(state["workers"].values()) == 3 and state["num_workers"] == 2
    after = epoch_keys(batches(0, state=state))
    assert sorted(k for b in before + after for k in b) == sorted(k for b in everyone[0] for k in b)
    with pytest.raises(DataError, match="saved with data.num_workers = 2"):
        stream = load_stream(spec, "train")
        StreamBatches(PairDataset(stream, spec, sides, columns=["messages"]), stream, sides, batch_size=2,
                      processes=2, rank=0, seed=1, workers=0, pin_memory=False, state=state)
    # the next epoch reshuffles
    it = batches(0)
    epoch_keys(it)
    assert it.source.epoch == 1


def test_streaming_needs_steps_and_no_length_grouping():
    from genrecal_cli.errors import RecipeError
    from genrecal_cli.recipe import recipe_from_dict

    raw = {"student": {"path": "zoo:tiny-student"}, "data": {"streaming": True, "group_by_length": True},
           "stages": {"finetune": {"epochs": 1.0, "lr": 1e-3, "batch_size": 2}}}
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw)
    problems = info.value.problems
    assert any(p.startswith("stages.finetune: data.streaming needs `steps`") for p in problems)
    assert any(p.startswith("data.group_by_length: not available with data.streaming") for p in problems)


def test_a_streamed_run_trains_and_exports(tmp_path, tiny_pair):
    from genrecal_cli.recipe import recipe_from_dict
    from genrecal_cli.commands.distill import distill

    raw = {"teacher": {"path": "zoo:tiny-teacher"}, "student": {"path": "zoo:tiny-student"},
           "data": {"source": "chats", "shapes_size": 30, "max_length": 256, "streaming": True, "num_workers": 1},
           "stages": {s: {"steps": 2, "batch_size": 2, "lr": 1e-3} for s in ("align", "finetune")},
           "train": {"output_dir": str(tmp_path / "out"), "eval_items": 0, "probe_every": 1}}
    result = distill(recipe_from_dict(raw))
    assert result.stages["align"]["steps"] == 2 and result.stages["finetune"]["steps"] == 2
    assert (tmp_path / "out" / "student" / "model.safetensors").is_file()
    assert result.stages["align"]["metrics"]["ar"] > 0


def test_data_reports_merge_every_row_once():
    """What processes and stages met is merged: a row met by several (the same row in every
    epoch and stage, on either process) counts once, and none is lost. The whole path on 2 ranks:
    test_parallel.py, rows skipped on either rank."""
    from genrecal_cli.data.loader import DataReport

    rank0 = DataReport({1: "image file not found", 7: "image file not found"}, {4: 1})
    rank1 = DataReport({1: "image file not found", 2: "first turn longer than max_length 8"}, {4: 1, 6: 2})
    later_stage = DataReport({7: "image file not found", 2: "first turn longer than max_length 8"}, {6: 2})
    run = DataReport()
    for part in (rank0, rank1, later_stage):
        run.add(part)
    assert run.skipped == {1: "image file not found", 2: "first turn longer than max_length 8", 7: "image file not found"}
    assert run.truncated == {4: 1, 6: 2}
    assert run.to_dict() == {"skipped_items": 3, "skipped_by_reason": {"image file not found": 2,
                             "first turn longer than max_length 8": 1}, "truncated_items": 2, "dropped_turns": 3}
    assert run.summary(10, 8) == ("skipped 3 of 10 items (2 image file not found; 1 first turn longer than max_length 8); "
                                  "dropped 3 trailing turns of 2 items to fit max_length 8")


def test_a_streamed_file_is_read_as_the_loop_needs_it_not_whole(tmp_path):
    """The first rows of a large streamed JSON file come from its first chunk: a file whose tail
    (past 4 MiB) is not JSON at all still gives its first batch, so the time to the first step
    does not grow with the file (datasets' default 10 MiB chunk would parse that tail first)."""
    from genrecal_cli.commands.distill import load_stream

    row = {"question": "what is drawn here, and in which colour? " * 50, "answer": "a red square " * 4}
    line = json.dumps(row) + "\n"
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        f.write(line * (4 * 2**20 // len(line) + 1))
        f.write("this is not json {\n" * 1000)
    spec = DataSpec(source=str(path), streaming=True)
    first = list(load_stream(spec, "train").shuffle(seed=0, buffer_size=64).take(16))
    assert len(first) == 16 and all(r["answer"] == row["answer"] for r in first)


def test_a_stream_that_turns_unreadable_stops_with_one_line_naming_it(tiny_pair, tmp_path):
    from genrecal_cli.data.stream import StreamBatches
    from genrecal_cli.commands.distill import load_stream

    _, student = tiny_pair
    line = json.dumps({"question": "what is drawn here? " * 100, "answer": "a red square"}) + "\n"
    path = tmp_path / "cut.jsonl"
    path.write_text(line * (2 * 2**20 // len(line)) + "not json {\n")  # the tail past the first chunk
    spec = DataSpec(source=str(path), streaming=True, shuffle_buffer=8)
    stream, sides_ = load_stream(spec, "train"), {"student": student.processor}
    batches = StreamBatches(PairDataset(stream, spec, sides_, columns=["question", "answer"]), stream, sides_,
                            batch_size=512, processes=1, rank=0, seed=1, workers=1, pin_memory=False)
    with pytest.raises(DataError, match=r"^\S*cut.jsonl: cannot read the streamed data \(ArrowInvalid: JSON parse") as err:
        while batches.source.epoch == 0:
            next(batches)
    assert "\n" not in str(err.value)


def test_which_sources_hold_a_validation_split(tmp_path):
    """A single file or a folder of train files has none (its rows are held out for the table);
    split files and saved splits are found; built-in sets and hub ids are taken at their word."""
    import datasets

    from genrecal_cli.data.sources import has_split

    rows = [{"question": "q", "answer": "a"}]
    file = _write(tmp_path, rows, name="d.jsonl")
    only_train = tmp_path / "only"
    only_train.mkdir()
    _write(only_train, rows, name="train-00000.jsonl")
    both = tmp_path / "both"
    both.mkdir()
    _write(both, rows, name="train.jsonl")
    datasets.Dataset.from_list(rows).to_parquet(str(both / "validation-00000.parquet"))
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    one = tmp_path / "one"
    datasets.Dataset.from_list(rows).save_to_disk(str(one))
    found = {name: has_split(DataSpec(source=str(src)), "validation")
             for name, src in (("file", file), ("only", only_train), ("both", both), ("saved", saved), ("one", one))}
    assert found == {"file": False, "only": False, "both": True, "saved": False, "one": False}
    assert has_split(DataSpec(source=str(saved)), "train") and has_split(DataSpec(source=str(both)), "train")
    assert has_split(DataSpec(source="shapes"), "validation") and has_split(DataSpec(source="org/set"), "validation")
