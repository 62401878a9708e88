"""The built-in `zoo:NAME` models: named tiny models, built on first use into the cache, and
the shipped reference teacher."""

from __future__ import annotations

from pathlib import Path

from .tiny_vlm import build_tiny_vlm
from .tokenizer import DEFAULT_STYLE


# `zoo:NAME` sources: built on first use into the cache and reused. The default pair differs in
# family, size, tokenizer and chat template, as a real teacher and student would, and its
# vision is pretrained (~98% cell accuracy, 30-40 s each on 2 CPU cores) so that training on
# shapes can use the image from the first step.
NAMED = {
    "tiny-teacher": dict(family="qwen2_vl", hidden_size=128, num_layers=4, pretrain_steps=900),
    "tiny-student": dict(family="llava", hidden_size=64, num_layers=2, pretrain_steps=900),
    **{family: dict(family=family) for family in DEFAULT_STYLE},
}
ZOO_PREFIX = "zoo:"
# Shipped trained models (package data), used as they are: the reference teacher of the demo and
# of bench/replicate.py (Qwen2-VL-style, hidden 128, 8 layers, 48x48 images; 87.3% on the shapes
# test split; how it was trained: docs/results.md section 2).
SHIPPED = {"shapes-teacher": Path(__file__).parent / "assets" / "shapes-teacher"}


def cache_dir() -> Path:
    """Where built-in models are kept: $GENRECAL_CACHE, else ~/.cache/genrecal."""
    import os

    return Path(os.environ.get("GENRECAL_CACHE", Path.home() / ".cache" / "genrecal"))


def resolve_source(source: str) -> str:
    """A `zoo:NAME` source becomes the folder of that built-in model (built if missing);
    any other source is returned unchanged."""
    if not source.startswith(ZOO_PREFIX):
        return source
    name = source[len(ZOO_PREFIX) :]
    if name in SHIPPED:
        return str(SHIPPED[name])
    if name not in NAMED:
        from ..errors import ModelLoadError

        names = [*SHIPPED, *NAMED]
        raise ModelLoadError(f"unknown built-in model {source!r}; choose one of {', '.join(ZOO_PREFIX + n for n in names)}")
    # The folder name carries a digest of how the model is built, so a cache filled by an older
    # genrecal (another size, no vision pretraining) is never mistaken for the current model.
    target = cache_dir() / "zoo" / f"{name}-{_build_digest(NAMED[name])}"
    if not (target / "config.json").exists():
        _build_atomically(target, NAMED[name])
    return str(target)


BUILD_VERSION = 2  # bump when the tokenizers, configs or pretraining of the zoo change


def _build_digest(spec: dict) -> str:
    import hashlib
    import json

    blob = json.dumps({"version": BUILD_VERSION, **spec}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def _build_atomically(target: Path, spec: dict) -> None:
    # Build into a private temporary folder and rename it into place, so that an interrupted
    # build or a second process building at the same time never leaves a half-written model.
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_tiny_vlm(spec["family"], tmp, **{k: v for k, v in spec.items() if k != "family"})
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
