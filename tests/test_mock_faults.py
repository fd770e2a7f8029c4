"""Fault injection: failures, dropped connections, stalls, truncation, rate limits, latency,
and faults dealt at random (`chaos`)."""

from __future__ import annotations

import asyncio
import collections
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import attrs
import pytest
import yarl
from conftest import Receiver, eventually
from multidict import CIMultiDictProxy

from deepmode_async.testing import (
    COSTS,
    ENDPOINTS,
    Endpoint,
    MockDeepMode,
    RecordedRequest,
    sample_image,
)

pytestmark = pytest.mark.anyio

CALL_TIMEOUT = aiohttp.ClientTimeout(total=10)

# A delay the mock is told to add, and the bound for a call it must leave alone: far
# apart, so that a loaded CI machine's hiccups cannot make one look like the other.
DELAY = 0.5
UNDELAYED = 0.3


@attrs.frozen
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@attrs.define
class Env:
    """What every endpoint's call needs: a trained model and an image to upscale or fetch."""

    mock: MockDeepMode
    http: aiohttp.ClientSession
    plain: aiohttp.ClientSession
    model_id: str
    image: dict[str, Any]
    timeout: aiohttp.ClientTimeout = CALL_TIMEOUT


@pytest.fixture
async def env(mock: MockDeepMode, http: aiohttp.ClientSession, plain: aiohttp.ClientSession) -> Env:
    model_id = mock.add_model().id
    body = {"model_id": model_id, "prompt": "a lighthouse"}
    async with http.post("/api/images/generate", json=body) as response:
        assert response.status == 200
        (image,) = (await response.json())["images"]
    return Env(mock, http, plain, model_id, image)


async def answer(request: Any) -> Answer:
    async with request as response:
        body = await response.read()
        return Answer(response.status, response.headers, response.content_type, body)


def remix_form(*fields: str, model_id: str | None = None) -> aiohttp.FormData:
    form = aiohttp.FormData()
    if model_id is not None:
        form.add_field("model_id", model_id)
    for name in fields:
        form.add_field(name, sample_image("jpeg"), filename=f"{name}.jpg")
    return form


CALLS: dict[Endpoint, Callable[[Env], Awaitable[Answer]]] = {
    "create_model": lambda e: answer(
        e.http.post(
            "/api/models",
            json={
                "image_urls": ["https://example.com/me.jpg"],
                "gender": "woman",
                "model_type": "amateur",
            },
            timeout=e.timeout,
        )
    ),
    "extend_model": lambda e: answer(
        e.http.post(f"/api/models/{e.model_id}/extend", timeout=e.timeout)
    ),
    "generate": lambda e: answer(
        e.http.post(
            "/api/images/generate",
            json={"model_id": e.model_id, "prompt": "a lighthouse"},
            timeout=e.timeout,
        )
    ),
    "retrieve_image": lambda e: answer(
        e.http.get(f"/api/images/{e.image['id']}", timeout=e.timeout)
    ),
    "upscale": lambda e: answer(
        e.http.post("/api/images/upscale", json={"image_id": e.image["id"]}, timeout=e.timeout)
    ),
    "remix": lambda e: answer(
        e.http.post(
            "/api/remix/generate",
            data=remix_form("artwork_image", "mask_image", model_id=e.model_id),
            timeout=e.timeout,
        )
    ),
    "face_id_remix": lambda e: answer(
        e.http.post(
            "/api/face-id-remix",
            data=remix_form("identity_image", "artwork_image", "mask_image"),
            timeout=e.timeout,
        )
    ),
    "balance": lambda e: answer(e.http.get("/api/check-balance", timeout=e.timeout)),
    "download": lambda e: answer(
        e.plain.get(yarl.URL(e.image["image_url"], encoded=True), timeout=e.timeout)
    ),
}
assert set(CALLS) == set(ENDPOINTS)

PAID: list[Endpoint] = [name for name in ENDPOINTS if COSTS.get(name)]


@attrs.frozen
class Snapshot:
    balance: int
    charges: int
    images: int
    models: int
    remixes: int


def snapshot(mock: MockDeepMode) -> Snapshot:
    return Snapshot(
        mock.balance, len(mock.ledger), len(mock.images), len(mock.models), len(mock.remixes)
    )


