"""YAML <-> dataclass configs: OmegaConf reads and merges, a strict builder validates.

OmegaConf loads the YAML, merges ``key.sub=value`` dotlist overrides and resolves interpolations; the plain dict
it gives is then built into the dataclass recursively. Any key the dataclass does not declare is an error naming
its full path and the valid keys, so a typo fails before any work starts instead of being silently ignored. The
builder knows nothing about particular configs: it follows the type hints of whatever dataclass it is given.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vargpt.config import ConfigError, VARGPTConfig

T = TypeVar("T")


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass type inside ``hint`` (``X``, ``X | None``, ``Optional[X]``), or None."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)]
        return found[0] if len(found) == 1 else None
    return None


def _check_scalar(value: Any, hint: Any, where: str) -> None:
    """Reject a value of the wrong basic kind (a string for an int, a list for a float, ...)."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) not in allowed:
            raise ConfigError(f"{where} must not be null")
        return
    simple = [kind for kind in allowed if kind in (bool, int, float, str)]
    if not simple or len(simple) != len([a for a in allowed if a is not type(None)]):
        return
    if isinstance(value, bool):
        ok = bool in simple
    elif isinstance(value, int):
        ok = int in simple or float in simple
    else:
        ok = any(isinstance(value, kind) for kind in simple)
    if not ok:
        names = " | ".join(kind.__name__ for kind in simple)
        raise ConfigError(f"{where} must be {names}, got {value!r}")


def dataclass_from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; nested dataclass fields are built from nested mappings.

    An unknown key raises ``ConfigError`` naming ``where.key`` and the valid keys; so does a value of the wrong basic
    type. Missing keys take the dataclass defaults; ``__post_init__`` validation runs as usual.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of {cls.__name__} fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]}; valid keys of {where} ({cls.__name__}): {sorted(fields)}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        nested = _dataclass_in(hint)
        if nested is not None and isinstance(value, Mapping):
            values[key] = dataclass_from_dict(nested, value, f"{where}.{key}")
        else:
            _check_scalar(value, hint, f"{where}.{key}")
            values[key] = value
    try:
        return cls(**values)
    except TypeError as error:
        raise ConfigError(f"{where} ({cls.__name__}): {error}") from error


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain JSON/YAML-able containers (tuples become lists); inverse of the builder."""

    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(key): plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    return plain(dataclasses.asdict(config))


def config_differences(old: Any, new: Any) -> list[str]:
    """``"path: old -> new"`` for every leaf field where two configs of the same dataclass differ (dotted paths)."""
    changes: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in sorted(set(a) | set(b), key=str):
                walk(a.get(key, "<unset>"), b.get(key, "<unset>"), f"{where}.{key}" if where else str(key))
        elif a != b:
            changes.append(f"{where}: {a!r} -> {b!r}")

    walk(config_to_dict(old), config_to_dict(new), "")
    return changes


def load_yaml(path: str | os.PathLike[str], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read a YAML file with OmegaConf, apply ``key=value`` dotlist overrides, resolve, return plain containers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
        merged = OmegaConf.merge(loaded, OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot read config {path}: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level, got {type(data).__name__}")
    return data


def load_model_config(path: str | os.PathLike[str], overrides: Iterable[str] = ()) -> VARGPTConfig:
    """A model YAML (the fields of ``VARGPTConfig`` at the top level) as a validated ``VARGPTConfig``."""
    return dataclass_from_dict(VARGPTConfig, load_yaml(path, overrides), where="model")
