"""`CallbackHub`: unguessable callback URLs, and the results that arrive on them, for one
process or for every process sharing a store.

Three layers, each knowing only those below:
- tokens (`_tokens`): a URL's last segment says its kind and expiry and proves that a
  process sharing the store issued it, so every process judges a delivery alone;
- the store (`_shared`): deliveries, discards and hand-outs, written with `add` so the
  first delivery wins in every process;
- this process (`_registry`, `_keeper`): its expectations, bounded by `max_pending`, and
  the waits on them, woken by a delivery received here or announced by the store.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Final, Literal, overload
from urllib.parse import urlsplit

from .. import _validate as check
from .._errors import CallbackNotFoundError, ResponseValidationError, StoreError, ValidationError
from .._types import Generation, Image, Model
from ..stores import MemoryStore, Store, as_store
from ._adapters import AsgiApp, AsgiHub, aiohttp_app
from ._keeper import UNKNOWN, Keeper, PendingCallback
from ._parsers import PARSERS, CallbackKind
from ._registry import Registry
from ._shared import NAMESPACE, Outcome
from ._tokens import KINDS, LATEST, Signer, TokenInfo

if TYPE_CHECKING:
    from aiohttp import web

    from ._serve import ServedHub

log: Final = logging.getLogger("deepmode_async")

_UNAVAILABLE: Final = (503, "the callback store is unavailable; deliver again later")


class CallbackHub:
    """Unguessable callback URLs under your app's public address, and what arrives there.

    `public_base_url` is where the API can reach the adapter mounted in your app
    (`aiohttp_app()` or `asgi_app()`); each expected callback gets its own URL below it.
    `store` (a store of `deepmode_async.stores`, or its URL) keeps the deliveries: the
    default `MemoryStore` is this process; an `SQLiteStore` file or a `RedisStore` is
    shared, so a delivery to any worker process (or machine) wakes the waiter in any
    other, and results outlive a restart (`resume`, `outstanding`).

    An expectation is kept for `ttl` seconds (model training can take a while), and a
    result until then; at most `max_pending` expectations are held in this process at
    once, so memory stays bounded. Bodies over `max_body_size` bytes are refused with 413.

    Answers to deliveries: 200 for a valid body once it is in the store (and for a
    repeat, in any process, which is ignored), 400 for a body that does not parse (the
    API may try again), 404 for an unknown, expired or discarded URL, 413 for a body too
    large, 503 when the store cannot be reached (the API tries again). Thread-safe.
    """

    def __init__(
        self,
        public_base_url: str,
        *,
        store: Store | str | None = None,
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
        self._owns_store = isinstance(store, str)
        self.store: Final[Store] = MemoryStore() if store is None else as_store(store)
        self._state: Registry[PendingCallback[Any]] = Registry(self.max_pending)
        self._keeper = Keeper(self.public_base_url, self.store, self._state)
        self._signer: Signer | None = None

    def __repr__(self) -> str:
        shared = "" if isinstance(self.store, MemoryStore) else f", store={self.store!r}"
        return f"CallbackHub({self.public_base_url!r}, pending={len(self._state.pending)}{shared})"

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
        the hub's). Its record goes to the store in the background (`saved()`).
        """
        if not isinstance(kind, str) or kind not in KINDS:
            raise ValidationError(
                f"kind must be 'model', 'generation' or 'upscale', not {check.shown(kind)}"
            )
        lifetime = self.ttl if ttl is None else check.seconds("ttl", ttl)
        info = TokenInfo(kind, min(time.time() + lifetime, LATEST))
        token = self._signing().issue(info.kind, info.expires_at)
        return self._keeper.expect(PendingCallback(self._keeper, info, token), lifetime)

    def resume(self, token: str) -> PendingCallback[Any]:
        """The expectation of `token` (a `PendingCallback.token`), in another process or
        after a restart; its `wait()` returns at once when the result has arrived.
        Raises `CallbackNotFoundError` for a token that no hub sharing this store
        issued, or one past its expiry (a result delivered before then is kept `ttl`
        longer, and `outstanding()` lists it)."""
        if not isinstance(token, str):
            raise ValidationError(f"token must be a str, not {check.shown(token)}")
        info = self._signing().read(token)
        if info is None or info.expires_at <= time.time():
            raise CallbackNotFoundError(
                "no callback with this token: unknown to this hub's store, or expired"
            )
        return self._handle(token, info)

    async def outstanding(self, kind: CallbackKind | None = None) -> list[PendingCallback[Any]]:
        """Every expectation (of `kind`, if given) in the store whose result no `wait()`
        has handed out, delivered (`.done`) or not, soonest to expire first: after a
        restart, the results whose waiter died (for training, the model ids, which the
        API cannot list). Raises `StoreError` when the store cannot be reached."""
        if kind is not None and kind not in KINDS:
            raise ValidationError(
                f"kind must be 'model', 'generation', 'upscale' or None, not {check.shown(kind)}"
            )
        registered, outcomes = await self._keeper.runner.run(self._read_all())
        # Handles this process does not hold yet: a store full of them must not fill
        # `max_pending`; a `wait()` on one holds it.
        signer, now = self._signing(), time.time()
        found: list[PendingCallback[Any]] = []
        for token in registered | outcomes.keys():
            info, outcome = signer.read(token), outcomes.get(token)
            if info is None or (kind is not None and info.kind != kind):
                continue
            if outcome is None and info.expires_at <= now:
                continue
            if outcome is not None and outcome.state != "delivered":
                continue
            pending = self._handle(token, info)
            if outcome is not None:
                self._keeper.settle(pending, outcome)
            found.append(pending)
        found.sort(key=lambda pending: pending.expires_at)
        return found

    async def _read_all(self) -> tuple[set[str], dict[str, Outcome]]:
        registered: set[str] = set()
        outcomes: dict[str, Outcome] = {}
        async for key, value in self.store.items(NAMESPACE):
            what, _, token = key.partition(":")
            if what == "p":
                registered.add(token)
            elif what == "d" and (outcome := Outcome.decode(value)) is not None:
                outcomes[token] = outcome
        return registered, outcomes

    def _handle(self, token: str, info: TokenInfo) -> PendingCallback[Any]:
        """The handle this process holds for `token`, or a new one it does not hold."""
        return self._state.get(token) or PendingCallback(self._keeper, info, token)

    def _signing(self) -> Signer:
        if self._signer is None:  # a race makes the same Signer twice: harmless
            self._signer = Signer(self.store.secret("callback-hub"))
        return self._signer

    def receive(self, token: str, body: bytes) -> tuple[int, str]:
        """Take one delivery for the URL ending in `token`: (HTTP status, detail).

        The blocking form of `areceive`, for a server thread that is not async.
        """
        return self._keeper.runner.blocking(self.areceive(token, body))

    async def areceive(self, token: str, body: bytes) -> tuple[int, str]:
        """Take one delivery for the URL ending in `token`: (HTTP status, detail).

        The adapters call this; it is public for serving the hub from another framework.
        A 200 means the result is in the store.
        """
        if not isinstance(token, str) or not isinstance(body, bytes | bytearray):
            raise ValidationError("receive() takes the token as str and the body as bytes")
        try:
            status, detail = await self._receive(token, bytes(body))
        except StoreError as error:
            log.warning("callback delivery refused with 503: %s", error)
            status, detail = _UNAVAILABLE
        log.debug("callback delivery -> %d", status)
        return status, detail

    async def _receive(self, token: str, body: bytes) -> tuple[int, str]:
        self._state.tidy()
        # A token held here was issued or checked by this process: no MAC to check.
        if (held := self._keeper.held(token)) is not None:
            info: TokenInfo | None = held.info
            if held.done:
                return 200, "already received"  # and already in the store
        else:
            info = self._signing().read(token)
        if info is None or info.expires_at <= time.time():
            return UNKNOWN
        if len(body) > self.max_body_size:
            detail = f"callback bodies are limited to {self.max_body_size} bytes"
            return await self._keeper.refuse(token, 413, detail)
        try:
            result = PARSERS[info.kind](body)
        except ResponseValidationError as error:
            return await self._keeper.refuse(token, 400, str(error))
        keep = max(self.ttl, info.expires_at - time.time())
        return await self._keeper.deliver(info, token, body, result, keep)

    def aiohttp_app(self) -> web.Application:
        """An aiohttp application serving the hub: mount it with `app.add_subapp(prefix,
        hub.aiohttp_app())` where `public_base_url` ends in `prefix`."""
        return aiohttp_app(self.areceive, self.max_body_size)

    def asgi_app(self) -> AsgiApp:
        """A plain ASGI application serving the hub (no framework needed): mount it in
        FastAPI or Starlette with `app.mount(prefix, hub.asgi_app())` where
        `public_base_url` ends in `prefix`."""
        return AsgiHub(self.areceive, self.max_body_size)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> ServedHub:
        """Serve the hub alone on a thread of its own at `host`:`port` (0: the port of
        `public_base_url` when that is on this machine, else any free one).

        For scripts and notebooks, where no app serves the hub and a blocking call must
        not starve it: `with hub.serve() as served:` (or `async with`); `served.url` is
        the local address to forward a public URL to.
        """
        from ._serve import ServedHub

        return ServedHub(self.aiohttp_app, self.public_base_url, host, port)

    def close(self) -> None:
        """Stop the hub's store thread, and close the store if the hub opened it from a
        URL. Call it from outside a wait on this hub, when the hub is done with."""
        if self._owns_store and not self._keeper.runner.inline:
            with contextlib.suppress(StoreError):
                self._keeper.runner.blocking(self.store.aclose())
        self._keeper.runner.stop()
