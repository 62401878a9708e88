"""One loaded tokenizer, whatever it was loaded from, with what its folder says about the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

SPECIAL_ROLES = ("bos", "eos", "pad", "unk", "image")


@dataclass
class Source:
    """One loaded tokenizer plus what its folder says about the model (sizes, image token, template)."""

    spec: str
    kind: str
    backend: Any  # tokenizers.Tokenizer, padding and truncation off
    tokenizer_class: str
    tokenizer: Any = None  # the transformers tokenizer, when loaded through transformers
    folder: Path | None = None
    roles: dict[str, str | None] = field(default_factory=dict)
    config: dict | None = None
    config_vocab_size: int | None = None
    config_vocab_key: str | None = None
    head_rows: int | None = None
    head_tensor: str | None = None
    notes: list[str] = field(default_factory=list)
    vocab: dict[str, int] | None = None  # the base vocabulary, where the loader built the model from it

    def base_vocab(self) -> dict[str, int]:
        """`token -> id` without added tokens; the loader's copy spares the ~0.1 s a 250k one takes out of Rust."""
        return self.vocab if self.vocab is not None else self.backend.get_vocab(with_added_tokens=False)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of one text (the same ids every statistic is computed from)."""
        if self.tokenizer is not None and add_special_tokens:
            return list(self.tokenizer.encode(text, add_special_tokens=True))
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def offsets(self, texts: Sequence[str]) -> list[np.ndarray]:
        """(n_i, 2) char offsets of each text's tokens, no special tokens."""
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2) for e in encs]

    @property
    def is_vlm(self) -> bool:
        if self.folder is None:
            return False
        cfg = self.config or {}
        return bool(
            "vision_config" in cfg
            or (self.folder / "preprocessor_config.json").is_file()
            or (self.folder / "processor_config.json").is_file()
        )


def own_backend(backend):
    backend.no_padding()
    backend.no_truncation()
    return backend

