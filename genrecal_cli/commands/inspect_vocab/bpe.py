"""A tiktoken rank table as the vocabulary and merge list of an equivalent `tokenizers` BPE, built in numpy."""

from __future__ import annotations

import numpy as np

from ...data import vocab as V

# Byte strings are found by a polynomial hash mod 2^64 (numpy's uint64 arithmetic wraps), then
# compared byte for byte: a collision costs a comparison, never a wrong merge. Odd, so invertible.
_BASE = 0x9E3779B97F4A7C15
_BLOCK = 1 << 16
# byte -> the code of its byte-level char (GPT-2's printable stand-ins), the inverse of data/vocab.py's table
_BYTE_TO_CODE = np.zeros(256, dtype="<u4")
_BYTE_TO_CODE[list(V._FROM_BYTE_LEVEL.values())] = list(V._FROM_BYTE_LEVEL)


def bpe_tables(ranks: dict[bytes, int], base: int = _BASE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """`byte-level token -> id` and the merges for `BPE(vocab, merges, ignore_merges=True)`.

    tiktoken merges the adjacent pair whose concatenation ranks lowest; listing every split of every
    token into two tokens as a merge, ordered by the token's rank and then the left part's, makes BPE
    do exactly that. base: the hash's (tests pass small ones to force collisions).
    """
    toks = sorted(ranks, key=ranks.__getitem__)
    lens = np.fromiter(map(len, toks), dtype=np.int64, count=len(toks))
    starts = np.cumsum(lens) - lens
    joined = b"".join(toks)
    # one lookup for the whole table (~6x str.translate): a byte is one char, so byte offsets cut it too
    chars = _BYTE_TO_CODE[np.frombuffer(joined, dtype=np.uint8)].tobytes().decode("utf-32-le")
    names = [chars[a:b] for a, b in zip(starts.tolist(), (starts + lens).tolist())]
    vocab = dict(zip(names, map(ranks.__getitem__, toks)))
    left, right = _two_token_splits(np.frombuffer(joined, dtype=np.uint8), starts, lens, base)
    by_index = np.array(names, dtype=object)
    return vocab, list(zip(by_index[left].tolist(), by_index[right].tolist()))


def _two_token_splits(buf: np.ndarray, starts: np.ndarray, lens: np.ndarray, base: int) -> tuple[np.ndarray, ...]:
    """(left, right) token indices of every split of a token into two tokens, in merge order.

    buf: the tokens' bytes end to end, in rank order; starts, lens: each token's place in it.
    """
    # Blocks of ~64 KB of tokens keep each array small enough for malloc to reuse: arrays over all
    # 1.6M cuts of a 248k table at once touched ~200 MB of fresh pages, which cost more than the sums.
    edges = np.unique(np.append(np.searchsorted(starts, np.arange(0, len(buf), _BLOCK)), len(lens)))
    blocks = list(zip(edges[:-1].tolist(), edges[1:].tolist()))
    ends = starts + lens
    hashers = [_hasher(buf, int(starts[k0]), int(ends[k1 - 1]), base) for k0, k1 in blocks]
    tok_hash = np.concatenate([h(starts[k0:k1], ends[k0:k1]) for h, (k0, k1) in zip(hashers, blocks)])
    table = _Table(buf, starts, lens, tok_hash)
    pairs = [_block_splits(table, h, k0, k1) for h, (k0, k1) in zip(hashers, blocks)]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def _block_splits(table: "_Table", hash_of, k0: int, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """_two_token_splits for the tokens k0 .. k1 - 1; hash_of covers their bytes."""
    # every cut inside every token: token `owner`, `cut` bytes on the left
    n_cuts = table.lens[k0:k1] - 1
    owner = np.repeat(np.arange(k0, k1), n_cuts)
    cut = np.arange(len(owner)) - np.repeat(np.cumsum(n_cuts) - n_cuts, n_cuts) + 1
    start = table.starts[owner]
    at = start + cut
    left = table.find(hash_of(start, at), start, cut)
    keep = np.flatnonzero(left >= 0)
    owner, cut, at, left = owner[keep], cut[keep], at[keep], left[keep]
    rest = table.lens[owner] - cut
    right = table.find(hash_of(at, at + rest), at, rest)
    keep = right >= 0
    owner, left, right = owner[keep], left[keep], right[keep]
    # indices are ranks in order: by the token's rank, then the left part's (left parts differ in length)
    merge_order = np.lexsort((left, owner))
    return left[merge_order], right[merge_order]


def _hasher(buf: np.ndarray, b0: int, b1: int, base: int):
    """hash_of(start, end) for arrays of byte ranges within buf[b0:b1]; equal bytes give equal hashes."""
    n = b1 - b0
    up, down = _powers(base, n + 1), _powers(pow(base, -1, 1 << 64), n)
    # +1: a zero byte still counts; prefix[i] = sum over j < i of (byte j + 1) * base**-j
    prefix = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum((buf[b0:b1].astype(np.uint64) + np.uint64(1)) * down, out=prefix[1:])

    def hash_of(start: np.ndarray, end: np.ndarray) -> np.ndarray:
        start, end = start - b0, end - b0
        return (prefix[end] - prefix[start]) * up[start]

    return hash_of


def _powers(x: int, n: int) -> np.ndarray:
    """x**0 .. x**(n - 1) mod 2^64."""
    out = np.ones(n, dtype=np.uint64)
    np.cumprod(np.full(max(n - 1, 0), x, dtype=np.uint64), out=out[1:])
    return out


class _Table:
    """The tokens in buckets by the top bits of their hash: finding one is two array reads, no search."""

    def __init__(self, buf: np.ndarray, starts: np.ndarray, lens: np.ndarray, hashes: np.ndarray):
        self.buf, self.starts, self.lens, self.hashes = buf, starts, lens, hashes
        self.shift = np.uint64(64 - (2 * len(hashes) - 1).bit_length())  # about two buckets a token
        slot = self._slot(hashes)
        self.order = np.argsort(slot, kind="stable")
        self.first = np.zeros((1 << (64 - int(self.shift))) + 1, dtype=np.int64)
        np.cumsum(np.bincount(slot, minlength=len(self.first) - 1), out=self.first[1:])

    def _slot(self, hashes: np.ndarray) -> np.ndarray:
        # a polynomial hash's top bits cluster (a one-byte string's hash is < 256): MurmurHash3's
        # finaliser mixes every bit into them first
        h = hashes ^ (hashes >> np.uint64(33))
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
        return (h >> self.shift).astype(np.int64)

    def find(self, hashes: np.ndarray, at: np.ndarray, length: np.ndarray) -> np.ndarray:
        """Index of the token whose bytes are buf[at:at + length], or -1; one query per element."""
        slot = self._slot(hashes)
        lo, hi = self.first[slot], self.first[slot + 1]
        found = np.full(len(hashes), -1, dtype=np.int64)
        ask = np.flatnonzero(lo < hi)
        k = 0
        while len(ask):  # the k-th token of each query's bucket, until found or the bucket is done
            tok = self.order[lo[ask] + k]
            maybe = np.flatnonzero((self.hashes[tok] == hashes[ask]) & (self.lens[tok] == length[ask]))
            q = ask[maybe]
            hit = maybe[_same_bytes(self.buf, self.starts[tok[maybe]], at[q], length[q])]
            found[ask[hit]] = tok[hit]
            k += 1
            ask = ask[(found[ask] < 0) & (lo[ask] + k < hi[ask])]
        return found


def _same_bytes(buf: np.ndarray, a: np.ndarray, b: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Whether buf[a[i]:a[i] + n[i]] == buf[b[i]:b[i] + n[i]] for each i (n >= 1)."""
    if len(n) == 0:
        return np.zeros(0, dtype=bool)
    first = np.cumsum(n) - n
    offset = np.arange(int(n.sum())) - np.repeat(first, n)
    equal = buf[np.repeat(a, n) + offset] == buf[np.repeat(b, n) + offset]
    return np.logical_and.reduceat(equal, first)
