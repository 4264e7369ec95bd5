"""Dotted keys: how `section.key=value` reaches a typed field of a Config.

Every way a config is made goes through set_value: a TOML file's tables (config/parser.py), the
command line's --section.key=value, a saved dict (Config.from_dict: a checkpoint, a run's
config.json) and a --layout (parallel/layout.py). It checks that each part of the key exists (a
typo gets the closest name) and that the value fits the field's type (strings from the command
line are converted). It knows the fields only through the dataclasses, so it sits below them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import TYPE_CHECKING, Any, Literal

from .errors import ConfigError

if TYPE_CHECKING:
    from .sections import Config


# The flat precision keys before the knobs moved into tables: an old key is refused with its new
# name (TOML, command line), and a config saved before (checkpoints, config.json) is read through
# this map (upgrade_saved).
RENAMED = {f"precision.{old}": f"precision.{new}" for old, new in {
    "fp8_scaling": "fp8.scaling", "fp8_gemm": "fp8.gemm", "amax_history_len": "fp8.amax_history_len",
    "fp8_margin": "fp8.margin", "fp8_x_scaling": "fp8.x_scaling", "fp8_w_scaling": "fp8.w_scaling",
    "fp8_grad_scaling": "fp8.grad_scaling", "fp8_grad_format": "fp8.grad_format",
    "fp8_grad_rounding": "fp8.grad_rounding", "nvfp4_2d_weights": "nvfp4.weights_2d",
    "nvfp4_hadamard": "nvfp4.hadamard", "moe_dispatch_fp8": "moe.dispatch_fp8", "moe_combine_fp8": "moe.combine_fp8",
    "lowbit_weights": "lowbit.weights", "lowbit_exclude": "lowbit.exclude", "lowbit_format": "lowbit.format",
    "lowbit_scaling": "lowbit.scaling", "loss_scale_init": "loss_scale.init",
    "loss_scale_growth_interval": "loss_scale.growth_interval", "loss_scale_backoff": "loss_scale.backoff",
    "loss_scale_hysteresis": "loss_scale.hysteresis", "loss_scale_min": "loss_scale.min"}.items()}


def upgrade_saved(d: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict with the keys RENAMED lists moved to their new places (a copy): a checkpoint
    written before precision's tables stays readable. TOML files and the command line get an error instead."""
    d = {section: dict(body) if isinstance(body, dict) else body for section, body in d.items()}
    for old, new in RENAMED.items():
        section, key = old.split(".")
        if isinstance(d.get(section), dict) and key in d[section]:
            value = d[section].pop(key)
            *tables, leaf = new.split(".")[1:]
            body = d[section]
            for table in tables:  # copied, so the caller's nested dicts stay as they were
                body[table] = dict(body.get(table, {}))
                body = body[table]
            body[leaf] = value
    return d


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(choices))}."


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and for strings from the command line, convert) a value to a field's type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not allowed. Choose one of: {', '.join(map(repr, choices))}.")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}.")
    if origin is list:  # from TOML a list; from the command line "a,b,c" ("" is the empty list)
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            entries = [v.strip() for v in value.split(",")] if value.strip() else []
            if "" in entries:  # "," or "a,,b": an entry left out, not an empty list asked for
                raise ConfigError(f"{key}={value!r} has an empty entry: separate the entries by single commas "
                                  f"(a,b), or give {key}=\"\" for none.")
            value = entries
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}.")
        return [_coerce(v, item, key) for v in value]
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r} (quote it in TOML).")
    raise TypeError(f"unsupported config field type {tp} for {key}")


def _section_fields(section_obj: Any) -> dict[str, Any]:
    return _fields_of(type(section_obj))


@functools.cache
def _fields_of(section_type: type) -> dict[str, Any]:
    """{field: type} of a config table. Cached: get_type_hints evaluates every annotation string
    on each call, and a config is built key by key (Config.from_dict: ~150 calls)."""
    hints = typing.get_type_hints(section_type)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_type)}


def set_value(cfg: Config, dotted: str, value: Any, source: str = "command line") -> None:
    """Set `section.key` (or `section.table.key`, e.g. precision.fp8.margin) on cfg, checking that
    each part exists and the value fits the type."""
    if "." not in dotted:
        raise ConfigError(f"{source}: '{dotted}' must be written as section.key (for example train.max_steps).")
    if dotted in RENAMED:
        table, _, key = RENAMED[dotted].rpartition(".")
        raise ConfigError(f"{source}: {dotted} was renamed: use {RENAMED[dotted]} (in TOML: {key} = ... "
                          f"under [{table}]).")
    *path, key = dotted.split(".")
    sections = [f.name for f in dataclasses.fields(cfg)]
    if path[0] not in sections:
        raise ConfigError(f"{source}: unknown config section '{path[0]}'.{_suggest(path[0], sections)}")
    obj = cfg
    for i, name in enumerate(path):  # down the tables: the section, then e.g. precision's fp8
        fields, where = _section_fields(obj), ".".join(path[:i + 1])
        if name not in fields:
            raise ConfigError(f"{source}: unknown key '{where}'.{_suggest(name, list(fields))}")
        obj = getattr(obj, name)
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"{source}: {where} is a value, not a table: set {where}=VALUE, not {dotted}.")
    fields = _section_fields(obj)
    if key not in fields:
        raise ConfigError(f"{source}: unknown key '{dotted}'.{_suggest(key, list(fields))}")
    if dataclasses.is_dataclass(getattr(obj, key)):
        raise ConfigError(f"{source}: {dotted} is a table: set its keys ({dotted}.KEY=VALUE on the command "
                          f"line, [{dotted}] in TOML).")
    setattr(obj, key, _coerce(value, fields[key], dotted))


def apply_dict(cfg: Config, d: dict[str, Any], source: str) -> None:
    sections = [f.name for f in dataclasses.fields(cfg)]
    for section, body in d.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown config section [{section}].{_suggest(section, sections)}")
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of key = value pairs.")
        for dotted, value in _flatten(body, section):
            set_value(cfg, dotted, value, source)


def _flatten(body: dict[str, Any], prefix: str) -> list[tuple[str, Any]]:
    """{"fp8": {"margin": 2}} under "precision" -> [("precision.fp8.margin", 2)]: TOML's nested tables
    ([precision.fp8]) become the dotted keys of the command line."""
    out = []
    for key, value in body.items():
        out += _flatten(value, f"{prefix}.{key}") if isinstance(value, dict) else [(f"{prefix}.{key}", value)]
    return out