def records(mock: MockDeepMode, endpoint: Endpoint) -> list[RecordedRequest]:
    return [r for r in mock.requests if r.endpoint == endpoint]


async def give_up_once(server_state: Callable[[], object], call: Awaitable[object]) -> None:
    """Hang up on `call` as soon as `server_state()` is truthy, as a client's timeout would.

    Waiting for the server's side instead of using a short client timeout keeps the test
    honest on a loaded machine, where the call might not even reach the server in time.
    """
    task = asyncio.ensure_future(call)
    try:
        await eventually(lambda: bool(server_state()) or task.done())
        assert not task.done(), f"the call ended instead of hanging: {task}"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)  # never left pending
    assert task.cancelled()


# ------------------------------------------------------------------ fail


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_fail_answers_the_next_calls_then_recovers_charging_nothing(
    env: Env, endpoint: Endpoint
) -> None:
    mock = env.mock
    before = snapshot(mock)
    mock.fail(endpoint, 503, times=2, retry_after=7, detail={"reason": "maintenance"})

    for _ in range(2):
        failed = await CALLS[endpoint](env)
        assert failed.status == 503
        assert failed.headers["Retry-After"] == "7"
        assert failed.content_type == "application/json"
        assert failed.json() == {"detail": {"reason": "maintenance"}}
    assert snapshot(mock) == before

    ok = await CALLS[endpoint](env)
    assert ok.status == 200, ok.body
    assert "Retry-After" not in ok.headers
    cost = mock.costs.get(endpoint, 0)
    assert mock.balance == before.balance - cost
    assert len(mock.ledger) == before.charges + (1 if cost else 0)
    assert [r.status for r in records(mock, endpoint)][-3:] == [503, 503, 200]


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [(1, "1"), (2.0, "2"), (2.5, "2.5"), ("Wed, 21 Oct 2015 07:28:00 GMT", None), (None, None)],
)
async def test_fail_sends_retry_after_as_given(
    env: Env, retry_after: float | str | None, header: str | None
) -> None:
    env.mock.fail("generate", 429, retry_after=retry_after)
    failed = await CALLS["generate"](env)
    assert failed.status == 429
    expected = retry_after if isinstance(retry_after, str) else header
    assert failed.headers.get("Retry-After") == expected
    assert failed.json() == {"detail": "Injected fault 429"}


BODIES = {
    "html": ("<html><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>", "text/html"),
    "text": ("upstream connect error or disconnect/reset before headers", "text/plain"),
    "empty": (b"", "text/plain"),
    "empty-json": (b"", "application/json"),
    "bytes": (b"\xff\xfe not utf-8", "application/octet-stream"),
}


@pytest.mark.parametrize("endpoint", ["generate", "balance", "download"])
@pytest.mark.parametrize(("body", "content_type"), BODIES.values(), ids=BODIES.keys())
async def test_fail_sends_a_custom_body(
    env: Env, endpoint: Endpoint, body: bytes | str, content_type: str
) -> None:
    before = snapshot(env.mock)
    env.mock.fail(endpoint, 502, body=body, content_type=content_type, retry_after=3)

    failed = await CALLS[endpoint](env)

    assert failed.status == 502
    assert failed.body == (body.encode() if isinstance(body, str) else body)
    assert failed.content_type == content_type
    assert failed.headers["Retry-After"] == "3"
    assert snapshot(env.mock) == before
    assert (await CALLS[endpoint](env)).status == 200


# ------------------------------------------------------------------ drop


# aiohttp resends an idempotent request (GET) once when the connection is lost, as
# RFC 9112 allows, so a GET only surfaces the disconnection when two calls are dropped.
@pytest.mark.parametrize(
    ("endpoint", "times"),
    [("generate", 1), ("upscale", 1), ("extend_model", 1), ("balance", 2), ("download", 2)],
)
async def test_drop_closes_the_connection_without_charging(
    env: Env, endpoint: Endpoint, times: int
) -> None:
    mock = env.mock
    before = snapshot(mock)
    seen = len(records(mock, endpoint))
    mock.drop(endpoint, times=times)

    with pytest.raises(aiohttp.ClientConnectionError):
        await CALLS[endpoint](env)

    assert snapshot(mock) == before
    assert len(records(mock, endpoint)) == seen + times
    assert (await CALLS[endpoint](env)).status == 200


