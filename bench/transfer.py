"""Where does the teacher's knowledge reach the student? A world where distillation should win
(issue 26; see bench/README.md and docs/results.md section 8).

The world: the shipped reference teacher learned the shapes task from 24,000 items; each student
sees only a transfer set of the first `transfer_items` of them (1,000: 1/24), from a model that
has never seen the task (its vision pretrained, nothing else), and under the default condition
"noisy" 30% of those answers are wrong: labels weaker than the teacher, which knows the right
ones. With the clean labels ("clean") the teacher's distribution on those items is nearly the
label itself, and there is nothing for distillation to add; the report states both figures.

Two students of the same size: `same`, a Qwen2-VL-style model with the teacher's own tokenizer
and template (classic token-level KD applies: `loss.kd`), and `cross`, a LLaVA-style model with
another tokenizer, template and image-token scheme (the case GenRecal is for). Every arm makes
the same student updates; the budget is the one where SFT's validation accuracy stops rising
(SFT at doubling budgets, seed 0). Arms:

- same: sft, kd (classic KD: loss.kd beside L_sft throughout), genrecal (the paper's form:
  align -> distill -> finetune), and two variants beyond the paper in which every answer token
  depends on the student: embeddings (answer_input = "embeddings") and dropout
  (recalibrator.answer_dropout = 0.5), and no_finetune (align -> distill with the whole budget:
  no finetune stage on the noisy labels after distill);
- cross: sft, genrecal, embeddings, dropout, no_finetune, uld, gold (TRL's GOLDTrainer,
  bench/gold.py; needs trl).

The teacher's features are written once (`genrecal teach`'s engine, fp32) per answer input and
read by every teacher arm of both students and every seed. Everything lands in --work (default
runs/transfer) and is reused when present: a stopped run continues from its last checkpoint, a
rerun does only what is missing, and --only / --students run a part now and the rest later.

    .venv/bin/python bench/transfer.py                         # the whole measurement (see --help)
    .venv/bin/python bench/transfer.py --only sft,kd --students same   # the control first
    .venv/bin/python bench/transfer.py --condition clean       # the reference world (clean labels)
    .venv/bin/python bench/transfer.py --preset smoke          # every arm for a few steps (CI)
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import replicate  # noqa: E402  (models, recipes, training, evaluation)
from sweep import welch  # noqa: E402

TEACHER = ROOT / "genrecal_cli" / "world" / "assets" / "shapes-teacher"
TEACHER_ITEMS = 24_000  # what the reference teacher learned from (docs/results.md section 2)
TEACHER_ARMS = {"kd": {"loss": {"ar": 0.0, "kl": 0.0, "reg": 0.0, "kd": 1.0}},
                "uld": {"loss": {"ar": 0.0, "kl": 0.0, "reg": 0.0, "uld": 1.0}},
                "genrecal": {},
                "embeddings": {"recalibrator": {"answer_input": "embeddings"}},
                "dropout": {"recalibrator": {"answer_dropout": 0.5}},
                "no_finetune": {}}
RECALIBRATOR_ARMS = ("genrecal", "embeddings", "dropout", "no_finetune")
# Beyond the paper: every answer token depends on the student (embeddings, dropout); the whole
# budget in distill, no finetune stage on the (noisy) labels after it (no_finetune).
VARIANTS = ("embeddings", "dropout", "no_finetune")


@dataclass(frozen=True)
class World:
    transfer_items: int  # the first N of the teacher's training draw: all the task data a student sees
    validation_items: int  # for the budget ladder (the test split stays for the final measurement)
    students: dict  # name -> (family, hidden, layers)
    arms: dict  # student -> {arm: seeds}
    ladder: tuple[int, ...]  # student-update budgets SFT tries (seed 0), doubling
    rise: float  # doubling the budget must raise SFT's validation accuracy by more than this
    align: int  # GenRecal's align steps (the Recalibrator only), on top of the budget
    batch_size: int
    eval_limit: int | None  # test items per model (None: all 300)
    probe_every: int
    image_size: int = 48
    pretrain_steps: int = 900
    finetune_share: float = 1 / 3  # of the budget: GenRecal's finetune stage (the paper's third stage)
    noise: float = 0.3  # condition "noisy": the share of transfer-set answers made wrong

    def preset(self, budget: int) -> replicate.Preset:
        """replicate.py's Preset for a budget (its recipes and evaluation take one)."""
        finetune = max(1, round(budget * self.finetune_share))
        return replicate.Preset(
            teacher=replicate.describe(TEACHER), student=("", 0, 0), image_size=self.image_size,
            pretrain_steps=self.pretrain_steps, train_items=self.transfer_items, teacher_steps=0, baseline_steps=0,
            align=self.align, distill=budget - finetune, finetune=finetune, batch_size=self.batch_size, seeds=(0,),
            ablation_seeds=(0,), eval_limit=self.eval_limit, probe_every=self.probe_every)


