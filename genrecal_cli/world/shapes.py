"""The synthetic "shapes" image-question-answer data set: coloured shapes on a 3x3 grid with
colour, shape, count, position and existence questions, answered short, long or multiple choice."""

from __future__ import annotations

import hashlib
import io
import random
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from PIL import Image, ImageDraw

if TYPE_CHECKING:  # datasets takes a second to import; only make_split and build_shapes need it
    import datasets

# Saturated, well-separated hues, so a vision tower of a few thousand parameters can tell them apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 190),
    "orange": (250, 130, 10),
}
SHAPES = ("circle", "square", "triangle")
GRID = 3
# Row-major cell names. The centre is "centre", not "middle", so that no name is contained in
# another ("middle" in "top middle") and a long answer can be scored by finding the name in it.
POSITIONS = (
    "top left", "top middle", "top right",
    "middle left", "centre", "middle right",
    "bottom left", "bottom middle", "bottom right",
)  # fmt: skip
KINDS = ("colour", "shape", "count", "position", "existence")
FORMS = ("short", "long", "mc")
SPLITS = ("train", "validation", "test")
BACKGROUND = (255, 255, 255)
MAX_OBJECTS = 3

# Every answer a question of each kind can have: the multiple-choice options are drawn from here,
# and a long answer that names a second one of them is a hedge, scored wrong.
CANDIDATES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": tuple(str(k) for k in range(1, MAX_OBJECTS + 1)),
    "position": POSITIONS,
    "existence": ("yes", "no"),
}
# The instruction tells the model which answer form is wanted; without it the same picture and
# question would have three different right answers.
INSTRUCTIONS = {
    "short": "Answer with one word or phrase.",
    "long": "Answer in a sentence, then say why.",
    "mc": "Answer with the option's letter.",
}
LETTERS = "ABCD"
TEXT_COLUMNS = ("question", "answer", "form", "kind", "options", "target", "id")


class Obj(NamedTuple):
    """One shape in a scene; dx, dy, scale are a small jitter, as fractions of the cell."""

    shape: str
    colour: str
    cell: int  # row-major index into POSITIONS
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0


@dataclass(frozen=True)
class Item:
    """One question about one scene, before the scene is drawn."""

    id: str
    kind: str
    form: str
    question: str
    answer: str
    options: str  # "A. red\nB. blue..." for mc, "" otherwise
    target: str  # the short canonical answer; the letter for mc
    scene: tuple[Obj, ...]

    def row(self) -> dict[str, str]:
        """The text columns of the item's row in make_split."""
        return {k: getattr(self, k) for k in TEXT_COLUMNS}


# --------------------------------------------------------------------------- scenes and questions


def _a(colour: str) -> str:
    return "an" if colour[0] in "aeiou" else "a"


def _listing(objs: Sequence[Obj]) -> str:
    """'a red circle', 'a red circle and a blue square', 'a, b and c', in reading order."""
    names = [f"{_a(o.colour)} {o.colour} {o.shape}" for o in sorted(objs, key=lambda o: o.cell)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _place(rng: random.Random, pairs: Sequence[tuple[str, str]], first_cell: int | None = None) -> tuple[Obj, ...]:
    """Put (shape, colour) pairs in distinct random cells, the first one in first_cell if given."""
    if first_cell is None:
        cells = rng.sample(range(GRID * GRID), len(pairs))
    else:
        cells = [first_cell] + rng.sample([c for c in range(GRID * GRID) if c != first_cell], len(pairs) - 1)
    jitter = [(rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08), rng.uniform(0.85, 1.0)) for _ in pairs]
    return tuple(Obj(s, c, cell, *j) for (s, c), cell, j in zip(pairs, cells, jitter))


def _other(rng: random.Random, values: Sequence[str], avoid: str) -> str:
    return rng.choice([v for v in values if v != avoid])


