"""The recipe's tables as frozen dataclasses, each with the value checks that run when it loads."""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Schedule = Literal["linear", "cosine", "constant"]
AnswerInput = Literal["hidden", "embeddings"]
TeacherPlacement = Literal["replicate", "shard"]
StudentPlacement = Literal["ddp", "shard"]
DataFormat = Literal["auto", "columns", "messages", "conversations", "cauldron"]

# A hub id is "name" or "org/name"; anything else that does not exist locally is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".toml", ".safetensors", ".model", ".tiktoken")
BUILT_IN_DATA = ("shapes", "chats")  # data sets made offline on first use (world/)
ZOO_PREFIX = "zoo:"  # built-in tiny offline models, built on first use (see zoo.py)


def looks_like_hub_id(source: str) -> bool:
    """True when `source` reads as a hub id ("org/name") rather than a filesystem path."""
    return (
        bool(_HUB_ID.match(source))
        and not source.lower().endswith(_FILE_SUFFIXES)
        and not Path(source).exists()
    )


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how to load it."""

    path: str  # local folder, hub id ("org/name") or a built-in tiny model ("zoo:NAME")
    revision: Optional[str] = None  # hub revision (branch, tag or commit); local folders ignore it
    dtype: Dtype = "auto"
    trust_remote_code: bool = False  # runs code from the model repo: only for repos you trust
    recipe: Optional[str] = None  # a recipe (relative to this one) whose exported student is this model, run first if `path` is missing
    cache: Optional[str] = None  # [teacher] only: a teacher-feature cache (genrecal teach) read instead of running the teacher
    processor: dict[str, Any] = field(default_factory=dict)  # [teacher.processor] / [student.processor]: image settings (min_pixels, max_pixels, max_patches, size, ...) set on this side's processor, checked when it loads

    def _check(self, key: str, problems: list[str]) -> None:
        if self.recipe is None:
            _check_source(self.path, f"{key}.path", problems)
        elif not Path(self.path).exists() and not Path(self.recipe).is_file():  # the recipe is needed only then
            problems.append(f"{key}.recipe: recipe file not found: {self.recipe} ({key}.path {self.path} does not "
                            "exist, and this recipe would build it)")


@dataclass(frozen=True)
class DataSpec:
    """The training data: conversations with images (or none), in one of the layouts of
    data/formats.py (image + question + answer columns, chat messages, LLaVA conversations)."""

    source: str = "shapes"  # built-in "shapes" (one turn) or "chats" (several turns and images), a .jsonl/.json/.parquet/.csv file, a folder or a hub id
    format: DataFormat = "auto"  # "auto": told by the columns (messages, conversations, texts, or question + answer)
    image_column: str = "image"  # columns layout: one image (or none); conversations layout: a path or a list
    question_column: str = "question"
    answer_column: str = "answer"
    messages_column: str = "messages"  # chat messages: role + content (a string or typed parts)
    images_column: str = "images"  # the messages' images, one per {"type": "image"} part, in order (also The Cauldron's)
    conversations_column: str = "conversations"  # LLaVA-style turns: from human / gpt, <image> placeholders
    texts_column: str = "texts"  # The Cauldron's turns: {user, assistant}; its images (images_column) go with the first question
    image_root: Optional[str] = None  # folder of relative image paths; unset: the source's folder
    max_length: int = 512  # tokens per item on each side; trailing turns that do not fit are dropped, an item whose first turn does not fit is skipped
    streaming: bool = False  # read the training split as a stream (hub or large sources): no download or pass up front; stages need `steps`
    shuffle_buffer: int = 1000  # streaming: rows shuffled within a buffer of this many (and the shards' order)
    group_by_length: bool = False  # batches of items with similar token counts (less padding), shuffled in groups of 64 batches
    num_workers: Optional[int] = None  # loader workers per process encoding items; unset: on GPUs the cores per process less one (at most 8), on CPUs half of them less one
    train_split: str = "train"
    eval_split: str = "validation"
    num_train: Optional[int] = None  # use only the first N training items
    shapes_size: int = 2000  # items in the built-in train split (source = "shapes" or "chats" only)

    def _check(self, key: str, problems: list[str]) -> None:
        if self.source not in BUILT_IN_DATA:
            _check_source(self.source, f"{key}.source", problems)
        if self.image_root is not None and not Path(self.image_root).expanduser().is_dir():
            problems.append(f"{key}.image_root: not a folder: {self.image_root}")
        _positive(self.max_length, f"{key}.max_length", problems)
        _positive(self.shapes_size, f"{key}.shapes_size", problems)
        if self.num_train is not None:
            _positive(self.num_train, f"{key}.num_train", problems)
        _positive(self.shuffle_buffer, f"{key}.shuffle_buffer", problems)
        if self.streaming and self.group_by_length:
            problems.append(f"{key}.group_by_length: not available with {key}.streaming (lengths are known only "
                            "for rows already read); turn one off")
        if self.num_workers is not None and self.num_workers < 0:
            problems.append(f"{key}.num_workers: {self.num_workers} must be >= 0")


@dataclass(frozen=True)
class RecalibratorSpec:
    """The Recalibrator: proj_pre -> rec_body (student decoder blocks) -> proj_post -> LayerNorm."""

    num_blocks: int = 2  # decoder blocks in rec_body (paper: 1 < 2 = 5 = 10)
    answer_input: AnswerInput = "hidden"  # what stands for the teacher's answer (METHOD.md)
    new_positions: bool = True  # fresh position ids 0..n-1 with its own rotary (the paper's NPE)
    # Beyond the paper: in training, replace each teacher answer token's input by a learned mask
    # vector with this probability, so that later answer tokens also depend on the student
    # (with "hidden" they otherwise do not). 0 is the paper's form.
    answer_dropout: float = 0.0

    def _check(self, key: str, problems: list[str]) -> None:
        _positive(self.num_blocks, f"{key}.num_blocks", problems)
        if not 0.0 <= self.answer_dropout < 1.0:
            problems.append(f"{key}.answer_dropout: {self.answer_dropout} must be in [0, 1)")


@dataclass(frozen=True)
class LossSpec:
    """Weights of the loss terms (paper: plain sum) and the KL temperature."""

    ar: float = 1.0
    kl: float = 1.0
    reg: float = 1.0
    sft: float = 1.0
    # ULD (Universal Logit Distillation), the cross-tokenizer logit baseline: the student's own
    # answer logits against the teacher's, sorted, in the distill stage. Off in GenRecal (0).
    uld: float = 0.0
    # Classic token-level KD, for a pair that shares one tokenizer and template only: KL from the
    # teacher's answer-token distribution to the student's own head's, in the distill stage.
    kd: float = 0.0
    temperature: float = 1.0

    def _check(self, key: str, problems: list[str]) -> None:
        for name in ("ar", "kl", "reg", "sft", "uld", "kd"):
            if getattr(self, name) < 0:
                problems.append(f"{key}.{name}: weight {getattr(self, name)} is negative; use 0 to switch a term off")
        if self.temperature <= 0:
            problems.append(f"{key}.temperature: {self.temperature} must be > 0")


@dataclass(frozen=True)
class StageSpec:
    """One training stage: how long, how fast, how big a batch."""

    enabled: bool = True
    steps: Optional[int] = None  # optimizer updates; exactly one of steps / epochs
    epochs: Optional[float] = None
    max_steps: Optional[int] = None  # cap on updates when training by epochs
    lr: float = 1e-4  # paper: 1e-4 decayed linearly to 1e-5 in each stage
    lr_end: float = 1e-5
    schedule: Schedule = "linear"
    warmup_steps: int = 0
    batch_size: int = 8  # items per device per micro-batch
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 switches clipping off
    train_projector: bool = False  # distill only: also train the student's vision projector
    reg: bool = True  # distill only: keep L_reg in the distill stage

    def _check(self, key: str, problems: list[str]) -> None:
        if not self.enabled:
            return
        if (self.steps is None) == (self.epochs is None):
            problems.append(f"{key}: give exactly one of `steps` or `epochs`")
        if self.steps is not None:
            _positive(self.steps, f"{key}.steps", problems)
        if self.epochs is not None and self.epochs <= 0:
            problems.append(f"{key}.epochs: {self.epochs} must be > 0")
        if self.max_steps is not None:
            _positive(self.max_steps, f"{key}.max_steps", problems)
        if self.lr <= 0:
            problems.append(f"{key}.lr: learning rate {self.lr} must be > 0")
        elif self.lr_end < 0 or self.lr_end > self.lr:
            problems.append(f"{key}.lr_end: {self.lr_end} must be between 0 and lr ({self.lr})")
        if self.warmup_steps < 0:
            problems.append(f"{key}.warmup_steps: {self.warmup_steps} must be >= 0")
        _positive(self.batch_size, f"{key}.batch_size", problems)
        _positive(self.grad_accum, f"{key}.grad_accum", problems)
        if self.weight_decay < 0:
            problems.append(f"{key}.weight_decay: {self.weight_decay} must be >= 0")
        if self.max_grad_norm < 0:
            problems.append(f"{key}.max_grad_norm: {self.max_grad_norm} must be >= 0 (0 = no clipping)")


@dataclass(frozen=True)
class StagesSpec:
    """The three GenRecal stages, run in this order when enabled."""

    align: StageSpec = field(default_factory=lambda: StageSpec(enabled=False))
    distill: StageSpec = field(default_factory=lambda: StageSpec(enabled=False))
    finetune: StageSpec = field(default_factory=lambda: StageSpec(enabled=False))

    def enabled(self) -> list[str]:
        return [name for name in ("align", "distill", "finetune") if getattr(self, name).enabled]


@dataclass(frozen=True)
class TrainSpec:
    """Run-wide settings."""

    seed: int = 0
    output_dir: str = "runs/genrecal"
    # Compute precision (autocast); whatever it is, everything that trains keeps fp32 master
    # weights and fp32 optimizer states. auto = fp32 on CPU (bf16 is slow there), bf16 on GPU.
    precision: Precision = "auto"
    log_every: int = 10  # steps between logged lines / metrics.jsonl rows
    # A checkpoint every save_every updates inside a stage (0: only at the end of each stage and
    # on Ctrl-C / SIGTERM); the newest keep_checkpoints of them are kept.
    save_every: int = 500
    keep_checkpoints: int = 2
    eval_items: int = 200  # validation items for the before/after accuracy table
    # The Recalibrator's reliance on the student (align, distill): every probe_every steps, on a
    # fixed batch of probe_items training items, its loss and top-1 agreement with the student's
    # question features real, another item's and zeroed. 0 switches the probe off.
    probe_every: int = 50
    probe_items: int = 16
    # Recompute the student's decoder activations in backward instead of keeping them (less
    # memory, about a third more student compute).
    gradient_checkpointing: bool = False
    # Experiment trackers (accelerate's): the metrics of metrics.jsonl and the recipe as the run's
    # config, e.g. ["tensorboard"] (written to OUTPUT/logs), "wandb", "mlflow"; each needs its package.
    log_with: tuple[str, ...] = ()

    def _check(self, key: str, problems: list[str]) -> None:
        for name in self.log_with:
            if name not in TRACKERS:
                near = difflib.get_close_matches(name, TRACKERS, n=1)
                problems.append(f"{key}.log_with: {name!r} is not one of {', '.join(TRACKERS)}"
                                + (f"; did you mean {near[0]!r}?" if near else ""))
        _positive(self.log_every, f"{key}.log_every", problems)
        if self.save_every < 0:
            problems.append(f"{key}.save_every: {self.save_every} must be >= 0 (0 = only at the end of each stage)")
        _positive(self.keep_checkpoints, f"{key}.keep_checkpoints", problems)
        if self.probe_every < 0:
            problems.append(f"{key}.probe_every: {self.probe_every} must be >= 0 (0 = no probe)")
        if self.probe_items < 2:
            problems.append(f"{key}.probe_items: {self.probe_items} must be >= 2 (the probe swaps items' features)")
        if self.eval_items < 0:
            problems.append(f"{key}.eval_items: {self.eval_items} must be >= 0")


# accelerate's experiment trackers (accelerate.utils.LoggerType), by the names train.log_with takes
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


@dataclass(frozen=True)
class ParallelSpec:
    """How the models are placed on several processes (one process: nothing changes)."""

    # "replicate": every process holds the whole frozen teacher; "shard": FSDP2 splits it over
    # the processes (one unit per decoder layer and vision block), its LM head whole on each.
    teacher: TeacherPlacement = "replicate"
    # "ddp": every process holds the whole student + Recalibrator (gradients all-reduced);
    # "shard": FSDP2 splits their weights, gradients and optimizer states over the processes.
    student: StudentPlacement = "ddp"
    # Hybrid sharding: shard over groups of shard_group processes (one node), replicate across
    # the groups. Unset: one group of every process.
    shard_group: Optional[int] = None

    def _check(self, key: str, problems: list[str]) -> None:
        if self.shard_group is not None:
            _positive(self.shard_group, f"{key}.shard_group", problems)


_TEACHER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class TeacherSpec(ModelSpec):
    """One of the recipe's `[[teachers]]`: a [teacher] table's keys, its `name` (for metrics and
    files) and the `weight` of its loss terms, with its own `[teachers.recalibrator]` over the
    recipe's [recalibrator]. One [[teachers]] table means what a [teacher] table means."""

    name: str = ""
    weight: float = 1.0
    recalibrator: RecalibratorSpec = field(default_factory=RecalibratorSpec)

    def _check(self, key: str, problems: list[str]) -> None:
        super()._check(key, problems)
        if not _TEACHER_NAME.match(self.name) or self.name == "student":
            problems.append(f"{key}.name: {self.name!r} must start with a letter and hold only letters, digits, "
                            "'-' and '_' (and not be 'student')")
        if self.weight < 0:
            problems.append(f"{key}.weight: {self.weight} must be >= 0")

    def as_model(self) -> ModelSpec:
        """The [teacher] table this one stands for."""
        return ModelSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelSpec)})


