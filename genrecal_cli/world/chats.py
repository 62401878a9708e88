"""Multi-turn, multi-image instruction chats about shapes scenes, written the way instruction data
sets ship (jsonl in the TRL "messages" or LLaVA "conversations" layout, PNGs beside it)."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .shapes import (
    COLOURS,
    INSTRUCTIONS,
    KINDS,
    POSITIONS,
    SHAPES,
    Item,
    Obj,
    _png,
    draw_scene,
    make_items,
    normalise,
    score,
)

STYLES = ("messages", "llava")
VERSION = 1  # bump whenever the generator's output changes, so build_chats rebuilds old folders
MANIFEST = "chats.json"
SYSTEM = "You are a careful assistant that looks at pictures."
IMAGE_TOKEN = "<image>"
# Text-only questions with one exact answer each, so a scorer can check them like shapes' short form.
FACTS = (
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("What colour do you get by mixing red and yellow?", "orange"),
    ("What colour do you get by mixing blue and yellow?", "green"),
    ("What colour do you get by mixing red and blue?", "purple"),
    ("Which shape has three corners?", "triangle"),
    ("Which shape has no corners?", "circle"),
    ("How many cells does a grid of three rows and three columns have?", "nine"),
    ("What colour is the sky on a clear day?", "blue"),
)
LEADS = ("And in this picture?", "What about this picture?", "Now look at this one.")
COMPARE = (
    "Which picture has more shapes? Answer the first, the second or the same.",
    ("the first", "the second", "the same"),
)
# Row types per block of 20 rows (55% one picture, 30% two, 15% text only), shuffled per block, so
# every block has the exact mix and a short file still holds every type.
_MIX = ("one",) * 11 + ("two",) * 6 + ("text",) * 3
# Questions for the follow-up turns come from this many shapes items: enough that a question of
# every kind that holds for a given scene (even "Where is the red circle?") is usually among them.
_POOL = 1500


@dataclass(frozen=True)
class Turn:
    """One question and its answer; `image` says whether the question shows the next picture first."""

    question: str
    answer: str
    kind: str  # a shapes kind, "compare" or "fact"
    form: str
    target: str
    options: str = ""
    image: bool = False


@dataclass(frozen=True)
class Chat:
    """One conversation before anything is drawn: its turns and the scenes of its pictures."""

    id: str
    turns: tuple[Turn, ...]
    scenes: tuple[tuple[Obj, ...], ...]  # in the order the turns show them
    system: bool
    plain: bool  # messages without a picture as plain strings rather than parts

    @property
    def images(self) -> list[str]:
        """The pictures' paths, relative to the folder holding the jsonl."""
        return [f"images/{self.id}-{k}.png" for k in range(len(self.scenes))]

    def row(self, style: str = "messages") -> dict:
        """The jsonl row; the last turn's kind, form, target and options are columns, as in shapes,
        so that `scorer` can score it."""
        last = self.turns[-1]
        meta = {"kind": last.kind, "form": last.form, "target": last.target, "options": last.options}
        if style == "messages":
            return {"id": self.id, "messages": self._messages(), "images": self.images, **meta}
        if style == "llava":
            row: dict = {"id": self.id}
            if self.scenes:
                row["image"] = self.images[0] if len(self.scenes) == 1 else self.images
            conv = [{"from": "system", "value": SYSTEM}] if self.system else []
            for t in self.turns:
                conv.append({"from": "human", "value": f"{IMAGE_TOKEN}\n{t.question}" if t.image else t.question})
                conv.append({"from": "gpt", "value": t.answer})
            return {**row, "conversations": conv, **meta}
        raise ValueError(f"unknown chat style {style!r}; expected one of {', '.join(STYLES)}")

    def _messages(self) -> list[dict]:
        messages: list[dict] = [{"role": "system", "content": SYSTEM}] if self.system else []
        for t in self.turns:
            text = {"type": "text", "text": t.question}
            user = [{"type": "image"}, text] if t.image else (t.question if self.plain else [text])
            answer = t.answer if self.plain else [{"type": "text", "text": t.answer}]
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return messages


# --------------------------------------------------------------------------- generation


def _turn(item: Item, *, image: bool = False, lead: str = "") -> Turn:
    question = f"{lead} {item.question}" if lead else item.question
    return Turn(question, item.answer, item.kind, item.form, item.target, item.options, image)


