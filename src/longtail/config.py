"""Dataclass configs on OmegaConf structured configs: defaults in code, layers of mappings over them.

Defaults <- ``base`` <- a YAML file <- ``top`` (e.g. typed CLI flags) <- ``section.key=value`` overrides.
OmegaConf checks every layer against the dataclass: unknown keys and wrong types are a :class:`ConfigError`
naming the key, its section and the layer; ints are accepted for floats. The resolved config is written
next to every run's outputs (``config.yaml``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _field_type(cls: type, dotted: str) -> Any:
    """The annotation of ``a.b[0].c`` in dataclass ``cls`` (None where the path leaves the dataclasses)."""
    tp: Any = cls
    for part in dotted.split("."):
        name, _, index = part.partition("[")
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(name)
        if index:  # an item of a list / tuple field, maybe `... | None`
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = inner[0] if len(inner) == 1 and typing.get_origin(tp) in (typing.Union, types.UnionType) else tp
            tp = (typing.get_args(tp) or (None,))[0]
    return tp


def _explain(err: OmegaConfBaseException, cls: type) -> str:
    """One line naming the key, its section and what was wrong (OmegaConf's message is several lines)."""
    key = err.full_key or ""
    if isinstance(err, ConfigKeyError) and dataclasses.is_dataclass(err.object_type):
        section = key.rpartition(".")[0] or "the top level"
        known = ", ".join(f.name for f in dataclasses.fields(err.object_type))
        return f"{key}: unknown key {err.key!r} in {section} (known: {known})"
    tp = _field_type(cls, key) if key else None
    if tp is not None and not isinstance(err, InterpolationResolutionError):
        return f"{key}: expected {_type_name(tp)}, got {err.value!r}"
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"{key}: {first}" if key else first


def _not_a_section(cls: type, layer: Any, prefix: str = "") -> str | None:
    """``section: value`` where the section is a dataclass but the value no mapping (OmegaConf omits the key)."""
    hints = typing.get_type_hints(cls)
    for name, value in (layer.items() if isinstance(layer, Mapping) else ()):
        tp = hints.get(name)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                return f"{prefix}{name}: expected {_type_name(tp)}, got {value!r}"
            found = _not_a_section(tp, value, f"{prefix}{name}.")
            if found:
                return found
    return None


def _merge(cfg: DictConfig, layer: Any, cls: type, where: str) -> DictConfig:
    try:
        return typing.cast(DictConfig, OmegaConf.merge(cfg, layer))
    except OmegaConfBaseException as err:
        reason = (None if err.full_key else _not_a_section(cls, layer)) or _explain(err, cls)
        raise ConfigError(f"{where}: {reason}") from None


def _set(cfg: DictConfig, item: tuple[str, Any], cls: type, where: str) -> DictConfig:
    """An override replaces the value at its key: a plain mapping field too (``model_kwargs={}`` empties it),
    while a dataclass section is merged key by key, so ``section={a: 1}`` keeps the section's other keys."""
    key, value = item
    if isinstance(value, Mapping) and not dataclasses.is_dataclass(_field_type(cls, key)):
        try:
            node = OmegaConf.select(cfg, key, default=None)
        except OmegaConfBaseException:
            node = None
        if isinstance(node, DictConfig):
            OmegaConf.update(cfg, key, value, merge=False)
            return cfg
    return _merge(cfg, _dotted(key, value), cls, where)


def _dotted(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _build(cls: type[T], layers: Sequence[tuple[str, Any]]) -> T:
    cfg = OmegaConf.structured(cls)
    for where, layer in layers:
        cfg = _set(cfg, layer, cls, where) if isinstance(layer, tuple) else _merge(cfg, layer, cls, where)
    try:
        return typing.cast(T, OmegaConf.to_object(cfg))
    except OmegaConfBaseException as err:
        raise ConfigError(f"config: {_explain(err, cls)}") from None


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a (partial, nested) mapping over its defaults; errors name the key."""
    return _build(cls, [(where, dict(data))])


def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p}: invalid YAML: {err}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping")
    return loaded


def _override(item: str) -> tuple[str, Any]:
    """``section.key=value`` -> ``(key, value)``, the value parsed as YAML."""
    key, _, raw = item.partition("=")
    key = key.strip()
    if "=" not in item or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*", key):
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None, top: Mapping[str, Any] | None = None) -> T:
    """Defaults <- ``base`` <- YAML ``path`` <- ``top`` <- ``overrides`` (``"a.b=value"``, value parsed as YAML).

    ``base`` sits under the file (defaults of a variant), ``top`` over it (typed CLI flags, a mode such as
    ``--quick``). Raises :class:`ConfigError` naming the layer and the key.
    """
    layers: list[tuple[str, Any]] = []
    if base:
        layers.append(("base config", dict(base)))
    if path is not None:
        layers.append((f"config file {path}", _read_yaml(path)))
    if top:
        layers.append(("options", dict(top)))
    layers += [(f"override {item!r}", _override(item)) for item in overrides]
    return _build(cls, layers)


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict/list values (tuples become lists), for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_config(obj: Any, path: str | Path) -> None:
    """Write the resolved config ``obj`` as YAML (``load_config(type(obj), path)`` reads it back)."""
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