@dataclass(frozen=True)
class Recipe:
    """A whole distillation recipe. `teacher` may be absent for finetune-only recipes."""

    student: ModelSpec
    teacher: Optional[ModelSpec] = None
    data: DataSpec = field(default_factory=DataSpec)
    recalibrator: RecalibratorSpec = field(default_factory=RecalibratorSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    stages: StagesSpec = field(default_factory=StagesSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    teachers: tuple[TeacherSpec, ...] = ()  # [[teachers]]; one is read as [teacher] (recipe_from_dict)
    origin: str = field(default="<memory>", compare=False)  # the file it came from

    def _check(self, key: str, problems: list[str]) -> None:
        if not self.stages.enabled():
            problems.append("stages: every stage is disabled; enable at least one of align, distill, finetune")
        if self.teachers and self.teacher is not None:
            problems.append("teachers: a recipe has one [teacher] table or [[teachers]] tables, not both")
        names = [t.name for t in self.teachers]
        for name in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"teachers: the name {name!r} is given to {names.count(name)} teachers; names must differ")
        if len(self.teachers) > 1:
            self._check_several(problems)
        needs_teacher = [s for s in ("align", "distill") if getattr(self.stages, s).enabled]
        if needs_teacher and self.teacher is None and not self.teachers:
            problems.append(
                f"teacher: stage{'s' if len(needs_teacher) > 1 else ''} {', '.join(needs_teacher)} "
                "need a teacher; add a [teacher] table with a `path`"
            )
        if self.data.streaming:
            for name in self.stages.enabled():
                if getattr(self.stages, name).steps is None:
                    problems.append(f"stages.{name}: data.streaming needs `steps` (a stream's length, and so an "
                                    "epoch's, is not known in advance)")
        if self.student.cache is not None:
            problems.append("student.cache: only [teacher] has a feature cache")
        sides = [("teacher", self.teacher)] + [(f"teachers[{i}]", t) for i, t in enumerate(self.teachers)]
        for key_, spec in sides:
            if spec is not None and spec.cache is not None and self.data.streaming:
                problems.append(f"{key_}.cache: the cache finds items by their row number, which a stream does not "
                                "have; set data.streaming = false")
        if self.loss.kd and not self.stages.distill.enabled:
            problems.append("loss.kd: the teacher's distribution reaches the student in the distill stage, which is "
                            "disabled; enable stages.distill or set loss.kd = 0")
        if self.train.precision == "fp16" and self.parallel.student == "shard":
            problems.append('parallel.student: "shard" with train.precision = "fp16" is not supported: fp16 needs a '
                            "gradient scaler that skips overflow steps, and accelerate's GradScaler does not reach a "
                            'student sharded with FSDP2; use train.precision = "bf16" (no scaler needed) or '
                            'parallel.student = "ddp"')
        if self.stages.align.enabled and not (self.loss.ar or self.loss.kl or self.loss.reg):
            problems.append("stages.align: trains the Recalibrator on loss.ar, loss.kl and loss.reg, which are all 0; "
                            "give one a weight or disable the stage (enabled = false)")

    def _check_several(self, problems: list[str]) -> None:
        if not any(t.weight for t in self.teachers):
            problems.append("teachers: every teacher's weight is 0; give one a weight > 0 (or drop the [[teachers]] "
                            "tables and run a finetune-only recipe)")
        for name in ("kd", "uld"):
            if getattr(self.loss, name):
                problems.append(f"loss.{name}: scores the student against one teacher's rows; with several "
                                f"[[teachers]] set loss.{name} = 0 (their terms are ar, kl and reg, per teacher)")

    @property
    def several_teachers(self) -> bool:
        """Whether the run has more than one teacher (then each has its own Recalibrator)."""
        return len(self.teachers) > 1

    def teacher_views(self) -> list["TeacherView"]:
        """Each teacher with the recipe as a run of that teacher alone (its table as [teacher], its
        [recalibrator]): what its cache, its processor settings and its Recalibrator are read
        from. A recipe of one teacher: itself, under the name "teacher", weight 1."""
        if not self.several_teachers:
            return [TeacherView("teacher", 1.0, self)] if self.teacher is not None else []
        return [TeacherView(t.name, t.weight, dataclasses.replace(self, teacher=t.as_model(),
                                                                   recalibrator=t.recalibrator, teachers=()),
                            f"teachers[{i}]")
                for i, t in enumerate(self.teachers)]

    @property
    def uses_recalibrator(self) -> bool:
        """Whether any enabled stage trains or reads the Recalibrator (not a ULD-only distill)."""
        distill = self.stages.distill
        rec_terms = self.loss.ar or self.loss.kl or (self.loss.reg and distill.reg)
        return self.stages.align.enabled or (distill.enabled and bool(rec_terms))

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (stored with every checkpoint)."""
        out = dataclasses.asdict(self)
        out.pop("origin")
        if not out["teachers"]:  # (a recipe of one teacher reads as it did before [[teachers]])
            out.pop("teachers")
        return _drop_none(out)


@dataclass(frozen=True)
class TeacherView:
    """One teacher of a run: its name, its loss weight, the recipe as a run of it alone, and the
    recipe table it comes from ("teacher", or "teachers[i]" with several)."""

    name: str
    weight: float
    recipe: Recipe
    table: str = "teacher"

    @property
    def several(self) -> bool:
        """One of several teachers (then its names are its own: side, metrics, files)."""
        return self.table != "teacher"

    @property
    def side(self) -> str:
        """Its key in a collated batch and in the data report's reasons."""
        return f"teacher:{self.name}" if self.several else "teacher"

    @property
    def title(self) -> str:
        """How notes and the accuracy table name it."""
        return f"teacher {self.name}" if self.several else "teacher"


def _check_source(source: str, key: str, problems: list[str]) -> None:
    if not source.strip():
        problems.append(f"{key}: empty")
    elif source.startswith(ZOO_PREFIX) or Path(source).expanduser().exists() or looks_like_hub_id(source):
        return
    else:
        problems.append(f"{key}: path not found: {source}")


def _positive(value: int, key: str, problems: list[str]) -> None:
    if value <= 0:
        problems.append(f"{key}: {value} must be > 0")


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d
