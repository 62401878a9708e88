"""Quick validation accuracy by greedy generation, for the before/after table of `genrecal distill`.

Benchmarks proper go through lm-eval (`genrecal eval`); this is the cheap in-process check a
training run prints. Every process answers its share of the items and the results are gathered,
so no process waits while another one generates. How an answer is scored is handed in (the
shapes data brings its own scorer); by default, normalised exact match with the item's last answer.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from ..data.formats import Conversation, detect, text_of, to_conversation
from ..data.sources import SkipItem, image_root, open_image
from ..recipe import DataSpec
from .parallel import gather_objects

# (prediction, row, reference answer) -> (right or wrong, the groups the item counts in, e.g. ["form:short"])
Scorer = Callable[[str, Mapping, str], tuple[bool, list[str]]]

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed: " Top-left." -> "top left"."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match() -> Scorer:
    """The default scorer: normalised exact match with the reference (the last answer), no groups."""

    def score(prediction: str, row: Mapping, reference: str) -> tuple[bool, list[str]]:
        return normalise(prediction) == normalise(reference), []

    return score


@dataclass
class Accuracy:
    """Share of items answered right, overall and by group (answer form, question kind)."""

    correct: int = 0
    total: int = 0
    by_group: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (question, reference, prediction)
    skipped: int = 0  # items left out: their images could not be read

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def group(self, name: str) -> float:
        c, t = self.by_group.get(name, (0, 0))
        return c / t if t else float("nan")

    def to_dict(self) -> dict:
        out = {"accuracy": self.value, "n": self.total, "groups": {k: v[0] / v[1] for k, v in sorted(self.by_group.items())}}
        return {**out, "skipped": self.skipped} if self.skipped else out


def generate_answers(vlm, prompts: list[Conversation], images: list[list], *, max_new_tokens=48, batch_size=16,
                     synced: bool = False) -> list[str]:
    """Greedy answers of `vlm` (a models.VLM) to each conversation (everything before the answer
    it should give; images: each one's opened images), with its own chat template.

    `synced` (a model sharded over the processes, whose every forward is collective): every
    process makes the same number of `generate` calls (one with fewer prompts makes throwaway
    calls on a one-token text) and each call runs until every process's answers are done."""
    processor, tok = vlm.processor, vlm.tokenizer
    device = next(vlm.model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # Rows with images and rows without go in separate calls: processors take images for all or none.
    calls = []
    for s in range(0, len(prompts), batch_size):
        chunk = range(s, min(s + batch_size, len(prompts)))
        calls += [group for group in ([i for i in chunk if images[i]], [i for i in chunk if not images[i]]) if group]
    if synced:
        import torch.distributed as dist

        most = torch.tensor([len(calls)], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        calls += [None] * (int(most) - len(calls))
    answers: dict[int, str] = {}
    old_side = tok.padding_side
    tok.padding_side = "left"  # generation continues each row from its last token
    try:
        for group in calls:
            if group is None:  # a throwaway call that keeps this process in step with the others
                inputs = tok(["?"], return_tensors="pt").to(device)
            else:
                texts = [processor.apply_chat_template(prompts[i].messages, add_generation_prompt=True, tokenize=False)
                         for i in group]
                kwargs = {"images": [images[i] for i in group]} if images[group[0]] else {}
                inputs = processor(text=texts, padding=True, return_tensors="pt", **kwargs).to(device)
            # (a sharded model: no_grad, as inference tensors in FSDP's gathered buffers would be
            # refused by training's in-place gathers later)
            with torch.no_grad() if synced else torch.inference_mode():
                out = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                         synced_gpus=synced)
            if group is not None:
                new = out[:, inputs["input_ids"].shape[1]:]
                for i, text in zip(group, tok.batch_decode(new, skip_special_tokens=True)):
                    answers[i] = text.strip()
    finally:
        tok.padding_side = old_side
    return [answers[i] for i in range(len(prompts))]


def accuracy(vlm, items, *, spec: DataSpec | None = None, accelerator=None, score: Scorer | None = None,
             max_samples=3, **generate) -> Accuracy:
    """Generate the last answer of every item (any layout of data.formats, given all turns before
    it) and score it; with an `accelerator`, process r answers items r, r+N, ...

    Every process returns the same, complete Accuracy. Items whose images cannot be read are
    left out and counted in `skipped`."""
    spec = spec or DataSpec()
    score = score or exact_match()
    fmt = detect(items.column_names, spec)
    root = image_root(spec) if spec.source != "shapes" else None
    rank, n_proc = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    assigned, prompts, images, references, skipped = [], [], [], [], 0
    for i in range(rank, len(items), n_proc):
        prompt, reference = to_conversation(items[i], fmt, spec, i).prompt_and_reference()
        try:
            images.append([open_image(v, root) for v in prompt.images])
        except SkipItem:
            skipped += 1
            continue
        assigned.append(i)
        prompts.append(prompt)
        references.append(reference)
    predictions = generate_answers(vlm, prompts, images, **generate) if assigned or generate.get("synced") else []
    results = []
    for i, prompt, reference, pred in zip(assigned, prompts, references, predictions):
        ok, groups = score(pred, items[i], reference)
        question = next(text_of(m) for m in reversed(prompt.messages) if m["role"] == "user")
        results.append((i, bool(ok), list(groups), question, reference, pred))
    if accelerator is not None:
        results = gather_objects(accelerator, results)
        skipped = sum(gather_objects(accelerator, [skipped]))
    result = Accuracy(skipped=skipped)
    for _, ok, groups, question, reference, pred in sorted(results, key=lambda r: r[0]):
        result.correct += int(ok)
        result.total += 1
        for g in groups:
            result.by_group[g][0] += int(ok)
            result.by_group[g][1] += 1
        if len(result.samples) < max_samples:
            result.samples.append((question, reference, pred))
    return result
