"""The memory plan of `genrecal distill RECIPE --dry-run --gpus N --gpu-memory GIB`: each stage's
estimate (estimate.py) with a margin, whether it fits one GPU, the smallest recipe change
that makes it fit, shown as a table. Standard library only at import time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from ...errors import GenrecalError
from .estimate import ANSWER_TOKENS, CHUNK, Job, Settings, StageMemory, TeacherJob, estimate, recalibrator_params
from .model_shape import DTYPE_BYTES, ModelShape, read_shape

GIB = 2**30
MARGIN = 0.10  # of the estimate, for the allocator's fragmentation
CONTEXT_GIB = 1.5  # CUDA context, NCCL and allocator reserve


# ---------------------------------------------------------------------------------------------
# the plan and its verdict


@dataclass
class Plan:
    """Every enabled stage's memory per GPU, the verdict, and the smallest change that fits."""

    recipe: str
    gpu_memory_gib: float
    job: Job
    settings: Settings
    stages: list
    suggestion: Optional[dict] = None  # {"changes": [...], "set": [...], "gpus": N, "needed_gib": x}
    notes: list = field(default_factory=list)
    worst_needed: Optional[int] = None  # with measured lengths: what every item at data.max_length needs

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda m: m.total)

    @property
    def needed(self) -> int:
        return needed(self.peak.total)

    @property
    def fits(self) -> bool:
        return self.needed <= self.gpu_memory_gib * GIB

    def to_dict(self) -> dict[str, Any]:
        models = {"student": _model_dict(self.job.student)}
        if self.job.others:  # several [[teachers]]: each by name
            models["teachers"] = {t.name: {**_model_dict(t.shape), "recalibrator_params": t.rec_params}
                                  for t in self.job.teachers()}
        elif self.job.teacher is not None:
            models["teacher"] = _model_dict(self.job.teacher)
        return {
            "recipe": self.recipe, "gpus": self.settings.gpus, "gpu_memory_gib": self.gpu_memory_gib,
            "margin": {"fraction": MARGIN, "context_gib": CONTEXT_GIB}, "models": models,
            "recalibrator_params": self.job.rec_params, "settings": _settings_dict(self.settings),
            "stages": {m.stage: {"static": m.static, "phases": m.phases, "peak_phase": m.peak_phase, "total_bytes": m.total,
                                 "needed_bytes": needed(m.total), "student_activations_other_checkpointing": m.other_checkpointing}
                       for m in self.stages},
            "peak_stage": self.peak.stage, "peak_bytes": self.peak.total, "needed_bytes": self.needed,
            "fits": self.fits, "suggestion": self.suggestion, "assumptions": assumptions(self.job, self.worst_needed),
            "notes": self.notes,
            "lengths": {"used": "measured" if self.job.lengths_from else "max_length", "tokens": self.job.max_length,
                        "from": self.job.lengths_from or "data.max_length", "worst_case_needed_bytes": self.worst_needed},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def needed(total: int) -> int:
    """The estimate with the margin: 10% for fragmentation + 1.5 GiB for the CUDA context."""
    return int(total * (1 + MARGIN) + CONTEXT_GIB * GIB)


def assumptions(job: Job, worst_needed: int | None = None) -> list[str]:
    if job.lengths_from:
        lengths = (f"items of {job.max_length} tokens on each side ({job.lengths_from}); the worst case, every item "
                   f"at data.max_length ({job.recipe_max_length}), needs {(worst_needed or 0) / GIB:.1f} GiB per GPU "
                   "(a batch holding a longer item needs up to that)")
    else:
        lengths = (f"every item fills data.max_length ({job.max_length}) tokens on each side; the vision tower sees "
                   "up to max_length image tokens' worth of patches")
    cached = (["the teacher's features from its cache (teacher.cache): only its LM head"
               + (" and input embeddings" if job.teacher_embeddings else "") + " loaded, no teacher forward"]
              if job.teacher_cached else [])
    return [
        lengths, *cached,
        f"answers of up to {ANSWER_TOKENS} tokens per item (the loss rows; the logits chunk is at most {CHUNK} rows)",
        ("fp32 compute (train.precision fp32)" if job.act_bytes == 4 else "bf16 autocast (train.precision auto on GPU, "
         "bf16, fp16)") + ", SDPA attention (no s x s scores kept)",
        "sharded models: FSDP2 units are decoder layers and vision blocks; the rest (embeddings, projector, norms; "
        "the student's head) is the root, gathered for the whole forward; the next unit is prefetched",
        f"margin: {MARGIN:.0%} of the estimate (allocator fragmentation) + {CONTEXT_GIB} GiB (CUDA context, NCCL)",
        "not planned: the before/after accuracy generation and a ULD loss term",
    ]


def make_plan(recipe, gpus: int, gpu_memory_gib: float, measured: tuple[int, str] | None = None) -> Plan:
    """The memory plan of `recipe` on `gpus` GPUs of `gpu_memory_gib` each, with a suggestion
    when it does not fit. Reads configs (and safetensors headers); loads no weights. `measured`:
    (tokens per item, where from), the data preflight's p99, planned instead of data.max_length
    when shorter; the worst case is stated beside it."""
    if gpus < 1:
        raise GenrecalError(f"--gpus {gpus}: give at least 1")
    if gpu_memory_gib <= 0:
        raise GenrecalError(f"--gpu-memory {gpu_memory_gib}: give the memory of one GPU in GiB, e.g. 80")
    stages = tuple(recipe.stages.enabled())
    needs_teacher = any(stage in ("align", "distill") for stage in stages)
    views = recipe.teacher_views() if needs_teacher else []
    shapes = [read_shape(v.recipe.teacher, v.table) for v in views]  # (the teachers' errors first)
    student = read_shape(recipe.student, "student")
    teachers = [_teacher_job(v, shape, student) for v, shape in zip(views, shapes)]
    first = teachers[0] if teachers else None
    job = Job(
        teacher=first.shape if first else None, student=student, stages=stages, max_length=recipe.data.max_length,
        act_bytes=4 if recipe.train.precision == "fp32" else 2,
        teacher_bytes=first.bytes if first else DTYPE_BYTES["bfloat16"],
        teacher_exact_bytes=first.exact_bytes if first else None,
        rec_params=first.rec_params if first else 0,
        num_blocks=first.num_blocks if first else recipe.recalibrator.num_blocks,
        reg={"align": True, "distill": recipe.stages.distill.reg},  # objective.py: align always runs the L_reg pass
        train_projector={"distill": recipe.stages.distill.train_projector},
        probe_items=recipe.train.probe_items if recipe.train.probe_every else 0,
        teacher_cached=bool(first and first.cached),
        teacher_embeddings=bool(first and first.embeddings),
        first_name=first.name if first else "",
        others=tuple(teachers[1:]),
    )
    par = recipe.parallel
    settings = Settings(gpus, par.teacher == "shard", par.student == "shard", par.shard_group,
                        recipe.train.gradient_checkpointing,
                        tuple((stage, getattr(recipe.stages, stage).batch_size) for stage in stages),
                        tuple((stage, getattr(recipe.stages, stage).grad_accum) for stage in stages))
    worst = None
    if measured is not None and measured[0] < job.max_length:
        worst = needed(max(estimate(job, settings, stage).total for stage in stages))
        job = replace(job, max_length=measured[0], lengths_from=measured[1], recipe_max_length=job.max_length)
    plan = Plan(recipe.origin, gpu_memory_gib, job, settings, [estimate(job, settings, stage) for stage in stages],
                worst_needed=worst)
    if gpus > 1 and (par.teacher == "shard" or par.student == "shard") and settings.group(True) == 1:
        plan.notes.append("parallel.shard_group = 1: sharding over 1 process changes nothing")
    if par.shard_group and gpus % par.shard_group:
        plan.notes.append(f"parallel.shard_group = {par.shard_group} does not divide {gpus} GPUs: the run refuses it")
    if not plan.fits:
        plan.suggestion = suggest(job, settings, gpu_memory_gib)
    return plan


def _teacher_job(view, shape: ModelShape, student: ModelShape) -> TeacherJob:
    """One teacher's facts for the plan (`shape`: read from its config)."""
    recipe = view.recipe
    auto = recipe.teacher.dtype == "auto"
    return TeacherJob(view.name if view.several else "", shape, DTYPE_BYTES.get(shape.dtype if auto else recipe.teacher.dtype, 4),
                      shape.weight_bytes if auto else None, bool(recipe.teacher.cache),
                      bool(recipe.teacher.cache and _id_only(recipe)),
                      recalibrator_params(shape, student, recipe.recalibrator.num_blocks) if recipe.uses_recalibrator else 0,
                      recipe.recalibrator.num_blocks)


def _id_only(recipe) -> bool:
    """Whether the recipe's teacher cache keeps answer ids (its index says; a cache not written
    yet: what `genrecal teach` writes by default, ids under answer_input = "embeddings")."""
    index = Path(recipe.teacher.cache).expanduser() / "index.json"
    if index.is_file():
        try:
            return json.loads(index.read_text()).get("answers") == "ids"
        except ValueError:
            pass
    return recipe.recalibrator.answer_input == "embeddings"


def _fits(job: Job, s: Settings, gib: float) -> bool:
    return all(needed(estimate(job, s, stage).total) <= gib * GIB for stage in job.stages)


def _peak(job: Job, s: Settings) -> int:
    return max(estimate(job, s, stage).total for stage in job.stages)


def _shard_teacher(job, s, gib):
    uses_teacher = any(stage in job.stages for stage in ("align", "distill"))
    online = any(not t.cached for t in job.teachers())
    if job.teacher is not None and not s.teacher_shard and s.gpus > 1 and uses_teacher and online:
        return replace(s, teacher_shard=True), ["parallel.teacher=shard"]


def _shard_student(job, s, gib):
    if not s.student_shard and s.gpus > 1:
        return replace(s, student_shard=True), ["parallel.student=shard"]


def _checkpointing(job, s, gib):
    if not s.checkpointing and any(stage in job.stages for stage in ("distill", "finetune")):
        return replace(s, checkpointing=True), ["train.gradient_checkpointing=true"]


def _smaller_batch(job, s, gib):
    """Halve the batch (doubling grad_accum, the same global batch) of each stage that does not
    fit, down to 1."""
    batch, accum, sets = dict(s.batch), dict(s.accum), []
    for stage in job.stages:
        while (batch[stage] > 1
               and needed(estimate(job, replace(s, batch=tuple(batch.items())), stage).total) > gib * GIB):
            batch[stage], accum[stage] = (batch[stage] + 1) // 2, accum[stage] * 2
        if batch[stage] != dict(s.batch)[stage]:
            sets += [f"stages.{stage}.batch_size={batch[stage]}", f"stages.{stage}.grad_accum={accum[stage]}"]
    if sets:
        return replace(s, batch=tuple(batch.items()), accum=tuple(accum.items())), sets


def _more_gpus(job, s, gib):
    """The fewest GPUs (doubling, up to 64x) that fit; only sharded copies shrink with them."""
    if not (s.teacher_shard or s.student_shard) or s.shard_group:
        return None
    for k in range(1, 7):
        more = replace(s, gpus=s.gpus * 2**k)
        if _fits(job, more, gib):
            return more, []


CHANGES = (("shard the teacher", _shard_teacher), ("shard the student", _shard_student),
           ("gradient checkpointing", _checkpointing), ("smaller batch_size, larger grad_accum", _smaller_batch),
           ("more GPUs", _more_gpus))


def suggest(job: Job, s: Settings, gib: float) -> dict:
    """The smallest change that fits: the first of CHANGES that fits alone, else CHANGES applied
    one after another in that order until the plan fits; each one re-estimated, not guessed."""
    for name, change in CHANGES:
        got = change(job, s, gib)
        if got and _fits(job, got[0], gib):
            return _suggestion([name], got[0], got[1], job)
    names, sets, current = [], [], s
    for name, change in CHANGES:
        got = change(job, current, gib)
        if got:
            names, sets, current = names + [name], sets + got[1], got[0]
            if _fits(job, current, gib):
                return _suggestion(names, current, sets, job)
    return {"changes": [], "set": [], "gpus": s.gpus, "needed_gib": None, "fits": False,
            "text": "nothing the plan can change fits: larger GPUs, a smaller max_length or a smaller student"}


def _suggestion(names: list, s: Settings, sets: list, job: Job) -> dict:
    need = needed(_peak(job, s)) / GIB
    how = " ".join(f"--set {x}" for x in sets) + (f" --gpus {s.gpus}" if "more GPUs" in names else "")
    return {"changes": names, "set": sets, "gpus": s.gpus, "needed_gib": round(need, 1), "fits": True,
            "text": f"{' + '.join(names)} ({how.strip()}): {need:.1f} GiB needed per GPU"}


def _model_dict(m: ModelShape) -> dict:
    return {"source": m.source, "family": m.family, "params": m.total, "parts": m.parts, "counted": m.counted,
            "dtype": m.dtype, "largest_unit": m.unit, "note": m.note}


def _settings_dict(s: Settings) -> dict:
    out = asdict(s)
    out["batch"], out["accum"] = dict(s.batch), dict(s.accum)
    return out


# ---------------------------------------------------------------------------------------------
# display

_PHASE_TITLES = {"teacher forward": "while the teacher runs (no grad)", "student forward + backward": "while the student trains",
                 "optimizer step": "optimizer step", "reliance probe": "reliance probe (every train.probe_every steps)"}


def render(plan: Plan, console) -> None:
    """The plan as a rich table (GiB per GPU, one column per stage) and a verdict line."""
    from rich.table import Table

    s = plan.settings
    unit, unit_name = (GIB, "GiB") if plan.peak.total >= 4 * GIB else (2**20, "MiB")
    gib = lambda b: f"{b / unit:.1f}"  # noqa: E731
    placement = (f"teacher {'sharded' if s.group(s.teacher_shard) > 1 else 'whole'}, student "
                 f"{'sharded' if s.group(s.student_shard) > 1 else 'whole'}, checkpointing {'on' if s.checkpointing else 'off'}")
    table = Table(title=f"memory plan per GPU ({unit_name}): {s.gpus} GPU{'s' if s.gpus > 1 else ''} of {plan.gpu_memory_gib:g} GiB; "
                  f"{placement}", header_style="bold", title_style="bold")
    table.add_column("")
    for m in plan.stages:
        table.add_column(f"{m.stage} (batch {dict(s.batch)[m.stage]})", justify="right")

    def row(label, values, style=None):
        table.add_row(label, *[v if isinstance(v, str) else (gib(v) if v else "-") for v in values], style=style)

    for key in dict.fromkeys(k for m in plan.stages for k in m.static):
        row(key, [m.static.get(key, 0) for m in plan.stages])
    for phase in dict.fromkeys(p for m in plan.stages for p in m.phases):
        table.add_section()
        row(_PHASE_TITLES.get(phase, phase), ["" for _ in plan.stages], style="italic")
        for key in dict.fromkeys(k for m in plan.stages for k in m.phases.get(phase, {})):
            row(f"  {key}", [m.phases.get(phase, {}).get(key, 0) for m in plan.stages])
        row("  subtotal (* the largest phase)", [
            (gib(sum(m.phases[phase].values())) + (" *" if m.peak_phase == phase else "")) if phase in m.phases else "-"
            for m in plan.stages], style="dim")
    table.add_section()
    row("total: static + the largest phase", [m.total for m in plan.stages], style="bold")
    row(f"needed: + {MARGIN:.0%} + {CONTEXT_GIB:g} GiB (CUDA context)", [needed(m.total) for m in plan.stages], style="bold")
    row(f"  (student activations with checkpointing {'off' if s.checkpointing else 'on'})",
        [m.other_checkpointing if m.stage != "align" else 0 for m in plan.stages], style="dim")
    console.print(table)
    models = [(f"teacher {t.name}" if t.name else "teacher", t.shape) for t in plan.job.teachers()]
    for role, m in (*models, ("student", plan.job.student)):
        console.print(f"{role} [bold]{m.source}[/]: {m.family}, {_count(m.total)} parameters ({m.counted}), "
                      f"largest unit {_count(m.unit)}" + (f"; {m.note}" if m.note else ""))
    for t in plan.job.teachers():
        if t.rec_params:
            console.print(f"Recalibrator{' of teacher ' + t.name if t.name else ''}: {_count(t.rec_params)} parameters "
                          f"({t.num_blocks} student decoder layers + projections)")
    for note in plan.notes:
        console.print(f"[yellow]note[/]: {note}")
    peak = plan.peak
    head = f"{peak.stage} needs {plan.needed / GIB:.1f} GiB of {plan.gpu_memory_gib:g} GiB per GPU"
    if plan.fits:
        console.print(f"[bold green]fits[/]: {head}")
    else:
        console.print(f"[bold red]does not fit[/]: {head}; smallest change that fits: {plan.suggestion['text']}")
    console.print(f"[dim]assumes {'; '.join(assumptions(plan.job, plan.worst_needed)[:2])}[/]", soft_wrap=True)


def _count(n: int) -> str:
    return next(f"{n / d:.{p}f}{u}" for d, u, p in ((1e9, "B", 2), (1e6, "M", 0), (1e3, "k", 0), (1, "", 0)) if n >= d or d == 1)
