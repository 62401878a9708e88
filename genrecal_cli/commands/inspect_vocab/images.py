"""What a VLM's processor makes of one image and one conversation, read without loading weights."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import first_line
from .source import Source


def _conversation(image: bool) -> list[dict]:
    if image:
        return [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        ]
    return [
        {"role": "user", "content": "What shape is this?"},
        {"role": "assistant", "content": "A red circle."},
    ]


def chat_template(src: Source, processor, notes: list[str]) -> str | None:
    owner = processor if processor is not None else src.tokenizer
    if owner is None or not getattr(owner, "chat_template", None):
        return None
    try:
        return owner.apply_chat_template(_conversation(processor is not None), tokenize=False)
    except Exception as e:
        notes.append(f"chat template did not render ({first_line(e)})")
        return None


def _size_dict(image_processor, attr: str) -> dict:
    size = getattr(image_processor, attr, None)
    if size is None:
        return {}
    items = size.items() if hasattr(size, "items") else vars(size).items()
    return {k: v for k, v in items if v is not None}


def _default_image_size(image_processor) -> tuple[int, int] | None:
    """The size the processor resizes to; for dynamic resolution (Qwen2-VL), the largest square within max_pixels."""
    size, crop = _size_dict(image_processor, "size"), _size_dict(image_processor, "crop_size")
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    # Qwen2-VL's size holds pixel counts: longest_edge is max_pixels
    pixels = getattr(image_processor, "max_pixels", None)
    if not pixels and hasattr(image_processor, "temporal_patch_size"):
        pixels = size.get("longest_edge")
    if pixels:
        side = int(pixels**0.5)
        return side, side
    if "height" in crop and "width" in crop:
        return int(crop["height"]), int(crop["width"])
    edge = size.get("shortest_edge") or size.get("longest_edge")
    return (int(edge), int(edge)) if isinstance(edge, int) and edge <= 4096 else None


def _load_processor(src: Source):
    """The processor, through models/families.py's image-only classes where the family has one (no torchvision)."""
    from transformers import AutoProcessor

    loader = AutoProcessor
    model_type = (src.config or {}).get("model_type")
    try:
        from ..models import FAMILIES

        if model_type in FAMILIES and FAMILIES[model_type].processor is not None:
            loader = FAMILIES[model_type].processor
    except ImportError:
        pass
    return loader.from_pretrained(str(src.folder))


def _placeholder(processor) -> str | None:
    """What the chat template writes for one image: the difference between a turn with and without it."""
    def render(content):
        return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)

    try:
        text = [{"type": "text", "text": "Q"}]
        with_image, without = render([{"type": "image"}, *text]), render(text)
    except Exception:
        return None
    i = 0
    while i < len(without) and with_image[i] == without[i]:
        i += 1
    j = 0
    while j < len(without) - i and with_image[-1 - j] == without[-1 - j]:
        j += 1
    return with_image[i : len(with_image) - j] or None


def image_info(src: Source, notes: list[str]) -> tuple[dict | None, Any]:
    """Placeholder and tokens per image, from the processor (no weights); also returns the processor."""
    try:
        processor = _load_processor(src)
    except Exception as e:
        notes.append(f"no processor: {first_line(e)}")
        return None, None
    if getattr(processor, "image_processor", None) is None:
        return None, None
    token = getattr(processor, "image_token", None) or src.roles.get("image")
    token_id = src.backend.token_to_id(token) if token else None
    placeholder = _placeholder(processor) or token
    info: dict = {"placeholder": placeholder, "image_token": token, "image_token_id": token_id,
                  "default_size": None, "tokens_default": None, "tokens_448": None}
    if token_id is None:
        notes.append("the processor names no image token")
        return info, processor
    from PIL import Image

    def count(h: int, w: int) -> int | None:
        try:
            out = processor(text=[placeholder], images=[Image.new("RGB", (w, h), (200, 30, 30))])
            return int(np.sum(np.asarray(out["input_ids"][0]) == token_id))
        except Exception as e:
            notes.append(f"a {h}x{w} image failed in the processor ({first_line(e)})")
            return None

    size = _default_image_size(processor.image_processor)
    if size is not None:
        info["default_size"] = f"{size[0]}x{size[1]}"
        info["tokens_default"] = count(*size)
    info["tokens_448"] = count(448, 448)
    return info, processor

