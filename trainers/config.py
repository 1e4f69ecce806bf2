"""Typed, validated configuration: pydantic models loadable from YAML, overridable from the CLI.

A bad value fails with `ConfigError` naming the field (`data.min_freq: Input should be ...`).
Overrides are `dotted.key=value` strings; values are parsed as YAML scalars (`3`, `true`, `1e-4`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the field."""


class StrictModel(BaseModel):
    """Base for every config: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["a.b=1", "c=x"] into {"a": {"b": 1}, "c": "x"}."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value ({e})") from e
        node = tree
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = value
    return tree


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` updated with `extra`; nested dicts merge key by key (`extra` wins)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                **values: Any) -> T:
    """Build `cls` from a YAML file, then keyword values, then CLI overrides (later wins)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a YAML mapping, got {type(loaded).__name__}")
        data = loaded
    data = deep_merge(data, {k: v for k, v in values.items() if v is not None})
    data = deep_merge(data, parse_overrides(overrides or []))
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source=str(path) if path else None)) from None


def format_validation_error(e: ValidationError, source: str | None = None) -> str:
    lines = [f"invalid configuration{f' in {source}' if source else ''}:"]
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"  {field}: {err['msg']}{got}")
    return "\n".join(lines)
