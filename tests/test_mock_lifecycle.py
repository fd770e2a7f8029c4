"""Starting and stopping the mock: async and thread-backed, the pytest plugin, the process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import threading
import time

import aiohttp
import anyio
import pytest
import requests
from conftest import Receiver, eventually

from deepmode_async import AsyncClient, DeepModeError
from deepmode_async.testing import MockDeepMode, mock_process

pytest_plugins = ["pytester"]

TRAINING = {"image_urls": ["https://example.com/me.jpg"], "gender": "man", "model_type": "amateur"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------ the thread-backed form


def test_thread_backed_mock_serves_sync_code() -> None:
    with MockDeepMode(balance=5) as mock, requests.Session() as session:
        session.headers.update(bearer(mock.api_key))
        balance_url = f"{mock.base_url}/api/check-balance"

        assert session.get(balance_url, timeout=5).json() == {"remaining_balance": 5}

        body = {"model_id": mock.add_model().id, "prompt": "a lighthouse", "num_images": 2}
        generated = session.post(f"{mock.base_url}/api/images/generate", json=body, timeout=5)
        assert generated.status_code == 200, generated.text
        images = generated.json()["images"]
        assert len(images) == 2
        assert session.get(balance_url, timeout=5).json() == {"remaining_balance": 4}
        assert [charge.endpoint for charge in mock.ledger] == ["generate"]

        # requests keeps the signed URL's escapes as they are; no key goes to the image host.
        image = requests.get(images[0]["image_url"], timeout=5)
        assert (image.status_code, image.content) == (200, mock.image_bytes)

        # Faults set from this thread reach the server's loop.
        mock.fail("balance", 503, retry_after=2)
        failed = session.get(balance_url, timeout=5)
        assert (failed.status_code, failed.headers["Retry-After"]) == (503, "2")
        assert failed.json() == {"detail": "Injected fault 503"}
        assert session.get(balance_url, timeout=5).status_code == 200

        urls = (mock.base_url, mock.blob_base_url)

    for url in urls:
        with pytest.raises(requests.ConnectionError):
            requests.get(url, timeout=2)
    with pytest.raises(RuntimeError, match="not running"):
        _ = mock.base_url


def test_thread_backed_mock_cannot_be_entered_twice() -> None:
    with MockDeepMode() as mock:
        with pytest.raises(RuntimeError, match="already running"), mock:
            pass  # pragma: no cover
        response = requests.get(
            f"{mock.base_url}/api/check-balance", headers=bearer(mock.api_key), timeout=5
        )
        assert response.status_code == 200


# ------------------------------------------------------------------ state and repr


@pytest.mark.parametrize("attribute", ["base_url", "blob_base_url"])
def test_urls_before_start_raise_a_clear_error(attribute: str) -> None:
    mock = MockDeepMode()
    with pytest.raises(RuntimeError, match=r"MockDeepMode is not running: use `async with`"):
        getattr(mock, attribute)


@pytest.mark.anyio
async def test_starting_twice_raises_and_the_mock_keeps_serving() -> None:
    async with MockDeepMode() as mock:
        base_url = mock.base_url
        with pytest.raises(RuntimeError, match="already running"):
            await mock.start()
        assert mock.base_url == base_url
        async with (
            aiohttp.ClientSession(headers=bearer(mock.api_key)) as http,
            http.get(f"{base_url}/api/check-balance") as response,
        ):
            assert response.status == 200


@pytest.mark.anyio
async def test_repr_shows_where_and_never_the_key() -> None:
    secret = "sk-live-do-not-print-me"
    mock = MockDeepMode(api_key=secret)
    assert "not running" in repr(mock)
    async with mock:
        shown = repr(mock)
        assert mock.base_url in shown
        assert secret not in shown
        assert secret not in str(mock)
    assert "not running" in repr(mock)
    assert secret not in repr(mock)


# ------------------------------------------------------------------ stopping with work under way


@pytest.mark.anyio
async def test_stop_is_prompt_with_a_stalled_request_and_a_training_model(
    receiver: Receiver,
) -> None:
    mock = MockDeepMode(training_delay=60)
    await mock.start()
    try:
        async with aiohttp.ClientSession(mock.base_url, headers=bearer(mock.api_key)) as http:
            body = {**TRAINING, "callback": receiver.url}
            async with http.post("/api/models", json=body) as response:
                assert response.status == 200
            (model,) = mock.models.values()
            assert not model.active

            async def stalled_call() -> int:
                async with http.get("/api/check-balance") as response:
                    return response.status

            mock.stall("balance")  # an hour
            stalled = asyncio.create_task(stalled_call())
            await eventually(lambda: mock.in_flight == 1)

            started = time.monotonic()
            await asyncio.wait_for(mock.stop(), 5)
            elapsed = time.monotonic() - started

            # The client learns that the server went away, without waiting for the stall.
            with pytest.raises(aiohttp.ClientConnectionError):
                await asyncio.wait_for(stalled, 2)
    finally:
        await mock.stop()  # a second stop is harmless

    assert elapsed < 2
    assert not model.active  # training was cancelled, not completed
    assert mock.callbacks == []
    assert receiver.bodies == []
    with pytest.raises(RuntimeError, match="not running"):
        _ = mock.base_url


@pytest.mark.anyio
async def test_a_call_finishing_during_stop_starts_no_work(receiver: Receiver) -> None:
    mock = MockDeepMode()
    await mock.start()
    mock.stall("create_model", seconds=0.1)  # shorter than the mock's shutdown grace
    async with aiohttp.ClientSession(mock.base_url, headers=bearer(mock.api_key)) as http:
        call = asyncio.create_task(
            http.post("/api/models", json={**TRAINING, "callback": receiver.url})
        )
        await eventually(lambda: mock.in_flight == 1)
        await mock.stop()
        with contextlib.suppress(aiohttp.ClientError):
            (await call).close()
    await asyncio.sleep(0.2)
    assert all(not model.active for model in mock.models.values())
    assert mock.callbacks == []
    assert receiver.bodies == []


@pytest.mark.anyio
async def test_a_failed_start_releases_what_it_bound() -> None:
    with socket.socket() as taken, socket.socket() as probe:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        probe.bind(("127.0.0.1", 0))
        api_port = probe.getsockname()[1]
        probe.close()
        mock = MockDeepMode(port=api_port, blob_port=taken.getsockname()[1])
        with pytest.raises(OSError, match="in use"):
            await mock.start()
    with pytest.raises(ConnectionRefusedError):  # the API port was released again
        socket.create_connection(("127.0.0.1", api_port), timeout=1).close()
    await mock.stop()  # harmless after a failed start


def test_inspection_is_safe_while_another_thread_serves() -> None:
    with MockDeepMode() as mock, requests.Session() as session:
        model = mock.add_model()
        session.headers.update(bearer(mock.api_key))
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                body = {"model_id": model.id, "prompt": "p", "num_images": 8}
                session.post(f"{mock.base_url}/api/images/generate", json=body, timeout=10)

        worker = threading.Thread(target=load)
        worker.start()
        try:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:  # iterating while the loop thread adds
                assert all(image.model_id == model.id for image in mock.images.values())
                assert sum(charge.cost for charge in mock.ledger) >= 0
                assert all(r.method for r in mock.requests)
        finally:
            stop.set()
            worker.join()
        assert len(mock.images) == 8 * len(mock.ledger) > 0


# ------------------------------------------------------------------ the pytest plugin

PLUGIN_USER = """
import os

