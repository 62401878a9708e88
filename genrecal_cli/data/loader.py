"""Batches for the training loop: rows encoded in DataLoader workers, unusable items skipped where
they are met (counted in `DataReport`), sides collated into padded tensors, this process's
micro-batches followed from a saved state (`Batches`; data/stream.py for a stream)."""

from __future__ import annotations

import itertools
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from ..errors import DataError, GenrecalError
from ..recipe import DataSpec
from .formats import detect, to_conversation
from .render import Encoded, Lengths, encode_pair, is_answer, measure, pad_to_common
from .sources import SkipItem, columns_of, image_root, open_image

IGNORE_INDEX = -100


@dataclass
class Item:
    """One usable row, encoded for every side; `dropped` trailing turns did not fit."""

    index: int
    sides: dict[str, Encoded]
    dropped: int = 0


@dataclass
class Skipped:
    index: int
    reason: str


@dataclass(frozen=True)
class Failed:
    """A row that stops the run (malformed), carried out of a loader worker as data: the run
    stops with its one-line message rather than with the worker's traceback."""

    error: GenrecalError


def encode_or_carry(encode: Callable[..., "Item | Skipped"], *args, **kwargs) -> "Item | Skipped | Failed":
    """`encode(*args)`, with an error that stops the run returned as a Failed (see `raise_carried`)."""
    try:
        return encode(*args, **kwargs)
    except GenrecalError as exc:
        return Failed(exc)


def raise_carried(batch: Mapping[str, Any]) -> None:
    """Raise, in the training process, the error a loader worker carried out in `batch`."""
    if "error" in batch:
        raise batch["error"]


class PairDataset:
    """Rows of a data set (any layout of data.formats), each encoded for every side, e.g.
    {"teacher": processor, "student": processor}. Indexing returns an Item, or a Skipped with the
    reason (unreadable image, first turn too long); a malformed row raises DataError naming it.
    `rows` may be a stream (then only `encode_row` is used; `columns` names its columns)."""

    def __init__(self, rows, spec: DataSpec, processors: Mapping[str, Any], columns: Sequence[str] | None = None):
        self.rows, self.spec, self.processors = rows, spec, dict(processors)
        self.format = detect(columns if columns is not None else columns_of(rows), spec)
        self.image_root = image_root(spec) if spec.source != "shapes" else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Item | Skipped:
        return self.encode_row(self.rows[i], i)

    def encode_row(self, row: Mapping, index: int, key: int | None = None) -> Item | Skipped:
        """One row (number `index` in what this process reads) for every side. `key` identifies
        the row in the skip counts (default: its index)."""
        key = index if key is None else key
        conv = to_conversation(row, self.format, self.spec, index)
        try:
            images = [open_image(v, self.image_root) for v in conv.images]
            sides, dropped = encode_pair(self.processors, conv, images, self.spec.max_length)
        except SkipItem as exc:
            return Skipped(key, str(exc))
        return Item(key, sides, dropped)

    def measure_row(self, row: Mapping, index: int, image_token_ids: Mapping[str, int]) -> "dict[str, Lengths] | Skipped":
        """One row's token counts on every side before max_length (render.measure), read and
        rendered as `encode_row` does; a Skipped where it cannot be (an unreadable image)."""
        conv = to_conversation(row, self.format, self.spec, index)
        try:
            images = [open_image(v, self.image_root) for v in conv.images]
            return {side: measure(proc, conv, images, image_token_ids[side]) for side, proc in self.processors.items()}
        except SkipItem as exc:
            return Skipped(index, str(exc))

    def first(self) -> Iterator[Item | Skipped]:
        """The rows in stored order (a stream from its start, unshuffled), encoded one by one."""
        rows = self.rows if not hasattr(self.rows, "__len__") else (self.rows[i] for i in range(len(self.rows)))
        return (self.encode_row(row, i) for i, row in enumerate(rows))

    def check_start(self, n: int = 16) -> None:
        """Encode the first `n` rows now, so a malformed row, a template that cannot be cut or
        data that is all unusable fails before training starts (not a pass over all the data)."""
        encoded = list(itertools.islice(self.first(), n))
        if encoded and all(isinstance(m, Skipped) for m in encoded):
            reasons = Counter(m.reason for m in encoded)
            raise DataError(f"{self.spec.source}: the first {len(encoded)} items were all skipped "
                            f"({_reasons(reasons)}); check data.max_length and the images")


