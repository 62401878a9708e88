"""The three GenRecal stages (align, distill, finetune), one plain loop on accelerate each;
`distill(recipe)` chains the enabled ones, checkpoints each and exports the plain student.

Which parameters train and which losses count in each stage follows METHOD.md, "Stages".
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from . import losses
from ..data import Collator, PairDataset, load_split, model_inputs
from ..errors import GenrecalError
from .recalibrator import Recalibrator
from ..recipe import Recipe, StageSpec

TEACHER_STAGES = ("align", "distill")


# ---------------------------------------------------------------------------------------------
# teacher features (frozen, no activations kept)


@dataclass
class TeacherFeatures:
    """What one batch's teacher pass hands to the Recalibrator and the losses.

    question [B, Lq, d_l] + question_mask; answer_in [B, La, d_l] (z_al or its input embeddings)
    + answer_mask; rows [N, d_l]: the teacher's own rows predicting its N answer tokens; targets [N].
    """

    question: torch.Tensor
    question_mask: torch.Tensor
    answer_in: torch.Tensor
    answer_mask: torch.Tensor
    answer_start: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor


def teacher_features(teacher, batch: dict, answer_input: str) -> TeacherFeatures:
    with torch.inference_mode():
        z = teacher.body(**model_inputs(batch))
        emb = teacher.input_embeddings(batch["input_ids"]) if answer_input == "embeddings" else None
    # Leave inference mode: these tensors feed a graph that trains (the Recalibrator's).
    z = z.clone()
    start = batch["answer_start"]
    a_len = batch["answer_mask"].sum(1)
    lq, la = int(start.max()), int(a_len.max())
    k = torch.arange(la, device=z.device)[None, :]
    a_mask = k < a_len[:, None]
    a_pos = (start[:, None] + k).clamp(max=z.shape[1] - 1)
    src = emb.clone() if emb is not None else z
    answer_in = _gather_rows(src, a_pos)
    rows = _gather_rows(z, a_pos - 1)[a_mask]
    targets = batch["input_ids"].gather(1, a_pos)[a_mask]
    q_mask = torch.arange(lq, device=z.device)[None, :] < start[:, None]
    return TeacherFeatures(z[:, :lq], q_mask.long(), answer_in, a_mask.long(), start, rows, targets)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


# ---------------------------------------------------------------------------------------------
# everything that trains, as one module (so accelerate can wrap it for DDP / FSDP)


class GenRecal(nn.Module):
    """The student and the Recalibrator; forward returns the stage's loss terms.

    The teacher's head is held outside the module's parameters: it is frozen and shared.
    """

    def __init__(self, student_model: nn.Module, recalibrator: Recalibrator | None, teacher_head: nn.Module | None):
        super().__init__()
        self.student = student_model
        self.recalibrator = recalibrator
        object.__setattr__(self, "_teacher_head", teacher_head)  # not a submodule: never trained or wrapped

    def forward(self, sbatch: dict, tf: TeacherFeatures | None, stage: str, recipe: Recipe) -> dict[str, torch.Tensor]:
        loss_w, st = recipe.loss, getattr(recipe.stages, stage)
        with torch.set_grad_enabled(torch.is_grad_enabled() and stage != "align"):  # align: student frozen
            z_s = self.student.model(**model_inputs(sbatch)).last_hidden_state
        terms: dict[str, torch.Tensor] = {}
        if stage in TEACHER_STAGES and self.recalibrator is not None:
            q, q_mask = student_question(z_s, sbatch)
            answer = tf.answer_mask.bool()
            rec = self.recalibrator(q, q_mask, tf.answer_in, tf.answer_mask, answer_offset=tf.answer_start)[answer]
            terms["ar"], terms["kl"] = losses.recalibration_terms(
                self._teacher_head, rec, tf.rows, tf.targets, temperature=loss_w.temperature
            )
            if stage == "align" or st.reg:
                reg_rec = self.recalibrator(
                    tf.question, tf.question_mask, tf.answer_in, tf.answer_mask,
                    question_from_teacher=True, answer_offset=tf.answer_start,
                )
                ar, kl = losses.recalibration_terms(
                    self._teacher_head, reg_rec[answer], tf.rows, tf.targets, temperature=loss_w.temperature
                )
                terms["reg"] = ar + kl
            terms["_rec_rows"] = rec.detach()
        if stage in ("distill", "finetune"):
            rows, targets = losses.answer_rows(z_s, sbatch["labels"])
            head = self.student.get_output_embeddings()
            terms["sft"] = losses.sft(head, rows, targets)
            if stage == "distill" and loss_w.uld:
                terms["uld"] = losses.uld(
                    head, rows, (sbatch["labels"][:, 1:] != -100).sum(1),
                    self._teacher_head, tf.rows, tf.answer_mask.sum(1), temperature=loss_w.temperature,
                )
        weights = {"ar": loss_w.ar, "kl": loss_w.kl, "reg": loss_w.reg, "sft": loss_w.sft, "uld": loss_w.uld}
        terms["loss"] = sum(weights[k] * v for k, v in terms.items() if k in weights)
        return terms


def student_question(z_s: torch.Tensor, sbatch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's question features z_qs [B, Lq, d_s] and their mask [B, Lq] (1 = real)."""
    start = sbatch["answer_start"]
    lq = int(start.max())
    return z_s[:, :lq], (torch.arange(lq, device=z_s.device)[None, :] < start[:, None]).long()


