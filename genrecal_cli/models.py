"""Load a vision-language model from a folder or hub id and see it the way GenRecal does:
vision encoder, vision projector, body (decoder up to the final norm) and head.

Importing this module registers image-only processors for the families whose stock processor
also wants a video processor (which needs torchvision, absent here and never installed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    InternVLConfig,
    InternVLProcessor,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLProcessor,
)

from .errors import ModelLoadError, first_line

DTYPES = ("auto", "float32", "bfloat16", "float16")


# --------------------------------------------------------------------------- image-only processors


class _ImageOnly:
    """Mixin: a family processor without its video processor, saved so that plain transformers
    can load it too.

    The stock Qwen2-VL, Qwen2.5-VL and InternVL processors take a video processor, and loading
    one needs torchvision. Dropping `video_processor` from `__init__`'s signature is what removes
    it: transformers derives a processor's parts from that signature.

    On save, `processor_class` never names this class: a process without genrecal imported
    would not find it and AutoProcessor would silently hand back the bare tokenizer. It names
    `plain_class`, an image-only processor shipped with transformers that expands image tokens
    the same way, so `AutoProcessor.from_pretrained(folder)` works without genrecal (e.g. under
    `lm_eval --model hf-multimodal`); tests/test_models.py checks both give the same inputs.
    Where the tokenizer lacks what `plain_class` reads, it names the stock class, which fails
    loudly without torchvision instead.
    """

    plain_class: str

    def _plain_loadable(self) -> bool:
        return True

    def _plain_kwargs(self) -> dict[str, Any]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self._plain_loadable():
            out["processor_class"] = self.plain_class
            out.update(self._plain_kwargs())
        else:
            stock = next(c for c in type(self).__mro__ if c.__module__.startswith("transformers."))
            out["processor_class"] = stock.__name__
        return out


class _QwenImageOnly(_ImageOnly):
    # PaddleOCRVLProcessor is Qwen2-VL's processor minus video: same image processor, one
    # image token repeated (grid_t * grid_h * grid_w) / merge_size**2 times.
    plain_class = "PaddleOCRVLProcessor"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The stock __init__ passes video_processor=None on as a third part; transformers pairs
        # parts with the names in our signature, so that None is dropped.
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def _plain_loadable(self) -> bool:
        # PaddleOCRVLProcessor reads the image token off the tokenizer (a named special token).
        return getattr(self.tokenizer, "image_token", None) == self.image_token


class Qwen2VLImageOnlyProcessor(_QwenImageOnly, Qwen2VLProcessor):
    pass


class Qwen2_5_VLImageOnlyProcessor(_QwenImageOnly, Qwen2_5_VLProcessor):
    pass


class InternVLImageOnlyProcessor(_ImageOnly, InternVLProcessor):
    # QianfanOCRProcessor expands a placeholder to <img> + image_seq_length x <IMG_CONTEXT> + </img>
    # exactly like InternVL's; InternVL's chat template writes <IMG_CONTEXT> as the placeholder.
    plain_class = "QianfanOCRProcessor"

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length, chat_template, **kwargs)

    def _plain_kwargs(self) -> dict[str, Any]:
        return {"image_placeholder_token": self.image_token}


# Registered so that, in any process that imported this module, AutoProcessor picks these for a
# folder whose processor_config.json names no class (it then falls back to the class
# tokenizer_config.json names, ours, or to the config's model type).
for _config, _processor in (
    (Qwen2VLConfig, Qwen2VLImageOnlyProcessor),
    (Qwen2_5_VLConfig, Qwen2_5_VLImageOnlyProcessor),
    (InternVLConfig, InternVLImageOnlyProcessor),
):
    AutoProcessor.register(_config, _processor, exist_ok=True)


# --------------------------------------------------------------------------- saving

# The files that make a checkpoint's processor: tokenizer, image processor, chat template.
PROCESSOR_FILES = (
    "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
_AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def processor_files(source: str, revision: str | None = None) -> dict[str, Path]:
    """The processor files a model source holds: a local folder's, or a hub id's cached snapshot's
    (never a download)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return {name: folder / name for name in PROCESSOR_FILES if (folder / name).is_file()}
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return {}
    found = {}
    for name in PROCESSOR_FILES:
        cached = try_to_load_from_cache(source, name, revision=revision)
        if isinstance(cached, str):
            found[name] = Path(cached)
    return found


