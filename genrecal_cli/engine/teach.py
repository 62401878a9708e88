"""`genrecal teach`: run the teacher once over a recipe's training data and write what align and
distill need from it into a feature cache (engine/cache.py), so that any number of students,
seeds and ablations read it instead of running the teacher again.

The items are rendered as in training (both sides: max_length drops the same trailing turns on
both, so the student's processor is read too, not its weights), in the split's order, in loader
workers; the teacher runs under the recipe's compute precision. A killed run resumes: finished
shards are kept and only the items not in them are computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..data.loader import PairDataset, default_workers
from ..errors import GenrecalError
from ..recipe import Recipe
from .cache import CacheWriter, fingerprint, split_items
from .teacher import teacher_features


def teach(recipe: Recipe, inputs, accelerator, *, folder: str | Path, storage: str = "bf16",
          with_question: bool = True, batch_size: int = 16, items_per_shard: int = 1024,
          progress: Callable[[int, int], None] | None = None, note: Callable[[str], None] | None = None) -> Path:
    """Write (or complete) the cache in `folder`; `progress(done, total)` after every batch,
    `note(text)` for what the user should know (a resumed cache)."""
    from accelerate.utils import send_to_device

    from ..data.loader import pair_loader, raise_carried
    from ..models import load_vlm

    acc = accelerator
    if acc.num_processes > 1:
        raise GenrecalError("genrecal teach runs on one process for now: start it without torchrun / accelerate launch")
    if not hasattr(inputs.train, "__len__"):
        raise GenrecalError("genrecal teach needs a data set read whole (data.streaming = false)")
    teacher = load_vlm(inputs.teacher, revision=recipe.teacher.revision, dtype=recipe.teacher.dtype,
                       trust_remote_code=recipe.teacher.trust_remote_code)
    teacher.model.requires_grad_(False)
    teacher.model.to(acc.device)
    student = load_vlm(inputs.student, revision=recipe.student.revision,
                       trust_remote_code=recipe.student.trust_remote_code, empty=True)  # its processor only
    sides = {"teacher": teacher.processor, "student": student.processor}
    dataset = PairDataset(inputs.train, recipe.data, sides)
    dataset.check_start()
    writer = CacheWriter(folder, fingerprint(recipe, inputs.teacher), storage=storage, with_question=with_question,
                         items_per_shard=items_per_shard, hidden_size=teacher.hidden_size)
    done = writer.done
    if done and note is not None:
        note(f"resuming: {len(done):,} of {len(dataset):,} items already in the cache {folder}")
    todo = [i for i in range(len(dataset)) if i not in done]
    batches = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]
    workers = recipe.data.num_workers
    if workers is None:
        workers = default_workers(1, on_gpu=acc.device.type == "cuda")
    loader = pair_loader(dataset, batches, sides, workers, acc.device.type == "cuda")
    seen = len(done)
    if progress is not None:
        progress(seen, len(dataset))
    for batch in loader:
        raise_carried(batch)
        seen += len(batch["data"].skipped) + batch["items"]
        if batch["items"]:
            batch = send_to_device(batch, acc.device)
            with acc.autocast():
                tf = teacher_features(teacher, batch["teacher"], recipe.recalibrator.answer_input)
            for key, item in zip(batch["keys"], split_items(tf, with_question)):
                writer.add(key, item)
        if progress is not None:
            progress(seen, len(dataset))
    writer.flush()
    return Path(folder)


def plan_size(recipe: Recipe, inputs, *, storage: str = "bf16", sample: int = 64) -> dict:
    """The cache's size for the recipe's data, before anything runs: the first `sample` items
    rendered through both processors (no model runs) give the teacher's answer and question
    tokens per item; times the items, times the hidden size and the storage's bytes
    (cache.size_estimate)."""
    import itertools

    from ..data.loader import Item
    from ..models import load_vlm
    from .cache import size_estimate

    teacher = load_vlm(inputs.teacher, revision=recipe.teacher.revision,
                       trust_remote_code=recipe.teacher.trust_remote_code, empty=True)
    student = load_vlm(inputs.student, revision=recipe.student.revision,
                       trust_remote_code=recipe.student.trust_remote_code, empty=True)
    dataset = PairDataset(inputs.train, recipe.data, {"teacher": teacher.processor, "student": student.processor})
    met = [m for m in itertools.islice(dataset.first(), sample) if isinstance(m, Item)]
    if not met:
        raise GenrecalError(f"{recipe.data.source}: the first {sample} items were all skipped; nothing to cache")
    segments = [m.sides["teacher"].segment for m in met]
    answer = sum(sum(1 for t in s if t >= 0 and t % 2 == 1) for s in segments) / len(met)
    question = sum(sum(1 for t in s if t >= 0 and t % 2 == 0) for s in segments) / len(met)
    items = len(dataset)
    size = size_estimate(round(answer * items), round(question * items), teacher.hidden_size, storage)
    return {"items": items, "answer_tokens_per_item": answer, "question_tokens_per_item": question,
            "hidden_size": teacher.hidden_size, "storage": storage, "bytes": size, "sampled": len(met)}
