"""vocab.py's pure functions against hand-computed values and a direct, slow reference."""

from __future__ import annotations

import random

import numpy as np
import pytest

from genrecal_cli.data import splits as S
from genrecal_cli.data import vocab as V

# ---------------------------------------------------------------- surfaces


@pytest.mark.parametrize(
    "token, marker, surface",
    [
        ("Ġhello", "byte-level", " hello"),
        ("hello", "byte-level", "hello"),
        ("Ċ", "byte-level", "\n"),
        ("ĠĠ", "byte-level", "  "),
        ("Ã©", "byte-level", "é"),  # two bytes of one character
        ("ä", "byte-level", "\udce4"),  # byte 0xE4 alone: a fragment of a 3-byte character
        ("▁hello", "sentencepiece", " hello"),
        ("hello", "sentencepiece", "hello"),
        ("<0x0A>", "sentencepiece", "\n"),
        ("<0xE4>", "sentencepiece", "\udce4"),
        ("<0xZZ>", "sentencepiece", "<0xZZ>"),
        ("##ing", "wordpiece", "ing"),
        ("the", "wordpiece", " the"),
        ("##", "wordpiece", " ##"),
        ("<s>", "plain", "<s>"),
    ],
)
def test_normalise_surface(token, marker, surface):
    assert V.normalise_surface(token, marker) == surface


def test_the_same_byte_compares_equal_across_conventions():
    assert V.normalise_surface("ä", "byte-level") == V.normalise_surface("<0xE4>", "sentencepiece")
    assert V.normalise_surface("Ġthe", "byte-level") == V.normalise_surface("▁the", "sentencepiece")
    assert V.normalise_surface("the", "wordpiece") == V.normalise_surface("Ġthe", "byte-level")


def test_bulk_normalisation_equals_token_by_token():
    # `Ā` is byte 0, the very NUL the one-pass decode puts between tokens
    tokens = ["Ġhello", "Ã©", "ä", "ä½", "Ċ", "x", "ĠðŁĺ", "<|endoftext|>", "", "Ġ", "Ā", "aĀb", "ĀĀ"]
    assert V.normalise_surfaces(tokens, "byte-level") == [V.normalise_surface(t, "byte-level") for t in tokens]
    # a token outside the byte-level alphabet falls back to one by one, unchanged
    odd = ["Ġa", "<|im_start|>", "☃"]
    assert V.normalise_surfaces(odd, "byte-level") == [" a", "<|im_start|>", "☃"]


def test_detect_marker():
    assert V.detect_marker([], {"ByteLevel", "BPE"}) == "byte-level"
    assert V.detect_marker([], {"Metaspace"}) == "sentencepiece"
    assert V.detect_marker([], {"WordPiece"}) == "wordpiece"
    assert V.detect_marker(["▁a", "▁b", "c"], {"BPE", "Replace"}) == "sentencepiece"
    assert V.detect_marker(["Ġa", "b"]) == "byte-level"
    assert V.detect_marker(["##a", "b"]) == "wordpiece"
    assert V.detect_marker(["a", "b"]) == "plain"


def test_surfaces_skip_excluded_and_keep_the_lowest_id():
    vocab = {"<unk>": 0, "<s>": 1, "▁": 5, "<0x20>": 3, "▁a": 4}
    assert V.surfaces(vocab, "sentencepiece", exclude_ids={0, 1}) == {" ": 3, " a": 4}


# ---------------------------------------------------------------- overlap


def test_vocab_overlap_by_hand():
    a = {" the": 0, " cat": 1, "s": 2, "x": 3}
    b = {" the": 0, " cat": 7, "s": 2, "y": 3, "z": 4, "w": 5}
    o = V.vocab_overlap(a, b)
    assert (o.size_a, o.size_b, o.shared, o.same_id) == (4, 6, 3, 2)
    assert o.share_of_a == pytest.approx(3 / 4)
    assert o.share_of_b == pytest.approx(3 / 6)
    assert o.same_id_share == pytest.approx(2 / 3)
    assert V.vocab_overlap(b, a) == o.swapped()


def test_vocab_overlap_with_itself_is_total():
    a = {f"t{i}": i for i in range(50)}
    o = V.vocab_overlap(a, a)
    assert o.share_of_a == o.share_of_b == o.same_id_share == 1.0


def test_vocab_overlap_of_disjoint_or_empty():
    o = V.vocab_overlap({"a": 0}, {"b": 0})
    assert (o.shared, o.share_of_a, o.same_id_share) == (0, 0.0, 0.0)
    assert V.vocab_overlap({}, {}).share_of_a == 0.0


# ---------------------------------------------------------------- splits

