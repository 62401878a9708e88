"""What one GPU holds in each stage of a run, in bytes, from the two models' shapes (config.json,
safetensors headers) before anything loads: the arithmetic of the memory plan (plan.py).
Standard library only at import time.

What a GPU holds (bytes), stage by stage, as the engine places things (engine/distill.py,
stages.py, parallel.py):

* static: the teacher in its recipe dtype (sharded: the inner model / group size + its LM head
  whole); the whole student as fp32 masters; fp32 gradients + AdamW's two fp32 states of what
  the stage trains (trainable.set_trainable); the Recalibrator (16 B/param); DDP's gradient buckets
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

from dataclasses import dataclass
from typing import Optional

from .model_shape import Decoder, ModelShape

CHUNK = 1024  # rows per logits chunk (losses.py)
ANSWER_TOKENS = 256  # answer tokens per item assumed (the loss rows); ChartQA's are under 10
K_REC = {2: 27, 4: 31}  # bytes per (row x teacher vocab) of one L_ar + L_kl chunk, by logits size
K_SFT = 14  # bytes per (row x student vocab) of one L_sft chunk


def recalibrator_params(teacher: ModelShape, student: ModelShape, num_blocks: int) -> int:
    """proj_pre (d_l x d_s, no bias) + num_blocks student decoder layers + proj_post + LayerNorm(d_l)."""
    d_l, d_s = teacher.text.hidden, student.text.hidden
    return 2 * d_l * d_s + num_blocks * student.text.layer_params() + 2 * d_l


def layer_activations(dec: Decoder, e: int) -> int:
    """Bytes one decoder layer keeps for backward per token (module docstring): 34h + 8i in bf16."""
    casts = 5 * e if e == 2 else 2 * 4
    return 16 * dec.hidden + casts * dec.hidden + 4 * e * dec.q_width + 4 * e * dec.intermediate


def _working_set(hidden: int, intermediate: int, e: int) -> int:
    """Bytes per token while one layer runs without grad: fp32 norm temporaries, the residual and
    norm output, and act(gate), up and their product alive at once."""
    return 8 * hidden + e * (2 * hidden + 3 * intermediate)


@dataclass(frozen=True)
class TeacherJob:
    """One more teacher of a run of several [[teachers]] (the first is Job.teacher): the same
    facts, with its own Recalibrator."""

    name: str
    shape: ModelShape
    bytes: int  # its weight dtype
    exact_bytes: Optional[int]
    cached: bool
    embeddings: bool
    rec_params: int
    num_blocks: int  # its Recalibrator's decoder blocks ([teachers.recalibrator] may differ)


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
    lengths_from: str = ""  # where max_length comes from when it is measured (the data preflight), else ""
    teacher_cached: bool = False  # [teacher] cache: only the teacher's head is loaded, no teacher forward
    teacher_embeddings: bool = False  # an id-only cache: its input embeddings too (answer_input = "embeddings")
    recipe_max_length: int = 0  # data.max_length, the worst case, when max_length is measured
    first_name: str = ""  # the first teacher's name with several [[teachers]] ("" with one)
    others: tuple = ()  # TeacherJob of every other teacher, in the recipe's order

    def teachers(self) -> list[TeacherJob]:
        """Every teacher, the first from the Job's own fields."""
        if self.teacher is None:
            return []
        first = TeacherJob(self.first_name, self.teacher, self.teacher_bytes, self.teacher_exact_bytes,
                           self.teacher_cached, self.teacher_embeddings, self.rec_params, self.num_blocks)
        return [first, *self.others]


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
    """Bytes one GPU holds in `stage` under settings `s` (see the module docstring). Several
    teachers: each one's weights, Recalibrator, features and loss chunks are held at once; their
    forwards and reliance probes run one after another (the largest counts)."""
    student_shape, e, S = job.student, job.act_bytes, job.max_length
    batch = dict(s.batch)[stage]
    tokens = batch * S
    rows = batch * min(S, ANSWER_TOKENS)
    chunk = min(rows, CHUNK)
    gt, gs = s.group(s.teacher_shard), s.group(s.student_shard)
    teachers = job.teachers() if stage in ("align", "distill") else []
    rec = sum(t.rec_params for t in teachers)
    trains = _trained(student_shape, stage, job.train_projector.get(stage, False))
    static: dict[str, float] = {}
    phases: dict[str, dict[str, float]] = {}
    for t in teachers:
        static.update(_teacher_static(t, gt))
    static["student weights (fp32 masters)"] = 4 * student_shape.total / gs
    static["student grads + AdamW states (fp32)"] = 12 * trains / gs
    if rec:
        static["Recalibrator" + ("s" if len(teachers) > 1 else "") + ": weights, grads, states"] = 16 * rec / gs
    if s.gpus > 1 and not s.student_shard and trains + rec:
        static["DDP gradient buckets"] = 4 * (trains + rec)

    d_s, V_s = student_shape.text.hidden, student_shape.text.vocab
    a_layer = layer_activations(student_shape.text, e)
    student: dict[str, float] = {}
    if stage == "align":  # the student runs without grad: only its output stays
        acts = other = 4 * d_s * tokens
    else:
        whole = student_shape.text.layers * a_layer + 16 * d_s + e * S
        ckpt = student_shape.text.layers * 4 * d_s + a_layer + 16 * d_s + e * S
        acts, other = (ckpt * tokens, whole * tokens) if s.checkpointing else (whole * tokens, ckpt * tokens)
    student["student activations"] = acts
    sharded_student = s.student_shard and gs > 1
    if e == 2 and trains + rec and not sharded_student:  # sharded: FSDP gathers in bf16 instead (below)
        student["autocast bf16 copies of trained weights"] = 2 * (trains + rec)
    logits = K_SFT * chunk * V_s if stage != "align" else 0
    features = [4 * t.shape.text.hidden * (tokens + 2 * rows) for t in teachers]
    forwards, probes, kept, work = [], [], 0, []
    for i, t in enumerate(teachers):
        teacher_shape = t.shape
        d_l, V_t = teacher_shape.text.hidden, teacher_shape.text.vocab
        te = 2 if (e == 2 or t.bytes == 2) else 4  # the teacher computes in bf16 either way
        gathered = t.bytes * (teacher_shape.root + 2 * teacher_shape.unit) if gt > 1 else 0
        text_ws = _working_set(d_l, teacher_shape.text.intermediate, te) + 2 * d_l
        vision_ws = teacher_shape.patches_per_token * _working_set(teacher_shape.vision_hidden,
                                                                   teacher_shape.vision_intermediate, te)
        if t.cached:  # no teacher forward: the features arrive with the batch
            gathered = text_ws = vision_ws = 0
        else:
            forward = {"teacher gathered (FSDP: root + 2 units)": gathered,
                       "teacher working set (one layer at a time)": max(text_ws, vision_ws) * tokens,
                       "teacher features (fp32, this + last batch)": 2 * features[i]}
            if len(teachers) > 1:  # the other teachers' features of this micro-batch are held meanwhile
                forward["the other teachers' features (fp32)"] = sum(features) - features[i]
            forwards.append(forward)
        if t.rec_params:
            paths = 1 + job.reg.get(stage, False)
            per_token = t.num_blocks * (a_layer + (e * S if e == 2 else 0)) + 4 * S + 2 * d_s + 4 * d_l
            student["Recalibrator activations"] = student.get("Recalibrator activations", 0) + paths * tokens * per_token
            # every teacher's loss chunks keep their logits for backward; one chunk is worked on at a time
            kept += paths * rows * V_t * te
            work.append(K_REC[te] * chunk * V_t - chunk * V_t * te)
            if job.probe_items:
                n = job.probe_items * S
                r = job.probe_items * min(S, ANSWER_TOKENS)
                teacher_side = gathered + max(text_ws, vision_ws) * n
                rec_side = (4 * d_s * n + _working_set(d_s, student_shape.text.intermediate, e) * n + 4 * S * n
                            + 6 * d_l * n)
                if s.student_shard and gs > 1:  # the probe gathers the sharded root first (probe.run_probe)
                    rec_side += 4 * (student_shape.root + student_shape.parts["head"]) + 2 * 4 * student_shape.unit
                probes.append({"probe: teacher features (fp32)": 4 * d_l * n,
                               "probe: teacher pass or Recalibrator + logits": max(teacher_side, rec_side + 10 * r * V_t)})
    if forwards:
        phases["teacher forward"] = max(forwards, key=lambda f: sum(f.values()))
    if teachers:
        student["teacher features (fp32)"] = sum(features)
    if work:
        logits = max(logits, max(work) + kept)
    if probes:
        phases["reliance probe"] = max(probes, key=lambda f: sum(f.values()))
    student["logits chunk (losses)"] = logits
    if sharded_student:  # gathered in the compute dtype (parallel.shard_trainable's mixed precision)
        rec_root = sum(2 * t.shape.text.hidden * d_s + 2 * t.shape.text.hidden for t in teachers if t.rec_params)
        student["student gathered (FSDP: root, 2 units, grads)"] = \
            e * (student_shape.root + student_shape.parts["head"] + rec_root) + 3 * e * student_shape.unit
    phases["student forward + backward"] = student
    phases["optimizer step"] = {"AdamW step buffer (foreach sqrt(v))": 4 * (trains + rec) / gs}
    as_int = lambda d: {k: int(v) for k, v in d.items()}  # noqa: E731
    return StageMemory(stage, as_int(static), {p: as_int(c) for p, c in phases.items()}, int(other))


