"""`genrecal inspect-vocab`: load two tokenizers from whatever the user has and show how their token types differ.

Sources: a model or tokenizer folder, a hub id, a SentencePiece `.model` or a tiktoken `.tiktoken` file.
Everything becomes a fast `tokenizers.Tokenizer` with char offsets; the comparison itself is `vocab.py`.
Model weights are never loaded: the head's row count comes from the safetensors header.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data import vocab as V
from ..errors import GenrecalError, first_line

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
CONFIG_FILES = ("config.json", "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja")
IMAGE_TOKENS = ("<|image_pad|>", "<image>", "<IMG_CONTEXT>", "<image_soft_token>", "<|image|>", "[IMG]")
SPECIAL_ROLES = ("bos", "eos", "pad", "unk", "image")

DEFAULT_TEXT = """\
The picture shows a small red circle in the upper left corner and a large blue square below it. \
Three green triangles are lined up along the bottom edge; the middle one is slightly rotated. \
Q: How many shapes are there in total? A: There are five shapes: one circle, one square and three triangles. \
The background is light grey, and nothing overlaps. It's a simple scene, but it isn't trivial to describe \
precisely: the square's edge is 42 pixels long, roughly 2.5 times the circle's radius (about 17 px). \
When asked "What colour is the largest shape?", a careful model answers "blue" rather than guessing. \
Vision-language models read an image as a grid of patches, e.g. 448x448 pixels split into 14x14 patches, \
which gives 1,024 patches before any merging. Their tokenizers, however, differ: one splits "unbelievable" \
into three pieces, another into two; one writes a leading space as Ġ, another as ▁. \
Distilling a 72B teacher into a 2B student is straightforward when both share a vocabulary of 151,665 tokens; \
when they don't (say 151,665 against 32,000), the logits can't be compared index by index. \
Answers in the data set are short ("yes", "no", "3", "top-left") or long descriptions such as: \
"A yellow star sits in the centre, surrounded by four purple hexagons arranged clockwise." \
Résumé, naïve, café and façade keep their accents; numbers like 3.14159, 2024-06-18 and 10,000 stay intact.
"""

# Known tiktoken files (sha256 of the file): pre-tokenizer pattern, special tokens, roles, NFC.
# tokenizers' Oniguruma reads `{1,3}+` as "one or more runs", not possessive: an atomic group says it.
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|(?>\p{N}{1,3})| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
# Qwen2.5-VL's added tokens (a superset of Qwen2-VL's), in id order from 151,643.
_QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
_KNOWN_TIKTOKEN = {
    "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186": dict(
        name="Qwen2 BPE", pattern=_QWEN2_PATTERN, nfc=True,
        specials={t: 151643 + i for i, t in enumerate(_QWEN_SPECIALS)},
        roles={"eos": "<|endoftext|>", "pad": "<|endoftext|>", "image": "<|image_pad|>"},
    ),
    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7": dict(
        name="cl100k_base", pattern=_CL100K_PATTERN, nfc=False,
        specials={"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                  "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
        roles={"eos": "<|endoftext|>"},
    ),
    "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d": dict(
        name="o200k_base", pattern=_O200K_PATTERN, nfc=False,
        specials={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
        roles={"eos": "<|endoftext|>"},
    ),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


# ---------------------------------------------------------------- loading


@dataclass
class Source:
    """One loaded tokenizer plus what its folder says about the model (sizes, image token, template)."""

    spec: str
    kind: str
    backend: Any  # tokenizers.Tokenizer, padding and truncation off
    tokenizer_class: str
    tokenizer: Any = None  # the transformers tokenizer, when loaded through transformers
    folder: Path | None = None
    roles: dict[str, str | None] = field(default_factory=dict)
    config: dict | None = None
    config_vocab_size: int | None = None
    config_vocab_key: str | None = None
    head_rows: int | None = None
    head_tensor: str | None = None
    notes: list[str] = field(default_factory=list)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of one text (the same ids every statistic is computed from)."""
        if self.tokenizer is not None and add_special_tokens:
            return list(self.tokenizer.encode(text, add_special_tokens=True))
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def offsets(self, texts: Sequence[str]) -> list[np.ndarray]:
        """(n_i, 2) char offsets of each text's tokens, no special tokens."""
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2) for e in encs]

    @property
    def is_vlm(self) -> bool:
        if self.folder is None:
            return False
        cfg = self.config or {}
        return bool(
            "vision_config" in cfg
            or (self.folder / "preprocessor_config.json").is_file()
            or (self.folder / "processor_config.json").is_file()
        )


