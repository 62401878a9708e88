"""The edge of `genrecal distill`: resolve what a recipe names into what the engine takes.

A `zoo:` model is built into the cache, a model whose `recipe` says how to make it is trained
first (a run of its own), the built-in data (`shapes` rows, `chats` conversations written to a
folder) is made, each with its own scorer, other data sources are read: the engine (`engine.distill`)
gets plain folders and rows.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

from ..errors import GenrecalError
from ..recipe import DataSpec, Recipe


def load_rows(spec: DataSpec, split: str, *, seed: int = 0, held_out: int = 0):
    """One split of the recipe's data as a `datasets.Dataset`, columns checked, its first
    `held_out` rows left out (an external source's; see `held_out`)."""
    from ..data.sources import check_split, load_split

    if spec.source == "shapes":
        from ..world.shapes import make_split

        n = spec.shapes_size if split == "train" else max(200, spec.shapes_size // 10)
        return check_split(make_split(split, n, seed=seed), spec, split)
    if spec.source == "chats":
        spec = dataclasses.replace(spec, source=str(chats_folder(spec, seed)))
    return load_split(spec, split, held_out)


def load_stream(spec: DataSpec, split: str, *, seed: int = 0, held_out: int = 0):
    """One split of the recipe's data as a stream (data.streaming); the built-in shapes data is
    made in memory first."""
    from ..data.sources import as_stream, check_stream, load_stream as stream_external

    if spec.source == "shapes":
        return check_stream(as_stream(load_rows(spec, split, seed=seed)), spec, split)
    if spec.source == "chats":
        spec = dataclasses.replace(spec, source=str(chats_folder(spec, seed)))
    return stream_external(spec, split, held_out)


def resolve_model(spec, role: str, reporter=None, accelerator=None) -> str:
    """The local folder or hub id of a model; a `zoo:` model is built, and a model whose `recipe`
    says how to make it is trained first (resuming where an earlier try stopped)."""
    from ..recipe import load_recipe
    from ..world.zoo import resolve_source

    # A zoo model is built once per machine: the local main process first, the others reuse it.
    with accelerator.local_main_process_first() if accelerator is not None else nullcontext():
        path = resolve_source(spec.path)
    if spec.recipe is None or Path(path).exists():
        return path
    if reporter is not None:
        reporter.note(f"{role} {path} does not exist yet: building it with {spec.recipe}")
    built = distill(load_recipe(spec.recipe), resume=True, reporter=reporter, accelerator=accelerator, prefix=f"{role}/")
    if not Path(path).exists():
        raise GenrecalError(f"{role}.recipe {spec.recipe} exported its student to {built.student_dir}, not to "
                            f"{role}.path {path}; make the two agree")
    return path


def built_in_data(recipe: Recipe, accelerator=None) -> Recipe:
    """The recipe with data.source "chats" (the built-in multi-turn conversations) replaced by
    the folder it is written to, built once per machine: the engine then reads it as any
    conversations folder (train.jsonl, validation.jsonl, images/)."""
    import dataclasses

    if recipe.data.source != "chats":
        return recipe
    root = chats_folder(recipe.data, recipe.train.seed, accelerator)
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, source=str(root)))


