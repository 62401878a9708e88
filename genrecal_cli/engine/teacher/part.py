"""One teacher's part in a run: its model, where its features come from, its Recalibrator and the
weight of its loss terms.

A recipe of one teacher has one part, named "teacher", whose batch side, metric names and files
are those of every run before several teachers: side "teacher", metrics "ar", "top1",
recalibrator.safetensors. With several `[[teachers]]` each part has its own: side
"teacher:NAME", metrics "NAME/ar", "NAME/top1", recalibrators/NAME.safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...recipe import Recipe, TeacherView
from ..recalibrator import Recalibrator
from .source import TeacherSource


@dataclass
class TeacherPart:
    name: str  # "teacher" (one teacher) or its [[teachers]] name
    weight: float  # of its loss terms (one teacher: 1)
    recipe: Recipe  # the run as a run of this teacher alone (recipe.TeacherView)
    vlm: Any  # models.VLM, frozen, in its recipe dtype (only its head, and embeddings, from a cache)
    source: TeacherSource  # where its features come from
    several: bool  # one of several teachers
    sharded: bool = False  # its weights split over the processes (an online teacher, parallel.teacher = "shard")
    recalibrator: Recalibrator | None = None

    @classmethod
    def of(cls, view: TeacherView, vlm, source: TeacherSource, several: bool, sharded: bool = False) -> "TeacherPart":
        return cls(view.name, view.weight, view.recipe, vlm, source, several, sharded)

    @property
    def cached(self) -> bool:
        return self.recipe.teacher.cache is not None

    @property
    def side(self) -> str:
        """Its key in a collated batch (and in the data report's reasons)."""
        return side_of(self.name, self.several)

    @property
    def key(self) -> str:
        """What its metric names start with."""
        return f"{self.name}/" if self.several else ""

    @property
    def file(self) -> str:
        """Its Recalibrator's file in a checkpoint folder."""
        return f"recalibrators/{self.name}.safetensors" if self.several else "recalibrator.safetensors"

    @property
    def state_prefix(self) -> str:
        """Its Recalibrator's names in the trained module's state dict."""
        return f"recalibrators.{self.name}" if self.several else "recalibrator"

    @property
    def title(self) -> str:
        """How notes and the accuracy table name it."""
        return f"teacher {self.name}" if self.several else "teacher"


def side_of(name: str, several: bool) -> str:
    return f"teacher:{name}" if several else "teacher"


def saved_names(parts: list[TeacherPart]) -> dict[str, list[str]]:
    """What a checkpoint's meta.json says of the teachers: their names with several (a resumed
    run must have the same, in order), nothing with one (as before several teachers)."""
    return {"teachers": [p.name for p in parts]} if any(p.several for p in parts) else {}