PRESETS = {
    "full": World(
        transfer_items=1000, validation_items=300,
        students={"same": ("qwen2_vl", 128, 2), "cross": ("llava", 128, 2)},
        arms={"same": {"sft": 5, "kd": 5, "genrecal": 5, "embeddings": 3, "dropout": 3, "no_finetune": 3},
              "cross": {"sft": 5, "genrecal": 5, "embeddings": 3, "dropout": 3, "no_finetune": 3, "uld": 3,
                        "gold": 3}},
        ladder=(500, 1000, 2000, 4000, 8000), rise=0.01, align=200, batch_size=16, eval_limit=None, probe_every=100,
    ),
    "smoke": World(
        transfer_items=24, validation_items=6,
        students={"same": ("qwen2_vl", 32, 1), "cross": ("llava", 32, 1)},
        arms={"same": {"sft": 1, "kd": 1, "genrecal": 1, "embeddings": 1, "dropout": 1, "no_finetune": 1},
              "cross": {"sft": 1, "genrecal": 1, "embeddings": 1, "dropout": 1, "uld": 1, "gold": 1}},
        ladder=(3, 6), rise=0.01, align=2, batch_size=4, eval_limit=3, probe_every=1, pretrain_steps=4,
    ),
}


@dataclass
class Run:
    """One condition x student x budget x arm x seed: its recipes, run in order, and the student
    they export."""

    condition: str
    student: str
    budget: int
    arm: str
    seed: int
    recipes: list[dict] = field(default_factory=list)
    final: str = ""

    @property
    def name(self) -> str:
        return f"{self.condition}/{self.student}/b{self.budget}/{self.arm}/seed{self.seed}"


@dataclass
class GoldRun:
    """TRL's GOLDTrainer as one of the pool's jobs (bench/gold.py), at the same budget."""

    condition: str
    student: str
    budget: int
    seed: int
    out: Path
    init: str
    data: str
    batch_size: int
    arm: str = "gold"

    @property
    def name(self) -> str:
        return f"{self.condition}/{self.student}/b{self.budget}/gold/seed{self.seed}"

    @property
    def final(self) -> str:
        return str(self.out / "student")

    def __call__(self, threads: int | None) -> dict:
        import gold as gold_bench

        return gold_bench.run(self.out, TEACHER, self.init, self.data, steps=self.budget, batch_size=self.batch_size,
                              genrecal_steps=0, threads=threads or 1, seed=self.seed, log=print)


# ---------------------------------------------------------------------------------------------
# the world


def build_data(work: Path, w: World, condition: str, log) -> str:
    """The transfer set (the first transfer_items of the teacher's own training draw) and a
    validation split, written once; "noisy": the same items with `noise` of the answers wrong
    (replicate.noisy_answer: another answer of the same form), the validation split clean."""
    from genrecal_cli.world.shapes import make_split

    folder = work / "data" / condition
    if not (folder / "validation.parquet").exists():
        folder.mkdir(parents=True, exist_ok=True)
        train = make_split("train", w.transfer_items, seed=0)
        if condition == "noisy":
            train = replicate.with_noise(train, w.noise, log)
        for split, ds in (("train", train), ("validation", make_split("validation", w.validation_items, seed=0))):
            ds.to_parquet(str(folder / f".{split}.tmp"))
            (folder / f".{split}.tmp").replace(folder / f"{split}.parquet")
        log(f"transfer set ({condition}): {w.transfer_items} items (the first of the teacher's {TEACHER_ITEMS:,}); "
            f"validation {w.validation_items}")
    return str(folder)


