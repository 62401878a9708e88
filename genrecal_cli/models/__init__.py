"""The uniform VLM view: a vision-language model loaded from a folder or hub id (`load`) and seen
the way GenRecal does (`view`), whatever its family (`families`)."""

from .families import (
    FAMILIES,
    Family,
    InternVLImageOnlyProcessor,
    Qwen2_5_VLImageOnlyProcessor,
    Qwen2VLImageOnlyProcessor,
)
from .load import DTYPES, load_head_only, load_vlm
from .processor_settings import ProcessorSettings, apply_settings
from .saving import PROCESSOR_FILES, SourcedProcessor, drop_dangling_auto_map, processor_files
from .view import VLM, image_features

__all__ = [
    "DTYPES", "FAMILIES", "PROCESSOR_FILES", "ProcessorSettings", "VLM", "Family", "apply_settings", "InternVLImageOnlyProcessor", "Qwen2VLImageOnlyProcessor",
    "Qwen2_5_VLImageOnlyProcessor", "SourcedProcessor", "drop_dangling_auto_map", "image_features", "load_head_only",
    "load_vlm", "processor_files",
]
