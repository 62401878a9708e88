"""Which items each process trains on, batch by batch (`RankBatches`), optionally grouped by
length (`length_estimates`) to cut padding."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..errors import DataError
from ..recipe import DataSpec
from .formats import detect


class RankBatches(torch.utils.data.Sampler):
    """This process's micro-batches (lists of item indices) for one epoch.

    Data parallelism: one update consumes a *global batch* of `batch_size x processes x grad_accum`
    items. Each epoch is a fresh permutation of the data set (seeded by the run's seed, the stage and
    the epoch), cut into global micro-batches of `batch_size x processes` items, and each process
    takes its own `batch_size` slice of every one. So a recipe means the same thing on any number of
    processes: the same learning rate at every update, and `epochs = 1` shows every item once across
    the processes (2 processes x batch 8 see exactly the items that 1 process x batch 16 sees).

    A last global micro-batch with fewer than `batch_size x processes` items is dealt evenly when
    it gives every process at least one item; otherwise its items wait for the next epoch's
    permutation (`dropped` says how many: at most processes - 1).

    With `lengths` (item indices -> estimated token counts), batches are grouped by length: the
    permutation is cut into groups of `group` global micro-batches, each group sorted by length
    and cut into micro-batches, whose order within the group is shuffled again. Items of similar
    length share a batch (less padding) while the data stays shuffled at the scale of a group;
    a group's lengths are looked up only when the epoch reaches it.
    """

    def __init__(self, n_items: int, batch_size: int, processes: int, rank: int, seed: int, *,
                 lengths: Callable[[list[int]], list[float]] | None = None, group: int = 64):
        self.n, self.batch_size, self.processes, self.rank, self.seed = n_items, batch_size, processes, rank, seed
        self.lengths, self.group = lengths, group
        self.epoch, self.skip = 0, 0
        full, rest = divmod(n_items, batch_size * processes)
        self.full = full
        self.partial = rest if rest >= processes else 0
        self.dropped = rest - self.partial
        self.per_epoch = full + (1 if self.partial else 0)
        if self.per_epoch == 0:
            raise DataError(f"{n_items} usable training item(s) cannot give each of {processes} processes one; "
                            "use fewer processes or more data")

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next iteration yields `epoch`'s micro-batches from number `skip` on (resume)."""
        self.epoch, self.skip = epoch, skip

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __len__(self) -> int:
        return self.per_epoch

    def global_batch(self, order: list[int], b: int, cache: dict) -> list[int]:
        """Global micro-batch `b` of an epoch whose permutation is `order`."""
        width = self.batch_size * self.processes
        if self.lengths is None or b >= self.full:  # the partial last one is never regrouped
            return order[b * width : (b + 1) * width]
        m = b // self.group
        if m not in cache:
            cache.clear()
            first, last = m * self.group, min((m + 1) * self.group, self.full)
            items = order[first * width : last * width]
            by_length = [i for _, i in sorted(zip(self.lengths(items), items), key=lambda p: -p[0])]
            chunks = [by_length[k * width : (k + 1) * width] for k in range(last - first)]
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch * 1_009 + m + 1)
            cache[m] = [chunks[k] for k in torch.randperm(len(chunks), generator=g).tolist()]
        return cache[m][b - m * self.group]

    def __iter__(self) -> Iterator[list[int]]:
        order, cache = self.order(self.epoch), {}
        for b in range(self.skip, self.per_epoch):
            chunk = self.global_batch(order, b, cache)
            if len(chunk) < self.batch_size * self.processes:  # the partial last one: dealt evenly, rank r gets slice r
                cuts = [len(chunk) * r // self.processes for r in range(self.processes + 1)]
                yield chunk[cuts[self.rank] : cuts[self.rank + 1]]
            else:
                yield chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]


def length_estimates(rows, spec: DataSpec, image_tokens: int) -> Callable[[list[int]], list[float]]:
    """Rough token counts of rows by index, for length-grouped batching: characters of the text
    columns / 4 + `image_tokens` per image, read through Arrow without decoding any image."""
    import pyarrow as pa
    import pyarrow.compute as pc

    fmt = detect(rows.column_names, spec)
    text = {"columns": [spec.question_column, spec.answer_column], "messages": [spec.messages_column],
            "conversations": [spec.conversations_column], "cauldron": [spec.texts_column]}[fmt]
    image = spec.images_column if fmt in ("messages", "cauldron") else spec.image_column
    table_view = rows.select_columns([c for c in (*text, image) if c in rows.column_names]).with_format("arrow")

    def lengths(indices: list[int]) -> list[float]:
        table = table_view[indices]
        chars = [0.0] * len(indices)
        for name in text:
            col = table.column(name)
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                sizes = pc.fill_null(pc.utf8_length(col), 0).to_pylist()
            else:  # nested (messages, conversations): the size of its text form
                sizes = [len(str(v)) for v in col.to_pylist()]
            chars = [c + n for c, n in zip(chars, sizes)]
        n_images = [0] * len(indices)
        if image in table.column_names:
            col = table.column(image)
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                n_images = pc.fill_null(pc.list_value_length(col), 0).to_pylist()
            else:
                n_images = [int(v) for v in pc.is_valid(col).to_pylist()]
        return [c / 4 + image_tokens * k for c, k in zip(chars, n_images)]

    return lengths
