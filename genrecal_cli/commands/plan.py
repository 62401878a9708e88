"""The memory plan of `genrecal distill RECIPE --dry-run --gpus N --gpu-memory GIB`: what one GPU
holds in each stage, from the two models' config.json (and safetensors headers) before anything
loads, and the smallest recipe change that makes a plan fit. Standard library only at import time.

What a GPU holds (bytes), stage by stage, as the engine places things (engine/distill.py,
stages.py, parallel.py):

* static: the teacher in its recipe dtype (sharded: the inner model / group size + its LM head
  whole); the whole student as fp32 masters; fp32 gradients + AdamW's two fp32 states of what
  the stage trains (stages.set_trainable); the Recalibrator (16 B/param); DDP's gradient buckets
  (4 B per trained param on > 1 process: accelerate keeps gradient_as_bucket_view off).
* then the largest of the phases of a step, which never overlap:
  - teacher forward (no grad): FSDP's gathered parameters (the root's leftovers: embeddings,
    projector, norms, for the whole forward; plus the current and the prefetched next unit), one
    layer's working set, and the fp32 teacher features;
  - student forward/backward: the features, the student's activations, autocast's bf16 copies of
    the weights that train (kept for backward), the Recalibrator's activations, the logits chunk
    of the losses, and (student sharded) FSDP's gathered root + two units + one unit's grads in the compute dtype (instead of
    autocast's copies);
  - optimizer step: foreach AdamW's sqrt(v) buffer (4 B per trained param);
  - the reliance probe (align, distill): train.probe_items items through the teacher, the
    student and three Recalibrator passes at once, their logits unchunked.

Activations per token, T = batch_size x data.max_length tokens per micro-batch and side, for an
HF Llama/Qwen2 decoder layer of hidden h, attention width q (= heads x head_dim; SDPA repeats k
and v to every head), MLP width i, in element size e (2 under bf16 autocast, 4 in fp32), on the
engine's fp32 residual stream; counted from the tensors PyTorch saves for backward:
    a_layer = 16h (2 RMSNorms: fp32 input + normalised) + c.e.h (linear inputs; autocast casts
    them per op: c = 5 in bf16, c = 2 in fp32 where q/k/v and gate/up share one) + 4.e.q (SDPA's
    q, k, v, output) + 4.e.i (gate, up, act(gate), product) = 34h + 8i bytes in bf16.
That is Korthikanti et al. (2022)'s s.b.h.(34 + 5.a.s/h) with the attention-score term dropped
(SDPA keeps no s x s scores) and the MLP generalised to SwiGLU of width i. Plus 16h + e.S per
token for the whole model (embeddings, final norm, output; the [B,1,S,S] mask). With gradient
checkpointing: 4h per layer (each layer's fp32 input) + one layer recomputed. The logits chunk
(losses.py, up to 1024 rows): 27 x rows x V bytes for L_ar + L_kl in bf16 (31 in fp32) and 14 x
rows x V for L_sft, measured (bench/plan.py), plus the teacher logits each checkpointed chunk keeps.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

from ..errors import GenrecalError
from .model_shape import DTYPE_BYTES, Decoder, ModelShape, read_shape

GIB = 2**30
CHUNK = 1024  # rows per logits chunk (losses.py)
ANSWER_TOKENS = 256  # answer tokens per item assumed (the loss rows); ChartQA's are under 10
MARGIN = 0.10  # of the estimate, for the allocator's fragmentation
CONTEXT_GIB = 1.5  # CUDA context, NCCL and allocator reserve
K_REC = {2: 27, 4: 31}  # bytes per (row x teacher vocab) of one L_ar + L_kl chunk, by logits size
K_SFT = 14  # bytes per (row x student vocab) of one L_sft chunk
def recalibrator_params(teacher: ModelShape, student: ModelShape, num_blocks: int) -> int:
    """proj_pre (d_l x d_s, no bias) + num_blocks student decoder layers + proj_post + LayerNorm(d_l)."""
    d_l, d_s = teacher.text.hidden, student.text.hidden
    return 2 * d_l * d_s + num_blocks * student.text.layer_params() + 2 * d_l


# ---------------------------------------------------------------------------------------------
# the estimate


def layer_activations(dec: Decoder, e: int) -> int:
    """Bytes one decoder layer keeps for backward per token (module docstring): 34h + 8i in bf16."""
    casts = 5 * e if e == 2 else 2 * 4
    return 16 * dec.hidden + casts * dec.hidden + 4 * e * dec.q_width + 4 * e * dec.intermediate


def _working_set(hidden: int, intermediate: int, e: int) -> int:
    """Bytes per token while one layer runs without grad: fp32 norm temporaries, the residual and
    norm output, and act(gate), up and their product alive at once."""
    return 8 * hidden + e * (2 * hidden + 3 * intermediate)


@dataclass(frozen=True)
class Job:
    """What the plan knows of a recipe, apart from the settings a suggestion may change."""

    teacher: Optional[ModelShape]
    student: ModelShape
    stages: tuple  # enabled stage names, in order
    max_length: int
    act_bytes: int  # element size of activations: 2 under bf16/fp16 autocast, 4 in fp32
    teacher_bytes: int  # the teacher's weight dtype
    teacher_exact_bytes: Optional[int]  # dtype "auto" with safetensors headers: the stored bytes
    rec_params: int  # 0: no Recalibrator
    num_blocks: int
    reg: dict  # stage -> the L_reg path runs (a second Recalibrator pass)
    train_projector: dict  # stage -> distill also trains the projector
    probe_items: int  # 0: no reliance probe


@dataclass(frozen=True)
class Settings:
    """What a suggestion may change: placement, checkpointing, batch layout, GPUs."""

    gpus: int
    teacher_shard: bool
    student_shard: bool
    shard_group: Optional[int]
    checkpointing: bool
    batch: tuple  # ((stage, batch_size), ...)
    accum: tuple  # ((stage, grad_accum), ...)

    def group(self, sharded: bool) -> int:
        """Processes one copy is sharded over (1: whole on every GPU)."""
        return min(self.shard_group or self.gpus, self.gpus) if sharded and self.gpus > 1 else 1


@dataclass
class StageMemory:
    """One stage's bytes per GPU: what stays, and the phases of a step (the largest counts)."""

    stage: str
    static: dict
    phases: dict  # phase -> {component: bytes}
    other_checkpointing: int  # student activations with train.gradient_checkpointing flipped

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: sum(self.phases[p].values()))

    @property
    def total(self) -> int:
        return sum(self.static.values()) + sum(self.phases[self.peak_phase].values())


