"""`load_source`: a tokenizer from a folder, hub id or single file, with the model's sizes read from its config.

Model weights are never loaded: the head's row count comes from the safetensors header.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Sequence

from ...errors import GenrecalError, first_line
from .convert import from_sentencepiece, from_tiktoken
from .source import Source, own_backend

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
CONFIG_FILES = ("config.json", "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja")
IMAGE_TOKENS = ("<|image_pad|>", "<image>", "<IMG_CONTEXT>", "<image_soft_token>", "<|image|>", "[IMG]")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def load_source(spec: str) -> Source:
    """Load a tokenizer from a folder, hub id, `.model`, `.tiktoken` or `tokenizer.json`; GenrecalError if it can't."""
    path = Path(spec).expanduser()
    if path.is_file():
        kind = _file_kind(path)
        if kind == "model":
            return from_sentencepiece(spec, path)
        if kind == "tiktoken":
            return from_tiktoken(spec, path)
        if kind == "json":
            return _from_tokenizer_json(spec, path)
        raise GenrecalError(
            f"{spec}: not a tokenizer file (expected a folder, a SentencePiece .model, a .tiktoken or a tokenizer.json)"
        )
    if path.is_dir():
        return _from_folder(spec, path)
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return _from_hub(spec)
    raise GenrecalError(f"{spec}: no such file or folder")


def _file_kind(path: Path) -> str | None:
    """'model', 'tiktoken' or 'json' from the name (`tokenizer.model.v1` counts), else from the first bytes."""
    for kind in ("model", "tiktoken", "json"):
        if f".{kind}" in path.suffixes:
            return kind
    with open(path, "rb") as f:
        head = f.read(256)
    if head.lstrip().startswith(b"{"):
        return "json"
    if re.match(rb"[A-Za-z0-9+/=]+ \d+\r?\n", head):
        return "tiktoken"
    if head[:1] == b"\n":  # SentencePiece protos open with field 1 (pieces), length-delimited
        return "model"
    return None


def _from_tokenizer_json(spec: str, path: Path) -> Source:
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise GenrecalError(f"{spec}: not a readable tokenizer.json ({e})") from None
    return Source(spec, "tokenizer.json file", own_backend(backend), "tokenizers.Tokenizer")


