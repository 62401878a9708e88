"""`genrecal teach`: write a recipe's teacher-feature cache under a progress bar, or check every
shard of one (`--verify`)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import GenrecalError


def write_cache(loaded, folder, console, *, storage: str, no_question: bool, batch_size: int, shard_items: int,
                dry_run: bool, rows: str = "full", answers: str | None = None, sample: int = 256) -> None:
    """Run the teacher of recipe `loaded` over its training data into the cache `folder`; with
    `dry_run`, state the cache's size only. `answers`: "features" or "ids" (None: ids where the
    recipe's answer input is the embeddings, else features)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from ..engine.parallel import make_accelerator
    from ..engine.teacher.teach import check_answers_form, plan_size, teach as run_teach
    from .distill import built_in_data, resolve

    top_k = parse_rows(rows)
    answer_ids = parse_answers(answers, loaded.recalibrator.answer_input)
    check_answers_form(loaded, answer_ids)
    accelerator = make_accelerator(loaded)
    loaded = built_in_data(loaded, accelerator)
    inputs = resolve(loaded, accelerator=accelerator, needs_teacher=True)
    main = accelerator.is_main_process
    if main:
        size = plan_size(loaded, inputs, storage=storage, top_k=top_k, answer_ids=answer_ids)
        answer_gb, question_gb = size["bytes"]["answer"] / 1e9, size["bytes"]["question"] / 1e9
        console.print(f"cache {folder}: {size['items']:,} items x ({size['answer_tokens_per_item']:.1f} answer + "
                      f"{size['question_tokens_per_item']:.1f} question tokens, from the first {size['sampled']}) x hidden "
                      f"{size['hidden_size']:,} in {storage}: answers {answer_gb:,.3f} GB"
                      + (f", question features {question_gb:,.3f} GB (leave them out with --no-question)"
                         if not no_question else " (question features left out: L_reg off)"))
        per = size["bytes_per_token"]
        console.print(f"per token: {per['answer']:,} bytes an answer token (rows {size['rows']}, answers "
                      f"{size['answers']}), {per['question']:,} a question token")
    if dry_run:
        if main:
            console.print(size_table(size, no_question))
            from .preflight_view import preflight_or_reason, show

            report, why = preflight_or_reason(loaded, sample, needs_teacher=True)
            if report is not None:
                show(report, console)
            else:
                console.print(f"[yellow]data preflight skipped[/]: {why}")
        return
    n = accelerator.num_processes
    with Progress("[bold]teach[/]" + (f" (process 1 of {n}'s share)" if n > 1 else ""), BarColumn(bar_width=24),
                  MofNCompleteColumn(), TimeRemainingColumn(), console=console, disable=not main) as bar:
        task = bar.add_task("teach", total=None)
        out = run_teach(loaded, inputs, accelerator, folder=folder, storage=storage, with_question=not no_question,
                        batch_size=batch_size, items_per_shard=shard_items, command=_command_line(), top_k=top_k,
                        answer_ids=answer_ids,
                        note=bar.console.print if main else None,
                        progress=lambda done, total: bar.update(task, completed=done, total=total))
    if main:
        console.print(f"[bold green]done[/]: teacher features in [bold]{out}[/]"
                      + (f" (written by {n} processes)" if n > 1 else "")
                      + f"; recipes read them with \\[teacher] cache = \"{out}\"")


def one_teacher(recipe, name: str | None):
    """The recipe as a run of the teacher whose cache `teach` writes: its one teacher, or the
    [[teachers]] table named `name` (what a distill run reads that teacher's cache with)."""
    views = recipe.teacher_views()
    if not views:
        raise GenrecalError(f"{recipe.origin}: no [teacher] table: nothing to cache")
    names = ", ".join(v.name for v in views)
    if not recipe.several_teachers:
        if name is not None:
            raise GenrecalError(f"--teacher {name}: {recipe.origin} has one [teacher]; leave --teacher out")
        return recipe
    chosen = [v.recipe for v in views if v.name == name]
    if name is None or not chosen:
        raise GenrecalError(f"{recipe.origin} has {len(views)} [[teachers]] ({names}): "
                            + ("choose whose cache to write with --teacher NAME" if name is None
                               else f"--teacher {name} is not one of them"))
    return chosen[0]


def parse_rows(rows: str) -> int | None:
    """`--rows`: "full" (the teacher's rows) -> None, "topk:K" -> K."""
    if rows == "full":
        return None
    kind, _, k = rows.partition(":")
    if kind != "topk" or not k.isdigit() or int(k) < 1:
        raise GenrecalError(f"--rows {rows}: expected `full` or `topk:K` with K a positive whole number (e.g. topk:32)")
    return int(k)


def parse_answers(answers: str | None, answer_input: str) -> bool:
    """`--answers`: "ids" -> True, "features" -> False; None: ids under answer_input "embeddings"."""
    if answers is None:
        return answer_input == "embeddings"
    if answers not in ("features", "ids"):
        raise GenrecalError(f"--answers {answers}: expected `features` or `ids`")
    return answers == "ids"


def size_table(size: dict, no_question: bool):
    """Every storage choice's bytes per token and total for the recipe's data (`--dry-run`)."""
    from rich.table import Table

    table = Table(title=f"the cache of {size['items']:,} items in each form (hidden {size['hidden_size']:,})",
                  title_justify="left")
    table.add_column("", justify="left")  # * the form this command writes
    for column in ("storage", "rows", "answers", "bytes / answer token", "bytes / question token", "answers GB",
                   "question features GB"):
        table.add_column(column, justify="right" if "bytes" in column or "GB" in column else "left")
    for c in size["choices"]:
        table.add_row("*" if c["chosen"] else "", c["storage"], c["rows"], c["answers"], f"{c['bytes_per_token']['answer']:,}",
                      f"{c['bytes_per_token']['question']:,}", f"{c['bytes']['answer'] / 1e9:,.3f}",
                      "-" if no_question else f"{c['bytes']['question'] / 1e9:,.3f}",
                      style="bold" if c["chosen"] else None)
    return table


def _command_line() -> str:
    """This command as a user would type it again (recorded in a cache's index)."""
    import shlex

    return " ".join(["genrecal", *(shlex.quote(a) for a in sys.argv[1:])])


def verify_cache(folder: Path, console) -> None:
    """`genrecal teach --verify DIR`: every item of every shard checked; the damaged shards named."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from ..engine.teacher.cache import verify

    with Progress("[bold]verify[/]", BarColumn(bar_width=24), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("verify", total=None)
        found = verify(folder, progress=lambda done, total: bar.update(task, completed=done, total=total))
    state = ("complete: {items:,} items, {cached:,} cached, {skipped:,} skipped".format(**found["complete"])
             if found["complete"] else "UNFINISHED" + (f" (finish it with `{found['command']}`)" if found["command"] else ""))
    form = found["form"]
    console.print(escape(f"{folder}: {found['shards']:,} shards, {found['items']:,} items, "
                         f"{found['bytes'] / 1e9:,.3f} GB ({form['storage']}, rows {form['rows']}, answers "
                         f"{form['answers']}); {state}"))
    for line in found["damaged"]:
        console.print(f"[red]damaged[/] {escape(line)}")
    if found["damaged"]:
        raise GenrecalError(f"{folder}: {len(found['damaged'])} damaged shard(s); run the `genrecal teach` that "
                            "wrote the cache again: it rewrites them")
    if not found["complete"]:
        raise GenrecalError(f"{folder}: every shard is intact, but the cache is unfinished")
    console.print("[bold green]intact[/]: every item passed its checksum")
