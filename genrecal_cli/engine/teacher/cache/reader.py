"""Reading the teacher-feature cache: refused while unfinished (with the command that finishes
it), checked against the run's fingerprint (naming what changed), each shard checked when it is
opened (its size against the index, its header, its item keys) and each item's checksum when a
process first reads it: in the loader workers, off the training step.

The checksum is per item, not per file, because training reads items at random across every
shard: a whole-file hash would read the whole cache in every worker. `verify` checks every item
of every shard (`genrecal teach --verify DIR`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ....data.render import is_answer
from ....errors import DataError
from ..features import TeacherFeatures
from .fingerprint import fingerprint_changes
from .format import (FEATURES, INDEX, LOGPROBS, PARTIAL, ItemFeatures, base_name, count_items, finish_with,
                     from_storage, is_data, item_checksum, read_indices, read_json, recorded_command,
                     shard_offsets, union_shards)


def read_index(folder: Path) -> dict:
    """A finished cache's index (refused while writers' partial indices are left: unfinished)."""
    folder = Path(folder)
    if any(folder.glob(PARTIAL)):
        raise DataError(f"{folder}: an unfinished cache (its writers stopped before merging their indices); "
                        f"run {finish_with(read_indices(folder))} again to finish it")
    path = folder / INDEX
    if not path.is_file():
        raise DataError(f"{folder}: not a teacher-feature cache (no {INDEX}); write one with `genrecal teach`")
    index = read_json(path)
    if "complete" not in index:
        raise DataError(f"{folder}: an unfinished cache ({count_items(index['shards']):,} items written, then its writer "
                        f"stopped); run {finish_with([index])} again to finish it")
    return index



class CacheReader:
    """A finished cache, checked against the run's fingerprint; `items(indices)` reads items."""

    def __init__(self, folder: str | Path,
                 fingerprint: Mapping[str, str] | Callable[[str], Mapping[str, str]] | None = None):
        """fingerprint: the run's, or a function of the cache's rows form (format.rows_form) giving
        it: a top-K cache also depends on loss.temperature, a cache of rows does not."""
        self.folder = Path(folder)
        index = read_index(self.folder)
        self.rows = index.get("rows", "full")  # caches from before top-K hold rows
        self.answers = index.get("answers", "features")  # "ids": the answer inputs are looked up when read
        if fingerprint is not None:
            expected = fingerprint(self.rows) if callable(fingerprint) else fingerprint
            changed = fingerprint_changes(index["fingerprint"], expected)
            if changed:
                raise DataError(f"{self.folder}: this cache was written for another setup: {changed} changed; "
                                "write it again with `genrecal teach`")
        self.storage, self.with_question, self.hidden_size = index["storage"], index["with_question"], index.get("hidden_size")
        self.shards = {s["file"]: s for s in index["shards"]}
        self.where = {i: s["file"] for s in index["shards"] for i in s["items"]}
        self._open: dict[str, _Shard] = {}  # the most recently opened shards (each a memory map)

    def __getstate__(self) -> dict:  # for loader workers: open shards are not carried over
        return {**self.__dict__, "_open": {}}

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
    line per shard, and what the index says (its form: storage, rows, answers). `progress(done, total)` after each shard."""
    folder = Path(folder)
    indices = read_indices(folder)
    if not indices:
        raise DataError(f"{folder}: not a teacher-feature cache (no {INDEX}); write one with `genrecal teach`")
    shards = []
    for index in indices:
        shards = union_shards(shards, index["shards"])
    damaged = []
    for k, shard in enumerate(shards):
        problem = check_shard(folder, shard)
        if problem:
            damaged.append(f"{shard['file']}: {problem}")
        if progress is not None:
            progress(k + 1, len(shards))
    main = indices[0] if (folder / INDEX).is_file() else {}
    return {"shards": len(shards), "items": count_items(shards),
            "bytes": sum(s.get("bytes", 0) for s in shards), "damaged": damaged,
            "complete": main.get("complete"), "partial": len(indices) - (1 if main else 0),
            "command": recorded_command(indices),
            "form": {"storage": indices[0]["storage"], "rows": indices[0].get("rows", "full"),
                     "answers": indices[0].get("answers", "features")}}


class _Shard:
    """One open shard: its index, offsets and checksums in memory, its tensors read by rows on
    demand; each item's checksum checked the first time this process reads it."""

    def __init__(self, handle, small: dict[str, torch.Tensor]):
        self.handle = handle
        self.offsets = shard_offsets(small)
        self.position = {int(i): k for k, i in enumerate(small["index"].tolist())}
        self.checksums = small["checksum"].tolist()
        self.names = sorted(n for n in handle.keys() if is_data(n))
        self.verified: set[int] = set()

    def item(self, i: int) -> ItemFeatures | None:
        """Item `i` (features decoded to float32), or None where its bytes fail the checksum."""
        k = self.position[i]
        stored = {}
        try:
            for name in self.names:
                offsets = self.offsets[base_name(name)]
                stored[name] = self.handle.get_slice(name)[offsets[k]:offsets[k + 1]]
        except Exception:  # a damaged offset reads outside its tensor
            return None
        if k not in self.verified:
            if item_checksum(i, stored) != self.checksums[k]:
                return None
            self.verified.add(k)
        fields = {"rows": None, "answer": None}
        for name in self.offsets:
            if name in FEATURES:
                fields[name] = from_storage(stored[name], stored.get(f"{name}.scale"))
            elif name in LOGPROBS:
                fields[name] = stored[name].float()
            else:
                fields[name] = stored[name].long()
        return ItemFeatures(**fields)



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
