"""The paper's tables in miniature, on the offline shapes world (issue 7; see bench/README.md).

One command trains a strong teacher and a weak student of other families and tokenizers, then
runs every arm from the same student baseline with the same number of student updates, and
measures each result with `genrecal eval` (lm-eval's hf-multimodal on the shapes test split):

    .venv/bin/python bench/replicate.py                   # ~80 min on 2 CPU cores
    .venv/bin/python bench/replicate.py --preset smoke    # every arm for a few steps (CI)

Arms: SFT only; GenRecal (align -> distill -> finetune); ULD; ablations (no reg, kl without
ar, no new positions, Rec-body depth 1 and 4, answer_input = "embeddings"); accuracy after
each stage. Two conditions: `clean` (every arm sees the same clean data, as in the paper) and
`noisy` (30% of the student's training answers are wrong; the teacher was trained clean).
Everything lands in --work (default runs/replicate); the tables and the plot in --out.

The teacher's features are computed once (`genrecal teach`'s engine, fp32) for each condition
and answer input, and every arm that reads the teacher (GenRecal, ULD, the ablations) over
every seed reads them from that cache ([teacher] cache); `--online` runs the teacher in every
arm instead, as before.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing: bench/ sits beside the package


@dataclass(frozen=True)
class Preset:
    teacher: tuple[str, int, int]  # family, hidden, layers
    student: tuple[str, int, int]
    image_size: int  # what the models' processors see; 48 = one Qwen token per grid cell
    pretrain_steps: int  # vision pretraining of each fresh model (world/pretrain.py)
    train_items: int  # shapes training items (one fixed draw, shared by every arm and seed)
    teacher_steps: int
    baseline_steps: int  # the student's brief training: its "baseline"
    align: int
    distill: int
    finetune: int
    batch_size: int
    seeds: tuple[int, ...]
    ablation_seeds: tuple[int, ...]
    eval_limit: int | None  # None: the whole test split (300 items)
    probe_every: int
    noise: float = 0.3
    cell_positions: bool = True  # vision pretraining also teaches each image token its grid cell


PRESETS = {
    "full": Preset(
        teacher=("qwen2_vl", 128, 4), student=("llava", 64, 2), image_size=48, pretrain_steps=900,
        train_items=4000, teacher_steps=1500, baseline_steps=150, align=200, distill=1000, finetune=500,
        batch_size=16, seeds=(0, 1, 2), ablation_seeds=(0,), eval_limit=None, probe_every=100,
    ),
    "smoke": Preset(
        teacher=("qwen2_vl", 64, 2), student=("llava", 32, 1), image_size=48, pretrain_steps=4,
        train_items=48, teacher_steps=3, baseline_steps=2, align=2, distill=2, finetune=2,
        batch_size=4, seeds=(0,), ablation_seeds=(0,), eval_limit=3, probe_every=1,
    ),
}

# Student-side lr per stage; the SFT arm's two phases use the distill and finetune rows, so its
# schedule restarts exactly where GenRecal's does.
LR = {"align": (1e-3, 1e-4), "distill": (5e-4, 5e-5), "finetune": (2e-4, 2e-5)}

# Arm -> recipe changes from the GenRecal default. "sft" and "uld" have no align stage.
ABLATIONS = {
    "no-reg": {"loss": {"reg": 0.0}},
    "kl-without-ar": {"loss": {"ar": 0.0}},
    "no-new-positions": {"recalibrator": {"new_positions": False}},
    "depth-1": {"recalibrator": {"num_blocks": 1}},
    "depth-4": {"recalibrator": {"num_blocks": 4}},
    "embeddings": {"recalibrator": {"answer_input": "embeddings"}},
}
MAIN_ARMS = ("sft", "genrecal", "uld")


@dataclass
class Run:
    """One arm x condition x seed: its recipes (run in order) and the students to evaluate."""

    arm: str
    condition: str
    seed: int
    recipes: list[dict] = field(default_factory=list)
    students: dict[str, str] = field(default_factory=dict)  # "final" / "after distill" ... -> folder

    @property
    def name(self) -> str:
        return f"{self.condition}/{self.arm}/seed{self.seed}"


# ---------------------------------------------------------------------------------------------
# the world: models, data, teacher, baseline


def noisy_answer(row: dict, rng: random.Random) -> dict:
    """The row with a wrong answer of the right form: another candidate (short), another option
    letter (mc), or the long answer with its target named wrongly."""
    from genrecal_cli.world.shapes import CANDIDATES

    if row["form"] == "mc":
        letters = [line.split(".")[0] for line in row["options"].splitlines()]
        wrong = rng.choice([x for x in letters if x != row["target"]])
        return {**row, "answer": wrong, "target": wrong}
    true = row["target"]
    wrong = rng.choice([c for c in CANDIDATES[row["kind"]] if c != true])
    if row["form"] == "short":
        return {**row, "answer": wrong, "target": wrong}

    def swap(m: re.Match) -> str:
        return wrong[:1].upper() + wrong[1:] if m.group(0)[:1].isupper() else wrong

    return {**row, "answer": re.sub(rf"\b{re.escape(true)}\b", swap, row["answer"], flags=re.IGNORECASE), "target": wrong}


def with_noise(train, noise: float, log):
    """The training rows with `noise` of their answers made wrong (noisy_answer; a fixed draw)."""
    rng = random.Random("genrecal-noise")
    text = train.remove_columns("image").to_list()  # the text columns only: no image decoding
    rows = [noisy_answer(r, rng) if rng.random() < noise else r for r in text]
    wrong = sum(a["answer"] != b["answer"] for a, b in zip(rows, text))
    train = train.remove_columns(["answer", "target"])
    log(f"noisy data: {wrong} of {len(rows)} training answers made wrong")
    return train.add_column("answer", [r["answer"] for r in rows]).add_column("target", [r["target"] for r in rows])


def bench_setup(args, log_start: float):
    """What every seeded benchmark does first: its work folder (made), its results folder
    (bench/results for the full preset, else WORK/results), a timed log, the zoo cache inside
    the work folder and quiet libraries. Returns (work, out, log)."""
    work = args.work.resolve()
    out = args.out or (ROOT / "bench" / "results" if args.preset == "full" else work / "results")
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - log_start:7.1f} s] {msg}", flush=True)

    os.environ.setdefault("GENRECAL_CACHE", str(work / "cache"))
    quiet()
    return work, out, log


def build_data(work: Path, p: Preset, log) -> dict[str, str]:
    """Two data folders with the same items: clean, and with p.noise of the train answers wrong."""
    from genrecal_cli.world.shapes import make_split

    out = {}
    for cond in ("clean", "noisy"):
        folder = work / "data" / cond
        out[cond] = str(folder)
        if (folder / "train.parquet").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        train = make_split("train", p.train_items, seed=0)
        if cond == "noisy":
            train = with_noise(train, p.noise, log)
        val = make_split("validation", max(40, p.train_items // 10), seed=0)
        for split, ds in (("train", train), ("validation", val)):
            ds.to_parquet(str(folder / f".{split}.tmp"))
            (folder / f".{split}.tmp").replace(folder / f"{split}.parquet")
    return out


def build_once(folder: Path, family: str, hidden: int, layers: int, log, **options) -> str:
    """A fresh zoo model in folder unless one is there (built aside, then renamed into place);
    options go to tiny_vlm.build_tiny_vlm (image_size, pretrain_steps, cell_positions)."""
    from genrecal_cli.world.tiny_vlm import build_tiny_vlm

    if not (folder / "config.json").exists():
        t = time.perf_counter()
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_vlm(family, tmp, hidden_size=hidden, num_layers=layers, **options)
        tmp.rename(folder)
        log(f"built {folder.name} {family} hidden {hidden} layers {layers} ({time.perf_counter() - t:.0f} s)")
    return str(folder)


def build_models(work: Path, p: Preset, log, roles=("teacher", "student")) -> dict[str, str]:
    return {role: build_once(work / "models" / f"{role}-init", *(p.teacher if role == "teacher" else p.student), log,
                             image_size=p.image_size, pretrain_steps=p.pretrain_steps, cell_positions=p.cell_positions)
            for role in roles}


def stage(steps: int, which: str, p: Preset, **extra) -> dict:
    lr, lr_end = LR[which]
    return {"steps": steps, "lr": lr, "lr_end": lr_end, "batch_size": p.batch_size, **extra}


def base_recipe(student: str, data: str, out: Path, seed: int, p: Preset, teacher: str | None = None) -> dict:
    raw = {
        "student": {"path": student},
        "data": {"source": data, "max_length": 256},
        "train": {"seed": seed, "output_dir": str(out), "log_every": 50, "eval_items": 0, "probe_every": p.probe_every},
    }
    if teacher:
        raw["teacher"] = {"path": teacher}
    return raw


def prerequisite_recipes(work: Path, models: dict, data: dict, p: Preset, with_teacher: bool = True) -> list[dict]:
    baseline = base_recipe(models["student"], data["clean"], work / "baseline", 0, p)
    baseline["stages"] = {"finetune": {**stage(p.baseline_steps, "finetune", p), "lr": 1e-3, "lr_end": 1e-3}}
    if not with_teacher:
        return [baseline]
    teacher = base_recipe(models["teacher"], data["clean"], work / "teacher", 0, p)
    teacher["stages"] = {"finetune": {**stage(p.teacher_steps, "finetune", p), "lr": 1e-3, "lr_end": 1e-4,
                                      "warmup_steps": min(50, p.teacher_steps // 10)}}
    return [teacher, baseline]


CACHED = (("clean", "hidden"), ("noisy", "hidden"), ("clean", "embeddings"))  # what the arms read


def teach_once(work: Path, data: dict, p: Preset, teacher: str, student: str, log,
               cached: tuple[tuple[str, str], ...] = CACHED) -> tuple[dict, dict]:
    """The teacher's features for every (condition, answer input) an arm reads, written once
    with `genrecal teach`'s engine in fp32 (so an arm trains as with the online teacher, to float
    noise); a complete cache is kept, a partial one resumed. Returns the folders and seconds."""
    from genrecal_cli.recipe import recipe_from_dict
    from genrecal_cli.commands.distill import teach

    folders, seconds = {}, {}
    for cond, answer_input in cached:
        folder = work / "features" / f"{cond}-{answer_input}"
        raw = base_recipe(student, data[cond], work / "features" / "recipe", 0, p, teacher=teacher)
        raw["recalibrator"] = {"answer_input": answer_input}
        raw["stages"] = {"distill": stage(p.distill, "distill", p)}  # (a recipe has a stage; teach runs none)
        t = time.perf_counter()
        teach(recipe_from_dict(raw, source=str(folder)), folder, storage="fp32", batch_size=2 * p.batch_size)
        folders[(cond, answer_input)] = str(folder)
        seconds[f"teach {cond}-{answer_input}"] = time.perf_counter() - t
        log(f"teacher features {cond}, answer input {answer_input}: {folder} ({seconds[f'teach {cond}-{answer_input}']:.0f} s)")
    return folders, seconds


def plan(work: Path, data: dict, p: Preset, teacher: str, caches: dict | None = None) -> list[Run]:
    """Every run of the benchmark, in the order they are listed in the results; arms that read
    the teacher read its features from `caches` ((condition, answer input) -> folder) if given."""
    baseline = str(work / "baseline" / "student")
    runs = []
    arms = [(a, p.seeds, ("clean", "noisy")) for a in MAIN_ARMS] + [(a, p.ablation_seeds, ("clean",)) for a in ABLATIONS]
    for arm, seeds, conditions in arms:
        for cond in conditions:
            for seed in seeds:
                run = Run(arm, cond, seed)
                out = work / "runs" / cond / arm / f"seed{seed}"
                if arm == "sft":  # two phases, schedules restarting where GenRecal's stages do
                    one = base_recipe(baseline, data[cond], out / "phase1", seed, p)
                    one["stages"] = {"finetune": stage(p.distill, "distill", p)}
                    two = base_recipe(str(out / "phase1" / "student"), data[cond], out / "phase2", seed, p)
                    two["stages"] = {"finetune": stage(p.finetune, "finetune", p)}
                    run.recipes = [one, two]
                    run.students = {"after distill": str(out / "phase1" / "student"), "final": str(out / "phase2" / "student")}
                else:
                    raw = base_recipe(baseline, data[cond], out, seed, p, teacher=teacher)
                    # the projector trains in distill too, so every arm updates the same parameters
                    raw["stages"] = {"distill": stage(p.distill, "distill", p, train_projector=True),
                                     "finetune": stage(p.finetune, "finetune", p)}
                    if arm == "uld":
                        raw["loss"] = {"ar": 0.0, "kl": 0.0, "reg": 0.0, "uld": 1.0}
                    else:
                        raw["stages"]["align"] = stage(p.align, "align", p)
                        for key, changes in ABLATIONS.get(arm, {}).items():
                            raw.setdefault(key, {}).update(changes)
                    if caches:
                        raw["teacher"]["cache"] = caches[(cond, raw.get("recalibrator", {}).get("answer_input", "hidden"))]
                    run.recipes = [raw]
                    run.students = {"after distill": str(out / "distill" / "student"), "final": str(out / "student")}
                runs.append(run)
    return runs


# ---------------------------------------------------------------------------------------------
# running


def train(raw: dict, threads: int | None = None) -> dict:
    """Run one recipe in this process unless its student is already exported; a run that was
    stopped (a killed benchmark) continues from its last checkpoint. Returns timing."""
    import torch

    from genrecal_cli.commands.display import Reporter
    from genrecal_cli.engine.checkpoint import latest_checkpoint
    from genrecal_cli.recipe import recipe_from_dict
    from genrecal_cli.commands.distill import distill

    if threads:
        torch.set_num_threads(threads)
    quiet()
    out = Path(raw["train"]["output_dir"])
    if (out / "student" / "genrecal.json").exists():
        return {"skipped": True}
    recipe = recipe_from_dict(raw, source=str(out / "recipe"))
    resume = latest_checkpoint(out) is not None
    t = time.perf_counter()
    with open(os.devnull, "w") as sink:
        from rich.console import Console

        with Reporter(out, console=Console(file=sink), log_every=recipe.train.log_every, live=False) as reporter:
            distill(recipe, resume=resume, overwrite=not resume, reporter=reporter)
    return {"seconds": time.perf_counter() - t, "resumed": resume}


def quiet() -> None:
    """No per-load progress bars from transformers and datasets in the bench's log."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()


