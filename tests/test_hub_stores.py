"""The callback hub on shared stores: deliveries, waits and results across hubs and
processes sharing an SQLite file or a real redis-server, restarts, kill -9 and outages.

Two `CallbackHub`s opened on the same store URL see each other exactly as two worker
processes would (each opens its own connections); the tests that matter most use real
processes too.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from _redis import free_port
from conftest import eventually
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepmode_async import (
    AsyncClient,
    CallbackNotFoundError,
    CallbackTimeoutError,
    Client,
    DeepModeError,
    Image,
    Model,
    StoreError,
)
from deepmode_async.callbacks import CallbackHub
from deepmode_async.stores import MemoryStore, Store, open_store
from deepmode_async.testing import MockDeepMode

pytestmark = pytest.mark.anyio

BASE = "http://127.0.0.1:9/cb"


def image_body(image_id: str = "img-1") -> bytes:
    return json.dumps(
        {
            "id": image_id,
            "file_name": f"{image_id}.png",
            "model_id": "m-1",
            "image_url": f"https://blob.example.com/{image_id}.png?sig=x",
            "prompt": "p",
            "negative_prompt": None,
            "upscaled": True,
            "ratio": "square",
        }
    ).encode()


def model_body(model_id: str = "model-1") -> bytes:
    return json.dumps(
        {
            "id": model_id,
            "name": "trained",
            "gender": "woman",
            "active": True,
            "created_at": "2026-12-03T10:00:00Z",
            "expire_at": "2027-01-03T10:00:00Z",
        }
    ).encode()


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A store URL every hub of the test shares: an SQLite file, or a fresh Redis prefix."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/hub.db"
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest.fixture
def hubs() -> Iterator[list[CallbackHub]]:
    """Make hubs on the store of the test (each as another process would); closed after."""
    made: list[CallbackHub] = []
    yield made
    for hub in made:
        hub.close()


def hub_on(made: list[CallbackHub], url: str | Store, **options: Any) -> CallbackHub:
    hub = CallbackHub(BASE, store=url, **options)
    made.append(hub)
    return hub


async def test_a_delivery_to_one_hub_wakes_the_waiter_of_another(
    store_url: str, hubs: list[CallbackHub]
) -> None:
    waiting, receiving = hub_on(hubs, store_url), hub_on(hubs, store_url)
    pending = waiting.expect("upscale")
    waiter = asyncio.create_task(pending.wait(timeout=20))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    assert await receiving.areceive(pending.token, image_body("x")) == (200, "received")
    assert (await waiter).id == "x"
    assert time.monotonic() - started < 5
    # Repeats are acknowledged and ignored, whichever hub gets them.
    for hub in (receiving, waiting):
        assert await hub.areceive(pending.token, image_body("y")) == (200, "already received")
    assert await pending.wait(timeout=1) == await waiter


async def test_a_result_delivered_before_the_wait_is_found_at_once(
    store_url: str, hubs: list[CallbackHub]
) -> None:
    waiting, receiving = hub_on(hubs, store_url), hub_on(hubs, store_url)
    pending = waiting.expect("upscale")
    await pending.saved()
    assert await receiving.areceive(pending.token, image_body("early")) == (200, "received")
    assert (await pending.wait(timeout=5)).id == "early"


async def test_unknown_expired_and_discarded_tokens_are_404_everywhere(
    store_url: str, hubs: list[CallbackHub]
) -> None:
    one, other = hub_on(hubs, store_url), hub_on(hubs, store_url)
    forged = "A" * 43
    short = one.expect("upscale", ttl=0.2)
    discarded = one.expect("upscale")
    discarded.discard()
    await asyncio.sleep(0.3)
    for hub in (one, other):
        assert (await hub.areceive(forged, image_body()))[0] == 404
        assert (await hub.areceive(short.token, image_body()))[0] == 404

    async def refused() -> bool:
        return (await other.areceive(discarded.token, image_body()))[0] == 404

    deadline = time.monotonic() + 5
    while not await refused():
        assert time.monotonic() < deadline, "the discard never reached the store"
        await asyncio.sleep(0.05)
    assert (await one.areceive(discarded.token, image_body()))[0] == 404
    with pytest.raises(CallbackNotFoundError):
        other.resume(forged)
    with pytest.raises(CallbackNotFoundError):
        other.resume(short.token)


async def test_a_result_outlives_a_restart_and_is_listed_until_handed_out(
    store_url: str, hubs: list[CallbackHub]
) -> None:
    before = hub_on(hubs, store_url)
    pending = before.expect("model")
    undelivered = before.expect("generation")
    await pending.saved()
    await undelivered.saved()
    before.close()
    assert await hub_on(hubs, store_url).areceive(pending.token, model_body()) == (200, "received")

    after = hub_on(hubs, store_url)
    found = {p.token: p for p in await after.outstanding()}
    assert set(found) == {pending.token, undelivered.token}
    assert found[pending.token].done
    assert not found[undelivered.token].done
    assert [p.token for p in await after.outstanding(kind="model")] == [pending.token]
    model = await found[pending.token].wait(timeout=1)
    assert isinstance(model, Model)
    assert model.id == "model-1"
    assert [p.token for p in await after.outstanding()] == [undelivered.token]
    # The result stays in the store until its ttl: a resume still gets it.
    again = hub_on(hubs, store_url).resume(pending.token)
    assert (await again.wait(timeout=1)).id == "model-1"


WAITER = textwrap.dedent(
    """
    import asyncio, sys
    from deepmode_async.callbacks import CallbackHub

    async def main():
        hub = CallbackHub("http://127.0.0.1:9/cb", store=sys.argv[1])
        pending = hub.expect("model")
        await pending.saved()
        print(pending.token, flush=True)
        await pending.wait(timeout=60)
        print("woke", flush=True)

    asyncio.run(main())
    """
)


async def test_kill_9_of_the_waiting_process_loses_nothing(
    store_url: str, hubs: list[CallbackHub]
) -> None:
    process = subprocess.Popen(  # noqa: ASYNC220, S603 (our own code; started once)
        [sys.executable, "-c", WAITER, store_url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        token = (await asyncio.to_thread(process.stdout.readline)).strip()
        assert len(token) == 43
        os.kill(process.pid, signal.SIGKILL)
        assert await asyncio.to_thread(process.wait, 10) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    survivor = hub_on(hubs, store_url)
    assert await survivor.areceive(token, model_body("after-kill")) == (200, "received")
    found = await hub_on(hubs, store_url).outstanding(kind="model")
    assert [p.token for p in found] == [token]
    assert (await found[0].wait(timeout=1)).id == "after-kill"


DELIVERER = textwrap.dedent(
    """
    import sys
    from deepmode_async.callbacks import CallbackHub

    hub = CallbackHub("http://127.0.0.1:9/cb", store=sys.argv[1])
    print(*hub.receive(sys.argv[2], sys.stdin.buffer.read()), sep="|", flush=True)
    hub.close()
    """
)


def deliver_from_another_process(url: str, token: str, body: bytes) -> str:
    done = subprocess.run(  # noqa: S603 (our own code)
        [sys.executable, "-c", DELIVERER, url, token],
        input=body,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return done.stdout.decode().strip()


async def test_another_process_delivers_and_repeats_are_acknowledged(
    store_url: str, hubs: list[CallbackHub]
) -> None:
    hub = hub_on(hubs, store_url)
    pending = hub.expect("upscale")
    waiter = asyncio.create_task(pending.wait(timeout=60))
    first = await asyncio.to_thread(
        deliver_from_another_process, store_url, pending.token, image_body("a")
    )
    second = await asyncio.to_thread(
        deliver_from_another_process, store_url, pending.token, image_body("b")
    )
    assert (first, second) == ("200|received", "200|already received")
    assert (await waiter).id == "a"


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    token=st.one_of(st.text(max_size=60), st.text(alphabet="AZaz09-_", min_size=43, max_size=43)),
    body=st.one_of(st.binary(max_size=200), st.just(image_body()), st.just(b"\xff" * 2000)),
)
def test_any_token_and_body_get_an_answer_never_an_exception(
    store_url: str, hubs: list[CallbackHub], token: str, body: bytes
) -> None:
    if not hubs:
        hub_on(hubs, store_url, max_body_size=1000)
    status, detail = hubs[0].receive(token, body)
    assert status in (200, 400, 404, 413)
    assert isinstance(detail, str)


async def test_the_timeout_names_the_url_and_the_mount() -> None:
    hub = CallbackHub("https://myapp.example.com/deepmode-callbacks")
    pending = hub.expect("generation")
    with pytest.raises(CallbackTimeoutError) as caught:
        await pending.wait(timeout=0.05)
    message = str(caught.value)
    assert "https://myapp.example.com/deepmode-callbacks/" in message
    assert "mounted at '/deepmode-callbacks'" in message
    assert pending.token not in message


async def test_a_blocking_client_in_a_running_loop_with_a_served_hub() -> None:
    # A notebook cell: the loop is running and the blocking call holds it; the mock and
    # the hub each serve on a thread of their own.
    port = free_port()
    hub = CallbackHub(f"http://127.0.0.1:{port}/cb")
    with MockDeepMode() as mock, hub.serve() as served:
        assert served.url == f"http://127.0.0.1:{port}"
        model = mock.add_model()
        with Client(mock.api_key, base_url=mock.base_url) as dm:
            generation = dm.images.generate(
                model_id=model.id, prompt="in a cell", num_images=2, callback=hub
            )
        assert [image.prompt for image in generation.images] == ["in a cell"] * 2
    hub.close()


async def test_a_redis_outage_gets_503_then_the_retries_land_and_the_wait_rides_it_out(
    redis_server: Any, redis_url: str, hubs: list[CallbackHub]
) -> None:
    waiting, receiving = hub_on(hubs, redis_url), hub_on(hubs, redis_url)
    pending: Any = waiting.expect("upscale")
    await pending.saved()
    assert await receiving.areceive("A" * 43, b"{}") == (404, "unknown or expired callback URL")
    waiter = asyncio.create_task(pending.wait(timeout=30))
    await asyncio.sleep(0.1)
    await asyncio.to_thread(redis_server.stop)
    try:
        status, detail = await receiving.areceive(pending.token, image_body("late"))
        assert status == 503, detail
        with pytest.raises(StoreError) as caught:
            await receiving.outstanding()
        assert "redis" in str(caught.value).lower()
        assert not waiter.done()
    finally:
        await asyncio.to_thread(redis_server.start)

    async def delivered() -> tuple[int, str]:
        return await receiving.areceive(pending.token, image_body("late"))

    deadline = time.monotonic() + 10
    while (outcome := await delivered())[0] == 503:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert outcome == (200, "received")
    image: Image = await waiter
    assert image.id == "late"
    assert await receiving.outstanding() == []  # the store works again: nothing left over


# ------------------------------------------------------------ stalls, listeners, bounds


def stall_redis(url: str, seconds: float) -> None:
    """Hold the whole redis-server for `seconds` (a real stall: DEBUG SLEEP)."""
    client = redis.Redis.from_url(url)
    try:
        client.execute_command("DEBUG", "SLEEP", str(seconds))  # type: ignore[no-untyped-call]
    finally:
        client.close()


async def test_a_stalled_store_does_not_hold_a_wait_past_its_timeout(
    redis_url: str, hubs: list[CallbackHub]
) -> None:
    hub = hub_on(hubs, redis_url)
    pending = hub.expect("upscale")
    await pending.saved()
    stall = asyncio.create_task(asyncio.to_thread(stall_redis, redis_url, 2.5))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    with pytest.raises(CallbackTimeoutError):
        await pending.wait(timeout=0.3)
    assert time.monotonic() - started < 1.0  # the look and the message are bounded too
    await stall


async def test_a_stalled_store_does_not_hold_a_result_that_arrived(
    redis_url: str, hubs: list[CallbackHub], caplog: pytest.LogCaptureFixture
) -> None:
    hub = hub_on(hubs, redis_url)
    pending = hub.expect("upscale")
    assert await hub.areceive(pending.token, image_body("here")) == (200, "received")
    stall = asyncio.create_task(asyncio.to_thread(stall_redis, redis_url, 3))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    assert (await pending.wait(timeout=10)).id == "here"
    assert time.monotonic() - started < 2.0  # marking it handed out waits 1 s at most
    assert "handed out but not marked" in caplog.text
    await stall


async def test_a_hub_closed_and_used_again_still_hears_other_processes(
    store_url: str, hubs: list[CallbackHub]
) -> None:
    store = open_store(store_url)  # the hub's, not closed with it
    waiting, receiving = hub_on(hubs, store), hub_on(hubs, store_url)
    first = waiting.expect("upscale")
    with pytest.raises(CallbackTimeoutError):
        await first.wait(timeout=0.2)  # its listener ran
    waiting.close()  # and was cancelled with the hub's thread
    second = waiting.expect("upscale")
    await second.saved()
    waiter = asyncio.create_task(second.wait(timeout=10))
    await asyncio.sleep(0.3)
    assert await receiving.areceive(second.token, image_body("heard")) == (200, "received")
    started = time.monotonic()
    assert (await waiter).id == "heard"
    assert time.monotonic() - started < 1.0  # woken by the message, not a recheck
    waiting.close()
    await store.aclose()


async def test_outstanding_does_not_fill_max_pending(
    store_url: str, hubs: list[CallbackHub]
) -> None:
    issuing, restarted = hub_on(hubs, store_url), hub_on(hubs, store_url, max_pending=3)
    made = [issuing.expect("upscale") for _ in range(10)]
    for pending in made:
        await pending.saved()
    assert await issuing.areceive(made[0].token, image_body("first")) == (200, "received")
    found = await restarted.outstanding()
    assert sorted(p.token for p in found) == sorted(p.token for p in made)
    assert [p.done for p in found].count(True) == 1
    restarted.expect("model")  # room left: the handles found are not held
    done = next(p for p in found if p.done)
    assert (await done.wait(timeout=1)).id == "first"
    waiter = asyncio.create_task(next(p for p in found if not p.done).wait(timeout=10))
    await asyncio.sleep(0.2)
    held = [p for p in found if not p.done and p._waiters]
    assert len(held) == 1  # a wait holds it, so a delivery elsewhere wakes it
    assert await issuing.areceive(held[0].token, image_body("woken")) == (200, "received")
    assert (await waiter).id == "woken"


async def test_two_hubs_on_one_memory_store_wake_each_other() -> None:
    store = MemoryStore()
    waiting, receiving = CallbackHub(BASE, store=store), CallbackHub(BASE, store=store)
    pending = waiting.expect("upscale")
    waiter = asyncio.create_task(pending.wait(timeout=5))
    await asyncio.sleep(0.05)
    assert await receiving.areceive(pending.token, image_body("next door")) == (200, "received")
    assert (await waiter).id == "next door"
    other = waiting.expect("upscale")
    other_waiter = asyncio.create_task(other.wait(timeout=5))
    await asyncio.sleep(0.05)
    receiving.resume(other.token).discard()
    with pytest.raises(DeepModeError, match="discarded"):
        await other_waiter


async def test_the_mock_s_own_retries_land_after_a_redis_outage(
    redis_server: Any, redis_url: str
) -> None:
    """Deliveries during the outage get 503; the API's (the mock's) next attempt lands."""
    port = free_port()
    hub = CallbackHub(f"http://127.0.0.1:{port}/cb", store=redis_url)
    async with (
        MockDeepMode(callback_retries=6, callback_backoff=0.4) as mock,
        AsyncClient(mock.api_key, base_url=mock.base_url) as dm,
    ):
        model = mock.add_model()
        with hub.serve():
            pending = hub.expect("generation")
            await pending.saved()
            waiter = asyncio.create_task(pending.wait(timeout=30))
            await asyncio.to_thread(redis_server.stop)
            try:
                await dm.images.generate(model_id=model.id, prompt="p", callback=pending.url)
                await eventually(
                    lambda: bool(mock.callbacks) and "503" in mock.callbacks[0].attempts
                )
            finally:
                await asyncio.to_thread(redis_server.start)
            generation = await waiter
        hub.close()
    [delivery] = mock.callbacks
    assert delivery.delivered
    assert delivery.attempts[-1] == "200", delivery.attempts
    assert set(delivery.attempts[:-1]) == {"503"}
    assert [image.id for image in generation.images] == list(mock.images)
