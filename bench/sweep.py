"""Does GenRecal beat SFT when the student can learn? (issue 17; see bench/README.md)

The world of bench/replicate.py (the shipped reference teacher, the shapes data clean and with
30% wrong answers, `genrecal eval` on the test split), with two axes replicate.py does not have:

- student size: LLaVA-style students (SentencePiece-style tokenizer, Vicuna template) of three
  sizes, each with its own baseline (vision pretrained, 150 steps of training), each trained by
  SFT and by GenRecal over the seeds, clean and noisy, at replicate.py's 1,500 student updates;
- update budget: one size again at a multiple of the updates (every stage's steps stretched,
  same schedules);
- on one size: ULD and GenRecal with answer_input = "embeddings"; on the largest, TRL's
  GOLDTrainer (bench/gold.py) when trl is installed (`pip install -e '.[bench]'`).

The teacher's features are computed once per condition (`genrecal teach`'s engine, fp32) and
read by every teacher arm of every size and seed: the cache does not depend on the student.

    .venv/bin/python bench/sweep.py                      # the full sweep (see --help for its size)
    .venv/bin/python bench/sweep.py --preset smoke       # every arm of every axis for a few steps (CI)

Everything lands in --work (default runs/sweep) and is reused when present; the table, the plot
and the JSON in --out (default bench/results; smoke: WORK/results).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import replicate  # noqa: E402  (the world: data, models, recipes, training, evaluation)

TEACHER = ROOT / "genrecal_cli" / "world" / "assets" / "shapes-teacher"


@dataclass(frozen=True)
class Sweep:
    world: replicate.Preset  # data, schedules (x1), batch, baseline steps, evaluation
    sizes: tuple[tuple[str, int, int], ...]  # (name, hidden, layers) of LLaVA-style students
    stretched: str  # the size trained again at `factor` x the updates
    factor: int
    stretch_conditions: tuple[str, ...]
    stretch_seeds: tuple[int, ...]  # of world.seeds: the stretched size's seeds
    noisy_seeds: tuple[int, ...]  # of world.seeds: the noisy condition's seeds
    extra_size: str  # ULD and answer_input = "embeddings" on this size (x1, clean)
    extra_seeds: tuple[int, ...]
    gold_size: str  # TRL's GOLDTrainer on this size (x1, clean, seed 0), when trl is installed
    gold_steps: int  # GOLD's optimizer updates (its own on-policy loop: see bench/gold.py)


PRESETS = {
    "full": Sweep(
        world=replicate.PRESETS["full"], sizes=(("S", 64, 2), ("M", 128, 2), ("L", 192, 4)),
        stretched="M", factor=4, stretch_conditions=("clean",), stretch_seeds=(0,), noisy_seeds=(0,), extra_size="M", extra_seeds=(0,),
        gold_size="L", gold_steps=1500,
    ),
    "smoke": Sweep(
        world=replicate.PRESETS["smoke"], sizes=(("S", 32, 1), ("M", 48, 1), ("L", 64, 1)),
        stretched="M", factor=2, stretch_conditions=("clean",), stretch_seeds=(0,), noisy_seeds=(0,), extra_size="M", extra_seeds=(0,),
        gold_size="L", gold_steps=2,
    ),
}


@dataclass
class Run:
    """One size x budget x condition x arm x seed: its recipes (in order), its students."""

    size: str
    factor: int
    condition: str
    arm: str
    seed: int
    recipes: list[dict] = field(default_factory=list)
    students: dict[str, str] = field(default_factory=dict)  # "final" -> the folder evaluated

    @property
    def name(self) -> str:
        return f"{self.size}/x{self.factor}/{self.condition}/{self.arm}/seed{self.seed}"


def plan(work: Path, sweep: Sweep, data: dict, baselines: dict, caches: dict) -> list[Run]:
    """Every training run of the sweep (GOLD aside), in the order the results list them."""
    w = sweep.world
    points = [(size, 1, ("clean", "noisy")) for size, _, _ in sweep.sizes]
    points.append((sweep.stretched, sweep.factor, sweep.stretch_conditions))
    runs = []
    for size, factor, conditions in points:
        p = replace(w, align=w.align * factor, distill=w.distill * factor, finetune=w.finetune * factor)
        arms = [(a, w.seeds) for a in ("sft", "genrecal")]
        if size == sweep.extra_size and factor == 1:
            arms += [(a, sweep.extra_seeds) for a in ("uld", "embeddings")]
        for arm, seeds in arms:
            for cond in conditions:
                if arm in ("uld", "embeddings") and cond != "clean":
                    continue
                for seed in seeds:
                    if (factor != 1 and seed not in sweep.stretch_seeds) or (cond == "noisy" and seed not in sweep.noisy_seeds):
                        continue
                    runs.append(_run(work, p, Run(size, factor, cond, arm, seed), data, baselines[size], caches))
    return runs


def work_order(runs: list[Run], params: dict) -> list[Run]:
    """The order the runs are handed to the workers: seed by seed (a sweep stopped early has
    whole seeds), the longest first within a seed, so that the last runs are short and no core
    idles while one long run finishes (cost ~ updates x sqrt(parameters), a teacher arm ~2 SFT
    updates: the pilot's s/update within ~20%)."""
    return sorted(runs, key=lambda r: (r.seed, -r.factor * math.sqrt(params[r.size]) * (1 if r.arm == "sft" else 2)))


@dataclass
class GoldJob:
    """TRL's GOLDTrainer as one of the pool's jobs (bench/gold.py writes its gold.json; the sweep
    reads it after the pool): it trains beside the other runs instead of after them."""

    name: str
    out: Path
    student: str
    data: str
    steps: int
    batch_size: int
    genrecal_steps: int

    def __call__(self, threads: int | None) -> dict:
        import gold as gold_bench

        return gold_bench.run(self.out, TEACHER, self.student, self.data, steps=self.steps, batch_size=self.batch_size,
                              genrecal_steps=self.genrecal_steps, threads=threads or 1, log=print)


def _run(work: Path, p: replicate.Preset, run: Run, data: dict, baseline: str, caches: dict) -> Run:
    out = work / "runs" / run.name
    cond, seed = run.condition, run.seed
    if run.arm == "sft":  # two phases, schedules restarting where GenRecal's stages do (as in replicate.py)
        one = replicate.base_recipe(baseline, data[cond], out / "phase1", seed, p)
        one["stages"] = {"finetune": replicate.stage(p.distill, "distill", p)}
        two = replicate.base_recipe(str(out / "phase1" / "student"), data[cond], out / "phase2", seed, p)
        two["stages"] = {"finetune": replicate.stage(p.finetune, "finetune", p)}
        run.recipes = [one, two]
        run.students = {"final": str(out / "phase2" / "student")}
        return run
    raw = replicate.base_recipe(baseline, data[cond], out, seed, p, teacher=str(TEACHER))
    raw["stages"] = {"distill": replicate.stage(p.distill, "distill", p, train_projector=True),
                     "finetune": replicate.stage(p.finetune, "finetune", p)}
    answer_input = "hidden"
    if run.arm == "uld":
        raw["loss"] = {"ar": 0.0, "kl": 0.0, "reg": 0.0, "uld": 1.0}
    else:
        raw["stages"]["align"] = replicate.stage(p.align, "align", p)
        if run.arm == "embeddings":
            answer_input = "embeddings"
            raw["recalibrator"] = {"answer_input": answer_input}
    raw["teacher"]["cache"] = caches[(cond, answer_input)]
    run.recipes = [raw]
    run.students = {"final": str(out / "student")}
    return run


def build_students(work: Path, sweep: Sweep, data: dict, log) -> tuple[dict, dict, dict]:
    """Each size's model (vision pretrained) and baseline (trained briefly on clean data);
    returns size -> baseline folder, size -> parameters, and the baselines' training seconds."""
    from genrecal_cli.models import load_vlm

    w = sweep.world
    baselines, params, seconds = {}, {}, {}
    for size, hidden, layers in sweep.sizes:
        init = replicate.build_once(work / "models" / f"student-{size}-init", "llava", hidden, layers, log,
                                    image_size=w.image_size, pretrain_steps=w.pretrain_steps,
                                    cell_positions=w.cell_positions)
        raw = replicate.base_recipe(init, data["clean"], work / "baselines" / size, 0, w)
        raw["stages"] = {"finetune": {**replicate.stage(w.baseline_steps, "finetune", w), "lr": 1e-3, "lr_end": 1e-3}}
        log(f"baseline {size} (hidden {hidden}, {layers} layers)")
        seconds[f"baseline {size}"] = replicate.train(raw).get("seconds")
        baselines[size] = str(work / "baselines" / size / "student")
        params[size] = sum(p.numel() for p in load_vlm(init, empty=True).model.parameters())
    return baselines, params, seconds


# ---------------------------------------------------------------------------------------------
# statistics


def welch(a: list[float], b: list[float]) -> dict | None:
    """Welch's t of mean(a) - mean(b), its degrees of freedom and two-sided p; None under 2 + 2."""
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    if va + vb == 0:
        return {"t": math.copysign(math.inf, ma - mb) if ma != mb else 0.0, "df": None, "p": 0.0 if ma != mb else 1.0}
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return {"t": t, "df": df, "p": two_sided_p(t, df)}


def two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom: 1 minus the integral of its
    density over [-|t|, |t|] (Simpson's rule, 2,000 intervals: ~1e-7 here)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def pdf(x: float) -> float:
        return c * (1 + x * x / df) ** (-(df + 1) / 2)

    x, n = abs(t), 2000
    h = x / n
    s = pdf(0) + pdf(x) + sum((4 if k % 2 else 2) * pdf(k * h) for k in range(1, n))
    return max(0.0, 1 - 2 * s * h / 3)


def summarise(runs: list[Run], acc: dict, params: dict) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for run in runs:
        key = (run.size, run.factor, run.condition, run.arm)
        row = rows.setdefault(key, {"size": run.size, "params": params[run.size], "factor": run.factor,
                                    "condition": run.condition, "arm": run.arm, "seeds": [], "final": []})
        row["seeds"].append(run.seed)
        row["final"].append(acc[f"{run.name}:final"]["acc"])
    out = []
    for row in rows.values():
        m, sd = replicate.mean_sd(row["final"])
        out.append({**row, "mean": m, "sd": sd})
    for row in out:  # GenRecal against SFT at the same point
        if row["arm"] == "genrecal":
            sft = next((r for r in out if r["arm"] == "sft" and
                        (r["size"], r["factor"], r["condition"]) == (row["size"], row["factor"], row["condition"])), None)
            if sft is not None:
                row["vs_sft"] = {"difference": row["mean"] - sft["mean"], **(welch(row["final"], sft["final"]) or {})}
    return out


# ---------------------------------------------------------------------------------------------
# report


def markdown(result: dict) -> str:
    lines = [
        f"Teacher: the shipped reference teacher ({result['teacher_desc']}), **{100 * result['teacher']:.1f}%** on the "
        f"shapes test split ({result['test_items']} items, `genrecal eval`). Students: LLaVA-style; baselines "
        f"{', '.join(f'{s} {100 * a:.1f}%' for s, a in result['baselines'].items())}.",
        "",
        "| student | parameters | updates | condition | arm | seeds | accuracy % (mean ± sd) | GenRecal − SFT | Welch t (df), p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        n = len(r["seeds"])
        versus = r.get("vs_sft") or {}
        diff = f"{100 * versus['difference']:+.1f}" if "difference" in versus else ""
        t = (f"{versus['t']:+.2f} ({versus['df']:.1f}), {versus['p']:.3f}" if versus.get("df") else "")
        lines.append(f"| {r['size']} | {r['params']:,} | {r['updates']:,} | {r['condition']} | {r['arm']} | {n} | "
                     f"{replicate.fmt(r['mean'], r['sd'], n)} | {diff} | {t} |")
    if result.get("gold"):
        g = result["gold"]
        lines += ["", f"TRL GOLDTrainer ({g.get('trl', '?')}): " + (
            f"{100 * g['acc']:.1f}% after {g['steps']} updates; {g['seconds_per_update']:.3f} s per update against "
            f"GenRecal's distill update {g['genrecal_seconds_per_update']:.3f} s on the same machine "
            f"(ratio {g['gold_over_genrecal']:.2f})" + (f"; {g['workaround']}" if g.get('workaround') else "")
            if "acc" in g else f"did not run: {g['error']}")]
    lines += ["", "Reliance probe at the end of distill (seed 0, teacher top-1 agreement real / another item's / zeroed):",
              "", "| student | updates | condition | first answer token | later answer tokens |", "|---|---|---|---|---|"]
    for name, probe in result["probes"].items():
        d = probe.get("distill")
        if d:
            size, factor, cond = name.split("/")[:3]
            cells = ["/".join(f"{d[f'rely_{part}_top1_{v}']:.2f}" for v in ("real", "other", "zero"))
                     for part in ("first", "later")]
            lines.append(f"| {size} | {factor} | {cond} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Accuracy against student size (x1 updates) and against updates (the stretched size),
    per arm and condition, mean ± sd over seeds; the teacher as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {("sft", "clean"): ("tab:gray", "-"), ("genrecal", "clean"): ("tab:blue", "-"),
              ("sft", "noisy"): ("tab:gray", "--"), ("genrecal", "noisy"): ("tab:blue", "--")}
    for (arm, cond), (colour, line) in styles.items():
        pts = sorted((r["params"], r["mean"], r["sd"]) for r in rows
                     if r["arm"] == arm and r["condition"] == cond and r["factor"] == 1)
        if pts:
            x, y, e = zip(*pts)
            left.errorbar(x, [100 * v for v in y], [100 * v for v in e], color=colour, linestyle=line, marker="o",
                          capsize=3, label=f"{arm}, {cond}")
        pts = sorted((r["updates"], r["mean"], r["sd"]) for r in rows
                     if r["arm"] == arm and r["condition"] == cond and r["size"] == result["stretched"])
        if len(pts) > 1:
            x, y, e = zip(*pts)
            right.errorbar(x, [100 * v for v in y], [100 * v for v in e], color=colour, linestyle=line, marker="o",
                           capsize=3, label=f"{arm}, {cond}")
    for r in rows:
        if r["arm"] in ("uld", "embeddings"):
            left.errorbar([r["params"]], [100 * r["mean"]], [100 * r["sd"]], marker="s", capsize=3, linestyle="none",
                          label=f"{r['arm']}, {r['condition']}")
    if result.get("gold", {}).get("acc") is not None:
        left.plot([result["params"][result["gold"]["size"]]], [100 * result["gold"]["acc"]], "k^", label="TRL GOLD, clean")
    for ax in (left, right):
        ax.axhline(100 * result["teacher"], color="tab:green", linewidth=1, label="teacher")
        ax.set_ylabel("shapes test accuracy %")
        ax.grid(alpha=0.3)
    left.set_xscale("log")
    left.set_xlabel(f"student parameters ({result['rows'][0]['updates']:,} updates)" if rows else "student parameters")
    right.set_xlabel(f"student updates (size {result['stretched']})")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    replicate.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = replicate.bench_arguments(__doc__, PRESETS, "sweep")
    ap.add_argument("--no-gold", action="store_true", help="leave TRL's GOLDTrainer out")
    ap.add_argument("--seeds", type=int, default=None,
                    help="seeds of the clean condition at x1 (default: the preset's; a rerun with more adds only the new runs)")
    args = ap.parse_args(argv)
    sweep = PRESETS[args.preset]
    if args.seeds:
        sweep = replace(sweep, world=replace(sweep.world, seeds=tuple(range(args.seeds))))
    w = sweep.world
    t0 = time.perf_counter()
    work, out, log = replicate.bench_setup(args, t0)
    data = replicate.build_data(work, w, log)
    baselines, params, timings = build_students(work, sweep, data, log)
    caches, seconds = replicate.teach_once(work, data, w, str(TEACHER), baselines[sweep.sizes[0][0]], log)
    timings.update(seconds)
    runs = plan(work, sweep, data, baselines, caches)
    jobs: list = work_order(runs, params)
    gold_job = None
    if not args.no_gold:  # first: its timing of a genrecal update then runs beside another job, as GOLD's did
        name = f"{sweep.gold_size}/x1/clean/gold/seed0"
        gold_job = GoldJob(name, work / "runs" / name, baselines[sweep.gold_size], data["clean"], sweep.gold_steps,
                           w.batch_size, max(2, min(20, sweep.gold_steps)))
        jobs.insert(0, gold_job)
    log(f"{len(jobs)} runs, {args.jobs} at a time")
    timings.update(replicate.train_all(jobs, args.jobs, log))
    gold = None
    if gold_job is not None:
        gold = gold_job(1)  # its gold.json, written in the pool
        gold["size"] = sweep.gold_size
    models = {"teacher": str(TEACHER), **{f"baseline {s}": b for s, b in baselines.items()}}
    for run in runs:
        for which, folder in run.students.items():
            models[f"{run.name}:{which}"] = folder
    if gold and gold.get("student"):
        models["gold"] = gold["student"]
    acc = replicate.evaluate(models, work / f"eval-sweep-{args.preset}.json", w, log)
    if gold and "gold" in models:
        gold["acc"] = acc["gold"]["acc"]
    rows = summarise(runs, acc, params)
    for r in rows:
        r["updates"] = (w.distill + w.finetune) * r["factor"]
    result = {
        "preset": args.preset, "sweep": {k: (v.__dict__ if hasattr(v, "__dict__") else v) for k, v in sweep.__dict__.items()},
        "command": " ".join(["python", "bench/sweep.py", *(argv if argv is not None else sys.argv[1:])]),
        "versions": replicate.versions(), "teacher": acc["teacher"]["acc"], "teacher_desc": "qwen2_vl, hidden %d, %d layers" % replicate.describe(TEACHER)[1:],
        "test_items": acc["teacher"]["n"], "baselines": {s: acc[f"baseline {s}"]["acc"] for s in baselines},
        "params": params, "stretched": sweep.stretched, "rows": rows, "gold": gold, "accuracy": acc,
        "probes": {run.name: replicate.probe_summary(Path(run.recipes[0]["train"]["output_dir"]))
                   for run in runs if run.arm == "genrecal" and run.seed == min(w.seeds)},
        "seconds": {**timings, "total": time.perf_counter() - t0},
    }
    replicate.write_results(out, f"sweep-{args.preset}", result, markdown, plot, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
