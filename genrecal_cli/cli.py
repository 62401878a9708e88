"""The `genrecal` command line: parse, load the recipe, call one core function, render with rich.

Heavy libraries (torch, transformers) are imported inside command bodies only, so that
`genrecal --help` answers at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .errors import GenrecalError, PeerStopped, RecipeError

app = typer.Typer(
    name="genrecal",
    help="Distill a large vision-language model into a small one, across different token types (GenRecal).\n\n"
    "Models are local folders, hub ids or built-in tiny models made offline on first use: "
    "zoo:shapes-teacher (a trained reference teacher), zoo:tiny-teacher, zoo:tiny-student, "
    "zoo:qwen2_vl, zoo:qwen2_5_vl, zoo:internvl, zoo:llava, zoo:idefics3.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}
SetOption = typer.Option(
    None, "--set", "-s", metavar="KEY=VALUE", help="Override a recipe value, e.g. --set train.seed=3 (repeatable)."
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"genrecal {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
) -> None:
    """Distill a large VLM into a small one across token types (GenRecal, arXiv 2506.15681)."""


@app.command()
def distill(
    recipe: Path = typer.Argument(..., help="A TOML recipe, e.g. recipes/tiny-shapes.toml."),
    overrides: Optional[List[str]] = SetOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the recipe, show the stages (with --gpus: the memory plan) and stop."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in the output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an earlier run in the output folder first."),
    gpus: Optional[int] = typer.Option(None, "--gpus", metavar="N", help="With --dry-run: plan the memory of each of N GPUs (reads the models' configs and safetensors headers, loads nothing)."),
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", metavar="GIB", help="With --gpus: the memory of one GPU in GiB, e.g. 80."),
    json_out: Optional[str] = typer.Option(None, "--json", metavar="PATH|-", help="With --dry-run: also write the data preflight (and with --gpus the memory plan) as JSON ('-' = stdout only)."),
    sample: int = typer.Option(256, "--sample", min=0, metavar="N", help="With --dry-run: render N training items (spread over the data) through both processors: token counts, what max_length skips or cuts, padding; 0 skips it."),
) -> None:
    """Run the recipe's stages (align -> distill -> finetune) and export the student."""
    from .commands.tables import accuracy_table, plan_table
    from .recipe import load_recipe

    import os

    # The memory plan only runs dry: a real run's process count comes from its launcher
    # (accelerate launch / torchrun), so --gpus there would promise what it cannot set.
    if (gpus is None) != (gpu_memory is None):
        raise GenrecalError("--gpus N and --gpu-memory GIB go together: the plan needs both (e.g. --gpus 8 --gpu-memory 80)")
    if json_out is not None and not dry_run:
        raise GenrecalError("--json writes the data preflight and the memory plan of a dry run: add --dry-run")
    if gpus is not None and not dry_run:
        raise GenrecalError("--gpus/--gpu-memory plan the memory without training: add --dry-run (a run takes its "
                            "number of processes from its launcher, e.g. accelerate launch --num_processes N)")
    loaded = load_recipe(recipe, overrides or [])
    console = _console()
    # Under torchrun / accelerate launch every process runs this; the plan is printed once.
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("RANK", "0") == "0" and json_out != "-":
        console.print(plan_table(loaded))
        teachers = [f"teacher [bold]{t.path}[/]" + (f" ({t.name}, weight {t.weight:g})" if loaded.several_teachers else "")
                    for t in (loaded.teachers if loaded.several_teachers else [loaded.teacher] if loaded.teacher else [])]
        console.print("\n".join(teachers or ["teacher -"])
                      + f"\nstudent [bold]{loaded.student.path}[/]\ndata    {loaded.data.source}\noutput  {loaded.train.output_dir}")
        if not dry_run:
            console.print(f"processes {processes}: global batch = batch per process x accum x {processes}")
        elif gpus is None:
            console.print("[dim]add --gpus N --gpu-memory GIB for the memory each GPU needs[/]")
    if dry_run:
        if os.environ.get("RANK", "0") == "0":
            _dry_run(loaded, gpus, gpu_memory, json_out, sample, console)
        return
    _quiet_libraries()
    from .commands.display import Reporter
    from .engine.parallel import make_accelerator
    from .commands.distill import distill as run_distill

    accelerator = make_accelerator(loaded)
    out = Path(loaded.train.output_dir)
    existed = out.exists()
    try:
        with Reporter(out, console=console, log_every=loaded.train.log_every,
                      enabled=accelerator.is_main_process) as rep:
            result = run_distill(loaded, resume=resume, overwrite=overwrite, reporter=rep, accelerator=accelerator)
    except BaseException:
        if not existed and accelerator.is_main_process:
            _remove_if_empty(out)  # a run that failed before writing anything leaves no folder behind
        raise
    if accelerator.is_main_process:
        if result.accuracy:
            console.print(accuracy_table(result.accuracy, result.accuracy_on))
        console.print(f"[bold green]done[/]: student exported to [bold]{result.student_dir}[/]")
        _draw_report(out, console)