# ---------------------------------------------------------------------------------------------
# the reliance probe: does the Recalibrator's output depend on the student?


def reliance(module: GenRecal, sbatch: dict, tf: TeacherFeatures) -> dict[str, float]:
    """The Recalibrator's loss (L_ar) and teacher top-1 agreement on one batch with the student's
    question features real, another item's (each item gets its neighbour's, mask included) and
    zeroed; separately for the first answer token (predicted from the last student question
    position) and the later ones. Equal numbers across the three mean the output ignores the
    student. Keys `rely_{first|later}_{top1|ar}_{real|other|zero}`."""
    import torch.nn.functional as F

    head = module._teacher_head
    with torch.no_grad():
        q, q_mask = student_question(module.student.model(**model_inputs(sbatch)).last_hidden_state, sbatch)
        answer = tf.answer_mask.bool()
        first = torch.zeros_like(answer)
        first[:, 0] = True
        first = first[answer]
        teacher_top1 = head(tf.rows).argmax(-1)
        variants = {"real": (q, q_mask), "other": (q.roll(1, 0), q_mask.roll(1, 0)), "zero": (torch.zeros_like(q), q_mask)}
        out = {}
        for name, (question, mask) in variants.items():
            rec = module.recalibrator(question, mask, tf.answer_in, tf.answer_mask, answer_offset=tf.answer_start)
            logits = head(rec[answer]).float()
            ar = F.cross_entropy(logits, tf.targets, reduction="none")
            agree = (logits.argmax(-1) == teacher_top1).float()
            for part, sel in (("first", first), ("later", ~first)):
                if sel.any():
                    out[f"rely_{part}_top1_{name}"] = float(agree[sel].mean())
                    out[f"rely_{part}_ar_{name}"] = float(ar[sel].mean())
    return out


# ---------------------------------------------------------------------------------------------
# which parameters train


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
    """Multiplier of st.lr at each step: linear warmup, then linear / cosine decay to lr_end."""
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
# the run


@dataclass
class RunResult:
    output_dir: Path
    student_dir: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    accuracy: dict[str, Any] = field(default_factory=dict)  # "teacher", "student before", "student after"


