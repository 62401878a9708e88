"""One item tokenized twice: each side (teacher, student) renders the same image-question-answer
with its own processor and chat template, with an answer mask; plus sources and collation.

Nothing is matched token by token across sides: GenRecal needs only each side's own sequence
and where its answer starts. Truncation never cuts the question (it holds the image tokens):
only the answer's tail may be cut, and an item with no answer token left is skipped and counted.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import DataError, first_line
from .recipe import DataSpec, looks_like_hub_id

IGNORE_INDEX = -100
_PER_TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")


class SkipItem(Exception):
    """An item that cannot be used; the reason is counted and reported once."""


# ---------------------------------------------------------------------------------------------
# sources


def load_split(spec: DataSpec, split: str):
    """One split of an external data source (a file, a `datasets` folder or a hub id) as a
    `datasets.Dataset`, columns checked. The built-in shapes data is made at the edge (run.py)."""
    if spec.source == "shapes":
        raise DataError("data.source 'shapes' is the built-in data set: load it with genrecal_cli.run.load_rows")
    return check_split(_load_external(spec.source, split), spec, split)


def check_split(ds, spec: DataSpec, split: str):
    """`ds` with the recipe's columns checked, cut to data.num_train for the training split."""
    missing = [c for c in (spec.image_column, spec.question_column, spec.answer_column) if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{spec.source}: column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} not found "
            f"(split '{split}' has {', '.join(ds.column_names)}); set data.image_column / question_column / answer_column"
        )
    if spec.num_train is not None and split == spec.train_split:
        ds = ds.select(range(min(spec.num_train, len(ds))))
    if len(ds) == 0:
        raise DataError(f"{spec.source}: split '{split}' is empty")
    return ds


def _load_external(source: str, split: str):
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_file():
            kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix.lower())
            if kind is None:
                raise DataError(f"{source}: unsupported file type '{path.suffix}' (use .jsonl, .json, .parquet or .csv)")
            if path.stat().st_size == 0:
                raise DataError(f"{source}: the file is empty")
            ds = datasets.load_dataset(kind, data_files={split: str(path)}, split=split)
            return ds
        if path.is_dir():
            if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
                loaded = datasets.load_from_disk(str(path))
                ds = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
            else:
                ds = datasets.load_dataset(str(path), split=split)
            return ds
        if looks_like_hub_id(source):
            return datasets.load_dataset(source, split=split)
    except DataError:
        raise
    except (KeyError, ValueError) as exc:
        if "split" in str(exc).lower() or isinstance(exc, KeyError):
            raise DataError(f"{source}: no split '{split}' ({exc})") from None
        raise DataError(f"{source}: cannot read the data ({exc})") from None
    except (ConnectionError, OSError) as exc:
        if looks_like_hub_id(source):
            raise DataError(
                f"{source}: cannot reach the hub for this data set (offline?); download it elsewhere and "
                "set data.source to the local folder or file"
            ) from None
        raise DataError(f"{source}: cannot read the data ({exc})") from None
    except Exception as exc:  # datasets raises many types for malformed files
        raise DataError(f"{source}: cannot read the data ({type(exc).__name__}: {first_line(exc)})") from None
    raise DataError(f"{source}: path not found")


def image_root(source: str) -> str | None:
    """The folder that relative image paths in a local data source refer to."""
    path = Path(source).expanduser()
    if path.is_file():
        return str(path.parent)
    return str(path) if path.is_dir() else None


def open_image(value: Any, root: str | None = None):
    """A PIL RGB image from a datasets Image value, raw bytes, a {bytes, path} dict or a path."""
    from PIL import Image

    if value is None:
        return None
    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, dict):
            if value.get("bytes"):
                img = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                img = Image.open(_rooted(value["path"], root))
            else:
                return None
        elif isinstance(value, (bytes, bytearray)):
            img = Image.open(io.BytesIO(value))
        elif isinstance(value, str):
            img = Image.open(_rooted(value, root))
        else:
            raise SkipItem(f"unsupported image value of type {type(value).__name__}")
        img.load()
    except SkipItem:
        raise
    except Exception as exc:  # PIL raises many types for broken files
        raise SkipItem(f"unreadable image ({type(exc).__name__})") from None
    return img.convert("RGB")


def _rooted(path: str, root: str | None) -> str:
    p = Path(path)
    return str(p if p.is_absolute() or root is None else Path(root) / p)