def build_students(work: Path, w: World, log) -> tuple[dict, dict]:
    """Each student as it starts: vision pretrained (it can see), its language model untrained
    on the task. The `same` one is a qwen2_vl model, whose zoo tokenizer and template are the
    reference teacher's (checked). Returns name -> folder and name -> parameters."""
    from transformers import AutoTokenizer

    from genrecal_cli.models import load_vlm

    folders, params = {}, {}
    for name, (family, hidden, layers) in w.students.items():
        folders[name] = replicate.build_once(work / "models" / f"student-{name}", family, hidden, layers, log,
                                             image_size=w.image_size, pretrain_steps=w.pretrain_steps,
                                             cell_positions=True)
        params[name] = sum(p.numel() for p in load_vlm(folders[name], empty=True).model.parameters())
    teacher_vocab = AutoTokenizer.from_pretrained(str(TEACHER)).get_vocab()
    same = {n: AutoTokenizer.from_pretrained(f).get_vocab() == teacher_vocab for n, f in folders.items()}
    if "same" in same and not same["same"]:
        raise SystemExit("the `same` student's tokenizer is not the teacher's: the KD control would not apply")
    if "cross" in same and same["cross"]:
        raise SystemExit("the `cross` student shares the teacher's tokenizer: it would not cross tokenizers")
    return folders, params


# ---------------------------------------------------------------------------------------------
# runs


def plan_run(work: Path, w: World, condition: str, student: str, init: str, data: str, arm: str, seed: int,
             budget: int, caches: dict) -> Run | GoldRun:
    """One arm's recipes. SFT, KD and ULD train one stage of `budget` updates, the distill stage's
    learning rate decayed linearly (classic KD and ULD: their loss beside L_sft throughout); GOLD
    the same updates and schedule in TRL; GenRecal and its variants the paper's three stages, align
    first (the Recalibrator only), then distill and finetune sharing the same budget."""
    p = w.preset(budget)
    if arm == "gold":
        name = GoldRun(condition, student, budget, seed, Path(), init, data, w.batch_size).name
        return GoldRun(condition, student, budget, seed, work / "runs" / name, init, data, w.batch_size)
    run = Run(condition, student, budget, arm, seed)
    out = work / "runs" / run.name
    if arm == "sft":
        raw = replicate.base_recipe(init, data, out, seed, p)
        raw["stages"] = {"finetune": replicate.stage(budget, "distill", p)}
    else:
        raw = replicate.base_recipe(init, data, out, seed, p, teacher=str(TEACHER))
        if arm in RECALIBRATOR_ARMS:  # (no_finetune: the whole budget in distill)
            distill = budget if arm == "no_finetune" else p.distill
            raw["stages"] = {"align": replicate.stage(p.align, "align", p),
                             "distill": replicate.stage(distill, "distill", p, train_projector=True)}
            if arm != "no_finetune":
                raw["stages"]["finetune"] = replicate.stage(p.finetune, "finetune", p)
        else:
            raw["stages"] = {"distill": replicate.stage(budget, "distill", p, train_projector=True)}
        for key, changes in TEACHER_ARMS[arm].items():
            raw.setdefault(key, {}).update(changes)
        raw["teacher"]["cache"] = caches[raw.get("recalibrator", {}).get("answer_input", "hidden")]
    run.recipes, run.final = [raw], str(out / "student")
    return run


def validation_accuracy(folder: str, data: str, cache: Path) -> float:
    """Greedy accuracy of an exported student on the transfer world's validation split, scored
    as the shapes benchmark scores (kept in `cache`, a JSON of folder -> accuracy)."""
    import datasets

    from genrecal_cli.engine.accuracy import accuracy
    from genrecal_cli.models import load_vlm
    from genrecal_cli.world.shapes import scorer

    known = json.loads(cache.read_text()) if cache.exists() else {}
    if folder not in known:
        rows = datasets.load_dataset("parquet", data_files=str(Path(data) / "validation.parquet"), split="train")
        known[folder] = accuracy(load_vlm(folder), rows, score=scorer, batch_size=32).value
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(known, indent=2))
        tmp.replace(cache)
    return known[folder]