def _remove_if_empty(folder: Path) -> None:
    """Remove `folder` if it holds no file (only empty folders, or nothing)."""
    if folder.is_dir() and not any(p.is_file() or p.is_symlink() for p in folder.rglob("*")):
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def _draw_report(run_dir: Path, console) -> None:
    """report.png of a finished run; without matplotlib, how to get it (the run is done either way)."""
    from .commands.report import ReportUnavailable, write_report

    try:
        console.print(f"report: [bold]{write_report(run_dir)}[/]")
    except ReportUnavailable as exc:
        console.print(f"[dim]report: {_escape(str(exc))}; then `genrecal report {_escape(str(run_dir))}` draws it[/]")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="a genrecal distill output folder (finished or still going)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="where to write the PNG (default RUN_DIR/report.png)"),
) -> None:
    """Draw a run's picture (loss terms per stage, learning rate, token alignment, reliance probe,
    accuracy before / after) from its metrics.jsonl; also for a run still going."""
    from .commands.report import write_report

    console = _console()
    console.print(f"report: [bold]{write_report(run_dir, output)}[/]")


@app.command()
def teach(
    recipe: Optional[Path] = typer.Argument(None, help="A TOML recipe: its teacher, data and max_length."),
    overrides: Optional[List[str]] = SetOption,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="The cache folder (default: the recipe's teacher.cache)."),
    verify: Optional[Path] = typer.Option(None, "--verify", metavar="DIR", help="Check every shard of the cache in DIR (every item's checksum) and name the damaged ones; exit 1 if any."),
    storage: str = typer.Option("bf16", "--storage", help="bf16, fp32, or fp8 (e4m3 with a float32 scale per row)."),
    no_question: bool = typer.Option(False, "--no-question", help="Leave out the teacher's question features (the largest part); L_reg is then off when the cache is read."),
    batch_size: int = typer.Option(16, "--batch-size", help="Items per teacher forward."),
    shard_items: int = typer.Option(1024, "--shard-items", help="Items per shard file (a killed run keeps its finished shards)."),
    rows: str = typer.Option("full", "--rows", help="What keeps the teacher's distribution per answer token: full (its rows) or topk:K (its K most likely ids and their log-probabilities at loss.temperature, ~6K bytes)."),
    answers: Optional[str] = typer.Option(None, "--answers", help="What keeps the Recalibrator's answer input: features (its rows) or ids (nothing but the answer ids, looked up in the teacher's input embeddings when read; answer_input = \"embeddings\" only). Default: ids under \"embeddings\", else features."),
    dry_run: bool = typer.Option(False, "--dry-run", help="State the cache's size for the recipe's data in every storage form, run the data preflight, and stop."),
    sample: int = typer.Option(256, "--sample", min=0, metavar="N", help="With --dry-run: the data preflight's items (distill --dry-run's)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", metavar="NAME", help="With several [[teachers]]: the one whose cache to write (its `cache` is the default folder)."),
) -> None:
    """Run the teacher once over the recipe's training data and write its features into a cache
    that align and distill read instead ([teacher] cache = DIR): one teacher pass, many students."""
    from .recipe import load_recipe

    if verify is not None:
        from .commands.teach import verify_cache

        return verify_cache(verify, _console())
    if recipe is None:
        raise GenrecalError("genrecal teach: give a RECIPE (or --verify DIR to check a cache)")

    from .commands.teach import one_teacher

    loaded = one_teacher(load_recipe(recipe, overrides or []), teacher)
    folder = output if output is not None else loaded.teacher.cache
    if folder is None:
        raise GenrecalError(f"{recipe}: where should the cache go? set teacher.cache in the recipe or give --output DIR")
    if storage not in ("bf16", "fp32", "fp8"):
        raise GenrecalError(f"--storage {storage!r}: choose bf16, fp32 or fp8")
    if batch_size < 1 or shard_items < 1:
        raise GenrecalError("--batch-size and --shard-items must be at least 1")
    console = _console()
    _quiet_libraries()
    from .commands.teach import write_cache

    write_cache(loaded, folder, console, storage=storage, no_question=no_question, batch_size=batch_size,
                shard_items=shard_items, dry_run=dry_run, rows=rows, answers=answers, sample=sample)


