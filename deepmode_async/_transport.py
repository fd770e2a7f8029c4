"""One request, done right: auth scoping, timeouts, retries, error mapping and logging.

Every byte the SDK sends goes through `Transport.send`. It decides whether a failed
attempt may be repeated (`RetryPolicy`), turns every failure into the error tree of
`_errors`, and logs one line per attempt with secrets and signed query strings left out.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import platform
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar

import aiohttp
import attrs
from yarl import URL

from . import _validate as check
from ._convert import parse_json
from ._encoding import ACCEPTED, decoded_prefix
from ._errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    DeepModeError,
    RequestInfo,
    ResponseValidationError,
    ValidationError,
    parse_retry_after,
    status_error,
)
from ._version import __version__

T = TypeVar("T")

log: Final = logging.getLogger("deepmode_async")

#: An error answer is read up to this size for its detail; the rest is not worth memory.
_ERROR_BODY_LIMIT: Final = 64 * 1024
#: A JSON answer larger than this is not one the API sends.
_JSON_BODY_LIMIT: Final = 32 * 1024 * 1024


@attrs.frozen
class Timeout:
    """How long a request may take, in seconds (`None`: no limit), for each attempt.

    `connect` bounds establishing a connection, `read` the wait for each piece of the
    answer (sync-mode generation can take minutes, hence 600 s), `total` one whole
    attempt. Waiting between retries never counts. Change one with `attrs.evolve`.
    """

    connect: float | None = 10.0
    read: float | None = 600.0
    total: float | None = None

    def __attrs_post_init__(self) -> None:
        for name in ("connect", "read", "total"):
            value = getattr(self, name)
            if value is not None:
                check.seconds(f"Timeout.{name}", value)


def coerce_timeout(value: Timeout | float | None, default: Timeout) -> Timeout:
    """A `Timeout` from what a user may pass: a `Timeout`, a number (the read timeout) or None."""
    if value is None:
        return default
    if isinstance(value, Timeout):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return attrs.evolve(default, read=value)
    raise ValidationError(
        f"timeout must be a Timeout, a number of seconds or None, not {check.shown(value)}"
    )


@functools.lru_cache(maxsize=64)
def _client_timeout(timeout: Timeout) -> aiohttp.ClientTimeout:
    # `sock_connect`, not `connect`: waiting for a free pooled connection is not a failure.
    return aiohttp.ClientTimeout(
        total=timeout.total, sock_connect=timeout.connect, sock_read=timeout.read
    )


# Statuses after which the server certainly did not act, and a request may be repeated
# whatever it costs: 429, and 503 when it says when to come back.
_RETRY_ANY: Final = frozenset({429})
# Statuses that are worth another try for calls that are safe to repeat.
_RETRY_SAFE: Final = frozenset({408, 429, 500, 502, 503, 504})


@attrs.frozen
class RetryPolicy:
    """When to try a failed attempt again, and after how long.

    Calls that spend credits (`idempotent=False`) are repeated only when the server
    certainly did not act on them: the connection failed before the request was sent,
    429, or 503 with `Retry-After`. Reads and downloads are repeated after any transient
    failure. Delays grow exponentially with full jitter up to `backoff_cap`; a server's
    `Retry-After` is honoured up to `retry_after_cap` (a longer one is raised instead).
    """

    max_retries: int = 2
    backoff_base: float = 0.5
    backoff_cap: float = 8.0
    retry_after_cap: float = 60.0

    def delay(self, error: APIError, attempt: int, *, idempotent: bool) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to give up with `error`."""
        if attempt > self.max_retries or not self._may_retry(error, idempotent=idempotent):
            return None
        retry_after = _retry_after(error)
        if retry_after is not None:
            return retry_after if retry_after <= self.retry_after_cap else None
        return self._backoff(attempt)

    def pause(self, error: APIError, attempt: int) -> float:
        """How long a batch holds back after `error` asked it to wait, whether or not the
        call is tried again: the server's `Retry-After` up to the cap, else the backoff."""
        retry_after = _retry_after(error)
        if retry_after is not None:
            return min(retry_after, self.retry_after_cap)
        return self._backoff(attempt)

    def _backoff(self, attempt: int) -> float:
        growth = 2.0 ** min(attempt - 1, 64)  # bounded: the cap is reached long before
        return random.uniform(0, min(self.backoff_cap, self.backoff_base * growth))

    @staticmethod
    def _may_retry(error: APIError, *, idempotent: bool) -> bool:
        if isinstance(error, APIStatusError):
            status = error.status_code
            if status in _RETRY_ANY or (status == 503 and "Retry-After" in error.headers):
                return True
            return idempotent and status in _RETRY_SAFE
        if isinstance(error, APIConnectionError):
            return idempotent or not request_was_sent(error)
        return False


