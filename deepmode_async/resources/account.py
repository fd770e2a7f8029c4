"""`dm.account`: the credit balance."""

from __future__ import annotations

from .._timeout import Timeout
from .._types import Balance
from ._base import Resource


class Account(Resource):
    """The account behind the API key."""

    async def balance(self, *, timeout: Timeout | float | None = None) -> Balance:
        """The credits left (free; retried like any read)."""
        return await self._call(
            Balance, "GET", "/api/check-balance", idempotent=True, timeout=timeout
        )
