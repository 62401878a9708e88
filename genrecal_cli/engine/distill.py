"""A whole `genrecal distill` run on resolved inputs, from loading the models to exporting the
plain student.

It loads and places the models, measures accuracy before, runs the enabled stages in order
(resuming where a checkpoint says), releases each stage's state, measures accuracy after and
exports the student.

Inputs arrive resolved (real folders, loaded rows, a scorer): the engine never builds models or
data of its own; `genrecal_cli.commands.distill` does that at the edge.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.loader import DataReport
from ..errors import GenrecalError
from ..recipe import Recipe, TeacherView
from . import checkpoint as ckpt
from .accuracy import Scorer, accuracy
from .teacher.cache import CacheReader, fingerprint, read_index
from .teacher.part import TeacherPart, recalibrator_files, saved_names
from .teacher.source import CachedTeacher, OnlineTeacher
from .faults import StopRequests
from .objective import TEACHER_STAGES
from .parallel import (MASTER_DTYPE, compute_dtype, device_mesh, full_state, make_accelerator, shard_teacher,
                       shard_trainable, sub_state, teacher_sharded)
from .recalibrator import Recalibrator
from .stages import Run, run_stage, trained_module
from .trackers import tracking


@dataclass
class Inputs:
    """What the edge resolved from a recipe."""

    student: str  # local folder or hub id
    teacher: str | None  # None when no stage needs one, or with several teachers
    train: Any  # training rows (datasets.Dataset; an IterableDataset under data.streaming)
    validation: Any | None = None  # rows for the before/after accuracy table; None: no table
    score: Scorer | None = None  # how validation answers are scored; None: exact match
    held_out: int = 0  # the training data's first rows, left out of train for the table (no validation split)
    validation_title: str = "the validation split"  # what the table's rows are, as its title says
    teachers: dict[str, str] = field(default_factory=dict)  # several [[teachers]]: name -> local folder or hub id


@dataclass
class RunResult:
    output_dir: Path
    student_dir: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    accuracy: dict[str, Any] = field(default_factory=dict)  # "teacher" ("teacher NAME" each), "student before", "student after"
    accuracy_on: str = "the validation split"  # the table's rows (Inputs.validation_title)
    data: dict[str, Any] = field(default_factory=dict)  # items skipped and turns dropped (loader.DataReport)


def distill(
    recipe: Recipe,
    inputs: Inputs,
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
    out = Path(recipe.train.output_dir)
    accelerator = accelerator or make_accelerator(recipe)
    if accelerator.is_main_process:
        ckpt.check_output_dir(out, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()
    with tracking(recipe, accelerator, reporter, enabled=not prefix) as track:  # (a prerequisite run is not tracked)
        result = _run(recipe, inputs, accelerator, out, resume=resume, reporter=reporter, prefix=prefix)
        track.summary(result.accuracy)
    return result


def _run(recipe: Recipe, inputs: Inputs, accelerator, out: Path, *, resume: bool, reporter, prefix: str) -> RunResult:
    from accelerate.utils import set_seed

    remaining, found = _what_is_left(recipe, out, resume, reporter)
    if recipe.loss.kd and "distill" in remaining:  # before any weights load: a 78B teacher takes minutes
        check_kd_pair(recipe, inputs)
    student, export_dtype = _load_student(recipe, inputs, accelerator)
    needs_teacher = any(s in TEACHER_STAGES for s in remaining)
    views = recipe.teacher_views() if needs_teacher else []
    online = [v for v in views if v.recipe.teacher.cache is None]
    shard_t, shard_s = teacher_sharded(recipe, accelerator) and bool(online), student_sharded(recipe, accelerator)
    mesh = device_mesh(accelerator, recipe.parallel.shard_group) if shard_t or shard_s else None
    parts = [_load_teacher(v, inputs, accelerator, student, shard_t, mesh, reporter) for v in views]
    if parts:
        if found is not None:
            check_teachers(found, parts)
        set_seed(recipe.train.seed)  # each Recalibrator starts from the seed, in the recipe's order of teachers
        for part in parts if recipe.uses_recalibrator else ():
            part.recalibrator = _recalibrator(part.recipe, part.vlm, student, accelerator)
    if found is not None and (found.path / "student").is_dir():  # a sharded checkpoint loads in its stage
        _load_state(found.path, student, parts)

    result = RunResult(out, out / "student", accuracy_on=inputs.validation_title)
    if inputs.validation is not None:
        for part in parts:
            if part.cached:
                if reporter is not None:
                    reporter.note(f"{part.title} accuracy skipped: its features come from a cache "
                                  f"({part.recipe.teacher.cache})", style="yellow")
            else:  # sharded: every process generates in step (each forward gathers)
                result.accuracy[part.title] = _accuracy(part.vlm, inputs, recipe, accelerator, synced=part.sharded)
        if found is None:  # the student as it came in, before any stage of this run
            result.accuracy["student before"] = _accuracy(student, inputs, recipe, accelerator)

    blank = ({k: v.to(accelerator.device) for k, v in student.blank_image_inputs().items()}
             if accelerator.num_processes > 1 else None)
    module = trained_module(student, parts, recipe, blank)
    if shard_s:
        shard_trainable(module, mesh, compute_dtype(recipe))
    with StopRequests() as stop:
        run = Run(recipe, accelerator, student, parts, inputs.train, module=module, reporter=reporter, stop=stop,
                  data_report=DataReport())
        parts = module = None  # the run owns them now, and drops them when no later stage needs them
        _train_stages(run, remaining, found, result, prefix, shard_s)
    result.data = run.data_report.to_dict()
    note = run.data_report.summary(len(inputs.train) if hasattr(inputs.train, "__len__") else None,
                                   recipe.data.max_length)
    if note and reporter is not None:  # once per run, every stage's and process's, each row once
        reporter.note(f"data: {note}", style="yellow")
    if shard_s:  # the trained student whole again, on every process, for the accuracy and the export
        student = _whole_student(run, inputs, recipe, accelerator)
    run = None
    if inputs.validation is not None:
        result.accuracy["student after"] = _accuracy(student, inputs, recipe, accelerator)
    _export(result, student, export_dtype, recipe, accelerator, reporter)
    return result


def _what_is_left(recipe: Recipe, out: Path, resume: bool, reporter) -> tuple[list[str], ckpt.Found | None]:
    """Every enabled stage, or (resume) what follows the last checkpoint; and that checkpoint."""
    remaining = recipe.stages.enabled()
    found = ckpt.latest_checkpoint(out) if resume else None
    if found is not None:
        later = [s for s in remaining if ckpt.STAGES.index(s) > ckpt.STAGES.index(found.stage)]
        remaining = later if found.finished else [found.stage, *later]
        if reporter is not None:
            reporter.note(f"resuming after {found.stage} step {found.step}/{found.meta.get('total_steps')} ({found.path})")
    return remaining, found


def _load_student(recipe: Recipe, inputs: Inputs, accelerator):
    """The student in fp32 (master weights) whatever it was stored in, and the dtype it is
    exported back in."""
    from ..models import ProcessorSettings, load_vlm

    student = load_vlm(inputs.student, revision=recipe.student.revision, dtype=recipe.student.dtype,
                       trust_remote_code=recipe.student.trust_remote_code,
                       settings=ProcessorSettings.of(recipe, "student"))
    export_dtype = student.model.dtype
    student.model.to(device=accelerator.device, dtype=MASTER_DTYPE)
    if recipe.train.gradient_checkpointing:
        _checkpoint_activations(student.model)
    return student, export_dtype


def _load_teacher(view: TeacherView, inputs: Inputs, accelerator, student, shard: bool, mesh, reporter) -> TeacherPart:
    """One frozen teacher in its recipe dtype (only its head where its features come from the
    cache), replicated or sharded, with the source of its features."""
    from ..models import ProcessorSettings, load_head_only, load_vlm

    recipe = view.recipe
    spec, path = recipe.teacher, inputs.teachers.get(view.name, inputs.teacher)
    settings = ProcessorSettings.of(recipe, "teacher")
    shard = shard and spec.cache is None
    if spec.cache is not None:
        ids_only = read_index(spec.cache).get("answers") == "ids"  # then the input embeddings are needed too
        teacher = load_head_only(path, revision=spec.revision, dtype=spec.dtype,
                                 trust_remote_code=spec.trust_remote_code, embeddings=ids_only, settings=settings)
        # (after the head loads: a hub teacher's commit is then in this machine's hub cache)
        cache = CacheReader(spec.cache, lambda rows: fingerprint(recipe, path, inputs.held_out, rows))
        teacher.head.to(accelerator.device)
        if ids_only:
            teacher.input_embeddings.to(accelerator.device)
        source = CachedTeacher(cache, teacher.input_embeddings if ids_only else None, view.side)
        if reporter is not None:
            reporter.note(f"{view.title} features from the cache {spec.cache} (stored as {cache.storage}, "
                          f"rows {cache.rows}, answers {cache.answers}"
                          + ("" if cache.with_question else "; without question features: L_reg is off") + ")")
    else:  # sharded: only the main process reads the weights, the others receive their shards
        teacher = load_vlm(path, revision=spec.revision, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code,
                           empty=shard and not accelerator.is_main_process, settings=settings)
        source = OnlineTeacher(teacher, recipe.recalibrator.answer_input, view.side)
    teacher.model.requires_grad_(False)
    _warn_if_swapped(teacher, student, reporter)
    if shard:
        shard_teacher(teacher, accelerator, mesh)
    elif spec.cache is None:
        teacher.model.to(accelerator.device)
    return TeacherPart(view, teacher, source, shard)


def check_teachers(found: ckpt.Found, parts: list[TeacherPart]) -> None:
    """A resumed run has the checkpoint's teachers, in its order (each Recalibrator is its teacher's)."""
    saved = found.meta.get("teachers", ["teacher"])  # (one teacher: no names saved)
    now = saved_names(parts).get("teachers", ["teacher"])
    if saved != now:
        raise GenrecalError(f"the checkpoint {found.path} was written with the teachers {', '.join(saved)}; this "
                            f"recipe has {', '.join(now)}. Resume with the same [[teachers]], or start over with "
                            "--overwrite")


def _recalibrator(recipe: Recipe, teacher, student, accelerator) -> Recalibrator:
    rec = Recalibrator(teacher.hidden_size, student.text_config, student.decoder_layer_class,
                       num_blocks=recipe.recalibrator.num_blocks, new_positions=recipe.recalibrator.new_positions,
                       answer_dropout=recipe.recalibrator.answer_dropout)
    return rec.to(device=accelerator.device, dtype=MASTER_DTYPE)


def _train_stages(run: Run, remaining: list[str], found, result: RunResult, prefix: str, shard_s: bool) -> None:
    """Each remaining stage in order (the first from its checkpoint, when resuming mid-stage),
    releasing what a finished stage held."""
    from accelerate.utils import set_seed

    recipe, accelerator = run.recipe, run.accelerator
    for stage in remaining:
        set_seed(recipe.train.seed + ckpt.STAGES.index(stage))
        from_ckpt = found if (found is not None and not found.finished and found.stage == stage) else None
        result.stages[stage] = run_stage(run, stage, resume=from_ckpt, label=prefix + stage)
        # Release what the finished stage held: its optimizer, wrappers and (when no later
        # stage needs them) the teacher and the Recalibrator.
        accelerator.free_memory()
        if not any(s in TEACHER_STAGES for s in remaining[remaining.index(stage) + 1 :]):
            run.teachers = []
            if not shard_s:  # a sharded Recalibrator stays registered with the sharded root
                run.module.drop_recalibrators()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _export(result: RunResult, student, export_dtype, recipe: Recipe, accelerator, reporter) -> None:
    """The trained student, in the dtype it came in, as a plain folder with the run's record."""
    out = result.output_dir
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        student.model.to(dtype=export_dtype)
        ckpt.export_student(out, student.model, student.exportable_processor,
                            {"recipe": recipe.to_dict(), "stages": result.stages, "accuracy": result.accuracy,
                             "accuracy_on": result.accuracy_on, "data": result.data})
        if reporter is not None:
            reporter.note(f"student exported to {out / 'student'}")
    accelerator.wait_for_everyone()


