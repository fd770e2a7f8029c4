"""`PendingCallback`, and the `Keeper` that settles it from deliveries and the store.

A delivery received in this process settles its expectation here directly; one received
by another process sharing the store reaches this process through the store's channel
(a listener runs while someone here waits), or through a look in the store when a wait
begins and every few seconds (what a lost message or an outage hid).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import time
import weakref
from typing import Any, Final, Generic, TypeVar
from urllib.parse import urlsplit

from .. import _validate as check
from .._errors import CallbackTimeoutError, DeepModeError, ResponseValidationError, StoreError
from ..stores import Store
from ._parsers import PARSERS, CallbackKind
from ._registry import Registry
from ._shared import (
    CHANNEL,
    NAMESPACE,
    Outcome,
    Runner,
    encode_registration,
    log_failure,
    outcome_key,
    registration_key,
    rejection_key,
)
from ._tokens import Held, TokenInfo

T = TypeVar("T")

log: Final = logging.getLogger("deepmode_async")

_NOTHING: Final = object()
_NEIGHBOURS: Final[weakref.WeakKeyDictionary[Store, weakref.WeakSet[Keeper]]] = (
    weakref.WeakKeyDictionary()
)
UNKNOWN: Final = (404, "unknown or expired callback URL")
#: A listener with waiters looks in the store this often, in case a message was missed.
_RECHECK: Final = 2.0
#: The longest a store may stall the look a wait begins with, whatever its timeout.
_LOOK: Final = 0.25
#: The longest marking a result handed out may delay the `wait()` that returns it.
_MARK: Final = 1.0
_PAGE: Final = 500


class PendingCallback(Generic[T]):
    """A callback the hub expects: pass `url` as `callback=`, then `await wait()`.

    Made by `CallbackHub.expect` (or found again by `resume` and `outstanding`). `token`
    is the URL's last segment and a secret (anyone who has it can deliver a result), so
    the repr leaves both out. `expires_at` is when deliveries stop being accepted.
    """

    def __init__(self, keeper: Keeper, info: TokenInfo, token: str) -> None:
        self._keeper = keeper
        self._info: Final = info
        self.kind: Final[CallbackKind] = info.kind
        self.token: Final = token
        self.url: Final = f"{keeper.public_base_url}/{token}"
        self._deadline = time.monotonic() + (info.expires_at - time.time())
        self._result: Any = _NOTHING
        self._outcome: Outcome | None = None  # as stored, to mark it handed out
        self._failure: DeepModeError | None = None
        self._rejection: str | None = None  # why the last delivery here was refused
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = []
        self._saved: Any = None  # the write of its registration (a concurrent Future)
        # Held by this process since `expect()` made it: with a MemoryStore, every
        # delivery has settled it directly, so a wait need not look in the store.
        self._held_throughout = False

    def __repr__(self) -> str:
        return f"<PendingCallback kind={self.kind!r} done={self.done}>"

    @property
    def expires_at(self) -> datetime.datetime:
        """When deliveries stop being accepted (an aware datetime, in UTC)."""
        return datetime.datetime.fromtimestamp(self._info.expires_at, datetime.UTC)

    @property
    def done(self) -> bool:
        """True once this process knows a valid delivery has arrived."""
        return self._result is not _NOTHING

    async def saved(self) -> None:
        """Wait until the expectation is in the store, where `outstanding()` in any
        process (or after a restart) finds it; `callback=hub` does this before sending.
        Raises `StoreError` when the store cannot be reached."""
        if self._saved is not None:
            await asyncio.wrap_future(self._saved)

    async def wait(self, timeout: float | None = None) -> T:
        """The parsed result, once it arrives in any process sharing the store (at once
        if it already has).

        Waits at most `timeout` seconds, and never past `expires_at`; then raises
        `CallbackTimeoutError` (whose `.pending` is this object, to wait again). A store
        outage shorter than the wait is ridden out, and a store that stalls does not
        hold the wait past its time. Thread-safe: the delivery may arrive on another
        thread, loop or process.
        """
        if timeout is not None:
            check.seconds("timeout", timeout)
        keeper = self._keeper
        if self._failure is not None:
            raise self._failure
        if not self.done and (held := keeper.hold(self)) is not self:
            result: T = await held.wait(timeout)  # this process holds that token already
            return result
        with keeper.registry.lock:
            if self._failure is not None:
                raise self._failure
            known = self._result is not _NOTHING
            if not known:
                loop = asyncio.get_running_loop()
                future: asyncio.Future[Any] = loop.create_future()
                self._waiters.append((loop, future))
                keeper.waiting += 1
        if not known:
            try:
                await self._wait_for(future, timeout)
            finally:
                with keeper.registry.lock:
                    self._waiters.remove((loop, future))
                    keeper.waiting -= 1
        await keeper.hand_out(self)
        return self._result  # type: ignore[no-any-return]

    async def _wait_for(self, future: asyncio.Future[Any], timeout: float | None) -> None:
        keeper = self._keeper
        started = time.monotonic()
        limit = self._deadline - started
        if timeout is not None:
            limit = min(limit, timeout)
        keeper.listen()
        # Delivered before this wait began, perhaps elsewhere (or, resumed, long ago):
        # a look even when no time is left, but a look the store cannot stall.
        if keeper.runner.inline:
            if not self._held_throughout:
                await keeper.look(self)  # a MemoryStore never stalls
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(limit, _LOOK)):
                    await keeper.look(self)
        try:
            async with asyncio.timeout(max(limit - (time.monotonic() - started), 0.0)):
                await future
        except TimeoutError:
            raise await keeper.timed_out(self, limit) from None

    def release(self) -> None:
        """Stop holding this expectation in this process (it no longer counts toward
        `max_pending`) but keep it in the store: a delivery is still accepted and kept,
        and `hub.outstanding()` or `hub.resume(token)` finds it; `wait()` holds it
        again. `callback=hub` calls that fail after the API may have acted do this, so
        no paid result is lost."""
        self._keeper.release(self)

    def discard(self) -> None:
        """Stop expecting this callback: a later delivery gets 404 in every process
        sharing the store, waiters get an error, and a stored result is dropped."""
        self._keeper.discard(self)

    def _settle(self, result: Any, failure: DeepModeError | None) -> None:
        """Called with the registry's lock held: record the outcome, wake every waiter."""
        self._result, self._failure = result, failure
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        for loop, future in self._waiters:
            if loop is here:  # no need to wake this thread's own loop through its pipe
                loop.call_soon(_set_outcome, future, result, failure)
                continue
            with contextlib.suppress(RuntimeError):  # that loop has closed meanwhile
                loop.call_soon_threadsafe(_set_outcome, future, result, failure)