def _pose(kind: str, target: str, rng: random.Random) -> tuple[tuple[Obj, ...], str, str]:
    """A random scene whose answer to a question of `kind` is `target`: (scene, question, long answer).

    The scene is built around the question, so its referent is always unique."""
    colours = tuple(COLOURS)
    shape, colour = rng.choice(SHAPES), rng.choice(colours)
    if kind == "colour":
        colour = target
    elif kind == "shape":
        shape = target
    n = int(target) if kind == "count" else rng.randint(1, MAX_OBJECTS)
    if kind == "colour":  # the asked shape is unique
        others = [(_other(rng, SHAPES, shape), rng.choice(colours)) for _ in range(n - 1)]
        scene = _place(rng, [(shape, colour)] + others)
        return (
            scene,
            f"What colour is the {shape}?",
            f"The {shape} is {colour}. It is the only {shape} in the picture.",
        )
    if kind == "shape":  # the asked colour is unique
        others = [(rng.choice(SHAPES), _other(rng, colours, colour)) for _ in range(n - 1)]
        scene = _place(rng, [(shape, colour)] + others)
        return (
            scene,
            f"What shape is the {colour} object?",
            f"The {colour} object is {_a(shape)} {shape}. It is the only {colour} object in the picture.",
        )
    if kind == "count":
        scene = _place(rng, [(rng.choice(SHAPES), rng.choice(colours)) for _ in range(n)])
        first = "There is 1 shape." if n == 1 else f"There are {n} shapes."
        return scene, "How many shapes are there?", f"{first} {'It is' if n == 1 else 'They are'} {_listing(scene)}."
    if kind == "position":  # the asked (colour, shape) is unique
        others = []
        while len(others) < n - 1:
            pair = (rng.choice(SHAPES), rng.choice(colours))
            if pair != (shape, colour):
                others.append(pair)
        cell = POSITIONS.index(target)
        scene = _place(rng, [(shape, colour)] + others, first_cell=cell)
        row, col = divmod(cell, GRID)
        return (
            scene,
            f"Where is the {colour} {shape}?",
            f"The {colour} {shape} is in the {target}. "
            f"That is the {('top', 'middle', 'bottom')[row]} row and the {('left', 'middle', 'right')[col]} column.",
        )
    if kind == "existence":
        present = target == "yes"
        distractors = []
        while len(distractors) < n - present:
            s, c = rng.choice(SHAPES), rng.choice(colours)
            # Half the distractors share the asked colour or shape, in yes and no scenes alike, so
            # "no" cannot be read off a missing colour or a missing shape: only the pair decides.
            if rng.random() < 0.5:
                s, c = (shape, c) if rng.random() < 0.5 else (s, colour)
            if (s, c) != (shape, colour):
                distractors.append((s, c))
        scene = _place(rng, ([(shape, colour)] if present else []) + distractors)
        thing = f"{_a(colour)} {colour} {shape}"
        if present:
            return scene, f"Is there {thing}?", f"Yes, there is {thing}. It is in the {POSITIONS[scene[0].cell]}."
        return scene, f"Is there {thing}?", f"No, there is no {colour} {shape}. The picture shows {_listing(scene)}."
    raise ValueError(f"unknown question kind {kind!r}; expected one of {', '.join(KINDS)}")


def split_of(scene: Sequence[Obj]) -> str:
    """The split a scene layout belongs to: 80% train, 10% validation, 10% test, by a stable hash.

    The hash ignores jitter and object order, so the same layout (same shapes, colours and cells)
    can never appear in two splits, for any seed; test pictures are layouts training never saw."""
    key = ";".join(sorted(f"{o.cell}:{o.shape}:{o.colour}" for o in scene))
    bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 10
    return "train" if bucket < 8 else ("validation" if bucket == 8 else "test")


def _check(split: str, forms: Sequence[str]) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    bad = [f for f in forms if f not in FORMS]
    if bad or not forms:
        raise ValueError(f"forms {tuple(forms)!r} must be a non-empty subset of {FORMS}")


