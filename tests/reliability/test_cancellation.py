"""Cancellation as a system: a download, a batch and an upload cut at random points.

Each subject runs ten times per mechanism, each run cancelled `delay` seconds in: by an
anyio cancel scope (`move_on_after`, or `CancelScope.cancel()` from a timer) or by
`Task.cancel()`. The delays are 0 and seeded random points spread over the phases of the
call, as timed on an uncancelled run first; every run records the phase the cancel landed
in (before anything was sent, mid-body of an upload or a download, waiting for an answer,
after the call had finished), and the test fails unless each phase was hit, so it cannot
pass by cancelling nothing.

After every run: no temporary file anywhere, every file under a final name complete, each
request seen by the mock either answered or hung up on, nothing sent twice or charged
without a reason, and the client still works. File descriptors are counted exactly: after
each run the connection pool is refilled to the size it had after the warm-up, and the
process must then hold as many descriptors as it did then (a leak of one per cancel fails);
when the client closes, and then the mock, the count is back to what it was before each.

Then the places a call waits on its own: a retry's backoff, a batch's 429 pause, a
`CallbackHub` wait; closing an `AsyncClient` under a running call; and the blocking
`Client`: a timeout, `close()` from another thread, and Ctrl+C, each mid-body.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import pathlib
import random
import shutil
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, Literal, TypeVar

import anyio
import attrs
import pytest
from _support import leftovers, open_fds
from aiohttp import web
from conftest import eventually, make_client, wait_until, write_photos

import deepmode_async._connection
from deepmode_async import (
    APITimeoutError,
    AsyncClient,
    BatchProgress,
    BatchResult,
    Client,
    DeepModeError,
    DownloadError,
    DownloadProgress,
    GenerateRequest,
    Generation,
    Timeout,
    UploadProgress,
)
from deepmode_async.callbacks import CallbackHub
from deepmode_async.testing import CallbackDelivery, MockDeepMode, RecordedRequest

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _keep_idle_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests count the descriptors of pooled connections before and after a cut:
    the client's short keep-alive (0.5 s) would close idle ones in between, and an idle
    connection expiring is not what they are about."""
    monkeypatch.setattr(deepmode_async._connection, "KEEPALIVE_SECONDS", 60.0)


T = TypeVar("T")
How = Literal["move_on_after", "scope.cancel", "task.cancel"]

RUNS = 10  # cancelled runs per subject and mechanism
HUB_HOLD = 0.2  # how long the server holds a callback-mode call before answering
MECHANISMS = ["scope", "task"]  # scope: move_on_after and CancelScope.cancel() in turn


# ----------------------------------------------------------------------------- the harness


def plan(
    mechanism: str, windows: Sequence[tuple[float, float]], seed: int
) -> list[tuple[How, float]]:
    """`RUNS` cancels: one at 0 (before anything is sent), the others at seeded random
    delays spread over `windows`, the phases of the call as timed on an uncancelled run
    (so the plan fits however fast the machine is): as many in each, one in each equal
    slice of its middle 70 % (the phases move a little from run to run). Shuffled."""
    rng = random.Random(seed)
    delays = [0.0]
    for index, (start, end) in enumerate(windows):
        count = (RUNS - 1) // len(windows) + (index < (RUNS - 1) % len(windows))
        width = 0.7 * (end - start) / count
        low = start + 0.15 * (end - start)
        delays += [rng.uniform(low + i * width, low + (i + 1) * width) for i in range(count)]
    rng.shuffle(delays)
    if mechanism == "task":
        return [("task.cancel", delay) for delay in delays]
    hows: list[How] = ["move_on_after", "scope.cancel"]
    return [(hows[i % 2], delay) for i, delay in enumerate(delays)]


async def cancel_after(
    how: How, delay: float, call: Callable[[], Coroutine[Any, Any, T]]
) -> tuple[bool, list[T]]:
    """Run `call()` and cancel it `delay` seconds in, by `how`. Returns whether the cancel
    cut it short, and its result (in a list) when it finished first."""
    done: list[T] = []
    if how == "move_on_after":
        with anyio.move_on_after(delay) as scope:
            done.append(await call())
        return scope.cancelled_caught, done
    if how == "scope.cancel":
        with anyio.CancelScope() as scope:
            if delay == 0:
                scope.cancel()
            timer = asyncio.get_running_loop().call_later(delay, scope.cancel)
            try:
                done.append(await call())
            finally:
                timer.cancel()
        return scope.cancelled_caught, done
    task = asyncio.create_task(call())
    if delay:
        await asyncio.wait({task}, timeout=delay)
    requested = task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        done.append(await task)
    assert task.cancelled() == requested, "the call swallowed its cancellation"
    return task.cancelled(), done


@attrs.define
class Run:
    """What one cancelled run did, for the assertions and the summary."""

    how: How
    delay: float
    phase: str
    fds: int
    note: str = ""


