"""One stage of GenRecal (align, distill or finetune) as one plain loop that reads top to bottom.

Set-up (data, trainable parameters, optimizer, schedule, a resume) -> for each update: grad_accum
micro-batches (teacher features, forward, a cross-process check, backward) -> clip, step -> log
-> checkpoint or stop. A checkpoint holds every process's data position, so a resumed stage
continues with the items it would have seen next.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.loader import Batches, DataReport, PairDataset, default_workers
from ..data.sampler import RankBatches, length_estimates
from ..data.stream import StreamBatches
from ..errors import GenrecalError, PeerStopped
from ..recipe import Recipe, StageSpec
from . import checkpoint as ckpt
from .faults import Interrupted, StopRequests, signal_name
from .memory import PeakMemory
from .objective import TEACHER_STAGES, StudentAndRecalibrator
from .parallel import (after_trainable_changed, gather_objects, gather_rows, is_sharded, stop_together,
                       total_updates)
from .probe import alignment_stats, probe_batch, run_probe
from .teacher import TeacherFeatures, head_fn
from .teacher.part import TeacherPart, recalibrator_files, saved_names
from .teacher.source import Attach
from .trainable import lr_lambda, set_trainable


@dataclass
class Run:
    """What every stage of one run shares."""

    recipe: Recipe
    accelerator: Any
    student: Any  # models.VLM, its parameters fp32 (the masters)
    teachers: list[TeacherPart]  # each teacher, its features' source and its Recalibrator; [] once no stage needs them
    train_rows: Any  # the training split (a datasets.Dataset)
    module: StudentAndRecalibrator | None = None  # what trains, sharded when the recipe says so
    reporter: Any | None = None
    stop: StopRequests | None = None
    data_report: DataReport | None = None  # what the stages skipped or cut, every process's, once per row


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass
class Stage:
    """One stage in progress: what its updates read and change, set up by `_start`."""

    run: Run
    name: str  # align, distill or finetune
    label: str  # as the display names it ("teacher/distill" for a prerequisite run)
    spec: StageSpec
    teachers: list[TeacherPart]  # where the stage uses them: each teacher, its source, its Recalibrator
    sides: dict  # side -> processor
    batches: Any  # Batches or StreamBatches: this process's micro-batches from its data position
    module: nn.Module  # what trains (StudentAndRecalibrator), wrapped for DDP or sharded
    sharded: bool
    optimizer: torch.optim.Optimizer
    scheduler: Any
    layout: dict  # data_layout: what a resume must match
    total: int  # updates
    step: int  # updates done
    heads: dict[str, Any]  # each teacher's head as the losses call it, by teacher name
    use_reg: dict[str, bool]  # whether L_reg is on, by teacher name
    probe: dict | None  # the reliance probe's fixed batch
    stop: StopRequests
    peak: PeakMemory
    counts: "Counts"


@dataclass
class Counts:
    """What the stage has seen so far, over every process, since this sitting started."""

    start: float
    items: int = 0
    tokens: int = 0
    real: int = 0  # real tokens, every side
    slots: int = 0  # token slots, padding included


@dataclass
class Update:
    """One update's record: each loss term's mean over its micro-batches and the processes, what
    the processes had skipped or cut so far, and the last micro-batch (for alignment statistics)."""

    terms: dict[str, float]
    lr: float
    skipped: int
    truncated: int
    batch: dict
    features: dict[str, TeacherFeatures]  # by teacher name
    out: Any  # objective.Output of the last micro-batch


def run_stage(run: Run, stage: str, *, resume: ckpt.Found | None = None, label: str | None = None) -> dict:
    """Train one stage to its end (or to a stop request); returns its summary."""
    s = _start(run, stage, resume, label or stage)
    metrics: dict = {}
    terms: tuple[str, ...] = ()
    while s.step < s.total:
        update = _update(s)
        terms = tuple(update.terms)
        s.step += 1
        # A signal on any process (even one that arrived inside this update) stops all of them
        # after this update: the signal's number, agreed, 0 when none.
        stop_asked = int(gather_rows(run.accelerator, torch.tensor([float(s.stop.requested or 0)])).max())
        metrics = _log(s, update)
        if stop_asked:
            _save_progress(s, metrics)
            raise Interrupted(
                f"{s.label}: stopped by {signal_name(stop_asked)} at step {s.step}/{s.total}; checkpoint saved in "
                f"{ckpt.checkpoint_dir(run.recipe.train.output_dir, stage, s.step)}; run again with --resume to continue",
                stop_asked)
        if run.recipe.train.save_every and s.step % run.recipe.train.save_every == 0 and s.step < s.total:
            _save_progress(s, metrics)
    return _finish(s, metrics, terms)


def _start(run: Run, stage: str, resume: ckpt.Found | None, label: str) -> Stage:
    """The stage's data, what trains and its optimizer and schedule, from a checkpoint if given."""
    recipe, accelerator = run.recipe, run.accelerator
    spec: StageSpec = getattr(recipe.stages, stage)
    parts = run.teachers if stage in TEACHER_STAGES else []
    peak = PeakMemory()
    # data: every process deals its own slice of each global micro-batch (data/sampler.py),
    # encoded in loader workers (every teacher's side and the student's); unusable items are
    # skipped where they are met
    sides = {**{p.side: p.vlm.processor for p in parts}, "student": run.student.processor}
    dataset = PairDataset(run.train_rows, recipe.data, sides)
    dataset.check_start()
    seed = recipe.train.seed + ckpt.STAGES.index(stage)
    sampler = None if recipe.data.streaming else _sampler(run, dataset, spec, seed, parts)
    total = spec.steps if sampler is None else total_updates(spec, len(sampler))  # a stream counts steps
    workers = recipe.data.num_workers
    if workers is None:
        workers = default_workers(accelerator.num_processes, on_gpu=accelerator.device.type == "cuda")
    layout = data_layout(recipe, spec, seed, accelerator.num_processes, workers)

    # what trains, with which optimizer and schedule
    params = set_trainable(stage, run.student, [p.recalibrator for p in parts if p.recalibrator is not None], spec)
    module = run.module if run.module is not None else trained_module(run.student, parts, recipe)
    sharded = is_sharded(module)  # FSDP2 (parallel.student = "shard"); else DDP through accelerate
    if sharded:
        after_trainable_changed(module)
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, total))
    step, data_state = 0, {}
    if resume is not None:
        _check_layout(resume, layout, sharded, label, stage)
        step, data_state = _resume(resume, accelerator, module, optimizer, scheduler, sharded)
    attach = Attach.of([p.source for p in parts])
    batches = _batches(run, dataset, sampler, sides, spec, seed, workers, data_state, step, attach)
    # L_reg: always in align, in distill unless stages.distill.reg = false; never without the
    # teacher's question features (a cache written without them)
    use_reg = {p.name: (stage == "align" or spec.reg) and p.source.with_question for p in parts}
    with_rec = any(p.recalibrator is not None for p in parts)
    probe = probe_batch(dataset, sides, recipe, accelerator, attach) if with_rec else None
    if not sharded:
        module, optimizer = accelerator.prepare(module, optimizer)
    module.train()
    s = Stage(run, stage, label, spec, parts, sides, batches, module, sharded, optimizer, scheduler, layout,
              total, step, {p.name: head_fn(p.vlm.head) for p in parts}, use_reg, probe,
              run.stop or StopRequests(), peak, Counts(time.perf_counter()))
    _announce(s, sampler)
    return s