def chats_folder(spec: DataSpec, seed: int = 0, accelerator=None) -> Path:
    """The built-in conversations for `spec` (data.shapes_size training items), built if missing."""
    from ..world.chats import build_chats
    from ..world.zoo import cache_dir

    n = spec.shapes_size
    n_val = max(200, n // 10)
    root = cache_dir() / "chats" / f"train{n}-validation{n_val}-seed{seed}"
    with accelerator.local_main_process_first() if accelerator is not None else nullcontext():
        return build_chats(root, n, n_val, seed=seed)


def resolve(recipe: Recipe, reporter=None, accelerator=None, needs_teacher: bool | None = None):
    """Everything the engine needs from a recipe, resolved (engine.distill.Inputs)."""
    from ..engine.distill import Inputs

    if needs_teacher is None:
        needs_teacher = any(getattr(recipe.stages, s).enabled for s in ("align", "distill"))
    paths = {v.name: resolve_model(v.recipe.teacher, v.table, reporter, accelerator)
             for v in (recipe.teacher_views() if needs_teacher else [])}
    # several [[teachers]]: each one's model by name; one teacher: its model
    teacher, teachers = (None, paths) if recipe.several_teachers else (paths.get("teacher"), {})
    student = resolve_model(recipe.student, "student", reporter, accelerator)
    data, n_eval = recipe.data, recipe.train.eval_items
    validation, score = None, None
    held = held_out(recipe)
    if held and reporter is not None:
        reporter.note(f"data: {data.source} has no '{data.eval_split}' split: its first {held:,} rows are held out "
                      "for the accuracy table and not trained on (train.eval_items; 0 trains on every row)",
                      style="yellow")
    # the table's rows: the eval split's first eval_items, or the held-out rows of the training data
    eval_split, eval_spec = ((data.train_split, dataclasses.replace(data, num_train=None)) if held
                             else (data.eval_split, data))
    if data.streaming:
        train = load_stream(data, data.train_split, seed=recipe.train.seed, held_out=held)
        if n_eval:  # only the rows the accuracy table uses are read
            import datasets

            rows = list(load_stream(eval_spec, eval_split, seed=recipe.train.seed).take(n_eval))
            validation = datasets.Dataset.from_list(rows)
    else:
        train = load_rows(data, data.train_split, seed=recipe.train.seed, held_out=held)
        if n_eval:
            rows = load_rows(eval_spec, eval_split, seed=recipe.train.seed)
            validation = rows.select(range(min(n_eval, len(rows))))
    if validation is not None:
        if data.source == "shapes":
            from ..world.shapes import scorer as score
        elif (Path(data.source) / "chats.json").is_file():  # a folder the chats builder wrote
            from ..world.chats import scorer as score
    return Inputs(student=student, teacher=teacher, teachers=teachers, train=train, validation=validation, score=score,
                  held_out=held, validation_title=f"{len(validation)} items held out of the training data" if held
                  else f"the {data.eval_split} split")


def held_out(recipe: Recipe) -> int:
    """How many of the training data's first rows the accuracy table takes: train.eval_items
    when the data has no validation split (data.eval_split) of its own, else none. The same on
    every run and process of a recipe; `genrecal teach` and `distill` hold out the same rows."""
    from ..data.sources import has_split

    data = recipe.data
    return recipe.train.eval_items if recipe.train.eval_items and not has_split(data, data.eval_split) else 0


def teach(recipe: Recipe, folder, *, accelerator=None, **options):
    """`genrecal teach`'s pass without its display: resolve the recipe's teacher and data, then
    write the teacher-feature cache into `folder` (engine.teacher.teach.teach and its options)."""
    from ..engine.parallel import make_accelerator
    from ..engine.teacher.teach import teach as run_engine

    accelerator = accelerator or make_accelerator(recipe)
    recipe = built_in_data(recipe, accelerator)
    inputs = resolve(recipe, accelerator=accelerator, needs_teacher=True)
    return run_engine(recipe, inputs, accelerator, folder=folder, **options)


def distill(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, reporter=None, accelerator=None, prefix: str = ""):
    """`genrecal distill`: resolve the recipe, then run the engine on it."""
    from ..engine.distill import distill as run_engine
    from ..engine.parallel import make_accelerator

    accelerator = accelerator or make_accelerator(recipe)
    recipe = built_in_data(recipe, accelerator)
    inputs = resolve(recipe, reporter, accelerator)
    return run_engine(recipe, inputs, resume=resume, overwrite=overwrite, reporter=reporter,
                      accelerator=accelerator, prefix=prefix)
