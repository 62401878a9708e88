"""What `genrecal eval` reports: each model's numbers, what the model was, the comparison with
the first model, in a JSON form that reads back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelResult:
    """One model's rows (benchmark, metric, value, stderr, n) and what it was."""

    path: str
    label: str
    metadata: dict[str, Any] | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    dtype: str | None = None
    examples: dict[str, dict[str, Any]] = field(default_factory=dict)  # benchmark: first item's prompt and answer
    seconds: float = 0.0


@dataclass
class EvalReport:
    models: list[ModelResult]
    protocol: dict[str, Any]

    def comparison(self) -> list[dict[str, Any]]:
        """One row per (benchmark, metric): every model's value and its difference to the first model's."""
        if not self.models:
            return []
        keys = [(r["benchmark"], r["metric"]) for r in self.models[0].rows]
        out = []
        for bench, metric in keys:
            values = [_value(m, bench, metric) for m in self.models]
            base = values[0]
            out.append(
                {
                    "benchmark": bench,
                    "metric": metric,
                    "values": {m.label: v for m, v in zip(self.models, values)},
                    "delta": {
                        m.label: (v - base if v is not None and base is not None else None)
                        for m, v in zip(self.models[1:], values[1:])
                    },
                }
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "models": [
                {
                    "label": m.label,
                    "path": m.path,
                    "dtype": m.dtype,
                    "produced_by": _produced_by(m.metadata),
                    "metadata": m.metadata,
                    "results": m.rows,
                    "examples": m.examples,
                    "seconds": round(m.seconds, 2),
                }
                for m in self.models
            ],
            "comparison": self.comparison(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalReport:
        """A report read back from its to_dict() form (the comparison is derived again)."""
        models = [
            ModelResult(path=m["path"], label=m.get("label", m["path"]), metadata=m.get("metadata"), rows=m["results"],
                        dtype=m.get("dtype"), examples=m.get("examples", {}), seconds=m.get("seconds", 0.0))
            for m in d["models"]
        ]
        return cls(models, d.get("protocol", {}))


def _produced_by(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """Which run, recipe and stage made a model genrecal exported (from its genrecal.json)."""
    if not meta:
        return None
    recipe, stages = meta.get("recipe") or {}, list(meta.get("stages") or {})
    return {
        "run": (recipe.get("train") or {}).get("output_dir"),
        "student_from": (recipe.get("student") or {}).get("path"),
        "teacher": (recipe.get("teacher") or {}).get("path"),
        "stages": {s: (meta["stages"][s] or {}).get("steps") for s in stages},
        "final_stage": stages[-1] if stages else None,
    }


def _value(model: ModelResult, bench: str, metric: str) -> float | None:
    return next((r["value"] for r in model.rows if r["benchmark"] == bench and r["metric"] == metric), None)
