"""Every layout of training data becomes one Conversation, or a one-line error naming the row
and the field (data/formats.py); no models needed."""

from __future__ import annotations

import json

import pytest

from genrecal_cli.data.formats import Conversation, answers_of, detect, to_conversation
from genrecal_cli.errors import DataError
from genrecal_cli.recipe import DataSpec

SPEC = DataSpec(source="d.jsonl")
IMG, TXT = {"type": "image"}, lambda t: {"type": "text", "text": t}


def test_layout_is_told_by_the_columns():
    assert detect(["messages", "images"], SPEC) == "messages"
    assert detect(["id", "image", "conversations"], SPEC) == "conversations"
    assert detect(["image", "question", "answer"], SPEC) == "columns"
    assert detect(["question", "answer"], SPEC) == "columns"  # text-only
    assert detect(["images", "texts"], SPEC) == "cauldron"
    with pytest.raises(DataError) as info:
        detect(["prompt", "completion"], SPEC)
    assert "d.jsonl" in str(info.value) and "prompt, completion" in str(info.value)
    assert "'texts' (The Cauldron)" in str(info.value) and "data.messages_column" in str(info.value)


def test_a_named_layout_whose_column_is_missing_names_it():
    with pytest.raises(DataError, match=r"data.format is 'messages' but column 'messages' is missing"):
        detect(["question", "answer"], DataSpec(source="d.jsonl", format="messages"))


def test_columns_row_is_one_turn_with_or_without_its_image():
    conv = to_conversation({"image": "a.png", "question": "What colour?", "answer": ["red", "Red"]}, "columns", SPEC, 0)
    assert conv.messages == [{"role": "user", "content": [IMG, TXT("What colour?")]},
                             {"role": "assistant", "content": [TXT("red")]}]
    assert conv.images == ["a.png"]
    text_only = to_conversation({"image": None, "question": "2+2?", "answer": "4"}, "columns", SPEC, 1)
    assert text_only.images == [] and text_only.messages[0]["content"] == [TXT("2+2?")]


def test_messages_with_two_images_several_turns_and_string_content():
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [IMG, TXT("What colour is it?")]},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": [TXT("And here?"), IMG]},
            {"role": "assistant", "content": [TXT("blue")]},
            {"role": "user", "content": "thanks"},  # after the last answer: nothing to learn, dropped
        ],
        "images": ["a.png", "b.png"],
    }
    conv = to_conversation(row, "messages", SPEC, 3)
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conv.messages[0]["content"] == [TXT("Be brief.")]
    assert conv.messages[3]["content"] == [TXT("And here?"), IMG]
    assert conv.images == ["a.png", "b.png"] and conv.turns == 2 and answers_of(conv) == ["red", "blue"]
    prompt, reference = conv.prompt_and_reference()
    assert reference == "blue" and len(prompt.messages) == 4 and prompt.images == ["a.png", "b.png"]


def test_inline_images_in_parts_are_taken_in_order():
    row = {"messages": [{"role": "user", "content": [{"type": "image", "path": "x.png"}, TXT("q")]},
                        {"role": "assistant", "content": "a"}]}
    assert to_conversation(row, "messages", SPEC, 0).images == ["x.png"]


def test_the_cauldron_layout_shows_every_image_with_the_first_question():
    """HuggingFaceM4/the_cauldron: `images` + `texts` [{user, assistant, source}]; a widely used
    VLM instruction set, read as it ships."""
    row = {"images": ["a.png", "b.png"], "texts": [
        {"user": "Which one is larger?", "assistant": "The first.", "source": "vqa"},
        {"user": "And its colour?", "assistant": "Red.", "source": "vqa"},
    ]}
    conv = to_conversation(row, "cauldron", SPEC, 0)
    assert conv.messages == [{"role": "user", "content": [IMG, IMG, TXT("Which one is larger?")]},
                             {"role": "assistant", "content": [TXT("The first.")]},
                             {"role": "user", "content": [TXT("And its colour?")]},
                             {"role": "assistant", "content": [TXT("Red.")]}]
    assert conv.images == ["a.png", "b.png"] and answers_of(conv) == ["The first.", "Red."]
    text_only = to_conversation({"images": [], "texts": [{"user": "2+2?", "assistant": "4"}]}, "cauldron", SPEC, 1)
    assert text_only.images == [] and text_only.messages[0]["content"] == [TXT("2+2?")]


