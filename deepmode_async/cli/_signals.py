"""Running a command's coroutine so that `kill` and a closed terminal unwind it like Ctrl+C."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

from .. import _loop

T = TypeVar("T")

#: Signals that end a command by cancelling it, so that its cleanup runs (SIGINT is
#: asyncio's own: it cancels the command and raises KeyboardInterrupt).
_STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)


class Terminated(Exception):
    """The command was cancelled by a signal; exit with 128 + its number, as shells expect."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(coroutine)`, with SIGTERM and SIGHUP cancelling it, on uvloop when it
    is installed.

    Python's default for those signals ends the process on the spot: a download's
    temporary files and the demo's sample photos would stay behind. Cancelling runs
    every `finally` and cancel scope on the way out instead.
    """
    return _loop.run(_cancelled_by_signals(coroutine))


async def _cancelled_by_signals(coroutine: Coroutine[Any, Any, T]) -> T:
    loop = asyncio.get_running_loop()
    kind = type(loop)
    logging.getLogger("deepmode_async.cli").debug(
        "event loop: %s.%s", kind.__module__, kind.__qualname__
    )
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def stop(signum: int) -> None:
        received.append(signum)
        task.cancel()

    installed = []
    for signum in _STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals here
            loop.add_signal_handler(signum, stop, signum)
            installed.append(signum)
    try:
        return await coroutine
    except asyncio.CancelledError:
        if received:
            raise Terminated(received[0]) from None
        raise
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
