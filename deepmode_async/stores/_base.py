"""The store interface every store implements, and the parts the stores share.

A store keeps `bytes` values under `str` keys, grouped in namespaces (`"callbacks"`,
`"journal.run-42"`, `"backoff"`), with an optional time to live, and carries wake-up
messages between the processes that share it. It is the one place the SDK keeps what
must outlive a call: pending callbacks, a batch's journal, a back-off the server asked
for. Every method can be called from any event loop and any thread of the process.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import math
import numbers
import re
import sys
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Final, Self
from urllib.parse import unquote

from .. import _validate as check
from .._errors import StoreError, ValidationError

#: How many queued messages a subscription keeps for a reader that does not keep up;
#: past that, the oldest are dropped and `next()` reports the gap (returns None).
SUBSCRIPTION_BUFFER: Final = 10_000


class Subscription(abc.ABC):
    """Messages published on one channel, from `async with store.subscribe(channel)`.

    Wake-up semantics, as a condition variable has: every message published after
    `subscribe()` returned is delivered (once, in order) while the store is reachable.
    `next()` returns None when nothing arrived in time, and also, early, when messages
    may have been missed (the connection to the store was lost and re-established, or
    the reader fell more than `SUBSCRIPTION_BUFFER` messages behind). So a caller
    re-reads the state it waits for after every None, and a wait rides out an outage
    of the store: the subscription re-subscribes by itself.
    """

    @abc.abstractmethod
    async def next(self, timeout: float | None) -> bytes | None:
        """The next message, or None after `timeout` seconds (None: no limit) or a gap."""


class Store(abc.ABC):
    """A namespaced key-value store with expiry and pub/sub, shared by processes.

    Values are `bytes`, keys any text (`:` and non-ASCII included), namespaces
    non-empty text without `:`. `ttl` is in seconds: an expired record is invisible to
    every read and to `add` / `replace` (an `add` over it succeeds), and removed
    eventually. Each write sets the record's expiry afresh (`ttl=None`: none).
    A store that cannot be reached or fails raises `StoreError`; bad arguments raise
    `ValidationError`. `async with store:` closes it on the way out.
    """

    @abc.abstractmethod
    async def get(self, ns: str, key: str) -> bytes | None:
        """The live value of `key`, or None."""

    @abc.abstractmethod
    async def get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        """The live values of `keys`, in their order (None for each missing one)."""

    @abc.abstractmethod
    async def put(self, ns: str, key: str, value: bytes, *, ttl: float | None = None) -> None:
        """Set `key` to `value`, whatever was there."""

    async def put_many(
        self, ns: str, items: Sequence[tuple[str, bytes]], *, ttl: float | None = None
    ) -> None:
        """`put` of every `(key, value)` of `items`, in one trip where the store can.

        When it returns, all are written. Not atomic: a failure part way may leave
        some written. The stores of this package write them in one transaction (SQLite)
        or one pipelined round trip (Redis); this default puts them one by one.
        """
        for key, value in items:
            await self.put(ns, key, value, ttl=ttl)

    @abc.abstractmethod
    async def add(self, ns: str, key: str, value: bytes, *, ttl: float | None = None) -> bool:
        """Set `key` only if it has no live value; True when this call set it.

        Atomic across every process sharing the store: of many concurrent `add`s of
        one key, exactly one returns True.
        """

    async def add_and_publish(
        self, ns: str, key: str, value: bytes, channel: str, *, ttl: float | None = None
    ) -> bool:
        """`add`, and when this call set `key`, `publish` `value` on `channel`: a record
        and the news of it in one step (one round trip with Redis).

        When it raises `StoreError` the record may or may not have been set (the answer
        was lost): a repeat of the same `add` says which.
        """
        if not await self.add(ns, key, value, ttl=ttl):
            return False
        await self.publish(channel, value)
        return True

    @abc.abstractmethod
    async def replace(
        self, ns: str, key: str, expected: bytes, value: bytes, *, ttl: float | None = None
    ) -> bool:
        """Compare-and-set: set `key` to `value` only if its live value is `expected`.

        True when this call changed it; atomic across processes.
        """

    @abc.abstractmethod
    async def delete(self, ns: str, key: str) -> bool:
        """Remove `key`; True when it had a live value."""

    @abc.abstractmethod
    def items(self, ns: str) -> AsyncIterator[tuple[str, bytes]]:
        """Every live `(key, value)` of `ns`, fetched page by page (never all at once).

        Order unspecified. A record written or removed during the iteration may or may
        not be seen; with Redis, a key may (rarely) come twice while Redis resizes its
        table, as SCAN documents.
        """

    @abc.abstractmethod
    async def publish(self, channel: str, message: bytes) -> None:
        """Send `message` to every subscriber of `channel`, in every process."""

    @abc.abstractmethod
    def subscribe(self, channel: str) -> contextlib.AbstractAsyncContextManager[Subscription]:
        """Listen on `channel`: `async with store.subscribe(ch) as sub: await sub.next(5)`.

        Entering it raises `StoreError` when the store cannot be reached; once it has
        returned, every message published after is delivered (see `Subscription`).
        """

    @abc.abstractmethod
    def secret(self, name: str) -> bytes:
        """A random 32-byte secret shared by every process using this store.

        Synchronous (it blocks for one round trip the first time, then comes from this
        instance's cache), so synchronous code can sign with it. Created on first use;
        every process gets the same bytes.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections and threads. Idempotent; the store is unusable after."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# ----------------------------------------------------------------------------- checks


def check_ns(ns: object) -> str:
    """A namespace: non-empty text without ':' (which separates it from the key)."""
    if not isinstance(ns, str) or not ns or ":" in ns:
        raise ValidationError(f"a store namespace must be non-empty text without ':', not {ns!r}")
    return check.text("a store namespace", ns)


def check_items(
    ns: object, items: Sequence[tuple[str, bytes]], ttl: object
) -> tuple[list[tuple[str, bytes]], float | None]:
    """`put_many`'s arguments: the namespace, every `(key, value)`, and the ttl."""
    check_ns(ns)
    return [(check_key(key), check_value(value)) for key, value in items], check_ttl(ttl)


def check_address(ns: object, key: object) -> None:
    """A record's namespace and key (see `check_ns`, `check_key`)."""
    if (
        type(ns) is str
        and type(key) is str
        and ns
        and ":" not in ns
        and ns.isascii()
        and key.isascii()
    ):
        return  # the common case, on every store call: no more to look at
    check_ns(ns)
    check_key(key)


def check_key(key: object) -> str:
    if not isinstance(key, str):
        raise ValidationError(f"a store key must be a str, not {type(key).__name__}")
    return check.text("a store key", key)


def check_channel(channel: object) -> str:
    if not isinstance(channel, str) or not channel:
        raise ValidationError(f"a store channel must be non-empty text, not {channel!r}")
    return check.text("a store channel", channel)


def check_value(value: object) -> bytes:
    if type(value) is bytes:
        return value
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ValidationError(f"a store value must be bytes, not {type(value).__name__}")
    return bytes(value)


def check_ttl(ttl: object) -> float | None:
    """None (no expiry) or a positive, finite number of seconds."""
    if ttl is None:
        return None
    if type(ttl) is float and 0.0 < ttl < math.inf:
        return ttl
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < math.inf:
        raise ValidationError(f"ttl must be None or positive seconds, not {ttl!r}")
    try:
        return float(ttl)
    except OverflowError:  # an int beyond a float's range
        raise ValidationError(
            f"ttl must be None or positive seconds, at most {sys.float_info.max:g}"
        ) from None


def check_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    usable = isinstance(timeout, numbers.Real) and not isinstance(timeout, bool)
    if not usable or not timeout == timeout:  # NaN is not equal to itself
        raise ValidationError(f"timeout must be None or seconds, not {timeout!r}")
    try:
        return float(timeout)
    except OverflowError:  # an int beyond a float's range: no limit
        return None


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`, safe for a message or a repr.

    Found without parsing, so that a URL no parser accepts (a password with an
    unescaped `/`, `?` or `#` in it) is redacted too: the password is whatever lies
    between the first `:` after `scheme://` and the last `@`, and the value of a query
    parameter named `password` (as redis-py reads the name: decoded, any case).
    """
    text = _redact_query(url)
    parts = _userinfo(text)
    return text if parts is None else f"{parts[0]}://{parts[1]}:***@{parts[3]}"


def password_of(url: str) -> str:
    """The password in `url`'s user information as `redact_url` finds it ("" if none)."""
    parts = _userinfo(url)
    return "" if parts is None else parts[2]


def _userinfo(url: str) -> tuple[str, str, str, str] | None:
    """(scheme, user, password, what follows the last `@`), or None without a password."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, after = rest.rpartition("@")
    user, colon, password = userinfo.partition(":")
    return (scheme, user, password, after) if sep and at and colon else None


def _redact_query(url: str) -> str:
    base, mark, query = url.partition("?")
    if not mark:
        return url
    pieces = re.split(r"([&;])", query)  # separators kept, at the odd positions
    for at in range(0, len(pieces), 2):
        name, equals, _ = pieces[at].partition("=")
        if equals and unquote(name).strip().lower() == "password":
            pieces[at] = f"{name}=***"  # to the next separator, a '#' included
    return f"{base}?{''.join(pieces)}"


# ------------------------------------------------------------------ local subscriptions


class QueueSubscription(Subscription):
    """A subscription fed by `deliver()` from any thread, read on the loop it was made on.

    `deliver(None)` reports a gap (the reader re-reads its state); `end()`, the store's
    closing: a gap, then `StoreError` from every `next()` with nothing left to read.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._queue: collections.deque[bytes | None] = collections.deque()
        self._ready = asyncio.Event()
        self._ended = False

    def end(self) -> None:
        """The store was closed: wake the reader (a gap; its re-read fails), for good."""
        self._ended = True
        self.deliver(None)

    def deliver(self, message: bytes | None) -> None:
        """Queue `message` (or a gap, None); callable from any thread."""
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._push(message)
        else:
            # The loop may have ended; its subscriber with it.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._push, message)

    def _push(self, message: bytes | None) -> None:
        if len(self._queue) >= SUBSCRIPTION_BUFFER:
            self._queue.clear()
            message = None
        self._queue.append(message)
        self._ready.set()

    async def next(self, timeout: float | None) -> bytes | None:
        timeout = check_timeout(timeout)
        if not self._queue:
            if self._ended:
                raise StoreError("the store of this subscription was closed")
            if timeout is not None and timeout <= 0:
                return None
            try:
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError:
                return None
        message = self._queue.popleft()
        if not self._queue:
            self._ready.clear()
        return message


class Subscribers:
    """Local subscriptions by channel, fed from any thread (not locked: the caller's lock)."""

    def __init__(self) -> None:
        self.by_channel: dict[str, set[QueueSubscription]] = {}

    def add(self, channel: str, sub: QueueSubscription) -> None:
        self.by_channel.setdefault(channel, set()).add(sub)

    def remove(self, channel: str, sub: QueueSubscription) -> bool:
        """Forget `sub`; True when `channel` has no subscriber left."""
        subs = self.by_channel.get(channel)
        if subs is None:
            return True
        subs.discard(sub)
        if not subs:
            del self.by_channel[channel]
            return True
        return False

    def of(self, channel: str) -> list[QueueSubscription]:
        return list(self.by_channel.get(channel, ()))

    def everyone(self) -> list[QueueSubscription]:
        return [sub for subs in self.by_channel.values() for sub in subs]


def chunks(keys: Sequence[str], size: int) -> list[Sequence[str]]:
    return [keys[start : start + size] for start in range(0, len(keys), size)]