TEXT = "Hello world, unbelievable!"
# byte-level style: spaces lead the next token; "unbelievable" in four pieces
A = [(0, 5), (5, 11), (11, 12), (12, 15), (15, 20), (20, 25), (25, 26)]
# WordPiece style: a [CLS] (0, 0), spaces belong to no token, "unbelievable!" is one token
B = [(0, 0), (0, 5), (6, 11), (11, 12), (13, 26)]


def test_strip_spans_trims_whitespace_and_drops_empty():
    spans = S.strip_spans("a  bc \n", [(0, 0), (0, 1), (1, 3), (3, 5), (5, 7)])
    assert spans.tolist() == [[0, 1], [3, 5]]


def test_split_stats_by_hand():
    st = S.split_stats(TEXT, A, B)
    # trimmed A: 0-5, 6-11, 11-12, 13-15, 15-20, 20-25, 25-26 -> boundaries {0,5,6,11,12,13,15,20,25,26}
    # trimmed B: 0-5, 6-11, 11-12, 13-26                   -> boundaries {0,5,6,11,12,13,26}
    assert (st.chars, st.tokens_a, st.tokens_b) == (26, 7, 4)
    assert (st.boundaries_a, st.boundaries_b, st.shared_boundaries) == (10, 7, 7)
    assert (st.one_one, st.one_many, st.many_one, st.many_many, st.unmatched) == (3, 0, 1, 0, 0)
    assert st.boundary_share_a == pytest.approx(0.7)
    assert st.boundary_share_b == 1.0
    assert st.boundary_agreement == pytest.approx(7 / 10)
    assert st.tokens_per_100_chars_a == pytest.approx(700 / 26)
    assert S.split_stats(TEXT, B, A) == st.swapped()


def test_split_stats_identical_is_all_one_to_one():
    st = S.split_stats(TEXT, A, A)
    assert st.boundary_agreement == st.boundary_share_a == st.one_one_share == 1.0
    assert st.one_one == 7


def test_bytes_of_one_character_count_as_one_span():
    text = "a 😀 b"
    a = [(0, 1), (1, 3), (1, 3), (3, 5)]  # the emoji as two byte tokens with the same offsets
    b = [(0, 1), (2, 3), (4, 5)]
    st = S.split_stats(text, a, b)
    assert (st.tokens_a, st.tokens_b) == (4, 3)
    assert st.one_one == 3 and st.boundary_agreement == 1.0
    assert S.split_stats(text, a, a).one_one_share == 1.0


def test_one_many_and_many_many():
    text = "abcdef"
    a = [(0, 2), (2, 6)]  # ab|cdef
    b = [(0, 1), (1, 2), (2, 4), (4, 6)]  # a|b|cd|ef
    st = S.split_stats(text, a, b)
    assert (st.one_one, st.one_many, st.many_one, st.many_many) == (0, 2, 0, 0)
    c = [(0, 3), (3, 6)]  # abc|def against a|b|cd|ef: one n:m span
    st = S.split_stats(text, c, b)
    assert (st.one_one, st.one_many, st.many_one, st.many_many) == (0, 0, 0, 1)
    assert [s.kind for s in S.align_spans(text, c, b)] == ["n:m"]


def test_empty_inputs():
    st = S.split_stats("", [], [])
    assert st.spans == 0 and st.boundary_agreement == 1.0 and st.tokens_per_100_chars_a == 0.0
    st = S.split_stats("   ", [(0, 3)], [])
    assert (st.tokens_a, st.tokens_b, st.spans) == (1, 0, 0)
    st = S.split_stats("ab", [(0, 2)], [])
    assert st.unmatched == 1


def test_split_stats_add_up():
    one = S.split_stats(TEXT, A, B)
    two = one + S.split_stats(TEXT, A, A)
    assert two.chars == 52 and two.one_one == one.one_one + 7
    assert sum([one, one], S.SplitStats()) == one + one


def test_accepts_arrays_and_lists():
    assert S.split_stats(TEXT, np.array(A), np.array(B)) == S.split_stats(TEXT, A, B)


def test_align_spans_by_hand():
    spans = S.align_spans(TEXT, A, B)
    assert [(s.start, s.end, s.kind) for s in spans] == [(0, 5, "1:1"), (6, 11, "1:1"), (11, 12, "1:1"), (13, 26, "n:1")]
    assert spans[-1].cuts_a == (15, 20, 25) and spans[-1].cuts_b == ()


def test_tokens_per_100_chars():
    assert S.tokens_per_100_chars(27, 100) == 27.0
    assert S.tokens_per_100_chars(5, 0) == 0.0


# ---------------------------------------------------------------- against a direct reference