def _raw_target(item: Item) -> str:
    """The answer itself, not its letter, for a multiple-choice item."""
    if item.form != "mc":
        return item.target
    options = dict(line.split(". ", 1) for line in item.options.splitlines())
    return options[item.target]


def _layout(scene: Sequence[Obj]) -> frozenset:
    return frozenset((o.cell, o.shape, o.colour) for o in scene)


def _holds(item: Item, scene: Sequence[Obj]) -> bool:
    """Whether item's question, asked of `scene`, has a unique referent and item's answer is right.

    shapes builds each scene around its question; this asks an existing scene a question instead."""
    words = set(normalise(item.question.splitlines()[0]).split())
    colour = next((c for c in COLOURS if c in words), None)
    shape = next((s for s in SHAPES if s in words), None)
    hits = [o for o in scene if colour in (None, o.colour) and shape in (None, o.shape)]
    if item.kind == "count":
        truth = str(len(scene))
    elif item.kind == "existence":
        truth = "yes" if hits else "no"
    elif len(hits) != 1:
        return False
    else:
        truth = {"colour": hits[0].colour, "shape": hits[0].shape, "position": POSITIONS[hits[0].cell]}[item.kind]
    if truth != _raw_target(item):
        return False
    # These long answers go on to describe the item's own picture (its objects, where the one asked
    # about is), which is only true of a scene with the same layout.
    return not (item.form == "long" and item.kind in ("count", "existence")) or _layout(item.scene) == _layout(scene)


def _follow_up(
    scene: Sequence[Obj], pool: Mapping[str, Sequence[Item]], rng: random.Random, asked: set[tuple[str, str]]
) -> Item:
    """A pool item whose question holds for `scene` and was not asked yet, of a kind not asked yet if possible."""
    used = {kind for kind, _ in asked}
    kinds = sorted(rng.sample(KINDS, len(KINDS)), key=lambda k: k in used)  # stable: random among fresh kinds
    # Most pairs are absent from a scene, so most existence questions that hold say "no"; drawing
    # the answer first keeps follow-up existence answers as balanced as shapes' own.
    want = {"existence": rng.choice(("yes", "no"))}
    for kind in kinds:
        items = pool[kind]
        start = rng.randrange(len(items))
        for answer in (want[kind], None) if kind in want else (None,):
            for j in range(len(items)):
                item = items[(start + j) % len(items)]
                first = item.question.splitlines()[0]
                if answer not in (None, _raw_target(item)) or (kind, first) in asked:
                    continue
                if _holds(item, scene):
                    asked.add((kind, first))
                    return item
    raise RuntimeError("no follow-up question holds for the scene")  # pragma: no cover - counts always do


def make_chats(split: str, n: int, *, seed: int = 0) -> list[Chat]:
    """n conversations with their scenes, without drawing anything.

    Row i depends only on (split, seed, i). Each picture's first question is a shapes item of
    `split` verbatim, so its scene lies in that split; follow-ups about the same picture reuse
    shapes' questions that hold for it, so every answer follows from the picture."""
    items = make_items(split, max(2 * n, _POOL), seed)
    pool = {kind: [it for it in items[:_POOL] if it.kind == kind] for kind in KINDS}
    chats = []
    for i in range(n):
        mix = list(_MIX)
        random.Random(f"chats-mix:{split}:{seed}:{i // len(_MIX)}").shuffle(mix)
        rng = random.Random(f"chats:{split}:{seed}:{i}")
        system, plain = rng.random() < 0.1, rng.random() < 1 / 3
        first, second = items[2 * i], items[2 * i + 1]
        if mix[i % len(_MIX)] == "one":
            asked = {(first.kind, first.question.splitlines()[0])}
            follow = [_follow_up(first.scene, pool, rng, asked) for _ in range(rng.choice((1, 2)))]
            turns = [_turn(first, image=True)] + [_turn(it) for it in follow]
            scenes: tuple = (first.scene,)
        elif mix[i % len(_MIX)] == "two":
            turns = [_turn(first, image=True), _turn(second, image=True, lead=rng.choice(LEADS))]
            if rng.random() < 0.5:
                a, b = len(first.scene), len(second.scene)
                target = COMPARE[1][0 if a > b else 1 if b > a else 2]
                turns.append(Turn(COMPARE[0], target, "compare", "short", target))
            scenes = (first.scene, second.scene)
        else:
            facts = rng.sample(FACTS, rng.choice((1, 2)))
            turns = [Turn(f"{q}\n{INSTRUCTIONS['short']}", a, "fact", "short", a) for q, a in facts]
            scenes = ()
        chats.append(Chat(f"chats-{split}-{seed}-{i:06d}", tuple(turns), scenes, system, plain))
    return chats


