"""The error tree: every failure of a public call is one of these.

`DeepModeError` is the root. Bad arguments are `ValidationError`s raised before any
request; everything the server or the network did is an `APIError` that knows which
request it was (`.request`, never with secrets); status errors carry a readable
`.detail` pulled from whatever body the server or a proxy sent.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final, TypeVar

import attrs
from multidict import CIMultiDict, CIMultiDictProxy

#: How much of an error body `.detail` keeps: enough to read, not a whole HTML page.
_DETAIL_LIMIT: Final = 500


@attrs.frozen
class RequestInfo:
    """Which request failed: its method and URL, with any signed query string redacted."""

    method: str
    url: str

    def __str__(self) -> str:
        return f"{self.method} {self.url}"


class DeepModeError(Exception):
    """The root of every error this SDK raises.

    Errors pickle (to cross a process boundary: multiprocessing, a task queue), keeping
    their attributes; a `CallbackTimeoutError`'s `.pending` stays behind, as it belongs
    to a hub in this process.
    """

    #: Attributes that cannot leave this process; they come back as None.
    _local_attributes: ClassVar[frozenset[str]] = frozenset()

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own pickling calls `cls(*args)`, which keyword-only arguments break.
        state = {
            name: None if name in self._local_attributes else _to_pickle(value)
            for name, value in vars(self).items()
        }
        return (_unpickle, (type(self), self.args, state))


def _to_pickle(value: Any) -> Any:
    # A read-only view of headers does not pickle; the dict under it does.
    return CIMultiDict(value) if isinstance(value, CIMultiDictProxy) else value


def _unpickle(cls: type[DeepModeError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls)
    error.args = args
    for name, value in state.items():
        setattr(error, name, CIMultiDictProxy(value) if isinstance(value, CIMultiDict) else value)
    return error


class ValidationError(DeepModeError, ValueError):
    """An argument breaks a documented rule; raised before any request is sent."""


class ResponseValidationError(DeepModeError):
    """The server answered 2xx with a body that does not fit the documented shape.

    `.errors` lists each problem with the path of the bad field (`$.images[0].id`).
    """

    def __init__(self, message: str, *, errors: tuple[str, ...] = (), body: Any = None) -> None:
        super().__init__(message)
        self.errors = errors
        self.body = body


class DownloadError(DeepModeError):
    """An image could not be downloaded (after refreshing its URL when that could help)."""

    def __init__(self, message: str, *, image_id: str | None = None) -> None:
        super().__init__(message)
        self.image_id = image_id


class ProgressCallbackError(DeepModeError):
    """A progress callback of yours raised; its exception is the `__cause__`.

    The upload, download or batch it was reporting on stopped there (and is not
    retried); results already handed to you stay yours.
    """


_Progress = TypeVar("_Progress")


def report_progress(
    callback: Callable[[_Progress], object], progress: _Progress, *, of: str
) -> None:
    """Call a user's progress callback; what it raises becomes a `ProgressCallbackError`.

    Raised as our own error because the callback runs deep inside aiohttp (uploads) or a
    task group (downloads), which would otherwise report it as a network failure or an
    exception group.
    """
    try:
        callback(progress)
    except Exception as exc:
        raise ProgressCallbackError(
            f"the {of} stopped: its progress callback raised {type(exc).__name__}: {exc}"
        ) from exc


class CallbackTimeoutError(DeepModeError, TimeoutError):
    """No valid callback arrived in time.

    From `pending.wait(timeout=...)`, `.pending` is that `PendingCallback`, which can be
    awaited again until the hub's `ttl` for it ends. `.refused` is why the hub refused
    the last delivery (a body that does not parse, one too large), or None when no
    delivery reached it.
    """

    _local_attributes = frozenset({"pending"})

    def __init__(self, message: str, *, pending: Any = None, refused: str | None = None) -> None:
        super().__init__(message)
        self.pending = pending
        self.refused = refused


class CallbackNotFoundError(DeepModeError):
    """`CallbackHub.resume(token)` of a token no hub sharing the store issued, or one
    past its expiry."""


class OutcomeUnknownError(DeepModeError):
    """A journalled request was sent by an earlier run and its answer never recorded.

    The server may have acted on it (and charged for it): the run stopped while it was
    in flight, or it failed in a way that does not say (a timeout, a 5xx). It is not
    sent again unless the batch is run with `resend_unknown=True`. `.index` and
    `.request` say which request, `.sent_at` (an aware datetime) when it was sent and
    `.reason` why it may have been charged.
    """

    def __init__(self, message: str, *, index: int, request: Any, sent_at: Any, reason: str):
        super().__init__(message)
        self.index = index
        self.request = request
        self.sent_at = sent_at
        self.reason = reason


class StoreError(DeepModeError):
    """A store (`deepmode_async.stores`) could not be reached or failed.

    The message says which store (its URL or path, never a password) and what to check;
    the sqlite3 or redis exception behind it is not chained, as its text may hold one.
    The store works again once the cause is gone: no need to make a new one.
    """


class APIError(DeepModeError):
    """A request was made and did not succeed. `.request` says which one."""

    def __init__(self, message: str, *, request: RequestInfo) -> None:
        super().__init__(message)
        self.request = request


class APIConnectionError(APIError):
    """The connection failed: the request may or may not have reached the server."""


class APITimeoutError(APIConnectionError):
    """No answer in time: the server may still be working on the request."""


class APIStatusError(APIError):
    """The server answered with an error status (4xx or 5xx)."""

    status_code: int = 0

    def __init__(
        self,
        *,
        request: RequestInfo,
        status_code: int,
        detail: str,
        body: bytes,
        headers: Mapping[str, str],
    ) -> None:
        self.status_code = status_code
        self.detail = detail
        self.body = body
        #: The answer's headers, case-insensitive.
        self.headers = CIMultiDictProxy(CIMultiDict(headers))
        self.request_id: str | None = self.headers.get("x-request-id")
        message = f"{request} -> {status_code}: {detail}"
        if self.request_id:
            message += f" (request id {self.request_id})"
        super().__init__(message, request=request)


class BadRequestError(APIStatusError):
    """400: the server refused the request's content."""

    status_code = 400


