"""The teacher-feature cache's storage (issue 16): what align and distill take from the teacher
for each training item, written once and read instead of running the teacher.

Per item (a row of the training split, by its index):
    answer        [Ka, d]  the Recalibrator's answer-side input: z_al, or the answer's input
                           embeddings under recalibrator.answer_input = "embeddings"
    answer_turn   [Ka]     each answer token's segment (2k+1), answer_pos [Ka] its position
    rows          [Na, d]  the teacher's own rows predicting each answer token (L_kl's teacher)
    targets       [Na]     the answer token ids
    question      [Kq, d]  z_ql with question_turn / question_pos, only where L_reg needs it

Layout of a cache folder:
    index.json              format, fingerprint, storage dtype, feature size, whether the
                            question features are there, and the shards: file, item indices
    shard-00000.safetensors every item of a shard, its tensors concatenated along the first
                            dimension with `offsets.*` [n + 1] cutting them apart again; fp8
                            storage adds a float32 scale per row (`*.scale`)

Shards are written under a temporary name and renamed into place, then the index is rewritten
(atomically): a killed writer leaves finished shards that a resumed one keeps. Several processes
write together: each its own shards (`shard-r<rank>-*`) and its own partial index
(`index-r<rank>.json`), which the main process merges into index.json at the end (`merge_index`);
a resumed writer, on any number of processes, counts what every index names as done. Reading
checks the fingerprint and names what changed; a missing, cut or corrupt shard is named in one
line; an unfinished cache (partial indices left) is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from ..errors import DataError
from .teacher import TeacherFeatures
from .turns import Tokens

FORMAT = 1
INDEX = "index.json"
STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
FP8_MAX = 448.0  # the largest finite float8 e4m3fn value
_FEATURES = ("answer", "rows", "question")  # [*, d] tensors, stored in the cache's dtype
_INTEGERS = ("answer_turn", "answer_pos", "targets", "question_turn", "question_pos")


@dataclass
class ItemFeatures:
    """One item's teacher side, as stored (CPU tensors; features in float32 once read)."""

    answer: torch.Tensor
    answer_turn: torch.Tensor
    answer_pos: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    question: torch.Tensor | None = None
    question_turn: torch.Tensor | None = None
    question_pos: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k in (*_FEATURES, *_INTEGERS) if (v := getattr(self, k)) is not None}


def split_items(tf: TeacherFeatures, with_question: bool) -> list[ItemFeatures]:
    """A batch's teacher features cut into its items (padding dropped)."""
    items = []
    counts = tf.answer.mask.sum(1).tolist()
    start = 0
    for b, n in enumerate(counts):
        a, q = tf.answer.mask[b], tf.question.mask[b]
        items.append(ItemFeatures(
            answer=tf.answer.x[b][a].detach().cpu(), answer_turn=tf.answer.turn[b][a].cpu(),
            answer_pos=tf.answer.pos[b][a].cpu(),
            rows=tf.rows[start:start + n].detach().cpu(), targets=tf.targets[start:start + n].cpu(),
            question=tf.question.x[b][q].detach().cpu() if with_question else None,
            question_turn=tf.question.turn[b][q].cpu() if with_question else None,
            question_pos=tf.question.pos[b][q].cpu() if with_question else None,
        ))
        start += n
    return items