@pytest.mark.parametrize(
    ("endpoint", "after_processing"),
    [("generate", False), ("balance", False), ("download", False), ("generate", True)],
)
async def test_a_dropped_request_is_not_recorded_as_answered(
    env: Env, endpoint: Endpoint, after_processing: bool
) -> None:
    mock = env.mock
    seen = len(records(mock, endpoint))
    times = 1 if endpoint == "generate" else 2  # aiohttp resends a GET once
    mock.drop(endpoint, times=times, after_processing=after_processing)

    with pytest.raises(aiohttp.ClientConnectionError):
        await CALLS[endpoint](env)

    dropped = records(mock, endpoint)[seen:]
    assert len(dropped) == times
    # No answer was sent, so `requests` must not say that one (a 200) was.
    assert [r.status for r in dropped] == [None] * times


@pytest.mark.parametrize("endpoint", PAID)
async def test_drop_after_processing_charges_yet_disconnects(env: Env, endpoint: Endpoint) -> None:
    """The ambiguous failure: the client sees nothing, the server did the work."""
    mock = env.mock
    before = snapshot(mock)
    mock.drop(endpoint, after_processing=True)

    with pytest.raises(aiohttp.ClientConnectionError):
        await CALLS[endpoint](env)

    assert mock.balance == before.balance - mock.costs[endpoint]
    assert len(mock.ledger) == before.charges + 1
    charge = mock.ledger[-1]
    assert (charge.endpoint, charge.cost) == (endpoint, mock.costs[endpoint])
    assert charge.request_id == records(mock, endpoint)[-1].request_id
    if endpoint in ("generate", "upscale"):
        assert len(mock.images) == before.images + 1
    if endpoint == "create_model":
        assert len(mock.models) == before.models + 1


# ------------------------------------------------------------------ stall


@pytest.mark.parametrize("endpoint", ["balance", "generate", "download"])
async def test_stall_delays_the_answer(env: Env, endpoint: Endpoint) -> None:
    env.mock.stall(endpoint, seconds=DELAY)
    assert await _timed(CALLS[endpoint](env)) >= DELAY
    assert await _timed(CALLS[endpoint](env)) < UNDELAYED


@pytest.mark.parametrize("endpoint", ["balance", "generate", "download"])
async def test_a_client_giving_up_on_a_stall_is_recorded_as_disconnected(
    env: Env, endpoint: Endpoint
) -> None:
    mock = env.mock
    before = snapshot(mock)
    mock.stall(endpoint)  # an hour

    sent_before = len(records(mock, endpoint))
    await give_up_once(lambda: len(records(mock, endpoint)) > sent_before, CALLS[endpoint](env))

    record = records(mock, endpoint)[-1]
    await eventually(lambda: record.disconnected)
    assert record.status is None
    assert snapshot(mock) == before
    assert mock.in_flight == 0


async def test_stall_download_after_bytes_sends_a_head_then_holds(env: Env) -> None:
    mock, size = env.mock, len(env.mock.image_bytes)
    mock.stall("download", seconds=3600, after_bytes=100)

    async with env.plain.get(yarl.URL(env.image["image_url"], encoded=True)) as response:
        assert response.status == 200
        assert response.content_length == size
        head = await asyncio.wait_for(response.content.readexactly(100), 2)
        assert head == mock.image_bytes[:100]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(response.content.read(1), 0.3)

    record = records(mock, "download")[-1]
    await eventually(lambda: record.disconnected)


async def test_short_stall_mid_download_still_delivers_every_byte(env: Env) -> None:
    env.mock.stall("download", seconds=0.2, after_bytes=100)
    started = time.monotonic()
    stalled = await CALLS["download"](env)
    assert time.monotonic() - started >= 0.2
    assert (stalled.status, stalled.body) == (200, env.mock.image_bytes)


async def test_truncate_cuts_the_download_short(env: Env) -> None:
    env.mock.truncate()

    async with env.plain.get(yarl.URL(env.image["image_url"], encoded=True)) as response:
        assert response.status == 200
        assert response.content_length == len(env.mock.image_bytes)
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()

    assert (await CALLS["download"](env)).body == env.mock.image_bytes


