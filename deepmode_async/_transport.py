"""One request, done right: auth scoping, one attempt at a time, error mapping and logs.

Every byte the SDK sends goes through `Transport.send`. It tries the request as often
as its `RetryPolicy` allows (paced with the rest of a batch when it is part of one:
`_pacing`), turns every failure into the error tree of `_errors`, and logs one line
per attempt with secrets and signed query strings left out.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import logging
import platform
import time
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, TypeVar

import aiohttp
import attrs
from yarl import URL

from ._connection import Pool, middlewares_for
from ._convert import parse_json
from ._encoding import ACCEPTED, decoded_prefix
from ._errors import (
    APIError,
    APIStatusError,
    DeepModeError,
    RequestInfo,
    ResponseValidationError,
    status_error,
)
from ._failures import attempt_failure
from ._pacing import paced_call
from ._raw import record_answer
from ._retry import RetryPolicy
from ._shared_backoff import SharedBackoff
from ._timeout import Timeout
from ._version import __version__

T = TypeVar("T")

log: Final = logging.getLogger("deepmode_async")

#: An error answer is read up to this size for its detail; the rest is not worth memory.
_ERROR_BODY_LIMIT: Final = 64 * 1024
#: A JSON answer larger than this is not one the API sends.
_JSON_BODY_LIMIT: Final = 32 * 1024 * 1024
#: At most this many API paths keep their URL built (`Transport.api_url`): the fixed ones.
_KNOWN_URLS: Final = 64
#: `json.dumps` with these options would build a new encoder on every call.
_JSON: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


@functools.lru_cache(maxsize=64)
def _client_timeout(timeout: Timeout) -> aiohttp.ClientTimeout:
    # `sock_connect`, not `connect`: waiting for a free pooled connection is not a failure.
    return aiohttp.ClientTimeout(
        total=timeout.total, sock_connect=timeout.connect, sock_read=timeout.read
    )


@attrs.frozen
class Request:
    """One logical request, possibly sent several times.

    `body` makes the body for one attempt: a multipart payload streams files from disk
    and can be written once only, so each retry asks for a new one. A body that stops
    for a reason of the SDK's own (a progress callback raised, a file changed) keeps
    that `DeepModeError` in its `failure` attribute, which the attempt raises: aiohttp
    reports only its own wrapper of it.
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
    """The URL without its query string, which for an image URL is a signed secret, and
    without any user and password in it."""
    if url.raw_user is not None or url.raw_password is not None:
        url = url.with_user(None)
    text = str(url)
    base, sep, _ = text.partition("?")
    return f"{base}?[redacted]" if sep else text


def json_body(payload: Mapping[str, Any]) -> Callable[[], bytes]:
    """A body factory for a JSON object, encoded once however often it is sent."""
    data = _JSON.encode(payload).encode()
    return lambda: data


class _ApiUrls:
    """The URLs of API paths under one base URL, each fixed path's built once."""

    def __init__(self, base_url: URL) -> None:
        self._base = str(base_url).rstrip("/")
        self._known: dict[str, URL] = {}

    def url(self, path: str) -> URL:
        if (url := self._known.get(path)) is None:
            url = URL(self._base + path, encoded=True)
            if len(self._known) < _KNOWN_URLS:  # paths with ids in them are not worth keeping
                self._known[path] = url
        return url


