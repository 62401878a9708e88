"""`genrecal distill --dry-run --gpus N`: the memory plan. make.py makes the plan with its verdict
and suggestion; estimate.py counts one stage's bytes per GPU; model_shape.py reads a model's
shape from its config and safetensors headers."""

from .make import make_plan, render

__all__ = ["make_plan", "render"]
