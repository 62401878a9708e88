"""The lm-eval bridge behind `genrecal eval`: benchmarks run through lm-eval's `hf-multimodal`
model and its tasks, several models side by side, with the protocol recorded next to the numbers.
"""

from __future__ import annotations

import difflib
import tempfile
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ...errors import DataError, GenrecalError, first_line
from .inputs import MMMU_DATASET, MMMU_GROUP, check_mmmu_data, check_model, mmmu_subjects
from .report import EvalReport, ModelResult

LM_EVAL_PREFIX = "lm-eval:"


@dataclass(frozen=True)
class Benchmark:
    """One `--bench` name and the lm-eval task or group it runs."""

    name: str
    task: str
    about: str


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark("shapes", "genrecal_shapes", "genrecal's synthetic shapes test split (multiple choice and short answer)"),
        Benchmark("mmmu", MMMU_GROUP, "MMMU validation set, 30 subjects (lm-eval's mmmu_val)"),
    )
}


# --------------------------------------------------------------------------- inputs


def parse_benchmarks(spec: str | list[str]) -> list[str]:
    """`shapes,mmmu,lm-eval:TASK` -> the names, each checked against the known ones."""
    names = [n.strip() for part in ([spec] if isinstance(spec, str) else spec) for n in part.split(",") if n.strip()]
    if not names:
        raise GenrecalError(f"--bench is empty; choose from {', '.join(BENCHMARKS)} or lm-eval:TASK")
    for name in names:
        if name in BENCHMARKS or (name.startswith(LM_EVAL_PREFIX) and len(name) > len(LM_EVAL_PREFIX)):
            continue
        close = difflib.get_close_matches(name, [*BENCHMARKS, LM_EVAL_PREFIX], n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise GenrecalError(
            f"unknown benchmark {name!r}{hint} Known: {', '.join(BENCHMARKS)}; "
            f"any other lm-eval task as {LM_EVAL_PREFIX}TASK (e.g. {LM_EVAL_PREFIX}mmmu_val_art)"
        )
    return list(dict.fromkeys(names))


def latest_student(root: Path = Path(".")) -> Path:
    """The student folder of the most recent `genrecal distill` run under `root`
    (OUTPUT/student/genrecal.json, OUTPUT up to two levels down, e.g. runs/NAME)."""
    found = [p for pattern in ("*/student/genrecal.json", "*/*/student/genrecal.json") for p in root.glob(pattern)]
    if not found:
        raise GenrecalError(
            f"no MODEL given and no `genrecal distill` run found under {root.resolve()} "
            "(looked for */student/genrecal.json and */*/student/genrecal.json); pass a model folder or zoo:NAME"
        )
    return max(found, key=lambda p: p.stat().st_mtime).parent


# --------------------------------------------------------------------------- running


def evaluate(
    models: list[str],
    benchmarks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "auto",
    data_dir: Path | None = None,
    labels: list[str] | None = None,
    on_model=None,
) -> EvalReport:
    """Run `benchmarks` on each of `models` (folders) through lm-eval's hf-multimodal with the
    chat template applied; `on_model(label)` is called before each model starts."""
    if limit is not None and limit < 1:
        raise GenrecalError(f"--limit {limit}: it must be at least 1 (the number of items per task)")
    if batch_size < 1:
        raise GenrecalError(f"--batch-size {batch_size}: it must be at least 1")
    if not models:
        raise GenrecalError("no model to evaluate")
    if data_dir is not None and "mmmu" not in benchmarks:
        raise GenrecalError("--data-dir is a local copy of MMMU; it is only used with --bench mmmu")
    metadata = [check_model(m) for m in models]
    _quiet()
    import lm_eval
    import transformers
    from lm_eval.tasks import TaskManager

    from ... import __version__
    from .tasks import TASKS_DIR

    device = device or _default_device()
    # lm-eval's own task index (thousands of YAML files, ~6 s to read) only where a benchmark is
    # one of its tasks; genrecal's own benchmarks (shapes) stand alone
    stock = any(b.startswith(LM_EVAL_PREFIX) or b == "mmmu" for b in benchmarks)
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=stock)
    with tempfile.TemporaryDirectory(prefix="genrecal-eval-") as workdir:
        specs, tops, data = _task_specs(benchmarks, task_manager, data_dir, workdir)
        if any(Path(workdir).iterdir()):
            task_manager = TaskManager(include_path=[str(TASKS_DIR), workdir], include_defaults=stock)
        results, configs, leaves = _run(models, labels or _labels(models), metadata, specs, tops, task_manager,
                                        limit=limit, batch_size=batch_size, device=device, dtype=dtype, on_model=on_model)

    protocol = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "genrecal": __version__,
            "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else _dist_version("lm_eval"),
            "transformers": transformers.__version__,
            "torch": _dist_version("torch"),
            "datasets": _dist_version("datasets"),
        },
        "harness": "lm-eval hf-multimodal",
        "model_args": {"dtype": dtype},
        "apply_chat_template": True,
        "system_instruction": None,
        "num_fewshot": 0,
        "limit": limit,
        "batch_size": batch_size,
        "device": device,
        "benchmarks": {
            bench: {
                "lm_eval_task": top,
                "tasks": {t: _config_hash(configs[t]) for t in sorted(leaves[bench])},
                "prompt": _distinct(_source(configs[t].get("doc_to_text")) for t in leaves[bench]),
                "generation": _distinct(configs[t].get("generation_kwargs") for t in leaves[bench]),
                "data": data.get(bench),
            }
            for bench, top in tops.items()
        },
    }
    return EvalReport(results, protocol)


