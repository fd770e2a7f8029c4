"""`images.generate_many`: one result per request, failures kept apart, lazy and bounded,
paced together on 429s, never sent twice, clean on break and cancellation, downloads
pipelined; every claim measured on the mock server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import pathlib
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any, assert_type, cast

import anyio
import attrs
import pytest
from conftest import eventually, make_client, wait_until

from deepmode_async import (
    APIConnectionError,
    AsyncClient,
    BatchDownloaded,
    BatchFailure,
    BatchProgress,
    BatchResult,
    BatchSuccess,
    Client,
    DeepModeError,
    DownloadError,
    GenerateRequest,
    Generation,
    InternalServerError,
    NotFoundError,
    ProgressCallbackError,
    Ratio,
    ValidationError,
)
from deepmode_async.testing import Endpoint, MockDeepMode
from deepmode_async.testing._records import RecordedRequest

pytestmark = pytest.mark.anyio

UNKNOWN_MODEL = "no-such-model"


def requests_for(model_id: str, count: int, **fields: Any) -> list[GenerateRequest]:
    return [
        GenerateRequest(model_id=model_id, prompt=f"prompt {i}", **fields) for i in range(count)
    ]


def sent(mock: MockDeepMode, endpoint: Endpoint, since: int = 0) -> list[RecordedRequest]:
    return [record for record in mock.requests[since:] if record.endpoint == endpoint]


def batch(
    dm: AsyncClient,
    requests: Iterable[GenerateRequest] | AsyncIterable[GenerateRequest],
    **options: Any,
) -> AsyncGenerator[BatchResult, None]:
    return dm.images.generate_many(requests, **options)


async def run_all(
    dm: AsyncClient,
    requests: Iterable[GenerateRequest] | AsyncIterable[GenerateRequest],
    **options: Any,
) -> list[BatchResult]:
    return [result async for result in dm.images.generate_many(requests, **options)]


async def collect_into(
    received: list[BatchResult],
    dm: AsyncClient,
    requests: Iterable[GenerateRequest] | AsyncIterable[GenerateRequest],
    **options: Any,
) -> None:
    """Run a batch, keeping its results in `received` even when it ends with an error."""
    async for result in dm.images.generate_many(requests, **options):
        received.append(result)


def batch_tasks() -> list[asyncio.Task[Any]]:
    """Tasks of a batch still alive on this loop: its requests and its input pulls."""
    names = {"_Call.run", "_Call.resume", "_Input.next_later"}
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and getattr(task.get_coro(), "__qualname__", "") in names
    ]


def loop_tasks() -> int:
    """Tasks on this loop, leaving out the mock's per-connection handlers (the number of
    pooled keep-alive connections is not the batch's business)."""
    return sum(
        1
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") != "RequestHandler.start"
    )


def hidden_files(directory: pathlib.Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.startswith("."))