def _own_backend(backend):
    backend.no_padding()
    backend.no_truncation()
    return backend


def load_source(spec: str) -> Source:
    """Load a tokenizer from a folder, hub id, `.model`, `.tiktoken` or `tokenizer.json`; GenrecalError if it can't."""
    path = Path(spec).expanduser()
    if path.is_file():
        kind = _file_kind(path)
        if kind == "model":
            return _from_sentencepiece(spec, path)
        if kind == "tiktoken":
            return _from_tiktoken(spec, path)
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
    return Source(spec, "tokenizer.json file", _own_backend(backend), "tokenizers.Tokenizer")


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
        _own_backend(backend),
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


def _sentencepiece_proto(spec: str, path: Path):
    try:
        from transformers.convert_slow_tokenizer import import_protobuf

        model_pb2 = import_protobuf()
    except ImportError:
        raise GenrecalError(f"{spec}: reading a SentencePiece .model needs `protobuf` (pip install protobuf)") from None
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:
        raise GenrecalError(f"{spec}: not a SentencePiece model (cannot parse it: {first_line(e)})") from None
    if len(proto.pieces) == 0:
        raise GenrecalError(f"{spec}: not a SentencePiece model (no pieces in it)")
    if proto.trainer_spec.model_type not in (1, 2):
        raise GenrecalError(
            f"{spec}: SentencePiece model type {proto.trainer_spec.model_type} is not supported (only unigram and BPE)"
        )
    return proto


def _from_sentencepiece(spec: str, path: Path) -> Source:
    proto = _sentencepiece_proto(spec, path)
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import SpmConverter

    pieces = proto.pieces
    if proto.trainer_spec.model_type == 2:
        model_vocab: Any = {p.piece: i for i, p in enumerate(pieces)}
    else:
        model_vocab = [(p.piece, p.score) for p in pieces]
    try:
        backend = SpmConverter.build_tokenizer_from_spm_proto(proto, model_vocab, legacy=True)
    except Exception as e:
        raise GenrecalError(f"{spec}: cannot convert this SentencePiece model ({first_line(e)})") from None
    ts = proto.trainer_spec

    def piece(i: int) -> str | None:
        return pieces[i].piece if 0 <= i < len(pieces) else None

    roles = {"bos": piece(ts.bos_id), "eos": piece(ts.eos_id), "pad": piece(ts.pad_id), "unk": piece(ts.unk_id)}
    # control pieces (type 3) are special; SentencePiece never emits them from text
    control = [p.piece for p in pieces if p.type == 3] + [t for t in roles.values() if t]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(control)])
    algo = "BPE" if ts.model_type == 2 else "unigram"
    fallback = ", byte fallback" if ts.byte_fallback else ""
    src = Source(spec, "SentencePiece file", _own_backend(backend), f"{algo}{fallback}, converted", roles=roles)
    src.roles["image"] = None
    if roles["bos"]:
        # A bare .model does not say; Llama and Mistral's tokenizer configs prepend BOS.
        backend.post_processor = processors.TemplateProcessing(
            single=f"{roles['bos']} $A", pair=f"{roles['bos']} $A $B", special_tokens=[(roles["bos"], ts.bos_id)]
        )
        src.notes.append("BOS at the start assumed (a bare .model does not say; Llama/Mistral configs add it)")
    return src


