"""The teacher-feature cache in its small forms against the full one (issue 30): does a student
distilled from the teacher's top K per answer token, or from answer ids alone, learn what a
student from the full rows learns? At what cost in bytes per token, in step time?

The world is section 8's (bench/transfer.py): the cross-tokenizer student, the noisy transfer
set, the budget SFT's ladder chose, GenRecal's three stages. Only the cache changes:

- full: the teacher's rows and z_al in fp32 (section 8's cache, the reference);
- topk8, topk32, topk128: z_al in fp32, the teacher's K most likely ids and log-probabilities
  per answer token instead of its rows (`genrecal teach --rows topk:K`);
- fp8-topk32: the same with z_al (and the question features) in fp8 (a scale per row): the
  smallest form for answer_input = "hidden";
- emb-full / ids-topk32: answer_input = "embeddings" with the full cache (section 8's) and with
  answer ids and the top 32 only (`--answers ids --rows topk:32`): nothing per answer token but
  ids and 32 log-probabilities.

Each form trains 3 seeds (a run section 8 already trained is reused: the same recipe and
folder), plus `full` seed 0 once more into a new folder (is a run reproducible?). Then every
student is evaluated on the 300-item test split (`genrecal eval`), each cache's bytes per
answer and question token are read from its shards, and each form's distill step time is timed
alone (one process, 2 threads, after the training).

    .venv/bin/python bench/cache_forms.py                  # ~50 min on 2 cores (two runs at a time)
    .venv/bin/python bench/cache_forms.py --preset smoke   # every form for a few steps (CI)
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import replicate  # noqa: E402
import transfer  # noqa: E402

# name -> (answer_input, storage, rows, answers); the arm (transfer.py) follows the answer input
FORMS = {
    "full": ("hidden", "fp32", "full", "features"),
    "topk8": ("hidden", "fp32", "topk:8", "features"),
    "topk32": ("hidden", "fp32", "topk:32", "features"),
    "topk128": ("hidden", "fp32", "topk:128", "features"),
    "fp8-topk32": ("hidden", "fp8", "topk:32", "features"),
    "emb-full": ("embeddings", "fp32", "full", "features"),
    "ids-topk32": ("embeddings", "fp32", "topk:32", "ids"),
}
REFERENCE = {"hidden": "full", "embeddings": "emb-full"}  # what each form is compared with
SEEDS = {"full": 3, "smoke": 1}
ANSWER_SIDE = ("answer", "answer.scale", "rows", "rows.scale", "top_ids", "top_logprobs", "targets", "answer_turn",
               "answer_pos")
QUESTION_SIDE = ("question", "question.scale", "question_turn", "question_pos")


def caches(work: Path, w, data: str, student: str, log) -> dict[str, str]:
    """Every form's cache: the full ones are section 8's (transfer.py writes them; reused when
    there), the others written here with `genrecal teach`'s engine."""
    from genrecal_cli.commands.distill import teach
    from genrecal_cli.commands.teach import parse_rows
    from genrecal_cli.recipe import recipe_from_dict

    found = {}
    written, _ = replicate.teach_once(work, {"noisy": data}, w.preset(w.ladder[0]), str(transfer.TEACHER), student,
                                      log, cached=(("noisy", "hidden"), ("noisy", "embeddings")))
    p = w.preset(w.ladder[0])
    for name, (answer_input, storage, rows, answers) in FORMS.items():
        if rows == "full" and answers == "features":
            found[name] = written[("noisy", answer_input)]
            continue
        folder = work / "features" / f"noisy-{name}"
        if not (folder / "index.json").exists() or "complete" not in json.loads((folder / "index.json").read_text()):
            raw = replicate.base_recipe(student, data, work / "features" / "recipe", 0, p, teacher=str(transfer.TEACHER))
            raw["recalibrator"] = {"answer_input": answer_input}
            raw["stages"] = {"distill": replicate.stage(p.distill, "distill", p)}
            t = time.perf_counter()
            teach(recipe_from_dict(raw, source=str(folder)), folder, storage=storage, batch_size=2 * p.batch_size,
                  top_k=parse_rows(rows), answer_ids=answers == "ids")
            log(f"cache {name}: {folder} ({time.perf_counter() - t:.0f} s)")
        found[name] = str(folder)
    return found


