"""Batch generation: many `generate` calls, bounded, paced together, one result each.

`dm.images.generate_many` is the public door; this module holds its result types and
the loop that runs them, given the calls to make as plain functions. The loop pulls
requests from the input only as slots free up (an endless generator is fine), runs
each in its own task, and yields results in the order they complete. Tasks report
completion through one queue, so each result costs the same however many are in flight.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from typing import Any, Final, TypeAlias

import anyio
import attrs

from ._errors import (
    DeepModeError,
    ProgressCallbackError,
    ValidationError,
    report_progress,
)
from ._pacing import Pacer, pacing
from ._requests import GenerateRequest
from ._types import Generation, Image

__all__ = [
    "BatchProgress",
    "BatchProgressCallback",
    "BatchResult",
    "GenerateRequest",  # its home is `_requests`; importable from here as before
    "run_batch",
]

#: Makes one request's call (sync mode): the generation, or a `DeepModeError`.
Generate: TypeAlias = Callable[[GenerateRequest], Awaitable[Generation]]
#: Downloads a generation's images: their paths in the same order.
Download: TypeAlias = Callable[[Sequence[Image]], Awaitable[list[pathlib.Path]]]


@attrs.frozen
class BatchResult:
    """What became of one request of a batch.

    `index` is the request's position in the input. On success `generation` holds the
    images (and `paths` the downloaded files, in the same order, when the batch has
    `download_to`) and `error` is None. Otherwise `error` is the `DeepModeError` that
    stopped it; when only the download failed, `generation` is kept (its credits are
    spent) so its images can be downloaded again.
    """

    index: int
    request: GenerateRequest
    generation: Generation | None = None
    paths: tuple[pathlib.Path, ...] | None = None
    error: DeepModeError | None = None

    @property
    def ok(self) -> bool:
        """True when the request succeeded (downloads included)."""
        return self.error is None


@attrs.frozen
class BatchProgress:
    """How far a batch is: requests taken from the input, finished, and failed of those.

    `completed` counts every finished request, failed or not; `in_flight` those
    submitted and not finished yet.
    """

    submitted: int
    completed: int
    failed: int

    @property
    def in_flight(self) -> int:
        return self.submitted - self.completed


BatchProgressCallback: TypeAlias = Callable[[BatchProgress], object]

_END: Final = object()  # the input has no more requests


class _Input:
    """The batch's input, one request at a time, from an iterable or an async iterable."""

    def __init__(self, requests: Iterable[GenerateRequest] | AsyncIterable[GenerateRequest]):
        self.sync: Iterator[Any] | None = None
        self.stream: AsyncIterator[Any] | None = None
        if isinstance(requests, AsyncIterable):
            self.stream = aiter(requests)
        elif isinstance(requests, Iterable) and not isinstance(requests, str | bytes):
            self.sync = iter(requests)
        else:
            raise ValidationError(
                "requests must be an iterable or async iterable of GenerateRequest, "
                f"not {type(requests).__name__}"
            )
        self.error: BaseException | None = None  # raised once the requests in flight end
        self.taken = 0

    @property
    def open(self) -> bool:
        return self.error is None and (self.sync is not None or self.stream is not None)

    def next_now(self) -> object:
        """The next request of a plain iterable (`_END` when it has no more)."""
        assert self.sync is not None
        try:
            return self.accept(next(self.sync))
        except StopIteration:
            self.sync = None
            return _END
        except Exception as exc:  # the caller's iterator failed; theirs to see, as is
            self.error = exc
            return _END

    async def next_later(self) -> object:
        """The next request of an async iterable (`_END` when it has no more)."""
        assert self.stream is not None
        try:
            return self.accept(await anext(self.stream))
        except StopAsyncIteration:
            self.stream = None
            return _END
        except Exception as exc:
            self.error = exc
            return _END

    def accept(self, item: object) -> object:
        if not isinstance(item, GenerateRequest):
            self.error = ValidationError(
                f"requests[{self.taken}] is a {type(item).__name__}, not a GenerateRequest"
            )
            return _END
        self.taken += 1
        return item


async def run_batch(
    requests: Iterable[GenerateRequest] | AsyncIterable[GenerateRequest],
    *,
    generate: Generate,
    download: Download | None,
    concurrency: int,
    progress: BatchProgressCallback | None,
) -> AsyncGenerator[BatchResult, None]:
    """Yield one `BatchResult` per request as each completes (see `generate_many`).

    `generate` makes each request's call, paced with the others (see `_pacing`);
    `download`, when given, downloads each generation's images once it is complete.

    When the input fails (or holds something other than a `GenerateRequest`), or the
    progress callback raises, no more requests are started; those in flight still
    finish and yield (they are paid for), then the error is raised. Leaving early
    (break, an exception, cancellation) cancels what is in flight and waits for it to
    clean up.
    """
    source = _Input(requests)
    pacer = Pacer(concurrency)
    finished: asyncio.Queue[asyncio.Task[Any]] = asyncio.Queue()
    running: set[asyncio.Task[Any]] = set()
    pulling: asyncio.Task[object] | None = None
    submitted = completed = failed = 0
    stopped: ProgressCallbackError | None = None

    def report() -> None:
        nonlocal progress, stopped
        if progress is None:
            return
        try:
            report_progress(progress, BatchProgress(submitted, completed, failed), of="batch")
        except ProgressCallbackError as error:
            progress, stopped = None, error  # called no more; raised once the batch ends

    def start(coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        task.add_done_callback(finished.put_nowait)
        return task

    def submit(request: GenerateRequest) -> None:
        nonlocal submitted
        running.add(start(_run_one(submitted, request, pacer, generate, download)))
        submitted += 1
        report()

    try:
        while True:
            while source.open and not stopped and pulling is None and len(running) < concurrency:
                if source.sync is not None:
                    request = source.next_now()
                    if isinstance(request, GenerateRequest):
                        submit(request)
                else:
                    pulling = start(source.next_later())
            if not running and pulling is None:
                break
            task = await finished.get()
            if task is pulling:
                pulling = None
                request = task.result()
                if isinstance(request, GenerateRequest):
                    submit(request)
                continue
            running.discard(task)
            result: BatchResult = task.result()
            completed += 1
            failed += not result.ok
            report()
            yield result
        if stopped is not None:
            raise stopped
        if source.error is not None:
            raise source.error
    finally:
        leftovers = [*running, *([pulling] if pulling is not None else [])]
        for task in leftovers:
            task.cancel()
        if leftovers:
            # Shielded: a cancelled consumer still waits for downloads to remove their
            # temp files and for connections to be released.
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*leftovers, return_exceptions=True)


async def _run_one(
    index: int,
    request: GenerateRequest,
    pacer: Pacer,
    generate: Generate,
    download: Download | None,
) -> BatchResult:
    try:
        with pacing(pacer):  # this task's own context: only this call is paced by it
            generation = await generate(request)
    except DeepModeError as error:
        return BatchResult(index, request, error=error)
    if download is None:
        return BatchResult(index, request, generation)
    try:
        paths = await download(generation.images)
    except DeepModeError as error:
        return BatchResult(index, request, generation, error=error)
    return BatchResult(index, request, generation, tuple(paths))