# ------------------------------------------------------------------ concurrency limit


async def _generate_concurrently(env: Env, count: int) -> list[Answer]:
    return await asyncio.gather(*(CALLS["generate"](env) for _ in range(count)))


async def test_limit_concurrency_answers_429_beyond_the_limit(env: Env) -> None:
    mock = env.mock
    mock.set_latency("generate", 0.2)
    mock.limit_concurrency(2, retry_after=1)
    before = snapshot(mock)

    answers = await _generate_concurrently(env, 5)

    ok = [a for a in answers if a.status == 200]
    limited = [a for a in answers if a.status == 429]
    assert len(ok) + len(limited) == 5
    assert 1 <= len(ok) <= 2
    for refused in limited:
        assert refused.headers["Retry-After"] == "1"
        assert refused.json() == {"detail": "Too many concurrent requests"}
    assert mock.balance == before.balance - len(ok)  # a refused call costs nothing
    assert mock.peak_in_flight >= 3  # the refused calls were open when refused

    mock.limit_concurrency(None)
    assert [a.status for a in await _generate_concurrently(env, 5)] == [200] * 5


async def test_peak_in_flight_reflects_concurrency(env: Env) -> None:
    mock = env.mock
    mock.set_latency("generate", 0.2)
    mock.peak_in_flight = 0

    await _generate_concurrently(env, 5)

    assert mock.peak_in_flight == 5
    assert mock.in_flight == 0


# ------------------------------------------------------------------ latency


async def _timed(call: Awaitable[Answer]) -> float:
    started = time.monotonic()
    assert (await call).status == 200
    return time.monotonic() - started


async def test_latency_per_endpoint(receiver: Receiver) -> None:
    async with (
        MockDeepMode(latency={"generate": DELAY}) as mock,
        aiohttp.ClientSession(
            mock.base_url, headers={"Authorization": f"Bearer {mock.api_key}"}
        ) as http,
        aiohttp.ClientSession() as plain,
    ):
        env = Env(mock, http, plain, mock.add_model().id, {})
        assert await _timed(CALLS["generate"](env)) >= DELAY
        assert await _timed(CALLS["balance"](env)) < UNDELAYED

        # Callback mode answers at once and delivers after the latency.
        started = time.monotonic()
        body = {"model_id": env.model_id, "prompt": "a lighthouse", "callback": receiver.url}
        async with http.post("/api/images/generate", json=body) as response:
            assert await response.json() == {"message": "Generating images..."}
        assert time.monotonic() - started < UNDELAYED
        assert len((await receiver.next_body())["images"]) == 1
        assert time.monotonic() - started >= DELAY

        mock.set_latency("balance", DELAY)
        mock.set_latency("generate", 0)
        assert await _timed(CALLS["balance"](env)) >= DELAY
        assert await _timed(CALLS["generate"](env)) < UNDELAYED


async def test_a_single_latency_applies_to_every_endpoint() -> None:
    async with (
        MockDeepMode(latency=0.1) as mock,
        aiohttp.ClientSession(
            mock.base_url, headers={"Authorization": f"Bearer {mock.api_key}"}
        ) as http,
    ):
        assert mock.latency == dict.fromkeys(ENDPOINTS, 0.1)
        body = {"model_id": mock.add_model().id, "prompt": "p"}
        for call in (http.get("/api/check-balance"), http.post("/api/images/generate", json=body)):
            started = time.monotonic()
            async with call as response:
                assert response.status == 200
            assert time.monotonic() - started >= 0.1


# ------------------------------------------------------------------ clearing and naming


async def test_clear_faults_forgets_every_queued_fault_and_the_limit(env: Env) -> None:
    mock = env.mock
    mock.fail("generate", 500, times=3)
    mock.drop("balance", times=3)
    mock.stall("retrieve_image", times=3)
    mock.truncate(times=3)
    mock.limit_concurrency(0)
    assert (await CALLS["upscale"](env)).status == 429

    mock.clear_faults()

    for endpoint in ("generate", "balance", "retrieve_image", "download", "upscale"):
        assert (await CALLS[endpoint](env)).status == 200, endpoint