# ---------------------------------------------------------------------------------------------
# what was skipped or cut


@dataclass
class DataReport:
    """Items skipped (row -> reason) and rows whose trailing turns were dropped (row -> how
    many), each row counted once however often it is met (epochs, stages, processes)."""

    skipped: dict[int, str] = field(default_factory=dict)
    truncated: dict[int, int] = field(default_factory=dict)

    def add(self, other: "DataReport") -> None:
        self.skipped.update(other.skipped)
        self.truncated.update(other.truncated)

    def summary(self, total: int | None, max_length: int) -> str | None:
        """One line for the run's end (None when nothing was skipped or cut); `total` rows in the
        data set (None: a stream)."""
        parts = []
        if self.skipped:
            of = f" of {total:,}" if total is not None else ""
            parts.append(f"skipped {len(self.skipped):,}{of} items ({_reasons(Counter(self.skipped.values()))})")
        if self.truncated:
            parts.append(f"dropped {sum(self.truncated.values()):,} trailing turns of {len(self.truncated):,} items "
                         f"to fit max_length {max_length}")
        return "; ".join(parts) or None

    def to_dict(self) -> dict:
        return {"skipped_items": len(self.skipped), "skipped_by_reason": dict(Counter(self.skipped.values())),
                "truncated_items": len(self.truncated), "dropped_turns": sum(self.truncated.values())}


def _reasons(counter: Counter) -> str:
    return "; ".join(f"{n:,} {reason}" for reason, n in counter.most_common())


# ---------------------------------------------------------------------------------------------
# collation


