"""What every resource shares: the transport, and the one way to call and convert."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .._convert import structure
from .._raw import RawResponses
from .._timeout import Timeout, coerce_timeout
from .._transport import Transport

T = TypeVar("T")


class Resource:
    """A group of endpoints on one client's transport."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._raw = RawResponses(self)

    @property
    def with_raw_response(self) -> Any:  # each resource names its view's type
        """This resource's methods that make one HTTP request, each returning an
        `APIResponse` (status, headers, request id, timing) whose `parse()` gives what
        the method returns. Downloads, `generate_many` and calls with a `CallbackHub`
        as `callback` are not one HTTP answer, and are not offered (a hub raises
        `ValidationError` before anything is sent)."""
        return self._raw

    async def _call(
        self,
        result: type[T],
        method: str,
        path: str,
        *,
        idempotent: bool = False,
        body: Callable[[], Any] | None = None,
        content_type: str | None = "application/json",
        timeout: Timeout | float | None = None,
    ) -> T:
        """Send one API call and convert its answer to `result`."""
        data = await self._transport.call(
            method,
            path,
            idempotent=idempotent,
            body=body,
            content_type=content_type,
            timeout=self._timeout(timeout),
        )
        return structure(data, result, f"{method} {path}")

    def _timeout(self, timeout: Timeout | float | None) -> Timeout:
        """A call's `timeout=` as a `Timeout`, the client's when None."""
        return coerce_timeout(timeout, self._transport.timeout)