def run_arm(run: Run, threads: int | None) -> tuple[str, float]:
    """Train one run's recipes in order; a run that is callable (another trainer, e.g. the
    sweep's GOLD job) is called with the threads instead."""
    t = time.perf_counter()
    if callable(run):
        run(threads)
    else:
        for raw in run.recipes:
            train(raw, threads)
    return run.name, time.perf_counter() - t


def train_all(runs: list, jobs: int, log) -> dict[str, float]:
    """Every run (anything with .name and .recipes, or callable), `jobs` at a time with one CPU
    thread each (spawned processes, handed out in the list's order), or in this process;
    run name -> seconds."""
    timings = {}
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = pool.map(run_arm, runs, [1] * len(runs))
            for name, seconds in done:
                timings[name] = seconds
                log(f"done {name} ({seconds:.0f} s)")
    else:
        for run in runs:
            name, seconds = run_arm(run, None)
            timings[name] = seconds
            log(f"done {name} ({seconds:.0f} s)")
    return timings


def evaluate(models: dict[str, str], out: Path, p: Preset, log) -> dict[str, dict]:
    """`genrecal eval --bench shapes` in one process on every model that out does not hold yet
    (a rerun with more seeds evaluates only the new ones); label -> {acc, stderr, n}."""
    from genrecal_cli.commands.evaluate.report import EvalReport

    report = EvalReport.from_dict(json.loads(out.read_text())) if out.exists() else EvalReport([], {})
    known = {m.path for m in report.models}
    missing = [path for path in dict.fromkeys(models.values()) if path not in known]
    if missing:
        limit = ["--limit", str(p.eval_limit)] if p.eval_limit else []
        part = out.with_name(out.stem + ".part.json")
        cmd = [sys.executable, "-m", "genrecal_cli", "eval", "--bench", "shapes", "--batch-size", "32",
               "--device", "cpu", *limit, "--output", str(part), *missing]
        log(f"genrecal eval on {len(missing)} models -> {out}")
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
        if done.returncode != 0:
            raise SystemExit(f"genrecal eval failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        new = EvalReport.from_dict(json.loads(part.read_text()))
        report = EvalReport(report.models + new.models, new.protocol)
        part.write_text(report.to_json())
        part.replace(out)
    by_path = {m.path: m for m in report.models}
    results = {}
    for label, path in models.items():
        row = next(r for r in by_path[path].rows if r["metric"] == "acc")
        results[label] = {"acc": row["value"], "stderr": row.get("stderr"), "n": row.get("n")}
    return results


def probe_summary(run_dir: Path) -> dict[str, dict[str, float]]:
    """The last reliance probe of each teacher stage in a run's metrics.jsonl."""
    from genrecal_cli.commands.metrics_view import PROBE_KEYS

    last: dict[str, dict[str, float]] = {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if any(k in row for k in PROBE_KEYS):
                last[row["stage"]] = {k: row[k] for k in PROBE_KEYS if k in row}
    return last


# ---------------------------------------------------------------------------------------------
# reporting


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[Run], acc: dict[str, dict], teacher: float, baseline: float) -> list[dict]:
    rows = {}
    for run in runs:
        key = (run.condition, run.arm)
        row = rows.setdefault(key, {"condition": run.condition, "arm": run.arm, "seeds": [], "final": [], "after distill": []})
        row["seeds"].append(run.seed)
        for which in ("final", "after distill"):
            row[which].append(acc[f"{run.name}:{which}"]["acc"])
    out = []
    for row in rows.values():
        m, sd = mean_sd(row["final"])
        md, sdd = mean_sd(row["after distill"])
        gap = teacher - baseline
        out.append({**row, "mean": m, "sd": sd, "after_distill_mean": md, "after_distill_sd": sdd,
                    "gap_closed": (m - baseline) / gap if gap > 0 else None})
    return out


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    for pkg in ("genrecal", "torch", "transformers", "accelerate", "datasets", "lm_eval"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def fmt(m: float, sd: float, n: int) -> str:
    return f"{100 * m:.1f} ± {100 * sd:.1f}" if n > 1 else f"{100 * m:.1f}"


def markdown(result: dict) -> str:
    p, rows = result["preset"], result["rows"]
    lines = [
        f"Teacher ({p['teacher'][0]}, hidden {p['teacher'][1]}, {p['teacher'][2]} layers): "
        f"**{100 * result['teacher']:.1f}%**; student baseline ({p['student'][0]}, hidden {p['student'][1]}, "
        f"{p['student'][2]} layers, {p['baseline_steps']} steps): **{100 * result['baseline']:.1f}%** "
        f"(shapes test split, {result['test_items']} items, `genrecal eval`).",
        "",
        f"Student updates per arm: {p['distill']} + {p['finetune']} (GenRecal: {p['align']} align steps first, "
        f"which train only the Recalibrator), batch {p['batch_size']}.",
        "",
        "| condition | arm | seeds | accuracy % (mean ± sd) | after distill / SFT phase 1 % | gap closed |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = len(r["seeds"])
        gap = f"{100 * r['gap_closed']:.0f}%" if r["gap_closed"] is not None else "–"
        lines.append(f"| {r['condition']} | {r['arm']} | {n} | {fmt(r['mean'], r['sd'], n)} | "
                     f"{fmt(r['after_distill_mean'], r['after_distill_sd'], n)} | {gap} |")
    lines += ["", "Reliance probe (teacher top-1 agreement of the Recalibrator's output with the student's question "
              "features real / another item's / zeroed; end of distill, seed 0):", "",
              "| condition | arm | first answer token | later answer tokens |", "|---|---|---|---|"]
    for name, probe in result["probes"].items():
        d = probe.get("distill")
        if not d:
            continue
        cells = ["/".join(f"{d[f'rely_{part}_top1_{v}']:.2f}" for v in ("real", "other", "zero")) for part in ("first", "later")]
        cond, arm = name.split("/")[:2]
        lines.append(f"| {cond} | {arm} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """A PNG bar chart (Pillow only): final accuracy per arm and condition with sd error bars,
    and after-distill accuracy as a hollow marker; teacher and baseline as lines."""
    from PIL import Image, ImageDraw, ImageFont

    rows = result["rows"]
    w, h, left, top, bottom = 1100, 520, 70, 40, 150
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    y0, y1 = h - bottom, top

    def y(v: float) -> float:
        return y0 - (y0 - y1) * v

    for t in range(0, 11, 2):
        d.line([(left, y(t / 10)), (w - 20, y(t / 10))], fill=(225, 225, 225))
        d.text((left - 40, y(t / 10) - 7), f"{10 * t}%", fill="black", font=small)
    slot = (w - 20 - left) / max(1, len(rows))
    colours = {"clean": (52, 101, 164), "noisy": (204, 102, 0)}
    for i, r in enumerate(rows):
        x = left + slot * (i + 0.5)
        bw = slot * 0.35
        d.rectangle([x - bw, y(r["mean"]), x + bw, y0], fill=colours[r["condition"]])
        if r["sd"] > 0:
            d.line([(x, y(r["mean"] - r["sd"])), (x, y(r["mean"] + r["sd"]))], fill="black", width=2)
            for v in (r["mean"] - r["sd"], r["mean"] + r["sd"]):
                d.line([(x - 5, y(v)), (x + 5, y(v))], fill="black", width=2)
        m = y(r["after_distill_mean"])
        d.ellipse([x - 5, m - 5, x + 5, m + 5], outline="black", width=2)
        # names under the bars, staggered in two rows so that neighbours do not overlap
        name = r["arm"].replace("-", "-\n", 1) if len(r["arm"]) > 9 else r["arm"]
        d.multiline_text((x, y0 + 8 + 40 * (i % 2)), name, fill="black", font=small, anchor="ma", align="center")
    for value, name, colour in ((result["teacher"], "teacher", (40, 140, 40)), (result["baseline"], "baseline", (160, 160, 160))):
        d.line([(left, y(value)), (w - 20, y(value))], fill=colour, width=2)
        text = f"{name} {100 * value:.0f}%"
        box = d.textbbox((left + 4, y(value) - 16), text, font=small)
        d.rectangle(box, fill="white")
        d.text((left + 4, y(value) - 16), text, fill=colour, font=small)
    d.text((left, 10), "shapes test accuracy per arm (bars: final, mean ± sd over seeds; circle: after distill / SFT phase 1)",
           fill="black", font=font)
    lx = left
    for cond, colour in colours.items():
        d.rectangle([lx, h - 22, lx + 14, h - 8], fill=colour)
        d.text((lx + 20, h - 23), cond, fill="black", font=font)
        lx += 100
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------


def bench_arguments(doc: str, presets, work: str) -> argparse.ArgumentParser:
    """The options every seeded benchmark takes: --preset, --work (runs/WORK), --out, --jobs."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(presets), default="full")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / work, help="models, data, runs (reused when present)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results; smoke: WORK/results)")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at once, one CPU thread each")
    return ap


def write_results(out: Path, stem: str, result: dict, markdown, plot, log) -> None:
    """A benchmark's results as STEM.json, its table as STEM.md (also printed) and its plot as STEM.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"{stem}.md").write_text(markdown(result))
    plot(result, out / f"{stem}.png")
    print(markdown(result))
    log(f"results in {out}")


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure written as a PNG under a temporary name, then renamed into place."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = bench_arguments(__doc__, PRESETS, "replicate")
    ap.add_argument("--seeds", type=int, default=None, help="seeds of the main rows (default: the preset's)")
    ap.add_argument("--online", action="store_true",
                    help="run the teacher in every arm instead of computing its features once (teacher cache)")
    ap.add_argument("--teacher", type=Path, default=None,
                    help="a trained teacher to use instead of training one (e.g. from bench/teacher.py, 48x48)")
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    if args.teacher and not (args.teacher / "config.json").exists():
        ap.error(f"--teacher {args.teacher}: no config.json there; give a checkpoint folder")
    if args.seeds:
        p = replace(p, seeds=tuple(range(args.seeds)))
    if args.teacher:  # the report describes the teacher actually used
        p = replace(p, teacher=describe(args.teacher), teacher_steps=0)
    work, out = args.work.resolve(), (args.out or (ROOT / "bench" / "results" if args.preset == "full" else args.work / "results"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    os.environ.setdefault("GENRECAL_CACHE", str(work / "cache"))
    quiet()
    data = build_data(work, p, log)
    models = build_models(work, p, log, roles=("student",) if args.teacher else ("teacher", "student"))
    timings = {}
    teacher_path = str(args.teacher.resolve() if args.teacher else work / "teacher" / "student")
    for raw in prerequisite_recipes(work, models, data, p, with_teacher=args.teacher is None):
        log(f"training {Path(raw['train']['output_dir']).name}")
        timings[Path(raw["train"]["output_dir"]).name] = train(raw).get("seconds")

    caches = None
    if not args.online:
        caches, seconds = teach_once(work, data, p, teacher_path, str(work / "baseline" / "student"), log)
        timings.update(seconds)
    runs = plan(work, data, p, teacher_path, caches)
    log(f"{len(runs)} runs, {args.jobs} at a time")
    timings.update(train_all(runs, args.jobs, log))

    models_to_eval = {"teacher": teacher_path, "baseline": str(work / "baseline" / "student")}
    for run in runs:
        for which, folder in run.students.items():
            models_to_eval[f"{run.name}:{which}"] = folder
    acc = evaluate(models_to_eval, work / f"eval-{args.preset}.json", p, log)
    teacher, baseline = acc["teacher"]["acc"], acc["baseline"]["acc"]
    result = {
        "preset": {k: v for k, v in p.__dict__.items()},
        "command": " ".join(["python", "bench/replicate.py", *(argv if argv is not None else sys.argv[1:])]),
        "teacher_features": "online" if args.online else "cache (fp32, computed once)",
        "versions": versions(),
        "teacher": teacher,
        "baseline": baseline,
        "test_items": acc["teacher"]["n"],
        "rows": summarise(runs, acc, teacher, baseline),
        "accuracy": acc,
        "probes": {run.name: probe_summary(Path(run.recipes[0]["train"]["output_dir"]))
                   for run in runs if run.arm not in ("sft", "uld") and run.seed == min(run_seeds(p, run.arm))},
        "seconds": {**timings, "total": time.perf_counter() - t0},
    }
    write_results(out, f"replicate-{args.preset}", result, markdown, plot, log)
    return 0


def describe(checkpoint: Path) -> tuple[str, int, int]:
    """(family, hidden, layers) of a saved model, from its config.json."""
    config = json.loads((checkpoint / "config.json").read_text())
    text = config.get("text_config") or config
    return config["model_type"], text["hidden_size"], text["num_hidden_layers"]


def run_seeds(p: Preset, arm: str) -> tuple[int, ...]:
    return p.seeds if arm in MAIN_ARMS else p.ablation_seeds


if __name__ == "__main__":
    sys.exit(main())
