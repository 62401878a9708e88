"""A model's processor saved the way its checkpoint shipped it: the source's own processor files,
with no `auto_map` entry naming a module the folder does not hold."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import ProcessorMixin

# The files that make a checkpoint's processor: tokenizer, image processor, chat template.
PROCESSOR_FILES = (
    "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
_AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def processor_files(source: str, revision: str | None = None) -> dict[str, Path]:
    """The processor files a model source holds: a local folder's, or a hub id's cached snapshot's
    (never a download)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return {name: folder / name for name in PROCESSOR_FILES if (folder / name).is_file()}
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return {}
    found = {}
    for name in PROCESSOR_FILES:
        cached = try_to_load_from_cache(source, name, revision=revision)
        if isinstance(cached, str):
            found[name] = Path(cached)
    return found


@dataclass(frozen=True)
class SourcedProcessor:
    """A processor saved the way its checkpoint came: the source's own processor files, copied as
    they are (a real Qwen2-VL's processor_config.json keeps naming Qwen2VLProcessor, not the
    image-only class genrecal loads it with; its tokenizer and chat template stay byte for byte),
    where the source has them; else what `save_pretrained` writes (e.g. a processor built in
    memory). An `auto_map` entry whose module file the folder does not hold is dropped."""

    processor: ProcessorMixin
    source: str
    revision: str | None = None
    settings: dict = field(default_factory=dict)  # the recipe's image settings, written over the copied files

    def save_pretrained(self, folder: str | Path) -> None:
        import shutil

        folder = Path(folder)
        self.processor.save_pretrained(folder)
        own = processor_files(self.source, self.revision)
        if "tokenizer_config.json" in own:  # a checkpoint's own processor: exactly its files
            for name in PROCESSOR_FILES:
                if name in own:
                    shutil.copyfile(own[name], folder / name)
                elif (folder / name).exists():
                    (folder / name).unlink()
            write_settings(folder, self.settings)
        source_dir = Path(self.source).expanduser()
        drop_dangling_auto_map(folder, source_dir if source_dir.is_dir() else None)


def write_settings(folder: Path, settings: dict) -> None:
    """The recipe's image settings written into a saved processor's image-processor entries
    (preprocessor_config.json, and processor_config.json's "image_processor"), so that the
    model loads seeing images as it was trained to."""
    import json

    if not settings:
        return
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        config = json.loads(path.read_text())
        target = config if name == "preprocessor_config.json" else config.get("image_processor")
        if isinstance(target, dict):
            target.update(settings)
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def drop_dangling_auto_map(folder: Path, source_dir: Path | None = None) -> None:
    """Make every `auto_map` in `folder`'s configs name only modules the folder holds: a module
    the source folder has is copied along, an entry whose module is nowhere is dropped (loading
    it would fail looking for code that is not there)."""
    import json
    import shutil

    for name in _AUTO_MAP_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if not isinstance(auto_map, dict):
            continue
        kept = {}
        for key, ref in auto_map.items():
            refs = [r for r in (ref if isinstance(ref, list) else [ref]) if isinstance(r, str)]
            modules = [r.split("--")[-1].rsplit(".", 1)[0] for r in refs]
            for module in modules:
                if not (folder / f"{module}.py").is_file() and source_dir is not None \
                        and (source_dir / f"{module}.py").is_file():
                    shutil.copyfile(source_dir / f"{module}.py", folder / f"{module}.py")
            if all("--" not in r for r in refs) and all((folder / f"{m}.py").is_file() for m in modules):
                kept[key] = ref
        if kept == auto_map:
            continue
        if kept:
            data["auto_map"] = kept
        else:
            data.pop("auto_map")
        path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