def trained_module(student, parts: list[TeacherPart], recipe: Recipe, blank_images: dict | None = None):
    """What trains: the student and each teacher's Recalibrator (the one teacher's, as
    `recalibrator`; several, as `recalibrators` by name), the loss weighted per teacher."""
    recs = {p.name: p.recalibrator for p in parts if p.recalibrator is not None}
    if not any(p.several for p in parts):
        return StudentAndRecalibrator(student.model, recs.get("teacher"), recipe.loss, blank_images=blank_images)
    return StudentAndRecalibrator(student.model, recs, recipe.loss, blank_images=blank_images,
                                  teacher_weights={p.name: p.weight for p in parts})


def _sampler(run: Run, dataset, spec: StageSpec, seed: int, parts: list[TeacherPart]) -> RankBatches:
    recipe, accelerator = run.recipe, run.accelerator
    lengths = None
    if recipe.data.group_by_length:
        image_tokens = max(vlm.image_tokens_per_image() for vlm in (run.student, *(p.vlm for p in parts)))
        lengths = length_estimates(run.train_rows, recipe.data, image_tokens)
    return RankBatches(len(dataset), spec.batch_size, accelerator.num_processes, accelerator.process_index, seed,
                       lengths=lengths)


def _resume(found: ckpt.Found, accelerator, module, optimizer, scheduler, sharded: bool) -> tuple[int, dict]:
    """Optimizer, schedule and this process's RNG from a mid-stage checkpoint; (its step, its data state)."""
    if sharded:
        ckpt.load_sharded_state(found.path, module, optimizer)
    else:
        optimizer.load_state_dict(ckpt.load_tensors(found.path / "optimizer.pt"))
    scheduler.load_state_dict(ckpt.load_tensors(found.path / "scheduler.pt"))
    saved = ckpt.load_tensors(found.path / "rng" / f"rank-{accelerator.process_index}.pt")
    ckpt.set_rng_state(saved)
    return found.step, saved.get("data", {})