def make_accelerator(recipe: Recipe):
    """The run's Accelerator: bf16 autocast on GPU by recipe, fp32 on CPU (bf16 is slow there)."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=_mixed_precision(recipe))


def distill(
    recipe: Recipe,
    *,
    resume: bool = False,
    overwrite: bool = False,
    reporter=None,
    accelerator=None,
    prefix: str = "",
) -> RunResult:
    """Run the recipe's enabled stages in order, checkpoint each, export the student.

    `prefix` labels the stages in the display (a prerequisite run shows as "teacher/finetune").
    """
    from accelerate.utils import set_seed

    from ..models import load_vlm

    out = Path(recipe.train.output_dir)
    accelerator = accelerator or make_accelerator(recipe)
    if accelerator.is_main_process:
        ckpt.check_output_dir(out, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()

    # What is left to do: every enabled stage, or (--resume) what follows the last checkpoint.
    remaining, resume_meta, from_dir = recipe.stages.enabled(), None, None
    found = ckpt.latest_checkpoint(out) if resume else None
    if found is not None:
        stage, meta = found
        from_dir = out / stage
        later = [s for s in remaining if ckpt.STAGES.index(s) > ckpt.STAGES.index(stage)]
        remaining, resume_meta = (later, None) if meta.get("finished") else ([stage, *later], meta)
        if reporter is not None:
            reporter.note(f"resuming after {stage} step {meta.get('step')}/{meta.get('total_steps')}")

    student = load_vlm(ensure_built(recipe.student, "student", reporter, accelerator), revision=recipe.student.revision,
                       dtype=recipe.student.dtype, trust_remote_code=recipe.student.trust_remote_code)
    teacher = rec = None
    if any(s in TEACHER_STAGES for s in remaining):
        teacher = load_vlm(ensure_built(recipe.teacher, "teacher", reporter, accelerator), revision=recipe.teacher.revision,
                           dtype=recipe.teacher.dtype, trust_remote_code=recipe.teacher.trust_remote_code)
        teacher.model.requires_grad_(False)
        teacher.model.to(accelerator.device)
        _warn_if_swapped(teacher, student, reporter)
        set_seed(recipe.train.seed)
    if teacher is not None and recipe.uses_recalibrator:
        rec = Recalibrator(teacher.hidden_size, student.text_config, student.decoder_layer_class,
                           num_blocks=recipe.recalibrator.num_blocks, new_positions=recipe.recalibrator.new_positions)
        rec.to(dtype=student.model.dtype)
    if from_dir is not None:
        _load_state(from_dir, student, rec)

    result = RunResult(out, out / "student")
    val_rows = _validation_rows(recipe)
    if val_rows is not None and accelerator.is_main_process:
        if teacher is not None:
            result.accuracy["teacher"] = _accuracy(teacher, val_rows, recipe)
        if found is None:  # the student as it came in, before any stage of this run
            result.accuracy["student before"] = _accuracy(student, val_rows, recipe)
    for stage in remaining:
        set_seed(recipe.train.seed + ckpt.STAGES.index(stage))
        meta = resume_meta if (resume_meta and resume_meta["stage"] == stage) else None
        result.stages[stage] = run_stage(stage, recipe, teacher, student, rec, accelerator, reporter,
                                         resume_meta=meta, label=prefix + stage)
    if val_rows is not None and accelerator.is_main_process:
        result.accuracy["student after"] = _accuracy(student, val_rows, recipe)
    return _export(recipe, student, out, result, accelerator, reporter)


def ensure_built(spec, role: str, reporter, accelerator) -> str:
    """The local folder or hub id of a model; a `zoo:` model is built, and a model whose
    `recipe` says how to make it is trained first (resuming where an earlier try stopped)."""
    from ..recipe import load_recipe
    from ..world.zoo import resolve_source

    path = resolve_source(spec.path)
    if spec.recipe is None or Path(path).exists():
        return path
    if reporter is not None:
        reporter.note(f"{role} {path} does not exist yet: building it with {spec.recipe}")
    built = distill(load_recipe(spec.recipe), resume=True, reporter=reporter, accelerator=accelerator, prefix=f"{role}/")
    if not Path(path).exists():
        raise GenrecalError(f"{role}.recipe {spec.recipe} exported its student to {built.student_dir}, not to "
                            f"{role}.path {path}; make the two agree")
    return path


def _validation_rows(recipe: Recipe):
    if recipe.train.eval_items == 0:
        return None
    rows = load_split(recipe.data, recipe.data.eval_split, seed=recipe.train.seed)
    return rows.select(range(min(recipe.train.eval_items, len(rows))))


def _accuracy(vlm, rows, recipe: Recipe) -> dict:
    from ..validate import accuracy

    was_training = vlm.model.training
    vlm.model.eval()
    acc = accuracy(vlm, rows, image_column=recipe.data.image_column, question_column=recipe.data.question_column,
                   answer_column=recipe.data.answer_column)
    vlm.model.train(was_training)
    return acc.to_dict()


def _mixed_precision(recipe: Recipe) -> str:
    p = recipe.train.precision
    if p == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[p]


def _load_state(stage_dir: Path, student, rec) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    saved = AutoModelForImageTextToText.from_pretrained(stage_dir / "student", use_safetensors=True, dtype=student.model.dtype)
    student.model.load_state_dict(saved.state_dict())
    if rec is not None and (stage_dir / "recalibrator.safetensors").exists():
        rec.load_state_dict(load_file(str(stage_dir / "recalibrator.safetensors")))


def _warn_if_swapped(teacher, student, reporter) -> None:
    t = sum(p.numel() for p in teacher.model.parameters())
    s = sum(p.numel() for p in student.model.parameters())
    if t < s and reporter is not None:
        reporter.note(
            f"warning: the teacher ({t:,} parameters) is smaller than the student ({s:,}); "
            "are [teacher] and [student] swapped?", style="yellow"
        )


def run_stage(stage, recipe: Recipe, teacher, student, rec, accelerator, reporter, resume_meta=None, label=None) -> dict:
    """One stage: AdamW + schedule, gradient accumulation, logging, checkpoint at the end."""
    st: StageSpec = getattr(recipe.stages, stage)
    label = label or stage
    sides = {"student": student.processor}
    if stage in TEACHER_STAGES:
        sides = {"teacher": teacher.processor, **sides}
    rows = load_split(recipe.data, recipe.data.train_split, seed=recipe.train.seed)
    dataset = PairDataset(rows, recipe.data, sides).scan()
    if dataset.skip_summary() and reporter is not None:
        reporter.note(f"{label}: {dataset.skip_summary()}", style="yellow")
    generator = torch.Generator().manual_seed(recipe.train.seed + ckpt.STAGES.index(stage))
    loader = torch.utils.data.DataLoader(dataset, batch_size=st.batch_size, shuffle=True, generator=generator,
                                         collate_fn=Collator(sides), drop_last=len(dataset) >= st.batch_size)
    batches_per_epoch = max(1, len(loader))
    total = st.steps if st.steps is not None else math.ceil(st.epochs * batches_per_epoch / st.grad_accum)
    if st.max_steps is not None:
        total = min(total, st.max_steps)

    params = set_trainable(stage, student, rec, st)
    module = GenRecal(student.model, rec if stage in TEACHER_STAGES else None, teacher.head if teacher else None)
    optimizer = torch.optim.AdamW(params, lr=st.lr, weight_decay=st.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(st, total))
    start_step = 0
    if resume_meta is not None:
        stage_dir = Path(recipe.train.output_dir) / stage
        optimizer.load_state_dict(ckpt.load_tensors(stage_dir / "optimizer.pt"))
        scheduler.load_state_dict(ckpt.load_tensors(stage_dir / "scheduler.pt"))
        ckpt.set_rng_state(ckpt.load_tensors(stage_dir / "rng.pt"))
        start_step = int(resume_meta["step"])
    probe = _probe_batch(dataset, sides, recipe, accelerator) if (rec is not None and stage in TEACHER_STAGES) else None
    accelerator.gradient_accumulation_steps = st.grad_accum  # accumulate() and backward() follow it
    module, optimizer, loader, scheduler = accelerator.prepare(module, optimizer, loader, scheduler)
    module.train()

    if reporter is not None:
        reporter.stage_start(label, total, start_step)
    step, micro, metrics = start_step, 0, {}
    epoch = start_step * st.grad_accum // batches_per_epoch
    skip = start_step * st.grad_accum % batches_per_epoch
    t0, items, tokens = time.perf_counter(), 0, 0
    acc: dict[str, float] = {}
    stopped = None
    try:
        while step < total:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            generator.manual_seed(recipe.train.seed + ckpt.STAGES.index(stage) + 1000 * epoch)
            for batch in (accelerator.skip_first_batches(loader, skip) if skip else loader):
                tf = teacher_features(teacher, batch["teacher"], recipe.recalibrator.answer_input) if "teacher" in batch else None
                with accelerator.accumulate(module):
                    terms = module(batch["student"], tf, stage, recipe)
                    loss = terms["loss"]
                    if not torch.isfinite(loss):
                        raise _NonFinite(label, step + 1, {k: float(v.detach()) for k, v in terms.items() if v.dim() == 0})
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and st.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, st.max_grad_norm)
                    lr = optimizer.param_groups[0]["lr"]  # the rate this update used
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in terms.items():
                    if v.dim() == 0:
                        acc[k] = acc.get(k, 0.0) + float(v.detach())
                items += batch["student"]["input_ids"].shape[0]
                tokens += int(batch["student"]["attention_mask"].sum())
                micro += 1
                if not accelerator.sync_gradients:
                    continue
                step += 1
                if reporter is not None:
                    metrics = {k: v / micro for k, v in acc.items()}
                    metrics["lr"] = lr
                    dt = time.perf_counter() - t0
                    metrics["items_per_s"], metrics["tokens_per_s"] = items / dt, tokens / dt
                    if tf is not None:
                        metrics.update(alignment_stats(batch, tf, terms, teacher))
                    if probe is not None and (step % recipe.train.probe_every == 0 or step == total):
                        metrics.update(_run_probe(accelerator, module, probe, teacher, recipe))
                    reporter.step(label, step, metrics)
                acc, micro = {}, 0
                if step >= total:
                    break
            epoch, skip = epoch + 1, 0
    except KeyboardInterrupt:
        stopped = "interrupted"
    except _NonFinite as exc:
        raise GenrecalError(
            f"{exc.stage}: loss became non-finite at step {exc.step} ({exc.terms}); the last good checkpoint "
            f"is kept in {recipe.train.output_dir}; lower stages.{exc.stage}.lr or check the data"
        ) from None
    finished = step >= total and stopped is None
    _save(stage, recipe, student, rec, accelerator, module, optimizer, scheduler,
          {"step": step, "total_steps": total, "finished": finished, "metrics": metrics})
    if stopped:
        raise GenrecalError(f"{stage}: interrupted at step {step}/{total}; checkpoint saved, run again with --resume to continue")
    if reporter is not None:
        reporter.stage_end(label, metrics)
    return {"steps": step, "metrics": metrics}


def _probe_batch(dataset, sides, recipe: Recipe, accelerator) -> dict | None:
    """The reliance probe's fixed batch: the first train.probe_items training items."""
    from accelerate.utils import send_to_device

    n = min(recipe.train.probe_items, len(dataset))
    if recipe.train.probe_every == 0 or n < 2:
        return None
    return send_to_device(Collator(sides)([dataset[i] for i in range(n)]), accelerator.device)


