"""Typed configs: pydantic models loaded from YAML, unknown keys rejected, dotted CLI overrides."""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base of every kdserve config: a misspelt key is an error, not a silently ignored default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ConfigError(ValueError):
    """A config the user must fix; the message says where and how."""


def _parse_value(text: str) -> Any:
    # YAML scalars: 1e-3 -> float, true -> bool, [1,2] -> list, 'abc' -> str
    return yaml.safe_load(text)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["train.lr=1e-3", "teacher.address=grpc://h:9000"]`` applied to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.lr=1e-3)")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_value(value)
    return data


def _format(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        # pydantic prefixes a validator's own words with "Value error, ": the user needs only the words
        msg = ("unknown key (check the spelling; see the config reference)" if e["type"] == "extra_forbidden"
               else e["msg"].removeprefix("Value error, "))
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def build(cls: type[M], data: dict, source: str = "config") -> M:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None


def load(cls: type[M], path: str | Path | None, overrides: list[str] = ()) -> M:
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return build(cls, apply_overrides(data, list(overrides)), str(path or "config"))


def dump(cfg: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
