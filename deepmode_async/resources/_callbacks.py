"""Callback mode awaited: submit a call with a hub's URL, then wait for its delivery."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from .._errors import DeepModeError
from .._retry import server_may_have_acted
from ..callbacks import PendingCallback

T = TypeVar("T")


async def submit_and_wait(
    pending: PendingCallback[T], submit: Callable[[str], Awaitable[object]]
) -> T:
    """`submit` the call with `pending.url` as its callback, then wait for the result.

    Nobody else holds `pending`: when either step fails it is discarded (a later
    delivery gets 404), and a submission the server may have acted on says so.
    """
    try:
        await pending.saved()  # so that a restart finds it: before any credit is spent
        await submit(pending.url)
    except BaseException as error:
        pending.discard()
        if isinstance(error, DeepModeError) and server_may_have_acted(error):
            error.add_note(
                f"DeepMode may have acted on this call and may still deliver its "
                f"{pending.kind} callback, which this call no longer waits for. To keep a "
                "handle on such results, pass pending.url from hub.expect() as "
                "callback= and await pending.wait()."
            )
        raise
    try:
        return await pending.wait()
    except BaseException:
        pending.discard()
        raise
