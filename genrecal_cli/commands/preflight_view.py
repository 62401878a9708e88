"""The data preflight of `genrecal distill --dry-run` (also `teach --dry-run`): a sample of the
recipe's training data through every side's processor (data/preflight.py), no weights loaded, shown as a
table per side with what max_length would skip or cut, then the `--set` line that fits 99%."""

from __future__ import annotations

from ..errors import GenrecalError


def run_preflight(recipe, sample: int, *, needs_teacher: bool | None = None) -> dict:
    """The preflight's figures for `recipe` (data/preflight.summarise, plus which models and
    split were read). Raises GenrecalError where a side's processor cannot load."""
    from ..data.loader import PairDataset
    from ..data.preflight import measure_sample, summarise
    from ..data.sampler import length_estimates
    from ..models import ProcessorSettings, load_vlm
    from ..world.zoo import resolve_source
    from .distill import built_in_data, held_out, load_rows

    sides = _sides(recipe, needs_teacher)
    recipe = built_in_data(recipe)
    models = {}
    for side, (key, spec) in sides.items():
        settings = ProcessorSettings(dict(spec.processor), f"{key}.processor", recipe.origin)
        models[side] = load_vlm(resolve_source(spec.path), revision=spec.revision, empty=True,
                                trust_remote_code=spec.trust_remote_code, settings=settings)
    rows = load_rows(recipe.data, recipe.data.train_split, seed=recipe.train.seed, held_out=held_out(recipe))
    dataset = PairDataset(rows, recipe.data, {r: m.processor for r, m in models.items()})
    measured = measure_sample(dataset, {r: m.image_token_id for r, m in models.items()}, sample)
    stage = next(getattr(recipe.stages, s) for s in ("align", "distill", "finetune") if getattr(recipe.stages, s).enabled)
    estimates = None
    if hasattr(rows, "column_names"):  # the loader's own length estimate (data.group_by_length)
        image_tokens = max(m.image_tokens_per_image() for m in models.values())
        estimates = length_estimates(rows, recipe.data, image_tokens)
    report = summarise(measured, recipe.data.max_length, stage.batch_size, recipe.train.seed, estimates)
    report["resolution"] = _resolution(recipe, sides, models, rows, measured, sample)
    report["models"] = {side: spec.path for side, (_, spec) in sides.items()}
    report["source"] = recipe.data.source
    report["rows"] = len(rows) if hasattr(rows, "__len__") else None
    return report


def _resolution(recipe, sides: dict, models: dict, rows, measured: list, sample: int) -> dict:
    """For each side whose own items do not fit 99% at max_length, the largest value of its
    family's resolution key (data.preflight.RESOLUTION) at which they do, found by rendering the
    sample again at each value: {side: {"key", "value", "set"}} (value None: none fits)."""
    from ..data.loader import PairDataset
    from ..data.preflight import RESOLUTION, fits_whole, measure_sample
    from ..models import ProcessorSettings, load_vlm
    from ..models.processor_settings import current_value
    from ..world.zoo import resolve_source

    max_length, out = recipe.data.max_length, {}
    for role, vlm in models.items():
        mine = [m.sides[role] for m in measured if m.sides]
        if vlm.family not in RESOLUTION or fits_whole(mine, max_length) >= 0.99:
            continue
        key, candidates = RESOLUTION[vlm.family]
        now = current_value(vlm.processor.image_processor, key)
        (table, spec), found = sides[role], None
        for value in candidates:
            if now is not None and not isinstance(value, bool) and value >= now:
                continue  # not lower than what it is now
            if isinstance(value, bool) and now is not None and value == now:
                continue
            settings = ProcessorSettings({**spec.processor, key: value}, f"{table}.processor", recipe.origin)
            processor = load_vlm(resolve_source(spec.path), revision=spec.revision, empty=True,
                                 trust_remote_code=spec.trust_remote_code, settings=settings).processor
            again = measure_sample(PairDataset(rows, recipe.data, {role: processor}), {role: vlm.image_token_id}, sample)
            if fits_whole([m.sides[role] for m in again if m.sides], max_length) >= 0.99:
                found = value
                break
        out[role] = {"key": key, "value": found,
                     "set": None if found is None else f"--set {_dotted(table)}.processor.{key}={str(found).lower()}"}
    return out


