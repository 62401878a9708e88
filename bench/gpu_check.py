"""The GPU check: bf16 distill steps through the real engine on one GPU with a random pair of
realistic shape, against the memory plan, with the step's model FLOPs utilisation.

The pair (random weights, built here, nothing downloaded):
  teacher  Qwen2-VL-7B's language model (hidden 3584, MLP 18944, 28 heads / 4 KV, vocab
           152,064) with --teacher-layers of its 28 decoder layers, a small vision tower
  student  a 1.5B-shaped LLaVA-style model (Llama decoder: hidden 1536, MLP 8960, 12 heads / 2
           KV, 28 layers, vocab 32,000), a small vision tower
Items: one 64x64 image, a question of about --question tokens and an answer of about --answer
tokens on the student's side (the teacher's tokenizer splits them differently: the count of
each side is printed). The run: align 2 updates, then distill --warmup + --steps updates of
--batch items, bf16 autocast with fp32 masters, teacher in bf16, probe and accuracy off.

Then (unless --no-cache) the teacher-feature cache on the same pair: `genrecal teach`'s engine
writes the items' features (bf16), and the same recipe runs again with [teacher] cache: seconds
per distill update and peak memory from the cache beside the online run's.

Reported: seconds per distill update and student tokens/s over the timed updates; the peak GPU
memory of the distill stage (torch.cuda.max_memory_allocated) against the plan's estimate for
the same recipe (`genrecal_cli.commands.plan.make_plan`, without its margin); and MFU = model FLOPs of
one update / its time / the card's dense bf16 peak. Model FLOPs per item (no recomputation):
  teacher forward       2 x teacher body parameters x teacher tokens
  student step          6 x student language-model parameters (without its head) x student tokens
                        + 6 x d_s x V_s x answer tokens (the student head on the answer rows)
  Recalibrator          6 x its parameters x (student question + answer tokens)  (student path)
                        + 6 x its parameters x (teacher question + answer tokens) (L_reg path)
  teacher head          10 x d_t x V_t x answer tokens (L_ar/L_kl forward + input gradient,
                        the teacher's own rows forward, L_reg forward + input gradient)

    python bench/gpu_check.py --json bench/results/gpu-check.json        # on a GPU machine
    .venv/bin/python bench/gpu_check.py --small --device cpu             # the same path, seconds, on CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a clone without installing

# dense bf16 peak FLOP/s by the card's name (vendor data sheets, without sparsity)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "B200": 2250e12}

TEACHER_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                    vocab_size=152_064)
STUDENT_TEXT = dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                    vocab_size=32_000, num_hidden_layers=28)
SMALL_TEACHER = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=15_000)
SMALL_STUDENT = dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=3_200, num_hidden_layers=2)
WORDS = "the red circle is left of a blue square and above the green triangle near one small yellow star".split()


def build_pair(work: Path, small: bool, teacher_layers: int) -> tuple[Path, Path]:
    from genrecal_cli.world.tiny_vlm import build_tiny_vlm

    t_text = dict(SMALL_TEACHER if small else TEACHER_TEXT, num_hidden_layers=teacher_layers)
    s_text = SMALL_STUDENT if small else STUDENT_TEXT
    teacher, student = work / "teacher", work / "student"
    for out, family, text in ((teacher, "qwen2_vl", t_text), (student, "llava", s_text)):
        stamp = out / "built.json"
        if not (stamp.exists() and json.loads(stamp.read_text()) == text):
            build_tiny_vlm(family, out, text=text)
            stamp.write_text(json.dumps(text))
    return teacher, student


def write_data(work: Path, student: Path, teacher: Path, items: int, question: int, answer: int) -> dict:
    """A jsonl of `items` equal-length items, sized on the student's tokenizer; the token count of
    each side, measured with the engine's own encoder."""
    from PIL import Image

    from genrecal_cli.data.formats import to_conversation
    from genrecal_cli.data.render import encode
    from genrecal_cli.models import load_vlm
    from genrecal_cli.recipe import DataSpec

    Image.new("RGB", (64, 64), (200, 40, 40)).save(work / "image.png")
    s_proc, t_proc = load_vlm(str(student), empty=True).processor, load_vlm(str(teacher), empty=True).processor
    tok = s_proc.tokenizer

    def text(n_tokens: int) -> str:
        words, out = 0, []
        while len(tok(" ".join(out), add_special_tokens=False)["input_ids"]) < n_tokens:
            out.append(WORDS[words % len(WORDS)])
            words += 1
        return " ".join(out)

    q, a = text(question), text(answer)
    image = Image.open(work / "image.png")
    sides = {}
    row = {"image": "image.png", "question": q, "answer": a}
    conv = to_conversation(row, "columns", DataSpec(), 0)
    for name, proc in (("student", s_proc), ("teacher", t_proc)):
        enc = encode(proc, conv, [image.convert("RGB")])
        sides[name] = {"tokens": len(enc.input_ids), "answer": enc.num_answer_tokens}
    (work / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for _ in range(items)))
    return sides


