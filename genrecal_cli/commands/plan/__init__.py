"""`genrecal distill --dry-run --gpus N`: the memory plan.

make.py: the plan, its verdict, a suggestion; estimate.py: one stage's bytes per GPU;
model_shape.py: a model's shape from its config and safetensors headers."""

from .make import make_plan, render

__all__ = ["make_plan", "render"]
