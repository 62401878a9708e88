"""Where the run computes: the Accelerator and its precision, which items each process trains
on, and the small collectives that keep every process in step.

Data parallelism: one update consumes a *global batch* of `batch_size x processes x grad_accum`
items. Each epoch is a fresh permutation of the data set (seeded by the run's seed, the stage and
the epoch), cut into global micro-batches of `batch_size x processes` items, and each process
takes its own `batch_size` slice of every one. So a recipe means the same thing on any number of
processes: the same learning rate at every update, and `epochs = 1` shows every item once across
the processes (2 processes x batch 8 see exactly the items that 1 process x batch 16 sees).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from ..recipe import Recipe

MASTER_DTYPE = torch.float32  # what every trained parameter and its optimizer state is kept in


def mixed_precision(recipe: Recipe) -> str:
    """accelerate's name for the recipe's compute precision ("no" = plain fp32)."""
    p = recipe.train.precision
    if p == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[p]


def make_accelerator(recipe: Recipe):
    """The run's Accelerator: compute in the recipe's precision (autocast), masters in fp32."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=mixed_precision(recipe))


class RankBatches(torch.utils.data.Sampler):
    """This process's micro-batches (lists of item indices) for one epoch; see the module docstring.

    A last global micro-batch with fewer than `batch_size x processes` items is dealt evenly when
    it gives every process at least one item; otherwise its items wait for the next epoch's
    permutation (`dropped` says how many: at most processes - 1).
    """

    def __init__(self, n_items: int, batch_size: int, processes: int, rank: int, seed: int):
        self.n, self.batch_size, self.processes, self.rank, self.seed = n_items, batch_size, processes, rank, seed
        self.epoch, self.skip = 0, 0
        full, rest = divmod(n_items, batch_size * processes)
        self.partial = rest if rest >= processes else 0
        self.dropped = rest - self.partial
        self.per_epoch = full + (1 if self.partial else 0)
        if self.per_epoch == 0:
            raise ValueError(f"{n_items} items cannot give each of {processes} processes one item")

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next iteration yields `epoch`'s micro-batches from number `skip` on (resume)."""
        self.epoch, self.skip = epoch, skip

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __len__(self) -> int:
        return self.per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order(self.epoch)
        width = self.batch_size * self.processes
        for b in range(self.skip, self.per_epoch):
            chunk = order[b * width : (b + 1) * width]
            if len(chunk) < width:  # the partial last one: dealt evenly, rank r gets slice r
                cuts = [len(chunk) * r // self.processes for r in range(self.processes + 1)]
                yield chunk[cuts[self.rank] : cuts[self.rank + 1]]
            else:
                yield chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]


def total_updates(st, batches_per_epoch: int) -> int:
    """A stage's optimizer updates: `steps`, or `epochs` passes over the data, capped by max_steps."""
    total = st.steps if st.steps is not None else math.ceil(st.epochs * batches_per_epoch / st.grad_accum)
    return min(total, st.max_steps) if st.max_steps is not None else total


def gather_rows(accelerator, row: torch.Tensor) -> torch.Tensor:
    """Every process's float vector `row` [k] as [processes, k], on every process."""
    row = row.detach().float().to(accelerator.device)[None]
    return accelerator.gather(row) if accelerator.num_processes > 1 else row


def gather_objects(accelerator, items: list) -> list:
    """Concatenate every process's list (picklable items), in rank order, on every process."""
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(items)