def answer_text(value: Any) -> str:
    """The answer as text; a list of reference answers (e.g. ChartQA) contributes its first one."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return str(value).strip()


# ---------------------------------------------------------------------------------------------
# one item, one side


@dataclass
class Encoded:
    """One item as one model sees it: prompt (with expanded image tokens) then answer tokens."""

    input_ids: list[int]
    answer_start: int  # index of the first answer token in input_ids
    answer_text: str  # the rendered answer, template end-of-turn markup included
    answer_offsets: list[tuple[int, int]]  # char span of each answer token within answer_text
    answer_span: tuple[int, int] = (0, 0)  # where the plain answer lies within answer_text
    image_inputs: dict[str, Any] = field(default_factory=dict)  # pixel_values and friends
    token_inputs: dict[str, list[int]] = field(default_factory=dict)  # per-token extras, e.g. mm_token_type_ids

    @property
    def num_answer_tokens(self) -> int:
        return len(self.input_ids) - self.answer_start


def conversation(question: str, answer: str | None, with_image: bool) -> list[dict]:
    """Messages in the content-list form that VLM chat templates expect."""
    user: list[dict] = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def render(processor, question: str, answer: str, with_image: bool) -> tuple[str, str]:
    """(prompt, answer_suffix) as the chat template writes them; prompt + suffix is the whole turn."""
    prompt = processor.apply_chat_template(conversation(question, None, with_image), add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(conversation(question, answer, with_image), tokenize=False)
    if not full.startswith(prompt):
        raise DataError(
            "the chat template does not render the prompt as a prefix of the full conversation, so the "
            f"answer cannot be located (prompt ends {prompt[-40:]!r}, conversation has {full[len(prompt)-40:len(prompt)+20]!r})"
        )
    suffix = full[len(prompt) :]
    if answer not in suffix:
        raise DataError(f"the chat template dropped the answer text from the conversation ({suffix[:60]!r})")
    return prompt, suffix


def encode(processor, image, question: str, answer: str, max_length: int) -> Encoded:
    """Tokenize one item for one side; raises SkipItem when it cannot fit in `max_length`."""
    tokenizer = getattr(processor, "tokenizer", processor)
    prompt, suffix = render(processor, question, answer, image is not None)
    if image is not None:
        out = processor(text=[prompt], images=[[image]], return_tensors="pt")
    else:
        out = processor(text=[prompt], return_tensors="pt")
    prompt_ids = out["input_ids"][0].tolist()
    ans = tokenizer(suffix, add_special_tokens=False, return_offsets_mapping=True)
    answer_ids = list(ans["input_ids"])
    offsets = [tuple(o) for o in ans["offset_mapping"]]
    room = max_length - len(prompt_ids)
    if room <= 0:
        raise SkipItem(f"question (with image tokens) longer than max_length {max_length}")
    if len(answer_ids) == 0:
        raise SkipItem("empty answer")
    answer_ids, offsets = answer_ids[:room], offsets[:room]  # only the answer's tail may be cut
    # Per-token extras (Qwen2-VL's mm_token_type_ids marks image tokens for M-RoPE) continue
    # over the answer as plain text (0); everything else the processor returns is image data.
    token_inputs, image_inputs = {}, {}
    for key, value in out.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if key in _PER_TOKEN_KEYS:
            token_inputs[key] = value[0].tolist() + [0] * len(answer_ids)
        else:
            image_inputs[key] = value
    at = suffix.index(answer)
    return Encoded(prompt_ids + answer_ids, len(prompt_ids), suffix, offsets, (at, at + len(answer)), image_inputs, token_inputs)


# ---------------------------------------------------------------------------------------------
# a data set of items seen by several sides


class PairDataset:
    """Rows of a data set, each encoded for every side (e.g. {"teacher": proc, "student": proc}).

    `scan()` encodes every row once to find the ones that must be skipped (unreadable image,
    too long), counts them by reason and keeps the rest; indexing then returns a dict side -> Encoded.
    """

    def __init__(self, rows, spec: DataSpec, processors: Mapping[str, Any]):
        self.rows = rows
        self.spec = spec
        self.processors = dict(processors)
        self.image_root = image_root(spec.source) if spec.source != "shapes" else None
        self.keep: list[int] = list(range(len(rows)))
        self.skipped: Counter[str] = Counter()

    def scan(self, progress=None) -> "PairDataset":
        keep, skipped = [], Counter()
        for i in range(len(self.rows)):
            try:
                self._encode_row(i)
                keep.append(i)
            except SkipItem as exc:
                skipped[str(exc)] += 1
            if progress is not None:
                progress(1)
        if not keep:
            raise DataError(
                f"{self.spec.source}: every item was skipped ({_reasons(skipped)}); check data.max_length and the images"
            )
        self.keep, self.skipped = keep, skipped
        return self

    def skip_summary(self) -> str | None:
        """One line on what `scan` skipped and why (None when nothing was skipped)."""
        if not self.skipped:
            return None
        return f"skipped {sum(self.skipped.values())} of {len(self.rows)} items: {_reasons(self.skipped)}"

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, idx: int) -> dict[str, Encoded]:
        return self._encode_row(self.keep[idx])

    def _encode_row(self, i: int) -> dict[str, Encoded]:
        row = self.rows[i]
        image = open_image(row[self.spec.image_column], self.image_root)
        question = str(row[self.spec.question_column])
        answer = answer_text(row[self.spec.answer_column])
        if not answer:
            raise SkipItem("empty answer")
        return {
            side: encode(proc, image, question, answer, self.spec.max_length) for side, proc in self.processors.items()
        }


def _reasons(counter: Counter) -> str:
    return "; ".join(f"{n} {reason}" for reason, n in counter.most_common())


# ---------------------------------------------------------------------------------------------
# collation


def collate_side(items: Sequence[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-padded batch for one side: input_ids, attention_mask, labels (answer only), answer_mask,
    answer_start, per-token extras, image tensors concatenated along dim 0, and the answer
    texts/offsets for alignment statistics. `model_inputs(batch)` picks what the model takes."""
    import torch

    width = max(len(e.input_ids) for e in items)
    n = len(items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for r, e in enumerate(items):
        ids = torch.tensor(e.input_ids, dtype=torch.long)
        input_ids[r, : len(ids)] = ids
        attention[r, : len(ids)] = 1
        labels[r, e.answer_start : len(ids)] = ids[e.answer_start :]
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "answer_start": torch.tensor([e.answer_start for e in items], dtype=torch.long),
        "answer_mask": labels != IGNORE_INDEX,
        "answer_text": [e.answer_text for e in items],
        "answer_offsets": [e.answer_offsets for e in items],
        "answer_span": [e.answer_span for e in items],
    }
    for key in sorted({k for e in items for k in e.token_inputs}):
        extra = torch.zeros((n, width), dtype=torch.long)
        for r, e in enumerate(items):
            values = e.token_inputs.get(key, [])
            extra[r, : len(values)] = torch.tensor(values, dtype=torch.long)
        batch[key] = extra
    for key in sorted({k for e in items for k in e.image_inputs}):
        parts = [e.image_inputs[key] for e in items if key in e.image_inputs]
        batch[key] = _cat0(parts)
    return batch


