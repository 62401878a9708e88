"""Pure split comparison: how two tokenizers cut the same text, aligned by character offsets, with
the verdict on whether they are the same token type. No I/O, no rich.

Used by `genrecal inspect-vocab` and the distill display's live statistics.

Offsets are `(start, end)` character positions into the text, as fast tokenizers return them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from .vocab import Overlap

_WHITESPACE = np.array([c for c in range(0x3001) if chr(c).isspace()], dtype=np.uint32)


def tokens_per_100_chars(n_tokens: int, n_chars: int) -> float:
    """Tokens per 100 characters of text; 0 for empty text."""
    return 100.0 * n_tokens / n_chars if n_chars else 0.0


def _as_array(offsets) -> np.ndarray:
    arr = np.asarray(offsets, dtype=np.int64)
    return arr.reshape(-1, 2)


def _non_space_positions(text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return np.flatnonzero(~np.isin(codes, _WHITESPACE))


def _strip(spans: np.ndarray, non_space: np.ndarray, n_chars: int) -> np.ndarray:
    """Trim whitespace off each span and drop the empty ones (specials, pure-space tokens)."""
    if len(non_space) == 0 or len(spans) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    i = np.searchsorted(non_space, spans[:, 0], side="left")
    start = np.where(i < len(non_space), non_space[np.minimum(i, len(non_space) - 1)], n_chars)
    j = np.searchsorted(non_space, spans[:, 1], side="left") - 1
    end = np.where(j >= 0, non_space[np.maximum(j, 0)] + 1, 0)
    keep = start < end
    out = np.stack([start[keep], end[keep]], axis=1)
    if len(out) > 1:  # several byte tokens inside one character share its span: count it once
        dup = np.all(out[1:] == out[:-1], axis=1)
        out = out[np.concatenate([[True], ~dup])]
    return out


def strip_spans(text: str, offsets) -> np.ndarray:
    """(n, 2) int array of the token spans that hold non-space text, trimmed of whitespace.

    Tokenizers disagree on whether a space belongs to the next token (`Ġthe`, `▁the`) or to no token
    (WordPiece); trimming makes " the" and "the" the same span, so only real split differences remain.
    """
    return _strip(_as_array(offsets), _non_space_positions(text), len(text))


def _unique(x: np.ndarray) -> np.ndarray:
    """np.unique, in one pass where x is already in order (trimmed spans in text order are)."""
    step = np.diff(x)
    if len(x) and (step >= 0).all():
        return x[np.concatenate([[True], step > 0])]
    return np.unique(x)


def _cuts(spans: np.ndarray) -> np.ndarray:
    """Sorted positions where a tokenization can be cut: token ends that no token crosses."""
    if len(spans) == 0:
        return np.zeros(0, dtype=np.int64)
    ends = spans[:, 1]
    reach = np.maximum.accumulate(ends)
    next_start = np.append(spans[1:, 0], np.iinfo(np.int64).max)
    return np.unique(ends[(reach == ends) & (next_start >= ends)])


def _groups(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Common cuts, the group index of each span of a and b, and the number of groups."""
    common = np.intersect1d(_cuts(a), _cuts(b), assume_unique=True)
    ga = np.searchsorted(common, a[:, 1], side="left")
    gb = np.searchsorted(common, b[:, 1], side="left")
    return common, ga, gb, len(common) + 1


def _classify(ca: np.ndarray, cb: np.ndarray) -> dict[str, int]:
    both = (ca > 0) & (cb > 0)
    return {
        "one_one": int(np.sum(both & (ca == 1) & (cb == 1))),
        "one_many": int(np.sum(both & (ca == 1) & (cb > 1))),
        "many_one": int(np.sum(both & (ca > 1) & (cb == 1))),
        "many_many": int(np.sum(both & (ca > 1) & (cb > 1))),
        "unmatched": int(np.sum((ca > 0) ^ (cb > 0))),
    }