def bytes_per_token(folder: str) -> dict[str, float]:
    """Bytes on disk per answer token (everything kept for it: features, rows or top K, ids,
    segment, position) and per question token, read from the cache's shards."""
    from safetensors import safe_open

    index = json.loads((Path(folder) / "index.json").read_text())
    size = {"answer": 0, "question": 0}
    tokens = {"answer": 0, "question": 0}
    for shard in index["shards"]:
        with safe_open(str(Path(folder) / shard["file"]), "pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                shape, dtype = t.get_shape(), t.get_dtype()
                n = 1
                for s in shape:
                    n *= s
                width = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "I32": 4, "I64": 8}[dtype]
                side = "answer" if name in ANSWER_SIDE else "question" if name in QUESTION_SIDE else None
                if side:
                    size[side] += n * width
                if name in ("answer_turn", "question_turn"):
                    tokens[name.split("_")[0]] += shape[0]
    return {side: size[side] / max(1, tokens[side]) for side in size} | {"answer_tokens": tokens["answer"],
                                                                         "question_tokens": tokens["question"]}


def plan(work: Path, w, data: str, student: str, budget: int, found: dict, seeds: int) -> list:
    """Each form's runs: section 8's GenRecal recipe (its "genrecal" or "embeddings" arm) reading
    that form's cache; the full forms in section 8's own folders (reused when trained)."""
    runs = []
    for name, (answer_input, *_) in FORMS.items():
        arm = "genrecal" if answer_input == "hidden" else "embeddings"
        for seed in range(seeds):
            run = transfer.plan_run(work, w, "noisy", "cross", student, data, arm, seed, budget,
                                    {answer_input: found[name]})
            if name not in REFERENCE.values():
                _move(run, work / "runs" / "cache-forms" / name / f"seed{seed}")
            run.arm = name
            runs.append(run)
    again = transfer.plan_run(work, w, "noisy", "cross", student, data, "genrecal", 0, budget, {"hidden": found["full"]})
    _move(again, work / "runs" / "cache-forms" / "full-again" / "seed0")
    again.arm = "full-again"
    return runs + [again]


def _move(run, out: Path) -> None:
    raw = run.recipes[0]
    raw["train"]["output_dir"] = str(out)
    run.final = str(out / "student")


def loss_terms(run) -> dict[str, float]:
    """The distill stage's loss terms, the mean of its last 5 logged steps (L_kl as trained: over
    K + 1 bins from a top-K cache)."""
    path = Path(run.recipes[0]["train"]["output_dir"]) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    rows = [r for r in rows if r.get("stage") == "distill" and "ar" in r][-5:]
    return {k: statistics.fmean(r[k] for r in rows) for k in ("ar", "kl", "reg", "sft") if rows and k in rows[0]}


class _Steps:
    """A reporter that keeps the time of every step."""

    def __init__(self):
        self.times: list[float] = []

    def stage_start(self, *a):
        pass

    def step(self, stage, step, metrics):
        self.times.append(time.perf_counter())

    def stage_end(self, *a):
        pass

    def note(self, *a, **k):
        pass


def step_time(work: Path, run, steps: int, name: str) -> float:
    """The median distill step (seconds) of `steps` steps from this form's cache, alone in this
    process (2 threads), the first 5 left out."""
    import copy

    import torch

    from genrecal_cli.commands.distill import distill
    from genrecal_cli.recipe import recipe_from_dict

    torch.set_num_threads(2)
    raw = copy.deepcopy(run.recipes[0])
    raw["stages"] = {"distill": {**raw["stages"]["distill"], "steps": steps}}
    raw["train"].update(output_dir=str(work / "timing" / name), probe_every=0, eval_items=0, save_every=0)
    rep = _Steps()
    distill(recipe_from_dict(raw), reporter=rep, overwrite=True)
    gaps = [b - a for a, b in zip(rep.times[5:], rep.times[6:])]
    return statistics.median(gaps)


def summarise(runs: list, acc: dict, found: dict, sizes: dict, times: dict) -> list[dict]:
    out = []
    for name, (answer_input, storage, rows, answers) in {**FORMS, "full-again": FORMS["full"]}.items():
        these = [r for r in runs if r.arm == name and r.name in acc]
        if not these:
            continue
        values = [acc[r.name]["acc"] * 100 for r in these]
        mean, sd = replicate.mean_sd(values)
        terms = [loss_terms(r) for r in these]
        row = {"form": name, "answer_input": answer_input, "storage": storage, "rows": rows, "answers": answers,
               "seeds": len(values), "acc": mean, "sd": sd, "per_seed": values,
               "terms": {k: statistics.fmean(t[k] for t in terms if k in t) for k in terms[0]},
               "bytes": sizes.get(name.replace("-again", "")), "step_s": times.get(name)}
        ref = REFERENCE[answer_input]
        base = [acc[r.name]["acc"] * 100 for r in runs if r.arm == ref and r.name in acc]
        if name != ref and len(values) > 1 and len(base) > 1:
            row["versus"] = {"reference": ref, "diff": mean - statistics.fmean(base), **transfer.welch(values, base)}
        out.append(row)
    return out


