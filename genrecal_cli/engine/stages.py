"""One stage of GenRecal (align, distill or finetune) as one plain loop: what trains, the
learning-rate schedule, and the update loop with logging, checkpoints and clean stops.

Which parameters train and which losses count in each stage follows METHOD.md, "Stages". The
loop reads top to bottom: data -> trainable parameters -> optimizer and schedule -> (resume) ->
for each update: grad_accum micro-batches (teacher features, forward, a cross-process check,
backward) -> clip, step -> log -> checkpoint or stop. A checkpoint holds every process's data
position, so a resumed stage continues with the items it would have seen next.
"""

from __future__ import annotations

import itertools
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.loader import Batches, Collator, DataReport, Item, PairDataset, default_workers, raise_carried
from ..data.sampler import RankBatches, length_estimates
from ..data.stream import StreamBatches
from ..errors import GenrecalError, PeerStopped
from ..recipe import Recipe, StageSpec
from . import checkpoint as ckpt
from .cache import check_answers, features_from_dict
from .faults import Interrupted, StopRequests, signal_name
from .objective import TEACHER_STAGES, GenRecal
from .parallel import (after_trainable_changed, gather_objects, gather_rows, gathered, is_sharded, stop_together,
                       total_updates)
from .probe import alignment_stats, reliance
from .recalibrator import Recalibrator
from .teacher import TeacherFeatures, head_fn, teacher_features


@dataclass
class Run:
    """What every stage of one run shares."""

    recipe: Recipe
    accelerator: Any
    student: Any  # models.VLM, its parameters fp32 (the masters)
    teacher: Any | None  # models.VLM, frozen, in its recipe dtype; None once no stage needs it
    recalibrator: Recalibrator | None
    train_rows: Any  # the training split (a datasets.Dataset)
    module: GenRecal | None = None  # what trains: the student + Recalibrator, sharded when the recipe says so
    reporter: Any | None = None
    stop: StopRequests | None = None
    data_report: DataReport | None = None  # what the stages skipped or cut, every process's, once per row
    cache: Any | None = None  # cache.CacheReader: the teacher's features read instead of computed (teacher.cache)

    def teacher_features(self, teacher, batch: dict) -> TeacherFeatures:
        """One batch's teacher features: computed by the teacher, or read from its cache by
        whoever collated the batch (`cached_features`), checked against the teacher side
        rendered now."""
        if self.cache is None:
            return teacher_features(teacher, batch["teacher"], self.recipe.recalibrator.answer_input)
        tf = features_from_dict(batch["extra"])
        check_answers(tf, batch["teacher"], batch["keys"], self.cache.folder)
        return tf

    def cached_features(self, stage: str):
        """What a collator adds to a batch of `stage` (Collator `extra`): the items' cached
        teacher features, where the run reads a cache and the stage uses the teacher."""
        return self.cache.batch if self.cache is not None and stage in TEACHER_STAGES else None


# ---------------------------------------------------------------------------------------------
# what trains, and how fast


