"""Loading a VLM (safetensors only) from a local folder or a hub id, with a one-line
ModelLoadError naming the source for anything the user can fix."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, ProcessorMixin

from ..errors import ModelLoadError, first_line
from .families import FAMILIES, Family
from .processor_settings import ProcessorSettings, apply_settings
from .view import VLM

DTYPES = ("auto", "float32", "bfloat16", "float16")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_vlm(
    path: str,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    empty: bool = False,
    settings: ProcessorSettings | None = None,
) -> VLM:
    """Load model (safetensors only) and processor from a local folder or a hub id.

    `empty`: build the model from its config with its parameters on the meta device (no
    storage, no weights read; buffers are real), for a process that will receive its shard.
    `settings`: the recipe's [teacher.processor] / [student.processor], set on the processor
    (processor_settings.apply_settings; a bad key is a RecipeError naming it).
    Raises ModelLoadError with one line naming `path` for anything the user can fix.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r} for {path}; choose one of {', '.join(DTYPES)}")
    path = str(path)
    config = _load_config(path, revision, trust_remote_code)
    family = _family_of(config, path)

    if empty:
        from accelerate import init_empty_weights

        if dtype == "auto":
            dtype = str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
        with init_empty_weights():
            model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype),
                                                            trust_remote_code=trust_remote_code)
        model.eval()
        return _with_processor(model, path, family, revision, trust_remote_code, settings)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path,
            revision=revision,
            dtype=dtype if dtype == "auto" else getattr(torch, dtype),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the model weights from {path} (safetensors only): {first_line(e)}") from e
    if device is not None:
        model.to(device)
    model.eval()
    return _with_processor(model, path, family, revision, trust_remote_code, settings)


def _with_processor(model, path: str, family: Family, revision, trust_remote_code: bool,
                    settings: ProcessorSettings | None) -> VLM:
    processor = _load_processor(path, family, revision, trust_remote_code)
    changed = apply_settings(processor, settings) if settings is not None else {}
    return VLM(model, processor, family.name, path, revision, processor_settings=changed)


def load_head_only(path: str, *, revision: str | None = None, dtype: str = "auto",
                   trust_remote_code: bool = False, embeddings: bool = False,
                   settings: ProcessorSettings | None = None) -> VLM:
    """A model as a feature cache's reader needs it: its config, processor and LM head weight (and
    with `embeddings` its input embedding table, for an id-only cache); every other parameter
    stays on the meta device, never read (a 78B teacher costs its head). Features are taken after
    the final norm, so the head alone scores them."""
    vlm = load_vlm(path, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code, empty=True,
                   settings=settings)
    folder = Path(path).expanduser()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise ModelLoadError(f"{path}: reading the LM head alone needs a local folder of safetensors files")
    head, table = vlm.head, vlm.input_embeddings
    tied = table.weight is head.weight
    head.weight = _read_weight(vlm, files, head.weight, "lm_head.weight", path)
    if embeddings:
        table.weight = head.weight if tied else _read_weight(vlm, files, table.weight, "embed_tokens.weight", path)
    return vlm


def _read_weight(vlm: VLM, files: list[Path], param: torch.Tensor, suffix: str, path: str) -> torch.nn.Parameter:
    """The stored value of one of the model's (meta) parameters, found by its names in the
    model, else by the name's usual ending; frozen, in the model's dtype."""
    from safetensors import safe_open

    names = [n for n, p in vlm.model.named_parameters(remove_duplicate=False) if p is param]
    for file in files:
        with safe_open(str(file), "pt") as sf:
            keys = set(sf.keys())
            found = next((n for n in names if n in keys), None) or next((k for k in sorted(keys)
                                                                       if k.endswith(suffix)), None)
            if found is not None:
                return torch.nn.Parameter(sf.get_tensor(found).to(vlm.model.dtype), requires_grad=False)
    raise ModelLoadError(f"{path}: no {' or '.join(names) or suffix} in its safetensors files")


def _load_config(path: str, revision: str | None, trust_remote_code: bool):
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            found = ", ".join(sorted(p.name for p in local.iterdir())[:8]) or "nothing"
            raise ModelLoadError(f"{path} is not a model folder: no config.json (found: {found})")
    elif local.exists():
        raise ModelLoadError(f"{path} is a file, not a model folder or hub id")
    elif not _HUB_ID.match(path):
        raise ModelLoadError(f"no such model folder: {path}")
    try:
        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if local.is_dir():
            raise ModelLoadError(f"cannot read the config in {path}: {first_line(e)}") from e
        from huggingface_hub.constants import is_offline_mode

        if is_offline_mode():
            raise ModelLoadError(
                f"cannot reach the hub for {path!r} (offline) and there is no such local folder; "
                "download it elsewhere and pass the local folder"
            ) from e
        raise ModelLoadError(f"cannot load {path!r} from the hub: {first_line(e)}") from e


def _family_of(config, path: str) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        raise ModelLoadError(
            f"{path}: unsupported architecture, model_type {model_type!r} ({arch}); "
            f"supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


def _load_processor(path: str, family: Family, revision: str | None, trust_remote_code: bool) -> ProcessorMixin:
    # Our image-only class is called directly: a real checkpoint's processor_config names the
    # stock class (e.g. Qwen2VLProcessor), which AutoProcessor prefers over any registration.
    loader = family.processor or AutoProcessor
    try:
        processor = loader.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"cannot load the processor from {path}: {first_line(e)}") from e
    if not isinstance(processor, ProcessorMixin):
        # AutoProcessor falls back to the bare tokenizer when it finds no processor class.
        raise ModelLoadError(
            f"{path}: the processor loaded as a bare {type(processor).__name__}, not a processor with an "
            "image processor (processor_config.json is missing or names a class transformers does not know)"
        )
    return processor
