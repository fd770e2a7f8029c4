"""The bodies the API POSTs in callback mode, parsed into the SDK's data classes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, TypeAlias, TypeVar

from .._convert import parse_json, structure
from .._errors import ResponseValidationError
from .._types import Generation, Image, Model

T = TypeVar("T")

CallbackKind: TypeAlias = Literal["model", "generation", "upscale"]
CallbackBody: TypeAlias = bytes | str | Mapping[str, Any]


def parse_model_callback(body: CallbackBody) -> Model:
    """The trained `Model` from the body POSTed to the `callback` of `models.create`.

    `body` is the raw bytes, text or an already parsed mapping. A body that does not fit
    raises `ResponseValidationError`, whose `.errors` name the bad fields (`$.id`).
    """
    return _parse(body, Model, "model callback")


def parse_generation_callback(body: CallbackBody) -> Generation:
    """The `Generation` from the body POSTed to the `callback` of `images.generate`."""
    return _parse(body, Generation, "generation callback")


def parse_upscale_callback(body: CallbackBody) -> Image:
    """The upscaled `Image` from the body POSTed to the `callback` of `images.upscale`."""
    return _parse(body, Image, "upscale callback")


def _parse(body: object, cls: type[T], what: str) -> T:
    if isinstance(body, bytes | bytearray | memoryview):
        data = parse_json(bytes(body), what)
    elif isinstance(body, str):
        data = parse_json(body, what)
    elif isinstance(body, Mapping):
        data = dict(body)
    else:
        problem = f"expected bytes, str or a mapping, got {type(body).__name__} @ $"
        raise ResponseValidationError(f"{what}: {problem}", errors=(problem,), body=body)
    return structure(data, cls, what)


#: The parser of each kind of callback.
PARSERS: Final[dict[str, Callable[[bytes], Any]]] = {
    "model": parse_model_callback,
    "generation": parse_generation_callback,
    "upscale": parse_upscale_callback,
}
