"""Turn a bare tiktoken `.tiktoken` or SentencePiece `.model` file into a fast `tokenizers.Tokenizer`."""

from __future__ import annotations

import binascii
import hashlib
from pathlib import Path
from typing import Any

from ...errors import GenrecalError, first_line
from .bpe import bpe_tables
from .source import SPECIAL_ROLES, Source, own_backend

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


def from_sentencepiece(spec: str, path: Path) -> Source:
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
    src = Source(spec, "SentencePiece file", own_backend(backend), f"{algo}{fallback}, converted", roles=roles)
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


def from_tiktoken(spec: str, path: Path) -> Source:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    data = path.read_bytes()
    ranks = _read_tiktoken(spec, data)
    known = _KNOWN_TIKTOKEN.get(hashlib.sha256(data).hexdigest())
    notes = []
    if known is None:
        known = dict(name="unknown", pattern=_CL100K_PATTERN, nfc=False, specials={}, roles={})
        notes.append("unknown .tiktoken file: cl100k's pre-tokenizer pattern assumed, no special tokens")
    vocab, merges = bpe_tables(ranks)
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
    src = Source(spec, "tiktoken file", own_backend(backend), f"{known['name']}, converted", vocab=vocab)
    src.roles = {r: known["roles"].get(r) for r in SPECIAL_ROLES}
    src.notes.extend(notes)
    return src

