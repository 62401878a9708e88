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

from .cache.format import join_items
from .cache.reader import CacheReader, check_answers
from .features import TeacherFeatures, teacher_features


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
    and checked there against the teacher side rendered now: no teacher forward."""

    def __init__(self, reader: CacheReader):
        self.reader = reader
        self.with_question = reader.with_question

    def collate(self, batch: dict) -> dict:
        keys = batch["keys"]
        features = join_items(self.reader.items(keys))
        check_answers(features, batch["teacher"], keys, self.reader.folder)
        return {"teacher_features": features}

    def features(self, batch: dict) -> TeacherFeatures:
        return batch["teacher_features"]
