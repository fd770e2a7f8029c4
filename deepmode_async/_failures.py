"""How a failed attempt becomes an SDK error: what the transport raises instead of
aiohttp's exceptions (whose reprs, tracebacks and frames hold the request's headers, and
with them the key), with a message a person can act on."""

from __future__ import annotations

import aiohttp

from ._connection import NotResent
from ._errors import APIConnectionError, APITimeoutError, DeepModeError, RequestInfo


class CutShort(Exception):
    """Raised by a `consume` function when the answer ended before its end (fewer bytes
    than announced, a compressed stream unfinished): the attempt fails as a connection
    lost mid-answer does, and is tried again as one."""


def attempt_failure(
    exc: Exception, info: RequestInfo, payload: object, *, closed: bool
) -> tuple[str, DeepModeError, BaseException | None] | None:
    """What a failed attempt raises instead of `exc` (status for the log line, error,
    cause), or None when `exc` is not an attempt's failure and goes up as it is."""
    if isinstance(exc, NotResent):
        exc = exc.original
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        failure = APITimeoutError(f"{info} timed out: {_timeout_cause(exc)}", request=info)
        return "timeout", failure, _without_frames(exc)
    if isinstance(exc, CutShort):
        message = f"{info} failed: the answer was cut off before its end ({exc})"
        return "cut short", APIConnectionError(message, request=info), _without_frames(exc)
    status = type(exc).__name__
    if isinstance(exc, aiohttp.ClientError):
        own: DeepModeError | None = getattr(payload, "failure", None)
        if own is not None:  # why our own body stopped, which aiohttp wraps
            return status, own, own.__cause__  # without the wrapper
        message = f"{info} failed: {_describe_client_error(exc)}"
        # aiohttp's response errors carry the request's headers in their repr.
        response_error = isinstance(exc, aiohttp.ClientResponseError)
        cause = None if response_error else _without_frames(exc)
        return status, APIConnectionError(message, request=info), cause
    if isinstance(exc, RuntimeError):
        if not closed:
            return None
        # aiohttp's "Connection closed." when the session closed under a read
        return status, DeepModeError("This client was closed during the call"), None
    if isinstance(exc, ValueError):  # e.g. a host name the resolver cannot encode
        message = f"{info} failed: {type(exc).__name__}: {exc}"
        return status, APIConnectionError(message, request=info), _without_frames(exc)
    return None


def _without_frames(error: BaseException) -> BaseException:
    """`error` without its own traceback: aiohttp's frames there hold the request's
    headers in their locals, which error reporters (Sentry, by default) capture and send.
    (Exceptions further down its chain keep theirs; none of their frames holds them.)"""
    return error.with_traceback(None)


def _timeout_cause(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "could not connect in time"
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return "no data from the server within the read timeout"
    return "the whole attempt took longer than the total timeout"


def _describe_client_error(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port} ({exc.os_error.strerror or exc})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without answering"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer was cut off before its end"
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.InvalidURL):
        return type(exc).__name__  # their text repeats the URL, signed query and all
    return str(exc) or type(exc).__name__