def _batches(run: Run, dataset, sampler, sides, spec: StageSpec, seed: int, workers: int, data_state: dict,
             step: int, attach):
    accelerator = run.accelerator
    pin = accelerator.device.type == "cuda"
    if sampler is None:
        batches = StreamBatches(dataset, run.train_rows, sides, batch_size=spec.batch_size,
                                processes=accelerator.num_processes, rank=accelerator.process_index, seed=seed,
                                workers=workers, pin_memory=pin,
                                state=data_state.get("position"))
    else:  # checkpoints from before the data position was saved: every micro-batch had its items
        batches = Batches(dataset, sampler, sides, workers=workers, pin_memory=pin,
                          state=data_state.get("position", step * spec.grad_accum),
                          attach=attach)
    batches.report = DataReport(**data_state.get("report", {}))
    return batches


def _announce(s: Stage, sampler) -> None:
    reporter, accelerator = s.run.reporter, s.run.accelerator
    if reporter is None:
        return
    reporter.stage_start(s.label, s.total, s.step)
    if s.step == 0:
        n = accelerator.num_processes
        reporter.note(
            f"{s.label}: {s.total:,} updates of {s.layout['global_batch']:,} items (batch_size {s.spec.batch_size} x "
            f"grad_accum {s.spec.grad_accum} x {n} process{'es' if n > 1 else ''}); "
            + ("streamed" if sampler is None else f"one epoch = {len(sampler) / s.spec.grad_accum:,.1f} updates"))


def _update(s: Stage) -> Update:
    """One optimizer update: grad_accum micro-batches (each: its batch and teacher features, the
    forward, one collective of its loss terms and counts, backward), then clip and step."""
    from accelerate.utils import send_to_device

    accelerator, spec = s.run.accelerator, s.spec
    sums: dict[str, float] = {}
    for i in range(spec.grad_accum):
        # What can fail on one process alone (a loader worker's error carried out, a whole
        # epoch skipped, a damaged cache item) fails here, before any collective of this
        # micro-batch: every process then agrees to stop (parallel.stop_together).
        failure, batch, features = None, None, None
        try:
            batch = send_to_device(next(s.batches), accelerator.device)
        except Exception as exc:
            failure = exc
        stop_together(accelerator, failure, s.label)
        with accelerator.autocast():  # collective where a teacher is sharded: every process, in order
            features = {p.name: p.source.features(batch) for p in s.teachers}
        with _grad_sync(accelerator, s.module, s.sharded, i == spec.grad_accum - 1):
            with accelerator.autocast():
                out = s.module(batch["student"], features, s.heads, stage=s.name, reg=s.use_reg)
            shared = _shared(s, batch, out)  # every process's, before backward: all see a bad loss
            accelerator.backward(out.loss / spec.grad_accum)
        for name in ("loss", *out.terms):
            sums[name] = sums.get(name, 0.0) + float(shared[name].mean())
        c = s.counts
        c.tokens, c.items = c.tokens + int(shared["tokens"].sum()), c.items + int(shared["items"].sum())
        c.real, c.slots = c.real + int(shared["real"].sum()), c.slots + int(shared["slots"].sum())
    if spec.max_grad_norm > 0:
        accelerator.clip_grad_norm_(s.module.parameters(), spec.max_grad_norm)
    lr = s.scheduler.get_last_lr()[0]  # the rate this update uses
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return Update({n: v / spec.grad_accum for n, v in sums.items()}, lr, int(shared["skipped"].sum()),
                  int(shared["truncated"].sum()), batch, features, out)


