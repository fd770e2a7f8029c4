"""When a failed call may be sent again, and after how long.

Modelled on urllib3's `Retry`: `RetryPolicy` is immutable configuration, and each call
walks through `RetryState`s, a new one per retry, so nothing is counted by mutation.
Whether the server may have acted on a failed call is decided once, by
`server_may_have_acted`, which the retry decision, the batch and the callback glue
all ask: calls that spend credits are sent again only when it says no.
"""

from __future__ import annotations

import math
import random
from typing import Final

import aiohttp
import attrs

from . import _validate as check
from ._errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    ValidationError,
    parse_retry_after,
)

#: Statuses worth another try for calls that are safe to send again. Which of them a
#: call that spends credits may also retry is `server_may_have_acted`'s to say.
_TRANSIENT: Final = frozenset({408, 429, 500, 502, 503, 504})


def request_was_sent(error: APIConnectionError) -> bool:
    """False only when the server never had the request: the connection failed before
    any byte of it left, or was already closing when the request was written to it (a
    pooled connection the server had closed while it was idle)."""
    cause = error.__cause__
    if isinstance(cause, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return False
    while cause is not None:
        # aiohttp raises it instead of writing to a transport that is closing; as the
        # cause of the body writer's `ClientOSError` when a body was being written.
        if isinstance(cause, aiohttp.ClientConnectionResetError):
            return False
        cause = cause.__cause__
    return True


def server_may_have_acted(error: BaseException) -> bool:
    """Whether the server may have carried out a call that failed with `error`.

    The at-most-once rule: False only when it certainly did not. That is an argument
    refused before sending (`ValidationError`), a connection that failed before the
    request was sent, a refusal of the request as such (4xx, but 408, whose server may
    have been working on it), 429, and 503 with `Retry-After` (the server says when to
    come back: it is pacing, not failing). Anything else, an unknown error included,
    may have been acted on.
    """
    if isinstance(error, ValidationError):
        return False
    if isinstance(error, APIConnectionError):
        return request_was_sent(error)
    if isinstance(error, APIStatusError):
        if server_asks_to_wait(error):
            return False
        return error.status_code >= 500 or error.status_code == 408
    return True


def server_asks_to_wait(error: BaseException) -> bool:
    """Whether the server named a wait for every call, not a failure of this one: 429,
    or 503 with `Retry-After`. Such a wait is shared with the clients of a store."""
    if not isinstance(error, APIStatusError):
        return False
    status = error.status_code
    return status == 429 or (status == 503 and "Retry-After" in error.headers)


def asks_to_wait(error: APIError) -> bool:
    """Whether the server is pacing the client (429, 503) rather than failing one call."""
    return isinstance(error, APIStatusError) and error.status_code in (429, 503)


def retry_after(error: APIError) -> float | None:
    """The seconds a server's `Retry-After` asks for, if it sent one that parses."""
    if isinstance(error, APIStatusError):
        return parse_retry_after(error.headers.get("Retry-After"))
    return None


def _non_negative(name: str, value: object) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValidationError(f"{name} must be a number >= 0, not {check.shown(value)}")


@attrs.frozen
class RetryPolicy:
    """When to try a failed call again, and after how long.

    ```python
    AsyncClient(max_retries=RetryPolicy(max_retries=5, backoff_cap=30.0))
    ```

    A call is tried again after a transient failure (a lost connection, 408, 429, 500,
    502, 503, 504), at most `max_retries` times (0: never). Calls that spend credits
    (not safe to resend) are tried again only when the server certainly did not act on
    them: the connection failed before the request was sent, 429, or 503 with
    `Retry-After`. Delays grow exponentially from `backoff_base` with full jitter, up
    to `backoff_cap`; a server's `Retry-After` is honoured up to `retry_after_cap` (a
    longer one is raised instead of waited for).
    """

    max_retries: int = 2
    backoff_base: float = 0.5
    backoff_cap: float = 8.0
    retry_after_cap: float = 60.0

    def __attrs_post_init__(self) -> None:
        value = self.max_retries
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValidationError(f"max_retries must be an int >= 0, not {check.shown(value)}")
        for name in ("backoff_base", "backoff_cap", "retry_after_cap"):
            _non_negative(name, getattr(self, name))

    def start(self, *, idempotent: bool) -> RetryState:
        """The state of a call before its first try; `idempotent`: safe to resend."""
        return RetryState(self, idempotent)

    def may_resend(self, error: APIError, *, idempotent: bool) -> bool:
        """Whether a call that failed with `error` may be sent again at all."""
        if isinstance(error, APIStatusError):
            transient = error.status_code in _TRANSIENT
        else:
            transient = isinstance(error, APIConnectionError)
        return transient and (idempotent or not server_may_have_acted(error))

    def pause(self, error: APIError, retries: int) -> float:
        """How long a batch holds back after `error` asked it to wait, whether or not the
        call is tried again: the server's `Retry-After` up to the cap, else the backoff
        after `retries` retries."""
        asked = retry_after(error)
        if asked is not None:
            return min(asked, self.retry_after_cap)
        return self.backoff(retries)

    def backoff(self, retries: int) -> float:
        """A jittered delay before the retry that follows `retries` earlier ones."""
        growth = 2.0 ** min(retries, 64)  # bounded: the cap is reached long before
        return random.uniform(0, min(self.backoff_cap, self.backoff_base * growth))


@attrs.frozen
class RetryState:
    """Where one call stands under its `RetryPolicy`: `retries` used so far."""

    policy: RetryPolicy
    idempotent: bool
    retries: int = 0

    def delay(self, error: APIError) -> float | None:
        """Seconds to wait before trying again after `error`, or None to give up."""
        policy = self.policy
        if self.retries >= policy.max_retries or not policy.may_resend(
            error, idempotent=self.idempotent
        ):
            return None
        asked = retry_after(error)
        if asked is not None:
            return asked if asked <= policy.retry_after_cap else None
        return policy.backoff(self.retries)

    def increment(self) -> RetryState:
        """The state after one more retry."""
        return attrs.evolve(self, retries=self.retries + 1)