def collate_side(items: Sequence[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-padded batch for one side: input_ids, attention_mask, labels (every answer token,
    -100 elsewhere), segment (-1 on padding), per-token extras, image tensors joined
    along dim 0, and each item's answers (texts, offsets, spans) for alignment statistics.
    `model_inputs(batch)` picks what the model takes."""
    import torch

    width = max(len(e.input_ids) for e in items)
    n = len(items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)
    for r, e in enumerate(items):
        input_ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        segment[r, : len(e.segment)] = torch.tensor(e.segment, dtype=torch.long)
    answer = is_answer(segment)
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": (segment >= 0).long(),
        "labels": torch.where(answer, input_ids, torch.full_like(input_ids, IGNORE_INDEX)),
        "segment": segment,
        "answers": [e.answers for e in items],
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
    return torch.cat(pad_to_common(parts), dim=0)  # e.g. Idefics3 [1, n_images, ...] with n differing


class Collator:
    """Collate a list of Item / Skipped into {side: batch dict, "data": DataReport of this batch,
    "items": usable items, "keys": their row keys}; pad ids come from each side's tokenizer.
    With `attach` (the collated batch -> more entries of it, e.g. the teacher's cached features),
    those join the batch where it is collated (a loader worker); an error it raises is carried
    out as an unreadable row's is."""

    def __init__(self, processors: Mapping[str, Any], attach: Callable[[dict], dict] | None = None):
        self.attach = attach
        self.pad_ids = {}
        for side, proc in processors.items():
            tok = getattr(proc, "tokenizer", proc)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            self.pad_ids[side] = 0 if pad is None else pad

    def __call__(self, encoded: Sequence[Item | Skipped | Failed]) -> dict[str, Any]:
        failed = [m for m in encoded if isinstance(m, Failed)]
        if failed:
            return {"error": failed[0].error}
        items = [m for m in encoded if isinstance(m, Item)]
        report = DataReport({m.index: m.reason for m in encoded if isinstance(m, Skipped)},
                            {m.index: m.dropped for m in items if m.dropped})
        batch: dict[str, Any] = {"data": report, "items": len(items), "keys": [it.index for it in items]}
        if items:
            batch.update({side: collate_side([it.sides[side] for it in items], pad) for side, pad in self.pad_ids.items()})
            if self.attach is not None:
                try:
                    batch.update(self.attach(batch))
                except GenrecalError as exc:  # carried out of the worker (raise_carried)
                    return {"error": exc}
        return batch


_NOT_MODEL_INPUTS = ("labels", "segment", "answers")


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a collated side that the model's forward takes."""
    return {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}


# ---------------------------------------------------------------------------------------------
# this process's micro-batches


def default_workers(processes: int, on_gpu: bool) -> int:
    """Loader workers per process when data.num_workers is unset. On GPUs: the cores this process
    may use less one for the loop, at most 8. On CPUs the training step itself needs the cores
    (a worker beside a multi-threaded step on 2 cores slowed a tiny run ~5x): half of them less
    one, so none below 4 cores per process."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    per_process = cores // max(1, processes)
    return max(0, min(8, per_process - 1 if on_gpu else per_process // 2 - 1))


class _Carrying:
    """A PairDataset as loader workers read it: a row that stops the run comes back as a Failed."""

    def __init__(self, dataset: PairDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Item | Skipped | Failed:
        return encode_or_carry(self.dataset.__getitem__, i)


def pair_loader(dataset: PairDataset, batch_sampler, sides: Mapping[str, Any], workers: int, pin_memory: bool,
                attach: Callable[[dict], dict] | None = None):
    """A DataLoader of collated micro-batches of `dataset` (index lists from `batch_sampler`),
    encoded in `workers` processes (with `attach`: see Collator); a row that stops the run comes
    back as the batch's "error" (`raise_carried`)."""
    return data_loader(_Carrying(dataset), workers, pin_memory, batch_sampler=batch_sampler,
                       collate_fn=Collator(sides, attach))


def data_loader(dataset, workers: int, pin_memory: bool, **kwargs):
    """A torch DataLoader with `workers` processes, each prefetching 4 batches."""
    import torch

    if workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are forked
    return torch.utils.data.DataLoader(dataset, num_workers=workers, pin_memory=pin_memory,
                                       prefetch_factor=4 if workers else None, **kwargs)


class Batches:
    """This process's micro-batches, epoch after epoch without end, from a saved `state` on
    (resuming skips the items before it without encoding them). A micro-batch whose items were
    all skipped is passed over (counted), so every micro-batch handed out has at least one item.
    `report` collects what was skipped; `state()` is what a checkpoint keeps."""

    def __init__(self, dataset: PairDataset, sampler, sides: Mapping[str, Any], *, workers: int, pin_memory: bool,
                 state: dict | int | None = None, attach: Callable[[dict], dict] | None = None):
        self.dataset, self.sampler = dataset, sampler
        self.position = state if isinstance(state, int) else (state or {}).get("position", 0)
        self.report = DataReport()
        self.loader = pair_loader(dataset, sampler, sides, workers, pin_memory, attach)
        self._it: Iterator | None = None

    def state(self) -> dict:
        return {"position": self.position}

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> dict[str, Any]:
        empty = 0
        while True:
            if self._it is None:
                epoch, skip = divmod(self.position, len(self.sampler))
                self.sampler.set_epoch(epoch, skip)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                continue
            raise_carried(batch)
            self.position += 1
            self.report.add(batch["data"])
            if batch["items"]:
                return batch
            empty += 1
            if empty >= len(self.sampler):
                raise DataError(f"{self.dataset.spec.source}: every item of a whole epoch was skipped on this process "
                                f"({self.report.summary(len(self.dataset), self.dataset.spec.max_length)})")