def estimate(job: Job, s: Settings, stage: str) -> StageMemory:
    """Bytes one GPU holds in `stage` under settings `s` (see the module docstring)."""
    t, st, e, S = job.teacher, job.student, job.act_bytes, job.max_length
    batch = dict(s.batch)[stage]
    tokens = batch * S
    rows = batch * min(S, ANSWER_TOKENS)
    chunk = min(rows, CHUNK)
    gt, gs = s.group(s.teacher_shard), s.group(s.student_shard)
    with_teacher = t is not None and stage in ("align", "distill")
    rec = job.rec_params if with_teacher else 0
    trains = _trained(st, stage, job.train_projector.get(stage, False))
    static: dict[str, float] = {}
    phases: dict[str, dict[str, float]] = {}
    if with_teacher:
        b = job.teacher_bytes
        if gt > 1:
            static[f"teacher weights (1/{gt} + LM head whole)"] = b * ((t.total - t.parts["head"]) / gt + t.head_whole)
        else:
            static["teacher weights"] = job.teacher_exact_bytes or b * t.total
    static["student weights (fp32 masters)"] = 4 * st.total / gs
    static["student grads + AdamW states (fp32)"] = 12 * trains / gs
    if rec:
        static["Recalibrator: weights, grads, states"] = 16 * rec / gs
    if s.gpus > 1 and not s.student_shard and trains + rec:
        static["DDP gradient buckets"] = 4 * (trains + rec)

    d_s, V_s = st.text.hidden, st.text.vocab
    a_layer = layer_activations(st.text, e)
    student: dict[str, float] = {}
    if stage == "align":  # the student runs without grad: only its output stays
        acts = other = 4 * d_s * tokens
    else:
        whole = st.text.layers * a_layer + 16 * d_s + e * S
        ckpt = st.text.layers * 4 * d_s + a_layer + 16 * d_s + e * S
        acts, other = (ckpt * tokens, whole * tokens) if s.checkpointing else (whole * tokens, ckpt * tokens)
    student["student activations"] = acts
    sharded_student = s.student_shard and gs > 1
    if e == 2 and trains + rec and not sharded_student:  # sharded: FSDP gathers in bf16 instead (below)
        student["autocast bf16 copies of trained weights"] = 2 * (trains + rec)
    logits = K_SFT * chunk * V_s if stage != "align" else 0
    if with_teacher:
        d_l, V_t = t.text.hidden, t.text.vocab
        te = 2 if (e == 2 or job.teacher_bytes == 2) else 4  # the teacher computes in bf16 either way
        features = 4 * d_l * (tokens + 2 * rows)
        gathered = job.teacher_bytes * (t.root + 2 * t.unit) if gt > 1 else 0
        text_ws = _working_set(d_l, t.text.intermediate, te) + 2 * d_l
        vision_ws = t.patches_per_token * _working_set(t.vision_hidden, t.vision_intermediate, te)
        phases["teacher forward"] = {"teacher gathered (FSDP: root + 2 units)": gathered,
                                     "teacher working set (one layer at a time)": max(text_ws, vision_ws) * tokens,
                                     "teacher features (fp32, this + last batch)": 2 * features}
        student["teacher features (fp32)"] = features
        if rec:
            paths = 1 + job.reg.get(stage, False)
            per_token = job.num_blocks * (a_layer + (e * S if e == 2 else 0)) + 4 * S + 2 * d_s + 4 * d_l
            student["Recalibrator activations"] = paths * tokens * per_token
            logits = max(logits, K_REC[te] * chunk * V_t + (paths * rows - chunk) * V_t * te)
            if job.probe_items:
                n = job.probe_items * S
                r = job.probe_items * min(S, ANSWER_TOKENS)
                teacher_side = gathered + max(text_ws, vision_ws) * n
                rec_side = 4 * d_s * n + _working_set(d_s, st.text.intermediate, e) * n + 4 * S * n + 6 * d_l * n
                if s.student_shard and gs > 1:  # the probe gathers the sharded root first (stages._run_probe)
                    rec_side += 4 * (st.root + st.parts["head"]) + 2 * 4 * st.unit
                phases["reliance probe"] = {"probe: teacher features (fp32)": 4 * d_l * n,
                                            "probe: teacher pass or Recalibrator + logits":
                                                max(teacher_side, rec_side + 10 * r * V_t)}
    student["logits chunk (losses)"] = logits
    if sharded_student:  # gathered in the compute dtype (parallel.shard_trainable's mixed precision)
        rec_root = 2 * t.text.hidden * d_s + 2 * t.text.hidden if rec else 0
        student["student gathered (FSDP: root, 2 units, grads)"] = \
            e * (st.root + st.parts["head"] + rec_root) + 3 * e * st.unit
    phases["student forward + backward"] = student
    phases["optimizer step"] = {"AdamW step buffer (foreach sqrt(v))": 4 * (trains + rec) / gs}
    as_int = lambda d: {k: int(v) for k, v in d.items()}  # noqa: E731
    return StageMemory(stage, as_int(static), {p: as_int(c) for p, c in phases.items()}, int(other))


