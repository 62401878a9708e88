"""Quick validation accuracy by greedy generation, for the before/after table of `genrecal distill`.

Benchmarks proper go through lm-eval (`genrecal eval`); this is the cheap in-process check a
training run prints. Every process answers its share of the items and the results are gathered,
so no process waits while another one generates. How an answer is scored is handed in (the
shapes data brings its own scorer); by default, normalised exact match with the answer column.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from ..data import answer_text, conversation, open_image
from .parallel import gather_objects

# (prediction, row) -> (right or wrong, the groups the item counts in, e.g. ["form:short"])
Scorer = Callable[[str, Mapping], tuple[bool, list[str]]]

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed: " Top-left." -> "top left"."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(answer_column: str) -> Scorer:
    """The default scorer: normalised exact match with the row's answer, no groups."""

    def score(prediction: str, row: Mapping) -> tuple[bool, list[str]]:
        return normalise(prediction) == normalise(answer_text(row[answer_column])), []

    return score


@dataclass
class Accuracy:
    """Share of items answered right, overall and by group (answer form, question kind)."""

    correct: int = 0
    total: int = 0
    by_group: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (question, reference, prediction)

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def group(self, name: str) -> float:
        c, t = self.by_group.get(name, (0, 0))
        return c / t if t else float("nan")

    def to_dict(self) -> dict:
        return {"accuracy": self.value, "n": self.total, "groups": {k: v[0] / v[1] for k, v in sorted(self.by_group.items())}}


def generate_answers(vlm, items, *, image_column="image", question_column="question", max_new_tokens=48, batch_size=16) -> list[str]:
    """Greedy answers of `vlm` (a models.VLM) to each item, with its own chat template."""
    processor, tok = vlm.processor, vlm.tokenizer
    device = next(vlm.model.parameters()).device
    answers: list[str] = []
    old_side = tok.padding_side
    tok.padding_side = "left"  # generation continues each row from its last token
    try:
        for s in range(0, len(items), batch_size):
            rows = [items[i] for i in range(s, min(s + batch_size, len(items)))]
            images = [open_image(r[image_column]) for r in rows]
            prompts = [
                processor.apply_chat_template(conversation(str(r[question_column]), None, img is not None),
                                              add_generation_prompt=True, tokenize=False)
                for r, img in zip(rows, images)
            ]
            kwargs = {"images": [[img] for img in images]} if all(img is not None for img in images) else {}
            inputs = processor(text=prompts, padding=True, return_tensors="pt", **kwargs).to(device)
            with torch.inference_mode():
                out = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            new = out[:, inputs["input_ids"].shape[1]:]
            answers += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = old_side
    return answers


def accuracy(
    vlm, items, *, accelerator=None, score: Scorer | None = None, image_column="image", question_column="question",
    answer_column="answer", max_samples=3, **generate,
) -> Accuracy:
    """Generate and score every item; with an `accelerator`, process r answers items r, r+N, ...

    Every process returns the same, complete Accuracy.
    """
    score = score or exact_match(answer_column)
    rank, n_proc = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = list(range(rank, len(items), n_proc))
    predictions = generate_answers(vlm, items.select(mine), image_column=image_column,
                                   question_column=question_column, **generate) if mine else []
    results = []
    for i, pred in zip(mine, predictions):
        row = items[i]
        ok, groups = score(pred, row)
        results.append((i, bool(ok), list(groups), str(row[question_column]), answer_text(row[answer_column]), pred))
    if accelerator is not None:
        results = gather_objects(accelerator, results)
    acc = Accuracy()
    for _, ok, groups, question, reference, pred in sorted(results, key=lambda r: r[0]):
        acc.correct += int(ok)
        acc.total += 1
        for g in groups:
            acc.by_group[g][0] += int(ok)
            acc.by_group[g][1] += 1
        if len(acc.samples) < max_samples:
            acc.samples.append((question, reference, pred))
    return acc