import pytest
import requests

seen = {}


def balance(base_url, key):
    response = requests.get(
        f"{base_url}/api/check-balance", headers={"Authorization": f"Bearer {key}"}, timeout=5
    )
    return response.status_code, response.json()


@pytest.mark.deepmode_mock(balance=7, api_key="plugin-key")
def test_marker_options_reach_the_mock(deepmode_mock):
    assert deepmode_mock.api_key == "plugin-key"
    assert balance(deepmode_mock.base_url, "plugin-key") == (200, {"remaining_balance": 7})
    seen["base_url"] = deepmode_mock.base_url


def test_the_mock_was_stopped_after_its_test():
    with pytest.raises(requests.ConnectionError):
        requests.get(seen["base_url"], timeout=2)


@pytest.mark.deepmode_mock(balance=7)
def test_env_points_clients_at_the_mock(deepmode_env):
    key, base_url = os.environ["DEEPMODE_API_KEY"], os.environ["DEEPMODE_BASE_URL"]
    assert (key, base_url) == (deepmode_env.api_key, deepmode_env.base_url)
    assert balance(base_url, key) == (200, {"remaining_balance": 7})
    seen["env_url"] = base_url


def test_env_is_restored_afterwards():
    assert "DEEPMODE_API_KEY" not in os.environ
    assert "DEEPMODE_BASE_URL" not in os.environ


def test_default_mock(deepmode_mock):
    assert balance(deepmode_mock.base_url, "mock-key") == (200, {"remaining_balance": 10000})
