"""What the hub keeps in its store, and where its store calls run.

Records live in the `callbacks` namespace, one per token and purpose:
- `p:<token>`: an expectation was made (kind, expiry), so `outstanding()` finds the ones
  whose waiter died before anything arrived;
- `d:<token>`: its outcome, written once with `add` (the first delivery wins, in every
  process): `delivered` with the body, then `handed_out` once a `wait()` returned it, or
  `discarded`;
- `r:<token>`: why the last delivery was refused, for the timeout's message.
A delivery is also published on one channel, body and all, so a waiter in another
process wakes without a lookup.

With a `MemoryStore` the calls run inline, as plain function calls (it never suspends);
with a shared store they run on a thread of the hub's own, whatever loop or thread asks,
so one set of connections serves the whole process and a synchronous `expect()` or
`discard()` can hand its write over without blocking.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, Final, Literal, TypeAlias, TypeVar

import attrs

from ..stores import MemoryStore, Store
from ._parsers import CallbackKind
from ._tokens import KINDS

T = TypeVar("T")

log: Final = logging.getLogger("deepmode_async")

NAMESPACE: Final = "callbacks"
CHANNEL: Final = "callbacks:delivered"

State: TypeAlias = Literal["delivered", "handed_out", "discarded"]


def registration_key(token: str) -> str:
    return f"p:{token}"


def outcome_key(token: str) -> str:
    return f"d:{token}"


def rejection_key(token: str) -> str:
    return f"r:{token}"


@attrs.frozen
class Outcome:
    """What became of one token, as stored and as published."""

    state: State
    kind: CallbackKind
    token: str = attrs.field(repr=False)  # a secret
    body: bytes = attrs.field(default=b"", repr=False)

    def encode(self) -> bytes:
        # JSON written by hand: every field is a fixed word or a token (base64url), so
        # nothing needs escaping, and this is on every delivery's path.
        header = f'{{"state": "{self.state}", "kind": "{self.kind}", "token": "{self.token}"}}'
        return header.encode() + b"\n" + self.body

    @classmethod
    def decode(cls, raw: bytes) -> Outcome | None:
        """The outcome in `raw`, or None for a record this hub did not write."""
        header, _, body = raw.partition(b"\n")
        try:
            fields = json.loads(header)
            state, kind, token = fields["state"], fields["kind"], fields["token"]
        except (ValueError, TypeError, KeyError):
            return None
        if state not in ("delivered", "handed_out", "discarded") or kind not in KINDS:
            return None
        if not isinstance(token, str):
            return None
        return cls(state, kind, token, body)


def encode_registration(kind: CallbackKind, expires_at: float) -> bytes:
    return f'{{"kind": "{kind}", "expires_at": {expires_at!r}}}'.encode()


def log_failure(future: Any) -> None:
    """A done-callback for a write started with `Runner.spawn`: its failure logged."""
    if not future.cancelled() and (error := future.exception()) is not None:
        log.warning("callback store write failed: %s", error)


class Runner:
    """Runs the hub's store calls: inline for a `MemoryStore`, else on the hub's thread."""

    def __init__(self, store: Store) -> None:
        self.store: Final = store
        self.inline: Final = isinstance(store, MemoryStore)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    async def run(self, call: Coroutine[Any, Any, T]) -> T:
        """Await `call` from any loop."""
        if self.inline:
            return await call  # never suspends for long: no thread to hop to
        loop = self.loop()
        if asyncio.get_running_loop() is loop:
            return await call
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call, loop))

    def blocking(self, call: Coroutine[Any, Any, T]) -> T:
        """Run `call` to its end from synchronous code (not on the hub's own thread)."""
        if self.inline:
            return _drive(call)
        return asyncio.run_coroutine_threadsafe(call, self.loop()).result()

    def spawn(self, call: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any] | None:
        """Start `call` without waiting for it: its future, or None when it has already
        ended well (inline, where a future would cost more than the call)."""
        if not self.inline:
            return asyncio.run_coroutine_threadsafe(call, self.loop())
        try:
            _drive(call)
        except Exception as error:
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            future.set_exception(error)
            return future
        return None

    def loop(self) -> asyncio.AbstractEventLoop:
        """The hub thread's loop, started on first use (and again in a forked child)."""
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                self._loop, self._thread = _start_thread()
                self._pid = os.getpid()
            return self._loop

    def stop(self) -> None:
        """End what runs on the hub's thread (a listener) and stop it; it starts again
        when needed."""
        with self._lock:
            loop, thread, self._loop = self._loop, self._thread, None
        if loop is None or thread is None or self._pid != os.getpid():
            return
        if thread is threading.current_thread():
            loop.call_soon(loop.stop)
            return
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(_cancel_the_rest(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)


async def _cancel_the_rest() -> None:
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


def _start_thread() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(started.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    # A daemon: an app that never closes its hub must still be able to exit.
    thread = threading.Thread(target=run, name="deepmode-callback-hub", daemon=True)
    thread.start()
    started.wait()
    return loop, thread


def _drive(call: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (a `MemoryStore`'s) as a plain call."""
    try:
        call.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    call.close()
    raise RuntimeError("a MemoryStore call suspended; it must not")
