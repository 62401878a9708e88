"""What a model is made of, read from its config.json and (where present) its safetensors
headers, never its weights: parameter counts by part (vision tower, projector, language model,
head), the decoder's shape, the largest shardable unit. For the memory plan (plan.py).
Standard library only at import time."""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from ...errors import GenrecalError, first_line
from ...recipe import ZOO_PREFIX, load_recipe, looks_like_hub_id

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_ST_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# Text-model defaults where a config leaves a field out (transformers' LlamaConfig / Qwen2Config).
_TEXT_DEFAULTS = {
    "llama": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000),
    "qwen2": dict(hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32, vocab_size=151936),
}
_TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "attention_bias", "mlp_bias", "tie_word_embeddings", "torch_dtype", "dtype")


@dataclass(frozen=True)
class Decoder:
    """A text decoder's shape (Llama / Qwen2 style)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    def layer_params(self) -> int:
        h, q, kv, i = self.hidden, self.q_width, self.kv_heads * self.head_dim, self.intermediate
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        return attn + 3 * h * i + (2 * i + h) * self.mlp_bias + 2 * h


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of one model: parameter counts by part, its decoder and vision tower."""

    source: str  # as the recipe names it
    family: str
    text: Decoder
    tied: bool  # LM head shares the input embeddings
    parts: dict  # embed, layers, norm, head (0 when tied), vision, projector -> parameter count
    unit: int  # largest FSDP unit: a decoder layer or a vision block
    root: int  # inner-model parameters outside every unit (gathered for the whole forward)
    vision_hidden: int
    vision_intermediate: int
    patches_per_token: int  # vision-tower tokens per image token of the language model
    dtype: str  # the checkpoint's dtype (config), used for dtype = "auto"
    counted: str = "from config"  # or "from weights" (safetensors headers)
    weight_bytes: Optional[int] = None  # exact stored bytes, from the headers
    note: str = ""

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def language(self) -> int:
        return self.parts["embed"] + self.parts["layers"] + self.parts["norm"]

    @property
    def head_whole(self) -> int:
        """Parameters of the LM head as the sharded teacher keeps it (a tied head is cloned)."""
        return self.parts["embed"] if self.tied else self.parts["head"]


def read_shape(spec, role: str) -> ModelShape:
    """The shape of the model a recipe's [teacher] or [student] table names, without loading it."""
    path = spec.path
    if path.startswith(ZOO_PREFIX):
        from ...world.zoo import resolve_source  # builds the tiny model on first use, as the run does

        path = resolve_source(path)
    elif spec.recipe is not None and not Path(path).exists():
        # Not built yet: it will be the exported student of that recipe, of that student's shape.
        built = load_recipe(spec.recipe).student
        return replace(read_shape(built, role), source=spec.path, note=f"not built yet: the shape of {built.path}, "
                       f"the student of {spec.recipe}")
    folder = Path(path).expanduser()
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise GenrecalError(f"{role}.path {spec.path}: no config.json in the folder; the memory plan reads it")
        config, headers = _read_json(config_file), _folder_headers(folder)
    elif looks_like_hub_id(path):
        config, headers = _hub_config(path, spec.revision, role)
    else:
        raise GenrecalError(f"{role}.path {spec.path}: no such model folder")
    shape = shape_from_config(config, spec.path)
    return _with_weights(shape, headers) if headers else shape


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GenrecalError(f"{path}: cannot read it as JSON ({first_line(exc)})") from None


def _hub_config(repo: str, revision: Optional[str], role: str) -> tuple[dict, dict]:
    import logging

    import huggingface_hub.file_download  # noqa: F401 - first: its import configures the loggers

    hub_log = logging.getLogger("huggingface_hub.utils._http")  # where the retries are logged
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings would bury the one-line answer
    try:
        return _from_hub(repo, revision, role)
    finally:
        hub_log.setLevel(level)


def _from_hub(repo: str, revision: Optional[str], role: str) -> tuple[dict, dict]:
    import huggingface_hub

    try:
        config = _read_json(Path(huggingface_hub.hf_hub_download(repo, "config.json", revision=revision)))
    except Exception as exc:  # offline, not found, gated: all say the same to the user
        raise GenrecalError(
            f"{role}.path {repo}: cannot get its config.json from the hub ({type(exc).__name__}: {first_line(exc, 120)}); "
            f"the memory plan needs the model's config.json: download it where the hub is reachable (`hf download {repo} "
            f"config.json --local-dir FOLDER`; with the *.safetensors the counts are exact) and point the recipe at the "
            f"folder (--set {role}.path=FOLDER)") from None
    try:  # the headers alone, over HTTP ranges; without them the counts come from the config
        meta = huggingface_hub.get_safetensors_metadata(repo, revision=revision)
        headers = {n: (t.dtype, list(t.shape)) for f in meta.files_metadata.values() for n, t in f.tensors.items()}
    except Exception:
        headers = {}
    return config, headers


