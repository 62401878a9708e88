"""One conversation tokenized by one side (teacher or student) with its own chat template, every
token marked with its segment: 2k for the system/user text (with images) before answer k, 2k+1
for answer k (every assistant turn is an answer). Both sides render the same conversation, so
both have the same segments in the same order; nothing is matched token by token across sides.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import DataError
from .formats import Conversation, text_of
from .sources import SkipItem

PER_TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")  # per-token extras, e.g. Qwen2-VL's image-token marks


@dataclass
class Answer:
    """One assistant turn as one side renders it: `text` with the template's end-of-turn markup,
    the character span of each of its tokens, and where the plain answer lies within `text`."""

    text: str
    offsets: list[tuple[int, int]]
    span: tuple[int, int]


def is_answer(segment):
    """Where a token belongs to an answer (segment 2k+1), for a tensor of segments or one segment;
    the one place that reads the segment convention."""
    return (segment >= 0) & (segment % 2 == 1)


def is_question(segment):
    """Where a token is system/user text or an image before an answer (segment 2k); padding (-1)
    is neither."""
    return (segment >= 0) & (segment % 2 == 0)


@dataclass
class Encoded:
    """One item as one side sees it. segment[t] = 2k for question tokens before answer k, 2k+1
    for the tokens of answer k; image tensors of all its images, merged as one processor call
    would return them for one sample."""

    input_ids: list[int]
    segment: list[int]
    answers: list[Answer]
    image_inputs: dict[str, Any] = field(default_factory=dict)
    token_inputs: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_answer_tokens(self) -> int:
        return sum(bool(is_answer(s)) for s in self.segment)


@dataclass
class _Piece:
    ids: list[int]
    images: dict[str, Any] | None = None
    extras: dict[str, list[int]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# the template's segments


def segment_texts(processor, conv: Conversation) -> list[str]:
    """The conversation as the chat template writes it, cut into 2T texts: question 1, answer 1,
    question 2, answer 2, ... (answer k includes the template's end-of-turn markup).

    Found by rendering each prefix: question k = render(messages before answer k, with the
    generation prompt) minus what came before; answer k = render(through answer k) minus that.
    A template that does not render each prefix as the start of the next cannot be cut: error."""
    answers = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant"]
    texts, done = [], ""
    for i in answers:
        prompt = _template(processor, conv.messages[:i], generation_prompt=True)
        full = _template(processor, conv.messages[: i + 1], generation_prompt=False)
        for before, after, what in ((done, prompt, f"the prompt of turn {len(texts) // 2 + 1}"),
                                    (prompt, full, f"answer {len(texts) // 2 + 1}")):
            if not after.startswith(before):
                raise DataError(
                    f"the chat template does not render {what} as a continuation of the text before it, so the "
                    f"answers cannot be located (it ends {before[-40:]!r}, the longer render has "
                    f"{after[max(0, len(before) - 40):len(before) + 20]!r})")
        texts += [prompt[len(done):], full[len(prompt):]]
        done = full
    return texts


def _template(processor, messages: list[dict], generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


# ---------------------------------------------------------------------------------------------
# one side


def encode(processor, conv: Conversation, images: list, max_length: int | None = None) -> Encoded:
    """Tokenize every turn of `conv` for one side (images: the opened images of conv.images);
    with `max_length`, trailing turns that do not fit are dropped (SkipItem when the first does
    not), as `encode_pair` does for several sides at once."""
    sides, _ = encode_pair({"side": processor}, conv, images, sys.maxsize if max_length is None else max_length)
    return sides["side"]


def encode_pair(processors: Mapping[str, Any], conv: Conversation, images: list, max_length: int) -> tuple[dict[str, Encoded], int]:
    """Every side's Encoded, all with the same turns (as many as fit in `max_length` on every
    side), and the number of trailing turns dropped. SkipItem when not even the first fits."""
    rendered = {side: _pieces(proc, conv, images) for side, proc in processors.items()}
    # Truncation at data.max_length drops whole trailing turns, the same number on every side: it
    # never cuts inside a turn (so never inside image tokens). The loader counts drops and skips.
    fits = {side: turns_that_fit(pieces, max_length) for side, (pieces, _) in rendered.items()}
    turns = min(fits.values())
    if turns == 0:
        several = any(":" in side for side in fits)  # several teachers (side "teacher:NAME"): say whose
        short = ", ".join(side for side, n in fits.items() if n == 0)
        raise SkipItem(f"first turn longer than max_length {max_length}" + (f" ({short})" if several else ""))
    out = {side: assemble(pieces, answers, turns, _batched_images(pieces)) for side, (pieces, answers) in rendered.items()}
    return out, conv.turns - turns


@dataclass
class Lengths:
    """One side's token counts of one conversation before max_length: each turn's (question and
    answer) and how many of all its tokens are image tokens."""

    turns: list[int]
    image: int

    @property
    def total(self) -> int:
        return sum(self.turns)

    def fit(self, max_length: int) -> int:
        """How many leading turns fit in max_length tokens."""
        return _leading_fit(self.turns, max_length)


def measure(processor, conv: Conversation, images: list, image_token_id: int) -> Lengths:
    """`conv` rendered as `encode` renders it, counted: tokens per turn, and image tokens (those
    with `image_token_id`)."""
    pieces, _ = _pieces(processor, conv, images)
    return Lengths(_turn_lengths(pieces), sum(i == image_token_id for p in pieces for i in p.ids))


def turns_that_fit(pieces: list[_Piece], max_length: int) -> int:
    """How many leading turns (question + answer pairs) fit in max_length tokens."""
    return _leading_fit(_turn_lengths(pieces), max_length)


def _turn_lengths(pieces: list[_Piece]) -> list[int]:
    """Each turn's tokens (its question piece and its answer piece)."""
    return [len(pieces[k].ids) + len(pieces[k + 1].ids) for k in range(0, len(pieces), 2)]