def teacher_beyond_labels(cache: str, items: int) -> dict:
    """What the teacher's distribution over the transfer set's answer tokens says beyond their
    labels (read from its feature cache): its mean top-1 probability and entropy (nats), and how
    often its top-1 differs from the label, over every answer token and over the first of each
    answer (the content word of a short answer)."""
    import torch

    from genrecal_cli.engine.teacher.cache import CacheReader, join_items
    from genrecal_cli.models import load_head_only

    head = load_head_only(str(TEACHER)).head.float()
    reader = CacheReader(cache)
    out: dict[str, dict] = {"all": {}, "first": {}}
    sums = {k: {"n": 0, "top1": 0.0, "entropy": 0.0, "differs": 0.0} for k in out}
    for start in range(0, items, 256):
        features = join_items(reader.items(list(range(start, min(items, start + 256)))))
        with torch.no_grad():
            p = head(features.rows.float()).softmax(-1)
        counts = features.answer.mask.sum(1)
        first = torch.cumsum(counts, 0) - counts
        top, arg = p.max(-1)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
        differs = (arg != features.targets).float()
        for key, idx in (("all", slice(None)), ("first", first)):
            sums[key]["n"] += int(top[idx].numel())
            for name, values in (("top1", top), ("entropy", entropy), ("differs", differs)):
                sums[key][name] += float(values[idx].sum())
    for key, s in sums.items():
        out[key] = {name: s[name] / max(1, s["n"]) for name in ("top1", "entropy", "differs")} | {"tokens": s["n"]}
    return out


def choose_budget(curve: list[tuple[int, float]], rise: float) -> tuple[int, str]:
    """The smallest budget after which doubling no longer raises validation accuracy by more
    than `rise`, with the reason; the largest tried if it still rose there."""
    for (b, acc), (_, nxt) in zip(curve, curve[1:]):
        if nxt - acc <= rise:
            return b, f"doubling to {2 * b:,} moved it {100 * (nxt - acc):+.1f} points"
    return curve[-1][0], STILL_RISING


STILL_RISING = "still rising at the largest budget tried"


def ladder(work: Path, w: World, condition: str, students: dict, data: str, jobs: int, log) -> dict:
    """SFT (seed 0) up the ladder of budgets for each student, `jobs` budgets at a time, until
    doubling no longer raises its validation accuracy by more than w.rise; each one's budget."""
    out = {}
    for s, init in students.items():
        curve: list[tuple[int, float]] = []
        for start in range(0, len(w.ladder), max(1, jobs)):
            runs = [plan_run(work, w, condition, s, init, data, "sft", 0, b, {}) for b in w.ladder[start:start + max(1, jobs)]]
            replicate.train_all(runs, jobs, log)
            curve += [(r.budget, validation_accuracy(r.final, data, work / "validation.json")) for r in runs]
            budget, why = choose_budget(curve, w.rise)
            if why != STILL_RISING:
                break
        out[s] = {"curve": curve, "budget": budget, "why": why}
        log(f"{condition}, {s}: SFT validation accuracy " + ", ".join(f"{b:,} -> {100 * a:.1f}%" for b, a in curve)
            + f"; budget {budget:,} ({why})")
    return out


# ---------------------------------------------------------------------------------------------
# results


def summarise(runs: list, acc: dict, w: World) -> list[dict]:
    """One row per student and arm: test accuracy over seeds, and Welch's t against the arms it
    is compared with (SFT on the same student; GenRecal for its variant; KD for GenRecal)."""
    rows: dict[tuple, dict] = {}
    for run in runs:
        if run.name not in acc:
            continue
        row = rows.setdefault((run.student, run.arm), {"student": run.student, "arm": run.arm, "budget": run.budget,
                                                       "seeds": [], "final": []})
        row["seeds"].append(run.seed)
        row["final"].append(acc[run.name]["acc"])
    out = []
    for row in rows.values():
        m, sd = replicate.mean_sd(row["final"])
        out.append({**row, "mean": m, "sd": sd})
    versus = {**{v: "genrecal" for v in VARIANTS}, "genrecal": "kd"}
    for row in out:
        for other in ("sft", versus.get(row["arm"])):
            ref = next((r for r in out if r["student"] == row["student"] and r["arm"] == other), None)
            if ref is not None and ref is not row:
                row[f"vs_{other}"] = {"difference": row["mean"] - ref["mean"], **(welch(row["final"], ref["final"]) or {})}
    order = {a: i for i, a in enumerate(("sft", "kd", "uld", "gold", "genrecal", *VARIANTS))}
    return sorted(out, key=lambda r: (list(w.students).index(r["student"]), order[r["arm"]]))