def _reference(text, offsets_a, offsets_b):
    """Character by character, no numpy: what split_stats should count."""

    def strip(offsets):
        out = []
        for s, e in offsets:
            while s < e and text[s].isspace():
                s += 1
            while e > s and text[e - 1].isspace():
                e -= 1
            if s < e and (not out or out[-1] != (s, e)):
                out.append((s, e))
        return out

    a, b = strip(offsets_a), strip(offsets_b)

    def cuts(spans):
        return {e for _, e in spans if not any(s2 < e < e2 for s2, e2 in spans)}

    common = sorted(cuts(a) & cuts(b))

    def group(e):
        return next((i for i, c in enumerate(common) if e <= c), len(common))

    counts = {}
    for side, spans in ((0, a), (1, b)):
        for _, e in spans:
            counts.setdefault(group(e), [0, 0])[side] += 1
    kinds = {"one_one": 0, "one_many": 0, "many_one": 0, "many_many": 0, "unmatched": 0}
    for ca, cb in counts.values():
        if not ca or not cb:
            kinds["unmatched"] += 1
        elif ca == 1:
            kinds["one_one" if cb == 1 else "one_many"] += 1
        else:
            kinds["many_one" if cb == 1 else "many_many"] += 1
    bound_a = {p for s in a for p in s}
    bound_b = {p for s in b for p in s}
    return S.SplitStats(
        chars=len(text),
        tokens_a=sum(e > s for s, e in offsets_a),
        tokens_b=sum(e > s for s, e in offsets_b),
        boundaries_a=len(bound_a),
        boundaries_b=len(bound_b),
        shared_boundaries=len(bound_a & bound_b),
        **kinds,
    )


def _random_tokenization(rng: random.Random, text: str, space_style: str):
    """Cut each word at random; spaces go to the next token (byte-level) or to none (WordPiece)."""
    out = [(0, 0)] if rng.random() < 0.5 else []
    i = 0
    while i < len(text):
        if text[i].isspace():
            j = i
            while j < len(text) and text[j].isspace():
                j += 1
            if space_style == "none" or j == len(text):
                if space_style != "none":
                    out.append((i, j))
                i = j
                continue
            start = i if space_style == "lead" else j
            i = j
        else:
            start = i
        end = start + 1
        while end < len(text) and not text[end].isspace() and rng.random() < 0.6:
            end += 1
        end = max(end, i + 1)
        out.append((start, end))
        if rng.random() < 0.05:  # a character spelled as two byte tokens
            out.append((start, end))
        i = end
    return out


def test_split_stats_matches_the_reference_on_random_tokenizations():
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abcde  \n.,") for _ in range(rng.randint(0, 60)))
        a = _random_tokenization(rng, text, rng.choice(["lead", "none"]))
        b = _random_tokenization(rng, text, rng.choice(["lead", "none"]))
        got = S.split_stats(text, a, b)
        assert got == _reference(text, a, b), (text, a, b)
        assert S.split_stats(text, b, a) == got.swapped()
        spans = S.align_spans(text, a, b)
        assert len(spans) == got.spans
        assert sum(s.kind == "1:1" for s in spans) == got.one_one


def test_unique_in_order_or_not_equals_numpy():
    rng = np.random.default_rng(0)
    for x in (np.sort(rng.integers(0, 9, 40)), rng.integers(0, 9, 40), np.zeros(0, dtype=np.int64), np.array([3])):
        assert np.array_equal(S._unique(x), np.unique(x))


def test_split_stats_many_is_the_sum_over_texts():
    rng = random.Random(1)
    texts = ["".join(rng.choice("abc  .\n") for _ in range(rng.randint(0, 40))) for _ in range(30)]
    a = [_random_tokenization(rng, t, "lead") for t in texts]
    b = [_random_tokenization(rng, t, "none") for t in texts]
    want = sum((S.split_stats(t, x, y) for t, x, y in zip(texts, a, b)), S.SplitStats())
    assert S.split_stats_many(texts, a, b) == want
    assert S.split_stats_many([], [], []) == S.SplitStats()


# ---------------------------------------------------------------- verdict


def test_verdict_same():
    o = V.Overlap(100, 100, 100, 100)
    st = S.split_stats(TEXT, A, A)
    v = S.verdict(100, 100, o, st)
    assert v.same and v.headline.startswith("same token type") and v.reasons == ()
    v = S.verdict(100, 100, o, st, head_rows=(128, 136))
    assert v.same and "head rows differ (128 vs 136)" in v.reasons[0]


def test_verdict_different_names_the_reasons():
    o = V.Overlap(151_643, 31_872, 29_234, 8)
    v = S.verdict(151_665, 32_000, o, S.split_stats(TEXT, A, B))
    assert not v.same
    assert v.headline == "different token types: GenRecal needed"
    assert v.reasons[0] == "vocab 151,665 vs 32,000"
    assert any("of boundaries differ" in r for r in v.reasons)
    assert any("not 1:1" in r for r in v.reasons)


def test_verdict_same_vocabulary_in_another_order_is_different():
    v = S.verdict(10, 10, V.Overlap(10, 10, 10, 2), S.split_stats(TEXT, A, A))
    assert not v.same and v.reasons == ("80% of shared tokens sit at a different id",)