def model_flops(teacher, student, rec_params: int, sides: dict) -> float:
    """Model FLOPs of one item through a distill update (see the module docstring)."""
    t_body = sum(p.numel() for p in teacher.model.parameters()) - teacher.head.weight.numel() \
        - teacher.input_embeddings.weight.numel()
    s_lm = sum(p.numel() for p in student.language_model.parameters()) - student.input_embeddings.weight.numel()
    d_t, v_t = teacher.hidden_size, teacher.head.weight.shape[0]
    d_s, v_s = student.hidden_size, student.head.weight.shape[0]
    ts, tt = sides["student"], sides["teacher"]
    s_q, t_q, ans = ts["tokens"] - ts["answer"], tt["tokens"] - tt["answer"], tt["answer"]
    return (2 * t_body * tt["tokens"] + 6 * s_lm * ts["tokens"] + 6 * d_s * v_s * ts["answer"]
            + 6 * rec_params * (s_q + ans) + 6 * rec_params * (t_q + ans) + 10 * d_t * v_t * ans)


class Clock:
    """A reporter that notes when each update of each stage was logged."""

    def __init__(self):
        self.times = {}

    def stage_start(self, *a):
        pass

    def step(self, stage, step, metrics):
        self.times.setdefault(stage, []).append((step, time.perf_counter(), dict(metrics)))

    def stage_end(self, *a):
        pass

    def note(self, text, style=""):
        print(text)

    def per_update(self, stage: str, warmup: int) -> tuple[float | None, list]:
        """Seconds per update of `stage` after its first `warmup` ones (None without warmup: no
        start to time from), and the timed updates' records (step, time, metrics)."""
        rows = self.times[stage]
        timed = rows[warmup:]
        return ((timed[-1][1] - rows[warmup - 1][1]) / len(timed) if warmup else None), timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes: checks the path in seconds on CPU")
    ap.add_argument("--teacher-layers", type=int, default=4, help="of the 7B teacher's 28 decoder layers")
    ap.add_argument("--batch", type=int, default=4, help="items per update (batch_size, grad_accum 1)")
    ap.add_argument("--question", type=int, default=1000, help="question tokens per item (student side)")
    ap.add_argument("--answer", type=int, default=256, help="answer tokens per item (student side)")
    ap.add_argument("--warmup", type=int, default=2, help="distill updates not timed")
    ap.add_argument("--steps", type=int, default=8, help="distill updates timed")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (default: by its name)")
    ap.add_argument("--work", default="/tmp/genrecal-gpu-check", help="where the pair, data and run go")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--no-cache", action="store_true", help="skip the teacher-feature cache run")
    args = ap.parse_args()
    if args.small:
        args.question, args.answer, args.teacher_layers = min(args.question, 80), min(args.answer, 24), 2

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    from genrecal_cli.engine.parallel import make_accelerator
    from genrecal_cli.models import load_vlm
    from genrecal_cli.commands.plan import make_plan
    from genrecal_cli.recipe import recipe_from_dict
    from genrecal_cli.commands.distill import distill

    work = Path(args.work) / ("small" if args.small else "full")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher_dir, student_dir = build_pair(work, args.small, args.teacher_layers)
    updates = args.warmup + args.steps
    sides = write_data(work, student_dir, teacher_dir, args.batch * (updates + 2), args.question, args.answer)
    built = time.perf_counter() - t0
    longest = max(s["tokens"] for s in sides.values())
    stage = {"batch_size": args.batch, "lr": 1e-5, "lr_end": 1e-6}
    raw = {
        "teacher": {"path": str(teacher_dir), "dtype": "bfloat16"},
        "student": {"path": str(student_dir), "dtype": "bfloat16"},
        "data": {"source": str(work / "data.jsonl"), "max_length": longest},
        "stages": {"align": {"steps": 2, **stage}, "distill": {"steps": updates, **stage}},
        "train": {"output_dir": str(work / "run"), "precision": "bf16", "log_every": 1, "save_every": 0,
                  "eval_items": 0, "probe_every": 0},
    }
    recipe = recipe_from_dict(raw)
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else 24.0
    plan = {m.stage: m.total for m in make_plan(recipe, gpus=1, gpu_memory_gib=gib).stages}

    clock = Clock()
    result = distill(recipe, overwrite=True, reporter=clock, accelerator=make_accelerator(recipe))
    seconds, timed = clock.per_update("distill", args.warmup)
    teacher, student = load_vlm(str(teacher_dir), empty=True), load_vlm(str(student_dir), empty=True)
    from genrecal_cli.commands.plan.model_shape import read_shape
    from genrecal_cli.commands.plan.estimate import recalibrator_params

    rec = result.stages["distill"]
    rec_params = recalibrator_params(read_shape(recipe.teacher, "teacher"), read_shape(recipe.student, "student"),
                                     recipe.recalibrator.num_blocks)
    flops = model_flops(teacher, student, rec_params, sides) * args.batch
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAK_BF16.items() if k in name), None)
    measured_mb = rec.get("peak_gpu_mb") if device == "cuda" else rec.get("peak_rss_mb")
    figures = {
        "device": name, "small": args.small, "teacher_layers": args.teacher_layers, "batch": args.batch,
        "tokens_per_item": sides, "build_s": round(built, 1),
        "distill_s_per_update": round(seconds, 3) if seconds else None,
        "student_tokens_per_s": round(args.batch * sides["student"]["tokens"] / seconds) if seconds else None,
        "model_tflops_per_update": round(flops / 1e12, 3),
        "mfu": round(flops / seconds / peak, 4) if (seconds and peak) else None,
        "peak_memory_mib": {"measured": measured_mb, "what": "torch.cuda.max_memory_allocated" if device == "cuda"
                            else "process VmHWM (CPU: includes the runtime, not comparable to the plan)",
                            "planned": round(plan["distill"] / 2**20, 1)},
        "losses": {k: v for k, v in timed[-1][2].items() if k in ("ar", "kl", "reg", "sft")},
    }
    if device == "cuda" and measured_mb:
        figures["peak_memory_mib"]["planned_over_measured"] = round(plan["distill"] / 2**20 / measured_mb, 3)
    if not args.no_cache:
        figures["cache"] = cache_run(raw, work, args, seconds, device)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    if not all(math.isfinite(v) for v in figures["losses"].values()):
        sys.exit("non-finite loss in the GPU check")