def _teacher_static(t: TeacherJob, gt: int) -> dict[str, float]:
    """What stays of one teacher: its weights in its dtype (sharded: the inner model / group
    size + its LM head whole), or where its features come from the cache its head (+ embeddings)."""
    shape, b, who = t.shape, t.bytes, f"teacher {t.name}" if t.name else "teacher"
    if t.cached:  # the cache's reader: the head (+ the embeddings), whole
        tables = shape.head_whole + (shape.parts["embed"] if t.embeddings and not shape.tied else 0)
        return {f"{who} LM head" + (" + input embeddings" if t.embeddings else "") + " (features from the cache)":
                b * tables}
    if gt > 1:
        sharded_part = (shape.total - shape.parts["head"]) / gt
        return {f"{who} weights (1/{gt} + LM head whole)": b * (sharded_part + shape.head_whole)}
    return {f"{who} weights": t.exact_bytes or b * shape.total}


def _trained(student: ModelShape, stage: str, train_projector: bool) -> int:
    """Student parameters the stage trains (trainable.set_trainable): distill the language model and
    head (+ projector), finetune all but the vision encoder, align none."""
    if stage == "align":
        return 0
    projector = student.parts["projector"] if (stage == "finetune" or train_projector) else 0
    return student.language + student.parts["head"] + projector
