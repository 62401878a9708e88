"""The teacher-feature cache's storage format (issue 16): what is stored per training item, and
how a cache folder lies on disk.

Per item (a row of the training split, by its index):
    answer        [Ka, d]  the Recalibrator's answer-side input: z_al, or the answer's input
                           embeddings under recalibrator.answer_input = "embeddings"; an id-only
                           cache (`genrecal teach --answers ids`, embeddings only) keeps none:
                           the reader looks the answer ids (`targets`) up in the teacher's table
    answer_turn   [Ka]     each answer token's segment (2k+1), answer_pos [Ka] its position
    rows          [Na, d]  the teacher's own rows predicting each answer token (L_kl's teacher);
                           a top-K cache (`genrecal teach --rows topk:K`) keeps instead
    top_ids       [Na, K]  the teacher's K most likely ids at each answer token (int32), and
    top_logprobs  [Na, K]  their log-probabilities at loss.temperature (float16)
    targets       [Na]     the answer token ids (int32)
    question      [Kq, d]  z_ql with question_turn / question_pos, only where L_reg needs it

Layout of a cache folder:
    index.json              format, fingerprint, storage dtype, feature size, whether the
                            question features are there, the rows and answers forms, the shards (file, item indices, bytes),
                            the command that writes it, and once every item is done its
                            completion record (`complete`: items, cached, skipped)
    shard-00000.safetensors every item of a shard, its tensors concatenated along the first
                            dimension with `offsets.*` [n + 1] cutting them apart again; fp8
                            storage adds a float32 scale per row (`*.scale`); `checksum` [n]:
                            each item's SHA-256 (first 8 bytes) over its key and stored bytes
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from ....errors import DataError
from ...turns import Tokens
from ...losses import TopK
from ..features import TeacherFeatures

FORMAT = 2  # 2: item checksums and the completion record
INDEX = "index.json"
STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
FP8_MAX = 448.0  # the largest finite float8 e4m3fn value
FEATURES = ("answer", "rows", "question")  # [*, d] tensors, stored in the cache's dtype
INTEGERS = ("answer_turn", "answer_pos", "targets", "question_turn", "question_pos", "top_ids")
LOGPROBS = ("top_logprobs",)  # stored as float16 whatever the storage: small numbers, K per token


@dataclass
class ItemFeatures:
    """One item's teacher side, as stored (CPU tensors; features in float32 once read)."""

    answer: torch.Tensor | None  # None in an id-only cache (the answer ids are `targets`)
    answer_turn: torch.Tensor
    answer_pos: torch.Tensor
    rows: torch.Tensor | None
    targets: torch.Tensor
    question: torch.Tensor | None = None
    question_turn: torch.Tensor | None = None
    question_pos: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None  # with top_logprobs, where rows is None (a top-K cache)
    top_logprobs: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k in (*FEATURES, *INTEGERS, *LOGPROBS) if (v := getattr(self, k)) is not None}


def rows_form(top_k: int | None) -> str:
    """How a cache keeps the teacher's distribution: "full" (its rows) or "topk:K"."""
    return "full" if top_k is None else f"topk:{top_k}"


def answers_form(answer_ids: bool) -> str:
    """What a cache keeps of the Recalibrator's answer input: "features" (its rows x) or "ids"
    (nothing beyond the answer ids it keeps anyway: their embeddings are looked up when read)."""
    return "ids" if answer_ids else "features"


def split_items(features: TeacherFeatures, with_question: bool, answer_ids: bool = False) -> list[ItemFeatures]:
    """A batch's teacher features cut into its items (padding dropped); with `answer_ids`, without
    the answer inputs (an id-only cache)."""
    items = []
    counts = features.answer.mask.sum(1).tolist()
    top = features.rows if isinstance(features.rows, TopK) else None
    start = 0
    for b, n in enumerate(counts):
        a, q = features.answer.mask[b], features.question.mask[b]
        these = slice(start, start + n)
        items.append(ItemFeatures(
            answer=None if answer_ids else features.answer.x[b][a].detach().cpu(), answer_turn=features.answer.segment[b][a].cpu(),
            answer_pos=features.answer.pos[b][a].cpu(),
            rows=features.rows[these].detach().cpu() if top is None else None,
            top_ids=top.ids[these].cpu() if top is not None else None,
            top_logprobs=top.logprobs[these].cpu() if top is not None else None,
            targets=features.targets[these].cpu(),
            question=features.question.x[b][q].detach().cpu() if with_question else None,
            question_turn=features.question.segment[b][q].cpu() if with_question else None,
            question_pos=features.question.pos[b][q].cpu() if with_question else None,
        ))
        start += n
    return items


