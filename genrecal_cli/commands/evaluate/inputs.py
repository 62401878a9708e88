"""The checks `genrecal eval` makes before lm-eval loads anything, so that a model folder or an
MMMU copy lm-eval would choke on fails with one clear line instead.

Models are handed to lm-eval as folders, exactly as `lm_eval --model hf-multimodal
--model_args pretrained=DIR` would load them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ...errors import DataError, ModelLoadError, first_line

MMMU_DATASET = "MMMU/MMMU"
MMMU_GROUP = "mmmu_val"
# The columns of MMMU that lm-eval's mmmu task reads (tasks/mmmu/utils.py).
MMMU_COLUMNS = ("question", "options", "answer", "question_type", *(f"image_{i}" for i in range(1, 8)))


def check_model(path: str) -> dict[str, Any] | None:
    """Fail early, with one line, on a folder lm-eval's hf-multimodal cannot evaluate; returns
    the folder's genrecal.json metadata (None for models genrecal did not export)."""
    from transformers import AutoConfig, AutoProcessor, ProcessorMixin
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    local = Path(path)
    if local.is_dir() and not (local / "config.json").is_file():
        found = ", ".join(sorted(p.name for p in local.iterdir())[:8]) or "nothing"
        raise ModelLoadError(f"{path} is not a model folder: no config.json (found: {found})")
    if not local.is_dir() and local.exists():
        raise ModelLoadError(f"{path} is a file, not a model folder")
    if not local.exists() and not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", path):
        raise ModelLoadError(f"no such model folder: {path}")
    if local.is_dir() and not any(local.glob("*.safetensors")):
        pickles = sorted(p.name for p in local.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise ModelLoadError(f"{path}: its weights are a pickle checkpoint ({', '.join(pickles[:3])}); genrecal "
                                 "loads safetensors only (load it once where you trust it and save_pretrained it)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read a model config from {path}: {first_line(e)}") from e
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        raise ModelLoadError(
            f"{path} is not a vision-language model: model_type {model_type!r} ({arch}) has no "
            "image-text-to-text class in transformers, so lm-eval's hf-multimodal cannot run it"
        )
    # The same lookup hf-multimodal makes; it asserts when neither is set.
    image_token_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    if image_token_id is None:
        raise ModelLoadError(
            f"{path} has no image token id (config.json sets neither image_token_id nor image_token_index), "
            "so lm-eval cannot tell where images go; set it to the id of the model's image token"
        )
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, ImportError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"cannot load the processor of {path} with AutoProcessor: {first_line(e)}") from e
    if not isinstance(processor, ProcessorMixin):
        raise ModelLoadError(
            f"{path}: AutoProcessor loads a bare {type(processor).__name__}, not a processor with an image "
            "processor (processor_config.json is missing or names a class transformers does not know)"
        )
    if not 0 <= int(image_token_id) < len(processor.tokenizer):
        # Typically a config.json without the key: the config class's default is some real model's id.
        raise ModelLoadError(
            f"{path} has no usable image token id: {image_token_id} (config.json's image_token_id or "
            f"image_token_index, or the class default where neither is set) is outside the tokenizer's "
            f"{len(processor.tokenizer)} tokens; set it to the id of the model's image token"
        )
    meta = local / "genrecal.json"
    if local.is_dir() and meta.is_file():
        try:
            return json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    return None


def check_mmmu_data(data_dir: Path | None, subjects: dict[str, str]) -> dict[str, str] | None:
    """With `data_dir`: the validation parquet of each subject ({task: glob}), after checking
    MMMU's schema. Without: None once the data set is known to be loadable (cached or online)."""
    if data_dir is None:
        import datasets

        first = next(iter(subjects.values()))
        try:
            datasets.load_dataset_builder(MMMU_DATASET, first)
        except Exception as e:  # offline and not cached, no network, gated...: all mean "provide it"
            raise DataError(
                f"the {MMMU_DATASET} data set (mmmu) is not in the local Hugging Face cache and cannot be "
                f"downloaded ({type(e).__name__}); download it where there is network "
                f"(`hf download {MMMU_DATASET} --repo-type dataset --local-dir DIR`) and pass "
                "--data-dir DIR"
            ) from None
        return None
    import pyarrow.parquet as pq

    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is not a folder")
    files: dict[str, str] = {}
    missing: list[str] = []
    unreadable: list[str] = []
    wrong: dict[str, list[str]] = {}  # problem: subjects that have it
    for task, subject in subjects.items():
        parquet = sorted((data_dir / subject).glob("validation-*.parquet"))
        if not parquet:
            missing.append(subject)
            continue
        try:
            schema = pq.read_schema(parquet[0])
        except Exception as e:  # pyarrow raises several kinds for a file that is not parquet
            unreadable.append(f"{parquet[0].relative_to(data_dir)} ({first_line(e)})")
            continue
        absent = [c for c in MMMU_COLUMNS if c not in schema.names]
        if absent:
            wrong.setdefault(f"no column {', '.join(absent)}", []).append(subject)
        elif str(schema.field("options").type) not in ("string", "large_string"):
            wrong.setdefault(f"options is {schema.field('options').type}, not a stringified list", []).append(subject)
        files[task] = str(data_dir / subject / "validation-*.parquet")
    problems = [f"{_few(subs)}: {what}" for what, subs in wrong.items()]
    problems += [f"unreadable {_few(unreadable)}"] if unreadable else []
    problems += [f"{_few([m + '/validation-*.parquet' for m in sorted(missing)])} missing"] if missing else []
    if problems:
        raise DataError(
            f"--data-dir {data_dir} is not a local copy of {MMMU_DATASET} in its own schema ({'; '.join(problems)}); "
            f"expected SUBJECT/validation-*.parquet for each of the {len(subjects)} subjects with columns "
            f"{', '.join(MMMU_COLUMNS)}, as `hf download {MMMU_DATASET} --repo-type dataset` writes"
        )
    return files


def _few(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def mmmu_subjects(task_manager) -> dict[str, str]:
    """Each leaf task of lm-eval's mmmu_val group and the MMMU subject (data set config) it reads."""
    from lm_eval.tasks._yaml_loader import load_yaml

    index = task_manager.task_index
    out: dict[str, str] = {}

    def walk(name: str) -> None:
        cfg = load_yaml(index[name].yaml_path, resolve_func=False)
        members = cfg.get("task")
        if isinstance(members, list):
            for member in members:
                walk(member if isinstance(member, str) else member["task"])
        else:
            out[name] = cfg["dataset_name"]

    walk(MMMU_GROUP)
    return out