class AuthenticationError(APIStatusError):
    """401: the API key is missing, wrong or revoked."""

    status_code = 401


class InsufficientCreditsError(APIStatusError):
    """402 (or a 400 about credits): the balance does not cover the call."""

    status_code = 402


class PermissionDeniedError(APIStatusError):
    """403: not allowed, e.g. the model has expired."""

    status_code = 403


class NotFoundError(APIStatusError):
    """404: no such model or image."""

    status_code = 404


class ConflictError(APIStatusError):
    """409: the resource is not ready, e.g. the model is still training."""

    status_code = 409


class PayloadTooLargeError(APIStatusError):
    """413: the upload is larger than the server takes."""

    status_code = 413


class UnprocessableEntityError(APIStatusError):
    """422: a field is missing or invalid."""

    status_code = 422


class RateLimitError(APIStatusError):
    """429: too many requests. `.retry_after` is the server's hint in seconds, if any."""

    status_code = 429

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.retry_after = parse_retry_after(self.headers.get("Retry-After"))


class InternalServerError(APIStatusError):
    """5xx: the server (or a proxy in front of it) failed."""

    status_code = 500


_BY_STATUS: Final[Mapping[int, type[APIStatusError]]] = {
    cls.status_code: cls
    for cls in (
        BadRequestError,
        AuthenticationError,
        InsufficientCreditsError,
        PermissionDeniedError,
        NotFoundError,
        ConflictError,
        PayloadTooLargeError,
        UnprocessableEntityError,
        RateLimitError,
    )
}

_CREDITS: Final = re.compile(r"\b(credits?|balance)\b", re.IGNORECASE)


def status_error(
    request: RequestInfo, status: int, body: bytes, headers: Mapping[str, str]
) -> APIStatusError:
    """The typed error for an error answer, with a readable detail from its body."""
    content_type = CIMultiDict(headers).get("Content-Type", "")
    detail = read_detail(body, content_type) or f"HTTP {status}"
    if status >= 500:
        cls: type[APIStatusError] = InternalServerError
    elif status == 400 and _CREDITS.search(detail):
        cls = InsufficientCreditsError  # the API documents 402 *or* 400 for this
    else:
        cls = _BY_STATUS.get(status, APIStatusError)
    return cls(request=request, status_code=status, detail=detail, body=body, headers=headers)


def read_detail(body: bytes, content_type: str = "") -> str:
    """A readable one-line message from any error body: JSON, plain text or an HTML page."""
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return ""
    if text[0] in '{["':
        try:
            return _clip(_describe(json.loads(text)))
        except (ValueError, RecursionError):  # not JSON (or absurdly deep): read it as text
            pass
    if "html" in content_type.lower() or text[:1] == "<":
        return _clip(_html_title(text))
    return _clip(" ".join(text.split()))


def _describe(value: Any) -> str:
    """FastAPI `{"detail": ...}` (string, list of field errors, object), `message`, `error`."""
    if isinstance(value, Mapping):
        for key in ("detail", "message", "error", "error_description", "title"):
            if key in value and value[key] not in (None, "", [], {}):
                return _describe(value[key])
        if "msg" in value:
            return _field_error(value)
        return json.dumps(value, ensure_ascii=False, default=str)
    if isinstance(value, list):
        return "; ".join(_describe(item) for item in value) or "[]"
    if isinstance(value, str):
        return " ".join(value.split())
    return json.dumps(value, default=str)


def _field_error(error: Mapping[str, Any]) -> str:
    """`body.prompt: String should have at least 1 character` from one FastAPI error."""
    loc = error.get("loc")
    msg = _describe(error["msg"])
    if isinstance(loc, list) and loc:
        parts = [str(part) for part in loc]
        if parts[0] in ("body", "query", "path", "header") and len(parts) > 1:
            parts = parts[1:]
        return f"{'.'.join(parts)}: {msg}"
    return msg


def _html_title(page: str) -> str:
    """The title (or first heading) of an HTML page, else its text without tags."""
    import html  # only error pages need it: kept out of the import time

    for pattern in (r"<title[^>]*>(.*?)</title>", r"<h1[^>]*>(.*?)</h1>"):
        found = re.search(pattern, page, re.IGNORECASE | re.DOTALL)
        if found and found.group(1).strip():
            return " ".join(html.unescape(re.sub(r"<[^>]+>", "", found.group(1))).split())
    return " ".join(html.unescape(re.sub(r"<[^>]*>", " ", page)).split())


def _clip(text: str) -> str:
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 1] + "…"


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP date is GMT even when it says "-0000"
            when = when.replace(tzinfo=dt.UTC)
        seconds = when.timestamp() - time.time()
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN or infinite
        return None
    return max(0.0, seconds)