def _shared(s: Stage, batch: dict, out) -> dict[str, torch.Tensor]:
    """One micro-batch's loss terms and counts from every process (one collective): name ->
    [processes]. A non-finite loss on any process stops them all, the one it was met on says so."""
    accelerator = s.run.accelerator
    real, slots = _padding(batch, s.sides)
    this_process = {"loss": out.loss, **out.terms, "tokens": batch["student"]["attention_mask"].sum(), "items": batch["items"],
            "real": real, "slots": slots, "skipped": len(s.batches.report.skipped),
            "truncated": len(s.batches.report.truncated)}
    names = list(this_process)
    values = [float(v.detach() if torch.is_tensor(v) else v) for v in this_process.values()]
    rows = gather_rows(accelerator, torch.tensor(values)).cpu()
    shared = {n: rows[:, k] for k, n in enumerate(names)}
    losses = torch.stack([shared[n] for n in ("loss", *out.terms)], 1)
    bad = ~torch.isfinite(losses).all(1)
    if bad.any():
        rank = int(bad.nonzero()[0])
        terms = {n: round(float(shared[n][rank]), 4) for n in ("loss", *out.terms)}
        if rank != accelerator.process_index:  # that process prints it
            raise PeerStopped(f"{s.label}: process {rank} met a non-finite loss")
        raise GenrecalError(
            f"{s.label}: loss became non-finite at step {s.step + 1} on process {rank} ({terms}); the last good "
            f"checkpoint is kept in {s.run.recipe.train.output_dir}; lower stages.{s.name}.lr or check the data")
    return shared


def _log(s: Stage, update: Update) -> dict:
    """The update's metrics (with the probe and alignment statistics when due), to the reporter."""
    run, accelerator = s.run, s.run.accelerator
    c = s.counts
    dt = time.perf_counter() - c.start
    probe_now = s.probe is not None and (s.step % run.recipe.train.probe_every == 0 or s.step == s.total)
    metrics = {**update.terms, "lr": update.lr, "items_per_s": c.items / dt,
               "tokens_per_s": c.tokens / dt, "pad_share": 1 - c.real / max(c.slots, 1),
               "skipped_items": update.skipped, "truncated_items": update.truncated, **s.layout}
    if probe_now:  # every process runs it: a sharded teacher's forward is collective
        for p in s.teachers:
            found = run_probe(accelerator, s.module, s.probe, p.source, s.heads[p.name], p.name)
            metrics.update({p.key + k: v for k, v in found.items()})
    if run.reporter is not None and accelerator.is_main_process:
        due = s.step % run.recipe.train.log_every == 0 or s.step == s.total or probe_now
        for p in s.teachers if due else ():
            with accelerator.autocast():
                found = alignment_stats(update.batch, update.features[p.name], update.out.recalibrated.get(p.name),
                                        s.heads[p.name], side=p.side)
            metrics.update({p.key + k: v for k, v in found.items()})
        run.reporter.step(s.label, s.step, metrics)
    return metrics


def _finish(s: Stage, metrics: dict, terms: tuple[str, ...]) -> dict:
    """What every process skipped, the stage's summary, and the finished stage saved."""
    run, accelerator = s.run, s.run.accelerator
    report = DataReport()
    for part in gather_objects(accelerator, [s.batches.report]):  # every process's, each row once
        report.add(part)
    if run.data_report is not None:
        run.data_report.add(report)
    summary = {"steps": s.step, "metrics": metrics, **s.layout, "data": report.to_dict(),
               "peak_rss_mb": s.peak.rss_mb(), **s.peak.device()}
    accelerator.wait_for_everyone()
    module = accelerator.unwrap_model(s.module)
    recs = recalibrator_files(s.teachers)
    states = ckpt.gathered_states(module, recs) if s.sharded else {}
    if accelerator.is_main_process:
        ckpt.save_stage(Path(run.recipe.train.output_dir), s.name, student=module.student,
                        processor=run.student.exportable_processor, recalibrators=recs,
                        recipe=run.recipe.to_dict(),
                        meta={"step": s.step, "total_steps": s.total, "finished": True, **summary,
                              **saved_names(s.teachers)}, **states)
    accelerator.wait_for_everyone()
    if run.reporter is not None:
        run.reporter.stage_end(s.label, {k: v for k, v in metrics.items() if k in terms})
    return summary


