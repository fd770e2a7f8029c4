"""Redis pub/sub for one event loop: one connection for all of its subscriptions.

A connection per subscription would cost a server connection per waiting callback, so
each loop shares one `PubSub` connection, read by one task that hands each message to
the local subscriptions of its channel. `subscribe()` returns once Redis has confirmed
the SUBSCRIBE, so every message published after is delivered. When the connection is
lost the reader reconnects with back-off, subscribes again to every channel, and then
reports the gap (`None`) to each subscription, whose owner re-reads what it waits for.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from .._errors import StoreError
from ._base import QueueSubscription

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

log: Final = logging.getLogger("deepmode_async")

_READ_TIMEOUT: Final = 1.0
_CONFIRM_TIMEOUT: Final = 10.0
_FIRST_DELAY: Final = 0.02
_MAX_DELAY: Final = 1.0


class _Expected:
    """A SUBSCRIBE sent and not yet confirmed; `gap`: tell the subscribers once it is."""

    def __init__(self, future: asyncio.Future[None], gap: bool) -> None:
        self.future = future
        self.gap = gap


class LoopPubSub:
    """The subscriptions of one event loop to one Redis (used on that loop only)."""

    def __init__(
        self,
        client: Redis,
        failures: tuple[type[BaseException], ...],
        describe: Callable[[BaseException], StoreError],
    ) -> None:
        self._client = client
        self._failures = failures
        self._describe = describe
        self._subs: dict[bytes, set[QueueSubscription]] = {}
        # Confirmations come in the order the SUBSCRIBEs were sent: one queue per channel.
        self._expected: dict[bytes, collections.deque[_Expected]] = {}
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def subscribe(self, channel: bytes, sub: QueueSubscription) -> None:
        """Add `sub` to `channel`; returns once Redis delivers the channel's messages."""
        joined = channel in self._subs
        self._subs.setdefault(channel, set()).add(sub)
        unsent: list[_Expected] = []
        try:
            if joined:
                pending = self._expected.get(channel)
                if pending:  # someone's SUBSCRIBE of it is still on its way
                    await asyncio.wait_for(asyncio.shield(pending[-1].future), _CONFIRM_TIMEOUT)
                return
            expected = self._expect(channel, gap=False)
            unsent.append(expected)
            async with self._lock:
                if self._pubsub is None:
                    self._pubsub = await self._open([channel])
                else:
                    await self._pubsub.subscribe(channel)
                unsent.clear()  # sent: its confirmation will come (or the connection dies)
                if self._reader is None or self._reader.done():
                    self._reader = asyncio.get_running_loop().create_task(self._read())
            await asyncio.wait_for(asyncio.shield(expected.future), _CONFIRM_TIMEOUT)
        except BaseException as exc:
            pending = self._expected.get(channel)
            for item in unsent:  # no confirmation will come for it
                if pending is not None and item in pending:
                    pending.remove(item)
                    if not pending:
                        del self._expected[channel]
            self.unsubscribe(channel, sub)
            if isinstance(exc, self._failures):
                raise self._describe(exc) from None
            if isinstance(exc, TimeoutError):
                raise StoreError("Redis did not confirm a SUBSCRIBE in time") from None
            raise

    def unsubscribe(self, channel: bytes, sub: QueueSubscription) -> None:
        subs = self._subs.get(channel)
        if subs is None:
            return
        subs.discard(sub)
        if subs:
            return
        del self._subs[channel]
        pubsub = self._pubsub
        if pubsub is not None and pubsub.connection is not None and not self._closed:
            # Sent by a task of its own: leaving a subscription must not wait on Redis.
            task = asyncio.get_running_loop().create_task(self._unsubscribe(pubsub, channel))
            task.add_done_callback(_ignore)

    async def _unsubscribe(self, pubsub: PubSub, channel: bytes) -> None:
        if channel not in self._subs:
            await pubsub.unsubscribe(channel)

    def _expect(self, channel: bytes, *, gap: bool) -> _Expected:
        expected = _Expected(asyncio.get_running_loop().create_future(), gap)
        self._expected.setdefault(channel, collections.deque()).append(expected)
        return expected

    async def _open(self, channels: list[bytes]) -> PubSub:
        pubsub = self._client.pubsub()
        try:
            await pubsub.subscribe(*channels)
        except BaseException:
            await _close(pubsub)
            raise
        return pubsub

    async def _read(self) -> None:
        while True:
            await self._read_while_needed()
            async with self._lock:
                if not self._closed and (self._subs or self._expected):
                    continue  # someone subscribed as this reader was leaving
                pubsub, self._pubsub = self._pubsub, None
                self._reader = None
            if pubsub is not None:
                await _close(pubsub)
            return

    async def _read_while_needed(self) -> None:
        delay = _FIRST_DELAY
        failing = False
        while not self._closed:
            pubsub = self._pubsub
            if pubsub is None:
                if not self._subs:
                    break
                async with self._lock:
                    if self._pubsub is None:
                        try:
                            self._pubsub = await self._reopen()
                        except self._failures:
                            await asyncio.sleep(delay)
                            delay = min(delay * 2, _MAX_DELAY)
                            continue
                delay = _FIRST_DELAY
                continue
            if not self._subs and not self._expected:
                break
            try:
                message = await pubsub.get_message(timeout=_READ_TIMEOUT)
            except self._failures as exc:
                if not failing:
                    log.warning("%s; subscriptions resume when it is back", self._describe(exc))
                failing = True
                await self._lost(pubsub)
                continue
            failing = False
            if message is not None:
                self._handle(message)

    async def _reopen(self) -> PubSub:
        channels = list(self._subs)
        for channel in channels:
            self._expect(channel, gap=True)
        try:
            return await self._open(channels)
        except BaseException:
            for channel in channels:
                pending = self._expected.get(channel)
                if pending:
                    pending.pop()
                    if not pending:
                        del self._expected[channel]
            raise

    async def _lost(self, pubsub: PubSub) -> None:
        if self._pubsub is pubsub:
            self._pubsub = None
        expected, self._expected = self._expected, {}
        error = StoreError("the connection to Redis was lost while subscribing")
        for pending in expected.values():
            for item in pending:
                if not item.future.done():
                    item.future.set_exception(error)
                    item.future.exception()  # retrieved: nobody else may be waiting
        await _close(pubsub)

    def _handle(self, message: dict[str, Any]) -> None:
        kind, channel = message["type"], message["channel"]
        if kind == "message":
            for sub in list(self._subs.get(channel, ())):
                sub.deliver(message["data"])
        elif kind == "subscribe":
            pending = self._expected.get(channel)
            item = pending.popleft() if pending else None
            if pending is not None and not pending:
                del self._expected[channel]
            if item is not None and not item.future.done():
                item.future.set_result(None)
            if item is None or item.gap:
                # A re-subscription (ours, or redis-py's own after a reconnect): messages
                # sent meanwhile are gone, so the subscribers re-read their state.
                for sub in list(self._subs.get(channel, ())):
                    sub.deliver(None)

    async def aclose(self) -> None:
        self._closed = True
        for subs in self._subs.values():
            for sub in subs:
                sub.end()
        reader, pubsub = self._reader, self._pubsub
        self._pubsub = None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if pubsub is not None:
            await _close(pubsub)


async def _close(pubsub: PubSub) -> None:
    try:
        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed in redis-py 8
    except Exception as exc:  # closing a broken connection may fail again; it is gone
        log.debug("closing a Redis pub/sub connection: %s", type(exc).__name__)


def _ignore(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