def summary(title: str, runs: list[Run], fds: dict[str, int]) -> str:
    phases = collections.Counter(run.phase for run in runs)
    lines = [f"{title}: {dict(sorted(phases.items()))}; fds {fds}"]
    lines += [
        f"  {run.how:13} {run.delay * 1000:6.1f} ms -> {run.phase:18} fds={run.fds} {run.note}"
        for run in runs
    ]
    return "\n".join(lines)


def assert_descriptors_returned(
    title: str, runs: list[Run], fds: tuple[int, int, int, int, int]
) -> None:
    """Print what the runs hit, with the open fds (before the mock, before the client,
    warm, after the client, after the mock), and check both came back to where they were."""
    names = ("before mock", "before client", "warm", "after client", "after mock")
    print(summary(title, runs, dict(zip(names, fds, strict=True))))
    before_mock, before_client, _, after_client, after_mock = fds
    assert (after_client, after_mock) == (before_client, before_mock)


@attrs.define
class Sweep:
    """One subject's cancelled runs: the plan, each run's record, the descriptors."""

    title: str
    mechanism: str
    seed: int
    phases: list[tuple[float, float]] = attrs.Factory(list)  # timed by the subject
    warm: int = 0  # open descriptors after the warm-up, as after every run
    runs: list[Run] = attrs.Factory(list)

    async def cut(
        self,
        one: Callable[[int, How, float], Awaitable[tuple[str, str]]],
        expected: set[str],
        *,
        optional: frozenset[str] = frozenset(),
    ) -> None:
        """Run `one(run, how, delay)` (its checks; it returns the phase the cancel landed
        in and a note) for each planned cancel; the descriptors must be back to `warm`
        after each, and every `expected` phase hit (and no other but `optional` ones)."""
        for run, (how, delay) in enumerate(plan(self.mechanism, self.phases, self.seed)):
            phase, note = await one(run, how, delay)
            fds = await fds_settled(self.warm)
            self.runs.append(Run(how, delay, phase, fds, note))
            assert fds == self.warm, summary(self.title, self.runs, {"warm": self.warm})
        hit = {run.phase for run in self.runs}
        assert expected <= hit <= expected | optional, summary(
            self.title, self.runs, {"warm": self.warm}
        )


@contextlib.asynccontextmanager
async def sweeping(
    title: str, mechanism: str, seed: int, **mock_options: Any
) -> AsyncIterator[tuple[Sweep, MockDeepMode, AsyncClient]]:
    """A mock and a client for a sweep; when both have closed, the descriptors must be
    back to what they were before each."""
    sweep = Sweep(title, mechanism, seed)
    before_mock = open_fds()
    async with MockDeepMode(**mock_options) as mock:
        before_client = open_fds()
        async with make_client(mock) as dm:
            yield sweep, mock, dm
        after_client = await fds_settled(before_client)
    after_mock = await fds_settled(before_mock)
    assert_descriptors_returned(
        f"{title}/{mechanism} (phases {windows(sweep.phases)})",
        sweep.runs,
        (before_mock, before_client, sweep.warm, after_client, after_mock),
    )


def windows(phases: Sequence[tuple[float, float]]) -> str:
    return ", ".join(f"{start * 1000:.0f}-{end * 1000:.0f}" for start, end in phases) + " ms"


def settled(record: RecordedRequest) -> bool:
    """The server answered the request, or saw the client hang up."""
    return record.status is not None or record.disconnected


def all_disconnected(records: list[RecordedRequest]) -> bool:
    return all(record.disconnected for record in records)


def files(directory: pathlib.Path) -> list[pathlib.Path]:
    """Files under final names (not hidden temporary ones) in `directory`."""
    if not directory.exists():
        return []
    return sorted(path for path in directory.iterdir() if not path.name.startswith("."))


async def fds_settled(target: int, within: float = 2.0) -> int:
    """Open descriptors, once connections being closed are gone (a closed socket's
    descriptor goes a loop turn later, the server's end when it sees the hang-up).

    Polled without `open_fds()`'s garbage collection (it costs tens of ms): a count equal
    to `target` already holds every descriptor not closed, collectable or not. Only when
    it never gets there is the collected count returned."""
    for _ in range(round(within / 0.005)):
        if (count := len(os.listdir("/proc/self/fd"))) == target:
            return count
        await asyncio.sleep(0.005)
    return open_fds()


async def steady_fds() -> int:
    """`open_fds()` once the count has stayed the same for a few loop turns and 30 ms
    (connections closed just before are gone)."""
    counts: list[int] = []
    while len(counts) < 4 or len(set(counts[-4:])) > 1:
        counts.append(len(os.listdir("/proc/self/fd")))
        await asyncio.sleep(0.01)
    return open_fds()