def _trained(st: ModelShape, stage: str, train_projector: bool) -> int:
    """Student parameters the stage trains (stages.set_trainable): distill the language model and
    head (+ projector), finetune all but the vision encoder, align none."""
    if stage == "align":
        return 0
    projector = st.parts["projector"] if (stage == "finetune" or train_projector) else 0
    return st.language + st.parts["head"] + projector


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
        if self.job.teacher is not None:
            models["teacher"] = _model_dict(self.job.teacher)
        return {
            "recipe": self.recipe, "gpus": self.settings.gpus, "gpu_memory_gib": self.gpu_memory_gib,
            "margin": {"fraction": MARGIN, "context_gib": CONTEXT_GIB}, "models": models,
            "recalibrator_params": self.job.rec_params, "settings": _settings_dict(self.settings),
            "stages": {m.stage: {"static": m.static, "phases": m.phases, "peak_phase": m.peak_phase, "total_bytes": m.total,
                                 "needed_bytes": needed(m.total), "student_activations_other_checkpointing": m.other_checkpointing}
                       for m in self.stages},
            "peak_stage": self.peak.stage, "peak_bytes": self.peak.total, "needed_bytes": self.needed,
            "fits": self.fits, "suggestion": self.suggestion, "assumptions": assumptions(self.job), "notes": self.notes,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def needed(total: int) -> int:
    """The estimate with the margin: 10% for fragmentation + 1.5 GiB for the CUDA context."""
    return int(total * (1 + MARGIN) + CONTEXT_GIB * GIB)


def assumptions(job: Job) -> list[str]:
    return [
        f"every item fills data.max_length ({job.max_length}) tokens on each side; the vision tower sees up to "
        "max_length image tokens' worth of patches",
        f"answers of up to {ANSWER_TOKENS} tokens per item (the loss rows; the logits chunk is at most {CHUNK} rows)",
        ("fp32 compute (train.precision fp32)" if job.act_bytes == 4 else "bf16 autocast (train.precision auto on GPU, "
         "bf16, fp16)") + ", SDPA attention (no s x s scores kept)",
        "sharded models: FSDP2 units are decoder layers and vision blocks; the rest (embeddings, projector, norms; "
        "the student's head) is the root, gathered for the whole forward; the next unit is prefetched",
        f"margin: {MARGIN:.0%} of the estimate (allocator fragmentation) + {CONTEXT_GIB} GiB (CUDA context, NCCL)",
        "not planned: the before/after accuracy generation and a ULD loss term",
    ]


def make_plan(recipe, gpus: int, gpu_memory_gib: float) -> Plan:
    """The memory plan of `recipe` on `gpus` GPUs of `gpu_memory_gib` each, with a suggestion
    when it does not fit. Reads configs (and safetensors headers); loads no weights."""
    if gpus < 1:
        raise GenrecalError(f"--gpus {gpus}: give at least 1")
    if gpu_memory_gib <= 0:
        raise GenrecalError(f"--gpu-memory {gpu_memory_gib}: give the memory of one GPU in GiB, e.g. 80")
    stages = tuple(recipe.stages.enabled())
    needs_teacher = any(st in ("align", "distill") for st in stages)
    teacher = read_shape(recipe.teacher, "teacher") if needs_teacher else None
    student = read_shape(recipe.student, "student")
    auto = recipe.teacher is not None and recipe.teacher.dtype == "auto"
    tdtype = (teacher.dtype if auto else recipe.teacher.dtype) if teacher else "bfloat16"
    job = Job(
        teacher=teacher, student=student, stages=stages, max_length=recipe.data.max_length,
        act_bytes=4 if recipe.train.precision == "fp32" else 2,
        teacher_bytes=DTYPE_BYTES.get(tdtype, 4),
        teacher_exact_bytes=teacher.weight_bytes if (teacher and auto) else None,
        rec_params=recalibrator_params(teacher, student, recipe.recalibrator.num_blocks)
        if (teacher and recipe.uses_recalibrator) else 0,
        num_blocks=recipe.recalibrator.num_blocks,
        reg={"align": True, "distill": recipe.stages.distill.reg},  # objective.py: align always runs the L_reg pass
        train_projector={"distill": recipe.stages.distill.train_projector},
        probe_items=recipe.train.probe_items if recipe.train.probe_every else 0,
    )
    par = recipe.parallel
    settings = Settings(gpus, par.teacher == "shard", par.student == "shard", par.shard_group,
                        recipe.train.gradient_checkpointing,
                        tuple((st, getattr(recipe.stages, st).batch_size) for st in stages),
                        tuple((st, getattr(recipe.stages, st).grad_accum) for st in stages))
    plan = Plan(recipe.origin, gpu_memory_gib, job, settings, [estimate(job, settings, st) for st in stages])
    if gpus > 1 and (par.teacher == "shard" or par.student == "shard") and settings.group(True) == 1:
        plan.notes.append("parallel.shard_group = 1: sharding over 1 process changes nothing")
    if par.shard_group and gpus % par.shard_group:
        plan.notes.append(f"parallel.shard_group = {par.shard_group} does not divide {gpus} GPUs: the run refuses it")
    if not plan.fits:
        plan.suggestion = suggest(job, settings, gpu_memory_gib)
    return plan


def _fits(job: Job, s: Settings, gib: float) -> bool:
    return all(needed(estimate(job, s, st).total) <= gib * GIB for st in job.stages)


def _peak(job: Job, s: Settings) -> int:
    return max(estimate(job, s, st).total for st in job.stages)


def _shard_teacher(job, s, gib):
    if job.teacher is not None and not s.teacher_shard and s.gpus > 1 and any(st in job.stages for st in ("align", "distill")):
        return replace(s, teacher_shard=True), ["parallel.teacher=shard"]


def _shard_student(job, s, gib):
    if not s.student_shard and s.gpus > 1:
        return replace(s, student_shard=True), ["parallel.student=shard"]


def _checkpointing(job, s, gib):
    if not s.checkpointing and any(st in job.stages for st in ("distill", "finetune")):
        return replace(s, checkpointing=True), ["train.gradient_checkpointing=true"]


def _smaller_batch(job, s, gib):
    """Halve the batch (doubling grad_accum, the same global batch) of each stage that does not
    fit, down to 1."""
    batch, accum, sets = dict(s.batch), dict(s.accum), []
    for st in job.stages:
        while batch[st] > 1 and needed(estimate(job, replace(s, batch=tuple(batch.items())), st).total) > gib * GIB:
            batch[st], accum[st] = (batch[st] + 1) // 2, accum[st] * 2
        if batch[st] != dict(s.batch)[st]:
            sets += [f"stages.{st}.batch_size={batch[st]}", f"stages.{st}.grad_accum={accum[st]}"]
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
    for role, m in (("teacher", plan.job.teacher), ("student", plan.job.student)):
        if m is not None:
            console.print(f"{role} [bold]{m.source}[/]: {m.family}, {_count(m.total)} parameters ({m.counted}), "
                          f"largest unit {_count(m.unit)}" + (f"; {m.note}" if m.note else ""))
    if plan.job.rec_params:
        console.print(f"Recalibrator: {_count(plan.job.rec_params)} parameters ({plan.job.num_blocks} student decoder "
                      "layers + projections)")
    for note in plan.notes:
        console.print(f"[yellow]note[/]: {note}")
    peak = plan.peak
    head = f"{peak.stage} needs {plan.needed / GIB:.1f} GiB of {plan.gpu_memory_gib:g} GiB per GPU"
    if plan.fits:
        console.print(f"[bold green]fits[/]: {head}")
    else:
        console.print(f"[bold red]does not fit[/]: {head}; smallest change that fits: {plan.suggestion['text']}")
    console.print(f"[dim]assumes {'; '.join(assumptions(plan.job)[:2])}[/]", soft_wrap=True)


def _count(n: int) -> str:
    return next(f"{n / d:.{p}f}{u}" for d, u, p in ((1e9, "B", 2), (1e6, "M", 0), (1e3, "k", 0), (1, "", 0)) if n >= d or d == 1)