# ------------------------------------------------------------------ requests and results


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "  \n"}, "prompt"),
        ({"model_id": ""}, "model_id"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": 9}, "num_images"),
        ({"num_images": True}, "num_images"),
        ({"ratio": "panorama"}, "ratio"),
        ({"upscale": 1}, "upscale"),
        ({"upscale": "yes"}, "upscale"),
        ({"negative_prompt": 5}, "negative_prompt"),
    ],
)
async def test_generate_request_is_checked_when_made_and_generate_rejects_the_same(
    mock: MockDeepMode, dm: AsyncClient, model_id: str, fields: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {"model_id": model_id, "prompt": "a lighthouse", **fields}
    with pytest.raises(ValidationError, match=message):
        GenerateRequest(**arguments)
    with pytest.raises(ValidationError, match=message):
        await dm.images.generate(**arguments)
    assert mock.requests == []
    assert mock.ledger == []


async def test_generate_request_keeps_ratio_as_the_enum(
    mock: MockDeepMode, dm: AsyncClient, model_id: str
) -> None:
    request = GenerateRequest(model_id=model_id, prompt="p", ratio="square")
    assert request.ratio is Ratio.SQUARE
    assert GenerateRequest(model_id=model_id, prompt="p").ratio is Ratio.PORTRAIT
    assert GenerateRequest(model_id=model_id, prompt="p", ratio=Ratio.SQUARE) == request
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        request.prompt = "changed"  # type: ignore[misc]
    [result] = await run_all(dm, [request])
    assert result.ok
    assert sent(mock, "generate")[0].json == {
        "model_id": model_id,
        "prompt": "p",
        "num_images": 1,
        "upscale": False,
        "ratio": "square",
    }


async def test_every_request_yields_exactly_one_result(
    mock: MockDeepMode, dm: AsyncClient, model_id: str
) -> None:
    requests = [
        GenerateRequest(
            model_id=model_id,
            prompt=f"prompt {i}",
            num_images=i % 8 + 1,
            ratio="square" if i % 2 else "portrait",
        )
        for i in range(12)
    ]
    results = await run_all(dm, requests, concurrency=4)

    assert len(results) == 12
    assert sorted(result.index for result in results) == list(range(12))
    for result in results:
        assert result.ok
        assert result.error is None
        assert result.paths is None
        assert result.request is requests[result.index]
        assert isinstance(result.generation, Generation)
        assert len(result.generation.images) == result.request.num_images
        for image in result.generation.images:
            assert image.prompt == result.request.prompt
            assert image.model_id == model_id
            assert image.ratio == result.request.ratio
    posted = sent(mock, "generate")
    assert sorted(record.json["prompt"] for record in posted) == sorted(r.prompt for r in requests)
    assert len(mock.ledger) == 12
    assert len(mock.images) == sum(r.num_images for r in requests)


async def test_an_empty_input_yields_nothing(mock: MockDeepMode, dm: AsyncClient) -> None:
    assert await run_all(dm, []) == []
    assert mock.requests == []


async def test_failures_stay_with_their_request(
    mock: MockDeepMode, dm: AsyncClient, model_id: str
) -> None:
    unknown = {6, 9}
    requests = [
        GenerateRequest(model_id=UNKNOWN_MODEL if i in unknown else model_id, prompt=f"p{i}")
        for i in range(12)
    ]
    mock.fail("generate", 500, times=2)  # taken by the first two calls to arrive
    results: list[BatchResult] = []
    result: BatchResult  # the loop below rebinds it to any result
    async for result in dm.images.generate_many(requests, concurrency=3):
        results.append(result)  # nothing escapes the loop

    assert sorted(result.index for result in results) == list(range(12))
    by_index = {result.index: result for result in results}
    not_found = {i for i, r in by_index.items() if isinstance(r.error, NotFoundError)}
    server_errors = {i for i, r in by_index.items() if isinstance(r.error, InternalServerError)}
    assert not_found == unknown
    assert len(server_errors) == 2
    assert server_errors.isdisjoint(unknown)
    for index, result in by_index.items():
        if index in unknown | server_errors:
            assert not result.ok
            assert result.generation is None
        else:
            assert result.ok
            assert result.generation is not None
            assert len(result.generation.images) == 1

    # The 500s were not retried: one POST per request, and only the successes charged.
    posted = sent(mock, "generate")
    assert len(posted) == 12
    assert sorted(record.status or 0 for record in posted) == [200] * 8 + [404] * 2 + [500] * 2
    assert len(mock.ledger) == 8


# ------------------------------------------------------------------ bounded and lazy


async def test_concurrency_bounds_the_calls_in_flight_on_the_server(
    mock: MockDeepMode, dm: AsyncClient, model_id: str
) -> None:
    mock.set_latency("generate", 0.05)
    # The first wave is held long enough to be all in at once however slow the machine.
    mock.stall("generate", seconds=0.5, times=5)
    mock.peak_in_flight = 0
    started = time.monotonic()
    results = await run_all(dm, requests_for(model_id, 40), concurrency=5)
    elapsed = time.monotonic() - started
    assert len(results) == 40
    assert all(result.ok for result in results)
    assert mock.peak_in_flight == 5
    assert elapsed >= 0.5 + 7 * 0.05 * 0.9  # eight waves of five, the first held

    mock.peak_in_flight = 0
    results = await run_all(dm, requests_for(model_id, 4), concurrency=1)
    assert [result.index for result in results] == [0, 1, 2, 3]  # one at a time: in order
    assert mock.peak_in_flight == 1


async def test_an_endless_generator_is_pulled_only_as_slots_free_up(
    mock: MockDeepMode, dm: AsyncClient, model_id: str
) -> None:
    pulled = 0

    def endless() -> Iterator[GenerateRequest]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield GenerateRequest(model_id=model_id, prompt=f"prompt {i}")

    wanted, concurrency = 10, 4
    received: list[BatchResult] = []
    async with contextlib.aclosing(batch(dm, endless(), concurrency=concurrency)) as results:
        async for result in results:
            received.append(result)
            if len(received) == wanted:
                break
    assert len(received) == wanted
    assert all(result.ok for result in received)
    assert wanted <= pulled <= wanted + concurrency
    assert len(sent(mock, "generate")) <= pulled


async def test_results_are_yielded_while_an_async_input_waits(
    dm: AsyncClient, model_id: str
) -> None:
    """Each request goes into the queue only after the previous one's result came out."""
    requests = requests_for(model_id, 4)
    queue: asyncio.Queue[GenerateRequest | None] = asyncio.Queue()

    async def feed() -> AsyncIterator[GenerateRequest]:
        while (request := await queue.get()) is not None:
            yield request

    queue.put_nowait(requests[0])
    received: list[BatchResult] = []
    with anyio.fail_after(5):  # a batch that waited for its input before yielding would hang
        async for result in dm.images.generate_many(feed(), concurrency=4):
            received.append(result)
            assert queue.empty()
            following = len(received)
            queue.put_nowait(requests[following] if following < len(requests) else None)
    assert [result.index for result in received] == [0, 1, 2, 3]
    assert [result.request for result in received] == requests
    assert all(result.ok for result in received)


async def test_an_async_generator_that_sleeps_between_items(dm: AsyncClient, model_id: str) -> None:
    requests = requests_for(model_id, 4)
    exhausted = False

    async def slowly() -> AsyncIterator[GenerateRequest]:
        nonlocal exhausted
        for request in requests:
            yield request
            await asyncio.sleep(0.05)
        exhausted = True

    input_exhausted_at_first_result: bool | None = None
    received: list[BatchResult] = []
    async for result in dm.images.generate_many(slowly(), concurrency=2):
        if input_exhausted_at_first_result is None:
            input_exhausted_at_first_result = exhausted
        received.append(result)
    assert input_exhausted_at_first_result is False
    assert exhausted
    assert sorted(result.index for result in received) == [0, 1, 2, 3]
    assert all(result.ok for result in received)


# ------------------------------------------------------------------ break and cancellation


async def test_break_inside_aclosing_cancels_what_is_in_flight(
    mock: MockDeepMode, dm: AsyncClient, model_id: str
) -> None:
    mock.stall("generate", seconds=10, times=2)  # two of three hang; one answers
    async with contextlib.aclosing(batch(dm, requests_for(model_id, 3), concurrency=3)) as it:
        async for result in it:
            first = result
            break
    assert first.ok
    assert batch_tasks() == []  # cleaned up at the break itself, not later

    await eventually(lambda: mock.in_flight == 0, within=3)
    posted = sent(mock, "generate")
    assert len(posted) == 3
    hung = [record for record in posted if record.status is None]
    assert len(hung) == 2
    assert all(record.disconnected for record in hung)
    assert len(mock.ledger) == 1  # stalled before processing: nothing charged

    later = await dm.images.generate(model_id=model_id, prompt="after the break")
    assert len(later.images) == 1


async def test_plain_break_cleans_up_soon_after(
    mock: MockDeepMode, dm: AsyncClient, model_id: str
) -> None:
    await asyncio.gather(
        *(dm.images.generate(model_id=model_id, prompt=f"warm {i}") for i in range(3))
    )
    baseline = loop_tasks()
    mock.stall("generate", seconds=10, times=2)
    async for result in dm.images.generate_many(requests_for(model_id, 3), concurrency=3):
        first = result
        break
    assert first.ok
    for _ in range(5):
        await asyncio.sleep(0)
    await eventually(lambda: not batch_tasks() and loop_tasks() == baseline, within=3)
    await eventually(lambda: mock.in_flight == 0, within=3)
    hung = [record for record in sent(mock, "generate") if record.status is None]
    assert len(hung) == 2
    assert all(record.disconnected for record in hung)

    later = await dm.images.generate(model_id=model_id, prompt="after the break")
    assert len(later.images) == 1


async def test_cancelling_the_consumer_task_cancels_the_batch(
    mock: MockDeepMode, dm: AsyncClient, model_id: str
) -> None:
    mock.stall("generate", seconds=10, times=2)
    received: list[BatchResult] = []

    async def consume() -> None:
        async for result in dm.images.generate_many(requests_for(model_id, 3), concurrency=3):
            received.append(result)

    task = asyncio.create_task(consume())
    await eventually(lambda: len(received) == 1 and mock.in_flight == 2, within=3)
    assert len(batch_tasks()) == 2  # the two stalled requests: the helper sees them
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert batch_tasks() == []
    await eventually(lambda: mock.in_flight == 0, within=3)
    assert len(received) == 1
    assert all(r.disconnected for r in sent(mock, "generate") if r.status is None)

    later = await dm.images.generate(model_id=model_id, prompt="after the cancel")
    assert len(later.images) == 1


async def test_a_cancel_scope_leaves_no_temp_files(
    mock: MockDeepMode, dm: AsyncClient, model_id: str, tmp_path: pathlib.Path
) -> None:
    mock.stall("download", seconds=10, after_bytes=100)  # one download hangs half-written
    received: list[BatchResult] = []
    temp_seen: list[str] = []
    with anyio.CancelScope() as scope:
        async for result in batch(
            dm, requests_for(model_id, 2), concurrency=2, download_to=tmp_path
        ):
            received.append(result)
            await eventually(lambda: bool(hidden_files(tmp_path)), within=3)
            temp_seen = hidden_files(tmp_path)
            scope.cancel()
    assert scope.cancelled_caught
    assert len(temp_seen) == 1
    assert temp_seen[0].endswith(".part")
    assert len(received) == 1
    assert received[0].paths is not None
    assert batch_tasks() == []
    # Only the completed image remains: the half-written one's temp file is gone.
    assert sorted(path.name for path in tmp_path.iterdir()) == [received[0].paths[0].name]

    generation = await dm.images.generate(model_id=model_id, prompt="after the cancel")
    paths = await dm.images.download(generation, tmp_path)
    assert paths[0].read_bytes() == mock.image_bytes


async def test_move_on_after_leaves_no_temp_files(
    mock: MockDeepMode, dm: AsyncClient, model_id: str, tmp_path: pathlib.Path
) -> None:
    mock.stall("download", seconds=10, after_bytes=100, times=2)
    received: list[BatchResult] = []
    with anyio.move_on_after(0.3) as scope:
        async for result in batch(
            dm, requests_for(model_id, 3), concurrency=3, download_to=tmp_path
        ):
            received.append(result)
    assert scope.cancelled_caught
    assert len(received) == 1
    assert received[0].paths is not None
    assert hidden_files(tmp_path) == []
    assert [path.name for path in tmp_path.iterdir()] == [received[0].paths[0].name]
    assert batch_tasks() == []
    await eventually(lambda: mock.in_flight == 0, within=3)
    assert len(sent(mock, "download")) == 3
    await eventually(lambda: sum(r.disconnected for r in sent(mock, "download")) == 2, within=3)

    results = await run_all(dm, requests_for(model_id, 2), download_to=tmp_path)
    assert all(result.ok for result in results)
    assert hidden_files(tmp_path) == []
    assert len(list(tmp_path.iterdir())) == 3


# ------------------------------------------------------------------ 429s: slowing down together


async def test_a_429_storm_slows_the_batch_down_instead_of_hammering(
    mock: MockDeepMode, model_id: str
) -> None:
    mock.set_latency("generate", 0.05)
    mock.limit_concurrency(2, retry_after=0.05)
    async with make_client(mock, max_retries=50) as dm:
        start = len(mock.requests)
        results = await run_all(dm, requests_for(model_id, 30), concurrency=8)
        batch_posts = sent(mock, "generate", start)
        batch_429s = sum(record.status == 429 for record in batch_posts)
        assert len(results) == 30
        assert [result.error for result in results] == [None] * 30
        assert sum(record.status == 200 for record in batch_posts) == 30

        limiter = asyncio.Semaphore(8)

        async def one(request: GenerateRequest) -> Generation:
            async with limiter:
                return await dm.images.generate(model_id=request.model_id, prompt=request.prompt)

        start = len(mock.requests)
        outcomes = await asyncio.gather(
            *(one(request) for request in requests_for(model_id, 30)), return_exceptions=True
        )
        gather_posts = sent(mock, "generate", start)
        gather_429s = sum(record.status == 429 for record in gather_posts)
    print(f"429s: generate_many {batch_429s}, gather + Semaphore(8) {gather_429s}")
    assert all(isinstance(outcome, Generation) for outcome in outcomes)
    assert batch_429s * 2 < gather_429s
    assert len(mock.ledger) == 60


async def test_after_a_429_the_rest_of_the_batch_waits_too(
    mock: MockDeepMode, model_id: str
) -> None:
    """The first request gets a 429 (Retry-After 0.5 s) before the others are handed
    over; they then wait out the same pause instead of going at once."""
    mock.fail("generate", 429, times=3, retry_after=0.5)
    requests = requests_for(model_id, 8)
    first_429_seen = 0.0

    async def feed() -> AsyncIterator[GenerateRequest]:
        nonlocal first_429_seen
        yield requests[0]
        await eventually(lambda: any(r.status == 429 for r in mock.requests), within=3)
        first_429_seen = time.monotonic()
        for request in requests[1:]:
            yield request

    arrivals: list[float] = []
    async with make_client(mock, max_retries=5) as dm:
        started = time.monotonic()
        results: list[BatchResult] = []
        async for result in dm.images.generate_many(feed(), concurrency=8):
            arrivals.append(time.monotonic())
            results.append(result)
        elapsed = time.monotonic() - started
    assert [result.error for result in results] == [None] * 8
    assert sorted(result.index for result in results) == list(range(8))
    # Every success came after the pause the first 429 asked for, less the slack of
    # noticing it by polling; going at once, they would come a round trip after it.
    assert min(arrivals) - first_429_seen >= 0.3
    assert elapsed >= 0.5
    posted = sent(mock, "generate")
    assert sum(record.status == 429 for record in posted) == 3
    assert sum(record.status == 200 for record in posted) == 8
    assert len(posted) == 11
    assert len(mock.ledger) == 8


# ------------------------------------------------------------------ at most once


async def test_an_ambiguous_failure_is_not_sent_again(
    mock: MockDeepMode, dm: AsyncClient, model_id: str
) -> None:
    mock.drop("generate", after_processing=True)  # carried out and charged, then hung up
    results = await run_all(dm, requests_for(model_id, 5), concurrency=5)
    assert sorted(result.index for result in results) == list(range(5))
    failed = [result for result in results if not result.ok]
    assert len(failed) == 1
    assert isinstance(failed[0].error, APIConnectionError)
    assert failed[0].generation is None
    posted = sent(mock, "generate")
    assert len(posted) == 5  # nothing re-sent
    assert sum(record.status is None for record in posted) == 1
    # Each request reached processing once and was charged once, the dropped one included.
    assert len(mock.ledger) == 5
    assert {charge.request_id for charge in mock.ledger} == {r.request_id for r in posted}


# ------------------------------------------------------------------ downloads


async def test_downloads_are_pipelined_with_generation(
    mock: MockDeepMode, dm: AsyncClient, model_id: str, tmp_path: pathlib.Path
) -> None:
    mock.set_latency("generate", 0.05)
    requests = requests_for(model_id, 6, num_images=2)
    generates_at_first_result: int | None = None
    results: list[BatchResult] = []
    result: BatchResult  # the loops below rebind it to any result
    async for result in dm.images.generate_many(requests, concurrency=2, download_to=tmp_path):
        if generates_at_first_result is None:
            generates_at_first_result = len(sent(mock, "generate"))
            assert result.paths is not None
            assert all(path.read_bytes() == mock.image_bytes for path in result.paths)
        results.append(result)

    # The first result, with its files on disk, came before the last request was sent.
    assert generates_at_first_result is not None
    assert generates_at_first_result < len(requests)
    order = [r.endpoint for r in mock.requests if r.endpoint in ("generate", "download")]
    first_download = order.index("download")
    last_generate = len(order) - 1 - order[::-1].index("generate")
    assert first_download < last_generate

    assert sorted(result.index for result in results) == list(range(6))
    all_paths: list[pathlib.Path] = []
    for result in results:
        assert result.ok
        assert result.generation is not None
        assert result.paths is not None
        assert [path.name for path in result.paths] == [
            image.file_name for image in result.generation.images
        ]
        for path in result.paths:
            assert path.parent == tmp_path
            assert path.read_bytes() == mock.image_bytes
        all_paths.extend(result.paths)
    assert sorted(tmp_path.iterdir()) == sorted(all_paths)
    assert len(all_paths) == 12
    assert hidden_files(tmp_path) == []


@pytest.mark.parametrize("fault", ["404", "truncate"])
async def test_a_failed_download_keeps_the_generation(
    mock: MockDeepMode, model_id: str, tmp_path: pathlib.Path, fault: str
) -> None:
    if fault == "404":
        mock.fail("download", 404)
    else:
        mock.truncate()
    async with make_client(mock, max_retries=0) as dm:
        results = await run_all(dm, requests_for(model_id, 4), concurrency=4, download_to=tmp_path)
    assert sorted(result.index for result in results) == list(range(4))
    failed = [result for result in results if not result.ok]
    assert len(failed) == 1
    assert isinstance(failed[0].error, DownloadError)
    assert failed[0].generation is not None  # spent: kept so it can be downloaded again
    assert failed[0].paths is None
    assert failed[0].error.image_id == failed[0].generation.images[0].id
    fine = [result for result in results if result.ok]
    assert len(fine) == 3
    for result in fine:
        assert result.paths is not None
        assert result.paths[0].read_bytes() == mock.image_bytes
    assert hidden_files(tmp_path) == []
    assert len(list(tmp_path.iterdir())) == 3
    assert len(mock.ledger) == 4


# ------------------------------------------------------------------ progress


async def test_progress_reports_submitted_completed_and_failed(
    dm: AsyncClient, model_id: str
) -> None:
    requests = [
        GenerateRequest(model_id=UNKNOWN_MODEL if i in (2, 5) else model_id, prompt=f"p{i}")
        for i in range(9)
    ]
    seen: list[BatchProgress] = []
    received: list[BatchResult] = []
    async for result in dm.images.generate_many(requests, concurrency=3, progress=seen.append):
        assert seen[-1].completed == len(received) + 1  # reported before it is yielded
        received.append(result)

    assert seen[-1] == BatchProgress(submitted=9, completed=9, failed=2)
    assert seen[-1].in_flight == 0
    assert len(seen) == 18  # one per submission, one per completion
    for before, after in itertools.pairwise(seen):
        assert after.submitted >= before.submitted
        assert after.completed >= before.completed
        assert after.failed >= before.failed
    for progress in seen:
        assert progress.in_flight == progress.submitted - progress.completed
        assert 0 <= progress.in_flight <= 3
        assert progress.submitted <= progress.completed + 3
        assert progress.failed <= progress.completed
    assert max(progress.in_flight for progress in seen) == 3
    assert sum(not result.ok for result in received) == 2


async def consume_until_raised(
    dm: AsyncClient, requests: list[GenerateRequest], **options: Any
) -> tuple[list[BatchResult], ProgressCallbackError]:
    received: list[BatchResult] = []

    async def consume() -> None:
        async for result in dm.images.generate_many(requests, **options):
            received.append(result)

    with pytest.raises(ProgressCallbackError) as caught:
        await consume()
    return received, caught.value


async def test_a_failing_progress_callback_stops_the_batch_after_the_paid_results(
    mock: MockDeepMode, dm: AsyncClient, model_id: str
) -> None:
    def fail_at_first_completion(progress: BatchProgress) -> None:
        if progress.completed:
            raise RuntimeError("progress bar broke")

    received, error = await consume_until_raised(
        dm, requests_for(model_id, 6), concurrency=2, progress=fail_at_first_completion
    )
    assert str(error).startswith("the batch stopped: its progress callback raised RuntimeError")
    # Both calls in flight were paid for: both are yielded; none is started after.
    assert len(received) == len(mock.ledger) == len(sent(mock, "generate")) == 2
    assert all(result.ok for result in received)
    assert {result.generation.images[0].id for result in received if result.generation} <= set(
        mock.images
    )
    assert (await dm.account.balance()).remaining_balance == mock.balance  # still works


async def test_a_progress_callback_failing_at_submission_stops_the_batch(
    mock: MockDeepMode, dm: AsyncClient, model_id: str
) -> None:
    def boom(progress: BatchProgress) -> None:
        raise RuntimeError("no")

    received, error = await consume_until_raised(dm, requests_for(model_id, 3), progress=boom)
    assert isinstance(error.__cause__, RuntimeError)
    assert [result.ok for result in received] == [True]  # the one sent, yielded
    assert len(mock.ledger) == len(sent(mock, "generate")) == 1


async def test_a_request_pulled_after_the_progress_callback_failed_is_not_sent(
    mock: MockDeepMode, dm: AsyncClient, model_id: str
) -> None:
    mock.set_latency("generate", 0.05)

    async def slow_input() -> AsyncIterator[GenerateRequest]:
        for request in requests_for(model_id, 4):
            yield request
            await asyncio.sleep(0.5)  # the first call ends (and the callback fails) meanwhile

    def fail_at_first_completion(progress: BatchProgress) -> None:
        if progress.completed:
            raise RuntimeError("progress bar broke")

    received: list[BatchResult] = []

    async def consume() -> None:
        batch = dm.images.generate_many(
            slow_input(), concurrency=4, progress=fail_at_first_completion
        )
        async for result in batch:
            received.append(result)

    with pytest.raises(ProgressCallbackError):
        await consume()
    assert [result.index for result in received] == [0]
    assert len(sent(mock, "generate")) == len(mock.ledger) == 1


# ------------------------------------------------------------------ bad input


async def test_an_item_that_is_not_a_request_stops_the_input(
    mock: MockDeepMode, dm: AsyncClient, model_id: str
) -> None:
    items: list[object] = [
        *requests_for(model_id, 3),
        {"model_id": model_id, "prompt": "a dict"},
        *requests_for(model_id, 2),
    ]
    received: list[BatchResult] = []
    with pytest.raises(ValidationError, match=r"requests\[3\] is a dict"):
        await collect_into(received, dm, cast(list[GenerateRequest], items))
    assert sorted(result.index for result in received) == [0, 1, 2]
    assert all(result.ok for result in received)
    assert len(sent(mock, "generate")) == 3


async def test_an_input_that_raises_ends_the_batch_with_its_error(
    mock: MockDeepMode, dm: AsyncClient, model_id: str
) -> None:
    def breaks() -> Iterator[GenerateRequest]:
        yield from requests_for(model_id, 2)
        raise RuntimeError("the input broke")

    received: list[BatchResult] = []
    with pytest.raises(RuntimeError, match="the input broke"):
        await collect_into(received, dm, breaks())
    assert sorted(result.index for result in received) == [0, 1]
    assert all(result.ok for result in received)

    async def breaks_later() -> AsyncIterator[GenerateRequest]:
        for request in requests_for(model_id, 2):
            yield request
        raise RuntimeError("the async input broke")

    received.clear()
    with pytest.raises(RuntimeError, match="the async input broke"):
        await collect_into(received, dm, breaks_later())
    assert sorted(result.index for result in received) == [0, 1]
    assert len(sent(mock, "generate")) == 4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"requests": 42}, "requests must be an iterable"),
        ({"requests": "a prompt"}, "requests must be an iterable"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": -1}, "concurrency"),
        ({"concurrency": True}, "concurrency"),
        ({"concurrency": 2.5}, "concurrency"),
        ({"progress": "x"}, "progress"),
        ({"timeout": "soon"}, "timeout"),
    ],
)
async def test_bad_arguments_are_refused_before_any_request(
    mock: MockDeepMode, dm: AsyncClient, model_id: str, options: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {"requests": requests_for(model_id, 2), **options}
    requests = arguments.pop("requests")
    with pytest.raises(ValidationError, match=message):
        await run_all(dm, requests, **arguments)
    assert mock.requests == []


# ------------------------------------------------------------------ the blocking client


def test_the_blocking_client_iterates_a_batch_and_can_break() -> None:
    with MockDeepMode() as mock:
        model_id = mock.add_model().id
        with Client(mock.api_key, base_url=mock.base_url) as dm:
            requests = requests_for(model_id, 5, num_images=2)
            results = list(dm.images.generate_many(requests, concurrency=2))
            assert sorted(result.index for result in results) == list(range(5))
            for result in results:
                assert result.ok
                assert result.request is requests[result.index]
                assert result.generation is not None
                assert len(result.generation.images) == 2

            mock.stall("generate", seconds=10, times=2)
            for result in dm.images.generate_many(requests_for(model_id, 3), concurrency=3):
                first = result
                break
            assert first.ok
            wait_until(lambda: mock.in_flight == 0, within=3.0)
            hung = [r for r in sent(mock, "generate") if r.status is None]
            assert len(hung) == 2
            assert all(record.disconnected for record in hung)

            later = dm.images.generate(model_id=model_id, prompt="after the break")
            assert len(later.images) == 1
        assert len(mock.ledger) == 5 + 1 + 1


def test_breaking_out_of_a_blocking_batch_returns_after_its_clean_up(
    tmp_path: pathlib.Path,
) -> None:
    with MockDeepMode() as mock:
        model_id = mock.add_model().id
        mock.stall("download", seconds=10, after_bytes=100)  # one download hangs half-written
        with Client(mock.api_key, base_url=mock.base_url) as dm:
            results = dm.images.generate_many(
                requests_for(model_id, 2), concurrency=2, download_to=tmp_path
            )
            for _ in results:
                wait_until(lambda: bool(hidden_files(tmp_path)), within=3.0)
                break
            del results  # the iterator closes here, as a `for` over a call does at once
            assert hidden_files(tmp_path) == []  # no wait: the temp file went with the break


# ------------------------------------------------------------------ pacing edge cases


async def test_a_429_that_is_not_retried_still_holds_the_batch_back(
    mock: MockDeepMode, model_id: str
) -> None:
    mock.fail("generate", 429, retry_after=0.3)
    async with make_client(mock, max_retries=0) as dm:
        started = time.monotonic()
        results = await run_all(dm, requests_for(model_id, 4), concurrency=1)
        elapsed = time.monotonic() - started
    by_index = sorted(results, key=lambda result: result.index)
    assert type(by_index[0].error).__name__ == "RateLimitError"
    assert all(result.ok for result in by_index[1:])
    # The others waited out the Retry-After although nobody retried the refused call.
    assert elapsed >= 0.28
    assert len(sent(mock, "generate")) == 4


async def test_a_request_refused_for_good_does_not_stall_the_batch() -> None:
    from aiohttp import web

    tries: dict[str, int] = {}

    async def generate(request: web.Request) -> web.Response:
        prompt = (await request.json())["prompt"]
        tries[prompt] = tries.get(prompt, 0) + 1
        if prompt == "refused":
            return web.json_response(
                {"detail": "quota"}, status=429, headers={"Retry-After": "0.01"}
            )
        return web.json_response({"images": []})

    app = web.Application()
    app.router.add_post("/api/images/generate", generate)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"

    def endless() -> Iterator[GenerateRequest]:
        yield GenerateRequest(model_id="m", prompt="refused")
        for number in itertools.count():
            yield GenerateRequest(model_id="m", prompt=f"fine {number}")

    try:
        async with (
            AsyncClient("key", base_url=base_url, max_retries=2) as dm,
            contextlib.aclosing(dm.images.generate_many(endless(), concurrency=2)) as results,
        ):
            with anyio.fail_after(10):  # without a bound on forgiveness: forever
                async for result in results:
                    if result.index == 0:
                        break
    finally:
        await runner.cleanup()
    assert type(result.error).__name__ == "RateLimitError"
    # Forgiven tries are bounded (8) on top of the 1 + 2 counted ones.
    assert 3 <= tries["refused"] <= 3 + 8


async def test_results_narrow_for_type_checkers(
    dm: AsyncClient, model_id: str, tmp_path: pathlib.Path
) -> None:
    """`if result.ok:` (or `result.error is None`) gives `generation`, and with
    `download_to` `paths`, without Optional; mypy --strict checks the assert_types."""
    requests = [GenerateRequest(model_id=model_id, prompt="p"), *requests_for(UNKNOWN_MODEL, 1)]
    seen = []
    async for result in dm.images.generate_many(requests):
        assert_type(result, BatchSuccess | BatchFailure)
        assert isinstance(result, BatchResult)
        if result.ok:
            assert_type(result.generation, Generation)
            seen.append(len(result.generation.images))
        else:
            assert_type(result.error, DeepModeError)
            seen.append(-1)
    assert sorted(seen) == [-1, 1]
    async for downloaded in dm.images.generate_many(requests[:1], download_to=tmp_path):
        assert_type(downloaded, BatchDownloaded | BatchFailure)
        assert downloaded.error is None
        assert_type(downloaded, BatchDownloaded)
        assert_type(downloaded.paths, tuple[pathlib.Path, ...])
        assert [path.parent for path in downloaded.paths] == [tmp_path]


def test_blocking_results_narrow_too(tmp_path: pathlib.Path) -> None:
    with MockDeepMode() as mock, Client(mock.api_key, base_url=mock.base_url) as client:
        model_id = mock.add_model().id
        for result in client.images.generate_many(
            [GenerateRequest(model_id=model_id, prompt="p")], download_to=tmp_path
        ):
            assert_type(result, BatchDownloaded | BatchFailure)
            assert result.ok
            assert_type(result.paths, tuple[pathlib.Path, ...])
            assert len(result.paths) == 1
