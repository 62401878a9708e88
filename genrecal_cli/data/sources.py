"""Where rows come from: a file (jsonl, json, parquet, csv), a folder of split files, a
`datasets` folder or a hub id, read as a `datasets.Dataset` (or streamed, as an
IterableDataset) with its layout checked; and images read from what a row holds."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..errors import DataError, first_line
from ..recipe import DataSpec, looks_like_hub_id
from .formats import detect


class SkipItem(Exception):
    """An item that cannot be used (unreadable image, too long); the reason is counted."""


def load_split(spec: DataSpec, split: str, held_out: int = 0):
    """One split of an external data source, layout checked, its first `held_out` rows left out
    (the accuracy table's, where the source has no validation split). The built-in data sets
    are made at the edge (commands/distill.py) and checked with `check_split`."""
    if spec.source == "shapes":
        raise DataError("data.source 'shapes' is the built-in data set: load it with genrecal_cli.commands.distill.load_rows")
    return check_split(_load_external(spec.source, split), spec, split, held_out)


def has_split(spec: DataSpec, split: str) -> bool:
    """Whether the source holds `split` apart from its other rows. A single file has no splits
    (any split name would read all of it); a folder of split files has the ones it names; a
    `datasets` folder the ones it saved. The built-in data sets and hub ids are taken at their
    word (a missing split is then the loader's error)."""
    path = Path(spec.source).expanduser()
    if spec.source in ("shapes", "chats") or not path.exists():
        return True
    if path.is_file():
        return False
    if (path / "dataset_dict.json").is_file():
        import json

        return split in json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    if (path / "dataset_info.json").is_file():  # one saved Dataset: no splits
        return False
    if not any(any(path.glob(f"*{suffix}")) for suffix in _KINDS):  # a folder with a loading script
        return True
    return any(_split_files(path, split, suffix) for suffix in _KINDS)


def load_stream(spec: DataSpec, split: str, held_out: int = 0):
    """One split of an external source as a streamed `datasets.IterableDataset` (rows read as the
    loop needs them; nothing downloaded or decoded up front), layout checked on its first row,
    its first `held_out` rows left out."""
    return check_stream(_load_external(spec.source, split, streaming=True), spec, split, held_out)


def check_stream(ds, spec: DataSpec, split: str, held_out: int = 0):
    """A stream with its layout checked on its first row, images left undecoded (they are read
    in the loader's workers), its first `held_out` rows left out, then cut to data.num_train for
    the training split."""
    columns = columns_of(ds)
    if columns is None:
        raise DataError(f"{spec.source}: split '{split}' is empty")
    detect(columns, spec)
    ds = _undecoded(ds)
    if held_out:
        ds = ds.skip(held_out)
    if spec.num_train is not None and split == spec.train_split:
        ds = ds.take(spec.num_train)
    return ds


def columns_of(ds) -> list[str] | None:
    """A split's columns; for a stream whose reader did not infer its features, its first row's
    keys (None: the stream is empty)."""
    if ds.column_names is not None:
        return list(ds.column_names)
    first = next(iter(ds.take(1)), None)
    return None if first is None else list(first)


def as_stream(ds, shards: int = 16):
    """A loaded (map-style) split as a stream of `shards` shards, for data.streaming on data that
    is already local (the built-in data sets, a `datasets` folder)."""
    return ds.to_iterable_dataset(num_shards=max(1, min(shards, len(ds))))


def _undecoded(ds):
    import datasets

    for name, feature in (ds.features or {}).items():
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return ds


def check_split(ds, spec: DataSpec, split: str, held_out: int = 0):
    """`ds` with its layout detected (raises DataError when the columns fit none), its first
    `held_out` rows left out, then cut to data.num_train for the training split."""
    detect(ds.column_names, spec)
    if held_out:
        if len(ds) <= held_out:
            raise DataError(
                f"{spec.source}: {len(ds)} rows and no '{spec.eval_split}' split: holding out train.eval_items = "
                f"{held_out} of them for the accuracy table leaves none to train on; lower train.eval_items "
                f"(0: no table) or give the data a '{spec.eval_split}' split")
        ds = ds.select(range(held_out, len(ds)))
    if spec.num_train is not None and split == spec.train_split:
        ds = ds.select(range(min(spec.num_train, len(ds))))
    if len(ds) == 0:
        raise DataError(f"{spec.source}: split '{split}' is empty")
    return ds


_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# A streamed JSON file is read in chunks of this many bytes (datasets' default is 10 MiB, and the
# first training step waits for the first chunk of every file a shuffle buffer interleaves: with
# ten 14 MiB files 11.3 s, with 1 MiB chunks 1.0 s, measured; see docs/results.md).
STREAM_JSON_CHUNK = 1 << 20


def _split_files(folder: Path, split: str, suffix: str) -> list[Path]:
    """A folder's files of one split and kind: SPLIT.jsonl, or SPLIT-00000.jsonl, ..."""
    return sorted(folder.glob(f"{split}{suffix}")) + sorted(folder.glob(f"{split}-*{suffix}"))


def _reader_options(kind: str, streaming: bool) -> dict:
    return {"chunksize": STREAM_JSON_CHUNK} if streaming and kind == "json" else {}


def _load_external(source: str, split: str, streaming: bool = False):
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_dir():  # a folder of split files: train.jsonl, validation-00001.parquet, ...
            for suffix, kind in _KINDS.items():
                files = _split_files(path, split, suffix)
                if files:
                    return datasets.load_dataset(kind, data_files={split: [str(f) for f in files]}, split=split,
                                                 streaming=streaming, **_reader_options(kind, streaming))
        if path.is_file():
            kind = _KINDS.get(path.suffix.lower())
            if kind is None:
                raise DataError(f"{source}: unsupported file type '{path.suffix}' (use .jsonl, .json, .parquet or .csv)")
            if path.stat().st_size == 0:
                raise DataError(f"{source}: the file is empty")
            return datasets.load_dataset(kind, data_files={split: str(path)}, split=split, streaming=streaming,
                                         **_reader_options(kind, streaming))
        if path.is_dir():
            if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
                loaded = datasets.load_from_disk(str(path))
                loaded = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
                return as_stream(loaded) if streaming else loaded
            return datasets.load_dataset(str(path), split=split, streaming=streaming)
        if looks_like_hub_id(source):
            return datasets.load_dataset(source, split=split, streaming=streaming)
    except DataError:
        raise
    except (KeyError, ValueError) as exc:
        if "split" in str(exc).lower() or isinstance(exc, KeyError):
            raise DataError(f"{source}: no split '{split}' ({exc})") from None
        raise DataError(f"{source}: cannot read the data ({exc})") from None
    except (ConnectionError, OSError) as exc:
        if looks_like_hub_id(source):
            raise DataError(
                f"{source}: cannot reach the hub for this data set (offline?); download it elsewhere and "
                "set data.source to the local folder or file"
            ) from None
        raise DataError(f"{source}: cannot read the data ({exc})") from None
    except Exception as exc:  # datasets raises many types for malformed files
        raise DataError(f"{source}: cannot read the data ({type(exc).__name__}: {first_line(exc)})") from None
    raise DataError(f"{source}: path not found")


def image_root(spec: DataSpec) -> str | None:
    """The folder that relative image paths refer to: data.image_root, else the local source's
    folder (a file's parent, or the folder itself)."""
    if spec.image_root:
        return str(Path(spec.image_root).expanduser())
    path = Path(spec.source).expanduser()
    if path.is_file():
        return str(path.parent)
    return str(path) if path.is_dir() else None


def open_image(value: Any, root: str | None = None):
    """A PIL RGB image from a datasets Image value, raw bytes, a {bytes, path} dict or a path
    (relative ones under `root`); SkipItem when it cannot be read."""
    from PIL import Image

    if value is None:
        return None
    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, dict):
            if value.get("bytes"):
                img = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                img = Image.open(_rooted(value["path"], root))
            else:
                raise SkipItem("image value holds neither bytes nor a path")
        elif isinstance(value, (bytes, bytearray)):
            img = Image.open(io.BytesIO(value))
        elif isinstance(value, str):
            img = Image.open(_rooted(value, root))
        else:
            raise SkipItem(f"unsupported image value of type {type(value).__name__}")
        img.load()
    except SkipItem:
        raise
    except FileNotFoundError:
        raise SkipItem("image file not found") from None
    except Exception as exc:  # PIL raises many types for broken files
        raise SkipItem(f"unreadable image ({type(exc).__name__})") from None
    return img.convert("RGB")


def _rooted(path: str, root: str | None) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() or root is None else Path(root) / p)