QUEUERS: dict[str, Callable[[MockDeepMode], None]] = {
    "fail": lambda mock: mock.fail("generat", 500),  # type: ignore[arg-type]
    "drop": lambda mock: mock.drop("Generate"),  # type: ignore[arg-type]
    "stall": lambda mock: mock.stall("check-balance", seconds=1),  # type: ignore[arg-type]
    "fail-path": lambda mock: mock.fail("/api/images/generate", 500),  # type: ignore[arg-type]
    "latency": lambda mock: mock.set_latency("generat", 1),  # type: ignore[arg-type]
    "latency-option": lambda mock: MockDeepMode(latency={"generat": 1}),  # type: ignore[dict-item]
    "costs-option": lambda mock: MockDeepMode(costs={"generat": 1}),  # type: ignore[dict-item]
}


@pytest.mark.parametrize("queue", QUEUERS.values(), ids=QUEUERS.keys())
async def test_an_unknown_endpoint_name_raises(
    mock: MockDeepMode, http: aiohttp.ClientSession, queue: Callable[[MockDeepMode], None]
) -> None:
    with pytest.raises(ValueError, match="unknown endpoint"):
        queue(mock)
    async with http.get("/api/check-balance") as response:
        assert response.status == 200


async def test_stalling_mid_body_is_for_downloads_only(mock: MockDeepMode) -> None:
    with pytest.raises(ValueError, match="download"):
        mock.stall("generate", after_bytes=10)


# ------------------------------------------------------------------ performance


async def test_the_mock_is_not_a_bottleneck() -> None:
    """1000 generate calls at 50 ms, 100 in flight: ideally 0.5 s, one at a time 50 s. It
    takes about 1.2 s under coverage; 12.5 s (4 times better than one at a time) leaves
    room for a loaded CI machine, and the peak in flight shows the calls overlapping."""
    calls, in_flight = 1000, 100
    async with (
        MockDeepMode(latency={"generate": 0.05}) as mock,
        aiohttp.ClientSession(
            mock.base_url,
            headers={"Authorization": f"Bearer {mock.api_key}"},
            connector=aiohttp.TCPConnector(limit=in_flight),
        ) as http,
    ):
        body = {"model_id": mock.add_model().id, "prompt": "a lighthouse"}

        async def one() -> int:
            async with http.post("/api/images/generate", json=body) as response:
                await response.read()
                return response.status

        started = time.monotonic()
        statuses = await asyncio.gather(*(one() for _ in range(calls)))
        elapsed = time.monotonic() - started

    assert statuses == [200] * calls
    assert len(mock.ledger) == calls
    assert mock.peak_in_flight <= in_flight
    assert mock.peak_in_flight >= in_flight // 2
    ideal = calls / in_flight * 0.05
    assert elapsed < calls * 0.05 / 4, f"{calls} calls took {elapsed:.2f} s (ideal {ideal} s)"


# ------------------------------------------------------------------ the server acted, slowly


@pytest.mark.parametrize("slow", ["stall after processing", "latency"])
async def test_a_client_giving_up_on_a_slow_paid_call_was_still_charged(
    mock: MockDeepMode, http: aiohttp.ClientSession, slow: str
) -> None:
    model = mock.add_model()
    if slow == "latency":
        mock.set_latency("generate", 5)
    else:
        mock.stall("generate", seconds=5, after_processing=True)
    body = {"model_id": model.id, "prompt": "p", "num_images": 2}

    async def call() -> None:
        async with http.post("/api/images/generate", json=body):
            pass

    await give_up_once(lambda: mock.ledger, call())
    (record,) = records(mock, "generate")
    await eventually(lambda: record.disconnected)
    # What a slow real server leaves behind: the charge and the images, never half of it.
    assert [charge.request_id for charge in mock.ledger] == [record.request_id]
    assert len(mock.images) == 2
    assert record.status is None