def write_chats(
    out_dir: str | Path, split: str, n: int, *, seed: int = 0, style: str = "messages", image_size: int = 64
) -> Path:
    """Writes out_dir/<split>.jsonl and the PNGs under out_dir/images/ (paths in the jsonl are
    relative to out_dir); returns the jsonl's path. Same arguments -> byte-identical files."""
    if style not in STYLES:
        raise ValueError(f"unknown chat style {style!r}; expected one of {', '.join(STYLES)}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for chat in make_chats(split, n, seed=seed):
        for path, scene in zip(chat.images, chat.scenes):
            (out / path).write_bytes(_png(draw_scene(scene, image_size)))
        lines.append(json.dumps(chat.row(style)) + "\n")
    path = out / f"{split}.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def build_chats(root: str | Path, n_train: int, n_validation: int, *, seed: int = 0, style: str = "messages") -> Path:
    """train.jsonl and validation.jsonl (and their images) in root, built unless root already holds
    them for these parameters; returns root. A root that is not a chats folder is never replaced."""
    root = Path(root)
    manifest = {"version": VERSION, "n_train": n_train, "n_validation": n_validation, "seed": seed,
                "style": style, "image_size": 64}  # fmt: skip
    if _manifest(root) == manifest:
        return root
    if root.exists() and _manifest(root) is None and any(root.iterdir()):
        raise FileExistsError(f"{root} holds files but no {MANIFEST}: not a chats folder, so not replacing it")
    root.parent.mkdir(parents=True, exist_ok=True)
    # Built next to root and renamed into place, so an interrupted build never leaves a root whose
    # manifest vouches for half-written files.
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        write_chats(tmp, "train", n_train, seed=seed, style=style)
        write_chats(tmp, "validation", n_validation, seed=seed, style=style)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if _manifest(root) == manifest:  # another process finished the same build meanwhile
            shutil.rmtree(tmp)
            return root
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old.", dir=root.parent))
            root.rename(old / root.name)
            tmp.rename(root)
            shutil.rmtree(old)
        else:
            tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- scoring


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if p.get("type") == "text")
    # datasets (5.2) reads a column that is a string in some rows and a list in others as Json,
    # and hands a string that is valid JSON back decoded: the plain answer "2" arrives as int 2.
    return json.dumps(content)


def _assistant_texts(row: Mapping) -> list[str]:
    if row.get("messages") is not None:
        return [_text(m["content"]) for m in row["messages"] if m["role"] == "assistant"]
    return [t["value"] for t in row["conversations"] if t["from"] in ("gpt", "assistant")]


def _n_images(row: Mapping) -> int:
    if row.get("messages") is not None:
        return len(row.get("images") or [])
    image = row.get("image")
    return 0 if not image else 1 if isinstance(image, str) else len(image)


def last_turn_reference(row: Mapping) -> str:
    """The text of the row's last assistant message, in either style."""
    return _assistant_texts(row)[-1]


def scorer(prediction: str, row: Mapping, reference: str | None = None) -> tuple[bool, list[str]]:
    """Scores a prediction of the last answer, given every earlier turn: (right, groups by form,
    kind, turns and pictures). The last turn is scored like shapes' `score` (short: normalised
    exact match; mc: the letter; long: the first sentence names the answer and nothing else); a
    row without the form column, normalised exact match with the last answer (`reference`, the
    form a distill run's accuracy table passes, is the same text)."""
    images = _n_images(row)
    groups = [f"turns:{len(_assistant_texts(row))}", f"images:{images}" if images else "text-only"]
    if not row.get("form"):
        return normalise(prediction) == normalise(last_turn_reference(row)), groups
    return score(prediction, row), [f"form:{row['form']}", f"kind:{row.get('kind') or '?'}", *groups]
