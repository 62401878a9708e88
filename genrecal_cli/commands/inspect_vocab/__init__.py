"""`genrecal inspect-vocab`: load two tokenizers from whatever the user has and show how their token types differ.

Sources: a model or tokenizer folder, a hub id, a SentencePiece `.model` or a tiktoken `.tiktoken` file.
"""

from .compare import DEFAULT_TEXT, Report, SideReport, inspect_vocab
from .load import load_source, safetensors_shapes
from .render import render
from .source import Source

__all__ = [
    "DEFAULT_TEXT", "Report", "SideReport", "Source", "inspect_vocab", "load_source", "render", "safetensors_shapes",
]
