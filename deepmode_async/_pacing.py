"""Pacing: the calls of a batch slow down together when the server asks them to.

A `Pacer` is shared by the calls of one batch; a call finds it by context, not by an
argument: the batch runs each call inside `with pacing(pacer):`, and the transport
asks `paced_call()` at the start of each call. A call outside any such scope is on its
own: it waits out its own delays and shares no slots. A client with a store holds
each try of its calls, in a batch or not, while a pause it shares is in force.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeAlias

from ._errors import APIError
from ._retry import asks_to_wait, server_asks_to_wait
from ._shared_backoff import SharedBackoff

#: Rate-limited tries of one call forgiven (not counted as retries) at most: a server
#: that refuses one call for good while letting others through must not stall a batch.
_MAX_FORGIVEN: Final = 8

#: Awaited once a call has its slot, before its first try goes out (see `pacing`).
BeforeSend: TypeAlias = Callable[[], Awaitable[None]]


class _Scope:
    """What a `pacing` scope gives the calls made in it."""

    __slots__ = ("before_send", "pacer")

    def __init__(self, pacer: Pacer, before_send: BeforeSend | None) -> None:
        self.pacer = pacer
        self.before_send = before_send  # for the scope's first call only


_CURRENT: Final[contextvars.ContextVar[_Scope | None]] = contextvars.ContextVar(
    "deepmode_async_pacer", default=None
)


class pacing:
    """Pace every call made inside this scope (in this task, and in the tasks it starts
    meanwhile) with `pacer`'s other calls: open it in each task of a batch. (A class, not
    a `contextlib.contextmanager`: a batch opens one a call, and a generator costs more.)

    `before_send`, when given, is awaited by the scope's first call once it has its
    slot and the pauses in force then are over, just before its first try: what must
    be done before a request may reach the server (a journal's record that it is
    sent), and not while it still waits (a call stopped while waiting was never sent).
    Should it raise, the call fails with that error and nothing is sent.
    """

    __slots__ = ("_scope", "_token")

    def __init__(self, pacer: Pacer, before_send: BeforeSend | None = None) -> None:
        self._scope = _Scope(pacer, before_send)

    def __enter__(self) -> Pacer:
        self._token = _CURRENT.set(self._scope)
        return self._scope.pacer

    def __exit__(self, *exc_info: object) -> None:
        _CURRENT.reset(self._token)


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
        self._waiting = 0  # calls waiting on `_changed` for a slot

    def call(self, before_send: BeforeSend | None = None) -> PacedCall:
        """The pacing of one call, for all of its attempts."""
        return _SharedCall(self, before_send)

    def _take(self) -> int | None:
        """A slot now, if one is free and no pause is in force: the batch's wave; else
        None (then `_enter` waits for one). No coroutine for the common case."""
        if self.in_flight < self.limit and self._resume_at <= time.monotonic():
            self.in_flight += 1
            return self._wave
        return None

    async def _enter(self) -> int:
        while (wave := self._take()) is None:
            pause = self._resume_at - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            elif self.in_flight >= self.limit:
                self._waiting += 1
                try:
                    await self._changed.wait()
                finally:
                    self._waiting -= 1
        return wave

    def _leave(self, wave: int, error: APIError | None, pause: float, *, succeeded: bool) -> None:
        self.in_flight -= 1
        if succeeded:
            self.successes += 1
            self._streak += 1
            if self._streak >= self.limit and self.limit < self.ceiling:
                self.limit += 1
                self._streak = 0
        elif error is not None and asks_to_wait(error):
            if wave == self._wave:
                self.limit = max(1, self.limit // 2)
                self._wave += 1
                self._streak = 0
            self._resume_at = max(self._resume_at, time.monotonic() + pause)
        if self._waiting:  # wake every waiter to look again; few enough to be cheap
            self._changed.set()
            self._changed = asyncio.Event()


class PacedCall:
    """One call's tries, on its own: no slots to share, and it waits out its own delays.

    `Pacer.call` gives the shared kind; the transport drives either the same way.
    """

    async def enter(self) -> None:
        """Wait for a slot (and for any pause the batch is in)."""

    def succeeded(self) -> None:
        """Give the slot back after a success."""

    def failed(self, error: APIError | None = None, pause: float = 0.0) -> None:
        """Give the slot back after a failure; an `error` asking to wait (429, 503)
        holds the whole batch back for `pause` seconds."""

    def forgives(self, error: APIError) -> bool:
        """Whether the try that failed with `error` is not counted as a retry."""
        return False

    async def wait_to_retry(self, error: APIError, delay: float) -> None:
        """Wait `delay` seconds before the next try after `error`."""
        await asyncio.sleep(delay)


class _SharedCall(PacedCall):
    """One call's tries under a `Pacer`."""

    def __init__(self, pacer: Pacer, before_send: BeforeSend | None) -> None:
        self._pacer = pacer
        self._before_send = before_send
        self._wave = 0
        self._successes = pacer.successes  # the batch's, at this call's previous try
        self._forgiven = 0

    async def enter(self) -> None:
        wave = self._pacer._take()  # a free slot: no coroutine to await
        self._wave = wave if wave is not None else await self._pacer._enter()
        if self._before_send is not None:
            before, self._before_send = self._before_send, None
            try:
                await before()
            except BaseException:
                self.failed()  # the slot back: nothing was sent
                raise

    def succeeded(self) -> None:
        self._pacer._leave(self._wave, None, 0.0, succeeded=True)

    def failed(self, error: APIError | None = None, pause: float = 0.0) -> None:
        self._pacer._leave(self._wave, error, pause, succeeded=False)

    def forgives(self, error: APIError) -> bool:
        if not asks_to_wait(error):
            return False
        progressed = self._pacer.successes != self._successes
        self._successes = self._pacer.successes
        if progressed and self._forgiven < _MAX_FORGIVEN:
            self._forgiven += 1
            return True
        return False

    async def wait_to_retry(self, error: APIError, delay: float) -> None:
        if not asks_to_wait(error):
            await asyncio.sleep(delay)
        # Else `failed` set the batch's pause: the next `enter` waits with everyone else.


_ALONE: Final = PacedCall()


class _HeldCall(PacedCall):
    """One call's tries, paced as `inner` says, that also wait out the pause shared
    through a store and share the waits the server asks this call for."""

    def __init__(self, inner: PacedCall, backoff: SharedBackoff) -> None:
        self._inner = inner
        self._backoff = backoff

    async def enter(self) -> None:
        if not self._backoff.clear():
            await self._backoff.hold()
        await self._inner.enter()

    def succeeded(self) -> None:
        self._inner.succeeded()

    def failed(self, error: APIError | None = None, pause: float = 0.0) -> None:
        self._inner.failed(error, pause)
        if error is not None and server_asks_to_wait(error):
            self._backoff.told(pause)

    def forgives(self, error: APIError) -> bool:
        return self._inner.forgives(error)

    async def wait_to_retry(self, error: APIError, delay: float) -> None:
        await self._inner.wait_to_retry(error, delay)


def paced_call(backoff: SharedBackoff | None = None) -> PacedCall:
    """The pacing of a call starting now: its batch's, or none when it is on its own;
    held by `backoff` too, when its client shares one."""
    scope = _CURRENT.get()
    if scope is None:
        call = _ALONE
    else:
        before_send, scope.before_send = scope.before_send, None  # the first call's
        call = scope.pacer.call(before_send)
    return call if backoff is None else _HeldCall(call, backoff)
