"""examples/fastapi_app.py under a real uvicorn server, against the mock on the same loop.

The mock's callbacks travel over loopback to uvicorn, through the app's mount, to its hub.
"""

from __future__ import annotations

import asyncio
import importlib.util
import pathlib
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import ModuleType
from typing import Any

import aiohttp
import pytest
import uvicorn
from fastapi import FastAPI, Request
from starlette.routing import Mount

from deepmode_async import AsyncClient
from deepmode_async.testing import MockDeepMode, RecordedRequest

pytestmark = pytest.mark.anyio

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "fastapi_app.py"


def load_example(name: str = "deepmode_fastapi_example") -> ModuleType:
    """The example as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before running: pydantic resolves the models' annotations through it.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


example = load_example()


def listening_socket() -> socket.socket:
    # Bound before the app is built, so PUBLIC_URL can name the port without a race.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@asynccontextmanager
async def serve(make_app: Callable[[str], FastAPI]) -> AsyncIterator[str]:
    """Serve `make_app(public_url)` with uvicorn on loopback; yields that URL."""
    with listening_socket() as sock:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        app = make_app(url)
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=sock.getsockname()[1],
            log_level="warning",
            log_config=None,  # leave the test run's logging alone
            lifespan="on",
            access_log=False,
            ws="none",
        )
        server = uvicorn.Server(config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        try:
            async with asyncio.timeout(5):
                while not server.started:
                    if task.done():  # startup failed: show why
                        task.result()
                        raise AssertionError("uvicorn stopped before it started")
                    await asyncio.sleep(0.005)
            yield url
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 5)


def explicit(mock: MockDeepMode, **settings: Any) -> Callable[[str], FastAPI]:
    """An app built from explicit settings, pointed at `mock`."""

    def make(url: str) -> FastAPI:
        app: FastAPI = example.create_app(
            example.Settings(
                public_url=url, api_key=mock.api_key, base_url=mock.base_url, **settings
            )
        )
        return app

    return make


@pytest.fixture
async def site(mock: MockDeepMode, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """The app as `uvicorn examples.fastapi_app:app` builds it: everything from the env."""

    def from_env(url: str) -> FastAPI:
        monkeypatch.setenv("DEEPMODE_API_KEY", mock.api_key)
        monkeypatch.setenv("DEEPMODE_BASE_URL", mock.base_url)
        monkeypatch.setenv("PUBLIC_URL", url)
        app: FastAPI = example.create_app()
        return app

    async with serve(from_env) as site:
        yield site


async def post(plain: aiohttp.ClientSession, site: str, path: str, body: Any) -> tuple[int, Any]:
    async with plain.post(site + path, json=body) as response:
        return response.status, await response.json()


def generate_requests(mock: MockDeepMode) -> list[RecordedRequest]:
    return [record for record in mock.requests if record.endpoint == "generate"]


# --------------------------------------------------------------------------- tests


async def test_generate_waits_for_the_callback_through_the_hub(
    mock: MockDeepMode, site: str, plain: aiohttp.ClientSession
) -> None:
    model = mock.add_model()
    body = {"model_id": model.id, "prompt": "a lighthouse at dusk", "num_images": 3}

    status, answer = await post(plain, site, "/generate", body)

    assert status == 200, answer
    images = answer["images"]
    assert len(images) == 3
    assert len({image["id"] for image in images}) == 3
    for image in images:
        assert image["id"] in mock.images
        assert mock.images[image["id"]].prompt == "a lighthouse at dusk"
        assert image["url"].startswith(mock.blob_base_url + "/")
    # Callback mode, not sync mode: the call named a URL under the app's public address,
    # and the result came back over loopback to the mounted hub, on the first attempt.
    [record] = generate_requests(mock)
    assert record.status == 200
    assert record.json is not None
    callback = record.json["callback"]
    assert callback.startswith(f"{site}/deepmode-callbacks/")
    assert len(callback) > len(f"{site}/deepmode-callbacks/") + 40  # 256-bit token
    [delivery] = mock.callbacks
    assert delivery.url == callback
    assert delivery.attempts == ["200"]
    assert [image["id"] for image in delivery.body["images"]] == [i["id"] for i in images]
    assert [charge.endpoint for charge in mock.ledger] == ["generate"]


async def test_the_hub_is_mounted_and_refuses_unknown_tokens(
    site: str, plain: aiohttp.ClientSession
) -> None:
    status, answer = await post(plain, site, "/deepmode-callbacks/not-a-token", {"images": []})
    assert (status, answer) == (404, {"detail": "unknown or expired callback URL"})


async def test_generate_batch_reports_each_prompt(
    mock: MockDeepMode, site: str, plain: aiohttp.ClientSession
) -> None:
    model = mock.add_model()
    requests = [
        {"model_id": model.id, "prompt": "an astronaut", "num_images": 2},
        {"model_id": "no-such-model", "prompt": "a chef"},
        {"model_id": model.id, "prompt": "a knight"},
    ]
    # The unknown model fails before the simulated work, so it completes first: the
    # answer must still follow the input's order.
    mock.set_latency("generate", 0.05)

    status, answer = await post(plain, site, "/generate-batch", {"requests": requests})

    assert status == 200, answer
    results = answer["results"]
    assert [item["index"] for item in results] == [0, 1, 2]
    assert [item["ok"] for item in results] == [True, False, True]
    assert [len(item["images"]) for item in results] == [2, 0, 1]
    assert results[1]["status"] == 404
    assert "no-such-model" in results[1]["error"]
    for item, prompt in ((results[0], "an astronaut"), (results[2], "a knight")):
        assert item["status"] is None
        assert item["error"] is None
        assert {mock.images[image["id"]].prompt for image in item["images"]} == {prompt}
    # A batch goes in sync mode: three calls, none with a callback, two charged.
    recorded = generate_requests(mock)
    assert len(recorded) == 3
    assert all(record.json is not None and "callback" not in record.json for record in recorded)
    assert sorted(record.status or 0 for record in recorded) == [200, 200, 404]
    assert len(mock.ledger) == 2
    assert mock.callbacks == []


async def test_unknown_model_is_404(
    mock: MockDeepMode, site: str, plain: aiohttp.ClientSession
) -> None:
    status, answer = await post(plain, site, "/generate", {"model_id": "nope", "prompt": "x"})

    assert status == 404
    assert answer == {"detail": "Model 'nope' not found"}
    assert [record.status for record in generate_requests(mock)] == [404]
    assert mock.ledger == []
    assert mock.callbacks == []


async def test_invalid_arguments_are_422_before_anything_is_sent(
    mock: MockDeepMode, site: str, plain: aiohttp.ClientSession
) -> None:
    model = mock.add_model()

    status, answer = await post(
        plain, site, "/generate", {"model_id": model.id, "prompt": "x", "num_images": 0}
    )
    assert status == 422
    assert "num_images" in answer["detail"]

    # One bad item refuses the whole batch, so the good ones spend nothing either.
    batch = [{"model_id": model.id, "prompt": "fine"}, {"model_id": model.id, "prompt": ""}]
    status, answer = await post(plain, site, "/generate-batch", {"requests": batch})
    assert status == 422
    assert "prompt" in answer["detail"]

    assert generate_requests(mock) == []
    assert mock.ledger == []


async def test_insufficient_credits_is_402(
    mock: MockDeepMode, site: str, plain: aiohttp.ClientSession
) -> None:
    model = mock.add_model()
    mock.balance = 0

    status, answer = await post(plain, site, "/generate", {"model_id": model.id, "prompt": "x"})

    assert status == 402
    assert "credit" in answer["detail"].lower()
    assert mock.callbacks == []


async def test_server_failure_is_502_without_upstream_details(
    mock: MockDeepMode, site: str, plain: aiohttp.ClientSession
) -> None:
    model = mock.add_model()
    mock.fail("generate", 500, detail="database on fire at 10.0.0.7")

    status, answer = await post(plain, site, "/generate", {"model_id": model.id, "prompt": "x"})

    assert (status, answer) == (502, {"detail": "the image service failed"})
    assert [record.status for record in generate_requests(mock)] == [500]  # never resent


async def test_a_callback_that_never_comes_is_504(
    mock: MockDeepMode, plain: aiohttp.ClientSession
) -> None:
    model = mock.add_model()
    mock.set_latency("generate", 30.0)  # accepted at once, delivered far too late

    async with serve(explicit(mock, callback_timeout=0.2)) as site:
        started = asyncio.get_running_loop().time()
        status, answer = await post(plain, site, "/generate", {"model_id": model.id, "prompt": "x"})
        waited = asyncio.get_running_loop().time() - started

    assert status == 504
    assert answer == {"detail": "the image service did not deliver the result in time"}
    assert 0.2 <= waited < 5
    [record] = generate_requests(mock)
    assert record.status == 200
    assert record.json is not None
    assert record.json["callback"].startswith(site)


async def test_the_lifespan_opens_one_client_and_closes_it_at_shutdown(
    mock: MockDeepMode, plain: aiohttp.ClientSession
) -> None:
    seen: list[AsyncClient] = []

    def make(url: str) -> FastAPI:
        app = explicit(mock)(url)

        @app.get("/_client")
        async def client(request: Request) -> None:
            seen.append(example.deepmode(request))

        return app

    model = mock.add_model()
    async with serve(make) as site:
        status, _ = await post(plain, site, "/generate", {"model_id": model.id, "prompt": "x"})
        assert status == 200
        for _ in range(2):
            async with plain.get(site + "/_client") as response:
                assert response.status == 200
        assert seen[0] is seen[1]
        assert not seen[0].closed
        assert seen[0].base_url == mock.base_url

    assert seen[0].closed


async def test_importing_the_example_needs_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPMODE_API_KEY", raising=False)
    monkeypatch.setenv("PUBLIC_URL", "https://myapp.example.com/")
    try:
        module = load_example("deepmode_fastapi_example_fresh")
        app = module.app
        assert isinstance(app, FastAPI)
        mounts = [route.path for route in app.routes if isinstance(route, Mount)]
        assert mounts == ["/deepmode-callbacks"]
        assert module.Settings.from_env().public_url == "https://myapp.example.com/"
    finally:
        sys.modules.pop("deepmode_fastapi_example_fresh", None)
