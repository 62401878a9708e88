"""Two complementary teachers (issue 31's measurement): does a student distilled from two
teachers, each of which knows part of the task, learn more than from either one alone?

The world is section 8's (bench/transfer.py): the cross-tokenizer student, the noisy 1,000-item
transfer set, the budget SFT's ladder chose (2,000 updates of batch 16), GenRecal's three stages
(align 200 -> distill 2/3 -> finetune 1/3 of the budget). Only the teachers change:

1. Teacher `A` knows colour and position questions, teacher `B` shape, count and existence. Each
   is the shipped reference teacher finetuned (the engine's finetune stage, as bench/teacher.py
   trains) on a fresh draw of its own training distribution in which every item of a kind
   outside its share has a uniformly random answer of its kind and form (`uninformed`): on those
   kinds it is made to know nothing, not to mislead. Each teacher's accuracy per kind is measured
   on validation items (bench/teacher.py's measurement), beside the reference teacher's.
2. One feature cache per teacher on the transfer set (`genrecal teach`'s engine, fp32, answer
   input hidden), as transfer.py writes its own; from it, how flat each teacher is per kind on
   the first answer token (`first_tokens`).
3. Arms, 3 seeds each: `A` and `B` (one teacher, a plain [teacher] table) and `both` (two
   [[teachers]] tables, weight 0.5 each). Reference rows: section 8's `sft` and `genrecal`
   (the reference teacher) runs, read from --transfer (trained here only where missing there).
4. Every student on the 300-item test split: `genrecal eval` (overall), and per question kind
   by the engine's greedy accuracy on the same items (the eval report keeps no per-item result).
5. bench/results/teachers-full.{json,md,png}: arm x (overall, each kind), mean ± sd over seeds,
   Welch's t of `both` against the better single teacher and against SFT.

Everything lands in --work (default runs/transfer-teachers) and is reused when present: a
stopped call continues each run from its last checkpoint, a later call does only what is missing.

    .venv/bin/python bench/teachers.py                   # ~45 min on 2 cores
    .venv/bin/python bench/teachers.py --preset smoke    # every step for a few steps (CI)
"""

from __future__ import annotations

import json
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import replicate  # noqa: E402  (recipes, training, evaluation)
import transfer  # noqa: E402  (section 8's world: data, students, budget, arms)
from sweep import welch  # noqa: E402

KINDS = ("colour", "shape", "count", "position", "existence")  # genrecal_cli.world.shapes.KINDS
SHARES = {"A": ("colour", "position"), "B": ("shape", "count", "existence")}  # what each teacher knows
ARMS = ("sft", "genrecal", "A", "B", "both")  # sft, genrecal: section 8's reference rows


@dataclass(frozen=True)
class Setup:
    teacher_items: int  # each teacher's finetuning items (a fresh draw: seed 1, every kind and form)
    teacher_steps: int
    teacher_lr: tuple[float, float]  # linear, no warm-up
    teacher_batch: int
    validation_items: int  # per kind and teacher: items of every kind and form, clean
    seeds: int
    test_items: int | None  # per-kind test measurement (None: the whole split)


SETUPS = {
    "full": Setup(teacher_items=24_000, teacher_steps=1500, teacher_lr=(5e-4, 5e-5), teacher_batch=16,
                  validation_items=300, seeds=3, test_items=None),
    "smoke": Setup(teacher_items=40, teacher_steps=3, teacher_lr=(5e-4, 5e-5), teacher_batch=4,
                   validation_items=10, seeds=2, test_items=6),
}


@dataclass
class Job:
    """Recipes run in order (replicate.train_all's unit of work) and the model they export."""

    name: str
    recipes: list[dict] = field(default_factory=list)
    final: str = ""
    arm: str = ""
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# the teachers