def student_sharded(recipe: Recipe, accelerator) -> bool:
    return recipe.parallel.student == "shard" and accelerator.num_processes > 1


def _whole_student(run: Run, inputs: Inputs, recipe: Recipe, accelerator):
    """A plain (unsharded) copy of the sharded student's trained weights on every process."""
    from ..models import ProcessorSettings, load_vlm

    state = sub_state(full_state(run.module, everywhere=True), "student")
    run.module = run.student = None
    gc.collect()
    plain = load_vlm(inputs.student, revision=recipe.student.revision, dtype="float32",
                     trust_remote_code=recipe.student.trust_remote_code, empty=True,
                     settings=ProcessorSettings.of(recipe, "student"))
    plain.model.load_state_dict(state, assign=True)
    plain.model.tie_weights()
    plain.model.to(accelerator.device)
    return plain


def _accuracy(vlm, inputs: Inputs, recipe: Recipe, accelerator, synced: bool = False) -> dict:
    """Greedy accuracy on the validation rows, every process answering its share (`synced`: a
    sharded model, whose processes generate in step)."""
    was_training = vlm.model.training
    vlm.model.eval()
    with accelerator.autocast():
        result = accuracy(vlm, inputs.validation, spec=recipe.data, accelerator=accelerator, score=inputs.score,
                          synced=synced)
    vlm.model.train(was_training)
    return result.to_dict()