def fds_settled_blocking(target: int, within: float = 2.0) -> int:
    deadline = time.monotonic() + within
    while len(os.listdir("/proc/self/fd")) != target and time.monotonic() < deadline:
        time.sleep(0.005)
    return open_fds()


async def timed(call: Callable[[], Coroutine[Any, Any, object]]) -> float:
    """How long `call()` takes, uncancelled."""
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


async def seen(mock: MockDeepMode, since: int, endpoint: str) -> RecordedRequest:
    """The one request to `endpoint` from `since` on, once the server has had it."""
    await eventually(lambda: any(r.endpoint == endpoint for r in mock.requests[since:]))
    (record,) = [r for r in await all_settled(mock, since) if r.endpoint == endpoint]
    return record


async def all_settled(mock: MockDeepMode, since: int) -> list[RecordedRequest]:
    """The requests from `since` on, once each is answered or hung up on and no API call
    is still open."""
    try:
        await eventually(
            lambda: mock.in_flight == 0 and all(settled(r) for r in mock.requests[since:]),
            within=2,
        )
    except AssertionError:
        open_ones = [(r.endpoint, r.status) for r in mock.requests[since:] if not settled(r)]
        raise AssertionError(
            f"in flight {mock.in_flight}; neither answered nor disconnected: {open_ones}"
        ) from None
    return mock.requests[since:]


async def finished_delivery(mock: MockDeepMode, url: str) -> CallbackDelivery:
    """The mock's delivery to `url`, once it has given up or succeeded."""
    await eventually(lambda: any(d.url == url and d.finished for d in mock.callbacks))
    (delivery,) = [d for d in mock.callbacks if d.url == url]
    return delivery


