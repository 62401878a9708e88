"""Per-family adapters: where each architecture keeps its parts, plus image-only processors for
the families whose stock processor also wants a video processor (which needs torchvision, absent
here and never installed). Importing this module registers them with AutoProcessor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import (
    AutoProcessor,
    InternVLConfig,
    InternVLProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLProcessor,
)


class _ImageOnly:
    """Mixin: a family processor without its video processor, saved so that plain transformers
    can load it too.

    The stock Qwen2-VL, Qwen2.5-VL and InternVL processors take a video processor, and loading
    one needs torchvision. Dropping `video_processor` from `__init__`'s signature is what removes
    it: transformers derives a processor's parts from that signature.

    On save, `processor_class` never names this class: a process without genrecal imported
    would not find it and AutoProcessor would silently hand back the bare tokenizer. It names
    `plain_class`, an image-only processor shipped with transformers that expands image tokens
    the same way, so `AutoProcessor.from_pretrained(folder)` works without genrecal (e.g. under
    `lm_eval --model hf-multimodal`); tests/test_models.py checks both give the same inputs.
    Where the tokenizer lacks what `plain_class` reads, it names the stock class, which fails
    loudly without torchvision instead.
    """

    plain_class: str

    def _plain_loadable(self) -> bool:
        return True

    def _plain_kwargs(self) -> dict[str, Any]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self._plain_loadable():
            out["processor_class"] = self.plain_class
            out.update(self._plain_kwargs())
        else:
            stock = next(c for c in type(self).__mro__ if c.__module__.startswith("transformers."))
            out["processor_class"] = stock.__name__
        return out


class _QwenImageOnly(_ImageOnly):
    # PaddleOCRVLProcessor is Qwen2-VL's processor minus video: same image processor, one
    # image token repeated (grid_t * grid_h * grid_w) / merge_size**2 times.
    plain_class = "PaddleOCRVLProcessor"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The stock __init__ passes video_processor=None on as a third part; transformers pairs
        # parts with the names in our signature, so that None is dropped.
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def _plain_loadable(self) -> bool:
        # PaddleOCRVLProcessor reads the image token off the tokenizer (a named special token).
        return getattr(self.tokenizer, "image_token", None) == self.image_token


class Qwen2VLImageOnlyProcessor(_QwenImageOnly, Qwen2VLProcessor):
    pass


class Qwen2_5_VLImageOnlyProcessor(_QwenImageOnly, Qwen2_5_VLProcessor):
    pass


class InternVLImageOnlyProcessor(_ImageOnly, InternVLProcessor):
    # QianfanOCRProcessor expands a placeholder to <img> + image_seq_length x <IMG_CONTEXT> + </img>
    # exactly like InternVL's; InternVL's chat template writes <IMG_CONTEXT> as the placeholder.
    plain_class = "QianfanOCRProcessor"

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length, chat_template, **kwargs)

    def _plain_kwargs(self) -> dict[str, Any]:
        return {"image_placeholder_token": self.image_token}


# Registered so that, in any process that imported this module, AutoProcessor picks these for a
# folder whose processor_config.json names no class (it then falls back to the class
# tokenizer_config.json names, ours, or to the config's model type).
for _config, _processor in (
    (Qwen2VLConfig, Qwen2VLImageOnlyProcessor),
    (Qwen2_5_VLConfig, Qwen2_5_VLImageOnlyProcessor),
    (InternVLConfig, InternVLImageOnlyProcessor),
):
    AutoProcessor.register(_config, _processor, exist_ok=True)


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its parts, as attribute paths under `model.model`."""

    name: str
    vision_encoder: str
    vision_projector: str
    language_model: str
    image_token_attr: str  # config attribute holding the image token id
    processor: type | None = None  # image-only processor class; None: AutoProcessor's choice


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # In Qwen2-VL the projector (the patch merger) lives inside the vision encoder module:
        # freeze the encoder first, then unfreeze the projector.
        Family("qwen2_vl", "visual", "visual.merger", "language_model", "image_token_id", Qwen2VLImageOnlyProcessor),
        Family(
            "qwen2_5_vl", "visual", "visual.merger", "language_model", "image_token_id", Qwen2_5_VLImageOnlyProcessor
        ),
        Family("llava", "vision_tower", "multi_modal_projector", "language_model", "image_token_index"),
        Family(
            "internvl",
            "vision_tower",
            "multi_modal_projector",
            "language_model",
            "image_token_id",
            InternVLImageOnlyProcessor,
        ),
        Family("idefics3", "vision_model", "connector", "text_model", "image_token_id"),
    )
}