@dataclass(frozen=True)
class SplitStats:
    """Counts from comparing two tokenizations of the same text; add them up over a batch or corpus.

    Boundaries are the starts and ends of whitespace-trimmed token spans. Aligned spans are the
    smallest stretches of text that both sides cut at the same places: one token against one
    (`one_one`), one of a against several of b (`one_many`), several against one (`many_one`),
    several against several (`many_many`); `unmatched` spans have tokens on one side only.
    """

    chars: int = 0
    tokens_a: int = 0
    tokens_b: int = 0
    boundaries_a: int = 0
    boundaries_b: int = 0
    shared_boundaries: int = 0
    one_one: int = 0
    one_many: int = 0
    many_one: int = 0
    many_many: int = 0
    unmatched: int = 0

    def __add__(self, other: "SplitStats") -> "SplitStats":
        return SplitStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def swapped(self) -> "SplitStats":
        return SplitStats(
            self.chars, self.tokens_b, self.tokens_a, self.boundaries_b, self.boundaries_a,
            self.shared_boundaries, self.one_one, self.many_one, self.one_many, self.many_many, self.unmatched,
        )

    @property
    def spans(self) -> int:
        return self.one_one + self.one_many + self.many_one + self.many_many + self.unmatched

    @property
    def tokens_per_100_chars_a(self) -> float:
        return tokens_per_100_chars(self.tokens_a, self.chars)

    @property
    def tokens_per_100_chars_b(self) -> float:
        return tokens_per_100_chars(self.tokens_b, self.chars)

    @property
    def boundary_share_a(self) -> float:
        """Fraction of a's boundaries that b has too."""
        return self.shared_boundaries / self.boundaries_a if self.boundaries_a else 1.0

    @property
    def boundary_share_b(self) -> float:
        return self.shared_boundaries / self.boundaries_b if self.boundaries_b else 1.0

    @property
    def boundary_agreement(self) -> float:
        """Shared boundaries over all distinct boundaries (Jaccard; symmetric)."""
        union = self.boundaries_a + self.boundaries_b - self.shared_boundaries
        return self.shared_boundaries / union if union else 1.0

    @property
    def one_one_share(self) -> float:
        return self.one_one / self.spans if self.spans else 1.0

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("spans", "tokens_per_100_chars_a", "tokens_per_100_chars_b", "boundary_share_a",
                     "boundary_share_b", "boundary_agreement", "one_one_share"):
            d[name] = getattr(self, name)
        return d


def split_stats(text: str, offsets_a, offsets_b) -> SplitStats:
    """Compare two tokenizations of `text` given each side's `(start, end)` char offsets, in text order.

    offsets_*: sequence of pairs or an (n, 2) int array; special tokens ((0, 0) spans) are ignored.
    Cost is O(n log n) in numpy, cheap enough to call on every training batch.
    """
    a_raw, b_raw = _as_array(offsets_a), _as_array(offsets_b)
    non_space = _non_space_positions(text)
    a, b = _strip(a_raw, non_space, len(text)), _strip(b_raw, non_space, len(text))
    bound_a = _unique(a.ravel())
    bound_b = _unique(b.ravel())
    shared = len(np.intersect1d(bound_a, bound_b, assume_unique=True))
    _, ga, gb, n = _groups(a, b)
    kinds = _classify(np.bincount(ga, minlength=n), np.bincount(gb, minlength=n))
    return SplitStats(
        chars=len(text),
        tokens_a=int(np.sum(a_raw[:, 1] > a_raw[:, 0])),
        tokens_b=int(np.sum(b_raw[:, 1] > b_raw[:, 0])),
        boundaries_a=len(bound_a),
        boundaries_b=len(bound_b),
        shared_boundaries=shared,
        **kinds,
    )


def split_stats_many(texts: Sequence[str], offsets_a: Sequence, offsets_b: Sequence) -> SplitStats:
    """`split_stats` summed over several texts (a training batch) in one vectorised pass.

    offsets_a[i], offsets_b[i]: each side's offsets into texts[i]. About as cheap as one call.
    """
    if not texts:
        return SplitStats()
    starts = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])
    # a newline between texts is whitespace: no trimmed span and no aligned span crosses it
    joined = "\n".join(texts)
    a = np.concatenate([_as_array(o) + s for o, s in zip(offsets_a, starts)])
    b = np.concatenate([_as_array(o) + s for o, s in zip(offsets_b, starts)])
    # specials at (0, 0) stay empty after the shift, so they are still ignored
    stats = split_stats(joined, a, b)
    return SplitStats(sum(len(t) for t in texts), *(getattr(stats, f.name) for f in fields(stats)[1:]))


