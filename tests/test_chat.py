"""`genrecal chat`: commands, history trimming, system prompts, saving, bad input, and the piped
mode end to end on the tiny student."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from genrecal_cli.commands.chat import load_chat_model
from genrecal_cli.commands.chat.session import (
    COMMANDS,
    ChatSession,
    Command,
    EndSession,
    TurnError,
    context_window,
    help_text,
    parse_command,
    template_takes_system,
    trim,
)
from genrecal_cli.errors import ModelLoadError


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    from genrecal_cli.world.shapes import make_split

    folder = tmp_path_factory.mktemp("chat-images")
    out = {}
    for i, row in enumerate(make_split("validation", 2)):
        out[f"shape{i}"] = folder / f"shape{i}.png"
        row["image"].save(out[f"shape{i}"])
    out["text"] = folder / "notes.txt"
    out["text"].write_text("not an image\n")
    return out


@pytest.fixture
def student(tiny_pair):
    return tiny_pair[1]


def test_parse_command():
    assert parse_command("what is this?") is None
    assert parse_command("  /image  a b.png ") == Command("/image", "a b.png")
    assert parse_command('/save "my chat.json"') == Command("/save", "my chat.json")
    assert parse_command("/EXIT") == Command("/exit", "")
    assert all(name in help_text() for name in COMMANDS)


def test_trim_drops_whole_exchanges_oldest_first():
    history = list(range(6))  # three exchanges
    assert trim(history, lambda kept: True) == 0
    assert trim(history, lambda kept: len(kept) <= 3) == 4
    assert trim(history, lambda kept: len(kept) == 0) == 6
    assert trim(history, lambda kept: False) is None


def test_text_and_image_turns_keep_history(student, images):
    s = ChatSession(student, max_new_tokens=4)
    answer = s.ask("What shape is this?")
    assert isinstance(answer, str)
    assert "attached shape0.png" in s.command(parse_command(f"/image {images['shape0']}"))
    s.attach(str(images["shape1"]))  # several images in one message
    s.ask("Compare them.")
    assert [m.role for m in s.history] == ["user", "assistant"] * 2
    assert [Path(a.path).name for a in s.history[2].images] == ["shape0.png", "shape1.png"]
    assert s.pending == []
    assert s.command(Command("/clear", "")) == "conversation cleared" and s.messages == []


def test_bad_images_and_commands_leave_the_session_as_it_was(student, images, tmp_path):
    s = ChatSession(student, max_new_tokens=2)
    s.attach(str(images["shape0"]))
    with pytest.raises(TurnError, match="missing.png: no such file"):
        s.attach(str(tmp_path / "missing.png"))
    with pytest.raises(TurnError, match="notes.txt: unreadable image"):
        s.attach(str(images["text"]))
    with pytest.raises(TurnError, match="a folder, not an image"):
        s.attach(str(tmp_path))
    with pytest.raises(TurnError, match=r"unknown command /frob\ncommands:"):
        s.command(Command("/frob", ""))
    with pytest.raises(TurnError, match="usage: /save FILE"):
        s.command(Command("/save", ""))
    with pytest.raises(EndSession):
        s.command(Command("/exit", ""))
    assert len(s.pending) == 1


def test_history_is_trimmed_to_the_context_window(student, images):
    s = ChatSession(student, max_new_tokens=4)
    one = s.prepare("hello").prompt_tokens
    s.context = one * 2 + 8  # room for about two exchanges, not three
    for _ in range(3):
        turn = s.prepare("hello")
        s.record(turn, s.generate(turn))
    assert turn.dropped == 2 and "dropped the oldest 2 messages" in turn.notices[0]
    assert len(s.messages) == 6 and len(s.history) == 4
    s.context = one + 2  # the message fits, a whole answer does not
    turn = s.prepare("hello")
    assert turn.max_new_tokens < 4 and turn.dropped == 4
    s.attach(str(images["shape0"]))  # 64 image tokens in this student
    with pytest.raises(TurnError, match="more than the .*-token context"):
        s.prepare("hello")


def test_context_window_is_capped(student):
    assert context_window(student) == 2048  # the tiny student's position limit
    assert context_window(student, cap=100) == 100


def test_system_prompt_with_and_without_a_system_role(student):
    assert template_takes_system(student.processor)  # the Vicuna template writes it first
    s = ChatSession(student, system="Be brief.")
    assert s.start_notices() == []
    prompt = student.processor.apply_chat_template(s.template_messages([]), tokenize=False)
    assert prompt.startswith("Be brief.")

    class NoSystem:
        def apply_chat_template(self, messages, **kwargs):
            if messages[0]["role"] == "system":
                raise ValueError("System role not supported")
            return "ok"

    assert not template_takes_system(NoSystem())
    s.system_in_template = False
    s.ask("What is it?")
    user = s.template_messages(s.history)[0]
    assert user["role"] == "user" and user["content"][-1]["text"] == "Be brief.\n\nWhat is it?"


def test_save_writes_json_that_the_chat_template_reads_back(student, images, tmp_path):
    s = ChatSession(student, system="Be brief.", max_new_tokens=3)
    s.attach(str(images["shape0"]))
    answer = s.ask("What colour is the triangle?")
    assert s.save(str(tmp_path / "chat.json")).startswith("saved 2 messages")
    doc = json.loads((tmp_path / "chat.json").read_text())
    assert doc["family"] == "llava" and [m["role"] for m in doc["messages"]] == ["system", "user", "assistant"]
    image_part, text_part = doc["messages"][1]["content"]
    assert Path(image_part["path"]) == images["shape0"].resolve() and text_part["text"] == "What colour is the triangle?"
    assert doc["messages"][2]["content"][0]["text"] == answer
    rendered = student.processor.apply_chat_template(doc["messages"], tokenize=False)
    assert "<image>" in rendered and "What colour is the triangle?" in rendered
    with pytest.raises(TurnError, match="cannot write the conversation"):
        s.save(str(tmp_path / "no" / "such" / "dir.json"))


def test_folder_without_a_chat_template_is_refused(student, tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(student.path, folder)
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(ModelLoadError, match="no chat template"):
        load_chat_model(str(folder), "cpu")


def test_piped_session_end_to_end(cli, student, images, tmp_path):
    saved = tmp_path / "chat.json"
    lines = [
        "hello",
        f"/image {images['shape0']}",
        "What colour is the triangle?",
        f"/image {tmp_path / 'missing.png'}",
        f"/image {images['text']}",
        "/frob",
        "How many shapes?",
        f"/save {saved}",
        "/exit",
        "never read",
    ]
    out = cli("chat", "zoo:tiny-student", "--max-new-tokens", "3", input="\n".join(lines) + "\n")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 3  # one answer a line, nothing else on stdout
    err = out.stderr
    assert "attached shape0.png" in err and "missing.png: no such file" in err and "notes.txt: unreadable image" in err
    assert "unknown command /frob" in err and "/save FILE" in err and "saved 6 messages" in err
    doc = json.loads(saved.read_text())
    assert [m["content"][-1]["text"] for m in doc["messages"][::2]] == ["hello", "What colour is the triangle?", "How many shapes?"]
    assert doc["messages"][2]["content"][0] == {"type": "image", "path": str(images["shape0"].resolve())}


def test_cli_refuses_a_model_without_a_chat_template(cli, student, tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(student.path, folder)
    (folder / "chat_template.jinja").unlink()
    out = cli("chat", str(folder), input="hello\n")
    assert out.returncode == 1
    assert "no chat template" in out.stderr and "Traceback" not in out.stderr
    out = cli("chat", str(folder), "--image", str(tmp_path / "missing.png"))
    assert out.returncode == 1 and "--image" in out.stderr and "no such file" in out.stderr