@functools.cache
def _user_agent() -> str:
    return (
        f"deepmode-async/{__version__} aiohttp/{aiohttp.__version__} "
        f"python/{platform.python_version()}"
    )


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
        backoff: SharedBackoff | None = None,  # shared with a store's clients
    ) -> None:
        self.base_url, self.backoff, self._urls = base_url, backoff, _ApiUrls(base_url)
        self.timeout = timeout
        self.retry = retry
        self._pool = Pool(max_connections, session)
        self._owns_pool = True
        self._plain_headers: Final = {"User-Agent": _user_agent(), "Accept-Encoding": ACCEPTED}
        self._key: Final = api_key.encode()
        self._start(default_headers)

    def _start(self, default_headers: Mapping[str, str]) -> None:
        """The state of this transport alone (not its pool's), fresh."""
        self._closed = False
        # Default headers go to the API only, like the key: they may carry secrets too.
        self._api_headers = {
            "User-Agent": _user_agent(),
            **default_headers,
            "Authorization": f"Bearer {self._key.decode()}",
        }
        self.default_headers = MappingProxyType(dict(default_headers))
        # The tasks of `send`s in flight, and those that `aclose` cancelled.
        self._calls: set[asyncio.Task[Any]] = set()
        self._closed_calls: set[asyncio.Task[Any]] = set()
        self._with_content_type: dict[str, dict[str, str]] = {}  # built once per type

    def derive(
        self, *, timeout: Timeout, retry: RetryPolicy, default_headers: Mapping[str, str]
    ) -> Transport:
        """A transport on the same pool (and everything else this one was given), with
        these options; closing it leaves this one and the pool open."""
        derived = copy.copy(self)  # whatever else a transport holds comes along as it is
        derived.timeout = timeout
        derived.retry = retry
        derived._owns_pool = False
        derived._start(default_headers)
        return derived

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
        return self._urls.url(path)

    @property
    def closed(self) -> bool:
        return self._closed or self._pool.closed

    async def aclose(self) -> None:
        """End the calls in flight, close the session if this transport created it; later
        calls raise."""
        self._closed = True
        if self._owns_pool:  # the pool and the back-off are the original's, not derived
            await self._pool.aclose()  # which ends the calls of derived transports too
            if self.backoff is not None:
                await self.backoff.aclose()
            return
        for task in self._calls:
            self._closed_calls.add(task)
            task.cancel()

    def forget_session(self) -> aiohttp.ClientSession | None:
        """Let go of the session without closing it (after a fork its loop is not ours)."""
        return self._pool.forget()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise DeepModeError("This client is closed; create a new one to make more calls")
        return self._pool.get()

    async def call(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        body: Callable[[], Any] | None = None,
        content_type: str | None = "application/json",
        timeout: Timeout,
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
        return await self.send(request, _read_json, timeout=timeout)

    def plain_request(self, url: URL) -> Request:
        """A GET to another host (the image host): no key, no default headers."""
        return Request("GET", url, True, self._plain_headers, decompress=False)

    async def send(
        self,
        request: Request,
        consume: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        *,
        timeout: Timeout,
    ) -> T:
        """Send `request` (again, as the retry policy allows) and `consume` a 2xx answer.

        `consume` runs within the attempt, so a connection lost while it reads the body
        (or its `CutShort`) is a failed attempt like any other. Inside a `pacing` scope
        the call shares slots and back-offs with the other calls of its batch.
        """
        task = asyncio.current_task()
        assert task is not None
        self._calls.add(task)
        self._pool.calls.add(task)
        try:
            return await self._send(request, consume, timeout)
        except asyncio.CancelledError:
            # Swallowed only when `aclose` alone cancelled the task, as asyncio.timeout
            # does (an anyio cancel scope per call measured 15-20 us of CPU more).
            closed = task in self._closed_calls or task in self._pool.closed_calls
            if closed and task.uncancel() == 0:
                raise DeepModeError("This client was closed during the call") from None
            raise
        finally:
            for calls in (self._calls, self._closed_calls, self._pool.calls):
                calls.discard(task)
            self._pool.closed_calls.discard(task)

    async def _send(
        self,
        request: Request,
        consume: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        timeout: Timeout,
    ) -> T:
        session = self._get_session()
        client_timeout = _client_timeout(timeout)
        pace = paced_call(self.backoff)
        state = self.retry.start(idempotent=request.idempotent)
        while True:
            await pace.enter()
            if self.closed or session.closed:  # closed meanwhile, e.g. during a backoff
                pace.failed()
                raise DeepModeError("This client (or its aiohttp session) is closed")
            try:
                result = await self._attempt(
                    session, request, consume, client_timeout, state.retries + 1
                )
            except APIError as error:
                delay = state.delay(error)
                pace.failed(
                    error, delay if delay is not None else self.retry.pause(error, state.retries)
                )
                if delay is None:
                    raise
                log.warning(
                    "%s failed (%s); retry %d of %d in %.2f s",
                    request.info,
                    _short(error),
                    state.retries + 1,
                    self.retry.max_retries,
                    delay,
                )
                if not pace.forgives(error):
                    state = state.increment()
                await pace.wait_to_retry(error, delay)
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
        payload = request.body() if request.body is not None else None
        try:
            async with session.request(
                request.method,
                request.url,
                data=payload,
                headers=request.headers,
                timeout=timeout,
                # Redirects are not followed: headers other than the key (default_headers)
                # must not reach another host, and signed URLs are not redirected.
                allow_redirects=False,
                raise_for_status=False,  # whatever the session was told: errors are ours
                auto_decompress=request.decompress,
                middlewares=middlewares_for(request.method),
            ) as response:
                status = response.status
                if not 200 <= status < 300:
                    body = await _read_capped(response, _ERROR_BODY_LIMIT)
                    if not request.decompress:
                        encoding = response.headers.get("Content-Encoding", "")
                        body = decoded_prefix(body, encoding, _ERROR_BODY_LIMIT)
                    body = self._redacted(body)
                    raise status_error(request.info, status, body, response.headers)
                record_answer(request, status, response.headers, started, attempt)
                return await consume(response)
        except DeepModeError:
            raise
        except Exception as exc:
            mapped = attempt_failure(exc, request.info, payload, closed=self.closed)
            if mapped is None:
                raise
            status, failure, cause = mapped
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


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most `limit` bytes of a body: an error page does not get to fill memory."""
    content = response.content
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if content.at_eof():  # a read more would only say so
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _read_json(response: aiohttp.ClientResponse) -> Any:
    what = f"{response.method} {response.url.path}"
    length = response.content_length
    if length is not None and length > _JSON_BODY_LIMIT:
        raise ResponseValidationError(f"{what} answered with {length} bytes, too many for JSON")
    return parse_json(await _read_capped(response, _JSON_BODY_LIMIT), what)


def _short(error: APIError) -> str:
    if isinstance(error, APIStatusError):
        return f"HTTP {error.status_code}"
    return type(error).__name__