def _read_tiktoken(spec: str, data: bytes) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[binascii.a2b_base64(tok, strict_mode=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise GenrecalError(
                f"{spec}: not a tiktoken BPE file (line {n} is not `<base64 token> <rank>`)"
            ) from None
    if not ranks:
        raise GenrecalError(f"{spec}: not a tiktoken BPE file (it holds no tokens)")
    if len(set(ranks.values())) != len(ranks):
        raise GenrecalError(f"{spec}: not a tiktoken BPE file (two tokens share a rank)")
    return ranks


def _from_tiktoken(spec: str, path: Path) -> Source:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    data = path.read_bytes()
    ranks = _read_tiktoken(spec, data)
    known = _KNOWN_TIKTOKEN.get(hashlib.sha256(data).hexdigest())
    notes = []
    if known is None:
        known = dict(name="unknown", pattern=_CL100K_PATTERN, nfc=False, specials={}, roles={})
        notes.append("unknown .tiktoken file: cl100k's pre-tokenizer pattern assumed, no special tokens")
    # tiktoken merges the adjacent pair whose concatenation ranks lowest; listing every split of every
    # token as a merge, ordered by the token's rank, makes BPE do exactly that.
    to_chars = {b: chr(c) for c, b in V._FROM_BYTE_LEVEL.items()}
    table = str.maketrans({chr(b): c for b, c in to_chars.items()})
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    get = ranks.get
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        s = tok.decode("latin-1").translate(table)
        vocab[s] = rank
        if len(tok) > 1:
            splits = [
                (a, b, i)
                for i in range(1, len(tok))
                if (a := get(tok[:i])) is not None and (b := get(tok[i:])) is not None
            ]
            if len(splits) > 1:
                splits.sort()
            merges.extend((s[:i], s[i:]) for _, _, i in splits)
    try:
        backend = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    except Exception as e:
        raise GenrecalError(f"{spec}: cannot build a BPE tokenizer from it ({first_line(e)})") from None
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(known["pattern"]), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    if known["nfc"]:
        backend.normalizer = normalizers.NFC()
    specials = known["specials"]
    if specials:
        by_id = {i: t for t, i in specials.items()}
        base = max(ranks.values()) + 1
        # tokenizers numbers added tokens in order: fill id gaps so each special lands on its real id
        names = [by_id.get(i, f"<|reserved_{i}|>") for i in range(base, max(by_id) + 1)]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    src = Source(spec, "tiktoken file", _own_backend(backend), f"{known['name']}, converted")
    src.roles = {r: known["roles"].get(r) for r in SPECIAL_ROLES}
    src.notes.extend(notes)
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


# ---------------------------------------------------------------- report


@dataclass
class SideReport:
    """What one side looks like: sizes, special tokens, splits per 100 chars, images and chat template."""

    role: str
    source: str
    kind: str
    tokenizer_class: str
    marker: str
    len_tokenizer: int
    base_vocab: int
    config_vocab_size: int | None
    config_vocab_key: str | None
    head_rows: int | None
    head_tensor: str | None
    added_tokens: int
    special_added_tokens: int
    special_tokens: dict[str, dict | None]
    adds_at_start: list[str]
    adds_at_end: list[str]
    tokens_per_100_chars: float
    image: dict | None
    chat_template: str | None
    notes: list[str]


@dataclass
class Report:
    """Everything `inspect-vocab` found; `to_json()` holds the same fields the tables show."""

    teacher: SideReport
    student: SideReport
    text: dict
    overlap: dict
    splits: dict
    sample: dict | None
    asymmetries: list[str]
    verdict: dict

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, default=str) + "\n"


def _component_types(backend) -> set[str]:
    types: set[str] = {type(backend.model).__name__}

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                types.add(node["type"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for part in (backend.decoder, backend.pre_tokenizer):
        if part is not None:
            try:
                walk(json.loads(part.__getstate__()))
            except Exception:
                pass
    return types


def _special_ids(src: Source) -> set[int]:
    ids = {i for i, t in src.backend.get_added_tokens_decoder().items() if t.special}
    for tok in src.roles.values():
        if tok is not None and src.backend.token_to_id(tok) is not None:
            ids.add(src.backend.token_to_id(tok))
    return ids


def _extras(src: Source) -> tuple[list[str], list[str]]:
    """Tokens the tokenizer adds around a text by itself (BOS, EOS, [CLS], ...)."""
    probe = "a b"
    plain = src.encode(probe)
    full = src.encode(probe, add_special_tokens=True)
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            conv = src.backend.id_to_token
            return [conv(t) for t in full[:i]], [conv(t) for t in full[i + len(plain) :]]
    return [], []


def _conversation(image: bool) -> list[dict]:
    if image:
        return [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        ]
    return [
        {"role": "user", "content": "What shape is this?"},
        {"role": "assistant", "content": "A red circle."},
    ]


def _chat_template(src: Source, processor, notes: list[str]) -> str | None:
    owner = processor if processor is not None else src.tokenizer
    if owner is None or not getattr(owner, "chat_template", None):
        return None
    try:
        return owner.apply_chat_template(_conversation(processor is not None), tokenize=False)
    except Exception as e:
        notes.append(f"chat template did not render ({first_line(e)})")
        return None


def _size_dict(image_processor, attr: str) -> dict:
    size = getattr(image_processor, attr, None)
    if size is None:
        return {}
    items = size.items() if hasattr(size, "items") else vars(size).items()
    return {k: v for k, v in items if v is not None}


def _default_image_size(image_processor) -> tuple[int, int] | None:
    """The size the processor resizes to; for dynamic resolution (Qwen2-VL), the largest square within max_pixels."""
    size, crop = _size_dict(image_processor, "size"), _size_dict(image_processor, "crop_size")
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    # Qwen2-VL's size holds pixel counts: longest_edge is max_pixels
    pixels = getattr(image_processor, "max_pixels", None)
    if not pixels and hasattr(image_processor, "temporal_patch_size"):
        pixels = size.get("longest_edge")
    if pixels:
        side = int(pixels**0.5)
        return side, side
    if "height" in crop and "width" in crop:
        return int(crop["height"]), int(crop["width"])
    edge = size.get("shortest_edge") or size.get("longest_edge")
    return (int(edge), int(edge)) if isinstance(edge, int) and edge <= 4096 else None


def _load_processor(src: Source):
    """The processor, through models.py's image-only classes where the family has one (no torchvision)."""
    from transformers import AutoProcessor

    loader = AutoProcessor
    model_type = (src.config or {}).get("model_type")
    try:
        from ..models import FAMILIES

        if model_type in FAMILIES and FAMILIES[model_type].processor is not None:
            loader = FAMILIES[model_type].processor
    except ImportError:
        pass
    return loader.from_pretrained(str(src.folder))


def _placeholder(processor) -> str | None:
    """What the chat template writes for one image: the difference between a turn with and without it."""
    def render(content):
        return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)

    try:
        text = [{"type": "text", "text": "Q"}]
        with_image, without = render([{"type": "image"}, *text]), render(text)
    except Exception:
        return None
    i = 0
    while i < len(without) and with_image[i] == without[i]:
        i += 1
    j = 0
    while j < len(without) - i and with_image[-1 - j] == without[-1 - j]:
        j += 1
    return with_image[i : len(with_image) - j] or None


def _image_info(src: Source, notes: list[str]) -> tuple[dict | None, Any]:
    """Placeholder and tokens per image, from the processor (no weights); also returns the processor."""
    try:
        processor = _load_processor(src)
    except Exception as e:
        notes.append(f"no processor: {first_line(e)}")
        return None, None
    if getattr(processor, "image_processor", None) is None:
        return None, None
    token = getattr(processor, "image_token", None) or src.roles.get("image")
    token_id = src.backend.token_to_id(token) if token else None
    placeholder = _placeholder(processor) or token
    info: dict = {"placeholder": placeholder, "image_token": token, "image_token_id": token_id,
                  "default_size": None, "tokens_default": None, "tokens_448": None}
    if token_id is None:
        notes.append("the processor names no image token")
        return info, processor
    from PIL import Image

    def count(h: int, w: int) -> int | None:
        try:
            out = processor(text=[placeholder], images=[Image.new("RGB", (w, h), (200, 30, 30))])
            return int(np.sum(np.asarray(out["input_ids"][0]) == token_id))
        except Exception as e:
            notes.append(f"a {h}x{w} image failed in the processor ({first_line(e)})")
            return None

    size = _default_image_size(processor.image_processor)
    if size is not None:
        info["default_size"] = f"{size[0]}x{size[1]}"
        info["tokens_default"] = count(*size)
    info["tokens_448"] = count(448, 448)
    return info, processor


def _chunks(text: str, size: int = 16384) -> list[str]:
    """Cut a long text at line ends into pieces of about `size` chars."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def _sentences(texts: Sequence[str], limit: int = 20000) -> list[str]:
    out = []
    for t in texts:
        for s in re.split(r"(?<=[.!?])\s+|\n+", t[:limit]):
            s = s.strip()
            if 40 <= len(s) <= 140:
                out.append(s)
        if len(out) >= 60:
            break
    return out[:60]


def _sample(teacher: Source, student: Source, texts: Sequence[str]) -> dict | None:
    """The sentence whose splits differ most, aligned span by span."""
    cands = _sentences(texts) or [t.strip()[:140] for t in texts if t.strip()][:1]
    if not cands:
        return None
    ta, sa = teacher.offsets(cands), student.offsets(cands)
    best, best_score = 0, -1
    for i, (a, b) in enumerate(zip(ta, sa)):
        st = V.split_stats(cands[i], a, b)
        score = st.spans - st.one_one
        if score > best_score:
            best, best_score = i, score
    text = cands[best]
    spans = []
    for sp in V.align_spans(text, ta[best], sa[best]):
        spans.append({
            "start": sp.start, "end": sp.end, "kind": sp.kind,
            "teacher": _pieces(text, sp.start, sp.end, sp.cuts_a),
            "student": _pieces(text, sp.start, sp.end, sp.cuts_b),
        })
    return {"text": text, "spans": spans}


def _pieces(text: str, start: int, end: int, cuts: Sequence[int]) -> list[str]:
    edges = [start, *cuts, end]
    return [text[a:b] for a, b in zip(edges, edges[1:])]


def _side(role: str, src: Source, stats_tokens: int, chars: int, want_images: bool) -> SideReport:
    backend = src.backend
    added = backend.get_added_tokens_decoder()
    specials: dict[str, dict | None] = {}
    for r in SPECIAL_ROLES:
        tok = src.roles.get(r)
        tid = backend.token_to_id(tok) if tok else None
        specials[r] = {"token": tok, "id": tid} if tok is not None and tid is not None else None
    start, end = _extras(src)
    notes = list(src.notes)
    image, processor = (None, None)
    if want_images and src.is_vlm:
        image, processor = _image_info(src, notes)
    template = _chat_template(src, processor, notes)
    return SideReport(
        role=role,
        source=src.spec,
        kind=src.kind,
        tokenizer_class=src.tokenizer_class,
        marker=V.detect_marker(backend.get_vocab(with_added_tokens=False), _component_types(backend)),
        len_tokenizer=len(src.tokenizer) if src.tokenizer is not None else backend.get_vocab_size(True),
        base_vocab=backend.get_vocab_size(with_added_tokens=False),
        config_vocab_size=src.config_vocab_size,
        config_vocab_key=src.config_vocab_key,
        head_rows=src.head_rows,
        head_tensor=src.head_tensor,
        added_tokens=len(added),
        special_added_tokens=sum(1 for t in added.values() if t.special),
        special_tokens=specials,
        adds_at_start=start,
        adds_at_end=end,
        tokens_per_100_chars=V.tokens_per_100_chars(stats_tokens, chars),
        image=image,
        chat_template=template,
        notes=notes,
    )


def _role(r: str) -> str:
    return "image token" if r == "image" else r.upper()


def _asymmetries(t: SideReport, s: SideReport) -> list[str]:
    out = []
    for where, a, b in (("start", t.adds_at_start, s.adds_at_start), ("end", t.adds_at_end, s.adds_at_end)):
        if a != b:
            fmt = lambda x: " ".join(x) if x else "nothing"  # noqa: E731
            out.append(f"at the {where} of a text the teacher adds {fmt(a)}, the student {fmt(b)}")
    for r in SPECIAL_ROLES:
        a, b = t.special_tokens[r], s.special_tokens[r]
        if (a is None) != (b is None):
            has, lacks = ("teacher", "student") if a else ("student", "teacher")
            tok = (a or b)["token"]
            out.append(f"{_role(r)}: the {has} has {tok}, the {lacks} none")
        elif a and b and (a["token"] != b["token"] or a["id"] != b["id"]):
            out.append(f"{_role(r)}: {a['token']} ({a['id']}) vs {b['token']} ({b['id']})")
    if t.image and s.image and t.image.get("tokens_448") != s.image.get("tokens_448"):
        n_t, n_s = t.image.get("tokens_448"), s.image.get("tokens_448")
        out.append(f"a 448x448 image takes {n_t} teacher tokens, {n_s} student tokens")
    return out


def _prepare_texts(
    text: str | Sequence[str] | None, text_source: str | None, samples: int | None
) -> tuple[list[str], str]:
    if text is None:
        return [DEFAULT_TEXT], "built-in English sample"
    label = text_source or "given text"
    texts = [text] if isinstance(text, str) else [t for t in text if isinstance(t, str)]
    if samples is not None and not isinstance(text, str):
        texts = texts[:samples]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise GenrecalError(f"{label}: the sample text is empty")
    return texts, label


def inspect_vocab(
    teacher: str | Source,
    student: str | Source,
    *,
    text: str | Sequence[str] | None = None,
    text_source: str | None = None,
    samples: int | None = 200,
    images: bool = True,
) -> Report:
    """Compare the teacher's and student's tokenizers; raises GenrecalError for unusable sources or empty text.

    teacher, student: sources as `load_source` takes them, or already loaded Sources.
    text: one long text (e.g. a file's contents) or several (e.g. the data set's answers; the first
    `samples` are used); None uses a built-in English sample. text_source labels it in messages and
    the report. images=False skips the processors (image token counts, VLM chat templates).
    """
    texts, label = _prepare_texts(text, text_source, samples)
    t_src = teacher if isinstance(teacher, Source) else load_source(teacher)
    s_src = student if isinstance(student, Source) else load_source(student)

    # long texts are cut at line ends so that encode_batch runs in parallel
    chunks = [chunk for t in texts for chunk in _chunks(t)]
    stats = V.split_stats_many(chunks, t_src.offsets(chunks), s_src.offsets(chunks))
    chars = stats.chars

    t_rep = _side("teacher", t_src, stats.tokens_a, chars, images)
    s_rep = _side("student", s_src, stats.tokens_b, chars, images)

    t_surf = V.surfaces(t_src.backend.get_vocab(with_added_tokens=False), t_rep.marker, _special_ids(t_src))
    s_surf = V.surfaces(s_src.backend.get_vocab(with_added_tokens=False), s_rep.marker, _special_ids(s_src))
    overlap = V.vocab_overlap(t_surf, s_surf)
    asym = _asymmetries(t_rep, s_rep)
    heads = (t_rep.head_rows, s_rep.head_rows)
    verdict = V.verdict(t_rep.len_tokenizer, s_rep.len_tokenizer, overlap, stats, heads)
    if verdict.same and asym:  # same token type, but say what still differs
        verdict = V.verdict(t_rep.len_tokenizer, s_rep.len_tokenizer, overlap, stats, heads, notes=asym)
    split_dict = stats.to_dict()
    return Report(
        teacher=t_rep,
        student=s_rep,
        text={"source": label, "texts": len(texts), "chars": chars},
        overlap=overlap.to_dict(),
        splits=split_dict,
        sample=_sample(t_src, s_src, texts),
        asymmetries=asym,
        verdict=verdict.to_dict(),
    )


# ---------------------------------------------------------------- rendering

_KIND_STYLE = {"1:1": "green", "1:n": "yellow", "n:1": "cyan", "n:m": "magenta", "1:0": "red", "0:1": "red"}


def _fmt_int(x: int | None) -> str:
    return "—" if x is None else f"{x:,}"


def _pct(x: float) -> str:
    if 0 < x < 0.001:
        return "<0.1%"
    if 0.999 < x < 1:
        return ">99.9%"
    return f"{100 * x:.1f}%"


def _special_cell(d: dict | None) -> str:
    return "—" if d is None else f"{d['token']}  {d['id']:,}"


def _aligned_lines(sample: dict, width: int):
    """Teacher and student renderings of the sample sentence, padded (·) span by span to line up."""
    from rich.text import Text

    rows = []
    top, bottom = Text(), Text()
    used = 0
    prev_end = None
    for sp in sample["spans"]:
        # spans that touch get a cut mark; a gap is whitespace that no token holds
        sep = "" if prev_end is None else (" " * (sp["start"] - prev_end) or "│")
        prev_end = sp["end"]
        a = "│".join(sp["teacher"])
        b = "│".join(sp["student"])
        w = max(len(a), len(b))
        if used and used + len(sep) + w > width:
            rows.append((top, bottom))
            top, bottom, used, sep = Text(), Text(), 0, ""
        style = _KIND_STYLE.get(sp["kind"], "white")
        for line, piece in ((top, a), (bottom, b)):
            line.append(sep, style="dim")
            line.append(piece, style=style)
            line.append("·" * (w - len(piece)), style="dim")
        used += len(sep) + w
    rows.append((top, bottom))
    return rows


def render(report: Report, console) -> None:
    """Print the report as rich tables, the aligned sample sentence and the verdict."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    t, s = report.teacher, report.student

    def table(title: str) -> Table:
        tab = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left", title_style="bold")
        tab.add_column("")
        tab.add_column("teacher", overflow="fold")
        tab.add_column("student", overflow="fold")
        return tab

    sizes = table("Sizes")
    sizes.add_row("source", Text(t.source), Text(s.source))
    sizes.add_row("loaded as", f"{t.kind} ({t.tokenizer_class})", f"{s.kind} ({s.tokenizer_class})")
    sizes.add_row("word marker", t.marker, s.marker)
    sizes.add_row("len(tokenizer)", _fmt_int(t.len_tokenizer), _fmt_int(s.len_tokenizer))
    sizes.add_row("base vocabulary", _fmt_int(t.base_vocab), _fmt_int(s.base_vocab))
    sizes.add_row("config vocab_size", _fmt_int(t.config_vocab_size), _fmt_int(s.config_vocab_size))
    sizes.add_row("head rows", _fmt_int(t.head_rows), _fmt_int(s.head_rows))
    sizes.add_row("added tokens (special)", f"{t.added_tokens:,} ({t.special_added_tokens:,})",
                  f"{s.added_tokens:,} ({s.special_added_tokens:,})")
    console.print(sizes)

    spec = table("Special tokens")
    for r in SPECIAL_ROLES:
        spec.add_row(_role(r), Text(_special_cell(t.special_tokens[r])),
                     Text(_special_cell(s.special_tokens[r])))
    spec.add_row("added at start", Text(" ".join(t.adds_at_start) or "—"), Text(" ".join(s.adds_at_start) or "—"))
    spec.add_row("added at end", Text(" ".join(t.adds_at_end) or "—"), Text(" ".join(s.adds_at_end) or "—"))
    console.print(spec)
    for a in report.asymmetries:
        console.print(Text(f"  ! {a}", style="yellow"))

    o = report.overlap
    ov = table("Vocabulary overlap (surface strings, markers normalised, special tokens left out)")
    ov.add_row("surfaces", _fmt_int(o["size_a"]), _fmt_int(o["size_b"]))
    shared = f"{o['shared']:,}"
    ov.add_row("also in the other", f"{shared} ({_pct(o['share_of_a'])})", f"{shared} ({_pct(o['share_of_b'])})")
    ov.add_row("of those, at the same id", f"{o['same_id']:,} ({_pct(o['same_id_share'])})",
               f"{o['same_id']:,} ({_pct(o['same_id_share'])})")
    console.print(ov)

    sp = report.splits
    txt = report.text
    plural = "s" if txt["texts"] != 1 else ""
    st = table(f"Splits on {txt['source']} ({txt['chars']:,} chars, {txt['texts']:,} text{plural})")
    st.add_row("tokens per 100 chars", f"{sp['tokens_per_100_chars_a']:.1f}", f"{sp['tokens_per_100_chars_b']:.1f}")
    st.add_row("boundaries", _fmt_int(sp["boundaries_a"]), _fmt_int(sp["boundaries_b"]))
    st.add_row("shared with the other", _pct(sp["boundary_share_a"]), _pct(sp["boundary_share_b"]))
    st.add_row("boundary agreement", _pct(sp["boundary_agreement"]), "")
    n = sp["spans"] or 1
    st.add_row("aligned spans", _fmt_int(sp["spans"]), "")
    for label, key in (("  1:1", "one_one"), ("  1:n (1 teacher token, n student)", "one_many"),
                       ("  n:1", "many_one"), ("  n:m", "many_many")):
        st.add_row(label, f"{sp[key]:,} ({_pct(sp[key] / n)})", "")
    if sp["unmatched"]:
        st.add_row("  one side only", f"{sp['unmatched']:,}", "")
    console.print(st)

    if report.sample:
        console.print(Text("Sample sentence, span by span (│ cuts a token, · pads; ", style="bold")
                      + Text("1:1 ", style="green") + Text("1:n ", style="yellow") + Text("n:1 ", style="cyan")
                      + Text("n:m", style="magenta") + Text(")", style="bold"))
        width = max(40, (console.width or 100) - 10)
        for top, bottom in _aligned_lines(report.sample, width):
            console.print(Text("teacher  ", style="dim") + top)
            console.print(Text("student  ", style="dim") + bottom)
        console.print()

    if t.image or s.image:
        im = table("Images (processor, no weights)")
        g = lambda side, k: "—" if not side.image or side.image.get(k) is None else str(side.image[k])  # noqa: E731
        im.add_row("placeholder", Text(g(t, "placeholder")), Text(g(s, "placeholder")))
        im.add_row("image token", Text(f"{g(t, 'image_token')}  {g(t, 'image_token_id')}"),
                   Text(f"{g(s, 'image_token')}  {g(s, 'image_token_id')}"))
        im.add_row("tokens per image, default size",
                   f"{g(t, 'tokens_default')} at {g(t, 'default_size')}",
                   f"{g(s, 'tokens_default')} at {g(s, 'default_size')}")
        im.add_row("tokens per image, 448x448", g(t, "tokens_448"), g(s, "tokens_448"))
        console.print(im)

    if t.chat_template or s.chat_template:
        ct = Table(title="Chat templates on one conversation", box=box.SIMPLE_HEAVY, title_justify="left",
                   title_style="bold")
        ct.add_column("teacher", overflow="fold")
        ct.add_column("student", overflow="fold")
        ct.add_row(Text(t.chat_template or "(no chat template)"), Text(s.chat_template or "(no chat template)"))
        console.print(ct)

    for side in (t, s):
        for note in side.notes:
            console.print(Text(f"  note ({side.role}): {note}", style="dim"))

    v = report.verdict
    style = "bold green" if v["same"] else "bold red"
    line = Text(v["headline"], style=style)
    if v["reasons"]:
        line.append(" (" + "; ".join(v["reasons"]) + ")", style=style.replace("bold ", ""))
    console.print(line)
