"""Batch generation: many `generate` calls, bounded, paced together, one result each.

`dm.images.generate_many` is the public door; this module holds its result types and
the loop that runs them, given the calls to make as plain functions. The loop pulls
requests from the input only as slots free up (an endless generator is fine), runs
each in its own task, and yields results in the order they complete. Tasks report
completion through one queue, so each result costs the same however many are in flight.
"""

from __future__ import annotations

import asyncio
import collections
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
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

import anyio
import attrs

from ._errors import (
    DeepModeError,
    ProgressCallbackError,
    StoreError,
    ValidationError,
    report_progress,
)
from ._journal import WINDOW, BatchJournal, Entry
from ._pacing import Pacer, pacing
from ._requests import GenerateRequest
from ._types import Generation, Image

__all__ = [
    "BatchDownloaded",
    "BatchFailure",
    "BatchProgress",
    "BatchProgressCallback",
    "BatchResult",
    "BatchSuccess",
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
    spent) so its images can be downloaded again. `resumed` is True for a result a
    journalled batch yielded from its journal, without a call (see `generate_many`).

    A batch yields the subclasses `BatchSuccess` (or `BatchDownloaded`, with
    `download_to`) and `BatchFailure`, so that `if result.ok:` (or `result.error is
    None`) narrows for a type checker: `result.generation` is then a `Generation`, and
    with `download_to` `result.paths` a tuple, with no `Optional` to check.
    """

    index: int
    request: GenerateRequest
    generation: Generation | None = None
    paths: tuple[pathlib.Path, ...] | None = None
    error: DeepModeError | None = None
    resumed: bool = False

    @property
    def ok(self) -> bool:
        """True when the request succeeded (downloads included)."""
        return self.error is None


@attrs.frozen
class BatchSuccess(BatchResult):
    """A request that succeeded: `generation` is set, `error` is None."""

    if TYPE_CHECKING:  # narrower types of the same fields, for type checkers only
        generation: Generation
        error: None

    @property
    def ok(self) -> Literal[True]:
        return True


@attrs.frozen
class BatchDownloaded(BatchSuccess):
    """A request that succeeded in a batch with `download_to`: `paths` is set too."""

    if TYPE_CHECKING:  # all three again: the attrs plugin takes a field's latest type
        generation: Generation
        paths: tuple[pathlib.Path, ...]
        error: None


@attrs.frozen
class BatchFailure(BatchResult):
    """A request that failed: `error` is set (`generation` too, if only the download
    failed)."""

    if TYPE_CHECKING:
        error: DeepModeError

    @property
    def ok(self) -> Literal[False]:
        return False


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


#: What a batch yields; each is a `BatchResult`.
AnyResult: TypeAlias = "BatchSuccess | BatchDownloaded | BatchFailure"

BatchProgressCallback: TypeAlias = Callable[[BatchProgress], object]

_END: Final = object()  # the input has no more requests


class _Input:
    """The batch's input, one request at a time, from an iterable or an async iterable.

    With a journal, its records are read a window at a time as the input reaches them;
    where a window has records, the input is read ahead up to the last of them (at most
    `WINDOW` requests) and checked against them before any request of the window goes.
    """

    def __init__(
        self,
        requests: Iterable[GenerateRequest] | AsyncIterable[GenerateRequest],
        journal: BatchJournal | None,
    ):
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
        self.journal = journal
        self.ahead: collections.deque[GenerateRequest] = collections.deque()  # checked
        self.records: dict[int, Entry] = {}  # the current window's, taken as submitted
        self.window_end = 0  # the journal's records are read up to here

    @property
    def open(self) -> bool:
        return self.error is None and bool(
            self.ahead or self.sync is not None or self.stream is not None
        )

    @property
    def ready(self) -> bool:
        """Whether `next_now` can give the next request without waiting."""
        if self.ahead:
            return True
        return self.sync is not None and (self.journal is None or self.taken < self.window_end)

    def entry(self, index: int) -> Entry | None:
        """The journal's record of request `index` (once: it is then forgotten)."""
        return self.records.pop(index, None)

    def next_now(self) -> object:
        """The next request without waiting (`_END` when there are no more)."""
        if self.ahead:
            return self.ahead.popleft()
        return self.next_of_iterable()

    def next_of_iterable(self) -> object:
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
        """The next request, reading the journal's next window first when it is due."""
        if self.journal is not None and not self.ahead and self.taken >= self.window_end:
            try:
                await self.read_window(self.journal)
            except DeepModeError as error:  # a mismatch, or a journal that cannot be read
                self.error = error
                return _END
            if self.error is not None:
                return _END
        if self.ready:
            return self.next_now()
        return await self.pull()

    async def pull(self) -> object:
        """The next request of the input itself (`_END` when it has no more)."""
        if self.stream is None:
            return self.next_of_iterable() if self.sync is not None else _END
        try:
            return self.accept(await anext(self.stream))
        except StopAsyncIteration:
            self.stream = None
            return _END
        except Exception as exc:
            self.error = exc
            return _END

    async def read_window(self, journal: BatchJournal) -> None:
        start = self.window_end
        self.records = await journal.window(start)
        self.window_end = start + WINDOW
        last = max(self.records, default=start - 1)
        while self.taken <= last and self.error is None:
            index = self.taken
            request = await self.pull()
            if not isinstance(request, GenerateRequest):
                return
            entry = self.records.get(index)
            if entry is not None:
                journal.check(index, request, entry)
            self.ahead.append(request)

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
    journal: BatchJournal | None = None,
) -> AsyncGenerator[AnyResult, None]:
    """Yield one `BatchResult` per request as each completes (see `generate_many`).

    `generate` makes each request's call, paced with the others (see `_pacing`);
    `download`, when given, downloads each generation's images once it is complete;
    `journal`, when given, records each request and resumes from what it recorded.

    When the input fails (or holds something other than a `GenerateRequest`, or does
    not match the journal), the progress callback raises, or the journal cannot record
    a request before it is sent, no more requests are started; those in flight still
    finish and yield (they are paid for), then the error is raised. Leaving early
    (break, an exception, cancellation) cancels what is in flight and waits for it to
    clean up.
    """
    source = _Input(requests, journal)
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

    def going() -> bool:
        """Whether more requests may start: the progress callback has not raised, and
        the journal (if any) could record the last request it was asked to."""
        return not stopped and (journal is None or journal.failure is None)

    def start(coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        task.add_done_callback(finished.put_nowait)
        return task

    def submit(request: GenerateRequest) -> None:
        nonlocal submitted
        call = _Call(submitted, request, pacer, generate, download)
        if journal is None:
            running.add(start(call.run()))
        else:
            running.add(start(call.resume(journal, source.entry(submitted))))
        submitted += 1
        report()

    try:
        while True:
            while source.open and going() and pulling is None and len(running) < concurrency:
                if source.ready:
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
                if isinstance(request, GenerateRequest) and going():  # not yet recorded
                    submit(request)
                continue
            running.discard(task)
            result: AnyResult = task.result()
            completed += 1
            failed += not result.ok
            report()
            yield result
        if stopped is not None:
            raise stopped
        if journal is not None and journal.failure is not None:
            raise journal.failure
        if source.error is not None:
            raise source.error
    finally:
        leftovers = [*running, *([pulling] if pulling is not None else [])]
        for task in leftovers:
            task.cancel()
        # Shielded: a cancelled consumer still waits for downloads to remove their
        # temp files, for connections to be released and for the journal's writes.
        with anyio.CancelScope(shield=True):
            if leftovers:
                await asyncio.gather(*leftovers, return_exceptions=True)
            if journal is not None:
                await journal.aclose()


@attrs.frozen
class _Call:
    """One request of a batch: its call, its download, and with a journal its records."""

    index: int
    request: GenerateRequest
    pacer: Pacer
    generate: Generate
    download: Download | None

    def failure(self, error: DeepModeError, generation: Generation | None = None) -> BatchFailure:
        return BatchFailure(self.index, self.request, generation, error=error)

    async def run(self) -> AnyResult:
        try:
            with pacing(self.pacer):  # this task's own context: only this call is paced
                generation = await self.generate(self.request)
        except DeepModeError as error:
            return self.failure(error)
        return await self.fetch(generation)

    async def fetch(self, generation: Generation) -> AnyResult:
        if self.download is None:
            return BatchSuccess(self.index, self.request, generation)
        try:
            paths = await self.download(generation.images)
        except DeepModeError as error:
            return self.failure(error, generation)
        return BatchDownloaded(self.index, self.request, generation, tuple(paths))

    async def resume(self, journal: BatchJournal, entry: Entry | None) -> AnyResult:
        """`run`, unless the journal has its answer, or says it may have been charged."""
        if entry is not None:
            try:
                generation = journal.recorded(self.index, entry)
            except StoreError as error:
                return BatchFailure(self.index, self.request, error=error, resumed=True)
            if generation is not None:
                return await self.refetch(journal, entry, generation)
            unknown = journal.unknown(self.index, self.request, entry)
            if unknown is not None:
                return BatchFailure(self.index, self.request, error=unknown, resumed=True)
        sent: Entry | None = None

        async def record_sent() -> None:  # once its slot is free and every pause over
            nonlocal sent
            sent = await journal.sent(self.index, self.request)

        try:
            with pacing(self.pacer, before_send=record_sent):
                generation = await self.generate(self.request)
        except DeepModeError as error:
            if sent is not None:  # else never recorded as sent, so never sent
                await journal.ended(self.index, journal.failed(sent, error))
            return self.failure(error)
        assert sent is not None, "a generation without a try"
        entry = journal.succeeded(sent, generation)
        await journal.ended(self.index, entry)
        result = await self.fetch(generation)
        if result.paths is not None:
            await journal.ended(self.index, journal.downloaded(entry, result.paths))
        return result

    async def refetch(
        self, journal: BatchJournal, entry: Entry, generation: Generation
    ) -> AnyResult:
        """A recorded result, its missing files downloaded again (no charge)."""
        if self.download is None:
            return BatchSuccess(self.index, self.request, generation, resumed=True)
        try:
            paths = await journal.missing_files(generation, entry.paths, self.download)
        except DeepModeError as error:
            return BatchFailure(self.index, self.request, generation, error=error, resumed=True)
        if entry.paths != tuple(str(path) for path in paths):
            await journal.ended(self.index, journal.downloaded(entry, paths))
        return BatchDownloaded(self.index, self.request, generation, paths, resumed=True)