def markdown(result: dict) -> str:
    lines = [f"Teacher {result['teacher'] * 100:.1f}% on the test split ({result['test_items']} items); student "
             f"cross, budget {result['budget']:,} updates (noisy transfer set). Bytes are read from each cache's "
             "shards; step time: a distill step alone (2 threads), median.", "",
             "| form | answer input | storage | rows | answers | seeds | accuracy % | − reference (t, p) | L_ar | L_kl | L_reg | L_sft "
             "| bytes / answer token | bytes / question token | distill step s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        v = r.get("versus")
        vs = f"{v['diff']:+.1f} (t {v['t']:.2f}, p {v['p']:.2f})" if v else ""
        t = r["terms"]
        b = r["bytes"] or {}
        acc = f"{r['acc']:.1f} ± {r['sd']:.1f}" if r["seeds"] > 1 else f"{r['acc']:.1f}"
        lines.append(f"| {r['form']} | {r['answer_input']} | {r['storage']} | {r['rows']} | {r['answers']} | {r['seeds']} "
                     f"| {acc} | {vs} | {t.get('ar', float('nan')):.3f} | {t.get('kl', float('nan')):.3f} "
                     f"| {t.get('reg', float('nan')):.3f} | {t.get('sft', float('nan')):.3f} "
                     f"| {b.get('answer', float('nan')):,.0f} | {b.get('question', float('nan')):,.0f} "
                     f"| {r['step_s'] if r['step_s'] is not None else float('nan'):.3f} |")
    lines += ["", "Per seed: " + "; ".join(f"{r['form']} " + " ".join(f"{v:.1f}" for v in r["per_seed"])
                                          for r in result["rows"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = replicate.bench_arguments(__doc__, transfer.PRESETS, "transfer")
    ap.add_argument("--timing-steps", type=int, default=40, help="distill steps timed per form")
    args = ap.parse_args(argv)
    w = transfer.PRESETS[args.preset]
    t0 = time.perf_counter()
    work, out, log = replicate.bench_setup(args, t0)
    data = transfer.build_data(work, w, "noisy", log)
    students, _ = transfer.build_students(work, w, log)
    student = students["cross"]
    ladder = work / "ladder-noisy.json"
    recorded = json.loads((out / f"transfer-{args.preset}.json").read_text()) if (out / f"transfer-{args.preset}.json").exists() else {}
    known = {**recorded.get("ladder", {}), **(json.loads(ladder.read_text()) if ladder.exists() else {})}
    if "cross" not in known:
        known.update(transfer.ladder(work, w, "noisy", {"cross": student}, data, args.jobs, log))
    budget = known["cross"]["budget"]
    found = caches(work, w, data, student, log)
    sizes = {name: bytes_per_token(folder) for name, folder in found.items()}
    runs = plan(work, w, data, student, budget, found, SEEDS.get(args.preset, 1))
    todo = [r for r in runs if not (Path(r.final) / "config.json").exists()]
    log(f"{len(todo)} of {len(runs)} runs to train, {args.jobs} at a time")
    timings = replicate.train_all(todo, args.jobs, log)
    models = {"teacher": str(transfer.TEACHER), **{r.name: r.final for r in runs}}  # (a run's name holds its form)
    acc = replicate.evaluate(models, work / f"eval-cache-forms-{args.preset}.json", w.preset(w.ladder[0]), log)
    first = {}
    for r in runs:
        first.setdefault(r.arm, r)
    times = {name: step_time(work, run, args.timing_steps if args.preset == "full" else 8, name)
             for name, run in first.items() if name != "full-again"}
    log("step times: " + ", ".join(f"{k} {v:.3f} s" for k, v in times.items()))
    result = {"preset": args.preset, "budget": budget, "teacher": acc["teacher"]["acc"],
              "test_items": acc["teacher"]["n"], "versions": replicate.versions(),
              "command": " ".join(["python", "bench/cache_forms.py", *(argv if argv is not None else sys.argv[1:])]),
              "caches": found, "rows": summarise(runs, acc, found, sizes, times), "accuracy": acc,
              "seconds": {**timings, "total": time.perf_counter() - t0}}
    out.mkdir(parents=True, exist_ok=True)
    stem = f"cache-forms-{args.preset}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    log(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