def join_items(items: Sequence[ItemFeatures], device=None) -> TeacherFeatures:
    """Items' features as one batch's TeacherFeatures (right-padded, as the online teacher's);
    without question features, the question Tokens are empty (L_reg off)."""

    def tokens(xs, turns, poss, d) -> Tokens:
        k = max([len(t) for t in turns] + [1])
        x = torch.zeros(len(xs), k, d, dtype=torch.float32)
        turn = torch.full((len(xs), k), -1, dtype=torch.long)
        pos = torch.zeros((len(xs), k), dtype=torch.long)
        for b, (xb, tb, pb) in enumerate(zip(xs, turns, poss)):
            n = len(tb)
            x[b, :n], turn[b, :n], pos[b, :n] = xb.float(), tb.long(), pb.long()
        return Tokens(x.to(device), turn.to(device), pos.to(device))

    d = items[0].answer.shape[-1]
    answer = tokens([i.answer for i in items], [i.answer_turn for i in items], [i.answer_pos for i in items], d)
    if items[0].question is not None:
        question = tokens([i.question for i in items], [i.question_turn for i in items],
                          [i.question_pos for i in items], d)
    else:
        empty = [torch.zeros(0, dtype=torch.long)] * len(items)
        question = tokens([torch.zeros(0, d)] * len(items), empty, empty, d)
    rows = torch.cat([i.rows.float() for i in items]).to(device)
    targets = torch.cat([i.targets.long() for i in items]).to(device)
    return TeacherFeatures(question, answer, rows, targets)


def features_dict(tf: TeacherFeatures) -> dict[str, torch.Tensor]:
    """TeacherFeatures as a flat dict of tensors (what a DataLoader pins and accelerate moves)."""
    out = {"rows": tf.rows, "targets": tf.targets}
    for side in ("question", "answer"):
        tokens = getattr(tf, side)
        out.update({f"{side}.x": tokens.x, f"{side}.turn": tokens.turn, f"{side}.pos": tokens.pos})
    return out


def features_from_dict(d: Mapping[str, torch.Tensor]) -> TeacherFeatures:
    def tokens(side: str) -> Tokens:
        return Tokens(d[f"{side}.x"], d[f"{side}.turn"], d[f"{side}.pos"])

    return TeacherFeatures(tokens("question"), tokens("answer"), d["rows"], d["targets"])


# ---------------------------------------------------------------------------------------------
# storage dtypes