def join_items(items: Sequence[ItemFeatures], device=None, hidden: int | None = None) -> TeacherFeatures:
    """Items' features as one batch's TeacherFeatures (right-padded, as the online teacher's);
    without question features, the question Tokens are empty (L_reg off); from an id-only cache
    the answer Tokens have no features yet (x [B, Ka, 0]: features.with_answer_embeddings adds
    them). `hidden`: the features' width (the index's hidden_size; else the first item's)."""

    def tokens(xs, turns, poss, d) -> Tokens:
        k = max([len(t) for t in turns] + [1])
        x = torch.zeros(len(xs), k, d, dtype=torch.float32)
        turn = torch.full((len(xs), k), -1, dtype=torch.long)
        pos = torch.zeros((len(xs), k), dtype=torch.long)
        for b, (xb, tb, pb) in enumerate(zip(xs, turns, poss)):
            n = len(tb)
            x[b, :n], turn[b, :n], pos[b, :n] = xb.float(), tb.long(), pb.long()
        return Tokens(x.to(device), turn.to(device), pos.to(device))

    ids_only = items[0].answer is None
    d = hidden if hidden is not None else 0 if ids_only else items[0].answer.shape[-1]
    answer = tokens([torch.zeros(len(i.answer_turn), 0) if ids_only else i.answer for i in items],
                    [i.answer_turn for i in items], [i.answer_pos for i in items], 0 if ids_only else d)
    if items[0].question is not None:
        question = tokens([i.question for i in items], [i.question_turn for i in items],
                          [i.question_pos for i in items], d)
    else:
        empty = [torch.zeros(0, dtype=torch.long)] * len(items)
        question = tokens([torch.zeros(0, d)] * len(items), empty, empty, d)
    if items[0].top_ids is not None:
        rows = TopK(torch.cat([i.top_ids.long() for i in items]).to(device),
                    torch.cat([i.top_logprobs.float() for i in items]).to(device))
    else:
        rows = torch.cat([i.rows.float() for i in items]).to(device)
    targets = torch.cat([i.targets.long() for i in items]).to(device)
    return TeacherFeatures(question, answer, rows, targets)


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



def shard_offsets(tensors: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    """A shard's row offsets by tensor ("offsets.answer" -> "answer": where each item's rows start)."""
    return {k[len("offsets."):]: v.tolist() for k, v in tensors.items() if k.startswith("offsets.")}


def count_items(shards: Iterable[Mapping]) -> int:
    """How many items the listed shards hold."""
    return len({i for s in shards for i in s["items"]})


def base_name(name: str) -> str:
    """The tensor whose offsets cut `name` ("answer.scale" -> "answer")."""
    return name.split(".")[0]


def is_data(name: str) -> bool:
    """A tensor that holds items' values (not the shard's index, offsets or checksums)."""
    return name not in ("index", "checksum") and not name.startswith("offsets.")


def item_checksum(key: int, parts: Mapping[str, torch.Tensor]) -> int:
    """An item's checksum: SHA-256 over its key and its stored bytes, tensor by tensor in name
    order (the first 8 bytes, as a signed 64-bit integer)."""
    h = hashlib.sha256(int(key).to_bytes(8, "little", signed=True))
    for name in sorted(parts):
        t = parts[name].contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return int.from_bytes(h.digest()[:8], "little", signed=True)


PARTIAL = "index-r*.json"


def read_indices(folder: Path) -> list[dict]:
    """index.json (if any) and every writer's partial index, read."""
    paths = ([folder / INDEX] if (folder / INDEX).is_file() else []) + sorted(folder.glob(PARTIAL))
    return [read_json(p) for p in paths]


def union_shards(shards: list[dict], more: list[dict]) -> list[dict]:
    known = {s["file"] for s in shards}
    return shards + [s for s in more if s["file"] not in known]


def write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def recorded_command(indices: list[dict]) -> str | None:
    """The command that writes the cache, as its indices record it."""
    return next((index["command"] for index in indices if index.get("command")), None)


def finish_with(indices: list[dict]) -> str:
    command = recorded_command(indices)
    return f"`{command}`" if command else "the same `genrecal teach`"


def read_json(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if index.get("format") != FORMAT:
        raise DataError(f"{path}: cache format {index.get('format')!r}, this genrecal reads format {FORMAT}; "
                        f"remove {path.parent} and write the cache again with `genrecal teach`")
    return index



INTEGER_BYTES = {"answer": 12, "question": 8}  # per token: segment, position (int32 each), target id (int32)


def size_estimate(answer_tokens: int, question_tokens: int, hidden: int, storage: str,
                  top_k: int | None = None, answer_ids: bool = False) -> dict[str, int]:
    """Bytes of a cache: answer features and the rows predicting them (2 x answer tokens x hidden;
    a top-K cache: the features and K x (4 + 2) bytes per answer token instead of the rows; an
    id-only cache: no answer features), the question features separately (question tokens x
    hidden), per storage dtype; fp8 adds a 4-byte scale per row; and 12 bytes of integers per
    answer token (segment, position, target id), 8 per question token."""
    per = {"fp32": 4, "bf16": 2, "fp8": 1}[storage]
    row = hidden * per + (4 if storage == "fp8" else 0)
    teacher = row if top_k is None else top_k * 6
    answer = 0 if answer_ids else row
    return {"answer": answer_tokens * (answer + teacher + INTEGER_BYTES["answer"]),
            "question": question_tokens * (row + INTEGER_BYTES["question"])}