class DownloadPeak:
    """The most bytes a download reported (a cancelled file's bytes are taken back), and
    when the first arrived (seconds after this was made)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.created = time.perf_counter()
        self.first = 0.0

    def __call__(self, progress: DownloadProgress) -> None:
        if progress.bytes_done and not self.first:
            self.first = time.perf_counter() - self.created
        self.bytes = max(self.bytes, progress.bytes_done)


class UploadPeak:
    """The most image bytes an upload reported sent, and when the first and the last went
    (seconds after this was made)."""

    def __init__(self) -> None:
        self.sent = 0
        self.total = 0
        self.created = time.perf_counter()
        self.first = self.last = 0.0

    def __call__(self, progress: UploadProgress) -> None:
        now = time.perf_counter() - self.created
        self.first = self.first or now
        if progress.bytes_sent == progress.bytes_total:
            self.last = now
        self.sent = max(self.sent, progress.bytes_sent)
        self.total = progress.bytes_total


# ----------------------------------------------------------------------------- a download

DOWNLOAD_SIZE = 2 * 1024 * 1024


@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_downloads_cancelled_at_random_points(mechanism: str, tmp_path: pathlib.Path) -> None:
    async with sweeping("downloads", mechanism, 1, image_size=DOWNLOAD_SIZE) as (sweep, mock, dm):
        model = mock.add_model()
        generation = await dm.images.generate(model_id=model.id, prompt="p", num_images=3)

        def arm() -> None:
            """Three images: the host waits 25 ms before each body, and 25 ms half-way."""
            mock.clear_faults()
            mock.set_latency("download", 0.025)
            mock.stall("download", seconds=0.025, after_bytes=DOWNLOAD_SIZE // 2, times=3)

        async def still_works(check: pathlib.Path) -> None:
            """A whole download and a balance call. The three downloads overlap on the
            server, so the pool is back to three image-host connections, one API one."""
            mock.clear_faults()
            mock.set_latency("download", 0.02)
            paths = await dm.images.download(generation, check)
            assert [path.read_bytes() == mock.image_bytes for path in paths] == [True] * 3
            shutil.rmtree(check)
            assert (await dm.account.balance()).remaining_balance == mock.balance

        arm()
        timing = DownloadPeak()
        duration = await timed(
            functools.partial(dm.images.download, generation, tmp_path / "t", progress=timing)
        )
        # Waiting for the bodies, reading them (with a stop), after the end.
        sweep.phases = [(0.0, timing.first), (timing.first, duration), (duration, 2 * duration)]
        await still_works(tmp_path / "warm")
        sweep.warm = await steady_fds()

        async def one(run: int, how: How, delay: float) -> tuple[str, str]:
            arm()
            dest = tmp_path / f"cut-{run}"
            peak = DownloadPeak()
            since = len(mock.requests)

            cancelled, done = await cancel_after(
                how,
                delay,
                functools.partial(dm.images.download, generation, dest, progress=peak),
            )

            assert leftovers(tmp_path) == []
            finals = files(dest)
            assert all(path.read_bytes() == mock.image_bytes for path in finals)
            if not cancelled:
                assert sorted(done[0]) == finals
                assert len(finals) == 3
            records = [r for r in await all_settled(mock, since) if r.endpoint == "download"]
            assert len(records) <= 3  # a cancelled download is not tried again
            if not cancelled:
                phase = "after-finish"
            elif not records:
                phase = "before-send"
            elif peak.bytes == 0:
                phase = "waiting-for-answer"
                assert finals == []
            else:
                phase = "mid-body"

            await still_works(tmp_path / f"check-{run}")
            return phase, f"{peak.bytes} B, {len(finals)} files"

        await sweep.cut(one, {"before-send", "waiting-for-answer", "mid-body", "after-finish"})


# ----------------------------------------------------------------------------- a batch

BATCH_SIZE = 1024 * 1024


@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_batches_cancelled_at_random_points(mechanism: str, tmp_path: pathlib.Path) -> None:
    async with sweeping("batches", mechanism, 2, image_size=BATCH_SIZE) as (sweep, mock, dm):
        model = mock.add_model()

        async def batch(
            tag: str,
            dest: pathlib.Path,
            received: list[BatchResult],
            progress: Callable[[BatchProgress], None] | None = None,
        ) -> None:
            count = 2 if tag.startswith("check") else 3
            requests = [
                GenerateRequest(model_id=model.id, prompt=f"{tag} #{k}") for k in range(count)
            ]
            async for result in dm.images.generate_many(
                requests, concurrency=2, download_to=dest, progress=progress
            ):
                received.append(result)

        def arm() -> None:
            """Two calls at once (30 ms each), a download after each (stopped half-way
            for 30 ms), then the third call and its download."""
            mock.clear_faults()
            mock.set_latency("generate", 0.03)
            mock.set_latency("download", 0.0)
            mock.stall("download", seconds=0.03, after_bytes=BATCH_SIZE // 2, times=3)

        async def still_works(check: pathlib.Path) -> None:
            """A whole batch whose two calls and two downloads overlap on the server
            (the pool is back to two connections to each host), and a balance call."""
            mock.clear_faults()
            mock.set_latency("generate", 0.02)
            mock.set_latency("download", 0.02)
            received: list[BatchResult] = []
            await batch(f"check {check.name}", check, received)
            assert sorted(result.index for result in received) == [0, 1]
            for result in received:
                assert result.ok
                assert result.paths is not None
                assert [path.read_bytes() for path in result.paths] == [mock.image_bytes]
            shutil.rmtree(check)
            assert (await dm.account.balance()).remaining_balance == mock.balance

        arm()
        third = [0.0]  # when the third call started, a slot having freed up

        def note_third(progress: BatchProgress, started: float = time.perf_counter()) -> None:
            if progress.submitted == 3 and not third[0]:
                third[0] = time.perf_counter() - started

        duration = await timed(
            functools.partial(batch, "timed", tmp_path / "timed", [], note_third)
        )
        # Waiting for two calls, their downloads, waiting for the third, its download,
        # after the end.
        sweep.phases = [(0.0, 0.03), (0.03, third[0]), (third[0], third[0] + 0.03)]
        sweep.phases += [(third[0] + 0.03, duration), (duration, 2 * duration)]
        await still_works(tmp_path / "warm")
        sweep.warm = await steady_fds()

        async def one(run: int, how: How, delay: float) -> tuple[str, str]:
            arm()
            dest = tmp_path / f"cut-{run}"
            since, charges = len(mock.requests), len(mock.ledger)
            received: list[BatchResult] = []

            cancelled, _ = await cancel_after(
                how, delay, functools.partial(batch, f"cut {run}", dest, received)
            )

            assert leftovers(tmp_path) == []
            finals = files(dest)
            assert all(path.read_bytes() == mock.image_bytes for path in finals)
            assert all(result.ok for result in received)
            assert {p for result in received for p in result.paths or ()} <= set(finals)
            if not cancelled:
                assert sorted(result.index for result in received) == [0, 1, 2]
                assert len(finals) == 3
            new = await all_settled(mock, since)
            calls = [r for r in new if r.endpoint == "generate"]
            downloads = [r for r in new if r.endpoint == "download"]
            prompts = [r.json["prompt"] for r in calls if r.json is not None]
            assert len(prompts) == len(set(prompts))  # nothing sent twice
            assert len(mock.ledger) - charges == len(prompts)  # charged: read and done
            if not cancelled:
                phase = "after-finish"
            elif not calls:
                phase = "before-send"
            elif any(r.disconnected for r in downloads):
                phase = "mid-download"
            elif any(r.disconnected for r in calls):
                phase = "waiting-for-answer"
            else:
                phase = "between-calls"

            await still_works(tmp_path / f"check-{run}")
            return phase, f"{len(received)} results, {len(finals)} files, {len(calls)} calls"

        await sweep.cut(
            one,
            {"before-send", "waiting-for-answer", "mid-download", "after-finish"},
            optional=frozenset({"between-calls"}),
        )


# ----------------------------------------------------------------------------- an upload

UPLOAD_SIZE = 8 * 1024 * 1024
TRAINING: dict[str, Any] = {"gender": "woman", "model_type": "amateur"}


@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_uploads_cancelled_at_random_points(mechanism: str, tmp_path: pathlib.Path) -> None:
    # 24 MB streamed from disk: some ms on loopback
    images = write_photos(tmp_path / "photos", 3, size=UPLOAD_SIZE)
    # The server takes 0.25 s to answer: a window wide enough to cancel in, even when a
    # loaded machine makes one upload last longer than the one timed.
    async with sweeping("uploads", mechanism, 3, latency={"create_model": 0.25}) as (
        sweep,
        mock,
        dm,
    ):
        create = functools.partial(dm.models.create, images=images, **TRAINING)
        await create()  # the first upload starts worker threads: not a typical one
        timing = UploadPeak()
        duration = await timed(functools.partial(create, progress=timing))
        # Sending the body, waiting for the answer, after the end.
        sweep.phases = [(timing.first, timing.last), (timing.last, duration)]
        sweep.phases.append((duration, 2 * duration))
        assert (await dm.account.balance()).remaining_balance == mock.balance
        sweep.warm = await steady_fds()  # one API connection in the pool, as after every run below

        async def one(run: int, how: How, delay: float) -> tuple[str, str]:
            peak = UploadPeak()
            since, charges = len(mock.requests), len(mock.ledger)

            cancelled, done = await cancel_after(
                how, delay, functools.partial(create, progress=peak)
            )

            records = [r for r in await all_settled(mock, since) if r.endpoint == "create_model"]
            assert len(records) <= 1  # a cancelled upload is not sent again
            charged = len(mock.ledger) - charges
            if not cancelled:
                phase = "after-finish"
                assert done[0].message
                assert [f.size for f in records[0].files] == [UPLOAD_SIZE] * 3
                assert charged == 1
            elif peak.sent == 0:
                phase = "before-send"
                assert charged == 0
            elif peak.sent < peak.total:
                phase = "mid-upload"
                assert (await seen(mock, since, "create_model")).disconnected
                assert charged == 0  # the server never had the whole body
            else:
                phase = "waiting-for-answer"
                assert charged <= 1  # it may have acted: a training call was cut

            assert (await dm.account.balance()).remaining_balance == mock.balance
            return phase, f"{peak.sent // 1024} of {peak.total // 1024} KiB, charged {charged}"

        await sweep.cut(one, {"before-send", "mid-upload", "waiting-for-answer", "after-finish"})
        created = await create()  # the client still works
        assert created.message
        assert [f.size for f in mock.requests[-1].files] == [UPLOAD_SIZE] * 3


# ----------------------------------------------------------------------------- waiting


@pytest.fixture
async def mock() -> AsyncIterator[MockDeepMode]:
    """conftest's `mock`, with images large enough to be cut off half-way."""
    async with MockDeepMode(image_size=256 * 1024, callback_backoff=0.01) as server:
        yield server


