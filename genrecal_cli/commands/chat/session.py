"""The core of `genrecal chat`, with no terminal: one conversation with a VLM, its `/` commands,
its history trimmed to the context window, prompts written with the model's own chat template,
saving. This is what the tests drive."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ...errors import GenrecalError

# Real checkpoints declare windows of 32k-128k positions; a chat on one device rarely wants to
# re-read that much every turn, and tiny models may declare far more than they were built for.
CONTEXT_CAP = 8192

COMMANDS = {
    "/image": ("PATH", "attach an image to your next message (repeat for several)"),
    "/clear": ("", "forget the conversation and any attached images"),
    "/save": ("FILE", "write the conversation as JSON (images by path)"),
    "/help": ("", "show these commands"),
    "/exit": ("", "leave the session (Ctrl-D too)"),
}


class TurnError(GenrecalError):
    """A problem with one line of input (a bad image, a bad command); the session goes on."""


class EndSession(Exception):
    """Raised by `/exit`."""


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    name: str  # with its slash, lower case; may be unknown
    arg: str


def parse_command(line: str) -> Command | None:
    """A Command for a line that starts with '/', None for an ordinary message."""
    text = line.strip()
    if not text.startswith("/"):
        return None
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in "'\"":  # a quoted path with spaces
        arg = arg[1:-1]
    return Command(name.lower(), arg)


def help_text() -> str:
    width = max(len(f"{n} {a}".strip()) for n, (a, _) in COMMANDS.items())
    lines = [f"  {f'{n} {a}'.strip():<{width}}  {h}" for n, (a, h) in COMMANDS.items()]
    return "commands:\n" + "\n".join(lines) + "\n  Ctrl-C stops an answer; any other line is a message."


# --------------------------------------------------------------------------- the session


@dataclass
class Attachment:
    path: str  # absolute, as saved
    image: Any = field(repr=False)  # PIL RGB image


@dataclass
class Message:
    role: str  # "user" or "assistant"
    text: str
    images: list[Attachment] = field(default_factory=list)
    stopped: bool = False  # an answer cut short with Ctrl-C

    def content(self, text: str | None = None, with_paths: bool = False) -> list[dict]:
        """The content-list form chat templates take: images first, then the text."""
        parts = [{"type": "image", **({"path": a.path} if with_paths else {})} for a in self.images]
        return parts + [{"type": "text", "text": self.text if text is None else text}]


@dataclass
class Prepared:
    """One turn ready to generate: the processor's inputs for the kept history plus the message."""

    message: Message
    inputs: Any  # BatchFeature on the model's device
    prompt_tokens: int
    max_new_tokens: int
    dropped: int  # oldest messages of the history left out to fit the context window
    notices: list[str]


def trim(history: list[Message], fits: Callable[[list[Message]], bool]) -> int | None:
    """How many of the oldest messages to drop, whole exchanges (a message and its answer) at a
    time, so that `fits(history[k:])`; None when even the empty history does not fit."""
    for k in range(0, len(history) + 1, 2):
        if fits(history[k:]):
            return k
    return None


def context_window(vlm, cap: int = CONTEXT_CAP) -> int:
    """Tokens a prompt and its answer may take: the text model's position limit (and the
    tokenizer's, where it sets a real one), at most `cap`."""
    limits = [cap, getattr(vlm.text_config, "max_position_embeddings", None) or cap]
    tok_max = getattr(vlm.tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 10**7:  # unset reads as a huge sentinel
        limits.append(tok_max)
    return min(limits)


def chat_template_of(processor) -> str | None:
    return getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None), "chat_template", None)


