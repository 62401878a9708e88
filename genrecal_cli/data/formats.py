"""What a row of training data says, whatever its layout (FORMATS): every row becomes one
`Conversation`, messages with typed parts plus the images they refer to, or a one-line error
naming the row (counted from 0: a .jsonl file's row 1 is its second line) and the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import DataError

# The layouts, detected from the columns (data.format = "auto") or named in the recipe:
# - "columns": an image column (optional; empty or absent means text-only), a question and an
#   answer column: one user turn and one assistant turn;
# - "messages": the chat format of transformers and TRL, role + content (a string or parts
#   {"type": "image"} / {"type": "text", "text": ...}) with the images in an `images` column (a
#   list, k-th image part = k-th entry) or inline in the part ("image", "path" or "url");
# - "conversations": LLaVA-style {"from": "human" | "gpt" | "system", "value": ...} with `<image>`
#   placeholders, the image path (or list of paths) in the image column;
# - "cauldron": The Cauldron's layout (HuggingFaceM4/the_cauldron, and sets built like it): a
#   `texts` column of turns {"user": ..., "assistant": ...} and the row's images in an `images`
#   column, all of them shown with the first question.
FORMATS = ("columns", "messages", "conversations", "cauldron")
ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Conversation:
    """One item: messages [{"role", "content": [parts]}] (content always a list of parts, at
    least one assistant message, none after the last one) and `images`, the raw image values
    (path, bytes, PIL image or {bytes, path}) of the image parts in reading order."""

    messages: list[dict]
    images: list[Any] = field(default_factory=list)

    @property
    def turns(self) -> int:
        """Assistant messages: each one is an answer."""
        return sum(m["role"] == "assistant" for m in self.messages)

    def prompt_and_reference(self) -> tuple["Conversation", str]:
        """Everything before the last answer (every image is there: answers hold none), and that
        answer's text (for accuracy checks)."""
        return Conversation(self.messages[:-1], self.images), text_of(self.messages[-1])


def text_of(message: Mapping) -> str:
    """The text parts of a message, joined."""
    return "".join(p["text"] for p in message["content"] if p["type"] == "text")


def answers_of(conv: Conversation) -> list[str]:
    """The text of every assistant turn, in order."""
    return [text_of(m) for m in conv.messages if m["role"] == "assistant"]


# ---------------------------------------------------------------------------------------------
# which layout


def detect(columns: Sequence[str], spec) -> str:
    """The layout of a split with these columns: spec.format, or the one its columns show.

    Raises DataError naming the columns looked for when none fits."""
    columns = list(columns)
    needs = {
        "messages": [spec.messages_column],
        "conversations": [spec.conversations_column],
        "cauldron": [spec.texts_column],
        "columns": [spec.question_column, spec.answer_column],
    }
    if spec.format != "auto":
        missing = [c for c in needs[spec.format] if c not in columns]
        if missing:
            raise DataError(
                f"{spec.source}: data.format is {spec.format!r} but column{'s' if len(missing) > 1 else ''} "
                f"{', '.join(map(repr, missing))} {'are' if len(missing) > 1 else 'is'} missing (the data has "
                f"{', '.join(columns)})")
        return spec.format
    for fmt in ("messages", "conversations", "cauldron", "columns"):
        if all(c in columns for c in needs[fmt]):
            return fmt
    raise DataError(
        f"{spec.source}: cannot tell the data's layout from its columns ({', '.join(columns)}): expected "
        f"'{spec.messages_column}' (chat messages), '{spec.conversations_column}' (LLaVA-style), "
        f"'{spec.texts_column}' (The Cauldron) or '{spec.question_column}' + '{spec.answer_column}'; where the data "
        "has one of these under another name, set that data.*_column key (e.g. data.messages_column)")


# ---------------------------------------------------------------------------------------------
# one row -> one Conversation


def to_conversation(row: Mapping, fmt: str, spec, index: int) -> Conversation:
    """Row `index` of the split as a Conversation; DataError names the row and the field."""
    where = f"{spec.source}: row {index} (from 0)"
    if fmt == "columns":
        return _from_columns(row, spec, where)
    if fmt == "messages":
        return _from_messages(row, spec, where)
    if fmt == "conversations":
        return _from_llava(row, spec, where)
    if fmt == "cauldron":
        return _from_cauldron(row, spec, where)
    raise ValueError(f"unknown data format {fmt!r}")  # pragma: no cover - detect() returns one of FORMATS