def _load_state(folder: Path, student, parts: list[TeacherPart]) -> None:
    from transformers import AutoModelForImageTextToText

    saved = AutoModelForImageTextToText.from_pretrained(folder / "student", use_safetensors=True, dtype=MASTER_DTYPE)
    student.model.load_state_dict(saved.state_dict())
    ckpt.load_recalibrators(folder, recalibrator_files(parts))


def _checkpoint_activations(model) -> None:
    """Recompute the model's decoder layers in backward instead of keeping their activations."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_kd_pair(recipe: Recipe, inputs: Inputs) -> None:
    """loss.kd compares the two heads' distributions id by id: refuse a pair whose vocabularies differ."""
    from transformers import AutoTokenizer

    from ..errors import GenrecalError

    def vocab(path: str, spec) -> dict[str, int]:
        return AutoTokenizer.from_pretrained(path, revision=spec.revision,
                                             trust_remote_code=spec.trust_remote_code).get_vocab()

    t, s = vocab(inputs.teacher, recipe.teacher), vocab(inputs.student, recipe.student)
    if t != s:
        shared = sum(1 for k, v in s.items() if t.get(k) == v)
        raise GenrecalError(
            f"loss.kd: the teacher ({recipe.teacher.path}, {len(t):,} tokens) and the student ({recipe.student.path}, "
            f"{len(s):,} tokens) have different vocabularies ({shared:,} tokens at the same id); classic KD needs one "
            "tokenizer: use GenRecal (loss.ar, loss.kl: the default) or ULD (loss.uld) across tokenizers")


def _warn_if_swapped(teacher, student, reporter) -> None:
    t = sum(p.numel() for p in teacher.model.parameters())
    s = sum(p.numel() for p in student.model.parameters())
    if t < s and reporter is not None:
        reporter.note(
            f"warning: the teacher ({t:,} parameters) is smaller than the student ({s:,}); "
            "are [teacher] and [student] swapped?", style="yellow"
        )
