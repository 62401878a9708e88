"""Where the run computes: the Accelerator with its precision, and the small collectives that
keep every process in step (which items each process trains on: data/sampler.py)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..errors import GenrecalError, PeerStopped, RecipeError
from ..recipe import Recipe

MASTER_DTYPE = torch.float32  # what every trained parameter and its optimizer state is kept in


def mixed_precision(recipe: Recipe) -> str:
    """accelerate's name for the recipe's compute precision ("no" = plain fp32)."""
    p = recipe.train.precision
    if p == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[p]


def compute_dtype(recipe: Recipe) -> torch.dtype | None:
    """The low precision the recipe computes in; None for fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision(recipe))


def make_accelerator(recipe: Recipe):
    """The run's Accelerator: compute in the recipe's precision (autocast), masters in fp32; the
    recipe's experiment trackers (train.log_with) write under OUTPUT/logs."""
    from accelerate import Accelerator
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import ProjectConfiguration

    wanted = list(recipe.train.log_with)
    available = {str(t) for t in get_available_trackers()}
    missing = [name for name in wanted if name not in available]
    if missing:  # accelerate would drop them silently
        raise GenrecalError(f"train.log_with: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                            f"installed here (pip install {' '.join(missing)})")
    out = Path(recipe.train.output_dir)
    accelerator = Accelerator(mixed_precision=mixed_precision(recipe), log_with=wanted or None,
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    check_world(recipe, accelerator.num_processes)
    return accelerator


def check_world(recipe: Recipe, processes: int) -> None:
    """The recipe checks that need only the number of processes, before any model loads."""
    g = recipe.parallel.shard_group
    if g is not None and processes % g:
        raise RecipeError(recipe.origin, [f"parallel.shard_group: {g} does not divide the {processes} processes; "
                                          f"use a divisor of {processes} (usually the GPUs per node)"])


def total_updates(spec, batches_per_epoch: int) -> int:
    """A stage's optimizer updates: `steps`, or `epochs` passes over the data, capped by max_steps."""
    total = spec.steps if spec.steps is not None else math.ceil(spec.epochs * batches_per_epoch / spec.grad_accum)
    return min(total, spec.max_steps) if spec.max_steps is not None else total


def gather_rows(accelerator, row: torch.Tensor) -> torch.Tensor:
    """Every process's float vector `row` [k] as [processes, k], on every process."""
    row = row.detach().float().to(accelerator.device)[None]
    return accelerator.gather(row) if accelerator.num_processes > 1 else row


def stop_together(accelerator, failure: BaseException | None, label: str) -> None:
    """Every process calls it at the same point of its loop, `failure` what it met since the last
    call (None: nothing). When any process met an error every process stops here: the one that
    met it raises its own error (its one line), the others PeerStopped, which the CLI does not
    print: the message appears once, from the process that met it, and no process is left
    waiting in a collective. One all-reduce of one number per call."""
    flags = gather_rows(accelerator, torch.tensor([0.0 if failure is None else 1.0]))[:, 0]
    if failure is not None:
        raise failure
    if flags.any():
        rank = int(flags.nonzero()[0])
        raise PeerStopped(f"{label}: process {rank} met an error and stopped every process (its message is above)")


def gather_objects(accelerator, items: list) -> list:
    """Concatenate every process's list (picklable items), in rank order, on every process."""
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(items)


# ---------------------------------------------------------------------------------------------
# sharding (FSDP2)


def teacher_sharded(recipe: Recipe, accelerator) -> bool:
    return recipe.parallel.teacher == "shard" and accelerator.num_processes > 1


def device_mesh(accelerator, shard_group: int | None):
    """The mesh models are sharded over: every process (1-D), or with `shard_group` = g, groups
    of g processes that each hold one sharded copy, replicated across the groups (hybrid
    sharding: shard within a node, replicate across nodes)."""
    from torch.distributed.device_mesh import init_device_mesh

    n, g = accelerator.num_processes, shard_group or accelerator.num_processes
    if n % g:
        raise GenrecalError(f"parallel.shard_group = {g} does not divide the {n} processes; use a divisor of {n} "
                            "(usually the GPUs per node)")
    if g == n:
        return init_device_mesh(accelerator.device.type, (n,))
    return init_device_mesh(accelerator.device.type, (n // g, g), mesh_dim_names=("replicate", "shard"))


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


def shard_teacher(teacher, accelerator, mesh) -> None:
    """Shard the frozen teacher with FSDP2: one unit per decoder layer and vision block, then the
    inner model (what `VLM.body` calls) as the root, each resharded after its forward. The LM
    head sits outside the inner model and stays whole on every process, as L_ar, L_kl and L_reg
    need it at every step.

    Only the main process holds the weights (`load_vlm`); every other process built the model on
    the meta device (`load_vlm(empty=True)`) and receives its shard and the head from the main
    process, so host memory holds one full copy, not one per process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    model = teacher.model
    full = model.state_dict() if accelerator.is_main_process else {}  # references, not copies
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embeddings.weight:  # tied: the head must stay whole, the embeddings are sharded
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    inner = model.model
    units = shard_units(inner)
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    # The vision encoder is a unit of its own (what its blocks leave: patch embeddings, mergers),
    # gathered whenever it runs, also where generation calls it outside the inner model's
    # forward. The language model is not: the inner model embeds the tokens outside its forward.
    encoder = teacher.vision_encoder
    fully_shard(encoder, mesh=mesh, reshard_after_forward=True)
    fully_shard(inner, mesh=mesh, reshard_after_forward=True)
    vision = [u for u in units if any(u is m for m in encoder.modules())]
    _gather_vision_everywhere(teacher, [encoder, *vision])
    # Storage for what is still on the meta device; buffers (rotary frequencies and the like)
    # were computed when the model was built and are kept.
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=accelerator.device)
    for name, b in model.named_buffers():
        b.copy_(buffers[name])
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    model.requires_grad_(False)
    # The root's lazy initialisation (which makes the inner model the root of every unit under
    # it) now, by a one-token forward on every process: generation calls the vision encoder
    # before the inner model's forward, and a unit first called on its own becomes a root itself.
    with torch.no_grad():
        inner(input_ids=torch.zeros(1, 1, dtype=torch.long, device=accelerator.device))


def _gather_vision_everywhere(teacher, vision_units: list) -> None:
    """Keep every process's collectives in step when some batches have images and others not.

    A process whose batch has no image skips the vision tower, while the others all-gather its
    sharded blocks; they would wait forever. So as the teacher's forward starts, the processes
    agree whether any of them has images (one scalar all-reduce per teacher forward), and one
    that has none gathers and releases the vision blocks, in their order, when its language
    model starts: the point where the others have run the vision tower (in every family). The
    vision encoder's own unit comes first in `vision_units`, its blocks after it, as they gather."""
    import torch.distributed as dist

    behind = {"vision": False}

    def forward_starts(module, args, kwargs):
        has_images = kwargs.get("pixel_values") is not None
        any_has_images = torch.tensor([float(has_images)], device=next(module.parameters()).device)
        dist.all_reduce(any_has_images, op=dist.ReduceOp.MAX)
        behind["vision"] = bool(any_has_images.item()) and not has_images

    def language_starts(module, args, kwargs):
        if behind["vision"]:
            behind["vision"] = False
            for unit in vision_units:
                unit.unshard()
                unit.reshard()

    teacher.model.model.register_forward_pre_hook(forward_starts, with_kwargs=True)
    teacher.language_model.register_forward_pre_hook(language_starts, with_kwargs=True)


def shard_trainable(module: torch.nn.Module, mesh, compute_dtype: torch.dtype | None = None) -> None:
    """Shard what trains (objective.StudentAndRecalibrator: the student and each Recalibrator)
    with FSDP2: weights, gradients and AdamW states split over the mesh. Units: the student's
    decoder layers and vision blocks, each Recalibrator's blocks and the Recalibrator; the root is the
    module whose forward the loop calls, so parameters it owns directly (embeddings, heads,
    norms, projectors; a head tied to the embeddings stays one parameter) are gathered for the
    whole forward, whichever submodule uses them.

    `compute_dtype` (bf16 / fp16 runs): weights are gathered in it (half the bytes moved) and
    gradients reduced in fp32 into the fp32 shards, so no whole low-precision copy of the weights
    is kept for backward, as autocast keeps from fp32 weights."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for unit in shard_units(module.student):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    for rec in module.named_recalibrators().values():  # each teacher's
        for unit in shard_units(rec):
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(rec, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)


def after_trainable_changed(module: torch.nn.Module) -> None:
    """FSDP2 fixes each unit's gradient dtypes (mixed precision: reduce in fp32 into fp32 shards)
    from the parameters that train when the unit is first used. A stage that unfreezes other
    parameters has every unit read them again: `unshard` reruns a unit's (idempotent) lazy init.
    One gather of each unit per stage; every process must call it."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.unshard()
            m.reshard()


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextmanager
def gathered(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, a sharded module's own parameters are whole (for code that calls its
    parts directly, outside its forward); released after. Collective: every process enters it.
    An unsharded module: nothing to do."""
    if not is_sharded(module):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def full_state(module: torch.nn.Module, *, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """A sharded module's whole state dict on the CPU: on the main process only (an empty dict on
    the others), or with `everywhere` on every process. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))
    return {k: v.cpu() for k, v in state.items()} if everywhere else state


def sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `state` under `prefix.`, with the prefix removed."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def local_share(model: torch.nn.Module) -> float:
    """The share of `model`'s parameter elements this process holds (1.0 unsharded)."""
    from torch.distributed.tensor import DTensor

    total = local = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return local / max(total, 1)
