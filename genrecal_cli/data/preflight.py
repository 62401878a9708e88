"""A data preflight: a sample of the training data rendered through both sides' processors as the
loader renders it, before any weight loads. It gives each side's token counts (text, image), what
data.max_length would skip or cut, the padding shuffled or grouped by length.

`genrecal distill --dry-run` and `genrecal teach --dry-run` print it (commands/preflight_view.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping

from .loader import PairDataset, Skipped
from .render import Lengths

PERCENTILES = (50, 90, 99)
# The image-resolution key a preflight may lower per family, and the values it tries, largest first
# (Qwen2-VL: pixels, in units of one 28 x 28 token; InternVL: tiles; Idefics3: splitting off).
_QWEN_PIXELS = ("max_pixels", tuple(n * 784 for n in (1280, 1024, 768, 512, 384, 256, 128)))
RESOLUTION = {
    "qwen2_vl": _QWEN_PIXELS,
    "qwen2_5_vl": _QWEN_PIXELS,
    "internvl": ("max_patches", (9, 6, 4, 2, 1)),
    "idefics3": ("do_image_splitting", (False,)),
}


@dataclass
class Measured:
    """One sampled row: its index and each side's Lengths (or why it cannot be read)."""

    index: int
    sides: dict[str, Lengths] | None
    unreadable: str | None = None


def sample_indices(n: int, sample: int) -> list[int]:
    """`sample` row numbers spread evenly over `n` rows (all of them when n <= sample)."""
    if n <= sample:
        return list(range(n))
    return sorted({round(i * (n - 1) / (sample - 1)) for i in range(sample)})


def measure_sample(dataset: PairDataset, image_token_ids: Mapping[str, int], sample: int) -> list[Measured]:
    """Every sampled row measured on every side (data read whole: spread over it; a stream: its
    first `sample` rows)."""
    if hasattr(dataset.rows, "__len__"):
        rows = ((i, dataset.rows[i]) for i in sample_indices(len(dataset.rows), sample))
    else:
        import itertools

        rows = enumerate(itertools.islice(iter(dataset.rows), sample))
    out = []
    for i, row in rows:
        found = dataset.measure_row(row, i, image_token_ids)
        out.append(Measured(i, None, found.reason) if isinstance(found, Skipped) else Measured(i, found))
    return out


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`; 0 for none."""
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, -(-len(ordered) * q // 100) - 1))]


def summarise(measured: list[Measured], max_length: int, batch_size: int, seed: int = 0,
              estimates=None) -> dict:
    """What `max_length` does to the sample, per side and overall:

    - tokens: percentiles (and max) of each side's total, image and text tokens per item;
    - skipped: items whose first turn does not fit on some side (which side), unreadable items;
    - cut: items that lose trailing turns; kept: each side's tokens after the cut (what the
      loader renders), per usable item;
    - padding: the share of pad tokens in micro-batches of `batch_size` as the sampler forms them,
      shuffled, and grouped by length (`estimates`: the loader's length estimate of the sampled
      rows by position; without it, not shown);
    - fits_99: the max_length at which 99% of the sample fits whole (no turn dropped)."""
    sides = sorted(next((m.sides for m in measured if m.sides), {}) or {})
    readable = [m for m in measured if m.sides]
    report: dict = {"items": len(measured), "max_length": max_length, "sides": {}, "cut": 0}
    usable, kept, skipped = [], {s: [] for s in sides}, Counter()
    for m in measured:
        if m.sides is None:
            skipped[f"unreadable ({m.unreadable})"] += 1
            continue
        fits = {s: m.sides[s].fit(max_length) for s in sides}
        turns = min(fits.values())
        if turns == 0:
            short = [s for s in sides if fits[s] == 0]
            skipped[f"first turn longer than max_length on the {' and '.join(short)} side{'s' if len(short) > 1 else ''}"] += 1
            continue
        if turns < len(m.sides[sides[0]].turns):
            report["cut"] += 1
        usable.append(m)
        for s in sides:
            kept[s].append(sum(m.sides[s].turns[:turns]))
    report["skipped"] = dict(skipped)
    grouped = (lambda idx: estimates([usable[i].index for i in idx])) if estimates else None
    for s in sides:
        total = [m.sides[s].total for m in readable]
        image = [m.sides[s].image for m in readable]
        text = [t - i for t, i in zip(total, image)]
        report["sides"][s] = {
            "tokens": _spread(total), "image_tokens": _spread(image), "text_tokens": _spread(text),
            "kept_tokens": _spread(kept[s]),
            "padding": _padding(kept[s], batch_size, seed, None),
            "padding_grouped": _padding(kept[s], batch_size, seed, grouped) if grouped else None,
        }
    whole = [max(m.sides[s].total for s in sides) for m in readable]
    report["usable"] = len(usable)
    report["fits_99"] = int(percentile(whole, 99)) if whole else None
    return report


def _spread(values: list[int]) -> dict:
    return {**{f"p{q}": int(percentile(values, q)) for q in PERCENTILES}, "max": max(values, default=0),
            "mean": sum(values) / len(values) if values else 0.0}


def _padding(lengths: list[int], batch_size: int, seed: int, estimate) -> float | None:
    """The pad share of the micro-batches the sampler forms over these items (one process)."""
    from .sampler import RankBatches

    if len(lengths) < batch_size:
        return None
    sampler = RankBatches(len(lengths), batch_size, 1, 0, seed, lengths=estimate)
    real = padded = 0
    for batch in sampler:
        longest = max(lengths[i] for i in batch)
        real += sum(lengths[i] for i in batch)
        padded += longest * len(batch)
    return 1 - real / padded if padded else 0.0


def fits_whole(lengths: list[Lengths], max_length: int) -> float:
    """The share of items whose every turn fits in max_length tokens (1.0 for none)."""
    if not lengths:
        return 1.0
    return sum(x.fit(max_length) == len(x.turns) for x in lengths) / len(lengths)