"""


def test_pytest_plugin_fixtures(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPMODE_API_KEY", raising=False)
    monkeypatch.delenv("DEEPMODE_BASE_URL", raising=False)
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    pytester.makepyfile(test_uses_plugin=PLUGIN_USER)

    # The plugin comes from the installed package's `pytest11` entry point, nothing else.
    result = pytester.runpytest_subprocess("-W", "error", "--strict-markers")

    result.assert_outcomes(passed=5)


# ------------------------------------------------------------------ the mock as a process


def test_module_serves_until_sigint() -> None:
    with mock_process(api_key="k123", port=0, stop_signal=signal.SIGINT) as process:
        assert process.api_key == "k123"
        assert process.base_url.startswith("http://127.0.0.1:")

        url = f"{process.base_url}/api/check-balance"
        ok = requests.get(url, headers=bearer("k123"), timeout=5)
        assert (ok.status_code, ok.json()) == (200, {"remaining_balance": 10000})
        refused = requests.get(url, headers=bearer("mock-key"), timeout=5)
        assert refused.status_code == 401
        assert refused.json() == {"detail": "Invalid API key"}

    assert process.returncode == 0, process.stderr
    assert "mock stopped" in process.stderr


def gone(pid: int) -> bool:
    """No process `pid` any more (it was waited for, so not even a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.anyio
async def test_mock_process_serves_over_loopback_and_is_gone_after() -> None:
    async with mock_process(balance=42, latency=0.01, image_size=2000) as process:
        assert process.blob_base_url.startswith("http://127.0.0.1:")
        assert process.blob_base_url != process.base_url
        assert not gone(process.pid)
        assert "mock-key" not in repr(process)
        async with AsyncClient(process.api_key, base_url=process.base_url) as dm:
            assert (await dm.account.balance()).remaining_balance == 42

    assert gone(process.pid)
    assert process.returncode == 0, process.stderr  # SIGTERM: a clean stop
    assert "mock stopped" in process.stderr
    with pytest.raises(RuntimeError, match="not running"):
        _ = process.base_url


@pytest.mark.anyio
@pytest.mark.parametrize("ending", ["raises", "cancelled"])
async def test_mock_process_is_stopped_when_the_body_fails(ending: str) -> None:
    started: list[int] = []
    with anyio.move_on_after(30) as scope, contextlib.suppress(LookupError):
        async with mock_process() as process:
            started.append(process.pid)
            if ending == "raises":
                raise LookupError("the body failed")
            scope.cancel()
            await anyio.sleep(30)
    assert scope.cancelled_caught == (ending == "cancelled")
    assert gone(started[0])
    assert process.returncode == 0


# Serves as the mock would, then ignores SIGTERM: only a kill ends it.
STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("DEEPMODE_BASE_URL=http://127.0.0.1:9")
print("DEEPMODE_API_KEY=k")
print("# images are served from http://127.0.0.1:10; Ctrl+C stops", flush=True)
time.sleep(60)
"""


@pytest.mark.anyio
async def test_a_mock_process_that_ignores_the_stop_signal_is_killed() -> None:
    started = time.monotonic()
    async with mock_process(command=(sys.executable, "-c", STUBBORN), stop_timeout=0.5) as stub:
        assert (stub.base_url, stub.api_key) == ("http://127.0.0.1:9", "k")
        assert stub.blob_base_url == "http://127.0.0.1:10"
    assert stub.returncode == -signal.SIGKILL
    assert gone(stub.pid)
    assert time.monotonic() - started < 10


@pytest.mark.anyio
async def test_a_mock_that_cannot_listen_raises_with_its_stderr() -> None:
    secret = "sk-never-shown"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process = mock_process(port=taken.getsockname()[1], api_key=secret)
        with pytest.raises(DeepModeError, match=r"exited with \d+ before serving") as caught:
            async with process:
                pytest.fail("the mock served on a port in use")  # pragma: no cover
    message = str(caught.value)
    assert "address already in use" in message.lower()
    assert secret not in message
    assert gone(process.pid)


@pytest.mark.anyio
async def test_a_mock_that_never_serves_times_out_and_is_gone() -> None:
    silent = mock_process(
        command=(
            sys.executable,
            "-c",
            "import sys, time; sys.stderr.write('stuck\\n'); time.sleep(60)",
        ),
        start_timeout=2.0,
    )
    with pytest.raises(DeepModeError, match=r"did not serve within 2.0 s; its stderr:\nstuck"):
        async with silent:
            pytest.fail("it never served")  # pragma: no cover
    assert gone(silent.pid)
    assert silent.returncode == -signal.SIGTERM