def answer_text(value: Any) -> str:
    """An answer cell as text; a list of reference answers (e.g. ChartQA) contributes its first."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return "" if value is None else str(value).strip()


def _from_columns(row: Mapping, spec, where: str) -> Conversation:
    question = row.get(spec.question_column)
    if question is None or not str(question).strip():
        raise DataError(f"{where}: field '{spec.question_column}' is empty")
    answer = answer_text(row.get(spec.answer_column))
    if not answer:
        raise DataError(f"{where}: field '{spec.answer_column}' is empty")
    image = row.get(spec.image_column)
    images = [] if _absent(image) else [image]
    user = [{"type": "image"}] * len(images) + [{"type": "text", "text": str(question)}]
    return Conversation([{"role": "user", "content": user},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}], images)


def _from_messages(row: Mapping, spec, where: str) -> Conversation:
    raw = row.get(spec.messages_column)
    col = spec.messages_column
    if not isinstance(raw, (list, tuple)) or not raw:
        raise DataError(f"{where}: field '{col}' must be a non-empty list of messages, got {_kind(raw)}")
    listed = row.get(spec.images_column)
    listed = _values(listed)
    messages, images, used = [], [], 0
    for m, msg in enumerate(raw):
        at = f"{where}: {col}[{m}]"
        if not isinstance(msg, Mapping):
            raise DataError(f"{at}: a message must be a table with 'role' and 'content', got {_kind(msg)}")
        role = msg.get("role")
        if role not in ROLES:
            raise DataError(f"{at}.role: {role!r} is not one of {', '.join(ROLES)}")
        content = _scalar_text(msg.get("content"))
        parts: list[dict] = []
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, (list, tuple)):
            for p, part in enumerate(content):
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind == "text":
                    text = _scalar_text(part.get("text"))
                    if not isinstance(text, str):
                        raise DataError(f"{at}.content[{p}].text: expected a string, got {_kind(text)}")
                    parts.append({"type": "text", "text": text})
                elif kind == "image":
                    inline = next((part[k] for k in ("image", "path", "url") if not _absent(part.get(k))), None)
                    if inline is not None:
                        images.append(inline)
                    elif used < len(listed):
                        images.append(listed[used])
                        used += 1
                    else:
                        raise DataError(f"{at}.content[{p}]: image part {len(images) + 1} has no image "
                                        f"('{spec.images_column}' lists {len(listed)})")
                    parts.append({"type": "image"})
                else:
                    raise DataError(f"{at}.content[{p}]: expected {{'type': 'text' | 'image', ...}}, got {_kind(part)}")
        else:
            raise DataError(f"{at}.content: expected a string or a list of parts, got {_kind(content)}")
        if role == "assistant" and any(p["type"] == "image" for p in parts):
            raise DataError(f"{at}: an assistant message holds an image; answers must be text")
        messages.append({"role": role, "content": parts})
    if used < len(listed):
        raise DataError(f"{where}: '{spec.images_column}' lists {len(listed)} images but the messages have "
                        f"{used} image parts for them")
    return _finish(messages, images, where, col)


def _from_llava(row: Mapping, spec, where: str) -> Conversation:
    col = spec.conversations_column
    raw = _turns(row, col, where)
    paths = _values(row.get(spec.image_column))
    messages, used = [], 0
    for t, turn in enumerate(raw):
        at = f"{where}: {col}[{t}]"
        if not isinstance(turn, Mapping):
            raise DataError(f"{at}: a turn must be a table with 'from' and 'value', got {_kind(turn)}")
        role = LLAVA_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise DataError(f"{at}.from: {turn.get('from')!r} is not one of human, gpt, system")
        text = turn.get("value")
        if not isinstance(text, str):
            raise DataError(f"{at}.value: expected a string, got {_kind(text)}")
        pieces = text.split(IMAGE_PLACEHOLDER)
        if role == "assistant" and len(pieces) > 1:
            raise DataError(f"{at}.value: a gpt turn holds {IMAGE_PLACEHOLDER}; answers must be text")
        parts: list[dict] = []
        for k, piece in enumerate(pieces):
            if k:
                parts.append({"type": "image"})
                used += 1
            piece = piece.strip() if len(pieces) > 1 else piece
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": parts})
    if used != len(paths):
        raise DataError(f"{where}: {used} {IMAGE_PLACEHOLDER} placeholder(s) in '{col}' but {len(paths)} "
                        f"image(s) in '{spec.image_column}'")
    return _finish(messages, paths, where, col)


def _from_cauldron(row: Mapping, spec, where: str) -> Conversation:
    col = spec.texts_column
    raw = _turns(row, col, where)
    images = _values(row.get(spec.images_column))
    messages: list[dict] = []
    for t, turn in enumerate(raw):
        at = f"{where}: {col}[{t}]"
        if not isinstance(turn, Mapping):
            raise DataError(f"{at}: a turn must be a table with 'user' and 'assistant', got {_kind(turn)}")
        for role in ("user", "assistant"):
            text = _scalar_text(turn.get(role))
            if not isinstance(text, str):
                raise DataError(f"{at}.{role}: expected a string, got {_kind(text)}")
            if role == "assistant" and not text.strip():
                raise DataError(f"{at}.assistant is an empty answer")
            parts = [{"type": "image"}] * len(images) if role == "user" and t == 0 else []
            messages.append({"role": role, "content": [*parts, {"type": "text", "text": text}]})
    return _finish(messages, images, where, col)


def _finish(messages: list[dict], images: list, where: str, col: str) -> Conversation:
    """Drop messages after the last answer (nothing to learn from them); refuse a row without one
    or with an empty answer."""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:
        raise DataError(f"{where}: field '{col}' has no assistant turn (nothing to learn)")
    for i in answers:
        if not text_of(messages[i]).strip():
            raise DataError(f"{where}: {col}[{i}] is an empty answer")
    if answers[0] == 0:
        raise DataError(f"{where}: {col}[0] is an answer with no question before it")
    kept = messages[: answers[-1] + 1]
    n_images = sum(p["type"] == "image" for m in kept for p in m["content"])
    return Conversation(kept, images[:n_images])


def _scalar_text(value: Any) -> Any:
    """A number where text was written: `datasets` reads a column whose cells are strings in some
    rows and lists in others as JSON, and gives back the string "2" as the number 2."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _turns(row: Mapping, col: str, where: str) -> list:
    """The row's list of turns in `col` (LLaVA's conversations, The Cauldron's texts)."""
    raw = row.get(col)
    if not isinstance(raw, (list, tuple)) or not raw:
        raise DataError(f"{where}: field '{col}' must be a non-empty list of turns, got {_kind(raw)}")
    return list(raw)


def _values(value: Any) -> list:
    """A column that holds one value or a list of them (images), as a list; [] when absent."""
    return [] if _absent(value) else (list(value) if isinstance(value, (list, tuple)) else [value])


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, (list, tuple, str)) and len(value) == 0)


def _kind(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