async def test_an_after_processing_fault_waits_for_an_accepted_call(
    mock: MockDeepMode, http: aiohttp.ClientSession
) -> None:
    model = mock.add_model()
    mock.drop("generate", after_processing=True)
    async with http.post("/api/images/generate", json={"model_id": model.id}) as response:
        assert response.status == 422  # rejected: not the call the fault is meant for
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with http.post("/api/images/generate", json={"model_id": model.id, "prompt": "p"}):
            pass
    assert len(mock.ledger) == 1
    async with http.post(
        "/api/images/generate", json={"model_id": model.id, "prompt": "p"}
    ) as response:
        assert response.status == 200
    assert len(mock.ledger) == 2


async def test_after_processing_makes_no_sense_for_downloads(mock: MockDeepMode) -> None:
    with pytest.raises(ValueError, match="truncate"):
        mock.drop("download", after_processing=True)
    with pytest.raises(ValueError, match="after_bytes"):
        mock.stall("download", after_processing=True)


# ------------------------------------------------------------------ chaos


async def _outcome(env: Env, endpoint: Endpoint = "generate") -> int | str:
    """The status of one call, or "dropped" when the connection closed instead."""
    try:
        return (await CALLS[endpoint](env)).status
    except aiohttp.ClientPayloadError:
        return "truncated"
    except aiohttp.ClientConnectionError:
        return "dropped"


async def _outcomes(env: Env, count: int, endpoint: Endpoint = "generate") -> list[int | str]:
    return [await _outcome(env, endpoint) for _ in range(count)]


async def test_chaos_deals_each_fault_at_about_its_rate(env: Env) -> None:
    mock, calls = env.mock, 400
    odds: dict[int | str, float] = {429: 0.2, 503: 0.1, "dropped": 0.1, 500: 0.05}
    before = snapshot(mock)
    mock.chaos(
        rate_limited=odds[429],
        unavailable=odds[503],
        dropped=odds["dropped"],
        server_error=odds[500],
        retry_after=2,
        seed=8,
    )

    outcomes = await _outcomes(env, calls)

    counts = collections.Counter(outcomes)
    assert set(counts) == {200, 429, 503, 500, "dropped"}
    for outcome, p in odds.items():
        # Four standard deviations of a binomial: fails by chance about once in 15 000.
        spread = 4 * math.sqrt(calls * p * (1 - p))
        assert abs(counts[outcome] - calls * p) < spread, (outcome, counts)
    # Only the calls carried out were charged: those answered and those dropped after.
    dealt = records(mock, "generate")[-calls:]
    assert [r.status if r.status is not None else "dropped" for r in dealt] == outcomes
    charged = {charge.request_id for charge in mock.ledger[before.charges :]}
    assert charged == {r.request_id for r in dealt if r.status in (200, None)}
    assert mock.balance == before.balance - counts[200] - counts["dropped"]


@pytest.mark.parametrize("status", [429, 503])
async def test_chaos_refusals_say_when_to_come_back(env: Env, status: int) -> None:
    if status == 429:
        env.mock.chaos(rate_limited=1.0, retry_after=2.5)
    else:
        env.mock.chaos(unavailable=1.0, retry_after=2.5)
    for endpoint in ("generate", "balance"):
        refused = await CALLS[endpoint](env)
        assert (refused.status, refused.headers["Retry-After"]) == (status, "2.5")


async def test_a_chaos_500_has_no_retry_after_and_costs_nothing(env: Env) -> None:
    before = snapshot(env.mock)
    env.mock.chaos(server_error=1.0)
    failed = await CALLS["generate"](env)
    assert failed.status == 500
    assert "Retry-After" not in failed.headers
    assert snapshot(env.mock) == before


async def test_the_same_seed_deals_the_same_faults(env: Env) -> None:
    def deal(seed: int) -> None:
        env.mock.chaos(rate_limited=0.3, unavailable=0.2, dropped=0.1, server_error=0.1, seed=seed)

    deal(1)
    first = await _outcomes(env, 60)
    deal(1)
    again = await _outcomes(env, 60)
    deal(2)
    other = await _outcomes(env, 60)

    assert first == again
    assert other != first
    assert len(set(first)) == 5  # every kind appears, so equality means something


