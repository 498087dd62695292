"""Dataclass configs filled alike from CLI flags and YAML files.

Each field becomes a `--flag` with the field's `help` metadata. `--config file.yaml`
supplies values first, flags given on the command line override them, and an
unknown key or a value of the wrong type is an error, not a silent default.

A field whose type is itself a dataclass (a nested config, such as `TrainConfig.dsvlm`) becomes one flag per
field of it, named `--<field>-<its field>`, and a mapping under `<field>:` in YAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that is unknown or of the wrong type."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> Any:
    """The concrete type behind `X | None` and similar unions."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _nested(tp: Any) -> bool:
    """Whether a field of type `tp` is a nested config (a dataclass)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one flag per field of `cls` (a nested config's fields as `--<field>-<its field>`); defaults stay unset
    so YAML values are not overridden."""
    hints = typing.get_type_hints(cls)
    if not prefix:
        parser.add_argument("--config", type=Path, help="YAML file with any of these options")
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        name = prefix + f.name
        if _nested(tp):
            add_dataclass_args(parser, tp, prefix=name + "_")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        if tp is bool:
            parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(tp) in (tuple, list):
            (item,) = set(typing.get_args(tp)) - {Ellipsis}
            parser.add_argument(_flag(name), type=item, nargs="*", default=None, help=help_text)
        else:
            parser.add_argument(_flag(name), type=tp, default=None, help=help_text)


def _is_optional(tp: Any) -> bool:
    is_union = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
    return is_union and type(None) in typing.get_args(tp)


def _check_type(cls: type, name: str, value: Any, tp: Any) -> Any:
    if value is None and _is_optional(tp):
        return None
    tp = _base_type(tp)
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{cls.__name__}.{name}: expected a list, got {value!r}")
        item_types = set(typing.get_args(tp)) - {Ellipsis}
        items = [_check_type(cls, f"{name}[{i}]", v, next(iter(item_types))) if len(item_types) == 1 else v
                 for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if _nested(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{cls.__name__}.{name}: expected a mapping of {tp.__name__} options, got {value!r}")
        return build_config(tp, {k.replace("-", "_"): v for k, v in value.items()})
    if isinstance(tp, type) and (not isinstance(value, tp) or (tp is not bool and isinstance(value, bool))):
        raise ConfigError(f"{cls.__name__}.{name}: expected {tp.__name__}, got {value!r}")
    return value


def build_config(cls: type[T], values: dict[str, Any]) -> T:
    """Instantiate `cls` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} options: {sorted(unknown)}; known: {sorted(known)}")
    return cls(**{k: _check_type(cls, k, v, hints[k]) for k, v in values.items()})


def _given(cls: type, args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The flags of `cls`'s fields given on the command line (a nested config's as a mapping, if any)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        given = _given(tp, args, prefix + f.name + "_") if _nested(tp) else getattr(args, prefix + f.name, None)
        if given is not None and given != {}:
            values[f.name] = given
    return values


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        try:
            loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{args.config} is not valid YAML: {str(err).splitlines()[0]} "
                              f"({' '.join(str(err).split()[-4:])})") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.config}: expected a mapping of options")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    hints = typing.get_type_hints(cls)
    for name, given in _given(cls, args).items():
        if isinstance(given, dict) and isinstance(values.get(name), dict):  # flags override a YAML mapping's keys
            given = {**{k.replace("-", "_"): v for k, v in values[name].items()}, **given}
        elif isinstance(given, dict) and _nested(_base_type(hints[name])) and name in values:
            raise ConfigError(f"{cls.__name__}.{name}: expected a mapping of options, got {values[name]!r}")
        values[name] = given
    return build_config(cls, values)
