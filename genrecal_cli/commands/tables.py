"""The rich tables the CLI prints: a recipe's stages, a run's accuracy before / after, benchmark
results per model and side by side."""

from __future__ import annotations


def plan_table(recipe):
    from rich.table import Table

    table = Table(title=f"recipe {recipe.origin}", show_header=True, header_style="bold")
    for col in ("stage", "steps", "lr", "batch per process", "accum"):
        table.add_column(col)
    for name in recipe.stages.enabled():
        spec = getattr(recipe.stages, name)
        length = f"{spec.steps}" if spec.steps is not None else f"{spec.epochs:g} epochs"
        table.add_row(name, length, f"{spec.lr:g} -> {spec.lr_end:g} ({spec.schedule})", str(spec.batch_size),
                      str(spec.grad_accum))
    return table


def accuracy_table(accuracy: dict, rows: str):
    from rich.markup import escape
    from rich.table import Table

    groups = sorted({g for a in accuracy.values() for g in a["groups"] if g.startswith("form:")})
    table = Table(title=f"accuracy on {escape(rows)} (greedy answers)", header_style="bold")
    for col in ("model", "accuracy", "n", *[g.split(":", 1)[1] for g in groups]):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, a in accuracy.items():
        table.add_row(name, f"{a['accuracy']:.1%}", str(a["n"]), *[f"{a['groups'].get(g, float('nan')):.0%}" for g in groups])
    return table


def results_table(model):
    from rich.table import Table

    table = Table(title=f"{model.label} ({model.seconds:.0f} s)", header_style="bold")
    for col in ("benchmark", "metric", "value", "stderr", "n"):
        table.add_column(col, justify="left" if col in ("benchmark", "metric") else "right")
    for r in model.rows:
        stderr = "-" if r["stderr"] is None else f"{r['stderr']:.4f}"
        table.add_row(r["benchmark"], r["metric"], f"{r['value']:.4f}", stderr, str(r["n"]))
    return table


def comparison_table(report):
    from rich.table import Table

    first = report.models[0].label
    table = Table(title=f"side by side (difference to {first})", header_style="bold")
    for col in ("benchmark", "metric", *(m.label for m in report.models)):
        table.add_column(col, justify="left" if col in ("benchmark", "metric") else "right")
    for row in report.comparison():
        cells = []
        for m in report.models:
            value, delta = row["values"][m.label], row["delta"].get(m.label)
            text = "-" if value is None else f"{value:.4f}"
            if delta is not None:
                text += f" ({delta:+.4f})"
            cells.append(text)
        table.add_row(row["benchmark"], row["metric"], *cells)
    return table
