"""`dm.account`: the credit balance."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._timeout import Timeout
from .._types import Balance
from ._base import Resource

if TYPE_CHECKING:
    from ._raw_types import AccountWithRawResponse


class Account(Resource):
    """The account behind the API key."""

    with_raw_response: AccountWithRawResponse

    async def balance(self, *, timeout: Timeout | float | None = None) -> Balance:
        """The credits left (free; retried like any read)."""
        return await self._call(
            Balance, "GET", "/api/check-balance", idempotent=True, timeout=timeout
        )