def _run(models, labels, metadata, specs, tops, task_manager, *, limit, batch_size, device, dtype, on_model):
    """simple_evaluate once per model; its rows, the task configs lm-eval resolved and each
    benchmark's leaf tasks."""
    import time

    from lm_eval import simple_evaluate

    results: list[ModelResult] = []
    configs: dict[str, Any] = {}
    leaves: dict[str, list[str]] = {}
    for path, label, meta in zip(models, labels, metadata):
        if on_model is not None:
            on_model(label)
        start = time.perf_counter()
        try:
            out = simple_evaluate(
                model="hf-multimodal",
                model_args={"pretrained": str(path), "dtype": dtype},
                tasks=specs,
                limit=limit,
                batch_size=batch_size,
                device=device,
                apply_chat_template=True,
                task_manager=task_manager,
                log_samples=True,
            )
        except (FileNotFoundError, ConnectionError) as e:
            raise DataError(f"lm-eval could not load a benchmark's data: {first_line(e)}") from e
        result = ModelResult(str(path), label, meta, dtype=str(out["config"].get("model_dtype", dtype)))
        result.seconds = time.perf_counter() - start
        for bench, top in tops.items():
            result.rows += _rows(bench, top, out)
            leaves[bench] = _leaf_tasks(top, out)
            first = next((out["samples"][t][0] for t in leaves[bench] if out["samples"].get(t)), None)
            if first is not None:
                result.examples[bench] = {
                    "prompt": first["arguments"][0][0],  # as the chat template rendered it
                    "response": first["filtered_resps"][0],
                    "target": first["target"],
                }
        configs.update(out["configs"])
        results.append(result)
    return results, configs, leaves