def _cat0(parts: list):
    import torch

    if not isinstance(parts[0], torch.Tensor):
        return [p for part in parts for p in part]
    if parts[0].dim() >= 2 and len({p.shape[1:] for p in parts}) > 1:  # e.g. Idefics3 [1, n_images, ...]
        sizes = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
        padded = []
        for p in parts:
            pad = []
            for d in reversed(range(1, p.dim())):
                pad += [0, sizes[d - 1] - p.shape[d]]
            padded.append(torch.nn.functional.pad(p, pad))
        parts = padded
    return torch.cat(parts, dim=0)


class Collator:
    """Collate a list of {side: Encoded} into {side: batch dict}; pad ids come from each tokenizer."""

    def __init__(self, processors: Mapping[str, Any]):
        self.pad_ids = {}
        for side, proc in processors.items():
            tok = getattr(proc, "tokenizer", proc)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            self.pad_ids[side] = 0 if pad is None else pad

    def __call__(self, items: Sequence[Mapping[str, Encoded]]) -> dict[str, dict[str, Any]]:
        return {side: collate_side([it[side] for it in items], pad) for side, pad in self.pad_ids.items()}


_NOT_MODEL_INPUTS = ("labels", "answer_mask", "answer_start", "answer_text", "answer_offsets", "answer_span")


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a collated side that the model's forward takes."""
    return {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}
