"""A streamed training split (data.streaming): each process reads its own share, each loader
worker its own shards of that, and the state a checkpoint keeps is where every worker stands
in the epoch."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import DataError, first_line
from .loader import Batches, Collator, DataReport, PairDataset, data_loader, encode_or_carry, raise_carried


def row_key(row: Mapping) -> int:
    """A streamed row's identity for the skip counts (the same row read again in a later epoch
    counts once): a hash of its values, images as their paths or sizes."""
    import hashlib

    text = repr(sorted((k, _light(v)) for k, v in row.items()))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _light(value: Any) -> Any:
    """`value` with image bytes replaced by their size (hashing them would cost more than reading)."""
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, dict):
        return {k: _light(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_light(v) for v in value]
    return value


class _StreamPart(torch.utils.data.IterableDataset):
    """This process's share of a stream: in each loader worker, `datasets` hands out that worker's
    own shards; the worker encodes and collates its rows into micro-batches, skipping (unread
    beyond parsing) the batches a resumed state says it made."""

    def __init__(self, stream, dataset: PairDataset, batch_size: int, collate: Collator):
        self.stream, self.dataset, self.batch_size, self.collate = stream, dataset, batch_size, collate
        self.epoch, self.done = 0, {}  # worker -> micro-batches already made in this epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        skip_rows = self.done.get(worker, 0) * self.batch_size
        self.stream.set_epoch(self.epoch)
        encoded, made = [], self.done.get(worker, 0)
        rows = enumerate(self.stream)
        while True:
            try:
                n, row = next(rows)
            except StopIteration:
                break
            except Exception as exc:  # the reader: a file that is not what its name says, cut short, ...
                yield {"error": DataError(f"{self.dataset.spec.source}: cannot read the streamed data "
                                          f"({type(exc).__name__}: {first_line(exc)})")}
                return
            if n < skip_rows:
                continue
            encoded.append(encode_or_carry(self.dataset.encode_row, row, n, key=row_key(row)))
            if len(encoded) == self.batch_size:
                yield {**self.collate(encoded), "worker": worker, "made": made + 1}
                encoded, made = [], made + 1
        if encoded:
            yield {**self.collate(encoded), "worker": worker, "made": made + 1}


class StreamBatches(Batches):
    """Batches from a streamed source (data.streaming): this process reads its share of the
    stream (`datasets.distributed.split_dataset_by_node`, after a seeded shuffle of the shards and
    a buffer of rows), its loader workers their own shards of that. The state is the epoch and
    the micro-batches each worker has made in it, so a resumed run reads on from there."""

    def __init__(self, dataset: PairDataset, stream, sides: Mapping[str, Any], *, batch_size: int, processes: int,
                 rank: int, seed: int, workers: int, pin_memory: bool, state: dict | None = None):
        from datasets.distributed import split_dataset_by_node

        shuffled = stream.shuffle(seed=seed, buffer_size=dataset.spec.shuffle_buffer)
        this_share = split_dataset_by_node(shuffled, rank=rank, world_size=processes) if processes > 1 else shuffled
        self.dataset, self.report, self._it = dataset, DataReport(), None
        self.source = _StreamPart(this_share, dataset, batch_size, Collator(sides))
        state = state or {}
        if state and state.get("num_workers") != workers:
            raise DataError(f"{dataset.spec.source}: the checkpoint's stream position was saved with "
                            f"data.num_workers = {state.get('num_workers')} (each worker reads its own shards); "
                            f"this run has {workers}: resume with the same number")
        self.workers = workers
        self.source.epoch = state.get("epoch", 0)
        self.source.done = {int(w): n for w, n in state.get("workers", {}).items()}
        self.loader = data_loader(self.source, workers, pin_memory, batch_size=None)
        self._usable = 0

    def state(self) -> dict:
        return {"epoch": self.source.epoch, "workers": dict(self.source.done), "num_workers": self.workers}

    def __next__(self) -> dict[str, Any]:
        while True:
            if self._it is None:
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:  # the epoch's end: every worker's shards are read
                if not self._usable and not self.source.done:
                    raise DataError(f"{self.dataset.spec.source}: the stream gave this process no items")
                if not self._usable:
                    raise DataError(f"{self.dataset.spec.source}: every item of a whole epoch was skipped on this "
                                    f"process ({self.report.summary(None, self.dataset.spec.max_length)})")
                self._it, self._usable = None, 0
                self.source.epoch += 1
                self.source.done = {}
                continue
            raise_carried(batch)
            self.source.done[batch.pop("worker")] = batch.pop("made")
            self.report.add(batch["data"])
            if batch["items"]:
                self._usable += batch["items"]
                return batch