# What the "why" of a long answer tells besides its own kind's answer (genrecal_cli/world/shapes.py's
# _pose): a count lists every object (colours, shapes); an existence answer says where the object
# is, or lists the objects; a position answer's row and column are its answer again.
WHY_TELLS = {"colour": (), "shape": (), "count": ("colour", "shape", "count"), "position": ("position",),
             "existence": ("colour", "shape", "count", "position")}


def uninformed(row: dict, known: tuple[str, ...], rng: random.Random) -> dict:
    """The row as a teacher that knows only the `known` kinds should have learnt it: an item of
    another kind gets a uniformly random answer of its kind and form, the right one allowed, so
    that the teacher learns not to know (not to mislead). Short: any candidate; mc: any of its
    option letters; long: the first sentence names the random candidate. A long answer's "why"
    (the second sentence) is kept only if it tells nothing of an unknown kind (WHY_TELLS), in
    rows of every kind: an existence answer saying where the object is would otherwise teach
    positions to a teacher that should not know them. A position's row and column are rebuilt
    from its (random) answer instead."""
    from genrecal_cli.world.shapes import CANDIDATES, GRID, POSITIONS

    kind, form = row["kind"], row["form"]
    if form == "mc":
        letter = row["target"] if kind in known else rng.choice([ln.split(".")[0] for ln in row["options"].splitlines()])
        return {**row, "answer": letter, "target": letter}
    pick = row["target"] if kind in known else rng.choice(CANDIDATES[kind])
    if form == "short":
        return {**row, "answer": pick, "target": pick}
    first, why = re.split(r"(?<=\.) ", row["answer"], maxsplit=1)
    if kind in known:
        pass
    elif kind == "existence":  # (its first sentence names the thing twice when "no")
        thing = re.match(r"Is there (an? )?(.*)\?", row["question"])
        first = f"Yes, there is {thing[1]}{thing[2]}." if pick == "yes" else f"No, there is no {thing[2]}."
    elif kind == "count":
        first = "There is 1 shape." if pick == "1" else f"There are {pick} shapes."
    else:
        first = re.sub(rf"\b{re.escape(row['target'])}\b", pick, first, count=1)
    if kind == "position":
        r, c = divmod(POSITIONS.index(pick), GRID)
        why = f"That is the {('top', 'middle', 'bottom')[r]} row and the {('left', 'middle', 'right')[c]} column."
    elif not set(WHY_TELLS[kind]) <= set(known):
        why = ""
    return {**row, "answer": f"{first} {why}".strip(), "target": pick}


def teacher_data(work: Path, s: Setup, log) -> dict[str, str]:
    """One data folder per teacher: the same fresh draw of the reference teacher's distribution
    (seed 1: items it never saw), relabelled by `uninformed` for that teacher's share; 40 clean
    validation items beside it (the engine's folder layout)."""
    from genrecal_cli.world.shapes import make_split

    folders = {name: work / "teachers" / "data" / name for name in SHARES}
    if all((f / "train.parquet").exists() for f in folders.values()):
        return {n: str(f) for n, f in folders.items()}
    drawn = make_split("train", s.teacher_items, seed=1)
    text = drawn.remove_columns("image").to_list()
    validation = make_split("validation", 40, seed=1)
    for name, folder in folders.items():
        rng = random.Random(f"genrecal-uninformed-{name}")
        rows = [uninformed(r, SHARES[name], rng) for r in text]
        changed = sum(a["target"] != b["target"] for a, b in zip(rows, text))
        short = sum(b["form"] == "long" and "." not in a["answer"][:-1] and "." in b["answer"][:-1]
                    for a, b in zip(rows, text))
        train = drawn.remove_columns(["answer", "target"])
        train = train.add_column("answer", [r["answer"] for r in rows]).add_column("target", [r["target"] for r in rows])
        folder.mkdir(parents=True, exist_ok=True)
        for split, ds in (("validation", validation), ("train", train)):  # train last: its file marks the folder done
            ds.to_parquet(str(folder / f".{split}.tmp"))
            (folder / f".{split}.tmp").replace(folder / f"{split}.parquet")
        log(f"teacher {name}: {len(rows):,} items, kinds {', '.join(k for k in KINDS if k not in SHARES[name])} "
            f"answered at random ({changed:,} targets changed; {short:,} long answers lost their why)")
    return {n: str(f) for n, f in folders.items()}


