"""Functions the `genrecal_shapes` lm-eval task config names (lm-eval loads this file by path)."""

from __future__ import annotations

# The test split as the benchmark defines it; changing any of these is a new task version.
NUM_ITEMS = 300
SEED = 0
IMAGE_SIZE = 64
FORMS = ("short", "mc")


def load_test_split(**_metadata):
    """The benchmark's items as a DatasetDict with one `test` split (lm-eval passes the task's
    metadata as keyword arguments; none of it changes the items)."""
    import datasets

    from genrecal_cli.world.shapes import make_split

    return datasets.DatasetDict({"test": make_split("test", NUM_ITEMS, seed=SEED, image_size=IMAGE_SIZE, forms=FORMS)})


def doc_to_image(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    # The image comes before the question, as in genrecal's training conversations; hf-multimodal
    # turns "<image>" into an image part of the chat message.
    return "<image>" + doc["question"]


def process_results(doc, results):
    from genrecal_cli.world.shapes import score

    return {"acc": float(score(results[0], doc))}
