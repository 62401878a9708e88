"""The one place a stage asks for a batch's teacher features: the teacher's forward at each
micro-batch, or the teacher-feature cache read where the batch is collated.

A stage calls `source.features(batch)` on every process together, after the micro-batch's
check that every process has its batch (parallel.stop_together), and hands `source.collate` to
the loader: what the loader's workers add to each batch they collate (None: nothing). Whatever
can fail on one process alone (a damaged cache item, a cache written for other answers) fails
in `collate`, where an unreadable row fails, so that every process agrees to stop before any
collective of the step.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from .cache.format import join_items
from .cache.reader import CacheReader, check_answers
from .features import TeacherFeatures, teacher_features, with_answer_embeddings


class TeacherSource(Protocol):
    with_question: bool  # whether the question features (L_reg's) are there
    collate: Callable[[dict], dict] | None  # what the loader adds to a collated batch

    def features(self, batch: dict) -> TeacherFeatures: ...


class OnlineTeacher:
    """The teacher's forward at each micro-batch, replicated or sharded (FSDP2: then a collective,
    which is why every process calls `features` together). Call it under the run's autocast."""

    with_question = True
    collate = None

    def __init__(self, teacher, answer_input: str, side: str = "teacher"):
        self.teacher, self.answer_input, self.side = teacher, answer_input, side

    def features(self, batch: dict) -> TeacherFeatures:
        return teacher_features(self.teacher, batch[self.side], self.answer_input)


class CachedTeacher:
    """Features read from a teacher-feature cache by whoever collates the batch (a loader worker),
    and checked there against the teacher side rendered now: no teacher forward. An id-only
    cache's answer inputs are looked up in `embeddings` (the teacher's input embeddings, on the
    run's device) at each micro-batch. `side`: the teacher's side of the batch ("teacher", or
    "teacher:NAME" with several teachers)."""

    def __init__(self, reader: CacheReader, embeddings: torch.nn.Module | None = None, side: str = "teacher"):
        if reader.answers == "ids" and embeddings is None:
            raise ValueError(f"{reader.folder}: an id-only cache needs the teacher's input embeddings")
        self.embeddings = embeddings if reader.answers == "ids" else None
        self.with_question = reader.with_question
        self.collate = ReadCache(reader, side)  # (the loader's workers get the reader, not the embeddings)
        self.side = side

    def features(self, batch: dict) -> TeacherFeatures:
        features = batch[f"{self.side}_features"]
        return features if self.embeddings is None else with_answer_embeddings(features, self.embeddings)


class ReadCache:
    """What a loader worker adds to a collated batch: its items' cached features, checked."""

    def __init__(self, reader: CacheReader, side: str = "teacher"):
        self.reader, self.side = reader, side

    def __call__(self, batch: dict) -> dict:
        keys = batch["keys"]
        features = join_items(self.reader.items(keys), hidden=self.reader.hidden_size)
        check_answers(features, batch[self.side], keys, self.reader.folder)
        return {f"{self.side}_features": features}


class Attach:
    """Every source's `collate` in turn (several teachers, each from its own cache or none): what
    the loader adds to a collated batch; None when no source adds anything."""

    def __init__(self, collates: list):
        self.collates = [c for c in collates if c is not None]

    @classmethod
    def of(cls, sources: list):
        attach = cls([s.collate for s in sources])
        if len(attach.collates) < 2:  # nothing, or the one source's own
            return attach.collates[0] if attach.collates else None
        return attach

    def __call__(self, batch: dict) -> dict:
        out: dict = {}
        for collate in self.collates:
            out.update(collate(batch))
        return out