def teacher_jobs(work: Path, s: Setup, data: dict[str, str]) -> list[Job]:
    """Each teacher: the reference teacher finetuned on its relabelled data (bench/teacher.py's
    recipe: the engine's finetune stage, a linear schedule)."""
    jobs = []
    for name in SHARES:
        out = work / "teachers" / name
        raw = replicate.base_recipe(str(transfer.TEACHER), data[name], out, 0, replicate.PRESETS["full"])
        raw["train"]["probe_every"] = 0
        raw["stages"] = {"finetune": {"steps": s.teacher_steps, "lr": s.teacher_lr[0], "lr_end": s.teacher_lr[1],
                                      "batch_size": s.teacher_batch, "schedule": "linear", "warmup_steps": 0}}
        jobs.append(Job(f"teacher {name}", [raw], str(out / "student"), name))
    return jobs


def per_kind(folder: str, items, known: Path, key: str) -> dict:
    """Greedy accuracy of a model on `items`, overall and per question kind (the engine's
    accuracy with the shapes scorer, as bench/teacher.py measures), kept in `known` under `key`."""
    from genrecal_cli.engine.accuracy import accuracy
    from genrecal_cli.models import load_vlm
    from genrecal_cli.world.shapes import scorer

    table = json.loads(known.read_text()) if known.exists() else {}
    if key not in table:
        acc = accuracy(load_vlm(folder), items, score=scorer, batch_size=32)
        table[key] = {"acc": acc.value, "n": acc.total,
                      "kinds": {k: acc.group(f"kind:{k}") for k in KINDS},
                      "counts": {k: acc.by_group[f"kind:{k}"][1] for k in KINDS if f"kind:{k}" in acc.by_group}}
        tmp = known.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(known)
    return table[key]


def chance(forms: tuple[str, ...]) -> dict[str, float]:
    """Each kind's accuracy of a uniform guess, over its answer forms equally (mc: among its
    options; short and long: among the kind's candidates)."""
    from genrecal_cli.world.shapes import CANDIDATES, LETTERS

    return {k: statistics.fmean(1 / min(len(LETTERS), len(CANDIDATES[k])) if f == "mc" else 1 / len(CANDIDATES[k])
                                for f in forms) for k in KINDS}


def first_tokens(caches: dict[str, tuple[str, str]], data: str, reference: str | None) -> dict:
    """What each teacher's distribution says on the transfer set, read from its feature cache
    with its own head: over the first answer token of the short and mc items (the answer word or
    letter), per kind, its mean top-1 probability and entropy (nats), and how often its top-1 is
    the reference teacher's (`reference`: the name in `caches` of the reference teacher's cache).
    An uninformed teacher is flat there and agrees with the reference about as often as chance."""
    import pyarrow.parquet as pq
    import torch

    from genrecal_cli.engine.teacher.cache import CacheReader, join_items
    from genrecal_cli.models import load_head_only

    table = pq.read_table(str(Path(data) / "train.parquet"), columns=["kind", "form"]).to_pydict()
    keep = [i for i, form in enumerate(table["form"]) if form != "long"]
    seen = {}
    for name, (cache, teacher) in caches.items():
        head, reader = load_head_only(teacher).head.float(), CacheReader(cache)
        top, arg, entropy = [], [], []
        for start in range(0, len(keep), 256):
            f = join_items(reader.items(keep[start:start + 256]))
            counts = f.answer.mask.sum(1)
            with torch.no_grad():
                p = head(f.rows[torch.cumsum(counts, 0) - counts].float()).softmax(-1)
            t, a = p.max(-1)
            top += t.tolist()
            arg += a.tolist()
            entropy += (-(p * p.clamp_min(1e-12).log()).sum(-1)).tolist()
        seen[name] = (top, arg, entropy)
    out = {}
    for name, (top, arg, entropy) in seen.items():
        out[name] = {}
        for k in KINDS:
            idx = [j for j, i in enumerate(keep) if table["kind"][i] == k]
            row = {"items": len(idx), "top1": statistics.fmean(top[j] for j in idx),
                   "entropy": statistics.fmean(entropy[j] for j in idx)}
            if reference in seen and name != reference:
                row["agrees"] = statistics.fmean(arg[j] == seen[reference][1][j] for j in idx)
            out[name][k] = row
    return out