def set_trainable(stage: str, student, recalibrator: Recalibrator | None, st: StageSpec) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze what `stage` trains; returns the trainable parameters."""
    student.model.requires_grad_(False)
    if recalibrator is not None:
        recalibrator.requires_grad_(stage in TEACHER_STAGES)
    if stage == "distill":
        student.language_model.requires_grad_(True)
        student.head.requires_grad_(True)
        if st.train_projector:
            student.vision_projector.requires_grad_(True)
    elif stage == "finetune":
        student.model.requires_grad_(True)
        student.vision_encoder.requires_grad_(False)
        student.vision_projector.requires_grad_(True)  # Qwen's projector sits inside its vision encoder
    params = [p for p in student.model.parameters() if p.requires_grad]
    if recalibrator is not None and stage in TEACHER_STAGES:
        params += [p for p in recalibrator.parameters() if p.requires_grad]
    return params


def lr_lambda(st: StageSpec, total: int):
    """Multiplier of st.lr at update `step` (0-based): linear warmup, then linear / cosine decay to
    lr_end at the last update. A function of the update alone, whatever the number of processes."""
    floor = st.lr_end / st.lr

    def f(step: int) -> float:
        if st.warmup_steps and step < st.warmup_steps:
            return (step + 1) / st.warmup_steps
        if st.schedule == "constant":
            return 1.0
        span = max(1, total - st.warmup_steps - 1)
        t = min(1.0, (step - st.warmup_steps) / span)
        if st.schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0 - (1.0 - floor) * t

    return f


# ---------------------------------------------------------------------------------------------
# the loop


def run_stage(run: Run, stage: str, *, resume: ckpt.Found | None = None, label: str | None = None) -> dict:
    """Train one stage to its end (or to a stop request); returns its summary."""
    from accelerate.utils import send_to_device

    recipe, acc, reporter = run.recipe, run.accelerator, run.reporter
    st: StageSpec = getattr(recipe.stages, stage)
    label = label or stage
    teacher = run.teacher if stage in TEACHER_STAGES else None
    rec = run.recalibrator if stage in TEACHER_STAGES else None
    out_dir = Path(recipe.train.output_dir)
    peak = PeakMemory()

    # data: every process deals its own slice of each global micro-batch (data/sampler.py),
    # encoded in loader workers; unusable items are skipped where they are met
    sides = {"student": run.student.processor}
    if teacher is not None:
        sides = {"teacher": teacher.processor, **sides}
    streaming = recipe.data.streaming
    dataset = PairDataset(run.train_rows, recipe.data, sides)
    dataset.check_start()
    seed = recipe.train.seed + ckpt.STAGES.index(stage)
    sampler = None
    if not streaming:
        lengths = None
        if recipe.data.group_by_length:
            image_tokens = max(vlm.image_tokens_per_image() for vlm in (run.student, teacher) if vlm is not None)
            lengths = length_estimates(run.train_rows, recipe.data, image_tokens)
        sampler = RankBatches(len(dataset), st.batch_size, acc.num_processes, acc.process_index, seed, lengths=lengths)
    total = st.steps if streaming else total_updates(st, len(sampler))  # a stream's stages count steps (recipe check)
    workers = recipe.data.num_workers
    if workers is None:
        workers = default_workers(acc.num_processes, on_gpu=acc.device.type == "cuda")
    layout = data_layout(recipe, st, seed, acc.num_processes, workers)

    # what trains, with which optimizer and schedule
    params = set_trainable(stage, run.student, rec, st)
    module = run.module if run.module is not None else GenRecal(run.student.model, rec, recipe.loss)
    sharded = is_sharded(module)  # FSDP2 (parallel.student = "shard"); else DDP through accelerate
    if sharded:
        after_trainable_changed(module)
    optimizer = torch.optim.AdamW(params, lr=st.lr, weight_decay=st.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(st, total))
    step, data_state = 0, {}
    if resume is not None:
        _check_layout(resume, layout, sharded, label, stage)
        if sharded:
            ckpt.load_sharded_state(resume.path, module, optimizer)
        else:
            optimizer.load_state_dict(ckpt.load_tensors(resume.path / "optimizer.pt"))
        scheduler.load_state_dict(ckpt.load_tensors(resume.path / "scheduler.pt"))
        saved = ckpt.load_tensors(resume.path / "rng" / f"rank-{acc.process_index}.pt")
        ckpt.set_rng_state(saved)
        step, data_state = resume.step, saved.get("data", {})
    pin = acc.device.type == "cuda"
    if streaming:
        batches = StreamBatches(dataset, run.train_rows, sides, batch_size=st.batch_size, processes=acc.num_processes,
                                rank=acc.process_index, seed=seed, workers=workers, pin_memory=pin,
                                state=data_state.get("position"))
    else:  # checkpoints from before the data position was saved: every micro-batch had its items
        batches = Batches(dataset, sampler, sides, workers=workers, pin_memory=pin,
                          state=data_state.get("position", step * st.grad_accum),
                          extra=run.cached_features(stage))
    batches.report = DataReport(**data_state.get("report", {}))
    head = head_fn(teacher.head) if teacher is not None else None
    # L_reg: always in align, in distill unless stages.distill.reg = false; never without the
    # teacher's question features (a cache written without them)
    use_reg = (stage == "align" or st.reg) and (run.cache is None or run.cache.with_question)
    probe = _probe_batch(dataset, sides, recipe, acc, run.cached_features(stage)) if rec is not None else None
    if not sharded:
        module, optimizer = acc.prepare(module, optimizer)
    module.train()

    if reporter is not None:
        reporter.stage_start(label, total, step)
        if step == 0:
            reporter.note(
                f"{label}: {total:,} updates of {layout['global_batch']:,} items (batch_size {st.batch_size} x "
                f"grad_accum {st.grad_accum} x {acc.num_processes} process{'es' if acc.num_processes > 1 else ''}); "
                + ("streamed" if streaming else f"one epoch = {len(sampler) / st.grad_accum:,.1f} updates")
            )
    t0, seen_items, seen_tokens, metrics, names = time.perf_counter(), 0, 0, {}, ()
    real, slots = 0, 0  # tokens and padded token slots over every side, for the padding share
    stop = run.stop or StopRequests()
    while step < total:
        sums = 0.0
        for i in range(st.grad_accum):
            # What can fail on one process alone (a loader worker's error carried out, a whole
            # epoch skipped, a damaged cache item) fails here, before any collective of this
            # micro-batch: every process then agrees to stop (parallel.stop_together).
            failure, batch, tf = None, None, None
            try:
                batch = send_to_device(next(batches), acc.device)
                if teacher is not None and run.cache is not None:
                    tf = run.teacher_features(teacher, batch)  # read and checked, no teacher forward
            except Exception as exc:
                failure = exc
            stop_together(acc, failure, label)
            last = i == st.grad_accum - 1
            if teacher is not None and tf is None:
                with acc.autocast():  # collective when the teacher is sharded
                    tf = run.teacher_features(teacher, batch)
            with _grad_sync(acc, module, sharded, last):
                with acc.autocast():
                    out = module(batch["student"], tf, head, stage=stage, reg=use_reg)
                # One small collective per micro-batch, before backward: every process's loss
                # terms, tokens and items. All processes see a bad loss and stop together.
                names = ("loss", *out.terms)  # the same on every process: the same code path
                mine = torch.stack([out.loss.detach().float(), *(v.detach().float() for v in out.terms.values())])
                counts = [float(batch["student"]["attention_mask"].sum()), float(batch["items"]),
                          *_padding(batch, sides), len(batches.report.skipped), len(batches.report.truncated)]
                everyone = gather_rows(acc, torch.cat([mine.cpu(), torch.tensor(counts)])).cpu()
                k = len(names)
                bad = ~torch.isfinite(everyone[:, :k]).all(1)
                if bad.any():
                    rank = int(bad.nonzero()[0])
                    terms = {n: round(float(v), 4) for n, v in zip(names, everyone[rank, :k])}
                    if rank != acc.process_index:  # that process prints it
                        raise PeerStopped(f"{label}: process {rank} met a non-finite loss")
                    raise GenrecalError(
                        f"{label}: loss became non-finite at step {step + 1} on process {rank} ({terms}); the last "
                        f"good checkpoint is kept in {out_dir}; lower stages.{stage}.lr or check the data")
                acc.backward(out.loss / st.grad_accum)
            sums += everyone[:, :k].mean(0)
            seen_tokens += int(everyone[:, k].sum())
            seen_items += int(everyone[:, k + 1].sum())
            real, slots = real + int(everyone[:, k + 2].sum()), slots + int(everyone[:, k + 3].sum())
        if st.max_grad_norm > 0:
            acc.clip_grad_norm_(module.parameters(), st.max_grad_norm)
        lr = scheduler.get_last_lr()[0]  # the rate this update uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        # A signal on any process (even one that arrived inside this update) stops all of them
        # after this update: the signal's number, agreed, 0 when none.
        stop_asked = int(gather_rows(acc, torch.tensor([float(stop.requested or 0)])).max())

        probe_now = probe is not None and (step % recipe.train.probe_every == 0 or step == total)
        metrics = {n: float(v) / st.grad_accum for n, v in zip(names, sums)}
        dt = time.perf_counter() - t0
        metrics.update(lr=lr, items_per_s=seen_items / dt, tokens_per_s=seen_tokens / dt, pad_share=1 - real / max(slots, 1),
                       skipped_items=int(everyone[:, k + 4].sum()), truncated_items=int(everyone[:, k + 5].sum()), **layout)
        if probe_now:  # every process runs it: a sharded teacher's forward is collective
            metrics.update(_run_probe(acc, module, probe, teacher, head, run))
        if reporter is not None and acc.is_main_process:
            if tf is not None and (step % recipe.train.log_every == 0 or step == total or probe_now):
                with acc.autocast():
                    metrics.update(alignment_stats(batch, tf, out.recalibrated, head))
            reporter.step(label, step, metrics)

        if stop_asked:
            _save_progress(run, stage, step, total, acc, module, optimizer, scheduler, metrics, layout, batches)
            raise Interrupted(
                f"{label}: stopped by {signal_name(stop_asked)} at step {step}/{total}; checkpoint saved in "
                f"{ckpt.checkpoint_dir(out_dir, stage, step)}; run again with --resume to continue", stop_asked)
        if recipe.train.save_every and step % recipe.train.save_every == 0 and step < total:
            _save_progress(run, stage, step, total, acc, module, optimizer, scheduler, metrics, layout, batches)

    report = DataReport()
    for part in gather_objects(acc, [batches.report]):  # every process's, each row once
        report.add(part)
    if run.data_report is not None:
        run.data_report.add(report)
    summary = {"steps": step, "metrics": metrics, **layout, "data": report.to_dict(), "peak_rss_mb": peak.rss_mb(),
               **peak.device()}
    acc.wait_for_everyone()
    states = ckpt.gathered_states(acc.unwrap_model(module), with_recalibrator=rec is not None) if sharded else {}
    if acc.is_main_process:
        ckpt.save_stage(out_dir, stage, student=acc.unwrap_model(module).student, processor=run.student.exportable_processor,
                        recalibrator=rec, recipe=recipe.to_dict(),
                        meta={"step": step, "total_steps": total, "finished": True, **summary}, **states)
    acc.wait_for_everyone()
    if reporter is not None:
        reporter.stage_end(label, {k: v for k, v in metrics.items() if k in names})
    return summary


def _padding(batch: dict, sides) -> tuple[float, float]:
    """(real tokens, token slots) of a micro-batch over every side."""
    return (float(sum(batch[side]["attention_mask"].sum() for side in sides)),
            float(sum(batch[side]["attention_mask"].numel() for side in sides)))


def _grad_sync(acc, module, sharded: bool, sync: bool):
    """Gradients are reduced across processes only on the last micro-batch of an update."""
    if sharded:
        module.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if sync else acc.no_sync(module)


def data_layout(recipe: Recipe, st: StageSpec, seed: int, processes: int, workers: int) -> dict:
    """What decides which items each saved data position stands for: a resumed run must have the
    same (its position counts micro-batches of this size, dealt by this seed's order to these
    processes). Loader workers matter only to a stream, whose shards they split between them."""
    layout = {"processes": processes, "global_batch": st.batch_size * processes * st.grad_accum,
              "batch_size": st.batch_size, "grad_accum": st.grad_accum, "seed": seed,
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


def _save_progress(run, stage, step, total, acc, module, optimizer, scheduler, metrics, layout, batches) -> None:
    recipe = run.recipe
    report = batches.report
    ckpt.save_checkpoint(
        acc, Path(recipe.train.output_dir), stage, step, module=acc.unwrap_model(module),
        student=acc.unwrap_model(module).student, processor=run.student.exportable_processor,
        recalibrator=run.recalibrator if stage in TEACHER_STAGES else None,
        optimizer=optimizer, scheduler=scheduler, recipe=recipe.to_dict(),
        meta={"step": step, "total_steps": total, "finished": False, "metrics": metrics, **layout},
        keep=recipe.train.keep_checkpoints,
        # this process's data position and what it skipped so far, saved with its RNG state
        data={"position": batches.state(), "report": {"skipped": report.skipped, "truncated": report.truncated}},
    )
    if run.reporter is not None:
        run.reporter.note(f"checkpoint saved: {ckpt.checkpoint_dir(recipe.train.output_dir, stage, step)}", style="dim")


def _probe_batch(dataset, sides, recipe: Recipe, acc, extra=None) -> dict | None:
    """The reliance probe's fixed batch: the first train.probe_items usable training items (the
    same on every process)."""
    from accelerate.utils import send_to_device

    if recipe.train.probe_every == 0:
        return None
    usable = (met for met in dataset.first() if isinstance(met, Item))  # the same on every process
    items = list(itertools.islice(usable, recipe.train.probe_items))
    if len(items) < 2:
        return None
    batch = Collator(sides, extra)(items)
    raise_carried(batch)
    return send_to_device(batch, acc.device)


def _run_probe(acc, module, probe: dict, teacher, head, run: Run) -> dict[str, float]:
    module = acc.unwrap_model(module)
    was_training = module.training
    module.eval()
    try:
        with acc.autocast():  # the same precision as the training forward
            tf = run.teacher_features(teacher, probe)
            with gathered(module):  # the probe calls the parts directly, outside the root's forward
                return reliance(module, probe["student"], tf, head)
    finally:
        module.train(was_training)


class PeakMemory:
    """Peak memory from now on: resident set of this process (Linux: VmHWM after a reset through
    /proc/self/clear_refs) and, on CUDA, the allocator's peak. The reset also lowers what
    `/usr/bin/time` reports as the process's maximum resident set to the last stage's peak;
    cgroup accounting (Slurm, containers) is not affected."""

    def __init__(self):
        self._reset = False
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._reset = True
        except OSError:
            pass
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def rss_mb(self) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:") and self._reset:
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
        return None

    def device(self) -> dict[str, float]:
        if not torch.cuda.is_available():
            return {}
        return {"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
