"""This process's expectations (`PendingCallback`s): one a token, bounded, expiring."""

from __future__ import annotations

import heapq
import threading
import time
from typing import Generic, TypeVar

from .._errors import DeepModeError

P = TypeVar("P")


class Registry(Generic[P]):
    """The expectations this process holds, and the lock that guards them and their
    waiters. At most `max_pending` at once; one past its deadline (a monotonic time) is
    dropped the next time one is added."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self.lock = threading.Lock()
        self.pending: dict[str, P] = {}
        self.deadlines: dict[str, float] = {}
        self.expiry: list[tuple[float, str]] = []  # a heap; stale entries are skipped

    def adopt(self, token: str, candidate: P, deadline: float) -> P:
        """The one expectation of `token`: the one held already, or `candidate`."""
        with self.lock:
            if (known := self.pending.get(token)) is not None:
                return known
            self.purge(time.monotonic())
            if len(self.pending) >= self.max_pending:
                raise DeepModeError(
                    f"{len(self.pending)} callbacks are pending, the hub's max_pending; "
                    "wait for some, discard them, or make a hub with a higher limit"
                )
            pending = self.pending[token] = candidate
            self.deadlines[token] = deadline
            heapq.heappush(self.expiry, (deadline, token))
            if len(self.expiry) > 2 * len(self.pending) + 64:
                # Handed-out and discarded tokens leave stale entries: rebuild the heap
                # now and then, so its size follows what is pending, not what has been.
                self.expiry = [(self.deadlines[key], key) for key in self.pending]
                heapq.heapify(self.expiry)
            return pending

    def tidy(self) -> None:
        """Drop what is past its deadline (each delivery does, as each expectation does)."""
        with self.lock:
            self.purge(time.monotonic())

    def get(self, token: str) -> P | None:
        """Called with the lock held, or without it for a glance."""
        return self.pending.get(token)

    def drop(self, token: str, pending: P) -> None:
        """Called with the lock held: forget `pending` (handed out or discarded)."""
        if self.pending.get(token) is pending:
            del self.pending[token]
            del self.deadlines[token]

    def purge(self, now: float) -> None:
        """Called with the lock held: drop what is past its deadline."""
        while self.expiry and self.expiry[0][0] <= now:
            _, token = heapq.heappop(self.expiry)
            deadline = self.deadlines.get(token)
            if deadline is not None and deadline <= now:
                del self.pending[token]
                del self.deadlines[token]