def test_llava_conversations_with_image_placeholders():
    row = {"image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"},
        {"from": "gpt", "value": "A red circle."},
        {"from": "human", "value": "Compare with <image> please."},
        {"from": "gpt", "value": "The second is blue."},
    ]}
    conv = to_conversation(row, "conversations", SPEC, 0)
    assert conv.messages[0]["content"] == [IMG, TXT("What is shown?")]
    assert conv.messages[2]["content"] == [TXT("Compare with"), IMG, TXT("please.")]
    assert conv.images == ["a.png", "b.png"] and answers_of(conv) == ["A red circle.", "The second is blue."]
    text_only = to_conversation({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
                                "conversations", SPEC, 1)
    assert text_only.images == [] and text_only.messages[0]["content"] == [TXT("hi")]


@pytest.mark.parametrize("fmt, row, named", [
    ("columns", {"question": "q", "answer": ""}, "row 7 (from 0): field 'answer' is empty"),
    ("columns", {"question": None, "answer": "a"}, "row 7 (from 0): field 'question' is empty"),
    ("messages", {"messages": "hello"}, "row 7 (from 0): field 'messages' must be a non-empty list"),
    ("messages", {"messages": [{"role": "bot", "content": "x"}]}, "row 7 (from 0): messages[0].role: 'bot' is not one of"),
    ("messages", {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "row 7 (from 0): messages[0].content[0]: expected"),
    ("messages", {"messages": [{"role": "user", "content": [IMG, TXT("q")]}, {"role": "assistant", "content": "a"}],
                  "images": []}, "row 7 (from 0): messages[0].content[0]: image part 1 has no image ('images' lists 0)"),
    ("messages", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                  "images": ["a.png"]}, "row 7 (from 0): 'images' lists 1 images but the messages have 0 image parts"),
    ("messages", {"messages": [{"role": "user", "content": "q"}]}, "row 7 (from 0): field 'messages' has no assistant turn"),
    ("messages", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [IMG]}],
                  "images": ["a.png"]}, "row 7 (from 0): messages[1]: an assistant message holds an image"),
    ("messages", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
     "row 7 (from 0): messages[1] is an empty answer"),
    ("conversations", {"conversations": [{"from": "robot", "value": "x"}]}, "row 7 (from 0): conversations[0].from: 'robot'"),
    ("conversations", {"conversations": [{"from": "human", "value": 3}]}, "row 7 (from 0): conversations[0].value: expected a string"),
    ("conversations", {"image": "a.png", "conversations": [{"from": "human", "value": "no placeholder"},
                                                           {"from": "gpt", "value": "a"}]},
     "row 7 (from 0): 0 <image> placeholder(s) in 'conversations' but 1 image(s) in 'image'"),
    ("cauldron", {"texts": "hello"}, "row 7 (from 0): field 'texts' must be a non-empty list of turns"),
    ("cauldron", {"texts": [{"user": "q"}]}, "row 7 (from 0): texts[0].assistant: expected a string, got NoneType"),
    ("cauldron", {"texts": [{"user": "q", "assistant": " "}]}, "row 7 (from 0): texts[0].assistant is an empty answer"),
])
def test_a_bad_row_names_the_row_and_the_field(fmt, row, named):
    with pytest.raises(DataError) as info:
        to_conversation(row, fmt, SPEC, 7)
    assert str(info.value).startswith("d.jsonl: ") and named in str(info.value)
    assert "\n" not in str(info.value)


def test_conversation_round_trips_through_json():
    conv = to_conversation({"question": "q", "answer": "a"}, "columns", SPEC, 0)
    assert Conversation(**json.loads(json.dumps(conv.__dict__))) == conv
