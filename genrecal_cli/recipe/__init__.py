"""Recipes: one TOML file read once into frozen dataclasses (`specs`), validated strictly at load
with every problem reported together (`load`). Standard library only, so `genrecal --help` stays fast.
"""

from .load import load_recipe, parse_override, recipe_from_dict
from .specs import (
    BUILT_IN_DATA,
    TRACKERS,
    ZOO_PREFIX,
    DataSpec,
    LossSpec,
    ModelSpec,
    ParallelSpec,
    RecalibratorSpec,
    Recipe,
    StageSpec,
    StagesSpec,
    TeacherSpec,
    TeacherView,
    TrainSpec,
    looks_like_hub_id,
)

__all__ = [
    "BUILT_IN_DATA", "TRACKERS", "ZOO_PREFIX", "DataSpec", "LossSpec", "ModelSpec", "ParallelSpec", "RecalibratorSpec",
    "Recipe", "StageSpec", "StagesSpec", "TeacherSpec", "TeacherView", "TrainSpec", "load_recipe", "looks_like_hub_id", "parse_override",
    "recipe_from_dict",
]