def _task_specs(benchmarks: list[str], task_manager, data_dir: Path | None, workdir: str):
    """lm-eval task specs for the benchmarks, {benchmark: top task or group name}, and where each
    benchmark's data comes from."""
    specs: list[Any] = []
    tops: dict[str, str] = {}
    data: dict[str, Any] = {}
    for bench in benchmarks:
        if bench.startswith(LM_EVAL_PREFIX):
            task = bench[len(LM_EVAL_PREFIX) :]
            if task not in task_manager.all_tasks:
                close = difflib.get_close_matches(task, task_manager.all_tasks, n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(LM_EVAL_PREFIX + c for c in close)}?" if close else ""
                raise GenrecalError(f"lm-eval has no task or group {task!r}{hint}")
            specs.append(task)
            tops[bench] = task
            data[bench] = "as the lm-eval task config says"
        elif bench == "mmmu":
            subjects = mmmu_subjects(task_manager)
            files = check_mmmu_data(data_dir, subjects)
            tops[bench] = MMMU_GROUP
            if files is None:
                specs.append(MMMU_GROUP)
                data[bench] = {"dataset": MMMU_DATASET, "source": "hub or local Hugging Face cache"}
            else:
                # lm-eval's own subject tasks, each pointed at its local parquet files, in one group with
                # mmmu_val's size-weighted mean (equal to the nested groups' mean).
                group = {
                    "group": MMMU_GROUP,
                    "task": [
                        {"task": t, "dataset_path": "parquet", "dataset_name": None,
                         "dataset_kwargs": {"data_files": {"validation": f}}}
                        for t, f in files.items()
                    ],
                    "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
                    "metadata": {"version": 0.0},
                }
                yaml_path = Path(workdir) / f"{MMMU_GROUP}.yaml"
                yaml_path.write_text(json.dumps(group, indent=1), encoding="utf-8")  # JSON is YAML
                # Registered by name from an include path (it then shadows the stock group): lm-eval
                # 0.4.13 misnames a group loaded from a file path, and an inline dict group leaks its keys.
                specs.append(MMMU_GROUP)
                data[bench] = {"dataset": MMMU_DATASET, "source": str(Path(data_dir).resolve())}
        else:
            specs.append(BENCHMARKS[bench].task)
            tops[bench] = BENCHMARKS[bench].task
            data[bench] = "generated from shapes.make_split (tasks/shapes/utils.py)"
    return specs, tops, data


_SKIP_KEYS = {"alias", "name", "sample_len", "samples", " "}


def _rows(bench: str, top: str, out: dict) -> list[dict[str, Any]]:
    """The benchmark's headline numbers: the metrics lm-eval reports for its top task or group."""
    res = out["results"].get(top) or out.get("groups", {}).get(top) or {}
    n = sum(out["n-samples"][t]["effective"] for t in _leaf_tasks(top, out) if t in out["n-samples"])
    rows = []
    for key, value in res.items():
        if key in _SKIP_KEYS or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        stderr = res.get(f"{metric}_stderr,{filt}")
        rows.append(
            {
                "benchmark": bench,
                "task": top,
                "metric": metric if filt in ("", "none") else f"{metric} ({filt})",
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "n": n,
            }
        )
    return rows


def _leaf_tasks(top: str, out: dict) -> list[str]:
    """The tasks (not groups) under `top` in a simple_evaluate result."""
    subtasks = out.get("group_subtasks", {})
    if top not in subtasks or not subtasks[top]:
        return [top]
    return [leaf for child in subtasks[top] for leaf in _leaf_tasks(child, out)]


def _source(doc_to_text: Any) -> str:
    """A task's prompt as lm-eval reports it: a template string, or a function's source."""
    return re.sub(r" at 0x[0-9a-f]+", "", str(doc_to_text))


def _config_hash(config: dict) -> str:
    """sha256 of a task's resolved config as lm-eval reports it (functions as their source),
    without where its data was read from (recorded apart: a local copy hashes like the hub's)
    and object addresses in reprs, so that the hash is the same from run to run."""
    kept = {k: v for k, v in config.items() if k not in ("dataset_path", "dataset_name", "dataset_kwargs", "metadata")}
    kept["version"] = (config.get("metadata") or {}).get("version")
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(re.sub(r" at 0x[0-9a-f]+", "", text).encode()).hexdigest()[:16]


def _distinct(items) -> Any:
    seen = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen[0] if len(seen) == 1 else seen


def _labels(models: list[str]) -> list[str]:
    """Short distinct names: the last path parts that tell the models apart."""
    parts = [Path(m).parts or (m,) for m in models]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{m}" for i, m in enumerate(models)]


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _quiet() -> None:
    """lm-eval logs every step at INFO and datasets draws bars; the CLI shows its own table."""
    import logging
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