# ---------------------------------------------------------------------------------------------
# caches and arms


def write_cache(folder: Path, teacher: str, student: str, data: str, p: replicate.Preset, log) -> str:
    """One teacher's features on the transfer set, written as transfer.py writes its own
    (replicate.teach_once: `genrecal teach`'s engine, fp32, answer input hidden); a complete
    cache is kept, a partial one resumed."""
    from genrecal_cli.commands.distill import teach
    from genrecal_cli.recipe import recipe_from_dict

    raw = replicate.base_recipe(student, data, folder.parent / "recipe", 0, p, teacher=teacher)
    raw["recalibrator"] = {"answer_input": "hidden"}
    raw["stages"] = {"distill": replicate.stage(p.distill, "distill", p)}  # (a recipe has a stage; teach runs none)
    t = time.perf_counter()
    teach(recipe_from_dict(raw, source=str(folder)), folder, storage="fp32", batch_size=2 * p.batch_size)
    log(f"teacher features {folder.name}: {folder} ({time.perf_counter() - t:.0f} s)")
    return str(folder)


def plan(work: Path, transfer_dir: Path, w, student: str, data: str, budget: int, teachers: dict, caches: dict,
         seeds: int) -> list[Job]:
    """Every arm's runs, seed by seed. sft and genrecal are section 8's recipes in section 8's
    folders under --transfer (reused there; trained here, under WORK/runs/reference, only where
    that folder lacks them); A, B and both are section 8's GenRecal recipe with other teachers."""
    jobs = []
    for seed in range(seeds):
        for arm in ARMS:
            base = "genrecal" if arm != "sft" else "sft"
            run = transfer.plan_run(transfer_dir, w, "noisy", "cross", student, data, base, seed, budget,
                                    {"hidden": caches.get("reference", "")})
            raw = run.recipes[0]
            if arm in ("sft", "genrecal"):
                if not (Path(run.final) / "config.json").exists():
                    _move(raw, work / "runs" / "reference" / arm / f"seed{seed}")
            else:
                _move(raw, work / "runs" / arm / f"seed{seed}")
                if arm == "both":
                    del raw["teacher"]
                    raw["teachers"] = [{"name": n, "weight": 1 / len(SHARES), "path": teachers[n], "cache": caches[n]}
                                       for n in SHARES]
                else:
                    raw["teacher"].update(path=teachers[arm], cache=caches[arm])
            jobs.append(Job(f"{arm}/seed{seed}", [raw], str(Path(raw["train"]["output_dir"]) / "student"), arm, seed))
    return jobs


def _move(raw: dict, out: Path) -> None:
    raw["train"]["output_dir"] = str(out)


# ---------------------------------------------------------------------------------------------
# results


