"""Batch generation: many `generate` calls, bounded, paced together, one result each.

`dm.images.generate_many` is the public door; this module holds its request and result
types and the loop that runs them. The loop pulls requests from the input only as slots
free up (an endless generator is fine), runs each in its own task, and yields results
in the order they complete. Tasks report completion through one queue, so each result
costs the same however many are in flight.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
)
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import anyio
import attrs

from . import _validate as check
from ._downloads import DOWNLOAD_CONCURRENCY
from ._errors import (
    DeepModeError,
    ProgressCallbackError,
    ValidationError,
    report_progress,
)
from ._transport import Pacer, Timeout
from ._types import Generation, Ratio
from ._validate import MAX_NUM_IMAGES

if TYPE_CHECKING:
    from .resources.images import Images


@attrs.frozen
class GenerateRequest:
    """The arguments of one `images.generate` call, checked when it is made.

    Invalid arguments raise `ValidationError` here, before anything is sent; `ratio` is
    kept as a `Ratio`.
    """

    model_id: str
    prompt: str
    negative_prompt: str | None = None
    num_images: int = 1
    upscale: bool = False
    ratio: Ratio | str = Ratio.PORTRAIT

    def __attrs_post_init__(self) -> None:
        check.non_empty("model_id", self.model_id)
        check.non_empty("prompt", self.prompt)
        if self.negative_prompt is not None:
            check.text("negative_prompt", self.negative_prompt)
        check.integer("num_images", self.num_images, 1, MAX_NUM_IMAGES)
        check.boolean("upscale", self.upscale)
        # The one field that changes: a plain string becomes its enum member.
        object.__setattr__(self, "ratio", Ratio(check.choice("ratio", self.ratio, Ratio)))

    def _json(self) -> dict[str, Any]:
        """The request's JSON body, as the API takes it."""
        body: dict[str, Any] = {
            "model_id": self.model_id,
            "prompt": self.prompt,
            "num_images": self.num_images,
            "upscale": self.upscale,
            "ratio": str(self.ratio),
        }
        if self.negative_prompt is not None:
            body["negative_prompt"] = self.negative_prompt
        return body


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
    images: Images,
    requests: Iterable[GenerateRequest] | AsyncIterable[GenerateRequest],
    *,
    concurrency: int,
    download_to: pathlib.Path | None,
    progress: BatchProgressCallback | None,
    timeout: Timeout,
) -> AsyncGenerator[BatchResult, None]:
    """Yield one `BatchResult` per request as each completes (see `generate_many`).

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
        running.add(start(_run_one(images, submitted, request, pacer, download_to, timeout)))
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
    images: Images,
    index: int,
    request: GenerateRequest,
    pacer: Pacer,
    download_to: pathlib.Path | None,
    timeout: Timeout,
) -> BatchResult:
    try:
        generation = await images._generate(request, timeout=timeout, pacer=pacer)
    except DeepModeError as error:
        return BatchResult(index, request, error=error)
    if download_to is None:
        return BatchResult(index, request, generation)
    try:
        # `download_to` was checked once for the batch; should it go away later, writing
        # into it fails as a `DownloadError` ("cannot write"), with the generation kept.
        paths = await images._downloader.download(
            generation.images,
            download_to,
            concurrency=DOWNLOAD_CONCURRENCY,
            overwrite=False,
            progress=None,
            timeout=timeout,
        )
    except DeepModeError as error:
        return BatchResult(index, request, generation, error=error)
    return BatchResult(index, request, generation, tuple(paths))