def _run_probe(accelerator, module, probe: dict, teacher, recipe: Recipe) -> dict[str, float]:
    module = accelerator.unwrap_model(module)
    was_training = module.training
    module.eval()
    try:
        with accelerator.autocast():  # the same precision as the training forward (bf16 on GPU)
            tf = teacher_features(teacher, probe["teacher"], recipe.recalibrator.answer_input)
            return reliance(module, probe["student"], tf)
    finally:
        module.train(was_training)


class _NonFinite(Exception):
    def __init__(self, stage, step, terms):
        self.stage, self.step, self.terms = stage, step, {k: round(v, 4) for k, v in terms.items()}


def _save(stage, recipe, student, rec, accelerator, module, optimizer, scheduler, meta) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(module)
        ckpt.save_stage(Path(recipe.train.output_dir), stage, student=unwrapped.student, processor=student.processor,
                        recalibrator=rec if stage in TEACHER_STAGES else None, optimizer=optimizer,
                        scheduler=scheduler, recipe=recipe.to_dict(), meta=meta)
    accelerator.wait_for_everyone()


def _export(recipe, student, out, result, accelerator, reporter) -> RunResult:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.export_student(out, student.model, student.processor,
                            {"recipe": recipe.to_dict(), "stages": result.stages, "accuracy": result.accuracy})
        if reporter is not None:
            reporter.note(f"student exported to {out / 'student'}")
    accelerator.wait_for_everyone()
    return result


