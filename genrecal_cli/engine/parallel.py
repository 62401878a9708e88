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

from ..errors import DataError
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


# ---------------------------------------------------------------------------------------------
# a sharded teacher (FSDP2)


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks a model is sharded by: modules whose class one of its (sub)models names in
    `_no_split_modules` (decoder layers, vision blocks); where none does, the elements of its
    ModuleLists of repeated blocks."""
    from transformers import PreTrainedModel

    names = {n for m in model.modules() if isinstance(m, PreTrainedModel) for n in (m._no_split_modules or [])}
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        units = [child for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1
                 for child in m if type(child) is type(m[0])]
    return units


def shard_teacher(teacher, accelerator) -> None:
    """Shard the frozen teacher over every process with FSDP2: one unit per decoder layer and
    vision block, then the inner model (what `VLM.body` calls) as the root, each resharded after
    its forward. The LM head sits outside the inner model and stays whole on every process, as
    L_ar, L_kl and L_reg need it at every step. Each process reads the whole checkpoint first
    (host memory: one full copy per process)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = teacher.model
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embeddings.weight:  # tied: the head must stay whole, the embeddings are sharded
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    head.to(accelerator.device)
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    inner = model.model
    for unit in shard_units(inner):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(inner, mesh=mesh, reshard_after_forward=True)
    model.requires_grad_(False)


def local_share(model: torch.nn.Module) -> float:
    """The share of `model`'s parameter elements this process holds (1.0 unsharded)."""
    from torch.distributed.tensor import DTensor

    total = local = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return local / max(total, 1)
