"""Checks of arguments against the API's documented rules, made before any byte is sent.

Each returns the value as it goes on the wire, or raises `ValidationError` naming the
argument, what it got and what would do.
"""

from __future__ import annotations

import enum
import io
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any, Final, TypeVar
from urllib.parse import quote, urlsplit

from ._errors import ValidationError

E = TypeVar("E", bound=enum.StrEnum)

MAX_TRAINING_IMAGES: Final = 30
MAX_NUM_IMAGES: Final = 8


def choice(name: str, value: Any, enum_cls: type[E]) -> str:
    """An enum member or its string value, as the string the API takes."""
    if isinstance(value, enum_cls):
        return value.value
    if isinstance(value, str) and value in enum_cls._value2member_map_:
        return value
    allowed = ", ".join(repr(member.value) for member in enum_cls)
    raise ValidationError(
        f"{name} must be one of {allowed} (or {enum_cls.__name__}.*), not {shown(value)}"
    )


def text(name: str, value: Any) -> str:
    """Any string that can be sent as UTF-8, including an empty one."""
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a str, not {type(value).__name__}")
    if value.isascii():  # no surrogate then, and no copy made to find out
        return value
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValidationError(f"{name} is not valid text (it has a lone surrogate)") from None
    return value


def non_empty(name: str, value: Any) -> str:
    """A string with something besides whitespace in it."""
    if not text(name, value).strip():
        raise ValidationError(f"{name} must not be empty")
    return str(value)


def integer(name: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValidationError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValidationError(f"{name} must be from {low} to {high}, not {shown(value)}")
    return value


def positive(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValidationError(f"{name} must be a positive int, not {shown(value)}")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(f"{name} must be True or False, not {shown(value)}")
    return value


def header_value(name: str, value: Any) -> str:
    """Text that can go into an HTTP header: printable ASCII, no line breaks.

    The value is not repeated in the error: a header may carry a secret.
    """
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be text, not {type(value).__name__}")
    if not value.isascii() or not value.isprintable():
        raise ValidationError(f"{name} must be printable ASCII text, without line breaks")
    return value


def http_url(name: str, value: Any) -> str:
    """An absolute http(s) URL with a host (the API fetches or POSTs to it)."""
    text(name, value)
    try:
        parts = urlsplit(value)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        valid = False
    if not valid or any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValidationError(f"{name} must be an absolute http or https URL, not {shown(value)}")
    return str(value)


def path_segment(name: str, value: Any) -> str:
    """An identifier percent-encoded so it stays one path segment (`/`, `..` included)."""
    non_empty(name, value)
    return quote(value, safe="").replace(".", "%2E")


def local_path(name: str, value: Any) -> pathlib.Path:
    """A path on this machine: a str or an os.PathLike giving a str, without NUL bytes."""
    try:
        path = os.fspath(value)
    except TypeError:
        path = None
    if not isinstance(path, str):
        raise ValidationError(f"{name} must be a path given as str or os.PathLike[str]")
    if "\0" in path:
        raise ValidationError(f"{name} contains a NUL byte, which no path can hold")
    text(name, path)
    return pathlib.Path(path)


def count(name: str, items: Sequence[Any], low: int, high: int) -> None:
    if not low <= len(items) <= high:
        raise ValidationError(f"{name} must hold {low} to {high} items, not {len(items)}")


def as_list(name: str, value: Any) -> list[Any]:
    """A list from a sequence or another iterable; a lone str or bytes is not a list."""
    if isinstance(value, str | bytes | bytearray | io.IOBase) or not hasattr(value, "__iter__"):
        raise ValidationError(f"{name} must be a list, not {type(value).__name__}")
    return list(value)


def seconds(name: str, value: Any) -> float:
    """A positive, finite number of seconds."""
    try:
        usable = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)  # an int beyond a float's range raises OverflowError
            and value > 0
        )
    except OverflowError:
        usable = False
    if not usable:
        raise ValidationError(f"{name} must be a positive number of seconds, not {shown(value)}")
    return float(value)


def shown(value: Any) -> str:
    """A value as an error message shows it: its repr, cut short (and an int too long
    for Python to print at all named as such)."""
    try:
        text = repr(value)
    except ValueError:  # int's string conversion limit
        return "an int of more than 4300 digits"
    return text if len(text) <= 80 else text[:77] + "..."
