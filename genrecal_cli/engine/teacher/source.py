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

    def __init__(self, teacher, answer_input: str):
        self.teacher, self.answer_input = teacher, answer_input

    def features(self, batch: dict) -> TeacherFeatures:
        return teacher_features(self.teacher, batch["teacher"], self.answer_input)


class CachedTeacher:
    """Features read from a teacher-feature cache by whoever collates the batch (a loader worker),
    and checked there against the teacher side rendered now: no teacher forward. An id-only
    cache's answer inputs are looked up in `embeddings` (the teacher's input embeddings, on the
    run's device) at each micro-batch."""

    def __init__(self, reader: CacheReader, embeddings: torch.nn.Module | None = None):
        if reader.answers == "ids" and embeddings is None:
            raise ValueError(f"{reader.folder}: an id-only cache needs the teacher's input embeddings")
        self.embeddings = embeddings if reader.answers == "ids" else None
        self.with_question = reader.with_question
        self.collate = ReadCache(reader)  # (the loader's workers get the reader, not the embeddings)

    def features(self, batch: dict) -> TeacherFeatures:
        features = batch["teacher_features"]
        return features if self.embeddings is None else with_answer_embeddings(features, self.embeddings)


class ReadCache:
    """What a loader worker adds to a collated batch: its items' cached features, checked."""

    def __init__(self, reader: CacheReader):
        self.reader = reader

    def __call__(self, batch: dict) -> dict:
        keys = batch["keys"]
        features = join_items(self.reader.items(keys), hidden=self.reader.hidden_size)
        check_answers(features, batch["teacher"], keys, self.reader.folder)
        return {"teacher_features": features}
