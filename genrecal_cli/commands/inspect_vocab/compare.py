"""`inspect_vocab`: compare two tokenizers side by side on a text into a `Report`.

Everything becomes a fast `tokenizers.Tokenizer` with char offsets; the statistics themselves are
`data/vocab.py` (surfaces) and `data/splits.py` (splits).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Sequence

from ...data import splits as S
from ...data import vocab as V
from ...errors import GenrecalError
from .images import chat_template, image_info
from .load import load_source
from .source import SPECIAL_ROLES, Source

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
        stats = S.split_stats(cands[i], a, b)
        score = stats.spans - stats.one_one
        if score > best_score:
            best, best_score = i, score
    text = cands[best]
    spans = []
    for sp in S.align_spans(text, ta[best], sa[best]):
        spans.append({
            "start": sp.start, "end": sp.end, "kind": sp.kind,
            "teacher": _pieces(text, sp.start, sp.end, sp.cuts_a),
            "student": _pieces(text, sp.start, sp.end, sp.cuts_b),
        })
    return {"text": text, "spans": spans}


def _pieces(text: str, start: int, end: int, cuts: Sequence[int]) -> list[str]:
    edges = [start, *cuts, end]
    return [text[a:b] for a, b in zip(edges, edges[1:])]


def _side(
    role: str, src: Source, vocab: dict[str, int], stats_tokens: int, chars: int, want_images: bool
) -> SideReport:
    """vocab: the base vocabulary, `src.base_vocab()`."""
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
        image, processor = image_info(src, notes)
    template = chat_template(src, processor, notes)
    return SideReport(
        role=role,
        source=src.spec,
        kind=src.kind,
        tokenizer_class=src.tokenizer_class,
        marker=V.detect_marker(vocab, _component_types(backend)),
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
        tokens_per_100_chars=S.tokens_per_100_chars(stats_tokens, chars),
        image=image,
        chat_template=template,
        notes=notes,
    )


def role_name(r: str) -> str:
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
            out.append(f"{role_name(r)}: the {has} has {tok}, the {lacks} none")
        elif a and b and (a["token"] != b["token"] or a["id"] != b["id"]):
            out.append(f"{role_name(r)}: {a['token']} ({a['id']}) vs {b['token']} ({b['id']})")
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
    stats = S.split_stats_many(chunks, t_src.offsets(chunks), s_src.offsets(chunks))
    chars = stats.chars

    t_vocab, s_vocab = t_src.base_vocab(), s_src.base_vocab()  # once each, for the marker and the surfaces
    t_rep = _side("teacher", t_src, t_vocab, stats.tokens_a, chars, images)
    s_rep = _side("student", s_src, s_vocab, stats.tokens_b, chars, images)

    t_surf = V.surfaces(t_vocab, t_rep.marker, _special_ids(t_src))
    s_surf = V.surfaces(s_vocab, s_rep.marker, _special_ids(s_src))
    overlap = V.vocab_overlap(t_surf, s_surf)
    asym = _asymmetries(t_rep, s_rep)
    heads = (t_rep.head_rows, s_rep.head_rows)
    verdict = S.verdict(t_rep.len_tokenizer, s_rep.len_tokenizer, overlap, stats, heads)
    if verdict.same and asym:  # same token type, but say what still differs
        verdict = S.verdict(t_rep.len_tokenizer, s_rep.len_tokenizer, overlap, stats, heads, notes=asym)
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
