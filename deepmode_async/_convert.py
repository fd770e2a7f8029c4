"""The one cattrs converter: JSON from the server to the frozen data classes of `_types`.

Strict where it matters (a `"5"` is not an `int`, a number is not a `str`), lenient where
the server may grow (unknown keys are ignored, an unknown enum value stays a `str`), and
every misfit becomes a `ResponseValidationError` naming the bad field's path.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import types
import typing
from collections.abc import Callable
from typing import Any, Final, TypeVar

import cattrs
from cattrs.preconf.json import make_converter
from cattrs.v import format_exception

from ._errors import ResponseValidationError
from ._types import Image

T = TypeVar("T")

converter: Final = make_converter()  # unknown keys are ignored by default


def _expect(kind: type | tuple[type, ...], value: Any, name: str) -> None:
    # bool is an int in Python, never in JSON.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise TypeError(f"expected {name}, got {_json_type(value)}")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    return names.get(type(value), type(value).__name__)


# Each primitive hook first takes the exact type `json.loads` makes as it is: the checks
# below it are for everything else, and would run for every field of every answer.


def _structure_str(value: Any, _: type) -> str:
    if value.__class__ is str:
        return value
    _expect(str, value, "a string")
    return str(value)


def _structure_int(value: Any, _: type) -> int:
    if value.__class__ is int:
        return value
    _expect(int, value, "an integer")
    return int(value)


def _structure_bool(value: Any, _: type) -> bool:
    if value.__class__ is bool:
        return value
    _expect(bool, value, "a boolean")
    return bool(value)


def _structure_float(value: Any, _: type) -> float:
    if value.__class__ is float:
        return value
    _expect((int, float), value, "a number")
    return float(value)


def _structure_datetime(value: Any, _: type) -> dt.datetime:
    _expect(str, value, "an ISO 8601 date-time string")
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"expected an ISO 8601 date-time, got {value!r}") from None
    # The API writes UTC with `Z`; a time without an offset is taken to be UTC too.
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def _is_open_enum(cls: Any) -> bool:
    """`SomeStrEnum | str`: a known value becomes the enum member, another stays a str."""
    args = typing.get_args(cls)
    return (
        typing.get_origin(cls) in (typing.Union, types.UnionType)
        and len(args) == 2
        and args[1] is str
        and isinstance(args[0], type)
        and issubclass(args[0], enum.StrEnum)
    )


def _open_enum_hook(cls: Any) -> Callable[[Any, Any], Any]:
    members = typing.get_args(cls)[0]._value2member_map_  # value -> member, as Enum(value)

    def structure_open_enum(value: Any, _: Any) -> Any:
        _expect(str, value, "a string")
        return members.get(value, value)

    return structure_open_enum


converter.register_structure_hook(str, _structure_str)
converter.register_structure_hook(int, _structure_int)
converter.register_structure_hook(bool, _structure_bool)
converter.register_structure_hook(float, _structure_float)
converter.register_structure_hook(dt.datetime, _structure_datetime)
converter.register_structure_hook_factory(_is_open_enum, _open_enum_hook)

_images_hook = converter.get_structure_hook(tuple[Image, ...])


def _structure_images(value: Any, cls: Any) -> tuple[Image, ...]:
    _expect(list, value, "an array")  # cattrs would happily iterate a string or an object
    return _images_hook(value, cls)  # type: ignore[no-any-return]


converter.register_structure_hook_func(lambda cls: cls == tuple[Image, ...], _structure_images)


def _describe(exc: BaseException, cls: type | None) -> str:
    if isinstance(exc, TypeError | ValueError) and str(exc).startswith("expected"):
        return str(exc)  # our hooks' own words: "expected an integer, got string"
    return format_exception(exc, cls)


def parse_json(body: bytes | str, what: str) -> Any:
    """The JSON value of a 2xx body; `what` names the request for the error message."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can go
        preview = body[:80] if isinstance(body, str) else body[:80].decode("utf-8", "replace")
        raise ResponseValidationError(
            f"{what}: the body is not JSON: {preview!r}",
            errors=("the body is not JSON @ $",),
            body=body,
        ) from None


def structure(data: Any, cls: type[T], what: str) -> T:
    """`data` (parsed JSON) as a `cls`, or a `ResponseValidationError` saying what misfits."""
    if not isinstance(data, dict):
        raise ResponseValidationError(
            f"{what}: the JSON does not fit {cls.__name__}: "
            f"expected an object, got {_json_type(data)} @ $",
            errors=(f"expected an object, got {_json_type(data)} @ $",),
            body=data,
        )
    try:
        return converter.structure(data, cls)
    except Exception as exc:  # cattrs wraps field errors in ExceptionGroups
        errors = tuple(cattrs.transform_error(exc, path="$", format_exception=_describe))
        raise ResponseValidationError(
            f"{what}: the JSON does not fit {cls.__name__}: {'; '.join(errors)}",
            errors=errors,
            body=data,
        ) from exc
