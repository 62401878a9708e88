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
                            question features are there, the shards (file, item indices, bytes),
                            the command that writes it, and once every item is done its
                            completion record (`complete`: items, cached, skipped)
    shard-00000.safetensors every item of a shard, its tensors concatenated along the first
                            dimension with `offsets.*` [n + 1] cutting them apart again; fp8
                            storage adds a float32 scale per row (`*.scale`); `checksum` [n]:
                            each item's SHA-256 (first 8 bytes) over its key and stored bytes

Shards are written under a temporary name and renamed into place, then the index is rewritten
(atomically): a killed writer leaves finished shards that a resumed one keeps, once each passed
its checks (size, header, every item's checksum); a damaged one is removed and its items computed
again. Several processes write together: each its own shards (`shard-r<rank>-*`) and its own
partial index (`index-r<rank>.json`), which the main process merges into index.json at the end
(`merge_index`) before it writes the completion record (`complete`); a resumed writer, on any
number of processes, counts what every index names as done.

Reading refuses an unfinished cache (no completion record, or partial indices left) with the
command that finishes it, checks the fingerprint and names what changed, and checks each shard
when it is opened (its size against the index, its header, its item keys) and each item's
checksum when a process first reads it: in the loader workers, off the training step. The
checksum is per item, not per file, because training reads items at random across every shard:
a whole-file hash would read the whole cache in every worker. `verify` checks every item of every
shard (`genrecal teach --verify DIR`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from ..data.render import is_answer
from ..errors import DataError
from .teacher import TeacherFeatures
from .turns import Tokens

FORMAT = 2  # 2: item checksums and the completion record
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
            answer=tf.answer.x[b][a].detach().cpu(), answer_turn=tf.answer.segment[b][a].cpu(),
            answer_pos=tf.answer.pos[b][a].cpu(),
            rows=tf.rows[start:start + n].detach().cpu(), targets=tf.targets[start:start + n].cpu(),
            question=tf.question.x[b][q].detach().cpu() if with_question else None,
            question_turn=tf.question.segment[b][q].cpu() if with_question else None,
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
        out.update({f"{side}.x": tokens.x, f"{side}.segment": tokens.segment, f"{side}.pos": tokens.pos})
    return out


def features_from_dict(d: Mapping[str, torch.Tensor]) -> TeacherFeatures:
    def tokens(side: str) -> Tokens:
        return Tokens(d[f"{side}.x"], d[f"{side}.segment"], d[f"{side}.pos"])

    return TeacherFeatures(tokens("question"), tokens("answer"), d["rows"], d["targets"])


# ---------------------------------------------------------------------------------------------
# storage dtypes


def to_storage(x: torch.Tensor, storage: str) -> dict[str, torch.Tensor]:
    """x [n, d] float as stored: cast, or fp8 e4m3 with a float32 scale per row (amax / 448)."""
    if storage != "fp8":
        return {"": x.to(STORAGE[storage]).contiguous()}
    scale = (x.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return {"": (x.float() / scale).to(torch.float8_e4m3fn).contiguous(), ".scale": scale.squeeze(-1).contiguous()}


def from_storage(stored: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A stored tensor back as float32 (fp8: times its scale per row)."""
    x = stored.float()
    return x * scale[:, None] if scale is not None else x


# ---------------------------------------------------------------------------------------------
# writing


class CacheWriter:
    """Writes items into shards of `items_per_shard`; resumes a folder whose index says which
    shards are done (same fingerprint), so only the missing items are computed again."""

    def __init__(self, folder: str | Path, fingerprint: Mapping[str, str], *, storage: str = "bf16",
                 with_question: bool = True, items_per_shard: int = 1024, hidden_size: int | None = None,
                 part: int = 0, parts: int = 1, command: str | None = None):
        if storage not in STORAGE:
            raise ValueError(f"storage {storage!r} is not one of {', '.join(STORAGE)}")
        self.folder = Path(folder)
        self.fingerprint, self.storage, self.with_question = dict(fingerprint), storage, with_question
        self.items_per_shard, self.hidden_size, self.command = items_per_shard, hidden_size, command
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
            self.shards = _union(self.shards, old["shards"])
            self.hidden_size = old.get("hidden_size", hidden_size)
            self.command = self.command or old.get("command")
        # Names listed anywhere are never reused (an old index may still list a removed damaged shard).
        self._taken = {s["file"] for s in self.shards}
        self.folder.mkdir(parents=True, exist_ok=True)

    def check(self, part: int = 0, parts: int = 1) -> list[str]:
        """Check the listed shards (size, header, every item's checksum) and remove the files of
        the damaged ones; on several processes each checks every `parts`-th shard from `part`,
        and each passes the union of what all found to `drop`. Returns "file: what is wrong",
        one line per damaged shard. A resumed `genrecal teach` calls it before it computes what
        is missing: a damaged shard's items are computed again."""
        found = []
        for shard in self.shards[part::parts]:
            problem = check_shard(self.folder, shard)
            if problem:
                found.append(f"{shard['file']}: {problem}")
                (self.folder / shard["file"]).unlink(missing_ok=True)
        self.drop([line.split(":")[0] for line in found])
        return found

    def drop(self, files: Iterable[str]) -> None:
        """Forget shards (damaged ones): their items count as not done."""
        gone = set(files)
        self.shards = [s for s in self.shards if s["file"] not in gone]

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
                for suffix, t in to_storage(joined, self.storage).items():
                    tensors[name + suffix] = t
            else:
                tensors[name] = joined.to(torch.int32 if name.endswith(("turn", "pos")) else torch.long).contiguous()
        offsets = _offsets(tensors)
        tensors["checksum"] = torch.tensor(
            [_checksum(key, {name: t[offsets[_base(name)][k]:offsets[_base(name)][k + 1]]
                             for name, t in tensors.items() if _is_data(name)}) for k, key in enumerate(indices)],
            dtype=torch.long)
        n = sum(1 for s in self.shards if s["file"].startswith(self.prefix))
        while (self.folder / (file := f"{self.prefix}{n:05d}.safetensors")).exists() or file in self._taken:
            n += 1  # a shard a killed writer finished but did not index, or a name an index lists
        tmp = self.folder / f".{file}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.folder / file)
        self.shards.append({"file": file, "items": indices, "bytes": (self.folder / file).stat().st_size})
        self._taken.add(file)
        self._pending.clear()
        self.write_index()

    def write_index(self) -> None:
        index = {"format": FORMAT, "fingerprint": self.fingerprint, "storage": self.storage,
                 "with_question": self.with_question, "hidden_size": self.hidden_size, "command": self.command,
                 "shards": self.shards}
        _write_json(self.folder / self.index_name, index)  # no completion record: `complete` writes it


def _offsets(tensors: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    """A shard's row offsets by tensor ("offsets.answer" -> "answer": where each item's rows start)."""
    return {k[len("offsets."):]: v.tolist() for k, v in tensors.items() if k.startswith("offsets.")}


def _cached(shards: Iterable[Mapping]) -> int:
    """How many items the listed shards hold."""
    return len({i for s in shards for i in s["items"]})


def _base(name: str) -> str:
    """The tensor whose offsets cut `name` ("answer.scale" -> "answer")."""
    return name.split(".")[0]


def _is_data(name: str) -> bool:
    """A tensor that holds items' values (not the shard's index, offsets or checksums)."""
    return name not in ("index", "checksum") and not name.startswith("offsets.")


def _checksum(key: int, parts: Mapping[str, torch.Tensor]) -> int:
    """An item's checksum: SHA-256 over its key and its stored bytes, tensor by tensor in name
    order (the first 8 bytes, as a signed 64-bit integer)."""
    h = hashlib.sha256(int(key).to_bytes(8, "little", signed=True))
    for name in sorted(parts):
        t = parts[name].contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def complete(folder: str | Path, items: int) -> dict:
    """Write the completion record into index.json (after `merge_index`): the data's `items`,
    how many are cached, how many were skipped (they did not fit data.max_length). From then on
    the cache reads as finished. Returns the record."""
    folder = Path(folder)
    index = _read_json(folder / INDEX)
    cached = _cached(index["shards"])
    index["complete"] = {"items": items, "cached": cached, "skipped": items - cached}
    _write_json(folder / INDEX, index)
    return index["complete"]


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
                        f"run {_finish_with(_indices(folder))} again to finish it")
    path = folder / INDEX
    if not path.is_file():
        raise DataError(f"{folder}: not a teacher-feature cache (no {INDEX}); write one with `genrecal teach`")
    index = _read_json(path)
    if "complete" not in index:
        raise DataError(f"{folder}: an unfinished cache ({_cached(index['shards']):,} items written, then its writer "
                        f"stopped); run {_finish_with([index])} again to finish it")
    return index


def _recorded_command(indices: list[dict]) -> str | None:
    """The command that writes the cache, as its indices record it."""
    return next((index["command"] for index in indices if index.get("command")), None)


def _finish_with(indices: list[dict]) -> str:
    command = _recorded_command(indices)
    return f"`{command}`" if command else "the same `genrecal teach`"


def _read_json(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if index.get("format") != FORMAT:
        raise DataError(f"{path}: cache format {index.get('format')!r}, this genrecal reads format {FORMAT}; "
                        f"remove {path.parent} and write the cache again with `genrecal teach`")
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
        self.shards = {s["file"]: s for s in index["shards"]}
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
            shard = open_shard(self.folder, self.shards[file])
            if isinstance(shard, str):
                raise DataError(f"{self.folder / file}: {shard}; {_REPAIR.format(folder=self.folder)}")
            if len(self._open) >= 64:  # a bounded number of open files
                self._open.pop(next(iter(self._open)))
            self._open[file] = shard
        return self._open[file]

    def items(self, indices: Sequence[int]) -> list[ItemFeatures]:
        out = []
        for i in indices:
            if i not in self.where:
                raise DataError(f"{self.folder}: item {i} is not in the cache (written for other data?)")
            shard = self._shard(self.where[i])
            item = shard.item(i)
            if item is None:
                raise DataError(f"{self.folder / self.where[i]}: item {i} fails its checksum (the shard is damaged); "
                                + _REPAIR.format(folder=self.folder))
            out.append(item)
        return out


_REPAIR = ("find every damaged shard with `genrecal teach --verify {folder}`, "
           "then run the `genrecal teach` that wrote it again: it rewrites them")


def open_shard(folder: Path, record: Mapping) -> "_Shard | str":
    """A listed shard opened (memory-mapped) after its cheap checks: the file is there, its size
    is the index's, its header reads, and it holds the items the index says. What is wrong, in
    words, where a check fails."""
    from safetensors import safe_open

    path = folder / record["file"]
    if not path.is_file():
        return "cache shard missing"
    size = path.stat().st_size
    if "bytes" in record and size != record["bytes"]:
        return f"cache shard is cut short or corrupt ({size:,} bytes, the index says {record['bytes']:,})"
    try:  # memory-mapped: an item reads its own rows, never the whole shard
        handle = safe_open(str(path), "pt")
        small = {k: handle.get_tensor(k) for k in handle.keys()
                 if k in ("index", "checksum") or k.startswith("offsets.")}
    except Exception as exc:  # safetensors: header or length wrong
        return (f"cache shard is cut short or corrupt ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})")
    if "index" not in small or "checksum" not in small or small["index"].tolist() != list(record["items"]):
        return "cache shard is corrupt (its item keys are not the ones the index lists)"
    return _Shard(handle, small)


def check_shard(folder: Path, record: Mapping) -> str:
    """'' when a shard is intact (open_shard's checks, then every item's checksum), else what is
    wrong with it."""
    shard = open_shard(folder, record)
    if isinstance(shard, str):
        return shard
    bad = [i for i in record["items"] if shard.item(i) is None]  # (a damaged offset reads as None too)
    if bad:
        return f"{len(bad)} of {len(record['items'])} items fail their checksum (first: item {bad[0]})"
    return ""


def verify(folder: str | Path, progress=None) -> dict:
    """Every shard of a cache checked in full (`genrecal teach --verify`): what is damaged, one
    line per shard, and what the index says. `progress(done, total)` after each shard."""
    folder = Path(folder)
    indices = _indices(folder)
    if not indices:
        raise DataError(f"{folder}: not a teacher-feature cache (no {INDEX}); write one with `genrecal teach`")
    shards = []
    for index in indices:
        shards = _union(shards, index["shards"])
    damaged = []
    for k, shard in enumerate(shards):
        problem = check_shard(folder, shard)
        if problem:
            damaged.append(f"{shard['file']}: {problem}")
        if progress is not None:
            progress(k + 1, len(shards))
    main = indices[0] if (folder / INDEX).is_file() else {}
    return {"shards": len(shards), "items": _cached(shards),
            "bytes": sum(s.get("bytes", 0) for s in shards), "damaged": damaged,
            "complete": main.get("complete"), "partial": len(indices) - (1 if main else 0),
            "command": _recorded_command(indices)}


class _Shard:
    """One open shard: its index, offsets and checksums in memory, its tensors read by rows on
    demand; each item's checksum checked the first time this process reads it."""

    def __init__(self, handle, small: dict[str, torch.Tensor]):
        self.handle = handle
        self.offsets = _offsets(small)
        self.position = {int(i): k for k, i in enumerate(small["index"].tolist())}
        self.checksums = small["checksum"].tolist()
        self.names = sorted(n for n in handle.keys() if _is_data(n))
        self.verified: set[int] = set()

    def item(self, i: int) -> ItemFeatures | None:
        """Item `i` (features decoded to float32), or None where its bytes fail the checksum."""
        k = self.position[i]
        stored = {}
        try:
            for name in self.names:
                offsets = self.offsets[_base(name)]
                stored[name] = self.handle.get_slice(name)[offsets[k]:offsets[k + 1]]
        except Exception:  # a damaged offset reads outside its tensor
            return None
        if k not in self.verified:
            if _checksum(i, stored) != self.checksums[k]:
                return None
            self.verified.add(k)
        fields = {}
        for name in self.offsets:
            if name in _FEATURES:
                fields[name] = from_storage(stored[name], stored.get(f"{name}.scale"))
            else:
                fields[name] = stored[name].long()
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


def fingerprint(recipe, teacher_path: str, held_out: int = 0) -> dict[str, str]:
    """What the teacher's features depend on, each part a short digest: the teacher's weights
    (`weights_digest`: its safetensors headers and sampled values of every tensor; a hub
    teacher: its commit), its tokenizer and processor files, the training data (the recipe's
    data table, the rows held out of it for the accuracy table, and the files' sizes and first
    and last MiB; a hub data set: its commit),
    max_length, the answer input, the teacher's dtype and the compute precision. Not the
    student: one cache serves every student."""
    import dataclasses
    import hashlib

    from ..models import processor_files
    from .parallel import mixed_precision

    def digest(parts: Iterable[bytes]) -> str:
        h = hashlib.sha256()
        for part in parts:
            h.update(len(part).to_bytes(8, "little") + part)
        return h.hexdigest()[:16]

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
        "the teacher's weights": weights_digest(folder) if folder.is_dir() else
        f"hub:{teacher_path}@{hub_commit(teacher_path, recipe.teacher.revision, 'model')}",
        "the teacher's tokenizer and processor": digest(p.read_bytes() for _, p in sorted(processor_files(
            teacher_path, recipe.teacher.revision).items())),
        # (the built-in shapes are drawn with train.seed: another seed is other data)
        "the data": digest([repr(sorted(data.items())).encode(), *([f"held out {held_out}".encode()] if held_out else []),
                            *(sample(source) if source.exists() else []),
                            *([f"hub:{recipe.data.source}@{hub_commit(recipe.data.source, None, 'dataset')}".encode()]
                              if _is_hub_id(recipe.data.source) and not source.exists() else []),
                            *([str(recipe.train.seed).encode()] if recipe.data.source == "shapes" else [])]),
        "data.max_length": str(recipe.data.max_length),
        "recalibrator.answer_input": recipe.recalibrator.answer_input,
        "teacher.dtype": recipe.teacher.dtype,
        "train.precision": mixed_precision(recipe),
    }


SAMPLE = 4096  # bytes of each window of a tensor's values the fingerprint reads


def weights_digest(folder: Path) -> str:
    """A digest of a local model's weights that changes when their values change, cheap enough
    for a 150 GB teacher: each safetensors file's name, size and header (names, shapes, dtypes,
    offsets), and of every tensor three windows of SAMPLE bytes of its values (its start, middle
    and end). Retraining moves nearly every value of every tensor it trains, so every tensor
    retrained changes the digest; an edit of single values away from those windows does not.
    It reads about 12 KiB per tensor: some 15 MB for a 72B model's ~1,300 tensors, whatever
    their size."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = fh.read(min(n, 100 << 20))
            h.update(f.name.encode() + f.stat().st_size.to_bytes(8, "little") + header)
            try:
                tensors = json.loads(header)
            except ValueError:  # not a safetensors header: its size and first bytes only
                continue
            for name in sorted(k for k in tensors if k != "__metadata__"):
                start, end = tensors[name]["data_offsets"]
                for at in sorted({start, max(start, (start + end - SAMPLE) // 2), max(start, end - SAMPLE)}):
                    fh.seek(8 + n + at)
                    h.update(fh.read(min(SAMPLE, end - at)))
    return h.hexdigest()[:16]


def _is_hub_id(source: str) -> bool:
    """"org/name" (or "name"), not a local path or a built-in data set."""
    return not source.startswith((".", "/", "~")) and source not in ("shapes", "chats") and \
        Path(source).suffix == "" and source.count("/") <= 1


def hub_commit(repo: str, revision: str | None, kind: str) -> str:
    """The commit of a hub model or data set that this machine's hub cache holds for `revision`
    (default: main): what was read, so a hub repo's later commits count as another setup."""
    import re

    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import constants

    refs = Path(constants.HF_HUB_CACHE) / f"{kind}s--{repo.replace('/', '--')}" / "refs" / (revision or "main")
    if refs.is_file():
        return refs.read_text().strip()
    raise DataError(f"{repo}: not in this machine's hub cache ({refs.parent.parent}), so the cache cannot tell "
                    f"which commit of this {kind} it holds; load it once (with network) first")


def check_answers(cached: TeacherFeatures, teacher_batch: dict, keys: Sequence[int], folder: Path) -> None:
    """The cached answer tokens of each item are the answer ids of the teacher side rendered now
    (with another student, max_length may keep other turns: then the cache does not fit that
    item; another tokenizer or template would give other ids)."""
    answer = is_answer(teacher_batch["segment"])
    counts = cached.answer.mask.sum(1).tolist()
    stored = cached.targets.detach().cpu().split(counts)
    for b, (key, then) in enumerate(zip(keys, stored)):
        now = teacher_batch["input_ids"][b][answer[b]].cpu()
        if len(now) != len(then):
            raise DataError(f"{folder}: item {key} has {len(then)} answer tokens in the cache but {len(now)} as "
                            "rendered now (data.max_length keeps other turns with this student?); write the cache again")
        if not torch.equal(now, then.to(now.dtype)):
            at = int((now != then.to(now.dtype)).nonzero()[0])
            raise DataError(f"{folder}: item {key}'s answer token {at} is {int(then[at])} in the cache but "
                            f"{int(now[at])} as rendered now (another tokenizer, template or data?); "
                            "write the cache again")
