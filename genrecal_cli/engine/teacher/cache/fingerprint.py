"""What a teacher-feature cache was computed from: a fingerprint of the teacher, its processor,
the data and the settings the features depend on, compared part by part when the cache is read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Mapping

from ....errors import DataError


def fingerprint(recipe, teacher_path: str, held_out: int = 0, rows: str = "full") -> dict[str, str]:
    """What the teacher's features depend on, each part a short digest: the teacher's weights
    (`weights_digest`: its safetensors headers and sampled values of every tensor; a hub
    teacher: its commit), its tokenizer and processor files, the training data (the recipe's
    data table, the rows held out of it for the accuracy table, and the files' sizes and first
    and last MiB; a hub data set: its commit),
    max_length, the answer input, the teacher's dtype and the compute precision, the teacher's
    processor settings ([teacher.processor]) where set; for a top-K
    cache (`rows` "topk:K") also loss.temperature. Not the student: one cache serves every
    student."""
    import dataclasses
    import hashlib

    from ....models import processor_files
    from ...parallel import mixed_precision

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
    parts = {
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
    if recipe.teacher.processor:  # the teacher's image settings change its image tokens (none: as before them)
        parts["teacher.processor"] = digest([json.dumps(recipe.teacher.processor, sort_keys=True).encode()])
    if rows != "full":  # a top-K cache keeps log-probabilities at the loss temperature
        parts["loss.temperature"] = str(recipe.loss.temperature)
    return parts


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



def fingerprint_changes(saved: Mapping[str, str], current: Mapping[str, str]) -> str:
    """'' when equal, else which parts differ, e.g. "the teacher's weights, max_length"."""
    keys = [k for k in dict.fromkeys([*saved, *current]) if saved.get(k) != current.get(k)]
    return ", ".join(keys)

