"""Shared fixtures: a running mock on the test's loop, a raw aiohttp client, a receiver."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

import aiohttp
import hypothesis
import pytest
import redis
from _redis import RedisServer
from aiohttp import web

from deepmode_async import AsyncClient, RetryPolicy
from deepmode_async.testing import MockDeepMode, sample_image

FAST = 0.001  # backoff base for tests: retries without sleeping

# `make test` tries the same examples on every run, so a red CI can be replayed rather
# than being a seed nobody kept; `HYPOTHESIS_PROFILE=explore` searches afresh each run.
# No deadline: one example slowed by a loaded machine is not a failure.
hypothesis.settings.register_profile("ci", derandomize=True, database=None, deadline=None)
hypothesis.settings.register_profile("explore", deadline=None)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or "ci")

# The Ctrl+C tests send SIGINT, to this process and to children. A suite started as a
# background job of a shell without job control (`make test &` in a script) inherits
# SIGINT ignored, which children inherit in turn, and Python then never raises
# KeyboardInterrupt: a handler here is what a terminal gives, and children start with
# the default again (a handled signal is reset at exec, an ignored one is not).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


class Served(Protocol):
    """Where a mock serves: a `MockDeepMode`, or a `MockProcess`."""

    @property
    def api_key(self) -> str: ...

    @property
    def base_url(self) -> str: ...


def make_client(mock: Served, *, max_retries: int = 2, **options: Any) -> AsyncClient:
    """A client of `mock` whose retries do not wait."""
    retries = RetryPolicy(max_retries=max_retries, backoff_base=FAST)
    return AsyncClient(mock.api_key, base_url=mock.base_url, max_retries=retries, **options)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp runs on asyncio only


@pytest.fixture
async def mock() -> AsyncIterator[MockDeepMode]:
    """A mock on the test's own event loop, with the default options."""
    async with MockDeepMode(callback_backoff=0.01) as server:
        yield server


@pytest.fixture
async def dm(request: pytest.FixtureRequest, mock: Served) -> AsyncIterator[AsyncClient]:
    """A client of `mock`: `make_client`'s (two retries that do not wait) unless the test
    or its module says otherwise with `@pytest.mark.dm(**options)`. The options are
    `AsyncClient`'s, and `fast=False`, which keeps the client's own retry waits."""
    marker = request.node.get_closest_marker("dm")
    options = dict(marker.kwargs) if marker is not None else {}
    if options.pop("fast", True):
        client = make_client(mock, **options)
    else:
        client = AsyncClient(mock.api_key, base_url=mock.base_url, **options)
    async with client:
        yield client


@pytest.fixture
def sdk_logger() -> Iterator[logging.Logger]:
    """The SDK's logger without handlers (so DEEPMODE_LOG adds its own), put back after."""
    logger = logging.getLogger("deepmode_async")
    level, handlers = logger.level, list(logger.handlers)
    logger.handlers.clear()
    yield logger
    logger.setLevel(level)
    logger.handlers[:] = handlers


@pytest.fixture
def model_id(mock: MockDeepMode) -> str:
    """A trained model of `mock`, without the training call."""
    return mock.add_model().id


@pytest.fixture
async def http(mock: MockDeepMode) -> AsyncIterator[aiohttp.ClientSession]:
    """Raw aiohttp, authenticated for the mock's API (never reuse it for the image host)."""
    headers = {"Authorization": f"Bearer {mock.api_key}"}
    async with aiohttp.ClientSession(mock.base_url, headers=headers) as session:
        yield session


@pytest.fixture
async def plain() -> AsyncIterator[aiohttp.ClientSession]:
    """Raw aiohttp without credentials, for the image host and callbacks."""
    async with aiohttp.ClientSession() as session:
        yield session


class Receiver:
    """A callback endpoint on loopback that records what it is sent."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.statuses: list[int] = []  # answers to give, in order; 200 when exhausted
        self.url = ""
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        status = self.statuses.pop(0) if self.statuses else 200
        if status < 300:
            self.bodies.append(await request.json())
            self.arrived.set()
        return web.Response(status=status)

    async def next_body(self, within: float = 5.0) -> Any:
        await asyncio.wait_for(self.arrived.wait(), within)
        self.arrived.clear()
        return self.bodies[-1]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    app = web.Application()
    recv = Receiver()
    app.router.add_post("/callback", recv.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    recv.url = f"http://127.0.0.1:{runner.addresses[0][1]}/callback"
    yield recv
    await runner.cleanup()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def write_photo(path: pathlib.Path, size: int | None = None) -> pathlib.Path:
    """A real JPEG at `path` (its directory made if missing), padded with a hole up to
    `size` bytes: sparse on disk, so cheap to make however big, and all zeros after the
    image, which is all the mock looks at."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(sample_image("jpeg"))
    if size is not None:
        os.truncate(path, size)
    return path


def write_photos(
    directory: pathlib.Path, count: int, *, size: int | None = None
) -> list[pathlib.Path]:
    """`count` photos `photo-1.jpg`... in `directory`; without `size`, each a little
    bigger than the last, like distinct photos."""
    return [
        write_photo(directory / f"photo-{i + 1}.jpg", size if size is not None else 1024 + 16 * i)
        for i in range(count)
    ]


def polls(
    predicate: Callable[[], bool], within: float, describe: Callable[[], object] | None
) -> Iterator[None]:
    """Yield, for the caller to sleep, until `predicate()` holds; fail the test after
    `within` seconds, with `describe()` as the message when given."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(describe() if describe else "condition not met in time")
        yield


async def eventually(
    predicate: Callable[[], bool],
    within: float = 5.0,
    describe: Callable[[], object] | None = None,
) -> None:
    """Wait until `predicate()` holds, failing the test after `within` seconds (with
    `describe()` as the message when given)."""
    for _ in polls(predicate, within, describe):
        await asyncio.sleep(0.01)


def wait_until(
    predicate: Callable[[], bool],
    within: float = 5.0,
    *,
    step: float = 0.01,
    describe: Callable[[], object] | None = None,
) -> None:
    """`eventually` for blocking tests (a thread-backed mock serves meanwhile), polling
    every `step` seconds, with `describe()` as the failure's message when given."""
    for _ in polls(predicate, within, describe):
        time.sleep(step)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, for this test module.

    A test that stops it (for an outage) must start it again; `redis_url` flushes it
    before each test.
    """
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of the module's redis-server, emptied (and started) for this test."""
    if not redis_server.answers():
        redis_server.stop()
        redis_server.start()
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url
