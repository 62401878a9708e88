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
    view: TeacherView  # its name, weight, recipe table, and the recipe as a run of it alone
    vlm: Any  # models.VLM, frozen, in its recipe dtype (only its head, and embeddings, from a cache)
    source: TeacherSource  # where its features come from
    sharded: bool = False  # its weights split over the processes (an online teacher, parallel.teacher = "shard")
    recalibrator: Recalibrator | None = None

    @property
    def name(self) -> str:
        """"teacher" (one teacher) or its [[teachers]] name."""
        return self.view.name

    @property
    def weight(self) -> float:
        """Of its loss terms (one teacher: 1)."""
        return self.view.weight

    @property
    def recipe(self) -> Recipe:
        return self.view.recipe

    @property
    def several(self) -> bool:
        return self.view.several

    @property
    def side(self) -> str:
        return self.view.side

    @property
    def cached(self) -> bool:
        return self.recipe.teacher.cache is not None

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
        return self.view.title


def recalibrator_files(parts: list[TeacherPart]) -> dict[str, tuple[str, Recalibrator]]:
    """The parts' Recalibrators as a checkpoint holds them: file -> (state prefix, module)."""
    return {p.file: (p.state_prefix, p.recalibrator) for p in parts if p.recalibrator is not None}


def saved_names(parts: list[TeacherPart]) -> dict[str, list[str]]:
    """What a checkpoint's meta.json says of the teachers: their names with several (a resumed
    run must have the same, in order), nothing with one (as before several teachers)."""
    return {"teachers": [p.name for p in parts]} if any(p.several for p in parts) else {}
