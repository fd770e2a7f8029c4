"""examples/fastapi_app.py under real `uvicorn --workers 4`, its hub on a shared store.

The mock runs in this process (so the test can read every delivery it made); the app's
workers are real processes that share one listening socket, so a callback lands on
whichever worker the kernel picks, rarely the one that waits. With a shared store every
call must still be answered with its own images, none hung, none lost, no delivery
refused. "Two machines" are two uvicorn instances sharing one Redis, each giving the API
the other's address, so every delivery reaches the instance that does not wait. And a
model's id, which reaches an app only by callback, outlives kill -9 of every worker and
restarts of the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import aiohttp
import pytest
from _redis import free_port
from conftest import eventually

from deepmode_async import AsyncClient
from deepmode_async.callbacks import CallbackHub
from deepmode_async.testing import MockDeepMode

pytestmark = pytest.mark.anyio

ROOT = pathlib.Path(__file__).resolve().parent.parent
CALLS, AT_ONCE = 200, 20


@contextmanager
def uvicorn_workers(
    mock: MockDeepMode,
    store: str,
    port: int,
    public_port: int,
    workers: int,
    log: pathlib.Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "DEEPMODE_API_KEY": mock.api_key,
        "DEEPMODE_BASE_URL": mock.base_url,
        "PUBLIC_URL": f"http://127.0.0.1:{public_port}",
        "DEEPMODE_HUB_STORE": store,
    }
    command = [
        sys.executable, "-m", "uvicorn", "examples.fastapi_app:app",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    with contextlib.ExitStack() as files:
        stderr = files.enter_context(log.open("ab")) if log is not None else None
        process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=stderr)  # noqa: S603
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def until_serving(session: aiohttp.ClientSession, port: int, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            async with session.get(f"http://127.0.0.1:{port}/openapi.json") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.2)


@asynccontextmanager
async def plain_session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


async def generate_everywhere(
    session: aiohttp.ClientSession, ports: list[int], model_id: str
) -> list[Any]:
    """CALLS callback-mode generations, AT_ONCE at a time, spread over `ports`."""
    limit = asyncio.Semaphore(AT_ONCE)

    async def one(index: int) -> Any:
        async with limit:
            port = ports[index % len(ports)]
            body = {"model_id": model_id, "prompt": f"prompt {index}", "num_images": 2}
            async with session.post(f"http://127.0.0.1:{port}/generate", json=body) as response:
                return response.status, await response.json(), index

    return await asyncio.gather(*(one(index) for index in range(CALLS)))


async def every_delivery_answered(mock: MockDeepMode) -> None:
    """Until the mock has read the answer to each delivery: a waiter wakes once its
    result is in the store, which may be before the 200 reaches the mock (and stopping
    the workers then would cut that answer off)."""
    await eventually(lambda: all(delivery.finished for delivery in mock.callbacks), 30)


def check_every_call(mock: MockDeepMode, answers: list[Any]) -> None:
    assert [status for status, _, _ in answers] == [200] * CALLS, answers[:3]
    seen: set[str] = set()
    for _, body, index in answers:
        ids = [image["id"] for image in body["images"]]
        assert len(ids) == 2
        assert all(mock.images[i].prompt == f"prompt {index}" for i in ids)  # its own images
        seen.update(ids)
    assert len(seen) == 2 * CALLS
    deliveries = mock.callbacks
    assert len(deliveries) == CALLS
    assert all(d.delivered for d in deliveries), [d.attempts for d in deliveries if not d.delivered]
    assert all(attempt == "200" for d in deliveries for attempt in d.attempts), [
        d.attempts for d in deliveries if d.attempts != ["200"]
    ][:5]
    assert len(mock.ledger) == CALLS


@pytest.fixture(params=["sqlite", "redis"])
def shared_store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/hub.db"
    url: str = request.getfixturevalue("redis_url")
    return url


async def test_four_workers_share_the_hub(shared_store: str) -> None:
    async with MockDeepMode(latency={"generate": 0.05}) as mock, plain_session() as session:
        model = mock.add_model()
        port = free_port()
        with uvicorn_workers(mock, shared_store, port, port, workers=4):
            await until_serving(session, port)
            answers = await generate_everywhere(session, [port], model.id)
            await every_delivery_answered(mock)
        check_every_call(mock, answers)


async def test_two_machines_deliver_to_each_other_through_redis(redis_url: str) -> None:
    store = redis_url
    async with MockDeepMode(latency={"generate": 0.05}) as mock, plain_session() as session:
        model = mock.add_model()
        first, second = free_port(), free_port()
        with (
            uvicorn_workers(mock, store, first, public_port=second, workers=2),
            uvicorn_workers(mock, store, second, public_port=first, workers=2),
        ):
            await until_serving(session, first)
            await until_serving(session, second)
            answers = await generate_everywhere(session, [first, second], model.id)
            await every_delivery_answered(mock)
        check_every_call(mock, answers)


def workers_of(server: subprocess.Popen[bytes]) -> list[int]:
    """The worker processes uvicorn runs (not multiprocessing's resource tracker)."""
    found = []
    for task in pathlib.Path(f"/proc/{server.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            command = pathlib.Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in command:
                found.append(int(child))
    return found


async def test_a_model_id_outlives_killed_workers_and_restarts(tmp_path: pathlib.Path) -> None:
    """Training's model id reaches an app only by callback: kill -9 every worker while
    the model trains, and the workers uvicorn starts in their place find the expectation
    in the store and record the model; a result delivered while nothing waited is
    logged by the next start of the app."""
    store = f"sqlite:///{tmp_path}/hub.db"
    body = {"name": "first", "gender": "woman", "image_urls": ["https://example.com/a.jpg"]}
    runs = [tmp_path / f"run-{n}.log" for n in range(3)]
    async with (
        MockDeepMode(training_delay=2.0, callback_retries=6, callback_backoff=0.5) as mock,
        plain_session() as session,
    ):
        port = free_port()
        with uvicorn_workers(mock, store, port, port, workers=2, log=runs[0]) as server:
            await until_serving(session, port)
            async with session.post(f"http://127.0.0.1:{port}/train", json=body) as response:
                assert response.status == 202, await response.text()
            killed = workers_of(server)
            assert len(killed) == 2
            for worker in killed:
                os.kill(worker, signal.SIGKILL)
            await eventually(lambda: bool(mock.callbacks) and mock.callbacks[0].finished, 30)
            [first] = mock.models.values()
            trained = f"model {first.id} (first) trained"
            await eventually(lambda: trained in runs[0].read_text(), 30, runs[0].read_text)
            assert not set(killed) & set(workers_of(server))

        # Delivered to the app while nobody there waits for it (the expectation was made
        # elsewhere, with the same store, after the app had started).
        with uvicorn_workers(mock, store, port, port, workers=1, log=runs[1]):
            await until_serving(session, port)
            hub = CallbackHub(f"http://127.0.0.1:{port}/deepmode-callbacks", store=store)
            pending = hub.expect("model")
            await pending.saved()
            async with AsyncClient(mock.api_key, base_url=mock.base_url) as dm:
                await dm.models.create(
                    image_urls=["https://example.com/b.jpg"],
                    gender="man",
                    model_type="amateur",
                    name="second",
                    callback=pending.url,
                )
            await eventually(lambda: len(mock.callbacks) == 2 and mock.callbacks[1].delivered, 30)
            hub.close()
        [second] = [model for model in mock.models.values() if model.id != first.id]
        assert second.id not in runs[1].read_text()

        # The next start of the app logs it; the first was handed out already.
        with uvicorn_workers(mock, store, port, port, workers=1, log=runs[2]):
            await until_serving(session, port)
            found = f"model {second.id} (second) finished training while no one waited"
            await eventually(lambda: found in runs[2].read_text(), 30, runs[2].read_text)
        assert first.id not in runs[2].read_text()
    assert len(mock.ledger) == 2
