"""Callback mode awaited: submit a call with a hub's URL, then wait for its delivery."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from .._errors import CallbackTimeoutError, DeepModeError
from .._raw import refuse_raw
from .._retry import server_may_have_acted
from ..callbacks import PendingCallback

T = TypeVar("T")


async def submit_and_wait(
    pending: PendingCallback[T], submit: Callable[[str], Awaitable[object]]
) -> T:
    """`submit` the call with `pending.url` as its callback, then wait for the result.

    Nobody else holds `pending`. When the call certainly did not reach the API it is
    discarded (a later delivery gets 404). Otherwise a credit may have been spent, so
    the expectation stays in the hub's store, where `hub.outstanding()` finds its result
    (released here: it stops counting toward `max_pending`), and the error says so.
    """
    submitting = False
    try:
        refuse_raw("a call with a CallbackHub as callback")  # discarded below, nothing sent
        await pending.saved()  # so that a restart finds it: before any credit is spent
        submitting = True
        await submit(pending.url)
    except BaseException as error:
        if not submitting or not server_may_have_acted(error):
            pending.discard()
            raise
        pending.release()
        if isinstance(error, DeepModeError):
            error.add_note(_KEPT.format(kind=pending.kind))
        raise
    try:
        return await pending.wait()
    except BaseException as error:
        pending.release()
        if isinstance(error, CallbackTimeoutError):
            error.add_note(_KEPT.format(kind=pending.kind))
        raise


_KEPT = (
    "DeepMode may have acted on this call and may still deliver its {kind} callback: "
    "the hub keeps it, and `await hub.outstanding()` lists it (`.done` once it arrived)."
)