def make_items(split: str, n: int, seed: int = 0, forms: Sequence[str] = FORMS) -> list[Item]:
    """n questions with their scenes, without drawing anything (cheap: text and metadata only).

    Item i depends only on (split, seed, i), so a longer split extends a shorter one. Kinds
    cycle, and forms cycle once per round of kinds, so both are exactly balanced."""
    _check(split, forms)
    items = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        form = forms[(i // len(KINDS)) % len(forms)]
        # A string seed goes through sha512 in random.Random: stable across runs and machines.
        rng = random.Random(f"shapes:{split}:{seed}:{i}")
        # The answer is drawn once, before the scene, so answers are uniform over their candidates
        # in every split (counts 1..3, yes/no 50/50, ...). Only the scene is redrawn until its
        # layout falls in this split: ~1.25 tries for train, ~10 for validation and test.
        target = rng.choice(CANDIDATES[kind])
        while True:
            scene, question, long = _pose(kind, target, rng)
            if split_of(scene) == split:
                break
        answer, options = target, ""
        if form == "long":
            answer = long
        elif form == "mc":
            wrong = [c for c in CANDIDATES[kind] if c != target]
            choices = [target] + rng.sample(wrong, min(len(LETTERS) - 1, len(wrong)))
            rng.shuffle(choices)
            options = "\n".join(f"{letter}. {c}" for letter, c in zip(LETTERS, choices))
            target = answer = LETTERS[choices.index(target)]
            question = f"{question}\n{options}"
        items.append(
            Item(
                id=f"shapes-{split}-{seed}-{i:06d}",
                kind=kind,
                form=form,
                question=f"{question}\n{INSTRUCTIONS[form]}",
                answer=answer,
                options=options,
                target=target,
                scene=scene,
            )
        )
    return items


# --------------------------------------------------------------------------- drawing


def draw_scene(scene: Sequence[Obj], image_size: int = 64) -> Image.Image:
    """The scene as an RGB image: each shape fills ~70% of its grid cell, on a plain background."""
    if image_size < 8 * GRID:
        raise ValueError(f"image_size {image_size} is too small for a {GRID}x{GRID} grid; use at least {8 * GRID}")
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = image_size / GRID
    for o in scene:
        row, col = divmod(o.cell, GRID)
        cx, cy = (col + 0.5 + o.dx) * cell, (row + 0.5 + o.dy) * cell
        # Half the side. With |dx|, |dy| <= 0.08 a shape stays a pixel clear of its cell's edges,
        # so every cell shows one object or none.
        h = 0.36 * cell * o.scale
        box = (round(cx - h), round(cy - h), round(cx + h), round(cy + h))
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            # A slightly smaller square so it covers about as many pixels as the circle does.
            s = round(0.9 * h)
            draw.rectangle((round(cx - s), round(cy - s), round(cx + s), round(cy + s)), fill=fill)
        else:
            draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return img


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # lossless and byte-deterministic for a given Pillow
    return buf.getvalue()


def make_split(
    split: str, n: int, seed: int = 0, image_size: int = 64, forms: Sequence[str] = FORMS
) -> datasets.Dataset:
    """n drawn items of one split, columns image, question, answer, form, kind, options, target, id."""
    import datasets

    items = make_items(split, n, seed, forms)
    columns: dict[str, list] = {k: [] for k in ("image", *TEXT_COLUMNS)}
    for item in items:
        # Encoded here rather than by datasets, so the stored bytes are ours and reproducible.
        columns["image"].append({"bytes": _png(draw_scene(item.scene, image_size)), "path": None})
        for key, value in item.row().items():
            columns[key].append(value)
    features = datasets.Features(
        {"image": datasets.Image(), **{k: datasets.Value("string") for k in TEXT_COLUMNS}}
    )
    return datasets.Dataset.from_dict(columns, features=features)


def build_shapes(
    out_dir: str | Path,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    image_size: int = 64,
) -> Path:
    """Write `<split>.parquet` for each split in sizes (images embedded); returns out_dir.

    Read back with `datasets.load_dataset("parquet", data_files={"train": ".../train.parquet"})`;
    the Image feature survives because datasets stores its features in the parquet metadata."""
    sizes = dict(sizes or {"train": 2000, "validation": 200, "test": 200})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        ds = make_split(split, n, seed=seed, image_size=image_size)
        tmp = out / f".{split}.parquet.tmp"
        ds.to_parquet(str(tmp))
        tmp.replace(out / f"{split}.parquet")  # no half-written file if interrupted
    return out


def text_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """n "question\\nanswer" texts of all kinds and forms, for training tiny tokenizers."""
    return [f"{item.question}\n{item.answer}" for item in make_items("train", n, seed)]


# --------------------------------------------------------------------------- scoring

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed: " Top-left." -> "top left"."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _mentions(text: str, phrase: str) -> bool:
    return f" {phrase} " in f" {text} "  # whole words only: "no" is not in "north"


def score(prediction: str, item: Mapping[str, str]) -> bool:
    """Whether a prediction answers the item (a row of make_split, or any mapping with its keys).

    short: normalised exact match with target ("Top left." == "top left").
    mc: the letter, alone or followed by its option's text ("B", "B.", "(b)", "B. blue");
        a letter followed by another option's text is wrong.
    long: the first sentence names the target and no other answer of the same kind, so
        "The square is red or blue." is wrong."""
    form, target = item["form"], normalise(item["target"])
    pred = normalise(prediction)
    if form == "mc":
        letter, _, rest = pred.partition(" ")
        if letter != target:
            return False
        options = dict(normalise(line).partition(" ")[::2] for line in item["options"].splitlines())
        return rest == "" or rest == options.get(letter)
    if form == "long":
        first = normalise(re.split(r"(?<=[.!?])\s|\n", prediction.strip(), maxsplit=1)[0])
        others = [c for c in CANDIDATES.get(item.get("kind", ""), ()) if normalise(c) != target]
        return _mentions(first, target) and not any(_mentions(first, normalise(c)) for c in others)
    return pred == target


def scorer(prediction: str, row: Mapping[str, str], reference: str | None = None) -> tuple[bool, list[str]]:
    """`score` in the form a distill run's accuracy table takes: (right, groups by form and kind).
    The row holds what it needs; `reference` (its answer) is part of the form and not used."""
    return score(prediction, row), [f"form:{row['form']}", f"kind:{row.get('kind', '?')}"]
