"""Reading a recipe: TOML plus `--set` overrides, built into the dataclasses of specs.py with every
problem collected, each with its full key path (an unknown key gets a did-you-mean)."""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from ..errors import RecipeError
from .specs import Recipe, StageSpec


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override (`key.path=value`) and validate a recipe; raise RecipeError listing all problems."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), [f"recipe file not found: {path}"])
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:  # its message carries "(at line L, column C)"
        raise RecipeError(str(path), [f"TOML syntax error: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise RecipeError(str(path), [f"not a UTF-8 text file ({exc.reason})"]) from None
    # A recipe that names another recipe (to build its teacher, say) names it relative to itself.
    tables = [raw.get("teacher"), raw.get("student"), *(raw.get("teachers") if isinstance(raw.get("teachers"), list) else [])]
    for table in tables:
        if isinstance(table, dict) and isinstance(table.get("recipe"), str) and not Path(table["recipe"]).is_absolute():
            table["recipe"] = str(path.parent / table["recipe"])
    return recipe_from_dict(raw, overrides, source=str(path))


def recipe_from_dict(raw: dict[str, Any], overrides=(), *, source: str = "<memory>") -> Recipe:
    """Validate plain data (as read from TOML) into a Recipe; used by load_recipe and tests."""
    problems: list[str] = []
    raw = _apply_overrides(raw, overrides, problems)
    raw = _teachers_recalibrator(raw)
    recipe = _build(Recipe, raw, "", problems)
    if problems or recipe is None:
        raise RecipeError(source, problems)
    if len(recipe.teachers) == 1:  # one [[teachers]] table is a [teacher] table
        only = recipe.teachers[0]
        if only.weight != 1.0:
            raise RecipeError(source, [f"teachers[0].weight: {only.weight:g} with one teacher would scale nothing "
                                       "(weights share the loss between several teachers); set loss.ar, loss.kl "
                                       "and loss.reg instead, or leave the weight out"])
        recipe = dataclasses.replace(recipe, teacher=only.as_model(), recalibrator=only.recalibrator, teachers=())
    return dataclasses.replace(recipe, origin=source)


def _teachers_recalibrator(raw: dict[str, Any]) -> dict[str, Any]:
    """Each [[teachers]] table's recalibrator: the recipe's [recalibrator] with its own
    [teachers.recalibrator] over it."""
    teachers, base = raw.get("teachers"), raw.get("recalibrator", {})
    if not isinstance(teachers, list) or not isinstance(base, dict):
        return raw
    merged = [{**t, "recalibrator": {**base, **t.get("recalibrator", {})}}
              if isinstance(t, dict) and isinstance(t.get("recalibrator", {}), dict) else t for t in teachers]
    return {**raw, "teachers": merged}


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.seed=3` -> (["train", "seed"], 3); the value is read as TOML, else as a plain string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} is not of the form key.path=value")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return [k.strip() for k in key.split(".")], parsed


def _apply_overrides(raw: dict[str, Any], overrides, problems: list[str]) -> dict[str, Any]:
    raw = _deep_copy(raw)
    for text in overrides:
        try:
            keys, value = parse_override(text)
        except ValueError as exc:
            problems.append(f"--set: {exc}")
            continue
        node = raw
        for k in keys[:-1]:
            if isinstance(node, list):  # an array of tables by position: teachers.1.weight
                if not (k.isdigit() and int(k) < len(node)):
                    problems.append(f"--set {text}: `{k}` is not one of the {len(node)} tables' positions (0-based)")
                    break
                node = node[int(k)]
                continue
            child = node.setdefault(k, {})
            if not isinstance(child, (dict, list)):
                problems.append(f"--set {text}: `{k}` is a value, not a table")
                break
            node = child
        else:
            if isinstance(node, dict):
                node[keys[-1]] = value  # unknown keys are reported by validation, with did-you-mean
            else:
                problems.append(f"--set {text}: give a key inside one of the tables (e.g. {'.'.join(keys)}.0.KEY)")
    return raw


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def _build(cls: type, raw: Any, key: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a TOML table, appending every problem found to `problems`."""
    where = key or "recipe"
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a table, got {_type_name(raw)} {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "origin"}
    for name in raw:
        if name not in fields:
            near = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean `{near[0]}`?" if near else f"; valid keys: {', '.join(fields)}"
            problems.append(f"unknown key `{_join(key, name)}`{hint}")
    kwargs: dict[str, Any] = {}
    ok = True
    for name, f in fields.items():
        sub = _join(key, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if _is_optional(hints[name]):
                    continue
                problems.append(f"missing required key `{sub}`")
                ok = False
            continue
        value = _convert(hints[name], raw[name], sub, problems)
        if value is _BAD:
            ok = False
        else:
            kwargs[name] = value
    if not ok:
        return None
    obj = cls(**kwargs)
    check = getattr(obj, "_check", None)
    if check is not None:  # value checks run on every table that built, so all problems surface
        check(key, problems)
    return obj


_BAD = object()


def _convert(hint: Any, value: Any, key: str, problems: list[str]) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(args[0], value, key, problems)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint_txt = f"; did you mean {near[0]!r}?" if near else ""
            problems.append(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}{hint_txt}")
            return _BAD
        return value
    if origin is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):  # an array of tables
        if isinstance(value, dict):
            problems.append(f"{key}: expected an array of tables ([[{key}]]), got one table [{key}]")
            return _BAD
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            problems.append(f"{key}: expected an array of tables ([[{key}]]), got {_type_name(value)} {value!r}")
            return _BAD
        built = [_build(typing.get_args(hint)[0], v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return _BAD if any(b is None for b in built) else tuple(built)
    if origin is tuple:  # a list of strings (a single string is a list of one)
        items = [value] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(v, str) for v in items):
            return tuple(items)
        problems.append(f"{key}: expected a list of strings, got {_type_name(value)} {value!r}")
        return _BAD
    if origin is dict:  # a table passed on as it is (a processor's settings: checked where it loads)
        if isinstance(value, dict):
            return dict(value)
        problems.append(f"{key}: expected a table, got {_type_name(value)} {value!r}")
        return _BAD
    if dataclasses.is_dataclass(hint):
        # A stage table that is present but says nothing about `enabled` means "run it".
        if hint is StageSpec and isinstance(value, dict) and "enabled" not in value:
            value = {**value, "enabled": True}
        built = _build(hint, value, key, problems)
        return _BAD if built is None else built
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema mistake, not a user mistake
        raise TypeError(f"unsupported recipe type {hint!r} at {key}")
    problems.append(f"{key}: expected {_type_name_of(hint)}, got {_type_name(value)} {value!r}")
    return _BAD


def _is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}.get(
        type(value), type(value).__name__
    )


def _type_name_of(hint: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))
