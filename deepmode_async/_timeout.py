"""How long one attempt may take: `Timeout`, and the one place a user's value becomes one."""

from __future__ import annotations

import attrs

from . import _validate as check
from ._errors import ValidationError


@attrs.frozen
class Timeout:
    """How long a request may take, in seconds (`None`: no limit), for each attempt.

    `connect` bounds establishing a connection, `read` the wait for each piece of the
    answer (sync-mode generation can take minutes, hence 600 s), `total` one whole
    attempt. Waiting between retries never counts. Change one with `attrs.evolve`.
    """

    connect: float | None = 10.0
    read: float | None = 600.0
    total: float | None = None

    def __attrs_post_init__(self) -> None:
        for name in ("connect", "read", "total"):
            value = getattr(self, name)
            if value is not None:
                check.seconds(f"Timeout.{name}", value)


def coerce_timeout(value: Timeout | float | None, default: Timeout) -> Timeout:
    """A `Timeout` from what a user may pass: a `Timeout`, a number (the read timeout) or
    None (`default`). Public methods call it once, on their `timeout=`; below them every
    timeout is a `Timeout` already."""
    if value is None:
        return default
    if isinstance(value, Timeout):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return attrs.evolve(default, read=value)
    raise ValidationError(
        f"timeout must be a Timeout, a number of seconds or None, not {check.shown(value)}"
    )