def read_safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) of every tensor in a .safetensors file: the 8-byte little-endian
    header length, then that many bytes of JSON; no weights are read."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100_000_000:
            raise ValueError(f"header of {n} bytes")
        header = json.loads(f.read(n))
    return {name: (t["dtype"], list(t["shape"])) for name, t in header.items() if name != "__metadata__"}


def _folder_headers(folder: Path) -> dict:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(_read_json(index)["weight_map"].values())) if index.is_file() else None
    paths = [folder / f for f in files] if files else sorted(folder.glob("*.safetensors"))
    headers: dict = {}
    for p in paths:
        try:
            headers.update(read_safetensors_header(p))
        except (OSError, ValueError, KeyError) as exc:  # e.g. a Git LFS pointer: fall back to the config
            return {"__unreadable__": f"{p.name}: {first_line(exc, 80)}"}
    return headers


# ---------------------------------------------------------------------------------------------
# parameter counts from a config (arithmetic; tests check them against transformers on meta)


def shape_from_config(config: dict, source: str) -> ModelShape:
    family = config.get("model_type")
    if family not in _VISION:
        raise GenrecalError(f"{source}: model_type {family!r} is not one the plan knows ({', '.join(_VISION)})")
    text = _text_config(config, family)
    dec = _decoder(text)
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    vision, block, blocks, vh, vi, ratio, projector = _VISION[family](config, dec.hidden)
    layers = dec.layers * dec.layer_params()
    parts = {"embed": dec.vocab * dec.hidden, "layers": layers, "norm": dec.hidden,
             "head": 0 if tied else dec.vocab * dec.hidden, "vision": vision, "projector": projector}
    root = parts["embed"] + parts["norm"] + projector + vision - blocks * block
    dtype = str(config.get("torch_dtype") or config.get("dtype") or text.get("torch_dtype") or text.get("dtype") or "float32")
    return ModelShape(source, family, dec, tied, parts, max(dec.layer_params(), block), root, vh, vi, ratio, dtype)


def _text_config(config: dict, family: str) -> dict:
    text = dict(config.get("text_config") or {})
    for key in _TEXT_KEYS:  # Qwen2-VL before transformers 5 kept its text fields at the top level
        if key not in text and key in config and family in ("qwen2_vl", "qwen2_5_vl"):
            text[key] = config[key]
    kind = "qwen2" if family.startswith("qwen") or text.get("model_type", "").startswith("qwen") else "llama"
    return {**_TEXT_DEFAULTS[kind], "model_type": kind, **text}


def _decoder(t: dict) -> Decoder:
    heads = t["num_attention_heads"]
    qwen = t["model_type"].startswith("qwen")
    bias = bool(t.get("attention_bias", False))
    return Decoder(t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], heads,
                   t.get("num_key_value_heads") or heads, t.get("head_dim") or t["hidden_size"] // heads,
                   t["vocab_size"], qkv_bias=qwen or bias, o_bias=bias and not qwen, mlp_bias=bool(t.get("mlp_bias", False)))


def _pair(x) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def _qwen2_vl(c: dict, text_hidden: int):
    v = c.get("vision_config") or {}
    e, depth, ratio = v.get("embed_dim", 1280), v.get("depth", 32), v.get("mlp_ratio", 4)
    f, m = int(e * ratio), v.get("spatial_merge_size", 2)
    patch = v.get("in_chans", v.get("in_channels", 3)) * v.get("temporal_patch_size", 2) * v.get("patch_size", 14) ** 2 * e
    block = 4 * e + 3 * e * e + 3 * e + e * e + e + 2 * e * f + f + e
    merged = e * m * m
    merger = 2 * e + merged * merged + merged + merged * v.get("hidden_size", text_hidden) + v.get("hidden_size", text_hidden)
    return patch + depth * block, block, depth, e, f, m * m, merger


def _qwen2_5_vl(c: dict, text_hidden: int):
    v = c.get("vision_config") or {}
    e, depth, f, m = v.get("hidden_size", 1280), v.get("depth", 32), v.get("intermediate_size", 3420), v.get("spatial_merge_size", 2)
    out = v.get("out_hidden_size", text_hidden)
    patch = v.get("in_channels", v.get("in_chans", 3)) * v.get("temporal_patch_size", 2) * v.get("patch_size", 14) ** 2 * e
    block = 2 * e + 3 * e * e + 3 * e + e * e + e + 3 * e * f + 2 * f + e
    merged = e * m * m
    merger = e + merged * merged + merged + merged * out + out
    return patch + depth * block, block, depth, e, f, m * m, merger


