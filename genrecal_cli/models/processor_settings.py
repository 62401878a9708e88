"""`[teacher.processor]` / `[student.processor]`: one side's image settings (resolution, tiling),
set on its loaded processor once checked against what that processor accepts, then written into
the processor files its checkpoints (the exported student too) save.

Each key is one of the image processor's own settings (transformers lists them in its
`valid_kwargs`: Qwen2-VL's `min_pixels` / `max_pixels`, InternVL's `max_patches`, Idefics3's
`do_image_splitting` and `max_image_size`, any processor's `size`). It is set on the image
processor, which every call then reads, and saved with it. A key the processor's own call
defaults override (InternVL's `crop_to_patches`) would not last past the call: it is refused,
naming what to set instead.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import RecipeError, first_line

NOT_SETTINGS = ("return_tensors", "device", "data_format", "input_data_format")  # per call, not the model's
PIXEL_BOUNDS = {"min_pixels": "shortest_edge", "max_pixels": "longest_edge"}  # Qwen2-VL: kept in `size`


@dataclass(frozen=True)
class ProcessorSettings:
    """A recipe's settings for one side's processor, with where they come from (for errors)."""

    values: Mapping[str, Any] = field(default_factory=dict)
    key: str = "processor"  # "teacher.processor" or "student.processor"
    origin: str = "<memory>"  # the recipe file

    @classmethod
    def of(cls, recipe, role: str) -> "ProcessorSettings":
        return cls(dict(getattr(recipe, role).processor), f"{role}.processor", recipe.origin)


def accepted(processor) -> set[str]:
    """The settings `processor` takes: its image processor's own keys, less what is per call and
    what the processor's call defaults override."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return set()
    names = set(getattr(type(image_processor), "valid_kwargs", dict).__annotations__) or set(
        getattr(image_processor, "_valid_kwargs_names", ()))
    return names - set(NOT_SETTINGS) - set(_call_defaults(processor))


def _call_defaults(processor) -> dict[str, Any]:
    defaults = getattr(type(processor), "images_kwargs", None)
    return dict(defaults) if isinstance(defaults, dict) else {}


def apply_settings(processor, settings: ProcessorSettings) -> dict[str, Any]:
    """Set every setting on `processor`'s image processor (in place). Returns the image
    processor's saved entries that changed, with the settings themselves: what a saved copy of
    the source's processor files must carry. Raises RecipeError naming each bad key (with a
    did-you-mean) or the settings the processor refuses."""
    if not settings.values:
        return {}
    keys = accepted(processor)
    problems = []
    for name in settings.values:
        if name in keys:
            continue
        where = f"{settings.key}.{name}"
        if name in _call_defaults(processor):
            problems.append(f"{where}: {type(processor).__name__} sets `{name}` itself on every call, so a "
                            "setting would not last; use the other keys (e.g. max_patches = 1 for no tiles)")
            continue
        near = difflib.get_close_matches(name, sorted(keys), n=1, cutoff=0.6)
        hint = f"did you mean `{near[0]}`?" if near else f"this processor takes: {', '.join(sorted(keys)) or 'nothing'}"
        problems.append(f"unknown key `{where}` for {type(processor.image_processor).__name__}; {hint}")
    if problems:
        raise RecipeError(settings.origin, problems)
    image_processor = processor.image_processor
    before = image_processor.to_dict()
    for name, value in settings.values.items():
        bound = PIXEL_BOUNDS.get(name)
        size = getattr(image_processor, "size", None)
        if bound and _get(size, bound) is not None:  # Qwen2-VL reads its pixel bounds from `size`
            image_processor.size = _replace(size, bound, value)
        else:
            setattr(image_processor, name, value)
    try:  # the settings must work: one small image through the processor
        from PIL import Image

        image_processor(images=[Image.new("RGB", (64, 48))], return_tensors="pt")
    except Exception as exc:  # what the processor says of a wrong value
        raise RecipeError(settings.origin, [f"{settings.key}: {type(image_processor).__name__} refuses these settings "
                                            f"({first_line(exc)})"]) from None
    after = image_processor.to_dict()
    changed = {k: v for k, v in after.items() if before.get(k) != v}
    return {**changed, **settings.values}


def _get(size, key: str):
    """An entry of an image processor's `size` (a dict, or transformers' SizeDict dataclass)."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _replace(size, key: str, value):
    return {**size, key: value} if isinstance(size, dict) else dataclasses.replace(size, **{key: value})


def current_value(image_processor, key: str):
    """What `key` is on an image processor now (Qwen2-VL's pixel bounds: from its `size`)."""
    bound = PIXEL_BOUNDS.get(key)
    if bound is not None and _get(getattr(image_processor, "size", None), bound) is not None:
        return _get(image_processor.size, bound)
    return getattr(image_processor, key, None)
