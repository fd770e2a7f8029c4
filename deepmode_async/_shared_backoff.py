"""The shared back-off: a wait the server asks one client for holds the new calls of
every client sharing a store, so N processes of one account make one pause.

A pause is a deadline on the wall clock (`time.time()`), the one clock that machines
share (through NTP); a monotonic clock means nothing to another machine. A deadline
from a clock that runs ahead is held for at most `cap` seconds (the retry policy's
`retry_after_cap`), so a skewed machine cannot stall the others for long. Each pause is
pushed on the store's channel and written under the account's key with a time to live,
so a client that starts later sees it on its first look. Each client listens on that
channel (one task per event loop it runs on) and keeps the latest deadline in memory:
a call with no pause in force costs a comparison, never a trip to the store.

The store is advisory. One that is down leaves each client to its own back-off (its
retry policy, and the pauses it was told of itself); that is logged once per outage,
never raised into a call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from typing import Final

from ._errors import StoreError
from .stores import Store

log: Final = logging.getLogger("deepmode_async")

NAMESPACE: Final = "backoff"
#: How long a first call waits for its client's first look in the store (a store that
#: does not answer in time is looked at in the background, and the calls go on).
_FIRST_LOOK: Final = 1.0
#: Seconds between tries to reach a store that could not be reached.
_RELISTEN: Final = 5.0
#: A deadline later than the known one by less than this is not news worth a push.
_NEWS: Final = 0.05
#: Tries to write a pause that other clients keep writing over meanwhile.
_WRITE_TRIES: Final = 8


def _encode(until: float) -> bytes:
    return repr(until).encode()


def _decode(raw: bytes) -> float | None:
    try:
        until = float(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None  # not a deadline of ours: ignored, not fatal
    return until if math.isfinite(until) else None


class SharedBackoff:
    """The pause of every client that shares `store` for one account (`scope`, a text
    naming the API and the key: only its hash is kept, and used as the store's key)."""

    def __init__(self, store: Store, scope: str, *, cap: float, owns_store: bool) -> None:
        self.store: Final = store
        self._key: Final = hashlib.sha256(scope.encode()).hexdigest()[:32]
        self._channel: Final = f"{NAMESPACE}:{self._key}"
        self._cap = cap
        self._owns_store = owns_store
        #: The latest deadline known here (`time.time()`); 0: none.
        self.until = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None  # the listener's
        self._ready_on: asyncio.AbstractEventLoop | None = None  # first look done there
        self._looked = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._announcer: asyncio.Task[None] | None = None
        self._to_announce = 0.0
        self._down = False

    def __repr__(self) -> str:
        return f"SharedBackoff(store={self.store!r})"

    def clear(self) -> bool:
        """True when a call may start at once: this loop's listener has had its first
        look and no pause is in force. The hot path: no store, no await."""
        return self._ready_on is asyncio.get_running_loop() and self.until <= time.time()

    async def hold(self) -> None:
        """Wait until no pause is in force (starting this loop's listener first)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._start(loop)
        if self._ready_on is not loop:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_FIRST_LOOK):
                    await self._looked.wait()
            self._ready_on = loop
        # A deadline, not an event: it may move on while we sleep, so look again after.
        while (pause := self.until - time.time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(pause)

    def told(self, pause: float) -> None:
        """A call of this client was told to wait `pause` seconds: hold every call here
        from now on, and announce the pause to the others unless it is old news."""
        if not pause > 0:
            return
        until = time.time() + pause
        news = until > self.until + _NEWS
        self.until = max(self.until, until)
        if not news or self._loop is None:
            return
        self._to_announce = max(self._to_announce, until)
        if self._announcer is None or self._announcer.done():
            self._announcer = self._loop.create_task(self._announce())

    def forget(self) -> None:
        """Drop the tasks of a loop that is gone (in a forked child) without touching them."""
        self._loop = self._ready_on = self._listener = self._announcer = None

    async def aclose(self) -> None:
        """Stop listening, and close the store if it was opened from a URL here."""
        tasks = [task for task in (self._listener, self._announcer) if task is not None]
        self.forget()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_store:
            await self.store.aclose()

    # ----------------------------------------------------------------- in the background

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._listener is not None:
            self._listener.cancel()
        self._loop, self._ready_on = loop, None
        self._looked = asyncio.Event()
        self._listener = loop.create_task(self._listen(self._looked))

    def _learn(self, raw: bytes | None) -> None:
        until = None if raw is None else _decode(raw)
        if until is not None:
            self.until = max(self.until, min(until, time.time() + self._cap))

    async def _listen(self, looked: asyncio.Event) -> None:
        while True:
            try:
                # Subscribed before the look, so that no pause falls between the two.
                async with self.store.subscribe(self._channel) as sub:
                    self._learn(await self.store.get(NAMESPACE, self._key))
                    self._reachable()
                    looked.set()
                    while True:
                        message = await sub.next(None)
                        if message is None:  # messages may have been missed: look again
                            message = await self.store.get(NAMESPACE, self._key)
                            self._reachable()
                        self._learn(message)
            except Exception as error:
                self._unreachable(error)
                looked.set()
            await asyncio.sleep(_RELISTEN)

    async def _announce(self) -> None:
        announced = 0.0
        while self._to_announce > announced:
            announced = self._to_announce
            message = _encode(announced)
            try:
                await self.store.publish(self._channel, message)
                await self._keep_latest(announced, message)
            except Exception as error:
                self._unreachable(error)
                return
            self._reachable()

    async def _keep_latest(self, until: float, message: bytes) -> None:
        """Write the pause `until` under the account's key, unless a later one is there:
        another client's, told at the same time, must not be cut short by this one for
        the clients that look later."""
        for _ in range(_WRITE_TRIES):  # each lost race means another pause was written
            ttl = until - time.time()
            if ttl <= 0:
                return
            found = await self.store.get(NAMESPACE, self._key)
            if found is None:
                if await self.store.add(NAMESPACE, self._key, message, ttl=ttl):
                    return
                continue
            known = _decode(found)
            if known is None or known < until:
                if await self.store.replace(NAMESPACE, self._key, found, message, ttl=ttl):
                    return
                continue
            # A later deadline is there, perhaps from a clock ahead of ours, whose record
            # lives only as long as that client's pause: kept, and kept until its
            # deadline as this clock reads it (capped), or this pause's end if later.
            keep = max(ttl, min(known - time.time(), self._cap))
            if await self.store.replace(NAMESPACE, self._key, found, found, ttl=keep):
                return

    def _unreachable(self, error: Exception) -> None:
        if self._down:
            return
        self._down = True
        # A store's own errors never show a password; another's text might.
        detail = str(error) if isinstance(error, StoreError) else type(error).__name__
        log.warning(
            "shared back-off: the store %r cannot be reached (%s); each client backs "
            "off on its own until it is back",
            self.store,
            detail,
        )

    def _reachable(self) -> None:
        if self._down:
            self._down = False
            log.info("shared back-off: the store %r is reachable again", self.store)