def _versus(row: dict, other: str) -> str:
    v = row.get(f"vs_{other}")
    if not v:
        return ""
    t = f", t {v['t']:+.2f} ({v['df']:.1f}), p {v['p']:.3f}" if v.get("df") else ""
    return f"{100 * v['difference']:+.1f}{t}"


def markdown(result: dict) -> str:
    lines = [
        f"Teacher: the shipped reference teacher ({result['teacher_desc']}), trained on {TEACHER_ITEMS:,} items: "
        f"**{100 * result['teacher']:.1f}%** on the shapes test split ({result['test_items']} items, `genrecal eval`). "
        f"Transfer set: the first {result['world']['transfer_items']:,} of those items"
        + (f", {100 * result['world']['noise']:.0f}% of their answers wrong (the teacher knows the right ones)"
           if result["condition"] == "noisy" else ", with their clean answers") + ". Students start from a "
        "vision-pretrained model that has never seen the task (0% before).", "",
        "Budget (student updates) per student, where SFT's validation accuracy stopped rising (seed 0, "
        f"{result['world']['validation_items']} validation items):", "",
        "| student | family, hidden, layers | parameters | SFT validation accuracy by budget | budget |",
        "|---|---|---|---|---|",
    ]
    for s, lad in result["ladder"].items():
        fam, hidden, layers = result["world"]["students"][s]
        curve = ", ".join(f"{b:,}: {100 * a:.1f}%" for b, a in lad["curve"])
        lines.append(f"| {s} | {fam}, {hidden}, {layers} | {result['params'][s]:,} | {curve} | {lad['budget']:,} ({lad['why']}) |")
    known = result.get("teacher_on_transfer_set")
    if known:
        lines += ["", "The teacher's distribution on the transfer set's answer tokens (its feature cache): "
                  + "; ".join(f"{label}: top-1 probability {k['top1']:.3f}, entropy {k['entropy']:.3f} nats, top-1 "
                              f"differs from the label on {100 * k['differs']:.1f}% of {k['tokens']:,} tokens"
                              for label, k in (("every answer token", known["all"]), ("first answer token", known["first"])))
                  + "."]
    lines += ["", "| student | arm | seeds | test accuracy % (mean ± sd) | − SFT (Welch t, p) | variant − GenRecal | "
              "GenRecal − KD | per seed |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        n = len(r["seeds"])
        per_seed = " ".join(f"{100 * a:.1f}" for a in r["final"])
        lines.append(f"| {r['student']} | {r['arm']} | {n} | {replicate.fmt(r['mean'], r['sd'], n)} | {_versus(r, 'sft')} | "
                     f"{_versus(r, 'genrecal') if r['arm'] in VARIANTS else ''} | "
                     f"{_versus(r, 'kd') if r['arm'] == 'genrecal' else ''} | {per_seed} |")
    probes = {name: p["distill"] for name, p in result["probes"].items() if p.get("distill")}
    if probes:
        lines += ["", "Reliance probe at the end of distill (seed 0; teacher top-1 agreement of the Recalibrator's "
                  "output with the student's question features real / another item's / zeroed):", "",
                  "| student | arm | first answer token | later answer tokens |", "|---|---|---|---|"]
    for name, d in probes.items():
        if d:
            student, _, arm = name.split("/")[1:4]
            cells = ["/".join(f"{d[f'rely_{part}_top1_{v}']:.2f}" for v in ("real", "other", "zero"))
                     for part in ("first", "later")]
            lines.append(f"| {student} | {arm} | {cells[0]} | {cells[1]} |")
    if result.get("gold_notes"):
        lines += ["", "TRL GOLDTrainer: " + "; ".join(result["gold_notes"])]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Left: SFT's validation accuracy against the budget (the ladder). Right: test accuracy per
    student and arm, each seed a dot, mean ± sd; the teacher as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 2]})
    for s, lad in result["ladder"].items():
        x, y = zip(*lad["curve"])
        left.plot(x, [100 * v for v in y], marker="o", label=f"SFT, {s} student")
        left.axvline(lad["budget"], linestyle=":", color=left.lines[-1].get_color())
    left.set_xscale("log", base=2)
    budgets = sorted({b for lad in result["ladder"].values() for b, _ in lad["curve"]})
    left.set_xticks(budgets, [f"{b:,}" for b in budgets])
    left.set_xlabel("student updates")
    left.set_ylabel("validation accuracy % (seed 0)")
    left.legend(fontsize=8)
    colours = {"sft": "tab:gray", "kd": "tab:purple", "uld": "tab:orange", "gold": "black", "genrecal": "tab:blue",
               "embeddings": "tab:cyan", "dropout": "tab:olive", "no_finetune": "tab:red"}
    labels = []
    for i, r in enumerate(result["rows"]):
        right.bar(i, 100 * r["mean"], yerr=100 * r["sd"], color=colours[r["arm"]], alpha=0.6, capsize=3)
        right.plot([i] * len(r["final"]), [100 * a for a in r["final"]], "k.", markersize=4)
        labels.append(f"{r['student']}\n{r['arm']}")
    right.axhline(100 * result["teacher"], color="tab:green", linewidth=1, label="teacher")
    right.set_xticks(range(len(labels)), labels, fontsize=8)
    right.set_ylabel("shapes test accuracy %")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    replicate.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = replicate.bench_arguments(__doc__, PRESETS, "transfer")
    ap.add_argument("--only", default=None, help="comma-separated arms to run now (default: every arm)")
    ap.add_argument("--students", default=None, help="comma-separated students to run now (default: both)")
    ap.add_argument("--condition", choices=("noisy", "clean"), default="noisy",
                    help="the transfer set's answers: noisy (the world where the teacher knows more than its labels; "
                         "default) or clean (the teacher's own labels: the reference where it does not)")
    args = ap.parse_args(argv)
    w = PRESETS[args.preset]
    only = set(args.only.split(",")) if args.only else None
    chosen = args.students.split(",") if args.students else list(w.students)
    for name in chosen:
        if name not in w.students:
            ap.error(f"--students: unknown student {name!r}; choose from {', '.join(w.students)}")
    known_arms = {a for arms in w.arms.values() for a in arms}
    if only and only - known_arms:
        ap.error(f"--only: unknown arm(s) {', '.join(sorted(only - known_arms))}; choose from {', '.join(sorted(known_arms))}")
    t0 = time.perf_counter()
    work, out, log = replicate.bench_setup(args, t0)
    cond = args.condition
    data = build_data(work, w, cond, log)
    students, params = build_students(work, w, log)
    everyone = students
    students = {s: students[s] for s in chosen}
    stem = f"transfer-{args.preset}" + ("" if cond == "noisy" else f"-{cond}")
    # What an earlier sitting measured and recorded (the results file, committed for the full
    # preset): its ladders and its runs' accuracies stand, so that a measurement of hours can be
    # spread over sittings on machines that do not keep each other's run folders.
    recorded = json.loads((out / f"{stem}.json").read_text()) if (out / f"{stem}.json").exists() else {}
    # (which arms run, and how many seeds, may grow between sittings: the rest is the world)
    def world(d: dict) -> dict:  # as JSON holds it, without the arms
        return {k: v for k, v in json.loads(json.dumps(d)).items() if k != "arms"}

    if recorded and world(recorded.get("world") or {}) != world(w.__dict__):
        log(f"{out / f'{stem}.json'} was measured in another world (preset changed): not reused")
        recorded = {}
    lad = {s: recorded["ladder"][s] for s in students if s in recorded.get("ladder", {})}
    lad.update(ladder(work, w, cond, {s: f for s, f in students.items() if s not in lad}, data, args.jobs, log))
    # The ladders of every student measured so far (this call's and earlier calls'): the report
    # covers every finished run of every student, whichever part this call ran.
    known = work / f"ladder-{cond}.json"
    lad = {**recorded.get("ladder", {}), **(json.loads(known.read_text()) if known.exists() else {}), **lad}
    known.write_text(json.dumps(lad, indent=2))
    lad = {s: lad[s] for s in w.students if s in lad}
    arms_now = {s: {a: n for a, n in w.arms[s].items() if only is None or a in only} for s in chosen}
    inputs = sorted({TEACHER_ARMS[a].get("recalibrator", {}).get("answer_input", "hidden")
                     for arms in arms_now.values() for a in arms if a in TEACHER_ARMS})
    caches, timings = replicate.teach_once(work, {cond: data}, w.preset(w.ladder[0]), str(TEACHER),
                                           next(iter(students.values())), log, cached=tuple((cond, i) for i in inputs))
    caches = {i: caches[(cond, i)] for i in inputs}
    runs = [plan_run(work, w, cond, s, students[s], data, arm, seed, lad[s]["budget"], caches)
            for seed in range(max(n for arms in arms_now.values() for n in arms.values()))  # seed by seed
            for s in chosen for arm, n in arms_now[s].items() if seed < n]
    before = recorded.get("accuracy", {})
    runs = [r for r in runs if r.name not in before or (Path(r.final) / "config.json").exists()]
    if "gold" in {r.arm for r in runs}:
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            log("TRL is not installed (pip install -e '.[bench]'): the gold arm is left out")
            runs = [r for r in runs if r.arm != "gold"]
    log(f"{len(runs)} runs, {args.jobs} at a time")
    timings.update(replicate.train_all(runs, args.jobs, log))

    # Every run that has finished, of this call or an earlier one, is measured and reported.
    written = {i: str(work / "features" / f"{cond}-{i}") for i in ("hidden", "embeddings")}  # (where teach_once writes)
    everything = [plan_run(work, w, cond, s, folder, data, arm, seed, lad[s]["budget"], written)
                  for s, folder in everyone.items() if s in lad for arm, n in w.arms[s].items() for seed in range(n)]
    done = [r for r in everything if (Path(r.final) / "config.json").exists()]
    models = {"teacher": str(TEACHER), **{r.name: r.final for r in done}}
    acc = replicate.evaluate(models, work / f"eval-transfer-{args.preset}.json", w.preset(w.ladder[0]), log)
    earlier = [r for r in everything if r not in done and r.name in before]
    acc.update({r.name: before[r.name] for r in earlier})
    if earlier:
        log(f"{len(earlier)} runs measured in an earlier sitting (their accuracy from {out / f'{stem}.json'})")
    done += earlier
    gold_notes = []
    for r in done:
        if r.arm == "gold" and (r.out / "gold.json").exists():
            g = json.loads((r.out / "gold.json").read_text())
            if g.get("workaround") and g["workaround"] not in gold_notes:
                gold_notes.append(g["workaround"])
    result = {
        "preset": args.preset, "condition": cond, "world": {k: v for k, v in w.__dict__.items()},
        "command": " ".join(["python", "bench/transfer.py", *(argv if argv is not None else sys.argv[1:])]),
        "versions": replicate.versions(), "teacher": acc["teacher"]["acc"],
        "teacher_desc": "%s, hidden %d, %d layers" % replicate.describe(TEACHER), "test_items": acc["teacher"]["n"],
        "params": params, "ladder": lad, "rows": summarise(done, acc, w), "accuracy": acc, "gold_notes": gold_notes,
        "teacher_on_transfer_set": teacher_beyond_labels(written["hidden"], w.transfer_items)
        if Path(written["hidden"]).is_dir() else recorded.get("teacher_on_transfer_set"),
        "probes": {**recorded.get("probes", {}),
                   **{r.name: replicate.probe_summary(Path(r.recipes[0]["train"]["output_dir"]))
                      for r in done if r.arm in RECALIBRATOR_ARMS and r.seed == 0 and r not in earlier}},
        "earlier_sittings": sorted(r.name for r in earlier),
        "seconds": {**timings, "total": time.perf_counter() - t0},
    }
    replicate.write_results(out, stem, result, markdown, plot, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
