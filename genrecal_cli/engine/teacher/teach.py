"""`genrecal teach`: run the teacher once over a recipe's training data into a feature cache
(cache/), which any number of students, seeds or ablations then read instead of running the
teacher again.

The items are rendered as in training (both sides: max_length drops the same trailing turns on
both, so the student's processor is read too, not its weights), in the split's order, in loader
workers; the teacher runs under the recipe's compute precision. A killed run resumes: finished
shards that pass their checks (size, header, every item's checksum) are kept, a damaged one is
removed, and only the items not in a kept shard are computed. At the end the index gets its
completion record: until then the cache is refused as unfinished.

On several processes (torchrun / accelerate launch) the batches still to compute are dealt
round-robin; each process writes its own shards and partial index, merged by the main process
at the end. Under parallel.teacher = "shard" the teacher is sharded as in distill (FSDP2, only
the main process reads its weights) and every process runs its forward the same number of
times: a process whose batch is empty (its share ran out, or every item was skipped) runs the
forward on a stand-in batch and keeps nothing from it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from ...data.loader import PairDataset, default_workers
from ...data.render import is_answer, is_question
from ...errors import GenrecalError
from ...recipe import Recipe
from ..losses import TopK
from ..parallel import device_mesh, shard_teacher, teacher_sharded
from .cache import CacheWriter, complete, fingerprint, merge_index, split_items
from .cache.format import answers_form, rows_form
from .features import head_fn, teacher_features


def teach(recipe: Recipe, inputs, accelerator, *, folder: str | Path, storage: str = "bf16",
          with_question: bool = True, batch_size: int = 16, items_per_shard: int = 1024,
          progress: Callable[[int, int], None] | None = None, note: Callable[[str], None] | None = None,
          command: str | None = None, top_k: int | None = None, answer_ids: bool = False) -> Path:
    """Write (or complete) the cache in `folder`; `progress(done, total)` after every batch (this
    process's items: the main process's share on several), `note(text)` for what the user should
    know (a resumed cache, damaged shards); `command`, the command line that writes it, is
    recorded in the index for the message that refuses it while unfinished. `top_k`: keep the
    teacher's K most likely ids and their log-probabilities at loss.temperature per answer token
    instead of its rows (a top-K cache, ~K x 6 bytes against 2 x hidden bytes per token).
    `answer_ids` (answer_input = "embeddings" only): keep no answer inputs, only the answer ids
    (an id-only cache; the reader looks them up in the teacher's input embeddings)."""
    from accelerate.utils import send_to_device

    from ...data.loader import pair_loader, raise_carried
    from ...models import ProcessorSettings, load_vlm

    check_answers_form(recipe, answer_ids)
    if not hasattr(inputs.train, "__len__"):
        raise GenrecalError("genrecal teach needs a data set read whole (data.streaming = false)")
    sharded = teacher_sharded(recipe, accelerator)
    teacher = load_vlm(inputs.teacher, revision=recipe.teacher.revision, dtype=recipe.teacher.dtype,
                       trust_remote_code=recipe.teacher.trust_remote_code,
                       empty=sharded and not accelerator.is_main_process,
                       settings=ProcessorSettings.of(recipe, "teacher"))
    teacher.model.requires_grad_(False)
    vocab = teacher.head.weight.shape[0]
    if top_k is not None and not 1 <= top_k <= vocab:
        raise GenrecalError(f"--rows topk:{top_k}: K must be between 1 and the teacher's vocabulary ({vocab:,})")
    if sharded:
        shard_teacher(teacher, accelerator, device_mesh(accelerator, recipe.parallel.shard_group))
    else:
        teacher.model.to(accelerator.device)
    student = load_vlm(inputs.student, revision=recipe.student.revision,
                       trust_remote_code=recipe.student.trust_remote_code, empty=True,  # its processor only
                       settings=ProcessorSettings.of(recipe, "student"))
    sides = {"teacher": teacher.processor, "student": student.processor}
    dataset = PairDataset(inputs.train, recipe.data, sides)
    dataset.check_start()
    rows = rows_form(top_k)
    writer = CacheWriter(folder, fingerprint(recipe, inputs.teacher, inputs.held_out, rows), storage=storage,
                         with_question=with_question, rows=rows, answers=answers_form(answer_ids),
                         items_per_shard=items_per_shard, hidden_size=teacher.hidden_size,
                         part=accelerator.process_index, parts=accelerator.num_processes, command=command)
    # What an earlier run wrote is checked (each process a share of the shards) before anyone
    # writes; every process drops every damaged shard, so all agree on what is left to do.
    damaged = writer.check(accelerator.process_index, accelerator.num_processes)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        damaged = gather_object(damaged)
    writer.drop(line.split(":")[0] for line in damaged)
    done = writer.done
    accelerator.wait_for_everyone()  # every process knows what is done before any writes
    if note is not None:
        for line in damaged:
            note(f"damaged shard {line}: removed, its items are computed again")
        if done:
            note(f"resuming: {len(done):,} of {len(dataset):,} items already in the cache {folder}")
    todo = [i for i in range(len(dataset)) if i not in done]
    batches = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]
    n, rank = accelerator.num_processes, accelerator.process_index
    assigned = batches[rank::n]
    if sharded:  # the same number of (collective) forwards on every process
        assigned += [[]] * (-(-len(batches) // n) - len(assigned))
        stand_in = _stand_in(dataset, sides)
    workers = recipe.data.num_workers
    if workers is None:
        workers = default_workers(1, on_gpu=accelerator.device.type == "cuda")
    loader = pair_loader(dataset, assigned, sides, workers, accelerator.device.type == "cuda")
    seen, total = len(done), len(done) + sum(map(len, assigned))
    if progress is not None:
        progress(seen, total)
    for batch in loader:
        raise_carried(batch)
        seen += len(batch["data"].skipped) + batch["items"]
        keep = batch["items"] > 0
        forward = _anyone(accelerator, keep) if sharded else keep  # sharded: every process, every round
        if forward:
            if not keep:
                batch = stand_in  # this process runs the forward with the others and keeps nothing
            batch = send_to_device(batch, accelerator.device)
            with accelerator.autocast():
                features = teacher_features(teacher, batch["teacher"], recipe.recalibrator.answer_input)
                if top_k is not None:
                    top = TopK.of(head_fn(teacher.head), features.rows, top_k, recipe.loss.temperature)
                    features = replace(features, rows=top)
            if keep:
                for key, item in zip(batch["keys"], split_items(features, with_question, answer_ids)):
                    writer.add(key, item)
        if progress is not None:
            progress(seen, total)
    writer.flush()
    writer.write_index()  # also where nothing was left to write: the damaged shards are no longer listed
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        merge_index(folder)
        record = complete(folder, len(dataset))
        if note is not None and record["skipped"]:
            note(f"{record['skipped']:,} of {record['items']:,} items not cached: they do not fit data.max_length "
                 "(training skips them too)")
    accelerator.wait_for_everyone()
    return Path(folder)


def check_answers_form(recipe: Recipe, answer_ids: bool) -> None:
    """An id-only cache serves the answer input "embeddings" only: z_al ("hidden") is not a
    function of the ids."""
    if answer_ids and recipe.recalibrator.answer_input != "embeddings":
        raise GenrecalError(f"--answers ids: the recipe's recalibrator.answer_input is "
                            f"{recipe.recalibrator.answer_input!r}; ids serve \"embeddings\" only (z_al must be stored)")


def _anyone(accelerator, value: bool) -> bool:
    """Whether `value` is true on any process (an all-reduce: every process calls it)."""
    import torch

    flag = torch.tensor([float(value)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _stand_in(dataset: PairDataset, sides) -> dict:
    """A one-item batch (the data's first usable item) for a forward whose result is dropped."""
    from ...data.loader import Collator, Item

    item = next((m for m in dataset.first() if isinstance(m, Item)), None)
    if item is None:
        raise GenrecalError(f"{dataset.spec.source}: no usable item to cache")
    return Collator(sides)([item])


def plan_size(recipe: Recipe, inputs, *, storage: str = "bf16", sample: int = 64, top_k: int | None = None,
              answer_ids: bool = False) -> dict:
    """The cache's size for the recipe's data, before anything runs: the first `sample` items
    rendered through both processors (no model runs) give the teacher's answer and question
    tokens per item; times the items, times the hidden size and the storage's bytes
    (cache.size_estimate). `choices`: the same for every storage dtype, rows full and top-K (the
    chosen K, else 32) and, under answer_input = "embeddings", answers as features and as ids."""
    import itertools

    from ...data.loader import Item
    from ...models import ProcessorSettings, load_vlm
    from .cache import size_estimate

    teacher = load_vlm(inputs.teacher, revision=recipe.teacher.revision,
                       trust_remote_code=recipe.teacher.trust_remote_code, empty=True,
                       settings=ProcessorSettings.of(recipe, "teacher"))
    student = load_vlm(inputs.student, revision=recipe.student.revision,
                       trust_remote_code=recipe.student.trust_remote_code, empty=True,
                       settings=ProcessorSettings.of(recipe, "student"))
    dataset = PairDataset(inputs.train, recipe.data, {"teacher": teacher.processor, "student": student.processor})
    usable = [m for m in itertools.islice(dataset.first(), sample) if isinstance(m, Item)]
    if not usable:
        raise GenrecalError(f"{recipe.data.source}: the first {sample} items were all skipped; nothing to cache")
    segments = [m.sides["teacher"].segment for m in usable]
    answer = sum(sum(bool(is_answer(t)) for t in s) for s in segments) / len(usable)
    question = sum(sum(bool(is_question(t)) for t in s) for s in segments) / len(usable)
    items = len(dataset)
    hidden, tokens = teacher.hidden_size, (round(answer * items), round(question * items))
    choices = []
    for dtype in ("fp32", "bf16", "fp8"):
        for k in (None, top_k or 32):
            for ids in ((False, True) if recipe.recalibrator.answer_input == "embeddings" else (False,)):
                choices.append({"storage": dtype, "rows": rows_form(k), "answers": answers_form(ids),
                                "bytes": size_estimate(*tokens, hidden, dtype, k, ids),
                                "bytes_per_token": size_estimate(1, 1, hidden, dtype, k, ids),
                                "chosen": (dtype, k, ids) == (storage, top_k, answer_ids)})
    return {"items": items, "answer_tokens_per_item": answer, "question_tokens_per_item": question,
            "hidden_size": hidden, "storage": storage, "rows": rows_form(top_k), "answers": answers_form(answer_ids),
            "bytes": size_estimate(*tokens, hidden, storage, top_k, answer_ids),
            "bytes_per_token": size_estimate(1, 1, hidden, storage, top_k, answer_ids), "sampled": len(usable),
            "choices": choices}