def _sides(recipe, needs_teacher: bool | None) -> dict[str, tuple[str, object]]:
    """side -> (its recipe table, its ModelSpec): "teacher" and "student", or with several
    teachers "teacher:NAME" for each (table "teachers[i]") and "student"."""
    if needs_teacher is None:
        needs_teacher = any(getattr(recipe.stages, s).enabled for s in ("align", "distill"))
    teachers = {v.side: (v.table, v.recipe.teacher) for v in (recipe.teacher_views() if needs_teacher else [])}
    return {**teachers, "student": ("student", recipe.student)}


def _dotted(table: str) -> str:
    """A table's key as --set takes it: teachers[1] -> teachers.1."""
    return table.replace("[", ".").replace("]", "")


PROCESSOR_MARKERS = ("tokenizer_config.json", "tokenizer.json", "processor_config.json", "preprocessor_config.json")


def preflight_or_reason(recipe, sample: int, needs_teacher: bool | None = None,
                        quiet=None) -> tuple[dict | None, str | None]:
    """(the preflight, None), or (None, why it could not run) where a processor cannot load (a
    model folder of configs only, say): the memory plan still runs without it. A local folder
    without processor files is told before anything heavy is imported (a plan of configs alone
    stays light). `quiet`: called once the processors are to load (the CLI's quieting of
    transformers)."""
    from pathlib import Path

    for table, spec in _sides(recipe, needs_teacher).values():
        folder = Path(spec.path).expanduser()
        if folder.is_dir() and not any((folder / name).is_file() for name in PROCESSOR_MARKERS):
            return None, f"{table}.path {spec.path} holds no processor files (a folder of configs only)"
    if quiet is not None:  # (transformers is imported from here on)
        quiet()
    try:
        return run_preflight(recipe, sample, needs_teacher=needs_teacher), None
    except GenrecalError as exc:
        return None, str(exc).splitlines()[0]


def show(report: dict, console) -> None:
    """The preflight as a table per side and a few lines: skipped, cut, padding, what fits 99%."""
    from rich.table import Table

    n, max_length = report["items"], report["max_length"]
    rows = f" of {report['rows']:,}" if report.get("rows") else ""
    console.print(f"[bold]data preflight[/]: {n:,} items{rows} of {report['source']} through both processors "
                  f"(spread over the data), max_length {max_length:,}")
    for side, figures in report["sides"].items():
        table = Table(title=f"{side} ({report['models'][side]}): tokens per item", title_justify="left")
        for column in ("", "p50", "p90", "p99", "max"):
            table.add_column(column, justify="right" if column else "left")
        for label, key in (("all", "tokens"), ("image", "image_tokens"), ("text", "text_tokens"),
                           (f"kept at max_length {max_length:,}", "kept_tokens")):
            f = figures[key]
            table.add_row(label, *(f"{f[k]:,}" for k in ("p50", "p90", "p99", "max")))
        console.print(table)
        grouped = figures["padding_grouped"]
        if figures["padding"] is not None:
            console.print(f"  padding: {figures['padding']:.0%} of a micro-batch's tokens shuffled"
                          + (f", {grouped:.0%} with data.group_by_length" if grouped is not None else ""))
    skipped = sum(report["skipped"].values())
    if skipped / max(1, n) > 0.5:
        console.print(f"[bold red]warning[/]: {skipped:,} of {n:,} sampled items would be skipped at max_length "
                      f"{max_length:,}: most of the data would not train")
    for reason, count in report["skipped"].items():
        console.print(f"  [yellow]skipped[/]: {count:,} of {n:,} ({count / n:.0%}): {reason}")
    if report["cut"]:
        console.print(f"  [yellow]cut[/]: {report['cut']:,} of {n:,} ({report['cut'] / n:.0%}) lose trailing turns")
    if report["fits_99"] is None:
        return
    if (skipped + report["cut"]) / max(1, n) > 0.01:
        lines = [r["set"] for r in report.get("resolution", {}).values() if r["set"]]
        console.print(f"  99% of the sample fits whole with [bold]--set data.max_length={report['fits_99']}[/]"
                      + (f", or at this max_length with a lower image resolution: [bold]{' '.join(lines)}[/]" if lines
                         else " (or lower the image resolution: \\[teacher.processor] / \\[student.processor])"))
        for side, r in report.get("resolution", {}).items():
            if r["set"] is None:
                console.print(f"  no {r['key']} of the {side}'s makes 99% of its items fit max_length {max_length:,}")
    else:
        console.print(f"  99% of the sample fits whole (the longer side's p99: {report['fits_99']:,} tokens)")