async def test_chaos_spares_the_image_host_unless_named(env: Env) -> None:
    mock = env.mock
    mock.chaos(rate_limited=1.0)
    assert await _outcome(env, "balance") == 429
    assert await _outcome(env, "download") == 200

    mock.chaos(["download", "retrieve_image"], unavailable=1.0)
    assert await _outcome(env, "download") == 503
    assert await _outcome(env, "retrieve_image") == 503
    assert await _outcome(env, "generate") == 200

    mock.chaos("download", dropped=1.0)  # a download was served: it is cut short
    assert await _outcome(env, "download") == "truncated"
    assert await _outcome(env, "balance") == 200


async def test_chaos_adds_latency_within_the_range(env: Env) -> None:
    mock = env.mock
    mock.chaos(latency=(DELAY, DELAY + 0.05))
    for endpoint in ("balance", "generate"):
        started = time.monotonic()
        assert await _outcome(env, endpoint) == 200
        assert DELAY <= time.monotonic() - started < DELAY + 0.05 + UNDELAYED

    mock.chaos(server_error=1.0, latency=(0.1, 0.1))  # a fault waits too
    started = time.monotonic()
    assert await _outcome(env) == 500
    assert time.monotonic() - started >= 0.1

    mock.chaos(["generate"], latency=(DELAY, DELAY))
    assert await _timed(CALLS["balance"](env)) < UNDELAYED


async def test_queued_faults_come_before_chaos(env: Env) -> None:
    env.mock.chaos(rate_limited=1.0)
    env.mock.fail("generate", 418, times=2)
    assert await _outcomes(env, 3) == [418, 418, 429]


async def test_clear_faults_ends_chaos(env: Env) -> None:
    env.mock.chaos(rate_limited=0.5, dropped=0.5, latency=(0.2, 0.2))
    env.mock.clear_faults()
    started = time.monotonic()
    assert await _outcomes(env, 20) == [200] * 20
    assert time.monotonic() - started < 1


async def test_a_dealt_drop_skips_a_rejected_call_without_waiting_for_the_next(env: Env) -> None:
    """Unlike `drop(after_processing=True)`, a fault dealt by chaos is for its call only."""
    mock = env.mock
    mock.chaos(dropped=1.0)
    rejected = await answer(env.http.post("/api/images/generate", json={"prompt": "p"}))
    assert rejected.status == 422
    mock.chaos()  # nothing dealt from now on; the queue must not hold the drop
    assert await _outcome(env) == 200


BAD_CHAOS: dict[str, dict[str, Any]] = {
    "negative": {"rate_limited": -0.1},
    "above one": {"dropped": 1.5},
    "sum above one": {"rate_limited": 0.5, "unavailable": 0.3, "server_error": 0.3},
    "nan": {"server_error": math.nan},
    "bool": {"unavailable": True},
    "text": {"rate_limited": "0.1"},
    "latency reversed": {"latency": (0.2, 0.1)},
    "latency negative": {"latency": (-1.0, 0.1)},
    "latency one number": {"latency": 0.1},
    "latency infinite": {"latency": (0.0, math.inf)},
}


@pytest.mark.parametrize("options", BAD_CHAOS.values(), ids=BAD_CHAOS.keys())
async def test_chaos_rejects_bad_settings(env: Env, options: dict[str, Any]) -> None:
    env.mock.chaos(rate_limited=1.0)
    with pytest.raises(ValueError, match=r"probabilit|latency"):
        env.mock.chaos(**options)
    assert await _outcome(env) == 429  # the settings before stay


async def test_chaos_rejects_an_unknown_endpoint(mock: MockDeepMode) -> None:
    with pytest.raises(ValueError, match="unknown endpoint"):
        mock.chaos(["generate", "generat"], rate_limited=1.0)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="unknown endpoint"):
        mock.chaos("images", rate_limited=1.0)  # type: ignore[arg-type]


async def test_chaos_in_the_thread_backed_form() -> None:
    with MockDeepMode() as mock:
        mock.chaos(rate_limited=1.0, retry_after=3)
        async with aiohttp.ClientSession(
            mock.base_url, headers={"Authorization": f"Bearer {mock.api_key}"}
        ) as http:
            async with http.get("/api/check-balance") as response:
                assert (response.status, response.headers["Retry-After"]) == (429, "3")
            mock.clear_faults()
            async with http.get("/api/check-balance") as response:
                assert response.status == 200
