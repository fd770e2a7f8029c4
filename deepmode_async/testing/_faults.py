"""Misbehaviour on demand: faults queued per endpoint, a concurrency limit, chaos."""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Iterable
from typing import Any

import attrs

from ._http import Fault, Problem, format_retry_after
from ._records import ENDPOINTS, Endpoint, check_endpoint


class Faults:
    """The faults both hosts ask for before answering a call (see `MockDeepMode.fail` & co)."""

    def __init__(self) -> None:
        self._queues: dict[Endpoint, collections.deque[Fault]] = collections.defaultdict(
            collections.deque
        )
        self._rate_limit: tuple[int, str | None] | None = None
        self._chaos: _Chaos | None = None

    def fail(
        self,
        endpoint: Endpoint,
        status: int = 500,
        *,
        times: int = 1,
        detail: Any = None,
        retry_after: float | str | None = None,
        body: bytes | str | None = None,
        content_type: str = "application/json",
    ) -> None:
        """Answer the next `times` calls of `endpoint` with `status` before doing anything.

        The answer is `{"detail": detail}`, or `body` as given (an HTML page from a
        proxy, plain text, nothing) with `content_type`. `retry_after` (seconds or an
        HTTP date) is sent as `Retry-After`. A failed call costs nothing.
        """
        raw = body.encode() if isinstance(body, str) else body
        retry = format_retry_after(retry_after)
        self._queue(endpoint, times, Fault("status", status, detail, raw, content_type, retry))

    def drop(self, endpoint: Endpoint, *, times: int = 1, after_processing: bool = False) -> None:
        """Close the connection instead of answering the next `times` calls of `endpoint`.

        With `after_processing`, each call is carried out (and charged) first: the
        ambiguous failure after which a client must not send a paid call again. Such a
        fault waits for a call that is accepted: a rejected one (401, 422...) leaves it.
        """
        if after_processing and endpoint == "download":
            raise ValueError("after_processing does not apply to downloads; see truncate()")
        self._queue(endpoint, times, Fault("drop", after_processing=after_processing))

    def stall(
        self,
        endpoint: Endpoint,
        *,
        seconds: float = 3600.0,
        times: int = 1,
        after_processing: bool = False,
        after_bytes: int | None = None,
    ) -> None:
        """Hold the next `times` calls of `endpoint` for `seconds`, then answer normally.

        By default a call is held before anything happens (nothing is charged). With
        `after_processing` it is carried out first and its answer held: a client that
        times out cannot know it was charged. For `download`, `after_bytes` sends that
        much of the image first and stalls mid-body. A client that gives up shows as
        `disconnected` in `requests`.
        """
        if after_bytes is not None and endpoint != "download":
            raise ValueError("after_bytes applies to the `download` endpoint only")
        if after_processing and endpoint == "download":
            raise ValueError("after_processing does not apply to downloads; see after_bytes")
        fault = Fault(
            "stall", seconds=seconds, after_processing=after_processing, after_bytes=after_bytes
        )
        self._queue(endpoint, times, fault)

    def truncate(self, *, times: int = 1) -> None:
        """Send only half of the next `times` downloaded images, then close the connection."""
        self._queue("download", times, Fault("truncate"))

    def limit_concurrency(self, max_in_flight: int | None, *, retry_after: float | str = 1) -> None:
        """Answer 429 with `Retry-After` while more than `max_in_flight` API calls are open.

        `None` lifts the limit.
        """
        limit = None if max_in_flight is None else (max_in_flight, format_retry_after(retry_after))
        self._rate_limit = limit

    def chaos(
        self,
        endpoints: Endpoint | Iterable[Endpoint] | None = None,
        *,
        rate_limited: float = 0.0,
        unavailable: float = 0.0,
        dropped: float = 0.0,
        server_error: float = 0.0,
        latency: tuple[float, float] = (0.0, 0.0),
        retry_after: float | str = 0.01,
        seed: int | None = None,
    ) -> None:
        """Misbehave at random on every call of `endpoints` from now on.

        Each call independently gets, with these probabilities (at most 1 in all): a 429
        (`rate_limited`) or a 503 (`unavailable`), both with `retry_after` as
        `Retry-After` and charging nothing; its connection closed after the call was
        carried out and charged (`dropped`: the ambiguous failure of
        `drop(after_processing=True)`; a download is cut half-way as by `truncate`); or
        a 500 charging nothing (`server_error`). Every call, faulty or not, first waits
        a uniformly random time within `latency` (min, max seconds).

        `endpoints` defaults to the API's endpoints; the image host misbehaves only
        when `"download"` is named. Queued faults (`fail` & co) come first. Draws come
        from `random.Random(seed)`: a seed repeats the same faults for the same sequence
        of calls. Calling `chaos` again replaces the settings; `clear_faults` ends it.
        """
        chosen: frozenset[Endpoint]
        if endpoints is None:
            chosen = frozenset(name for name in ENDPOINTS if name != "download")
        elif isinstance(endpoints, str):
            chosen = frozenset({check_endpoint(endpoints)})
        else:
            chosen = frozenset(check_endpoint(name) for name in endpoints)
        odds = {
            "rate_limited": rate_limited,
            "unavailable": unavailable,
            "dropped": dropped,
            "server_error": server_error,
        }
        for name, value in odds.items():
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability between 0 and 1, not {value!r}")
        if math.fsum(odds.values()) > 1.0 + 1e-9:
            raise ValueError(f"the probabilities add up to more than 1: {odds}")
        if (
            not isinstance(latency, tuple)
            or len(latency) != 2
            or not all(_is_number(value) and value >= 0 for value in latency)
            or latency[0] > latency[1]
        ):
            raise ValueError(f"latency must be (min, max) seconds with 0 <= min <= max: {latency}")
        retry = format_retry_after(retry_after)
        assert retry is not None
        faults = (
            (rate_limited, Fault("status", 429, retry_after=retry, dealt=True)),
            (unavailable, Fault("status", 503, retry_after=retry, dealt=True)),
            (dropped, Fault("drop", after_processing=True, dealt=True)),
            (server_error, Fault("status", 500, dealt=True)),
        )
        self._chaos = _Chaos(chosen, faults, latency, random.Random(seed))

    def clear_faults(self) -> None:
        """Forget every queued fault, the concurrency limit and `chaos`."""
        self._queues.clear()
        self._rate_limit = None
        self._chaos = None

    def _queue(self, endpoint: Endpoint, times: int, fault: Fault) -> None:
        self._queues[check_endpoint(endpoint)].extend([fault] * times)

    def take(self, endpoint: Endpoint | None) -> Fault | None:
        """The fault for this call of `endpoint`: the next queued one, else chaos's deal."""
        if endpoint is None:
            return None
        if queue := self._queues.get(endpoint):
            return queue.popleft()
        chaos = self._chaos
        return chaos.deal(endpoint) if chaos is not None else None

    def put_back(self, endpoint: Endpoint, fault: Fault) -> None:
        """Return an after-processing fault that met a rejected call, for the next one."""
        if not fault.dealt:  # one dealt by chaos was meant for this call only
            self._queues[endpoint].appendleft(fault)

    def check_rate_limit(self, in_flight: int) -> None:
        """Answer 429 when `in_flight` API calls are more than `limit_concurrency` allows."""
        if self._rate_limit is not None and in_flight > self._rate_limit[0]:
            retry_after = self._rate_limit[1]
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            raise Problem(429, "Too many concurrent requests", headers=headers)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _Chaos:
    """The settings of `MockDeepMode.chaos`, dealing a fault (or none) per call."""

    def __init__(
        self,
        endpoints: frozenset[Endpoint],
        faults: Iterable[tuple[float, Fault]],
        latency: tuple[float, float],
        rng: random.Random,
    ) -> None:
        self.endpoints = endpoints
        self.faults = [(odds, fault) for odds, fault in faults if odds > 0]
        self.latency = latency
        self.rng = rng

    def deal(self, endpoint: Endpoint) -> Fault | None:
        """This call's fault, with its latency; None for a call left alone."""
        if endpoint not in self.endpoints:
            return None
        # Two draws per call whatever they give, so a seed repeats the same sequence.
        roll = self.rng.random()
        delay = self.rng.uniform(*self.latency)
        chosen: Fault | None = None
        for odds, fault in self.faults:
            if roll < odds:
                chosen = fault
                break
            roll -= odds
        if chosen is not None and endpoint == "download" and chosen.kind == "drop":
            chosen = Fault("truncate", dealt=True)  # a download was served: cut it short
        if chosen is None:
            return Fault("stall", seconds=0.0, delay=delay, dealt=True) if delay > 0 else None
        return attrs.evolve(chosen, delay=delay) if delay > 0 else chosen
