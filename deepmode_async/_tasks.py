"""Running calls side by side, a bounded number at a time."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import anyio

T = TypeVar("T")
R = TypeVar("R")


async def map_bounded(
    func: Callable[[T], Awaitable[R]], items: Sequence[T], concurrency: int
) -> list[R]:
    """`func` on every item, at most `concurrency` at once; the results in the items' order.

    The first failure cancels the calls still running and is raised as itself, not
    wrapped in an exception group, so callers catch the SDK's errors as documented.
    """
    results: dict[int, R] = {}
    limiter = anyio.Semaphore(concurrency)

    async def run(index: int) -> None:
        async with limiter:
            results[index] = await func(items[index])

    try:
        async with anyio.create_task_group() as group:
            for index in range(len(items)):
                group.start_soon(run, index)
    except BaseExceptionGroup as failures:
        first = _first_leaf(failures)
        raise first from first.__cause__  # not from the group: keep the real cause
    return [results[index] for index in range(len(items))]


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