def alignment_stats(batch: dict, tf: TeacherFeatures, terms: dict, teacher) -> dict[str, float]:
    """Token-alignment statistics of one batch for the live display and metrics.jsonl."""
    from ..vocab import SplitStats, split_stats

    t, s = batch["teacher"], batch["student"]
    stats = {
        "teacher_q_tokens": float(t["answer_start"].float().mean()),
        "student_q_tokens": float(s["answer_start"].float().mean()),
        "teacher_a_tokens": float(t["answer_mask"].sum(1).float().mean()),
        "student_a_tokens": float(s["answer_mask"].sum(1).float().mean()),
    }
    stats["a_token_ratio"] = stats["teacher_a_tokens"] / max(stats["student_a_tokens"], 1e-9)
    total = SplitStats()
    for r in range(len(t["answer_text"])):
        (ts, te), (ss, se) = t["answer_span"][r], s["answer_span"][r]
        answer = t["answer_text"][r][ts:te]
        total = total + split_stats(answer, _within(t["answer_offsets"][r], ts, te), _within(s["answer_offsets"][r], ss, se))
    stats["boundary_agreement"] = total.boundary_agreement
    if "_rec_rows" in terms:
        stats["top1"] = losses.top1_agreement(teacher.head, terms["_rec_rows"], tf.rows)
    return stats


def _within(offsets, start: int, end: int) -> list[tuple[int, int]]:
    """Token offsets clipped to text[start:end] and made relative to `start`."""
    return [(max(a, start) - start, min(b, end) - start) for a, b in offsets if b > start and a < end]
