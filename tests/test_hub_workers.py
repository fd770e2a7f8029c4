"""examples/fastapi_app.py under real `uvicorn --workers 4`, its hub on a shared store.

The mock runs in this process (so the test can read every delivery it made); the app's
workers are real processes that share one listening socket, so a callback lands on
whichever worker the kernel picks, rarely the one that waits. With a shared store every
call must still be answered with its own images, none hung, none lost, no delivery
refused. "Two machines" are two uvicorn instances sharing one Redis, each giving the API
the other's address, so every delivery reaches the instance that does not wait.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import aiohttp
import pytest
from _redis import free_port

from deepmode_async.testing import MockDeepMode

pytestmark = pytest.mark.anyio

ROOT = pathlib.Path(__file__).resolve().parent.parent
CALLS, AT_ONCE = 200, 20


@contextmanager
def uvicorn_workers(
    mock: MockDeepMode, store: str, port: int, public_port: int, workers: int
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
    process = subprocess.Popen(command, cwd=ROOT, env=env)  # noqa: S603 (the example)
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
    assert all(delivery.delivered for delivery in deliveries)
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
        check_every_call(mock, answers)
