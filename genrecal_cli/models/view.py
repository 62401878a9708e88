"""A loaded VLM seen as GenRecal's four parts (vision encoder, vision projector, body up to the
final norm, head), plus what data and losses need to know of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from .families import FAMILIES, Family
from .saving import SourcedProcessor


@dataclass
class VLM:
    """A loaded VLM seen as GenRecal's four parts, plus what data and losses need to know."""

    model: PreTrainedModel
    processor: ProcessorMixin
    family: str
    path: str
    revision: str | None = None
    processor_settings: dict[str, Any] = field(default_factory=dict)  # the recipe's, as saved (processor_settings.py)

    @property
    def exportable_processor(self) -> "SourcedProcessor":
        """What a checkpoint or the exported student saves as this model's processor."""
        return SourcedProcessor(self.processor, self.path, self.revision, dict(self.processor_settings))

    @property
    def _family(self) -> Family:
        return FAMILIES[self.family]

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    @property
    def head_rows(self) -> int:
        """Rows of the head's weight: the logits' last dimension (may differ from vocab_size)."""
        return self.head.weight.shape[0]

    @property
    def input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    @property
    def vision_encoder(self) -> torch.nn.Module:
        return self.model.model.get_submodule(self._family.vision_encoder)

    @property
    def vision_projector(self) -> torch.nn.Module:
        return self.model.model.get_submodule(self._family.vision_projector)

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.get_submodule(self._family.language_model)

    @property
    def decoder_layer_class(self) -> type:
        return type(self.language_model.layers[0])

    @property
    def image_token(self) -> str:
        return self.processor.image_token

    @property
    def image_token_id(self) -> int:
        return int(getattr(self.model.config, self._family.image_token_attr))

    def image_tokens_per_image(self, size: tuple[int, int] | None = None) -> int:
        """How many image tokens (the slots vision features fill; not wrappers such as InternVL's
        <img>) one image of `size` (height, width) expands to; None: the processor's own size."""
        height, width = size or _default_image_size(self.processor.image_processor)
        placeholder = _placeholder(self)
        ids = self.processor(images=[Image.new("RGB", (width, height))], text=[placeholder])["input_ids"][0]
        return sum(1 for i in ids if i == self.image_token_id)

    def blank_image_inputs(self) -> dict[str, Any]:
        """What the processor gives for one small blank image, minus the text: the inputs of
        `image_features`, for a pass through the vision side on a batch without images."""
        height, width = _default_image_size(self.processor.image_processor)
        out = self.processor(images=[[Image.new("RGB", (width, height))]], text=[_placeholder(self)], return_tensors="pt")
        return {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")}

    def image_features(self, **image_inputs) -> list[torch.Tensor]:
        """The vision encoder and projector's output for processor image inputs, as tensors."""
        return image_features(self.model, **image_inputs)

    def body(self, **inputs) -> torch.Tensor:
        """Last hidden states after the final norm, [B, T, H]: `head(body(**x))` is `model(**x).logits`."""
        return self.model.model(**inputs).last_hidden_state


def image_features(model, **image_inputs) -> list[torch.Tensor]:
    """`model` (an ...ForConditionalGeneration) vision encoder and projector's output, as tensors."""
    out = model.model.get_image_features(**image_inputs)
    found, todo = [], [out]
    while todo:  # a tensor, a tuple or list of them, or a ModelOutput holding them
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
        elif hasattr(x, "values"):
            todo.extend(v for v in x.values() if v is not None)
    return found


def _default_image_size(image_processor) -> tuple[int, int]:
    """The square size the processor resizes to; for dynamic-resolution processors (Qwen2-VL),
    the largest square within max_pixels."""
    size = dict(image_processor.size or {})
    if "height" in size and "width" in size:
        return size["height"], size["width"]
    max_pixels = getattr(image_processor, "max_pixels", None)
    if max_pixels:
        side = int(max_pixels**0.5)
        return side, side
    edge = size.get("shortest_edge") or size.get("longest_edge")
    return edge, edge


def _placeholder(vlm: VLM) -> str:
    """The text an image stands for before the processor expands it (as the chat template writes it)."""
    if vlm.family in ("qwen2_vl", "qwen2_5_vl"):
        return f"<|vision_start|>{vlm.image_token}<|vision_end|>"
    return vlm.image_token
