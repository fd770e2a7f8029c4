"""Raw responses: `dm.images.with_raw_response.generate(...)` returns an `APIResponse`.

One path, not a second copy of each method: the view runs the resource's own method
inside a `capturing` scope (a context variable), and the transport, whose every answer
goes through `answered`, records there the final attempt's status, headers and timing.
A method whose result is not one HTTP answer (downloads, batches, a wait on a
`CallbackHub`) is marked `not_raw` and left out of the view, or calls `refuse_raw`
before it sends anything.
"""

from __future__ import annotations

import contextvars
import datetime
import functools
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Generic, Protocol, TypeVar

import attrs
from multidict import CIMultiDict, CIMultiDictProxy

from ._errors import RequestInfo, ResponseValidationError, ValidationError

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)  # an answer of a `Generation` is one of a union too
F = TypeVar("F", bound=Callable[..., Any])

_NOT_RAW: Final = "__deepmode_not_raw__"


@attrs.frozen(repr=False)
class APIResponse(Generic[T_co]):
    """The HTTP answer of one call, with its parsed result: what
    `dm.<resource>.with_raw_response.<method>(...)` returns.

    `headers` are the answer's (case-insensitive), `request_id` its `x-request-id`,
    `elapsed` the time of the final attempt (from sending the request to having read and
    parsed the answer), `retries_taken` how many attempts failed before it, and `http_request` the
    method and URL, without the key or a query string. `parse()` returns the result the
    plain method returns; a 2xx body that does not fit raises `ResponseValidationError`
    there, so that the answer's headers can still be read.
    """

    status_code: int
    headers: CIMultiDictProxy[str]
    elapsed: datetime.timedelta
    retries_taken: int
    http_request: RequestInfo
    _result: T_co | None = attrs.field(alias="result")
    _error: ResponseValidationError | None = attrs.field(default=None, alias="error")

    @property
    def request_id(self) -> str | None:
        """The answer's `x-request-id` header, for DeepMode support."""
        return self.headers.get("x-request-id")

    def parse(self) -> T_co:
        """The call's result, as the method without `with_raw_response` returns it."""
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]  # None only with an error

    def __repr__(self) -> str:
        return f"<APIResponse [{self.status_code}] {self.http_request}>"


@attrs.define
class Answer:
    """What the transport saw of the final attempt of a call in a `capturing` scope."""

    status_code: int = 0
    headers: CIMultiDictProxy[str] = attrs.field(factory=lambda: CIMultiDictProxy(CIMultiDict()))
    started: float = 0.0
    attempt: int = 0
    request: RequestInfo | None = None

    def record(
        self,
        request: RequestInfo,
        status: int,
        headers: Mapping[str, str],
        started: float,
        attempt: int,
    ) -> None:
        """Keep a 2xx answer (its body not read yet), which a later attempt replaces."""
        self.request, self.status_code, self.started, self.attempt = (
            request,
            status,
            started,
            attempt,
        )
        self.headers = CIMultiDictProxy(CIMultiDict(headers))


_CAPTURE: contextvars.ContextVar[Answer | None] = contextvars.ContextVar(
    "deepmode_raw_capture", default=None
)


class _Sent(Protocol):
    @property
    def info(self) -> RequestInfo: ...


def record_answer(
    request: _Sent, status: int, headers: Mapping[str, str], started: float, attempt: int
) -> None:
    """Called by the transport on each 2xx answer (before its body is read): kept when
    a `with_raw_response` call is capturing, replacing an earlier attempt's."""
    if (answer := _CAPTURE.get()) is not None:
        answer.record(request.info, status, headers, started, attempt)


def refuse_raw(what: str) -> None:
    """Raise `ValidationError` inside a raw call: `what` has no single HTTP answer."""
    if _CAPTURE.get() is not None:
        raise ValidationError(
            f"with_raw_response cannot wrap {what}: its result is not one HTTP answer; "
            "call the method without with_raw_response"
        )


def not_raw(method: F) -> F:
    """Mark a resource method as left out of `with_raw_response` (its result is not one
    HTTP answer); `tools/generate_blocking_types.py` reads the mark too."""
    setattr(method, _NOT_RAW, True)
    return method


def has_raw_form(method: object) -> bool:
    """Whether `with_raw_response` offers `method` (a public coroutine method)."""
    return inspect.iscoroutinefunction(method) and not getattr(method, _NOT_RAW, False)


async def _raw_call(
    method: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
) -> APIResponse[T]:
    answer = Answer()
    token = _CAPTURE.set(answer)
    error: ResponseValidationError | None = None
    result: T | None = None
    try:
        result = await method(*args, **kwargs)
    except ResponseValidationError as exc:
        if answer.request is None:  # not about an answer's body
            raise
        error = exc
    finally:
        _CAPTURE.reset(token)
    ended = time.perf_counter()
    if answer.request is None:  # pragma: no cover - every raw method sends one request
        raise ValidationError(f"{method.__name__} sent no request to wrap")
    return APIResponse(
        status_code=answer.status_code,
        headers=answer.headers,
        elapsed=datetime.timedelta(seconds=ended - answer.started),
        retries_taken=answer.attempt - 1,
        http_request=answer.request,
        result=result,
        error=error,
    )


class RawResponses:
    """`resource.with_raw_response`: each method of the resource that makes one HTTP
    request, returning an `APIResponse` of its result instead of the result alone.
    Downloads, batches (`generate_many`) and waits on a `CallbackHub` are not offered
    (their result is not one HTTP answer)."""

    def __init__(self, resource: object) -> None:
        self._resource = resource

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._resource, name) if not name.startswith("_") else None
        if not has_raw_form(method):
            raise AttributeError(f"with_raw_response has no {name!r}")

        @functools.wraps(method)  # type: ignore[arg-type]
        async def raw(*args: Any, **kwargs: Any) -> APIResponse[Any]:
            return await _raw_call(method, *args, **kwargs)  # type: ignore[arg-type]

        setattr(self, name, raw)  # made once; later lookups skip __getattr__
        return raw

    def __dir__(self) -> list[str]:
        resource = self._resource
        return [
            n for n in dir(resource) if not n.startswith("_") and has_raw_form(getattr(resource, n))
        ]

    def __repr__(self) -> str:
        return f"<{type(self._resource).__name__}.with_raw_response>"