@dataclass(frozen=True)
class AlignedSpan:
    """One aligned stretch `text[start:end]`, where each side cuts it (`cuts_*`: inner cut positions)."""

    start: int
    end: int
    tokens_a: int
    tokens_b: int
    cuts_a: tuple[int, ...]
    cuts_b: tuple[int, ...]

    @property
    def kind(self) -> str:
        """'1:1', '1:n', 'n:1', 'n:m', or '1:0' / '0:1' for tokens on one side only."""
        if not self.tokens_a or not self.tokens_b:
            return f"{min(self.tokens_a, 1)}:{min(self.tokens_b, 1)}"
        if self.tokens_a == 1:
            return "1:1" if self.tokens_b == 1 else "1:n"
        return "n:1" if self.tokens_b == 1 else "n:m"


def align_spans(text: str, offsets_a, offsets_b) -> list[AlignedSpan]:
    """The aligned spans of one text, in order, for display (`split_stats` counts the same spans)."""
    non_space = _non_space_positions(text)
    a = _strip(_as_array(offsets_a), non_space, len(text))
    b = _strip(_as_array(offsets_b), non_space, len(text))
    _, ga, gb, n = _groups(a, b)
    out = []
    for g in range(n):
        sa, sb = a[ga == g], b[gb == g]
        if len(sa) == 0 and len(sb) == 0:
            continue
        both = np.concatenate([sa, sb])
        start, end = int(both[:, 0].min()), int(both[:, 1].max())
        inner = lambda s: tuple(sorted({int(x) for x in s.ravel() if start < x < end}))  # noqa: E731
        out.append(AlignedSpan(start, end, len(sa), len(sb), inner(sa), inner(sb)))
    return out


@dataclass(frozen=True)
class Verdict:
    """Whether classic same-vocabulary logit distillation applies, with the reasons."""

    same: bool
    headline: str
    reasons: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"same": self.same, "headline": self.headline, "reasons": list(self.reasons)}


def _pct(x: float) -> str:
    pct = 100.0 * x
    if 0 < pct < 1:
        return f"{pct:.1f}%" if pct >= 0.1 else "<0.1%"
    if 99 < pct < 100:
        return f"{pct:.1f}%" if pct <= 99.9 else ">99.9%"
    return f"{pct:.0f}%"


def verdict(
    len_a: int,
    len_b: int,
    overlap: Overlap,
    splits: SplitStats | None,
    head_rows: Sequence[int | None] = (None, None),
    notes: Sequence[str] = (),
) -> Verdict:
    """Decide "same token type" or not from sizes, surface overlap and split agreement.

    Same means: identical base vocabularies (every surface on both sides, each at the same id), the
    same `len(tokenizer)`, and identical boundaries on the sample text. Heads with extra padding rows
    (Qwen2.5-3B's 151,936 vs 72B's 152,064) do not break it: logits are compared over `len(tokenizer)`.
    `notes` are extra observations (e.g. special-token asymmetries) appended to the reasons.
    """
    reasons: list[str] = []
    if len_a != len_b:
        reasons.append(f"vocab {len_a:,} vs {len_b:,}")
    if overlap.shared < max(overlap.size_a, overlap.size_b):
        reasons.append(
            f"{_pct(overlap.share_of_a)} of the teacher's tokens exist in the student, "
            f"{_pct(overlap.share_of_b)} the other way"
        )
    if overlap.shared and overlap.same_id < overlap.shared:
        reasons.append(f"{_pct(1 - overlap.same_id_share)} of shared tokens sit at a different id")
    if splits is not None and splits.boundary_agreement < 1.0:
        reasons.append(f"{_pct(1 - splits.boundary_agreement)} of boundaries differ")
    same = not reasons
    if not same and splits is not None and splits.spans and splits.one_one < splits.spans:
        reasons.append(f"{_pct(1 - splits.one_one_share)} of aligned spans are not 1:1")
    rows = [r for r in head_rows if r is not None]
    if same and len(rows) == 2 and rows[0] != rows[1]:
        reasons.append(f"head rows differ ({rows[0]:,} vs {rows[1]:,}): compare logits over the first {len_a:,}")
    reasons.extend(notes)
    if same:
        headline = "same token type: classic logit distillation applies"
    else:
        headline = "different token types: GenRecal needed"
    return Verdict(same, headline, tuple(reasons))