def encode(x: torch.Tensor, storage: str) -> dict[str, torch.Tensor]:
    """x [n, d] float as stored: cast, or fp8 e4m3 with a float32 scale per row (amax / 448)."""
    if storage != "fp8":
        return {"": x.to(STORAGE[storage]).contiguous()}
    scale = (x.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return {"": (x.float() / scale).to(torch.float8_e4m3fn).contiguous(), ".scale": scale.squeeze(-1).contiguous()}


def decode(stored: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    x = stored.float()
    return x * scale[:, None] if scale is not None else x


# ---------------------------------------------------------------------------------------------
# writing


class CacheWriter:
    """Writes items into shards of `items_per_shard`; resumes a folder whose index says which
    shards are done (same fingerprint), so only the missing items are computed again."""

    def __init__(self, folder: str | Path, fingerprint: Mapping[str, str], *, storage: str = "bf16",
                 with_question: bool = True, items_per_shard: int = 1024, hidden_size: int | None = None,
                 part: int = 0, parts: int = 1):
        if storage not in STORAGE:
            raise ValueError(f"storage {storage!r} is not one of {', '.join(STORAGE)}")
        self.folder = Path(folder)
        self.fingerprint, self.storage, self.with_question = dict(fingerprint), storage, with_question
        self.items_per_shard, self.hidden_size = items_per_shard, hidden_size
        # one writer of several (process `part` of `parts`): its own shard names and partial index
        self.prefix, self.index_name = ("shard-", INDEX) if parts == 1 else (f"shard-r{part}-", f"index-r{part}.json")
        self.shards: list[dict] = []
        self._pending: dict[int, ItemFeatures] = {}
        for old in _indices(self.folder):
            changed = fingerprint_changes(old["fingerprint"], self.fingerprint)
            if changed:
                raise DataError(f"{self.folder}: holds a cache for another setup ({changed}); "
                                "write to another folder or remove it")
            if (old["storage"], old["with_question"]) != (storage, with_question):
                raise DataError(f"{self.folder}: holds a cache stored as {old['storage']} "
                                f"{'with' if old['with_question'] else 'without'} question features; "
                                "resume it with the same settings or write to another folder")
            self.shards = _union(self.shards, [s for s in old["shards"] if (self.folder / s["file"]).is_file()])
            self.hidden_size = old.get("hidden_size", hidden_size)
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def done(self) -> set[int]:
        """Item indices already in finished shards."""
        return {i for s in self.shards for i in s["items"]}

    def add(self, index: int, item: ItemFeatures) -> None:
        self._pending[index] = item
        if len(self._pending) >= self.items_per_shard:
            self.flush()

    def flush(self) -> None:
        """Write the pending items as one shard (atomically), then the index."""
        if not self._pending:
            return
        from safetensors.torch import save_file

        indices = sorted(self._pending)
        items = [self._pending[i] for i in indices]
        tensors: dict[str, torch.Tensor] = {"index": torch.tensor(indices, dtype=torch.long)}
        for name in (*_FEATURES, *_INTEGERS):
            parts = [getattr(it, name) for it in items]
            if parts[0] is None:
                continue
            tensors[f"offsets.{name}"] = torch.tensor([0] + [len(p) for p in parts], dtype=torch.long).cumsum(0)
            joined = torch.cat(parts)
            if name in _FEATURES:
                self.hidden_size = self.hidden_size or int(joined.shape[-1])
                for suffix, t in encode(joined, self.storage).items():
                    tensors[name + suffix] = t
            else:
                tensors[name] = joined.to(torch.int32 if name.endswith(("turn", "pos")) else torch.long).contiguous()
        n = sum(1 for s in self.shards if s["file"].startswith(self.prefix))
        while (self.folder / (file := f"{self.prefix}{n:05d}.safetensors")).exists():
            n += 1  # a shard a killed writer finished but did not index
        tmp = self.folder / f".{file}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.folder / file)
        self.shards.append({"file": file, "items": indices, "bytes": (self.folder / file).stat().st_size})
        self._pending.clear()
        self._write_index()

    def _write_index(self) -> None:
        index = {"format": FORMAT, "fingerprint": self.fingerprint, "storage": self.storage,
                 "with_question": self.with_question, "hidden_size": self.hidden_size, "shards": self.shards}
        _write_json(self.folder / self.index_name, index)


def merge_index(folder: str | Path) -> None:
    """Every writer's partial index merged into index.json (the union of their finished shards),
    then the partial ones removed: the last step of a cache written by several processes (run
    by one process once all have flushed)."""
    folder = Path(folder)
    indices = _indices(folder)
    if not indices:
        return
    merged = dict(indices[-1])
    merged["shards"] = []
    for index in indices:
        merged["shards"] = _union(merged["shards"], [s for s in index["shards"] if (folder / s["file"]).is_file()])
        merged["hidden_size"] = merged.get("hidden_size") or index.get("hidden_size")
    _write_json(folder / INDEX, merged)
    for part in folder.glob(PARTIAL):
        part.unlink()


PARTIAL = "index-r*.json"


def _indices(folder: Path) -> list[dict]:
    """index.json (if any) and every writer's partial index, read."""
    paths = ([folder / INDEX] if (folder / INDEX).is_file() else []) + sorted(folder.glob(PARTIAL))
    return [_read_json(p) for p in paths]


def _union(shards: list[dict], more: list[dict]) -> list[dict]:
    known = {s["file"] for s in shards}
    return shards + [s for s in more if s["file"] not in known]


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# reading


def read_index(folder: Path) -> dict:
    """A finished cache's index (refused while writers' partial indices are left: unfinished)."""
    folder = Path(folder)
    if any(folder.glob(PARTIAL)):
        raise DataError(f"{folder}: an unfinished cache (its writers stopped before merging their indices); "
                        "run the same `genrecal teach` again to finish it")
    path = folder / INDEX
    if not path.is_file():
        raise DataError(f"{folder}: not a teacher-feature cache (no {INDEX}); write one with `genrecal teach`")
    return _read_json(path)


def _read_json(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if index.get("format") != FORMAT:
        raise DataError(f"{path}: cache format {index.get('format')!r}, this genrecal reads format {FORMAT}")
    return index


def fingerprint_changes(saved: Mapping[str, str], current: Mapping[str, str]) -> str:
    """'' when equal, else which parts differ, e.g. "the teacher's weights, max_length"."""
    keys = [k for k in dict.fromkeys([*saved, *current]) if saved.get(k) != current.get(k)]
    return ", ".join(keys)


class CacheReader:
    """A finished cache, checked against the run's fingerprint; `items(indices)` reads items."""

    def __init__(self, folder: str | Path, fingerprint: Mapping[str, str] | None = None):
        self.folder = Path(folder)
        index = read_index(self.folder)
        if fingerprint is not None:
            changed = fingerprint_changes(index["fingerprint"], fingerprint)
            if changed:
                raise DataError(f"{self.folder}: this cache was written for another setup: {changed} changed; "
                                "write it again with `genrecal teach`")
        self.storage, self.with_question = index["storage"], index["with_question"]
        self.where = {i: s["file"] for s in index["shards"] for i in s["items"]}
        self._open: dict[str, _Shard] = {}  # the most recently opened shards (each a memory map)

    def __getstate__(self) -> dict:  # for loader workers: open shards are not carried over
        return {**self.__dict__, "_open": {}}

    def batch(self, indices: Sequence[int]) -> dict:
        """Items' features joined as one batch's (join_items), as plain tensors (features_dict):
        what a loader worker adds to the batch it collates."""
        return features_dict(join_items(self.items(indices)))

    def _shard(self, file: str) -> "_Shard":
        if file not in self._open:
            from safetensors import safe_open

            path = self.folder / file
            if not path.is_file():
                raise DataError(f"{path}: cache shard missing; write the cache again with `genrecal teach`")
            try:  # memory-mapped: an item reads its own rows, never the whole shard
                handle = safe_open(str(path), "pt")
                small = {k: handle.get_tensor(k) for k in handle.keys() if k == "index" or k.startswith("offsets.")}
                handle.get_slice(next(iter(_FEATURES)))[0:1]  # a cut file fails here, not mid-run
            except Exception as exc:  # safetensors: header or length wrong
                raise DataError(f"{path}: cache shard is cut short or corrupt ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}); write the cache again") from None
            if len(self._open) >= 64:  # a bounded number of open files
                self._open.pop(next(iter(self._open)))
            self._open[file] = _Shard(handle, small)
        return self._open[file]

    def items(self, indices: Sequence[int]) -> list[ItemFeatures]:
        out = []
        for i in indices:
            if i not in self.where:
                raise DataError(f"{self.folder}: item {i} is not in the cache (written for other data?)")
            out.append(self._shard(self.where[i]).item(i))
        return out


class _Shard:
    """One open shard: its index and offsets in memory, its tensors read by rows on demand."""

    def __init__(self, handle, small: dict[str, torch.Tensor]):
        self.handle, self.offsets = handle, {k[len("offsets."):]: v.tolist() for k, v in small.items() if k != "index"}
        self.position = {int(i): k for k, i in enumerate(small["index"].tolist())}
        self.names = set(handle.keys())

    def item(self, i: int) -> ItemFeatures:
        k = self.position[i]
        fields = {}
        for name, offsets in self.offsets.items():
            a, b = offsets[k], offsets[k + 1]
            rows = self.handle.get_slice(name)[a:b]
            if name in _FEATURES:
                scale = self.handle.get_slice(f"{name}.scale")[a:b] if f"{name}.scale" in self.names else None
                fields[name] = decode(rows, scale)
            else:
                fields[name] = rows.long()
        return ItemFeatures(**fields)


def size_estimate(answer_tokens: int, question_tokens: int, hidden: int, storage: str) -> dict[str, int]:
    """Bytes of a cache: answer features and the rows predicting them (2 x answer tokens x hidden),
    the question features separately (question tokens x hidden), per storage dtype; fp8 adds a
    4-byte scale per row. Integers (turn, position, target) are small beside them."""
    per = {"fp32": 4, "bf16": 2, "fp8": 1}[storage]
    row = hidden * per + (4 if storage == "fp8" else 0)
    return {"answer": 2 * answer_tokens * row + answer_tokens * 16, "question": question_tokens * row + question_tokens * 8}


# ---------------------------------------------------------------------------------------------
# what a cache was computed from


def fingerprint(recipe, teacher_path: str) -> dict[str, str]:
    """What the teacher's features depend on, each part a short digest: the teacher's weights
    (its safetensors headers and sizes: names, shapes, dtypes, offsets), its tokenizer and
    processor files, the training data (the recipe's data table and the files' sizes and first
    and last MiB), max_length, the answer input, the teacher's dtype and the compute precision.
    Not the student: one cache serves every student."""
    import dataclasses
    import hashlib

    from ..models import processor_files
    from .parallel import mixed_precision

    def digest(parts: Iterable[bytes]) -> str:
        h = hashlib.sha256()
        for part in parts:
            h.update(len(part).to_bytes(8, "little") + part)
        return h.hexdigest()[:16]

    def weights(folder: Path) -> Iterable[bytes]:
        for f in sorted(folder.glob("*.safetensors")):
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                yield f.name.encode() + f.stat().st_size.to_bytes(8, "little") + fh.read(min(n, 100 << 20))

    def sample(path: Path) -> Iterable[bytes]:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            size = f.stat().st_size
            name = str(f.relative_to(path) if path.is_dir() else f.name).encode() + size.to_bytes(8, "little")
            if f.suffix not in (".jsonl", ".json", ".parquet", ".csv", ".arrow"):  # images: name and size
                yield name
                continue
            with f.open("rb") as fh:
                head = fh.read(1 << 20)
                fh.seek(max(0, size - (1 << 20)))
                yield name + head + fh.read()

    folder = Path(teacher_path).expanduser()
    data = {k: v for k, v in dataclasses.asdict(recipe.data).items()
            if k not in ("num_workers", "shuffle_buffer", "group_by_length", "streaming", "eval_split", "max_length")}
    source = Path(recipe.data.source).expanduser()
    return {
        "the teacher's weights": digest(weights(folder)) if folder.is_dir() else f"hub:{teacher_path}@{recipe.teacher.revision}",
        "the teacher's tokenizer and processor": digest(p.read_bytes() for _, p in sorted(processor_files(
            teacher_path, recipe.teacher.revision).items())),
        # (the built-in shapes are drawn with train.seed: another seed is other data)
        "the data": digest([repr(sorted(data.items())).encode(), *(sample(source) if source.exists() else []),
                            *([str(recipe.train.seed).encode()] if recipe.data.source == "shapes" else [])]),
        "data.max_length": str(recipe.data.max_length),
        "recalibrator.answer_input": recipe.recalibrator.answer_input,
        "teacher.dtype": recipe.teacher.dtype,
        "train.precision": mixed_precision(recipe),
    }


def check_lengths(cached: TeacherFeatures, teacher_batch: dict, keys: Sequence[int], folder: Path) -> None:
    """The cached answer tokens of each item match the teacher side rendered now (with another
    student, max_length may keep other turns: then the cache does not fit that item)."""
    rendered = ((teacher_batch["segment"] >= 0) & (teacher_batch["segment"] % 2 == 1)).sum(1).tolist()
    stored = cached.answer.mask.sum(1).tolist()
    for key, now, then in zip(keys, rendered, stored):
        if now != then:
            raise DataError(f"{folder}: item {key} has {then} answer tokens in the cache but {now} as rendered now "
                            "(data.max_length keeps other turns with this student?); write the cache again")
