"""What the reliability tests share: counting open files and finding leftovers."""

from __future__ import annotations

import gc
import os
import pathlib


def open_fds() -> int:
    """How many file descriptors this process has open (Linux)."""
    gc.collect()  # a socket only dropped, not closed, would otherwise count until collected
    return len(os.listdir("/proc/self/fd"))


def leftovers(directory: pathlib.Path) -> list[str]:
    """Temporary download files (`.NAME.XXXX.part`) anywhere under `directory`."""
    return sorted(str(path) for path in directory.rglob("*.part"))
