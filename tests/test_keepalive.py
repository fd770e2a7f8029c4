"""A server that closes idle connections after 1 s, and paid calls spaced about that far
apart: none fails because its pooled connection was being closed as it was written."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from deepmode_async import AsyncClient, Generation
from deepmode_async._connection import KEEPALIVE_SECONDS

pytestmark = pytest.mark.anyio

SERVER_IDLE_SECONDS = 1.0
ANSWER = {
    "images": [
        {
            "id": "img1",
            "file_name": "img1.png",
            "model_id": "m1",
            "image_url": "https://blob.example/img1.png?sig=abc",
            "prompt": "a lighthouse",
            "negative_prompt": None,
            "upscaled": False,
            "ratio": "portrait",
        }
    ]
}


class IdleClosingServer:
    """A real aiohttp server on loopback whose idle connections close after 1 s; it
    counts the requests and the connections they came on."""

    def __init__(self) -> None:
        self.requests = 0
        self.connections: set[object] = set()

    async def generate(self, request: web.Request) -> web.Response:
        self.requests += 1
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.connections.add(peer)
        await request.read()
        return web.json_response(ANSWER)


@pytest.fixture
async def server() -> AsyncIterator[tuple[IdleClosingServer, str]]:
    state = IdleClosingServer()
    app = web.Application()
    app.router.add_post("/api/images/generate", state.generate)
    runner = web.AppRunner(app, keepalive_timeout=SERVER_IDLE_SECONDS)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield state, f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def test_the_client_lets_go_of_idle_connections_before_common_servers_do() -> None:
    assert KEEPALIVE_SECONDS <= SERVER_IDLE_SECONDS / 2  # room for latency and a busy loop


async def test_spaced_paid_calls_never_fail_on_a_connection_the_server_closed(
    server: tuple[IdleClosingServer, str],
) -> None:
    state, base_url = server
    failures: list[BaseException] = []

    async def stream(dm: AsyncClient, calls: int) -> None:
        for _ in range(calls):
            # Spaced about as long as the server keeps an idle connection, either side: with
            # aiohttp's own keep-alive (15 s) about 5 of these 100 calls failed.
            await asyncio.sleep(random.uniform(0.98, 1.02) * SERVER_IDLE_SECONDS)
            try:
                assert isinstance(
                    await dm.images.generate(model_id="m1", prompt="a lighthouse"), Generation
                )
            except Exception as exc:
                failures.append(exc)

    # 100 paid calls in 20 streams of 5: each stream waits about 1 s between its calls.
    async with AsyncClient("key", base_url=base_url, max_retries=0) as dm:
        await asyncio.gather(*(stream(dm, 5) for _ in range(20)))
    assert failures == []
    assert state.requests == 100


async def test_a_connection_is_reused_while_busy_and_dropped_when_idle(
    server: tuple[IdleClosingServer, str],
) -> None:
    state, base_url = server
    async with AsyncClient("key", base_url=base_url, max_retries=0) as dm:
        for _ in range(5):
            await dm.images.generate(model_id="m1", prompt="a lighthouse")
        assert len(state.connections) == 1  # back to back: one connection
        for _ in range(3):
            await asyncio.sleep(KEEPALIVE_SECONDS + 0.2)
            await dm.images.generate(model_id="m1", prompt="a lighthouse")
    assert len(state.connections) == 4  # each call after a pause opened a new one
