"""`CallbackHub`: unguessable callback URLs, and the results that arrive on them.

What the hub knows of its expectations (pending, delivered, expired) lives in one
`_Expectations` object, the one place to change to keep them elsewhere.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any, Final, Generic, Literal, TypeVar, cast, overload
from urllib.parse import urlsplit

from .. import _validate as check
from .._errors import CallbackTimeoutError, DeepModeError, ResponseValidationError, ValidationError
from .._types import Generation, Image, Model
from ._adapters import AsgiApp, AsgiHub, aiohttp_app
from ._parsers import PARSERS, CallbackKind

if TYPE_CHECKING:
    from aiohttp import web

T = TypeVar("T")

log: Final = logging.getLogger("deepmode_async")

#: A delivery whose result was awaited is still acknowledged this long (the API may
#: repeat it), then forgotten.
_REMEMBER_DELIVERED: Final = 300.0
_NOTHING: Final = object()
_UNKNOWN: Final = (404, "unknown or expired callback URL")


class PendingCallback(Generic[T]):
    """A callback the hub expects: pass `url` as `callback=`, then `await wait()`.

    Made by `CallbackHub.expect`. Its URL is a secret (anyone who has it can deliver a
    result), so the repr leaves it out.
    """

    def __init__(
        self, state: _Expectations, base_url: str, kind: CallbackKind, token: str, deadline: float
    ) -> None:
        self._state = state
        self.kind: Final = kind
        self._token = token
        self.url: Final = f"{base_url}/{token}"
        self._deadline = deadline
        self._result: Any = _NOTHING
        self._failure: DeepModeError | None = None
        self._rejection: str | None = None  # why the last delivery was refused
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = []

    def __repr__(self) -> str:
        return f"<PendingCallback kind={self.kind!r} done={self.done}>"

    @property
    def done(self) -> bool:
        """True once a valid delivery has arrived."""
        return self._result is not _NOTHING

    async def wait(self, timeout: float | None = None) -> T:
        """The parsed result, once it arrives (at once if it already has).

        Waits at most `timeout` seconds, and never past the hub's `ttl` for this
        callback; then raises `CallbackTimeoutError` (whose `.pending` is this object,
        to wait again). Thread-safe: the delivery may arrive on another thread or loop.
        """
        if timeout is not None:
            check.seconds("timeout", timeout)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        lock = self._state.lock
        with lock:
            if self._failure is not None:
                raise self._failure
            if self._result is not _NOTHING:
                self._state.retire(self._token)
                return cast(T, self._result)
            self._waiters.append((loop, future))
        limit = self._deadline - time.monotonic()
        if timeout is not None:
            limit = min(limit, timeout)
        try:
            async with asyncio.timeout(max(limit, 0.0)):
                result = await future
        except TimeoutError:
            raise CallbackTimeoutError(self._timeout_message(limit), pending=self) from None
        finally:
            with lock, contextlib.suppress(ValueError):
                self._waiters.remove((loop, future))
        with lock:
            self._state.retire(self._token)
        return result

    def discard(self) -> None:
        """Stop expecting this callback: a later delivery gets 404, waiters an error."""
        failure = DeepModeError(f"the {self.kind} callback was discarded")
        with self._state.lock:
            self._state.remove(self)
            if self._failure is None and not self.done:
                self._settle(_NOTHING, failure)

    def _timeout_message(self, waited: float) -> str:
        message = f"no {self.kind} callback arrived within {max(waited, 0.0):.3g} s"
        if self._rejection is not None:
            message += f"; the last delivery was refused: {self._rejection}"
        return message

    def _settle(self, result: Any, failure: DeepModeError | None) -> None:
        """Called with the lock held: record the outcome and wake every waiter."""
        self._result, self._failure = result, failure
        for loop, future in self._waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed meanwhile
                loop.call_soon_threadsafe(_set_outcome, future, result, failure)
        self._waiters.clear()

    def _take(self, body: bytes, max_body_size: int) -> tuple[int, str]:
        """One delivery for this expectation, outside the lock: (status, detail)."""
        if len(body) > max_body_size:
            self._rejection = f"callback bodies are limited to {max_body_size} bytes"
            return 413, self._rejection
        if self.done:
            return 200, "already received"
        try:
            result = PARSERS[self.kind](body)
        except ResponseValidationError as error:
            self._rejection = str(error)
            return 400, self._rejection
        with self._state.lock:
            if self._state.delivered_already(self._token) or self.done:  # a repeat, meanwhile
                return 200, "already received"
            if not self._state.holds(self):  # discarded meanwhile
                return _UNKNOWN
            self._settle(result, None)
            return 200, "received"


def _set_outcome(future: asyncio.Future[Any], result: Any, failure: BaseException | None) -> None:
    if future.done():
        return
    if failure is not None:
        future.set_exception(failure)
    else:
        future.set_result(result)


class _Expectations:
    """The hub's state: what is pending (with its expiry) and what was handed out.

    Every method but `lock`'s users is called with `lock` held.
    """

    def __init__(self, max_pending: int) -> None:
        self.lock: Final = threading.Lock()
        self.max_pending = max_pending
        self.pending: dict[str, PendingCallback[Any]] = {}
        self.expiry: list[tuple[float, str]] = []  # a heap; stale entries are skipped
        # Tokens whose result was handed out, oldest first, with when to forget them.
        self.delivered: collections.OrderedDict[str, float] = collections.OrderedDict()

    def add(self, pending: PendingCallback[Any], token: str, deadline: float) -> None:
        self.purge(time.monotonic())
        if len(self.pending) >= self.max_pending:
            raise DeepModeError(
                f"{len(self.pending)} callbacks are pending, the hub's max_pending; "
                "wait for some, discard them, or make a hub with a higher limit"
            )
        self.pending[token] = pending
        heapq.heappush(self.expiry, (deadline, token))
        if len(self.expiry) > 2 * len(self.pending) + 64:
            # Handed-out and discarded tokens leave stale entries: rebuild the heap now
            # and then, so its size follows what is pending, not what has been.
            self.expiry = [(entry._deadline, key) for key, entry in self.pending.items()]
            heapq.heapify(self.expiry)

    def lookup(self, token: str) -> tuple[PendingCallback[Any] | None, bool]:
        """The expectation of `token` if pending, and whether it was delivered already."""
        self.purge(time.monotonic())
        return self.pending.get(token), token in self.delivered

    def holds(self, pending: PendingCallback[Any]) -> bool:
        return self.pending.get(pending._token) is pending

    def delivered_already(self, token: str) -> bool:
        return token in self.delivered

    def remove(self, pending: PendingCallback[Any]) -> None:
        if self.holds(pending):
            del self.pending[pending._token]

    def retire(self, token: str) -> None:
        """A handed-out token: no longer pending, but a repeat is acknowledged a while."""
        if self.pending.pop(token, None) is not None:
            self.delivered[token] = time.monotonic() + _REMEMBER_DELIVERED
            if len(self.delivered) > self.max_pending:
                self.delivered.popitem(last=False)

    def purge(self, now: float) -> None:
        """Drop what is past its deadline."""
        while self.expiry and self.expiry[0][0] <= now:
            _, token = heapq.heappop(self.expiry)
            pending = self.pending.get(token)
            if pending is not None and pending._deadline <= now:
                del self.pending[token]
        while self.delivered and next(iter(self.delivered.values())) <= now:
            self.delivered.popitem(last=False)


class CallbackHub:
    """Unguessable callback URLs under your app's public address, and what arrives there.

    `public_base_url` is where the API can reach the adapter mounted in your app
    (`aiohttp_app()` or `asgi_app()`); each expected callback gets its own URL below it.
    An expectation is kept for `ttl` seconds (model training can take a while), then
    forgotten; at most `max_pending` are kept at once, so memory stays bounded. Bodies
    over `max_body_size` bytes are refused with 413.

    Answers to deliveries: 200 for a valid body (and for a repeat of one already
    received, which is ignored), 400 for a body that does not parse (the API may try
    again), 404 for an unknown, expired or discarded URL, 413 for a body too large.
    The hub is thread-safe: a blocking `Client` may wait while a server thread delivers.
    """

    def __init__(
        self,
        public_base_url: str,
        *,
        ttl: float = 3 * 3600.0,
        max_pending: int = 10_000,
        max_body_size: int = 1024 * 1024,
    ) -> None:
        url = check.http_url("public_base_url", public_base_url)
        parts = urlsplit(url)
        if parts.query or parts.fragment or "#" in url or "?" in url:
            raise ValidationError("public_base_url must not have a query string or fragment")
        self.public_base_url: Final = url.rstrip("/")
        self.ttl: Final = check.seconds("ttl", ttl)
        self.max_pending: Final = check.positive("max_pending", max_pending)
        self.max_body_size: Final = check.positive("max_body_size", max_body_size)
        self._state = _Expectations(self.max_pending)

    def __repr__(self) -> str:
        return f"CallbackHub({self.public_base_url!r}, pending={len(self._state.pending)})"

    @overload
    def expect(
        self, kind: Literal["model"], *, ttl: float | None = None
    ) -> PendingCallback[Model]: ...
    @overload
    def expect(
        self, kind: Literal["generation"], *, ttl: float | None = None
    ) -> PendingCallback[Generation]: ...
    @overload
    def expect(
        self, kind: Literal["upscale"], *, ttl: float | None = None
    ) -> PendingCallback[Image]: ...
    def expect(self, kind: CallbackKind, *, ttl: float | None = None) -> PendingCallback[Any]:
        """Expect one callback of `kind` ("model", "generation" or "upscale").

        Returns a `PendingCallback` with a fresh URL; kept for `ttl` seconds (default:
        the hub's).
        """
        if not isinstance(kind, str) or kind not in PARSERS:
            raise ValidationError(
                f"kind must be 'model', 'generation' or 'upscale', not {check.shown(kind)}"
            )
        lifetime = self.ttl if ttl is None else check.seconds("ttl", ttl)
        deadline = time.monotonic() + lifetime
        token = secrets.token_urlsafe(32)  # 256 bits
        pending: PendingCallback[Any] = PendingCallback(
            self._state, self.public_base_url, kind, token, deadline
        )
        with self._state.lock:
            self._state.add(pending, token, deadline)
        return pending

    def receive(self, token: str, body: bytes) -> tuple[int, str]:
        """Take one delivery for the URL ending in `token`: (HTTP status, detail).

        The adapters call this; it is public for serving the hub from another framework.
        """
        if not isinstance(token, str) or not isinstance(body, bytes | bytearray):
            raise ValidationError("receive() takes the token as str and the body as bytes")
        with self._state.lock:
            pending, delivered = self._state.lookup(token)
        if pending is None:
            status, detail = (200, "already received") if delivered else _UNKNOWN
        else:
            status, detail = pending._take(bytes(body), self.max_body_size)
        log.debug("callback delivery -> %d", status)
        return status, detail

    def aiohttp_app(self) -> web.Application:
        """An aiohttp application serving the hub: mount it with `app.add_subapp(prefix,
        hub.aiohttp_app())` where `public_base_url` ends in `prefix`."""
        return aiohttp_app(self.receive, self.max_body_size)

    def asgi_app(self) -> AsgiApp:
        """A plain ASGI application serving the hub (no framework needed): mount it in
        FastAPI or Starlette with `app.mount(prefix, hub.asgi_app())` where
        `public_base_url` ends in `prefix`."""
        return AsgiHub(self.receive, self.max_body_size)
