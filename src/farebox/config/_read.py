"""Small readers for the TOML config, each naming the key it reads in its error (private to
:mod:`farebox.config`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from farebox.errors import ConfigError


def _only(table: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(allowed))})"
        )


def _table(document: Mapping[str, Any], key: str, *, required: bool) -> Mapping[str, Any]:
    value = document.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{key}: the [{key}] table is required")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a table ([{key}])")
    return value


def _string(table: Mapping[str, Any], where: str, key: str) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a string, not {type(value).__name__}")
    if not value.strip():
        raise ConfigError(f"{where}: must not be empty")
    return value


def _count(table: Mapping[str, Any], where: str, key: str, default: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**53:
        raise ConfigError(f"{where}: must be a whole number, 0 or more")
    return value


def _seconds(table: Mapping[str, Any], where: str, key: str, default: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: must be a number of seconds")
    if not (math.isfinite(value) and 0 < value <= 3600):
        raise ConfigError(f"{where}: must be more than 0 and at most 3600 seconds")
    return float(value)


def _resolve(text: str, base: Path) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def _path(table: Mapping[str, Any], where: str, key: str, base: Path) -> Path | None:
    text = _string(table, where, key)
    return None if text is None else _resolve(text, base)


def _check_url(url: str, where: str, *, show: bool = True) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        # A node URL may embed an API key: name the key, not the value.
        shown = f" {url!r}" if show else ""
        raise ConfigError(f"{where}:{shown} is not an http(s) URL")