def template_takes_system(processor) -> bool:
    """Whether the chat template writes a system message (some raise on one, some drop it)."""
    marker = "GENRECAL-SYSTEM-7f3a"
    messages = [
        {"role": "system", "content": [{"type": "text", "text": marker}]},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    try:
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:  # jinja's raise_exception and template errors alike
        return False
    return marker in text


class ChatSession:
    """The conversation with one model: history, attached images, trimming, generation."""

    def __init__(self, vlm, *, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                 context: int | None = None):
        self.vlm = vlm
        self.system = system or None
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.context = context or context_window(vlm)
        self.messages: list[Message] = []  # everything said since the last /clear (what /save writes)
        self.first = 0  # messages[first:] still fit the context window and are sent to the model
        self.pending: list[Attachment] = []
        self.system_in_template = self.system is None or template_takes_system(vlm.processor)

    @property
    def history(self) -> list[Message]:
        return self.messages[self.first :]

    def start_notices(self) -> list[str]:
        if self.system and not self.system_in_template:
            return ["this model's chat template has no system role: the system prompt is put before the first message"]
        return []

    # ----------------------------------------------------------------------- commands

    def command(self, cmd: Command) -> str:
        """Run one `/` command; returns what to tell the user. Raises TurnError, EndSession."""
        if cmd.name == "/image":
            return self.attach(cmd.arg)
        if cmd.name == "/clear":
            self.messages, self.first, self.pending = [], 0, []
            return "conversation cleared"
        if cmd.name == "/save":
            return self.save(cmd.arg)
        if cmd.name == "/help":
            return help_text()
        if cmd.name in ("/exit", "/quit"):
            raise EndSession
        raise TurnError(f"unknown command {cmd.name}\n{help_text()}")

    def attach(self, path: str) -> str:
        from ...data.sources import SkipItem, open_image

        if not path:
            raise TurnError("usage: /image PATH")
        p = Path(path).expanduser()
        if not p.is_file():
            raise TurnError(f"{path}: {'a folder, not an image' if p.is_dir() else 'no such file'}")
        try:
            image = open_image(str(p))
        except SkipItem as exc:
            raise TurnError(f"{path}: {exc}") from None
        self.pending.append(Attachment(str(p.resolve()), image))
        n = len(self.pending)
        return f"attached {p.name} ({image.width}x{image.height}) to your next message" + (f" ({n} images)" if n > 1 else "")

    def save(self, path: str) -> str:
        if not path:
            raise TurnError("usage: /save FILE")
        messages = ([{"role": "system", "content": [{"type": "text", "text": self.system}]}] if self.system else [])
        for m in self.messages:
            messages.append({"role": m.role, "content": m.content(with_paths=True), **({"stopped": True} if m.stopped else {})})
        doc = {"model": self.vlm.path, "family": self.vlm.family, "messages": messages}
        p = Path(path).expanduser()
        try:
            p.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as exc:
            raise TurnError(f"{path}: cannot write the conversation ({exc.strerror or exc})") from None
        return f"saved {len(self.messages)} messages to {p}"

    # ----------------------------------------------------------------------- a turn

    def template_messages(self, messages: list[Message]) -> list[dict]:
        out: list[dict] = []
        if self.system and self.system_in_template:
            out.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
        for i, m in enumerate(messages):
            text = m.text
            if i == 0 and self.system and not self.system_in_template:
                text = f"{self.system}\n\n{text}"
            out.append({"role": m.role, "content": m.content(text)})
        return out

    def encode(self, messages: list[Message]):
        """The processor's inputs (tensors) for `messages`, ending with the assistant's cue."""
        processor = self.vlm.processor
        prompt = processor.apply_chat_template(self.template_messages(messages), add_generation_prompt=True, tokenize=False)
        images = [a.image for m in messages for a in m.images]
        kwargs = {"images": [images]} if images else {}
        return processor(text=[prompt], return_tensors="pt", **kwargs)

    def prepare(self, text: str) -> Prepared:
        """Build the next turn from `text` and the attached images, dropping the oldest exchanges
        when the prompt and a full answer would not fit the context window."""
        message = Message("user", text, list(self.pending))
        history = self.history
        found: dict[int, Any] = {}

        def fits(kept: list[Message]) -> bool:
            inputs = self.encode(kept + [message])
            found[len(kept)] = inputs
            return inputs["input_ids"].shape[1] + self.max_new_tokens <= self.context

        notices = []
        dropped = trim(history, fits)
        if dropped is None:  # even alone it leaves less room than a full answer
            dropped = len(history)
        inputs = found[len(history) - dropped]
        n = int(inputs["input_ids"].shape[1])
        room = min(self.max_new_tokens, self.context - n)
        if room <= 0:
            what = f"{len(message.images)} image(s) and text" if message.images else "text"
            raise TurnError(
                f"this message ({what}) takes {n} tokens, more than the {self.context}-token context; "
                "shorten it or attach fewer images"
            )
        if dropped:
            notices.append(
                f"context: dropped the oldest {dropped} message{'' if dropped == 1 else 's'} to stay within {self.context} tokens"
            )
        if room < self.max_new_tokens:
            notices.append(f"context: this answer is limited to {room} token{'' if room == 1 else 's'}")
        device = next(self.vlm.model.parameters()).device
        return Prepared(message, inputs.to(device), n, room, dropped, notices)

    def generate(self, turn: Prepared, *, streamer=None, stop: threading.Event | None = None) -> list[int]:
        """The new token ids; greedy at temperature 0. `stop` set from another thread ends it early."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        tok = self.vlm.tokenizer
        kwargs: dict[str, Any] = {"max_new_tokens": turn.max_new_tokens, "streamer": streamer}
        kwargs["pad_token_id"] = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop is not None:

            class _Stop(StoppingCriteria):
                def __call__(self, input_ids, scores, **_):
                    return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

            kwargs["stopping_criteria"] = StoppingCriteriaList([_Stop()])
        with torch.inference_mode():
            out = self.vlm.model.generate(**turn.inputs, **kwargs)
        return out[0, turn.inputs["input_ids"].shape[1] :].tolist()

    def record(self, turn: Prepared, ids: list[int], stopped: bool = False) -> str:
        """Add the exchange to the history (dropping what `prepare` trimmed); returns the answer."""
        answer = self.vlm.tokenizer.decode(ids, skip_special_tokens=True).strip()
        self.first += turn.dropped
        self.messages += [turn.message, Message("assistant", answer, stopped=stopped)]
        self.pending = []
        return answer

    def ask(self, text: str) -> str:
        """One whole turn without streaming: prepare, generate, record."""
        turn = self.prepare(text)
        return self.record(turn, self.generate(turn))