def _leading_fit(turns: list[int], max_length: int) -> int:
    """How many of the leading turns of these lengths fit in max_length tokens together."""
    total, fit = 0, 0
    for n in turns:
        total += n
        if total > max_length:
            break
        fit += 1
    return fit


def _pieces(processor, conv: Conversation, images: list) -> tuple[list[_Piece], list[Answer]]:
    tok = getattr(processor, "tokenizer", processor)
    texts = segment_texts(processor, conv)
    # Which images each question segment shows, in reading order.
    per_segment, seen = [], 0
    bounds = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant"]
    start = 0
    for end in bounds:
        n = sum(p["type"] == "image" for m in conv.messages[start:end] for p in m["content"])
        per_segment.append(images[seen : seen + n])
        seen, start = seen + n, end + 1
    pieces, answers = [], []
    for k, end in enumerate(bounds):
        question, answer = texts[2 * k], texts[2 * k + 1]
        first = k == 0  # only the conversation's start gets the tokenizer's special tokens (BOS)
        shown = per_segment[k]
        if shown:
            out = processor(text=[question], images=[shown], add_special_tokens=first, return_tensors="pt")
            extras = {key: out[key][0].tolist() for key in PER_TOKEN_KEYS if key in out}
            image_inputs = {key: v for key, v in out.items()
                            if key not in ("input_ids", "attention_mask") and key not in PER_TOKEN_KEYS}
            pieces.append(_Piece(out["input_ids"][0].tolist(), image_inputs, extras))
        else:
            pieces.append(_Piece(list(tok(question, add_special_tokens=first)["input_ids"])))
        enc = tok(answer, add_special_tokens=False, return_offsets_mapping=True)
        if not enc["input_ids"]:
            raise SkipItem("empty answer")
        pieces.append(_Piece(list(enc["input_ids"])))
        plain = text_of(conv.messages[end]).strip()
        at = answer.find(plain)
        if at < 0:
            raise DataError(f"the chat template dropped the answer text from the conversation ({answer[:60]!r})")
        answers.append(Answer(answer, [tuple(o) for o in enc["offset_mapping"]], (at, at + len(plain))))
    return pieces, answers


def assemble(pieces: list[_Piece], answers: list[Answer], turns: int, batched: bool) -> Encoded:
    """The first `turns` turns of a side's pieces as one Encoded."""
    kept = pieces[: 2 * turns]
    ids, segment = [], []
    for s, piece in enumerate(kept):
        ids += piece.ids
        segment += [s] * len(piece.ids)
    keys = sorted({key for piece in kept for key in piece.extras})
    token_inputs = {key: [v for piece in kept for v in piece.extras.get(key, [0] * len(piece.ids))] for key in keys}
    image_inputs: dict[str, Any] = {}
    for key in sorted({key for piece in kept if piece.images for key in piece.images}):
        parts = [piece.images[key] for piece in kept if piece.images and key in piece.images]
        image_inputs[key] = _join(parts, dim=1 if batched else 0)
    return Encoded(ids, segment, answers[:turns], image_inputs, token_inputs)


def _batched_images(pieces: list[_Piece]) -> bool:
    """Whether the processor returns images per sample ([samples, images, C, H, W], as Idefics3
    does) rather than one flat list of images or patches; then an item's images join along dim 1."""
    return any(p.images and getattr(p.images.get("pixel_values"), "dim", lambda: 0)() == 5 for p in pieces)


def _join(parts: list, dim: int):
    import torch

    if len(parts) == 1:
        return parts[0]
    if not isinstance(parts[0], torch.Tensor):
        return [x for part in parts for x in part]
    if dim == 1:  # pad the per-image dims to the widest (Idefics3 tiles differ per image)
        parts = pad_to_common(parts, first_dim=2)
    return torch.cat(parts, dim=dim)


def pad_to_common(parts: list, first_dim: int = 1) -> list:
    """Zero-pad tensors to the largest size in every dim from `first_dim` on."""
    import torch

    if parts[0].dim() <= first_dim or len({p.shape[first_dim:] for p in parts}) == 1:
        return parts
    sizes = [max(p.shape[d] for p in parts) for d in range(first_dim, parts[0].dim())]
    out = []
    for p in parts:
        pad = []
        for d in reversed(range(first_dim, p.dim())):
            pad += [0, sizes[d - first_dim] - p.shape[d]]
        out.append(torch.nn.functional.pad(p, pad))
    return out
