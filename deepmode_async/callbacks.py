"""Callback mode, made awaitable: parse what the API POSTs, and wait for it to arrive.

In callback mode the API answers at once and later POSTs the result (a trained `Model`,
a `Generation`, an upscaled `Image`) to a URL of yours. The parsers turn such a body
into the SDK's data classes. `CallbackHub` hands out unguessable URLs under your app's
public address, receives the POSTs through an aiohttp or ASGI adapter you mount in your
app, and lets code `await` what arrives:

```python
hub = CallbackHub("https://myapp.example.com/deepmode-callbacks")
app.mount("/deepmode-callbacks", hub.asgi_app())        # FastAPI / Starlette
model = await dm.models.create(images=photos, gender="woman",
                               model_type="amateur", callback=hub)  # waits for training
```

The callback URL is the only secret of a delivery (the API signs nothing), so it holds
256 random bits and is never shown in a repr or a log line.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import json
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Final, Generic, Literal, TypeAlias, TypeVar, overload
from urllib.parse import urlsplit

from . import _validate as check
from ._convert import parse_json, structure
from ._errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    CallbackTimeoutError,
    DeepModeError,
    ResponseValidationError,
    ValidationError,
)
from ._transport import request_was_sent
from ._types import Generation, Image, Model

if TYPE_CHECKING:
    from aiohttp import web

T = TypeVar("T")

log: Final = logging.getLogger("deepmode_async")

CallbackKind: TypeAlias = Literal["model", "generation", "upscale"]
CallbackBody: TypeAlias = bytes | str | Mapping[str, Any]

#: A delivery whose result was awaited is still acknowledged this long (the API may
#: repeat it), then forgotten.
_REMEMBER_DELIVERED: Final = 300.0
_NOTHING: Final = object()
_UNKNOWN: Final = (404, "unknown or expired callback URL")


# ----------------------------------------------------------------------------- parsers


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


_PARSERS: Final[dict[str, Callable[[bytes], Any]]] = {
    "model": parse_model_callback,
    "generation": parse_generation_callback,
    "upscale": parse_upscale_callback,
}


# ----------------------------------------------------------------------------- the hub


class PendingCallback(Generic[T]):
    """A callback the hub expects: pass `url` as `callback=`, then `await wait()`.

    Made by `CallbackHub.expect`. Its URL is a secret (anyone who has it can deliver a
    result), so the repr leaves it out.
    """

    def __init__(self, hub: CallbackHub, kind: CallbackKind, token: str, deadline: float) -> None:
        self._hub = hub
        self.kind: Final = kind
        self._token = token
        self.url: Final = f"{hub.public_base_url}/{token}"
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
        future: asyncio.Future[Any] = loop.create_future()
        with self._hub._lock:
            if self._failure is not None:
                raise self._failure
            if self._result is not _NOTHING:
                self._handed_out()
                return self._result  # type: ignore[no-any-return]
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
            with self._hub._lock, contextlib.suppress(ValueError):
                self._waiters.remove((loop, future))
        with self._hub._lock:
            self._handed_out()
        return result  # type: ignore[no-any-return]

    def discard(self) -> None:
        """Stop expecting this callback: a later delivery gets 404, waiters an error."""
        self._hub._forget(self, DeepModeError(f"the {self.kind} callback was discarded"))

    def _timeout_message(self, waited: float) -> str:
        message = f"no {self.kind} callback arrived within {max(waited, 0.0):.3g} s"
        if self._rejection is not None:
            message += f"; the last delivery was refused: {self._rejection}"
        return message

    def _handed_out(self) -> None:
        """Called with the lock held once the result is handed out: the expectation is
        over, but a repeat of the delivery is still acknowledged for a while."""
        self._hub._retire(self._token)

    def _settle(self, result: Any, failure: DeepModeError | None) -> None:
        """Called with the lock held: record the outcome and wake every waiter."""
        self._result, self._failure = result, failure
        for loop, future in self._waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed meanwhile
                loop.call_soon_threadsafe(_set_outcome, future, result, failure)
        self._waiters.clear()


def _set_outcome(future: asyncio.Future[Any], result: Any, failure: BaseException | None) -> None:
    if future.done():
        return
    if failure is not None:
        future.set_exception(failure)
    else:
        future.set_result(result)


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
        self._lock = threading.Lock()
        self._pending: dict[str, PendingCallback[Any]] = {}
        self._expiry: list[tuple[float, str]] = []  # a heap; stale entries are skipped
        # Tokens whose result was handed out, oldest first, with when to forget them.
        self._delivered: collections.OrderedDict[str, float] = collections.OrderedDict()

    def __repr__(self) -> str:
        return f"CallbackHub({self.public_base_url!r}, pending={len(self._pending)})"

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
        if not isinstance(kind, str) or kind not in _PARSERS:
            raise ValidationError(
                f"kind must be 'model', 'generation' or 'upscale', not {check.shown(kind)}"
            )
        lifetime = self.ttl if ttl is None else check.seconds("ttl", ttl)
        now = time.monotonic()
        token = secrets.token_urlsafe(32)  # 256 bits
        pending: PendingCallback[Any] = PendingCallback(self, kind, token, now + lifetime)
        with self._lock:
            self._purge(now)
            if len(self._pending) >= self.max_pending:
                raise DeepModeError(
                    f"{len(self._pending)} callbacks are pending, the hub's max_pending; "
                    "wait for some, discard them, or make a hub with a higher limit"
                )
            self._pending[token] = pending
            heapq.heappush(self._expiry, (pending._deadline, token))
            if len(self._expiry) > 2 * len(self._pending) + 64:
                # Handed-out and discarded tokens leave stale entries: rebuild the heap
                # now and then, so its size follows what is pending, not what has been.
                self._expiry = [(entry._deadline, key) for key, entry in self._pending.items()]
                heapq.heapify(self._expiry)
        return pending

    async def _submit_and_wait(
        self, kind: CallbackKind, submit: Callable[[str], Awaitable[object]]
    ) -> Any:
        """Expect a callback, `submit` the call with its URL, and wait for the result."""
        pending = self.expect(kind)
        try:
            await submit(pending.url)
            return await pending.wait()
        except BaseException as error:
            pending.discard()  # nobody else holds it: a later delivery gets 404
            if isinstance(error, APIError) and _may_have_acted(error):
                error.add_note(
                    f"DeepMode may have acted on this call and may still deliver its "
                    f"{kind} callback, which this call no longer waits for. To keep a "
                    "handle on such results, pass pending.url from hub.expect() as "
                    "callback= and await pending.wait()."
                )
            raise

    def receive(self, token: str, body: bytes) -> tuple[int, str]:
        """Take one delivery for the URL ending in `token`: (HTTP status, detail).

        The adapters call this; it is public for serving the hub from another framework.
        """
        if not isinstance(token, str) or not isinstance(body, bytes | bytearray):
            raise ValidationError("receive() takes the token as str and the body as bytes")
        with self._lock:
            self._purge(time.monotonic())
            pending = self._pending.get(token)
            delivered = token in self._delivered
        if pending is None:
            status, detail = (200, "already received") if delivered else _UNKNOWN
        elif len(body) > self.max_body_size:
            status, detail = 413, f"callback bodies are limited to {self.max_body_size} bytes"
            pending._rejection = detail
        elif pending.done:
            status, detail = 200, "already received"
        else:
            try:
                result = _PARSERS[pending.kind](body)
            except ResponseValidationError as error:
                status, detail = 400, str(error)
                pending._rejection = detail
            else:
                with self._lock:
                    if token in self._delivered or pending.done:  # a repeat, meanwhile
                        status, detail = 200, "already received"
                    elif self._pending.get(token) is not pending:  # discarded meanwhile
                        status, detail = _UNKNOWN
                    else:
                        pending._settle(result, None)
                        status, detail = 200, "received"
        log.debug("callback delivery -> %d", status)
        return status, detail

    def _forget(self, pending: PendingCallback[Any], failure: DeepModeError) -> None:
        with self._lock:
            if self._pending.get(pending._token) is pending:
                del self._pending[pending._token]
            if pending._failure is None and not pending.done:
                pending._settle(_NOTHING, failure)

    def _retire(self, token: str) -> None:
        """Called with the lock held: move a handed-out token to `_delivered`."""
        if self._pending.pop(token, None) is not None:
            self._delivered[token] = time.monotonic() + _REMEMBER_DELIVERED
            if len(self._delivered) > self.max_pending:
                self._delivered.popitem(last=False)

    def _purge(self, now: float) -> None:
        """Called with the lock held: drop what is past its deadline."""
        while self._expiry and self._expiry[0][0] <= now:
            _, token = heapq.heappop(self._expiry)
            pending = self._pending.get(token)
            if pending is not None and pending._deadline <= now:
                del self._pending[token]
        while self._delivered and next(iter(self._delivered.values())) <= now:
            self._delivered.popitem(last=False)

    # --------------------------------------------------------------------- adapters

    def aiohttp_app(self) -> web.Application:
        """An aiohttp application serving the hub: mount it with `app.add_subapp(prefix,
        hub.aiohttp_app())` where `public_base_url` ends in `prefix`."""
        from aiohttp import web

        async def deliver(request: web.Request) -> web.Response:
            try:
                body = await _read_at_most(
                    request.content.iter_chunked(64 * 1024), self.max_body_size
                )
            except web.RequestPayloadError as exc:  # e.g. a Content-Encoding it does not have
                return web.json_response({"detail": f"Malformed body: {exc}"}, status=400)
            status, detail = self.receive(request.match_info["token"], body)
            return web.json_response({"detail": detail}, status=status)

        async def refuse(request: web.Request) -> web.Response:
            detail = {"detail": _POST_ONLY}
            return web.json_response(detail, status=405, headers={"Allow": "POST"})

        app = web.Application()
        for path in ("/{token}", "/{token}/"):  # with a slash a proxy added (asgi_app: any)
            app.router.add_post(path, deliver)
            app.router.add_route("*", path, refuse)
        return app

    def asgi_app(self) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        """A plain ASGI application serving the hub (no framework needed): mount it in
        FastAPI or Starlette with `app.mount(prefix, hub.asgi_app())` where
        `public_base_url` ends in `prefix`."""
        return _AsgiHub(self)


Scope: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send: TypeAlias = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _AsgiHub:
    """The hub as an ASGI 3 application: POST {prefix}/{token}."""

    def __init__(self, hub: CallbackHub) -> None:
        self._hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: closing without accepting refuses them
        if scope["method"] != "POST":
            await _respond(send, 405, _POST_ONLY, allow=True)
            return
        # Mounted, the app sees its prefix in `root_path`, and in `path` too or not
        # depending on the framework and its version; behind a proxy the path may have
        # more in front. The token (the secret) is the last segment whatever comes before.
        token = str(scope["path"]).rstrip("/").rpartition("/")[2]

        disconnected = False

        async def chunks() -> Any:
            nonlocal disconnected
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected = True  # a cut-off body is not a delivery to judge
                    return
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        body = await _read_at_most(chunks(), self._hub.max_body_size)
        if not disconnected:
            status, detail = self._hub.receive(token, body)
            await _respond(send, status, detail)


async def _read_at_most(chunks: Any, limit: int) -> bytes:
    """The body, cut at one byte more than `limit` when longer: enough to refuse it
    without reading (and holding) the rest."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            return bytes(body[: limit + 1])
    return bytes(body)


_POST_ONLY: Final = "callbacks are delivered with POST"


async def _respond(send: Send, status: int, detail: str, *, allow: bool = False) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if allow:
        headers.append((b"allow", b"POST"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    """Served on its own (`uvicorn module:app`), the hub has nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _may_have_acted(error: APIError) -> bool:
    """Whether the server may have carried out a call that failed with `error`."""
    if isinstance(error, APIConnectionError):
        return request_was_sent(error)
    return isinstance(error, APIStatusError) and error.status_code >= 500