def cache_run(raw: dict, work: Path, args, online_seconds: float | None, device: str) -> dict:
    """Write the teacher-feature cache for the recipe's items (bf16), run the same recipe from it;
    the figures beside the online run's."""
    import shutil

    import torch

    from genrecal_cli.engine.parallel import make_accelerator
    from genrecal_cli.recipe import recipe_from_dict
    from genrecal_cli.commands.distill import distill, teach

    folder = work / "cache"
    shutil.rmtree(folder, ignore_errors=True)
    t = time.perf_counter()
    teach(recipe_from_dict(raw), folder, storage="bf16", batch_size=args.batch)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    teach_s = time.perf_counter() - t
    cached = recipe_from_dict({**raw, "teacher": {**raw["teacher"], "cache": str(folder)},
                               "train": {**raw["train"], "output_dir": str(work / "run-cached")}})
    clock = Clock()
    result = distill(cached, overwrite=True, reporter=clock, accelerator=make_accelerator(cached))
    seconds, timed = clock.per_update("distill", args.warmup)
    rec = result.stages["distill"]
    return {
        "teach_s": round(teach_s, 1),
        "items": sum(len(s["items"]) for s in json.loads((folder / "index.json").read_text())["shards"]),
        "bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        "distill_s_per_update": round(seconds, 3) if seconds else None,
        "online_over_cached": round(online_seconds / seconds, 2) if (seconds and online_seconds) else None,
        "peak_memory_mib": rec.get("peak_gpu_mb") if device == "cuda" else rec.get("peak_rss_mb"),
        "losses": {k: v for k, v in timed[-1][2].items() if k in ("ar", "kl", "reg", "sft")},
    }


if __name__ == "__main__":
    main()
