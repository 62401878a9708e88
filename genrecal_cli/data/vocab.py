"""Pure vocabulary comparison: each token's surface (the text it stands for, whatever the
tokenizer's marker) and the overlap of two vocabularies' surfaces. No I/O, no rich."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Collection, Iterable, Mapping, Sequence

import numpy as np

MARKERS = ("byte-level", "sentencepiece", "wordpiece", "plain")

# GPT-2's reversible byte <-> printable-char table, inverted: byte-level char -> the latin-1 char of its byte.
_BYTE_CHARS = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))


def _byte_level_table() -> dict[int, int]:
    chars = _BYTE_CHARS[:]
    codes = chars[:]
    extra = 0
    for b in range(256):
        if b not in chars:
            chars.append(b)
            codes.append(256 + extra)
            extra += 1
    return {code: byte for byte, code in zip(chars, codes)}


_FROM_BYTE_LEVEL = _byte_level_table()
# The same as an array, for a whole vocabulary in one lookup (~8x str.translate); a char below 256
# that is no byte-level char stands for its own byte, as translate-then-latin-1 reads it.
_CODE_TO_BYTE = np.arange(max(_FROM_BYTE_LEVEL) + 1).astype(np.uint8)
_CODE_TO_BYTE[list(_FROM_BYTE_LEVEL)] = list(_FROM_BYTE_LEVEL.values())


def detect_marker(tokens: Iterable[str], component_types: Collection[str] = ()) -> str:
    """Which word-boundary marker a vocabulary uses: one of `MARKERS`.

    `component_types` are the type names of the tokenizer's decoder / pre-tokenizer / model
    (e.g. {"ByteLevel"}, {"Metaspace"}, {"WordPiece"}); they decide when present, else the
    vocabulary is sniffed for `Ġ`, `▁` and `##` prefixes.
    """
    types = set(component_types)
    if "ByteLevel" in types:
        return "byte-level"
    if "Metaspace" in types:
        return "sentencepiece"
    if "WordPiece" in types:
        return "wordpiece"
    counts = {"byte-level": 0, "sentencepiece": 0, "wordpiece": 0}
    n = 0
    for tok in tokens:
        n += 1
        if tok.startswith("Ġ"):
            counts["byte-level"] += 1
        elif tok.startswith("▁"):
            counts["sentencepiece"] += 1
        elif tok.startswith("##"):
            counts["wordpiece"] += 1
    best = max(counts, key=counts.get)
    return best if counts[best] >= max(1, n // 100) else "plain"


def normalise_surface(token: str, marker: str) -> str:
    """The text a vocabulary entry stands for, with its marker convention undone.

    A word-initial space is a real " " (byte-level `Ġ`, SentencePiece `▁`); WordPiece word-initial
    pieces get a leading " " and `##` continuations lose their prefix, so " the" means the same
    in all three. Bytes that are not whole UTF-8 characters (byte-level fragments, SentencePiece
    `<0xNN>` fallbacks) become lone surrogates (`surrogateescape`), so equal bytes compare equal.
    """
    if marker == "byte-level":
        try:
            return token.translate(_FROM_BYTE_LEVEL).encode("latin-1").decode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # an added token that is not byte-level encoded
            return token
    if marker == "sentencepiece":
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return bytes([int(token[3:5], 16)]).decode("utf-8", "surrogateescape")
            except ValueError:
                return token
        return token.replace("▁", " ")
    if marker == "wordpiece":
        return token[2:] if token.startswith("##") and len(token) > 2 else " " + token
    return token


def _byte_level_bytes(text: str) -> bytes | None:
    """The bytes that byte-level chars stand for; None where a char is neither byte-level nor latin-1."""
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    if len(codes) and codes.max() >= len(_CODE_TO_BYTE):
        return None
    return _CODE_TO_BYTE[codes].tobytes()


def normalise_surfaces(tokens: Sequence[str], marker: str) -> list[str]:
    """`normalise_surface` over a whole vocabulary; byte-level in one pass (a 250k vocabulary in ~0.05 s)."""
    if marker == "byte-level" and tokens:
        # NUL between the tokens lets one decode do them all, as no UTF-8 sequence spans a NUL; the
        # tokens that turn into a NUL themselves (`Ā` is byte 0) would split too, so they go alone
        alone = [i for i, t in enumerate(tokens) if "Ā" in t or "\x00" in t]
        rest = list(tokens)
        for i in alone:
            rest[i] = ""
        joined = _byte_level_bytes("\x00".join(rest))
        if joined is not None:  # else some added token is not byte-level encoded: one by one
            out = joined.decode("utf-8", "surrogateescape").split("\x00")
            for i in alone:
                out[i] = normalise_surface(tokens[i], marker)
            return out
    return [normalise_surface(t, marker) for t in tokens]


def surfaces(vocab: Mapping[str, int], marker: str, exclude_ids: Collection[int] = ()) -> dict[str, int]:
    """Map normalised surface -> id for a `token -> id` vocabulary, skipping `exclude_ids`.

    Where two entries normalise to the same surface (e.g. SentencePiece `▁` and `<0x20>`), the lower id wins.
    """
    exclude = set(exclude_ids)
    tokens = [t for t, i in vocab.items() if i not in exclude]
    ids = [vocab[t] for t in tokens]
    names = normalise_surfaces(tokens, marker)
    out = dict(zip(names, ids))
    if len(out) < len(names):  # some surface came twice, and the last one is kept: keep the lowest
        for surface, idx in zip(names, ids):
            if idx < out[surface]:
                out[surface] = idx
    return out


@dataclass(frozen=True)
class Overlap:
    """How much of two surface vocabularies is shared, and how much of that sits at the same id."""

    size_a: int
    size_b: int
    shared: int
    same_id: int

    @property
    def share_of_a(self) -> float:
        """Fraction of a's surfaces that b also has."""
        return self.shared / self.size_a if self.size_a else 0.0

    @property
    def share_of_b(self) -> float:
        return self.shared / self.size_b if self.size_b else 0.0

    @property
    def same_id_share(self) -> float:
        """Of the shared surfaces, the fraction with the same id on both sides (index order)."""
        return self.same_id / self.shared if self.shared else 0.0

    def swapped(self) -> "Overlap":
        return Overlap(self.size_b, self.size_a, self.shared, self.same_id)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(share_of_a=self.share_of_a, share_of_b=self.share_of_b, same_id_share=self.same_id_share)
        return d


def vocab_overlap(a: Mapping[str, int], b: Mapping[str, int]) -> Overlap:
    """Compare two `surface -> id` maps (from `surfaces`): sizes, shared surfaces, shared at the same id."""
    if len(b) < len(a):
        return vocab_overlap(b, a).swapped()
    shared = same = 0
    for surface, idx in a.items():
        other = b.get(surface)
        if other is not None:
            shared += 1
            same += other == idx
    return Overlap(len(a), len(b), shared, same)