def summarise(jobs: list[Job], acc: dict, kinds: dict) -> list[dict]:
    """One row per arm: test accuracy (genrecal eval) and per-kind accuracy (the engine's) over
    seeds; Welch's t against SFT for every arm, and for `both` against the better single teacher."""
    rows = {}
    for job in jobs:
        if job.name not in acc:
            continue
        row = rows.setdefault(job.arm, {"arm": job.arm, "seeds": [], "overall": [], "engine": [],
                                        **{k: [] for k in KINDS}})
        row["seeds"].append(job.seed)
        row["overall"].append(100 * acc[job.name]["acc"])
        row["engine"].append(100 * kinds[job.name]["acc"])
        for k in KINDS:
            row[k].append(100 * kinds[job.name]["kinds"][k])
    out = [rows[a] for a in ARMS if a in rows]
    for row in out:
        row["mean"] = {c: replicate.mean_sd(row[c]) for c in ("overall", "engine", *KINDS)}
    singles = [r for r in out if r["arm"] in SHARES]
    best = max(singles, key=lambda r: r["mean"]["overall"][0]) if singles else None
    for row in out:
        for name, ref in (("sft", next((r for r in out if r["arm"] == "sft"), None)),
                          ("better single", best if row["arm"] == "both" else None)):
            if ref is None or ref is row:
                continue
            row.setdefault("versus", {})[name] = {
                "arm": ref["arm"],
                **{c: {"difference": row["mean"][c][0] - ref["mean"][c][0], **(welch(row[c], ref[c]) or {})}
                   for c in ("overall", *KINDS)}}
    return out


def _cell(row: dict, column: str) -> str:
    m, sd = row["mean"][column]
    return f"{m:.1f} ± {sd:.1f}" if len(row["seeds"]) > 1 else f"{m:.1f}"