def _internvl(c: dict, text_hidden: int):
    v = c.get("vision_config") or {}
    h, f, depth = v.get("hidden_size", 1024), v.get("intermediate_size", 4096), v.get("num_hidden_layers", 24)
    (ih, iw), (ph, pw) = _pair(v.get("image_size", 448)), _pair(v.get("patch_size", 14))
    embed = h + v.get("num_channels", 3) * ph * pw * h + h + h * v.get("use_mask_token", False)
    embed += (ih // ph) * (iw // pw) * h + h if v.get("use_absolute_position_embeddings", True) else 0
    norm = h if v.get("norm_type", "layer_norm") == "rms_norm" else 2 * h
    block = 3 * h * h + 3 * h * v.get("attention_bias", False) + h * h + h + 2 * h * v.get("use_qk_norm", False)
    block += 2 * h + 2 * norm + 2 * h * f + f + h  # lambda_1, lambda_2 (layer scale), two norms, MLP
    final = 0 if v.get("use_mean_pooling", True) else 2 * h
    ratio = round(1 / c.get("downsample_ratio", 0.5) ** 2)
    proj_in = h * ratio
    projector = 2 * proj_in + proj_in * text_hidden + text_hidden + text_hidden * text_hidden + text_hidden
    return embed + depth * block + final, block, depth, h, f, ratio, projector


def _siglip_like(v: dict, conv_bias: bool, cls: bool, pre_norm: bool, defaults: dict):
    v = {**defaults, **v}
    h, f, depth, p = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"], v["patch_size"]
    patches = (v["image_size"] // p) ** 2
    embed = v.get("num_channels", 3) * p * p * h + h * conv_bias + (patches + cls) * h + h * cls
    block = 4 * h * h + 4 * h + 4 * h + 2 * h * f + f + h
    return embed + 2 * h * pre_norm + depth * block + 2 * h, block, depth, h, f


def _llava(c: dict, text_hidden: int):
    v = c.get("vision_config") or {}
    clip = v.get("model_type", "clip_vision_model") == "clip_vision_model"
    defaults = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, image_size=224, patch_size=32 if clip else 16)
    vision, block, depth, h, f = _siglip_like(v, conv_bias=not clip, cls=clip, pre_norm=clip, defaults=defaults)
    bias = c.get("multimodal_projector_bias", True)
    proj_in = h * _feature_layers(c)
    projector = proj_in * text_hidden + text_hidden * text_hidden + 2 * text_hidden * bias
    return vision, block, depth, h, f, 1, projector


def _idefics3(c: dict, text_hidden: int):
    v = c.get("vision_config") or {}
    defaults = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, image_size=224, patch_size=32)
    vision, block, depth, h, f = _siglip_like(v, conv_bias=True, cls=False, pre_norm=False, defaults=defaults)
    s = c.get("scale_factor", 2)
    projector = h * s * s * text_hidden
    return vision, block, depth, h, f, s * s, projector


def _feature_layers(c: dict) -> int:
    layer = c.get("vision_feature_layer", -1)
    return len(layer) if isinstance(layer, list) else 1


_VISION = {"qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "internvl": _internvl, "llava": _llava, "idefics3": _idefics3}
_PROJECTOR = re.compile(r"(multi_modal_projector|connector|visual\.merger|^mlp1)\.")
_VISION_NAME = re.compile(r"(^|\.)(visual|vision_tower|vision_model)\.")
_UNIT = re.compile(r"\.(?:layers|blocks|layer)\.(\d+)\.")


def _with_weights(shape: ModelShape, headers: dict) -> ModelShape:
    """The shape with exact parameter counts from the safetensors headers (names sorted into parts)."""
    if "__unreadable__" in headers:
        return replace(shape, note=f"safetensors header unreadable ({headers['__unreadable__']}): counts from config")
    parts = dict.fromkeys(shape.parts, 0)
    units: dict[tuple[str, int], int] = {}
    nbytes = 0
    for name, (dtype, dims) in headers.items():
        n = math.prod(dims)
        nbytes += n * _ST_BYTES.get(dtype, 2)
        if "lm_head." in name:
            part = "head"
        elif _PROJECTOR.search(name):
            part = "projector"
        elif _VISION_NAME.search(name):
            part = "vision"
        elif "embed_tokens" in name:
            part = "embed"
        elif _UNIT.search(name):
            part = "layers"
        else:
            part = "norm"
        parts[part] += n
        unit = _UNIT.search(name)
        if unit and part in ("vision", "layers"):
            units[(part, int(unit.group(1)))] = units.get((part, int(unit.group(1))), 0) + n
    unit_total = sum(units.values())
    root = sum(v for k, v in parts.items() if k != "head") - unit_total
    tied = shape.tied and parts["head"] == 0
    return replace(shape, parts=parts, tied=tied, unit=max(units.values(), default=shape.unit), root=root,
                   counted="from weights", weight_bytes=nbytes)