def _set_outcome(future: asyncio.Future[Any], result: Any, failure: BaseException | None) -> None:
    if future.done():
        return
    if failure is not None:
        future.set_exception(failure)
    else:
        future.set_result(result)


class Keeper:
    """Settles this process's expectations from deliveries and from the store, and keeps
    their outcomes there (see `_shared` for the records)."""

    def __init__(
        self, public_base_url: str, store: Store, registry: Registry[PendingCallback[Any]]
    ) -> None:
        self.public_base_url: Final = public_base_url
        self.store: Final = store
        self.runner: Final = Runner(store)
        self.registry: Final = registry
        self.waiting = 0  # waits in progress here, guarded by the registry's lock
        self._listener_pid = 0  # the process whose listener runs; 0: none runs
        # The keepers of hubs sharing this MemoryStore (no thread, so no listener): a
        # delivery settles each directly. A shared store tells the others by a message.
        self.neighbours: Final[weakref.WeakSet[Keeper]] = (
            _NEIGHBOURS.setdefault(store, weakref.WeakSet())
            if self.runner.inline
            else weakref.WeakSet()
        )
        self.neighbours.add(self)

    async def deliver(
        self, info: TokenInfo, token: str, body: bytes, result: Any, keep: float
    ) -> tuple[int, str]:
        """Store a delivery that passed every check (`result` is its body parsed); the
        first one, in any process, wins. A shared store announces it in the same step,
        so that the waiter in another process wakes without a lookup."""
        outcome = Outcome("delivered", info.kind, token, body)
        key, record, run, store = outcome_key(token), outcome.encode(), self.runner.run, self.store
        if self.runner.inline:
            added = await store.add(NAMESPACE, key, record, ttl=keep)
        else:
            added = await run(store.add_and_publish(NAMESPACE, key, record, CHANNEL, ttl=keep))
        if not added:
            earlier = await run(store.get(NAMESPACE, key))
            found = Outcome.decode(earlier) if earlier is not None else None
            if found is not None and found.state == "discarded":
                return UNKNOWN
            if found is not None:  # stored by a try whose answer was lost (a 503), perhaps
                self.settle_from(found)
            return 200, "already received"
        if len(self.neighbours) == 1:
            self._settle_token(token, result, outcome)
        else:
            for keeper in list(self.neighbours):
                keeper._settle_token(token, result, outcome)
        return 200, "received"

    async def refuse(self, token: str, status: int, detail: str) -> tuple[int, str]:
        """Answer a delivery that is refused, noting why for the waiter's timeout; a
        repeat of one already received is acknowledged, whatever its body."""
        earlier = await self.runner.run(self.store.get(NAMESPACE, outcome_key(token)))
        if earlier is not None and (found := Outcome.decode(earlier)) is not None:
            return UNKNOWN if found.state == "discarded" else (200, "already received")
        if (local := self.registry.get(token)) is not None:
            local._rejection = detail
        with contextlib.suppress(StoreError):  # the reason is a courtesy; the status is not
            key = rejection_key(token)
            await self.runner.run(self.store.put(NAMESPACE, key, detail.encode(), ttl=3600.0))
        return status, detail

    def expect(self, pending: PendingCallback[Any], lifetime: float) -> PendingCallback[Any]:
        """Hold a new expectation here, and record it in the store for `lifetime` seconds
        (in the background for a shared store: `saved()`)."""
        pending = self.hold(pending)
        pending._held_throughout = True
        record = encode_registration(pending.kind, pending._info.expires_at)
        key = registration_key(pending.token)
        write = self.store.put(NAMESPACE, key, record, ttl=lifetime)
        pending._saved = self.runner.spawn(write)
        return pending

    def hold(self, pending: PendingCallback[Any]) -> PendingCallback[Any]:
        """Hold `pending` in this process (so deliveries settle it): the one held for its
        token, which is `pending` unless another handle of the token is held already."""
        return self.registry.adopt(pending.token, pending, pending._deadline)

    def release(self, pending: PendingCallback[Any]) -> None:
        with self.registry.lock:
            self.registry.drop(pending.token, pending)
            pending._held_throughout = False

    def held(self, token: str) -> Held | None:
        """What the expectation of `token` held here says, and whether it is done; None
        when none is held. Its token is genuine: this process issued or checked it."""
        local = self.registry.get(token)
        return None if local is None else Held(local._info, local.done)

    def _settle_token(self, token: str, result: Any, outcome: Outcome) -> None:
        """Settle the expectation held here for `token` with a delivery received here."""
        if (pending := self.registry.get(token)) is not None:
            self._settle_with(pending, result, outcome)

    def settle_from(self, outcome: Outcome) -> None:
        """Settle this process's expectation from a stored or announced outcome."""
        pending = self.registry.get(outcome.token)
        if pending is not None:
            self.settle(pending, outcome)

    def settle(self, pending: PendingCallback[Any], outcome: Outcome) -> None:
        """Settle `pending` (held here or not) from its stored or announced outcome."""
        if pending.done or pending._failure is not None:
            return  # a delivery here, or an announcement heard twice: parsed once
        if outcome.state == "discarded":
            with self.registry.lock:
                self.registry.drop(pending.token, pending)
                if not pending.done and pending._failure is None:
                    pending._settle(_NOTHING, discarded(pending.kind))
            return
        try:
            result = PARSERS[outcome.kind](outcome.body)
        except ResponseValidationError:  # not one this hub stored; nothing to hand out
            return
        self._settle_with(pending, result, outcome)

    def _settle_with(self, pending: PendingCallback[Any], result: Any, outcome: Outcome) -> None:
        with self.registry.lock:  # first one wins: a delivery here, or the store's news
            if not pending.done and pending._failure is None:
                pending._outcome = outcome
                pending._settle(result, None)

    async def look(self, pending: PendingCallback[Any]) -> None:
        """Settle `pending` from the store if its result is there already."""
        try:
            raw = await self.runner.run(self.store.get(NAMESPACE, outcome_key(pending.token)))
        except StoreError:
            return  # an outage: the listener keeps looking
        if raw is not None and (outcome := Outcome.decode(raw)) is not None:
            self.settle(pending, outcome)

    async def hand_out(self, pending: PendingCallback[Any]) -> None:
        """Mark `pending`'s result handed out: `outstanding()` lists it no more."""
        with self.registry.lock:
            self.registry.drop(pending.token, pending)
            outcome, pending._outcome = pending._outcome, None
        if outcome is None or outcome.state != "delivered":
            return
        handed = Outcome("handed_out", outcome.kind, outcome.token, outcome.body)
        keep = max(pending._deadline - time.monotonic(), 1.0)
        try:
            if self.runner.inline:
                await self._mark(outcome, handed, keep)  # a MemoryStore never stalls
            else:
                async with asyncio.timeout(_MARK):  # the caller has its result: no stall
                    await self.runner.run(self._mark(outcome, handed, keep))
        except (StoreError, TimeoutError) as error:  # the result is handed out all the same
            reason = error if isinstance(error, StoreError) else "the store is too slow"
            log.warning("callback result handed out but not marked so in the store: %s", reason)

    async def _mark(self, old: Outcome, new: Outcome, keep: float) -> None:
        key = outcome_key(old.token)
        await self.store.replace(NAMESPACE, key, old.encode(), new.encode(), ttl=keep)
        await self.store.delete(NAMESPACE, registration_key(old.token))

    def discard(self, pending: PendingCallback[Any]) -> None:
        with self.registry.lock:
            self.registry.drop(pending.token, pending)
            if pending._failure is None and not pending.done:
                pending._settle(_NOTHING, discarded(pending.kind))
        gone = Outcome("discarded", pending.kind, pending.token)
        for keeper in list(self.neighbours):  # this one too: another handle may be held
            keeper.settle_from(gone)
        keep = max(pending._deadline - time.monotonic(), 1.0)
        if (writing := self.runner.spawn(self._forget(gone, keep))) is not None:
            writing.add_done_callback(log_failure)

    async def _forget(self, gone: Outcome, keep: float) -> None:
        await self.store.put(NAMESPACE, outcome_key(gone.token), gone.encode(), ttl=keep)
        await self.store.delete(NAMESPACE, registration_key(gone.token))
        if not self.runner.inline:
            await self.store.publish(CHANNEL, gone.encode())

    def listen(self) -> None:
        """Make sure this process hears deliveries accepted by others (shared stores)."""
        if self.runner.inline:
            return
        with self.registry.lock:
            if self._listener_pid == os.getpid():  # a forked child's is its parent's
                return
            self._listener_pid = os.getpid()
        listener = self.runner.spawn(self._listener())
        assert listener is not None  # a shared store's: on the hub's thread
        listener.add_done_callback(log_failure)

    async def _listener(self) -> None:
        try:
            await self._listen()
        finally:  # ended, cancelled (the hub closed) or failed: the next wait starts one
            with self.registry.lock:
                self._listener_pid = 0

    async def _listen(self) -> None:
        delay, failing = 0.05, False
        while True:
            with self.registry.lock:
                if not self.waiting:
                    return
            try:
                async with self.store.subscribe(CHANNEL) as subscription:
                    await self._recheck()
                    if failing:
                        log.warning("callback store reachable again")
                    delay, failing = 0.05, False
                    while self.waiting:
                        message = await subscription.next(timeout=_RECHECK)
                        if message is None:
                            await self._recheck()
                        elif (outcome := Outcome.decode(message)) is not None:
                            self.settle_from(outcome)
            except StoreError as error:
                if not failing:
                    log.warning("callback store unreachable, waiting for it: %s", error)
                failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _recheck(self) -> None:
        """Look up every awaited token: what was delivered while no one listened."""
        with self.registry.lock:
            tokens = [token for token, p in self.registry.pending.items() if p._waiters]
        for start in range(0, len(tokens), _PAGE):
            keys = [outcome_key(token) for token in tokens[start : start + _PAGE]]
            for raw in await self.store.get_many(NAMESPACE, keys):
                if raw is not None and (outcome := Outcome.decode(raw)) is not None:
                    self.settle_from(outcome)

    async def timed_out(self, pending: PendingCallback[Any], waited: float) -> CallbackTimeoutError:
        """The error of a wait that ran out: why the last delivery was refused (here, or
        by another process: a look in the store), or else why none may have arrived."""
        refused = pending._rejection
        if refused is None:
            with contextlib.suppress(StoreError, TimeoutError):
                async with asyncio.timeout(_LOOK):
                    key = rejection_key(pending.token)
                    raw = await self.runner.run(self.store.get(NAMESPACE, key))
                    refused = raw.decode(errors="replace") if raw is not None else None
        message = f"no {pending.kind} callback arrived within {max(waited, 0.0):.3g} s"
        if refused is not None:
            message += f"; the last delivery was refused: {refused}"
        else:
            path = urlsplit(self.public_base_url).path or "/"
            message += (
                f", and no delivery reached the hub. The API was given a URL under "
                f"{self.public_base_url}/ (the last segment is the token): check that this "
                "address reaches your app from where the API runs, and that the hub's "
                f"adapter is mounted at {path!r} so that it serves POST {path.rstrip('/')}/<token>"
            )
        return CallbackTimeoutError(message, pending=pending, refused=refused)


def discarded(kind: CallbackKind) -> DeepModeError:
    return DeepModeError(f"the {kind} callback was discarded")