def _t(v: dict) -> str:
    t = f" (t {v['t']:+.2f}, p {v['p']:.3f})" if v.get("df") else ""
    return f"{v['difference']:+.1f}{t}"


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [f"Teachers: the shipped reference teacher finetuned {s['teacher_steps']:,} steps (batch {s['teacher_batch']}, "
             f"lr {s['teacher_lr'][0]:g} -> {s['teacher_lr'][1]:g} linear, no warm-up) on {s['teacher_items']:,} fresh "
             "shapes items whose answers of the kinds outside its share are uniformly random. Accuracy % per kind on "
             f"{s['validation_items']} clean validation items (every form), and on the test split (short and mc):", "",
             "| teacher | knows | validation | " + " | ".join(KINDS) + " | test (genrecal eval) | test per kind |",
             "|---|---|---|" + "---|" * len(KINDS) + "---|---|"]
    for name, t in result["teachers"].items():
        v = t["validation"]
        kinds = " | ".join(f"**{100 * v['kinds'][k]:.1f}**" if k in t["knows"] else f"{100 * v['kinds'][k]:.1f}"
                           for k in KINDS)
        test = " ".join(f"{k} {100 * t['test_kinds'][k]:.0f}" for k in KINDS)
        lines.append(f"| {name} | {', '.join(t['knows'])} | {100 * v['acc']:.1f} | {kinds} | {100 * t['test']:.1f} | {test} |")
    lines.append("| chance | | | " + " | ".join(f"{100 * result['chance']['validation'][k]:.1f}" for k in KINDS) + " | | "
                 + " ".join(f"{k} {100 * result['chance']['test'][k]:.0f}" for k in KINDS) + " |")
    lines += ["", "Each teacher on the transfer set's short and mc items, first answer token, from its cache: mean top-1 "
              "probability / entropy (nats) / share whose top-1 is the reference teacher's:", "",
              "| teacher | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    for name, view in result["first_tokens"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{v['top1']:.2f} / {v['entropy']:.2f}" + (f" / {100 * v['agrees']:.0f}%" if "agrees" in v else "")
            for v in (view[k] for k in KINDS)) + " |")
    lines += ["", f"Students: cross, noisy transfer set, budget {result['budget']:,} updates; test split "
              f"({result['test_items']} items). Overall: `genrecal eval`; per kind: the engine's greedy accuracy on the "
              "same items (its overall beside it).", "",
              "| arm | seeds | overall | engine overall | " + " | ".join(KINDS) + " |",
              "|---|---|---|---|" + "---|" * len(KINDS)]
    for r in result["rows"]:
        lines.append(f"| {r['arm']} | {len(r['seeds'])} | {_cell(r, 'overall')} | {_cell(r, 'engine')} | "
                     + " | ".join(_cell(r, k) for k in KINDS) + " |")
    lines += ["", "Differences in points (Welch's t, p):", "", "| arm | versus | overall | " + " | ".join(KINDS) + " |",
              "|---|---|---|" + "---|" * len(KINDS)]
    for r in result["rows"]:
        for name, v in r.get("versus", {}).items():
            lines.append(f"| {r['arm']} | {name} ({v['arm']}) | " + " | ".join(_t(v[c]) for c in ("overall", *KINDS)) + " |")
    lines += ["", "Per seed (overall): " + "; ".join(f"{r['arm']} " + " ".join(f"{v:.1f}" for v in r["overall"])
                                                  for r in result["rows"])]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Grouped bars: per kind (and overall), one bar per arm, mean ± sd over seeds, each seed a
    dot; each kind's chance level as a dashed tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ("overall", *KINDS)
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(12, 4.8))
    colours = {"sft": "tab:gray", "genrecal": "tab:blue", "A": "tab:orange", "B": "tab:green", "both": "tab:red"}
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = [c + (i - (len(rows) - 1) / 2) * width for c in range(len(columns))]
        means = [r["mean"][c][0] for c in columns]
        sds = [r["mean"][c][1] for c in columns]
        ax.bar(xs, means, width, yerr=sds, capsize=2, color=colours[r["arm"]], alpha=0.7, label=r["arm"])
        for x, c in zip(xs, columns):
            ax.plot([x] * len(r[c]), r[c], "k.", markersize=3)
    for c, k in enumerate(KINDS, start=1):
        level = 100 * result["chance"]["test"][k]
        ax.plot([c - 0.45, c + 0.45], [level, level], "k--", linewidth=1, label="chance" if c == 1 else None)
    ax.set_xticks(range(len(columns)), ["overall (genrecal eval)", *KINDS])
    ax.set_ylabel("shapes test accuracy %")
    ax.set_title("cross student, noisy transfer set: one teacher, the other, both (mean ± sd over seeds)")
    ax.legend(fontsize=8, ncol=6)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    replicate.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = replicate.bench_arguments(__doc__, SETUPS, "transfer-teachers")
    ap.add_argument("--transfer", type=Path, default=None,
                    help="section 8's work folder: data, students, ladder, reference runs (default runs/transfer; "
                         "smoke: WORK/transfer); only read unless something is missing there")
    ap.add_argument("--teachers-only", action="store_true",
                    help="train and measure the two teachers, then stop (to check them before the arms)")
    args = ap.parse_args(argv)
    s, w = SETUPS[args.preset], transfer.PRESETS[args.preset]
    t0 = time.perf_counter()
    work, out, log = replicate.bench_setup(args, t0)
    transfer_dir = (args.transfer or (ROOT / "runs" / "transfer" if args.preset == "full" else work / "transfer")).resolve()
    import torch

    from genrecal_cli.commands.evaluate.tasks.shapes import utils as shapes_task
    from genrecal_cli.world.shapes import FORMS, make_split

    torch.set_num_threads(1)
    # section 8's world, read from --transfer (built there only when missing: a smoke run, a fresh clone)
    data = transfer.build_data(transfer_dir, w, "noisy", log)
    student = transfer.build_students(transfer_dir, w, log)[0]["cross"]
    ladder = transfer_dir / "ladder-noisy.json"
    known = json.loads(ladder.read_text()) if ladder.exists() else {}
    if "cross" not in known:
        known["cross"] = transfer.ladder(transfer_dir, w, "noisy", {"cross": student}, data, args.jobs, log)["cross"]
        ladder.write_text(json.dumps(known, indent=2))
    budget = known["cross"]["budget"]
    p = w.preset(budget)
    log(f"section 8's world from {transfer_dir}: budget {budget:,} updates")

    # 1. the teachers, and what each knows
    timings = replicate.train_all(teacher_jobs(work, s, teacher_data(work, s, log)), args.jobs, log)
    teachers = {n: str(work / "teachers" / n / "student") for n in SHARES}
    validation = make_split("validation", s.validation_items, seed=0)  # every kind and form, clean
    test = make_split("test", shapes_task.NUM_ITEMS, seed=shapes_task.SEED, image_size=shapes_task.IMAGE_SIZE,
                      forms=shapes_task.FORMS)
    if s.test_items:
        test = test.select(range(s.test_items))
    kinds_file = work / f"kinds-{args.preset}.json"
    teacher_validation = {name: per_kind(folder, validation, kinds_file, f"validation:{name}")
                          for name, folder in {"reference": str(transfer.TEACHER), **teachers}.items()}
    for name, v in teacher_validation.items():
        log(f"teacher {name} validation {100 * v['acc']:.1f}%: "
            + ", ".join(f"{k} {100 * v['kinds'][k]:.1f}" for k in KINDS))
    if args.teachers_only:
        return 0

    # 2. one cache per teacher (and the reference teacher's, only if a reference run must be trained here)
    caches = {n: write_cache(work / "features" / n, teachers[n], student, data, p, log) for n in SHARES}
    jobs = plan(work, transfer_dir, w, student, data, budget, teachers, caches, s.seeds)
    if any(j.arm == "genrecal" and str(work) in j.final for j in jobs):
        caches["reference"] = write_cache(work / "features" / "reference", str(transfer.TEACHER), student, data, p, log)
        jobs = plan(work, transfer_dir, w, student, data, budget, teachers, caches, s.seeds)
    reference = transfer_dir / "features" / "noisy-hidden"  # section 8's cache of the reference teacher
    reference = str(reference) if (reference / "index.json").exists() else caches.get("reference")
    views = {**({"reference": (reference, str(transfer.TEACHER))} if reference else {}),
             **{n: (caches[n], teachers[n]) for n in SHARES}}
    flat = first_tokens(views, data, "reference")

    # 3. the arms: the single-teacher ones first, then `both`
    todo = sorted((j for j in jobs if not (Path(j.final) / "config.json").exists()), key=lambda j: j.arm == "both")
    log(f"{len(todo)} runs to train, {args.jobs} at a time")
    timings.update(replicate.train_all(todo, args.jobs, log))

    # 4. every student (and teacher) on the test split: genrecal eval, then per kind
    done = [j for j in jobs if (Path(j.final) / "config.json").exists()]
    models = {"teacher": str(transfer.TEACHER), **{f"teacher {n}": f for n, f in teachers.items()},
              **{j.name: j.final for j in done}}
    acc = replicate.evaluate(models, work / f"eval-teachers-{args.preset}.json", p, log)
    kinds = {label: per_kind(folder, test, kinds_file, f"test:{folder}") for label, folder in models.items()}
    log(f"per-kind test accuracy of {len(kinds)} models in {kinds_file}")

    # 5. the report
    result = {
        "preset": args.preset, "setup": s.__dict__, "world": w.__dict__, "budget": budget, "transfer": str(transfer_dir),
        "command": " ".join(["python", "bench/teachers.py", *(argv if argv is not None else sys.argv[1:])]),
        "versions": replicate.versions(), "test_items": acc["teacher"]["n"], "shares": SHARES,
        "chance": {"validation": chance(FORMS), "test": chance(shapes_task.FORMS)},
        "teachers": {name: {"knows": SHARES.get(name, KINDS), "validation": v,
                            "test": acc["teacher" if name == "reference" else f"teacher {name}"]["acc"],
                            "test_kinds": kinds["teacher" if name == "reference" else f"teacher {name}"]["kinds"]}
                     for name, v in teacher_validation.items()},
        "first_tokens": flat, "runs": {j.name: j.final for j in done}, "accuracy": acc, "per_kind": kinds,
        "rows": summarise(done, acc, kinds), "seconds": {**timings, "total": time.perf_counter() - t0},
    }
    replicate.write_results(out, f"teachers-{args.preset}", result, markdown, plot, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