def _retry_after(error: APIError) -> float | None:
    if isinstance(error, APIStatusError):
        return parse_retry_after(error.headers.get("Retry-After"))
    return None


def request_was_sent(error: APIConnectionError) -> bool:
    """False only when the connection failed before any byte of the request left."""
    return not isinstance(
        error.__cause__, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError
    )


def _asks_to_wait(error: APIError) -> bool:
    """Whether the server is pacing the client (429, 503) rather than failing one call."""
    return isinstance(error, APIStatusError) and error.status_code in (429, 503)


#: Rate-limited tries of one call forgiven (not counted as retries) at most: a server
#: that refuses one call for good while letting others through must not stall a batch.
_MAX_FORGIVEN: Final = 8


class Pacer:
    """Paces the calls of one batch together, so a rate-limited server sees the batch
    slow down instead of every call retrying on its own.

    When a call is told to wait (429, or 503), every call of the batch waits with it
    until the delay has passed, and the number of calls allowed in flight halves (once
    per wave of answers); each run of successes as long as that number raises it by one
    again, up to `ceiling`. This happens whether or not the refused call is tried again.
    A rate-limited try does not count against a call's retries when other calls got
    through since its previous try (up to `_MAX_FORGIVEN` times): a server that lets
    some calls through is pacing the batch, not refusing it. When none do, retries run
    out as usual.
    """

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self.limit = ceiling
        self.in_flight = 0
        self.successes = 0
        self._resume_at = 0.0
        self._streak = 0  # successes since the limit last changed
        self._wave = 0  # bumped when the limit halves: one halving per wave of 429s
        self._changed = asyncio.Event()

    def call(self) -> _PacedCall:
        """The pacing of one call, for all of its attempts."""
        return _PacedCall(self)

    async def _enter(self) -> int:
        while True:
            pause = self._resume_at - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            elif self.in_flight < self.limit:
                break
            else:
                await self._changed.wait()
        self.in_flight += 1
        return self._wave

    def _leave(self, wave: int, error: APIError | None, pause: float, *, done: bool) -> None:
        self.in_flight -= 1
        if done:
            self.successes += 1
            self._streak += 1
            if self._streak >= self.limit and self.limit < self.ceiling:
                self.limit += 1
                self._streak = 0
        elif error is not None and _asks_to_wait(error):
            if wave == self._wave:
                self.limit = max(1, self.limit // 2)
                self._wave += 1
                self._streak = 0
            self._resume_at = max(self._resume_at, time.monotonic() + pause)
        self._changed.set()  # wake every waiter to look again; few enough to be cheap
        self._changed = asyncio.Event()


class _PacedCall:
    """One call's attempts under a `Pacer`."""

    def __init__(self, pacer: Pacer) -> None:
        self._pacer = pacer
        self._wave = 0
        self._successes = pacer.successes  # the batch's, at this call's previous try
        self._forgiven = 0

    async def enter(self) -> None:
        """Wait for a slot (and for any pause the batch is in)."""
        self._wave = await self._pacer._enter()

    def succeeded(self) -> None:
        """Give the slot back after a success."""
        self._pacer._leave(self._wave, None, 0.0, done=True)

    def failed(self, error: APIError | None = None, pause: float = 0.0) -> None:
        """Give the slot back after a failure; an `error` asking to wait (429, 503)
        holds the whole batch back for `pause` seconds."""
        self._pacer._leave(self._wave, error, pause, done=False)

    async def back_off(self, error: APIError, delay: float) -> bool:
        """Wait `delay` before the next try; True if the failed try counts as a retry."""
        if not _asks_to_wait(error):
            await asyncio.sleep(delay)
            return True
        # `failed` set the batch's pause: the next `enter` waits with everyone else.
        progressed = self._pacer.successes != self._successes
        self._successes = self._pacer.successes
        if progressed and self._forgiven < _MAX_FORGIVEN:
            self._forgiven += 1
            return False
        return True


class _Unpaced(_PacedCall):
    """A call on its own: no slots to share, and it waits out its own delays."""

    def __init__(self) -> None:
        pass

    async def enter(self) -> None:
        pass

    def succeeded(self) -> None:
        pass

    def failed(self, error: APIError | None = None, pause: float = 0.0) -> None:
        pass

    async def back_off(self, error: APIError, delay: float) -> bool:
        await asyncio.sleep(delay)
        return True


_UNPACED: Final = _Unpaced()


@attrs.frozen
class Request:
    """One logical request, possibly sent several times.

    `body` makes the body for one attempt: a multipart payload streams files from disk
    and can be written once only, so each retry asks for a new one.
    """

    method: str
    url: URL
    idempotent: bool
    headers: Mapping[str, str] = attrs.field(factory=dict, repr=False)  # holds the key
    body: Callable[[], Any] | None = None
    #: False: the answer's body comes as sent, its `Content-Encoding` left to the consumer.
    decompress: bool = True

    @property
    def info(self) -> RequestInfo:
        return RequestInfo(self.method, redact_url(self.url))


def redact_url(url: URL) -> str:
    """The URL without its query string, which for an image URL is a signed secret."""
    text = str(url)
    base, sep, _ = text.partition("?")
    return f"{base}?[redacted]" if sep else text


def json_body(payload: Mapping[str, Any]) -> Callable[[], bytes]:
    """A body factory for a JSON object, encoded once however often it is sent."""
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return lambda: data


class Transport:
    """Sends requests on one aiohttp session, created lazily inside the running loop."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: URL,
        timeout: Timeout,
        retry: RetryPolicy,
        max_connections: int,
        session: aiohttp.ClientSession | None,
        default_headers: Mapping[str, str],
    ) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.retry = retry
        self._max_connections = max_connections
        self._session = session
        self._owns_session = session is None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        user_agent = (
            f"deepmode-async/{__version__} aiohttp/{aiohttp.__version__} "
            f"python/{platform.python_version()}"
        )
        # Default headers go to the API only, like the key: they may carry secrets too.
        self._api_headers: Final = {
            "User-Agent": user_agent,
            **default_headers,
            "Authorization": f"Bearer {api_key}",
        }
        self._plain_headers: Final = {"User-Agent": user_agent, "Accept-Encoding": ACCEPTED}
        self._key: Final = api_key.encode()
        # The tasks of `send`s in flight, and those that `aclose` cancelled.
        self._calls: set[asyncio.Task[Any]] = set()
        self._closed_calls: set[asyncio.Task[Any]] = set()
        self._with_content_type: dict[str, dict[str, str]] = {}  # built once per type

    def _api_headers_for(self, content_type: str | None) -> dict[str, str]:
        if content_type is None:
            return self._api_headers
        if (known := self._with_content_type.get(content_type)) is None:
            known = self._with_content_type[content_type] = {
                **self._api_headers,
                "Content-Type": content_type,
            }
        return known

    def _redacted(self, body: bytes) -> bytes:
        """An error body without the key, should a server echo it ("invalid key: ...")."""
        return body.replace(self._key, b"[redacted]") if self._key else body

    def api_url(self, path: str) -> URL:
        """The URL of an API path whose variable segments are already percent-encoded."""
        return URL(str(self.base_url).rstrip("/") + path, encoded=True)

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        """End the calls in flight, close the session if this transport created it; later
        calls raise."""
        self._closed = True
        # Closing the session alone would leave a call reading a body waiting forever:
        # aiohttp drops the reader's wake-up and its read timeout with the connection.
        for task in self._calls:
            self._closed_calls.add(task)
            task.cancel()
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    def forget_session(self) -> aiohttp.ClientSession | None:
        """Let go of the session without closing it (after a fork its loop is not ours);
        the caller keeps it referenced, as collecting it would warn about it."""
        session = self._session
        if self._owns_session:
            self._session = None
            self._loop = None
        return session

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise DeepModeError("This client is closed; create a new one to make more calls")
        loop = asyncio.get_running_loop()
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),
                cookie_jar=aiohttp.DummyCookieJar(),  # a stateless API; no cookies to leak
            )
            self._loop = loop
        elif self._owns_session and self._loop is not loop:
            raise DeepModeError(
                "This AsyncClient belongs to the event loop it was first used in; "
                "create one client per event loop (or use the blocking Client)"
            )
        return self._session

    async def call(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        body: Callable[[], Any] | None = None,
        content_type: str | None = "application/json",
        timeout: Timeout | None = None,
        pacer: Pacer | None = None,
    ) -> Any:
        """Call an API path and return its JSON answer (raising for anything else)."""
        # No local holds the headers: error reporters that capture frame locals (Sentry
        # does by default) would send the key along. `Request`'s repr hides them.
        request = Request(
            method,
            self.api_url(path),
            idempotent,
            self._api_headers_for(content_type if body is not None else None),
            body,
        )
        return await self.send(request, _read_json, timeout=timeout, pacer=pacer)

    def plain_request(self, url: URL) -> Request:
        """A GET to another host (the image host): no key, no default headers."""
        return Request("GET", url, True, self._plain_headers, decompress=False)

    async def send(
        self,
        request: Request,
        consume: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        *,
        timeout: Timeout | None = None,
        pacer: Pacer | None = None,
    ) -> T:
        """Send `request` (again, as the retry policy allows) and `consume` a 2xx answer.

        `consume` runs within the attempt, so a connection lost while it reads the body
        is a failed attempt like any other. A `pacer` shares slots and back-offs with
        the other calls of a batch.
        """
        task = asyncio.current_task()
        assert task is not None
        self._calls.add(task)
        try:
            return await self._send(request, consume, timeout, pacer)
        except asyncio.CancelledError:
            # Swallowed only when `aclose` alone cancelled the task, as asyncio.timeout
            # does (an anyio cancel scope per call measured 15-20 us of CPU more).
            if task in self._closed_calls and task.uncancel() == 0:
                raise DeepModeError("This client was closed during the call") from None
            raise
        finally:
            self._calls.discard(task)
            self._closed_calls.discard(task)

    async def _send(
        self,
        request: Request,
        consume: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        timeout: Timeout | None,
        pacer: Pacer | None,
    ) -> T:
        session = self._get_session()
        client_timeout = _client_timeout(timeout or self.timeout)
        pace = pacer.call() if pacer is not None else _UNPACED
        attempt = 0
        while True:
            attempt += 1
            await pace.enter()
            if self._closed or session.closed:  # closed meanwhile, e.g. during a backoff
                pace.failed()
                raise DeepModeError("This client (or its aiohttp session) is closed")
            try:
                result = await self._attempt(session, request, consume, client_timeout, attempt)
            except APIError as error:
                delay = self.retry.delay(error, attempt, idempotent=request.idempotent)
                pace.failed(error, delay if delay is not None else self.retry.pause(error, attempt))
                if delay is None:
                    raise
                log.warning(
                    "%s failed (%s); retry %d of %d in %.2f s",
                    request.info,
                    _short(error),
                    attempt,
                    self.retry.max_retries,
                    delay,
                )
                if not await pace.back_off(error, delay):
                    attempt -= 1
                continue
            except BaseException:
                pace.failed()
                raise
            pace.succeeded()
            return result

    async def _attempt(
        self,
        session: aiohttp.ClientSession,
        request: Request,
        consume: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        timeout: aiohttp.ClientTimeout,
        attempt: int,
    ) -> T:
        started = time.perf_counter()
        status: int | str = "no answer"
        failure: DeepModeError
        cause: BaseException | None
        try:
            async with session.request(
                request.method,
                request.url,
                data=request.body() if request.body is not None else None,
                headers=request.headers,
                timeout=timeout,
                # Redirects are not followed: headers other than the key (default_headers)
                # must not reach another host, and signed URLs are not redirected.
                allow_redirects=False,
                raise_for_status=False,  # whatever the session was told: errors are ours
                auto_decompress=request.decompress,
            ) as response:
                status = response.status
                if not 200 <= status < 300:
                    body = await _read_capped(response, _ERROR_BODY_LIMIT)
                    if not request.decompress:
                        encoding = response.headers.get("Content-Encoding", "")
                        body = decoded_prefix(body, encoding, _ERROR_BODY_LIMIT)
                    body = self._redacted(body)
                    raise status_error(request.info, status, body, response.headers)
                return await consume(response)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            status = "timeout"
            failure = APITimeoutError(
                f"{request.info} timed out: {_timeout_cause(exc)}", request=request.info
            )
            cause = _without_frames(exc)
        except aiohttp.ClientError as exc:
            status = type(exc).__name__
            if isinstance(exc.__cause__, DeepModeError):  # raised by our own upload payload
                failure, cause = exc.__cause__, exc.__cause__.__cause__  # without the wrapper
            else:
                failure = APIConnectionError(
                    f"{request.info} failed: {_describe_client_error(exc)}", request=request.info
                )
                # aiohttp's response errors carry the request's headers in their repr.
                response_error = isinstance(exc, aiohttp.ClientResponseError)
                cause = None if response_error else _without_frames(exc)
        except DeepModeError:
            raise
        except RuntimeError as exc:
            if not self._closed:
                raise
            # aiohttp's "Connection closed." when the session closed under a read
            status = type(exc).__name__
            failure, cause = DeepModeError("This client was closed during the call"), None
        except ValueError as exc:  # e.g. a host name the resolver cannot encode
            status = type(exc).__name__
            failure = APIConnectionError(
                f"{request.info} failed: {type(exc).__name__}: {exc}", request=request.info
            )
            cause = _without_frames(exc)
        finally:
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s -> %s in %.1f ms (attempt %d)",
                    request.info,
                    status,
                    (time.perf_counter() - started) * 1000,
                    attempt,
                )
        # Raised out here, not in the handlers, so that no `__context__` keeps aiohttp's
        # exception: the request's headers, and with them the key, would come along.
        raise failure from cause


def _without_frames(error: BaseException) -> BaseException:
    """`error` without its own traceback: aiohttp's frames there hold the request's
    headers in their locals, which error reporters (Sentry, by default) capture and send.
    (Exceptions further down its chain keep theirs; none of their frames holds them.)"""
    return error.with_traceback(None)


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most `limit` bytes of a body: an error page does not get to fill memory."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await response.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


async def _read_json(response: aiohttp.ClientResponse) -> Any:
    what = f"{response.method} {response.url.path}"
    if response.content_length is not None and response.content_length > _JSON_BODY_LIMIT:
        raise ResponseValidationError(
            f"{what} answered with {response.content_length} bytes, too many for JSON"
        )
    return parse_json(await _read_capped(response, _JSON_BODY_LIMIT), what)


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


def _short(error: APIError) -> str:
    if isinstance(error, APIStatusError):
        return f"HTTP {error.status_code}"
    return type(error).__name__