@app.command("inspect-vocab")
def inspect_vocab(
    teacher: Optional[str] = typer.Argument(None, help="Model or tokenizer folder, hub id, .model or .tiktoken file, or zoo:NAME."),
    student: Optional[str] = typer.Argument(None, help="The same kinds of source as TEACHER."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Take teacher, student (and data columns) from a recipe."),
    text: Optional[Path] = typer.Option(None, "--text", help="Sample text from this file."),
    data: Optional[str] = typer.Option(None, "--data", help="Sample text from the answers of this data source ('shapes', a file, a folder or a hub id)."),
    samples: int = typer.Option(200, "--samples", min=1, help="How many answers of --data to use."),
    json_out: Optional[str] = typer.Option(None, "--json", metavar="PATH|-", help="Also write the report as JSON ('-' = stdout only)."),
) -> None:
    """Compare the token types of two models or tokenizers (sizes, overlap, splits, image tokens)."""
    from .errors import GenrecalError
    from .world.zoo import resolve_source

    data_spec = None
    if recipe is not None:
        from .recipe import load_recipe

        loaded = load_recipe(recipe)
        teacher = teacher or (loaded.teacher.path if loaded.teacher else None)
        student = student or loaded.student.path
        data_spec = loaded.data
    if not teacher or not student:
        raise GenrecalError("inspect-vocab needs TEACHER and STUDENT (or a --recipe with both)")
    sample, label = None, None
    if text is not None:
        try:
            sample, label = text.read_text(encoding="utf-8"), str(text)
        except (OSError, UnicodeDecodeError) as exc:
            raise GenrecalError(f"{text}: cannot read the sample text ({exc.__class__.__name__}: {exc})") from None
    elif data is not None:
        sample, label = _answers(data, data_spec, samples), data
    _quiet_libraries()
    from .commands.inspect_vocab import inspect_vocab as run_inspect, render

    report = run_inspect(resolve_source(teacher), resolve_source(student), text=sample, text_source=label, samples=samples)
    if json_out == "-":
        typer.echo(report.to_json())
        return
    render(report, _console())
    if json_out:
        Path(json_out).write_text(report.to_json(), encoding="utf-8")


@app.command("eval")
def eval_(
    models: Optional[List[str]] = typer.Argument(None, help="Model folders or zoo:NAME, first the baseline (e.g. teacher, then students); none: the student of the latest distill run here."),
    bench: str = typer.Option("shapes", "--bench", "-b", help="Benchmarks, comma-separated: shapes, mmmu, lm-eval:TASK."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N items of each task."),
    batch_size: int = typer.Option(8, "--batch-size", help="Items generated at once."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write results and protocol as JSON here."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="A local copy of MMMU/MMMU (for --bench mmmu offline)."),
) -> None:
    """Run benchmarks through lm-eval (hf-multimodal) on teacher and students side by side."""
    from .commands.evaluate import evaluate, latest_student, parse_benchmarks
    from .commands.tables import comparison_table, results_table

    benches = parse_benchmarks(bench)
    console = _console()
    if not models:
        models = [str(latest_student())]
        console.print(f"no MODEL given: evaluating the student of the latest distill run, [bold]{models[0]}[/]")
    _quiet_libraries()
    from .world.zoo import resolve_source

    paths = [resolve_source(m) for m in models]
    report = evaluate(
        paths, benches, limit=limit, batch_size=batch_size, device=device, data_dir=data_dir,
        labels=[m.rstrip("/") for m in models], on_model=lambda label: console.print(f"evaluating [bold]{label}[/] on {', '.join(benches)}"),
    )
    for model in report.models:
        console.print(results_table(model))
    if len(report.models) > 1:
        console.print(comparison_table(report))
    if output is not None:
        output.write_text(report.to_json(), encoding="utf-8")
        console.print(f"results and protocol written to [bold]{output}[/]")


@app.command()
def chat(
    model: str = typer.Argument(..., help="Model folder (an exported student, a teacher), hub id or zoo:NAME."),
    image: Optional[List[Path]] = typer.Option(None, "--image", help="Attach an image to the first message (repeatable)."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 answers greedily (reproducible); above 0 samples."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps... (default: cuda when available)."),
    context: Optional[int] = typer.Option(None, "--context", min=16, help="Token window for history + answer (default: the model's, at most 8192)."),
) -> None:
    """Talk to a model (an exported student or any supported VLM), with images; one turn per line when piped."""
    _quiet_libraries()
    from .commands.chat import run_chat

    run_chat(model, images=[str(p) for p in image or []], system=system, max_new_tokens=max_new_tokens,
             temperature=temperature, device=device, context=context)


def _dry_run(recipe, gpus: Optional[int], gpu_memory: Optional[float], json_out: Optional[str], sample: int,
             console) -> None:
    """The data preflight (unless --sample 0) and, with --gpus, the memory plan; as JSON too."""
    import json

    from .commands.preflight_view import preflight_or_reason, show

    if any(m is not None and (m.path.startswith("zoo:") or m.recipe) for m in (recipe.teacher, recipe.student, *recipe.teachers)):
        _quiet_libraries()  # a zoo model is built on first use; keep transformers' progress bars out
    out: dict = {}
    if sample:
        out["preflight"], why = preflight_or_reason(recipe, sample, quiet=_quiet_libraries)
        if json_out != "-":
            if out["preflight"] is not None:
                show(out["preflight"], console)
            else:
                console.print(f"[yellow]data preflight skipped[/]: {_escape(why)}")
    if gpus is not None:
        from .commands.plan import make_plan, render

        found = out.get("preflight")
        measured = None
        if found and found["usable"]:  # the sample's kept tokens, the longer side's p99
            p99 = max(side["kept_tokens"]["p99"] for side in found["sides"].values())
            measured = (p99, f"the data preflight's p99 of {found['items']} sampled items")
        plan = make_plan(recipe, gpus, gpu_memory, measured)
        out = {**plan.to_dict(), **out}
        if json_out != "-":
            render(plan, console)
    if json_out == "-":
        typer.echo(json.dumps(out, indent=2))
    elif json_out:
        Path(json_out).write_text(json.dumps(out, indent=2), encoding="utf-8")
        console.print(f"dry run written to [bold]{json_out}[/]")


def _answers(source: str, spec, samples: int) -> list[str]:
    """The first `samples` answers (every assistant turn) of a data source, in any layout, as
    sample text for inspect-vocab."""
    import dataclasses

    from .data.formats import answers_of, detect, to_conversation
    from .recipe import DataSpec
    from .commands.distill import load_rows

    spec = dataclasses.replace(spec or DataSpec(), source=source, num_train=None)
    rows = load_rows(spec, spec.train_split)
    fmt = detect(rows.column_names, spec)
    answers: list[str] = []
    for i in range(len(rows)):
        answers += answers_of(to_conversation(rows[i], fmt, spec, i))
        if len(answers) >= samples:
            break
    return answers[:samples]


def _quiet_libraries() -> None:
    """Keep transformers' per-load progress bars and advice out of the CLI's own display."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _escape(text: str) -> str:
    """Text for rich with markup on, printed as it is (an error's text may hold brackets: a
    recipe's [teacher] table, a gloo location such as [/pytorch/.../pair.cc:553])."""
    from rich.markup import escape

    return escape(text)


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point: one red line and exit 1 for user errors, unless --debug."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    try:
        result = app(args=args, prog_name="genrecal", standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        if debug:
            raise
        _console(stderr=True).print("[red]interrupted[/red]")
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors: typer's own message, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except PeerStopped:  # another process met the error and prints it
        if debug:
            raise
        sys.exit(1)
    except GenrecalError as exc:
        if debug:
            raise
        code = getattr(exc, "exit_code", 1)
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        # Every process meets these alike (a recipe problem; a stop agreed by all): process 0 prints
        # it; any other error is one process's own, named where there are several.
        alike = isinstance(exc, RecipeError) or code in (130, 143)
        if alike and rank != 0:
            sys.exit(code)
        label = "[yellow]stopped:[/yellow]" if code in (130, 143) else "[red]error:[/red]"  # a signal, after saving
        where = f"process {rank}: " if world > 1 and not alike else ""
        _console(stderr=True).print(f"{label} {where}{_escape(str(exc))}", markup=True, soft_wrap=True)
        sys.exit(code)
    except Exception as exc:  # a bug, not a user mistake: still one line unless asked
        if debug:
            raise
        _console(stderr=True).print(
            f"[red]internal error:[/red] {type(exc).__name__}: {_escape(str(exc))} (rerun with --debug for the traceback)",
            soft_wrap=True,
        )
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)