@pytest.mark.parametrize("how", ["move_on_after", "task.cancel"])
async def test_a_cancel_during_a_retry_backoff_leaves_nothing(
    how: How,
    mock: MockDeepMode,
    dm: AsyncClient,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dm._transport.retry = attrs.evolve(dm._transport.retry, backoff_base=1000, backoff_cap=1000)
    monkeypatch.setattr(random, "uniform", lambda low, high: high)  # no lucky short jitter
    generation = await dm.images.generate(model_id=mock.add_model().id, prompt="p")
    await dm.images.download(generation, tmp_path / "warm")  # a connection to each host
    before = open_fds()

    # A download that failed with a 500 waits 1000 s to try again. The cancel comes 0.5 s
    # in: long after the 500, even on a loaded machine.
    mock.fail("download", 500)
    since = len(mock.requests)
    started = time.monotonic()
    cancelled, _ = await cancel_after(
        how, 0.5, lambda: dm.images.download(generation, tmp_path / "out")
    )
    assert cancelled
    assert time.monotonic() - started < 2
    assert [r.status for r in mock.requests[since:]] == [500]  # cancelled in the backoff
    assert leftovers(tmp_path) == []
    assert files(tmp_path / "out") == []

    # A paid call told to come back in 30 s (429) waits for that; cancelled meanwhile.
    mock.fail("generate", 429, retry_after=30)
    since, charges = len(mock.requests), len(mock.ledger)
    cancelled, _ = await cancel_after(
        how, 0.5, lambda: dm.images.generate(model_id=generation.images[0].model_id, prompt="q")
    )
    assert cancelled
    assert [r.status for r in mock.requests[since:]] == [429]
    assert len(mock.ledger) == charges

    assert mock.in_flight == 0
    assert await fds_settled(before) == before  # the same pooled connections, nothing more
    paths = await dm.images.download(generation, tmp_path / "out")
    assert paths[0].read_bytes() == mock.image_bytes


@pytest.mark.parametrize("how", ["scope.cancel", "task.cancel"])
async def test_a_cancel_during_a_batch_429_pause_leaves_nothing(
    how: How, mock: MockDeepMode, dm: AsyncClient, tmp_path: pathlib.Path
) -> None:
    model = mock.add_model()
    dest = tmp_path / "out"
    requests = [GenerateRequest(model_id=model.id, prompt=f"p{k}") for k in range(4)]
    # Of the first two calls one gets a 429 asking for 30 s: the whole batch pauses (the
    # other two requests wait for their turn); the other call's download hangs half-way.
    mock.fail("generate", 429, retry_after=30)
    mock.stall("download", seconds=30, after_bytes=1000)
    received: list[BatchResult] = []

    async def run_batch() -> None:
        async for result in dm.images.generate_many(requests, concurrency=2, download_to=dest):
            received.append(result)

    async def paused_mid_download() -> None:
        await eventually(
            lambda: (
                [r.status for r in mock.requests if r.endpoint == "generate"] == [429, 200]
                and leftovers(dest) != []
            )
        )

    started = time.monotonic()
    if how == "scope.cancel":
        async with anyio.create_task_group() as group:
            group.start_soon(run_batch)
            await paused_mid_download()
            group.cancel_scope.cancel()
    else:
        task = asyncio.create_task(run_batch())
        await paused_mid_download()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert time.monotonic() - started < 2  # the 30 s pause ended with the batch

    assert received == []
    assert leftovers(tmp_path) == []
    assert files(dest) == []
    await eventually(lambda: mock.in_flight == 0 and all(settled(r) for r in mock.requests))
    calls = [r for r in mock.requests if r.endpoint == "generate"]
    assert [r.status for r in calls] == [429, 200]  # the waiting requests were never sent
    assert [r.disconnected for r in mock.requests if r.endpoint == "download"] == [True]
    assert len(mock.ledger) == 1

    # The pause belonged to that batch: a new one on the same client goes at once.
    started = time.monotonic()
    again: list[BatchResult] = []
    async for result in dm.images.generate_many(requests[:2], download_to=dest):
        again.append(result)
    assert time.monotonic() - started < 1
    assert all(result.ok for result in again)
    assert [path.read_bytes() == mock.image_bytes for path in files(dest)] == [True, True]


@web.middleware
async def one_request_per_connection(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The hub closes each delivery's connection, so the mock keeps no pooled connection
    to it and the descriptors counted are the client's and the servers'."""
    response = await handler(request)
    response.force_close()
    return response


async def test_cancelling_callback_hub_waits_at_random_points(tmp_path: pathlib.Path) -> None:
    before_mock = open_fds()
    runs: list[Run] = []
    sock = socket.socket()  # bound first: the hub must know its URL before it is served
    sock.bind(("127.0.0.1", 0))
    hub = CallbackHub(f"http://127.0.0.1:{sock.getsockname()[1]}/cb", ttl=5)
    app = web.Application(middlewares=[one_request_per_connection])
    app.add_subapp("/cb", hub.aiohttp_app())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()  # the server closes it when cleaned up
    try:
        # Callback mode: the call is held HUB_HOLD s, answered, and the result POSTed 60 ms
        # later. The hold is long enough for the call to be in it on a loaded machine.
        async with MockDeepMode(
            latency={"generate": 0.06}, callback_retries=1, callback_backoff=0.01
        ) as mock:
            model = mock.add_model()
            before_client = open_fds()
            async with make_client(mock) as dm:
                assert (await dm.account.balance()).remaining_balance == mock.balance
                mock.stall("generate", seconds=HUB_HOLD)
                duration = await timed(
                    lambda: dm.images.generate(model_id=model.id, prompt="p", callback=hub)
                )
                warm = await steady_fds()
                hows: list[How] = ["move_on_after", "scope.cancel", "task.cancel"]
                # Held on the way in, waiting for the callback, after the end.
                phases = [(0.0, HUB_HOLD), (HUB_HOLD, duration), (duration, 2 * duration)]
                for run, (_, delay) in enumerate(plan("scope", phases, seed=4)):
                    how = hows[run % 3]
                    mock.clear_faults()
                    mock.stall("generate", seconds=HUB_HOLD)
                    since, charges = len(mock.requests), len(mock.ledger)
                    deliveries = len(mock.callbacks)

                    cancelled, done = await cancel_after(
                        how,
                        delay,
                        lambda: dm.images.generate(model_id=model.id, prompt="p", callback=hub),
                    )

                    assert repr(hub).endswith("pending=0)")  # nothing left expected
                    calls = [r for r in await all_settled(mock, since) if r.endpoint == "generate"]
                    if not cancelled:
                        phase = "after-finish"
                        assert isinstance(done[0], Generation)
                    elif not calls:
                        phase = "before-send"
                    elif calls[0].status is None:
                        phase = "submitting"
                        assert calls[0].disconnected
                        assert len(mock.ledger) == charges  # held before it was processed
                    else:
                        phase = "waiting-for-callback"
                        assert calls[0].status == 200
                        # The result still comes (it was paid for): the hub keeps it, and
                        # `outstanding()` lists it, while this process holds nothing.
                        url = calls[0].json["callback"]
                        delivery = await finished_delivery(mock, url)
                        assert delivery.delivered
                        assert delivery.attempts == ["200"]
                        token = url.rsplit("/", 1)[1]
                        [kept] = [p for p in await hub.outstanding() if p.token == token]
                        assert kept.done
                        assert isinstance(await kept.wait(timeout=1), Generation)
                    if phase in ("before-send", "submitting"):
                        assert len(mock.callbacks) == deliveries
                    assert repr(hub).endswith("pending=0)")

                    assert (await dm.account.balance()).remaining_balance == mock.balance
                    fds = await fds_settled(warm)
                    runs.append(Run(how, delay, phase, fds))
                    assert fds == warm, summary("hub", runs, {"warm": warm})

                assert {run.phase for run in runs} == {
                    "before-send",
                    "submitting",
                    "waiting-for-callback",
                    "after-finish",
                }, summary("hub", runs, {"warm": warm})
                mock.clear_faults()
                generation = await dm.images.generate(model_id=model.id, prompt="p", callback=hub)
                assert len(generation.images) == 1
            after_client = await fds_settled(before_client)
    finally:
        await runner.cleanup()
    after_mock = await fds_settled(before_mock)
    assert_descriptors_returned(
        f"callback hub (phases {windows(phases)})",
        runs,
        (before_mock, before_client, warm, after_client, after_mock),
    )


async def test_closing_an_async_client_mid_download_ends_the_call(
    mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    """`aclose()` while another task's download is mid-body: the download ends (a closed
    client raises `DeepModeError`), its temp files go and its connections close."""
    dm = make_client(mock)
    dest = tmp_path / "out"
    try:
        model_id = mock.add_model().id
        generation = await dm.images.generate(model_id=model_id, prompt="p", num_images=2)
        mock.stall("download", seconds=30, after_bytes=100_000, times=2)
        task = asyncio.create_task(dm.images.download(generation, dest))
        await eventually(lambda: len(leftovers(dest)) == 2)
        await dm.aclose()
        with anyio.move_on_after(2) as waited, pytest.raises(DeepModeError, match="closed"):
            await task
        assert not waited.cancelled_caught, "the download still ran 2 s after aclose()"
    finally:
        await dm.aclose()
    assert leftovers(tmp_path) == []
    await eventually(
        lambda: [r.disconnected for r in mock.requests if r.endpoint == "download"] == [True, True]
    )


# ----------------------------------------------------------------------------- blocking Client

SYNC_SIZE = 1024 * 1024


def test_blocking_timeouts_mid_download_and_mid_upload(tmp_path: pathlib.Path) -> None:
    images = write_photos(tmp_path / "photos", 3, size=UPLOAD_SIZE)
    dest = tmp_path / "out"
    before_mock = open_fds()
    with MockDeepMode(image_size=SYNC_SIZE) as mock:
        model = mock.add_model()
        before_client = open_fds()
        with Client(mock.api_key, base_url=mock.base_url, max_retries=0) as dm:
            generation = dm.images.generate(model_id=model.id, prompt="p", num_images=2)

            # Both images stop half-way (for 5 s); the read timeout (1 s) ends the call.
            mock.stall("download", seconds=5, after_bytes=SYNC_SIZE // 2, times=2)
            started = time.monotonic()
            with pytest.raises(DownloadError) as caught:
                dm.images.download(generation, dest, timeout=1.0)
            assert isinstance(caught.value.__cause__, APITimeoutError)
            assert time.monotonic() - started < 4
            assert leftovers(tmp_path) == []
            assert files(dest) == []
            wait_until(
                lambda: (
                    [r.disconnected for r in mock.requests if r.endpoint == "download"]
                    == [True, True]
                )
            )

            # An upload slowed by its progress callback (it runs on the client's loop)
            # outlives its total timeout half-way through the body.
            peak = UploadPeak()

            def slow(progress: UploadProgress) -> None:  # the body would take about 3 s
                peak(progress)
                time.sleep(0.01)

            with pytest.raises(APITimeoutError):
                dm.models.create(
                    images=images, progress=slow, timeout=Timeout(total=0.5), **TRAINING
                )
            assert 0 < peak.sent < peak.total
            wait_until(
                lambda: (
                    mock.requests[-1].endpoint == "create_model"
                    and all(settled(r) for r in mock.requests)
                )
            )
            assert mock.requests[-1].disconnected
            assert [c.endpoint for c in mock.ledger] == ["generate"]  # no training charged

            paths = dm.images.download(generation, dest)  # the client still works
            assert [path.read_bytes() == mock.image_bytes for path in paths] == [True, True]
        after_client = fds_settled_blocking(before_client)
    after_mock = fds_settled_blocking(before_mock)
    print(f"blocking timeouts: fds {before_mock=} {before_client=} {after_client=} {after_mock=}")
    assert (after_client, after_mock) == (before_client, before_mock)


def test_blocking_client_closed_from_another_thread_mid_download(tmp_path: pathlib.Path) -> None:
    """`close()` from another thread while a call is mid-body, a dozen times (the close
    lands at a slightly different point of the body each time): the call raises
    `DeepModeError` at once, and leaves no temp file and no open connection."""
    before_mock = open_fds()
    with MockDeepMode(image_size=SYNC_SIZE) as mock:
        model = mock.add_model()
        before_client = open_fds()
        outcomes: list[str] = []
        for run in range(12):
            dest = tmp_path / f"out-{run}"
            since = len(mock.requests)
            with Client(mock.api_key, base_url=mock.base_url) as dm:
                generation = dm.images.generate(model_id=model.id, prompt="p", num_images=2)
                mock.stall("download", seconds=5, after_bytes=SYNC_SIZE // 2, times=2)

                def close_mid_body(dm: Client = dm, dest: pathlib.Path = dest) -> None:
                    # Polled closely: the close lands as the first half is being read.
                    wait_until(lambda: dest.exists() and len(leftovers(dest)) == 2, step=0.0005)
                    dm.close()

                closer = threading.Thread(target=close_mid_body)
                closer.start()
                started = time.monotonic()
                try:
                    with pytest.raises(DeepModeError, match="closed"):
                        dm.images.download(generation, dest)
                finally:
                    closer.join(5)
                outcomes.append("DeepModeError")
                assert time.monotonic() - started < 2
                assert dm.closed
                assert leftovers(tmp_path) == []  # close() returns once the call cleaned up
                assert files(dest) == []
                with pytest.raises(DeepModeError, match="closed"):
                    dm.account.balance()
            cut = [r for r in mock.requests[since:] if r.endpoint == "download"]
            assert len(cut) == 2
            wait_until(functools.partial(all_disconnected, cut))  # records change in place
        after_client = fds_settled_blocking(before_client)
        with Client(mock.api_key, base_url=mock.base_url) as again:
            paths = again.images.download(generation, tmp_path / "again")
            assert [path.read_bytes() == mock.image_bytes for path in paths] == [True, True]
    after_mock = fds_settled_blocking(before_mock)
    print(f"blocking close: fds {before_mock=} {before_client=} {after_client=} {after_mock=}")
    assert (after_client, after_mock) == (before_client, before_mock)


def test_blocking_ctrl_c_mid_download_leaves_no_temp_files(tmp_path: pathlib.Path) -> None:
    dest = tmp_path / "out"
    with (
        MockDeepMode(image_size=SYNC_SIZE) as mock,
        Client(mock.api_key, base_url=mock.base_url) as dm,
    ):
        generation = dm.images.generate(model_id=mock.add_model().id, prompt="p", num_images=2)
        mock.stall("download", seconds=5, after_bytes=SYNC_SIZE // 2, times=2)
        main = threading.main_thread().ident
        assert main is not None

        def interrupt_mid_body() -> None:  # what Ctrl+C does: SIGINT to the main thread
            wait_until(lambda: len(leftovers(dest)) == 2 if dest.exists() else False)
            signal.pthread_kill(main, signal.SIGINT)

        interrupter = threading.Thread(target=interrupt_mid_body)
        interrupter.start()
        with pytest.raises(KeyboardInterrupt):
            dm.images.download(generation, dest)
        interrupter.join(5)
        # When the interrupted call returns, its clean-up must be over (as it is when
        # leaving a blocking iteration early): a script that exits now, or a notebook
        # that lists the directory, must not find temporary files.
        left = leftovers(tmp_path)
        wait_until(lambda: leftovers(tmp_path) == [])  # they do go, a moment later
        assert left == []
        assert files(dest) == []
        wait_until(
            lambda: (
                [r.disconnected for r in mock.requests if r.endpoint == "download"] == [True, True]
            )
        )
        paths = dm.images.download(generation, dest)
        assert [path.read_bytes() == mock.image_bytes for path in paths] == [True, True]