@dataclass(frozen=True)
class SourcedProcessor:
    """A processor saved the way its checkpoint came: the source's own processor files, copied as
    they are (a real Qwen2-VL's processor_config.json keeps naming Qwen2VLProcessor, not the
    image-only class genrecal loads it with; its tokenizer and chat template stay byte for byte),
    where the source has them; else what `save_pretrained` writes (e.g. a processor built in
    memory). An `auto_map` entry whose module file the folder does not hold is dropped."""

    processor: ProcessorMixin
    source: str
    revision: str | None = None

    def save_pretrained(self, folder: str | Path) -> None:
        import shutil

        folder = Path(folder)
        self.processor.save_pretrained(folder)
        own = processor_files(self.source, self.revision)
        if "tokenizer_config.json" in own:  # a checkpoint's own processor: exactly its files
            for name in PROCESSOR_FILES:
                if name in own:
                    shutil.copyfile(own[name], folder / name)
                elif (folder / name).exists():
                    (folder / name).unlink()
        source_dir = Path(self.source).expanduser()
        drop_dangling_auto_map(folder, source_dir if source_dir.is_dir() else None)


def drop_dangling_auto_map(folder: Path, source_dir: Path | None = None) -> None:
    """Make every `auto_map` in `folder`'s configs name only modules the folder holds: a module
    the source folder has is copied along, an entry whose module is nowhere is dropped (loading
    it would fail looking for code that is not there)."""
    import json
    import shutil

    for name in _AUTO_MAP_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if not isinstance(auto_map, dict):
            continue
        kept = {}
        for key, ref in auto_map.items():
            refs = [r for r in (ref if isinstance(ref, list) else [ref]) if isinstance(r, str)]
            modules = [r.split("--")[-1].rsplit(".", 1)[0] for r in refs]
            for module in modules:
                if not (folder / f"{module}.py").is_file() and source_dir is not None \
                        and (source_dir / f"{module}.py").is_file():
                    shutil.copyfile(source_dir / f"{module}.py", folder / f"{module}.py")
            if all("--" not in r for r in refs) and all((folder / f"{m}.py").is_file() for m in modules):
                kept[key] = ref
        if kept == auto_map:
            continue
        if kept:
            data["auto_map"] = kept
        else:
            data.pop("auto_map")
        path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its parts, as attribute paths under `model.model`."""

    name: str
    vision_encoder: str
    vision_projector: str
    language_model: str
    image_token_attr: str  # config attribute holding the image token id
    processor: type | None = None  # image-only processor class; None: AutoProcessor's choice


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # In Qwen2-VL the projector (the patch merger) lives inside the vision encoder module:
        # freeze the encoder first, then unfreeze the projector.
        Family("qwen2_vl", "visual", "visual.merger", "language_model", "image_token_id", Qwen2VLImageOnlyProcessor),
        Family(
            "qwen2_5_vl", "visual", "visual.merger", "language_model", "image_token_id", Qwen2_5_VLImageOnlyProcessor
        ),
        Family("llava", "vision_tower", "multi_modal_projector", "language_model", "image_token_index"),
        Family(
            "internvl",
            "vision_tower",
            "multi_modal_projector",
            "language_model",
            "image_token_id",
            InternVLImageOnlyProcessor,
        ),
        Family("idefics3", "vision_model", "connector", "text_model", "image_token_id"),
    )
}


# --------------------------------------------------------------------------- the uniform view


@dataclass
class VLM:
    """A loaded VLM seen as GenRecal's four parts, plus what data and losses need to know."""

    model: PreTrainedModel
    processor: ProcessorMixin
    family: str
    path: str
    revision: str | None = None

    @property
    def exportable_processor(self) -> "SourcedProcessor":
        """What a checkpoint or the exported student saves as this model's processor."""
        return SourcedProcessor(self.processor, self.path, self.revision)

    @property
    def _family(self) -> Family:
        return FAMILIES[self.family]

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    @property
    def head_rows(self) -> int:
        """Rows of the head's weight: the logits' last dimension (may differ from vocab_size)."""
        return self.head.weight.shape[0]

    @property
    def input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    @property
    def vision_encoder(self) -> torch.nn.Module:
        return self.model.model.get_submodule(self._family.vision_encoder)

    @property
    def vision_projector(self) -> torch.nn.Module:
        return self.model.model.get_submodule(self._family.vision_projector)

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.get_submodule(self._family.language_model)

    @property
    def decoder_layer_class(self) -> type:
        return type(self.language_model.layers[0])

    @property
    def image_token(self) -> str:
        return self.processor.image_token

    @property
    def image_token_id(self) -> int:
        return int(getattr(self.model.config, self._family.image_token_attr))

    def image_tokens_per_image(self, size: tuple[int, int] | None = None) -> int:
        """How many image tokens (the slots vision features fill; not wrappers such as InternVL's
        <img>) one image of `size` (height, width) expands to; None: the processor's own size."""
        height, width = size or _default_image_size(self.processor.image_processor)
        placeholder = _placeholder(self)
        ids = self.processor(images=[Image.new("RGB", (width, height))], text=[placeholder])["input_ids"][0]
        return sum(1 for i in ids if i == self.image_token_id)

    def blank_image_inputs(self) -> dict[str, Any]:
        """What the processor gives for one small blank image, minus the text: the inputs of
        `image_features`, for a pass through the vision side on a batch without images."""
        height, width = _default_image_size(self.processor.image_processor)
        out = self.processor(images=[[Image.new("RGB", (width, height))]], text=[_placeholder(self)], return_tensors="pt")
        return {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")}

    def image_features(self, **image_inputs) -> list[torch.Tensor]:
        """The vision encoder and projector's output for processor image inputs, as tensors."""
        return image_features(self.model, **image_inputs)

    def body(self, **inputs) -> torch.Tensor:
        """Last hidden states after the final norm, [B, T, H]: `head(body(**x))` is `model(**x).logits`."""
        return self.model.model(**inputs).last_hidden_state


def image_features(model, **image_inputs) -> list[torch.Tensor]:
    """`model` (an ...ForConditionalGeneration) vision encoder and projector's output, as tensors."""
    out = model.model.get_image_features(**image_inputs)
    found, todo = [], [out]
    while todo:  # a tensor, a tuple or list of them, or a ModelOutput holding them
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
        elif hasattr(x, "values"):
            todo.extend(v for v in x.values() if v is not None)
    return found


def _default_image_size(image_processor) -> tuple[int, int]:
    """The square size the processor resizes to; for dynamic-resolution processors (Qwen2-VL),
    the largest square within max_pixels."""
    size = dict(image_processor.size or {})
    if "height" in size and "width" in size:
        return size["height"], size["width"]
    max_pixels = getattr(image_processor, "max_pixels", None)
    if max_pixels:
        side = int(max_pixels**0.5)
        return side, side
    edge = size.get("shortest_edge") or size.get("longest_edge")
    return edge, edge


def _placeholder(vlm: VLM) -> str:
    """The text an image stands for before the processor expands it (as the chat template writes it)."""
    if vlm.family in ("qwen2_vl", "qwen2_5_vl"):
        return f"<|vision_start|>{vlm.image_token}<|vision_end|>"
    return vlm.image_token


# --------------------------------------------------------------------------- loading

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_vlm(
    path: str,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    empty: bool = False,
) -> VLM:
    """Load model (safetensors only) and processor from a local folder or a hub id.

    `empty`: build the model from its config with its parameters on the meta device (no
    storage, no weights read; buffers are real), for a process that will receive its shard.
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
        return VLM(model, _load_processor(path, family, revision, trust_remote_code), family.name, path, revision)
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
    return VLM(model, _load_processor(path, family, revision, trust_remote_code), family.name, path, revision)


def load_head_only(path: str, *, revision: str | None = None, dtype: str = "auto",
                   trust_remote_code: bool = False) -> VLM:
    """A model as a feature cache's reader needs it: its config, processor and LM head weight;
    every other parameter stays on the meta device, never read (a 78B teacher costs its head).
    Features are taken after the final norm, so the head alone scores them."""
    vlm = load_vlm(path, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code, empty=True)
    head = vlm.head
    names = [n for n, p in vlm.model.named_parameters(remove_duplicate=False) if p is head.weight]
    folder = Path(path).expanduser()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise ModelLoadError(f"{path}: reading the LM head alone needs a local folder of safetensors files")
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), "pt") as sf:
            keys = set(sf.keys())
            found = next((n for n in names if n in keys), None) or next((k for k in sorted(keys)
                                                                       if k.endswith("lm_head.weight")), None)
            if found is not None:
                weight = sf.get_tensor(found)
                break
    else:
        raise ModelLoadError(f"{path}: no LM head weight ({' or '.join(names)}) in its safetensors files")
    head.weight = torch.nn.Parameter(weight.to(vlm.model.dtype), requires_grad=False)
    return vlm


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



