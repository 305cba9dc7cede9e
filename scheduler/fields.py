"""Typed access to a request body's fields: each wrong type, range or text is a 400 naming the field."""

from __future__ import annotations

from typing import Any

from scheduler.errors import ApiError


def typed(body: dict, key: str, types: type | tuple, default: Any) -> Any:
    """body[key] as one of `types` (a boolean is not a number), `default` when absent or null."""
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ApiError(400, f"'{key}' must be {getattr(types, '__name__', types)}, got a boolean", param=key)
    if not isinstance(value, types):
        raise ApiError(400, f"'{key}' has the wrong type ({type(value).__name__})", param=key)
    return value


def in_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ApiError(400, f"'{key}' must be between {low} and {high}, got {value}", param=key)


def valid_text(value: str, key: str) -> str:
    """A string the tokenizer can take: valid Unicode (no lone surrogates such as "\\ud800")."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"'{key}' is not valid Unicode text ({e.reason} at position {e.start})",
                       param=key) from e
    return value