def _padding(batch: dict, sides) -> tuple[float, float]:
    """(real tokens, token slots) of a micro-batch over every side."""
    return (float(sum(batch[side]["attention_mask"].sum() for side in sides)),
            float(sum(batch[side]["attention_mask"].numel() for side in sides)))


def _grad_sync(accelerator, module, sharded: bool, sync: bool):
    """Gradients are reduced across processes only on the last micro-batch of an update."""
    if sharded:
        module.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if sync else accelerator.no_sync(module)


def data_layout(recipe: Recipe, spec: StageSpec, seed: int, processes: int, workers: int) -> dict:
    """What decides which items each saved data position stands for: a resumed run must have the
    same (its position counts micro-batches of this size, dealt by this seed's order to these
    processes). Loader workers matter only to a stream, whose shards they split between them."""
    layout = {"processes": processes, "global_batch": spec.batch_size * processes * spec.grad_accum,
              "batch_size": spec.batch_size, "grad_accum": spec.grad_accum, "seed": seed,
              "group_by_length": recipe.data.group_by_length}
    if recipe.data.streaming:
        layout["num_workers"] = workers
    return layout


LAYOUT_KEYS = {"processes": "the number of processes", "batch_size": "stages.{stage}.batch_size",
               "grad_accum": "stages.{stage}.grad_accum", "seed": "train.seed (this stage's seed)",
               "group_by_length": "data.group_by_length", "num_workers": "data.num_workers (a stream's loader workers)"}


def _check_layout(resume: ckpt.Found, layout: dict, sharded: bool, label: str, stage: str) -> None:
    if bool(resume.meta.get("sharded")) != sharded:
        was, now = ('"shard"', '"ddp"') if resume.meta.get("sharded") else ('"ddp"', '"shard"')
        raise GenrecalError(
            f"{label}: the checkpoint {resume.path} was written with parallel.student = {was}; this run has {now}. "
            "Resume with the same setting, or start over with --overwrite")
    # (a checkpoint from before a key was saved is checked on the keys it has)
    changed = [f"{LAYOUT_KEYS[k].format(stage=stage)} {resume.meta[k]} -> {v}" for k, v in layout.items()
               if k in LAYOUT_KEYS and k in resume.meta and resume.meta[k] != v]
    if not changed and resume.meta.get("global_batch", layout["global_batch"]) != layout["global_batch"]:
        changed = [f"the global batch {resume.meta['global_batch']} -> {layout['global_batch']}"]
    if changed:
        raise GenrecalError(
            f"{label}: the checkpoint {resume.path} was written with other data settings ({'; '.join(changed)}): "
            "its data position counts micro-batches of its own layout, so this run would continue on other items. "
            "Resume with the checkpoint's settings, or start over with --overwrite")


def _save_progress(s: Stage, metrics: dict) -> None:
    run, accelerator = s.run, s.run.accelerator
    recipe, report = run.recipe, s.batches.report
    module = accelerator.unwrap_model(s.module)
    ckpt.save_checkpoint(
        accelerator, Path(recipe.train.output_dir), s.name, s.step, module=module, student=module.student,
        processor=run.student.exportable_processor, recalibrators=recalibrator_files(s.teachers),
        optimizer=s.optimizer, scheduler=s.scheduler, recipe=recipe.to_dict(),
        meta={"step": s.step, "total_steps": s.total, "finished": False, "metrics": metrics, **s.layout,
              **saved_names(s.teachers)},
        keep=recipe.train.keep_checkpoints,
        # this process's data position and what it skipped so far, saved with its RNG state
        data={"position": s.batches.state(), "report": {"skipped": report.skipped, "truncated": report.truncated}},
    )
    if run.reporter is not None:
        run.reporter.note(f"checkpoint saved: {ckpt.checkpoint_dir(recipe.train.output_dir, s.name, s.step)}", style="dim")
