"""Writing the teacher-feature cache (format.py says what lies where).

Shards are written under a temporary name and renamed into place, then the index is rewritten
(atomically): a killed writer leaves finished shards that a resumed one keeps, once each passed
its checks (size, header, every item's checksum); a damaged one is removed and its items computed
again. Several processes write together: each its own shards (`shard-r<rank>-*`) and its own
partial index (`index-r<rank>.json`), which the main process merges into index.json at the end
(`merge_index`) before it writes the completion record (`complete`); a resumed writer, on any
number of processes, counts what every index names as done.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ....errors import DataError
from .fingerprint import fingerprint_changes
from .format import (FEATURES, FORMAT, INDEX, INTEGERS, LOGPROBS, PARTIAL, STORAGE, ItemFeatures, base_name,
                     count_items, is_data, item_checksum, read_indices, read_json, shard_offsets, to_storage,
                     union_shards, write_json)
from .reader import check_shard


class CacheWriter:
    """Writes items into shards of `items_per_shard`; resumes a folder whose index says which
    shards are done (same fingerprint), so only the missing items are computed again."""

    def __init__(self, folder: str | Path, fingerprint: Mapping[str, str], *, storage: str = "bf16",
                 with_question: bool = True, items_per_shard: int = 1024, hidden_size: int | None = None,
                 part: int = 0, parts: int = 1, command: str | None = None, rows: str = "full",
                 answers: str = "features"):
        if storage not in STORAGE:
            raise ValueError(f"storage {storage!r} is not one of {', '.join(STORAGE)}")
        self.folder = Path(folder)
        self.fingerprint, self.storage, self.with_question = dict(fingerprint), storage, with_question
        self.rows, self.answers = rows, answers  # format.rows_form, format.answers_form
        self.items_per_shard, self.hidden_size, self.command = items_per_shard, hidden_size, command
        # one writer of several (process `part` of `parts`): its own shard names and partial index
        self.prefix, self.index_name = ("shard-", INDEX) if parts == 1 else (f"shard-r{part}-", f"index-r{part}.json")
        self.shards: list[dict] = []
        self._pending: dict[int, ItemFeatures] = {}
        for old in read_indices(self.folder):
            changed = fingerprint_changes(old["fingerprint"], self.fingerprint)
            if changed:
                raise DataError(f"{self.folder}: holds a cache for another setup ({changed}); "
                                "write to another folder or remove it")
            then = (old["storage"], old["with_question"], old.get("rows", "full"), old.get("answers", "features"))
            if then != (storage, with_question, rows, answers):
                raise DataError(f"{self.folder}: holds a cache stored as {old['storage']} "
                                f"{'with' if old['with_question'] else 'without'} question features, "
                                f"rows {then[2]}, answers {then[3]}; "
                                "resume it with the same settings or write to another folder")
            self.shards = union_shards(self.shards, old["shards"])
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
        for name in (*FEATURES, *INTEGERS, *LOGPROBS):
            parts = [getattr(it, name) for it in items]
            if parts[0] is None:
                continue
            tensors[f"offsets.{name}"] = torch.tensor([0] + [len(p) for p in parts], dtype=torch.long).cumsum(0)
            joined = torch.cat(parts)
            if name in FEATURES:
                self.hidden_size = self.hidden_size or int(joined.shape[-1])
                for suffix, t in to_storage(joined, self.storage).items():
                    tensors[name + suffix] = t
            elif name in LOGPROBS:
                tensors[name] = joined.to(torch.float16).contiguous()
            else:
                tensors[name] = joined.to(torch.int32).contiguous()  # segments, positions, token ids
        offsets = shard_offsets(tensors)
        tensors["checksum"] = torch.tensor(
            [item_checksum(key, {name: t[offsets[base_name(name)][k]:offsets[base_name(name)][k + 1]]
                             for name, t in tensors.items() if is_data(name)}) for k, key in enumerate(indices)],
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
                 "with_question": self.with_question, "rows": self.rows, "answers": self.answers,
                 "hidden_size": self.hidden_size,
                 "command": self.command, "shards": self.shards}
        write_json(self.folder / self.index_name, index)  # no completion record: `complete` writes it



def complete(folder: str | Path, items: int) -> dict:
    """Write the completion record into index.json (after `merge_index`): the data's `items`,
    how many are cached, how many were skipped (they did not fit data.max_length). From then on
    the cache reads as finished. Returns the record."""
    folder = Path(folder)
    index = read_json(folder / INDEX)
    cached = count_items(index["shards"])
    index["complete"] = {"items": items, "cached": cached, "skipped": items - cached}
    write_json(folder / INDEX, index)
    return index["complete"]


def merge_index(folder: str | Path) -> None:
    """Every writer's partial index merged into index.json (the union of their finished shards),
    then the partial ones removed: the last step of a cache written by several processes (run
    by one process once all have flushed)."""
    folder = Path(folder)
    indices = read_indices(folder)
    if not indices:
        return
    merged = dict(indices[-1])
    merged["shards"] = []
    for index in indices:
        merged["shards"] = union_shards(merged["shards"], [s for s in index["shards"] if (folder / s["file"]).is_file()])
        merged["hidden_size"] = merged.get("hidden_size") or index.get("hidden_size")
    write_json(folder / INDEX, merged)
    for part in folder.glob(PARTIAL):
        part.unlink()