def _from_folder(spec: str, folder: Path, kind: str | None = None) -> Source:
    has_tok = any((folder / f).is_file() for f in TOKENIZER_FILES)
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    has_weights = any(any(folder.glob(p)) for p in ("*.safetensors", "*.bin", "*.safetensors.index.json"))
    if not has_tok:
        single = [p for p in folder.iterdir() if p.suffix in (".model", ".tiktoken")] if folder.is_dir() else []
        if len(single) == 1:
            src = load_source(str(single[0]))
            src.spec = spec
            return src
        if config is not None or has_weights:
            raise GenrecalError(f"{spec}: holds a model but no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
        raise GenrecalError(
            f"{spec}: holds neither a tokenizer nor a model (looked for {', '.join(TOKENIZER_FILES)}, "
            "config.json, *.model, *.tiktoken)"
        )
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise GenrecalError(f"{spec}: cannot load the tokenizer ({type(e).__name__}: {first_line(e)})") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise GenrecalError(f"{spec}: {type(tok).__name__} has no fast (Rust) tokenizer, so no char offsets")
    is_model = config is not None and ("model_type" in config or "architectures" in config)
    src = Source(
        spec,
        kind or ("model folder" if is_model else "tokenizer folder"),
        own_backend(backend),
        type(tok).__name__,
        tokenizer=tok,
        folder=folder,
        config=config,
    )
    src.roles = {r: getattr(tok, f"{r}_token", None) for r in ("bos", "eos", "pad", "unk")}
    src.roles["image"] = _image_token(src)
    if config is not None:
        src.config_vocab_key, src.config_vocab_size = _config_vocab_size(config)
        src.head_tensor, src.head_rows = _head_rows(folder, src.notes)
    return src


def _from_hub(spec: str) -> Source:
    from huggingface_hub import constants, snapshot_download

    patterns = list(TOKENIZER_FILES) + list(CONFIG_FILES) + ["*.safetensors.index.json", "special_tokens_map.json",
                                                              "added_tokens.json", "merges.txt", "*.tiktoken"]
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        folder = snapshot_download(spec, allow_patterns=patterns, local_files_only=offline)
    except Exception as e:
        try:  # a copy in the local cache is enough
            folder = snapshot_download(spec, allow_patterns=patterns, local_files_only=True)
        except Exception:
            from huggingface_hub.errors import RepositoryNotFoundError

            if offline:
                why = "offline mode is on (HF_HUB_OFFLINE)"
            elif isinstance(e, RepositoryNotFoundError):
                why = "the Hub has no such repository (or it is private or gated)"
            else:
                why = f"the Hub cannot be reached, this machine looks offline ({first_line(e)})"
            raise GenrecalError(
                f"{spec}: not a local path, and no cached copy of this hub id; {why}. Download it where there is "
                f"network (`hf download {spec} --local-dir DIR`) and pass DIR instead"
            ) from None
    src = _from_folder(spec, Path(folder), kind="hub")
    if src.head_rows is None and not offline and src.config is not None:
        try:  # header-only range requests; no weights are fetched
            from huggingface_hub import get_safetensors_metadata

            meta = get_safetensors_metadata(spec)
            shapes = {n: t.shape for f in meta.files_metadata.values() for n, t in f.tensors.items()}
            src.head_tensor, src.head_rows = _pick_head(shapes)
        except Exception:
            src.notes.append("head rows unknown: could not read the safetensors headers from the Hub")
    return src


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GenrecalError(f"{path}: not readable JSON ({first_line(e)})") from None


def _config_vocab_size(config: dict) -> tuple[str | None, int | None]:
    if isinstance(config.get("vocab_size"), int):
        return "vocab_size", config["vocab_size"]
    for sub in ("text_config", "llm_config", "language_config", "language_model_config", "decoder"):
        if isinstance(config.get(sub), dict) and isinstance(config[sub].get("vocab_size"), int):
            return f"{sub}.vocab_size", config[sub]["vocab_size"]
    return None, None


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a .safetensors file's JSON header, reading no tensor data."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("file too short")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError(f"header length {n} is not plausible")
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


_HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
_EMBED_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")


def _pick_head(shapes: dict[str, Sequence[int]]) -> tuple[str | None, int | None]:
    """The LM head's name and row count; a tied model's input embeddings stand in for it."""
    for suffixes, tied in ((_HEAD_NAMES, False), (_EMBED_NAMES, True)):
        for name in sorted(shapes, key=len):
            if name.endswith(suffixes) and len(shapes[name]) == 2:
                return name + (" (tied input embeddings)" if tied else ""), int(shapes[name][0])
    return None, None


def _head_rows(folder: Path, notes: list[str]) -> tuple[str | None, int | None]:
    index = sorted(folder.glob("*.safetensors.index.json"))
    files = sorted(folder.glob("*.safetensors"))
    try:
        if index:
            weight_map = _read_json(index[0]).get("weight_map", {})
            wanted = {n: f for n, f in weight_map.items() if n.endswith(_HEAD_NAMES + _EMBED_NAMES)}
            shapes: dict[str, Sequence[int]] = {}
            for fname in sorted(set(wanted.values())):
                if (folder / fname).is_file():
                    shapes.update(safetensors_shapes(folder / fname))
            if not shapes and wanted:
                notes.append("head rows unknown: the shard that holds the head is not in the folder")
                return None, None
        elif files:
            shapes = {}
            for f in files:
                shapes.update(safetensors_shapes(f))
        else:
            if any(folder.glob("*.bin")):
                notes.append("head rows unknown: weights are .bin, which cannot be read without loading them")
            return None, None
    except (OSError, ValueError) as e:
        notes.append(f"head rows unknown: unreadable safetensors header ({first_line(e)})")
        return None, None
    return _pick_head(shapes)


def _image_token(src: Source) -> str | None:
    tok = src.tokenizer
    cfg = src.config or {}
    for key in ("image_token_id", "image_token_index"):
        for c in (cfg, cfg.get("text_config") or {}):
            if isinstance(c.get(key), int):
                name = src.backend.id_to_token(c[key])
                if name:
                    return name
    name = getattr(tok, "image_token", None) if tok is not None else None
    if isinstance(name, str) and src.backend.token_to_id(name) is not None:
        return name
    for name in IMAGE_TOKENS:
        if src.backend.token_to_id(name) is not None:
            return name
    return None

