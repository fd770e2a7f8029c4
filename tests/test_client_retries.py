"""Retries per class of call, counted on the server: credit-spending calls are sent again
only when the server certainly did not act on them; reads retry every transient failure."""

from __future__ import annotations

import email.utils
import logging
import re
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from conftest import FAST, eventually, make_client
from hypothesis import given
from hypothesis import strategies as st

from deepmode_async import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    Balance,
    Generation,
    InternalServerError,
    RateLimitError,
)
from deepmode_async._errors import APIError, RequestInfo, status_error
from deepmode_async._retry import RetryPolicy
from deepmode_async.testing import Endpoint, MockDeepMode, sample_image

pytestmark = pytest.mark.anyio


def sent(mock: MockDeepMode, endpoint: Endpoint) -> int:
    return sum(1 for record in mock.requests if record.endpoint == endpoint)


def charged(mock: MockDeepMode, endpoint: Endpoint) -> int:
    return sum(1 for charge in mock.ledger if charge.endpoint == endpoint)


def retry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "deepmode_async" and record.levelno == logging.WARNING
    ]


# ------------------------------------------------------------------ credit-spending calls

SpendingCall = Callable[[AsyncClient, str], Awaitable[object]]


async def generate(dm: AsyncClient, model_id: str) -> object:
    return await dm.images.generate(model_id=model_id, prompt="a lighthouse")


async def create_model(dm: AsyncClient, model_id: str) -> object:
    images = [sample_image("jpeg"), sample_image("png")]
    return await dm.models.create(images=images, gender="woman", model_type="amateur")


async def remix(dm: AsyncClient, model_id: str) -> object:
    return await dm.images.remix(
        model_id=model_id, artwork_image=sample_image("png"), mask_image=sample_image("png")
    )


SPENDING: dict[Endpoint, SpendingCall] = {
    "generate": generate,
    "create_model": create_model,
    "remix": remix,
}


@pytest.mark.parametrize("status", [500, 502, 504])
@pytest.mark.parametrize("endpoint", list(SPENDING))
async def test_a_spending_call_answered_5xx_is_sent_once(
    mock: MockDeepMode,
    dm: AsyncClient,
    model_id: str,
    caplog: pytest.LogCaptureFixture,
    endpoint: Endpoint,
    status: int,
) -> None:
    caplog.set_level(logging.WARNING, logger="deepmode_async")
    mock.fail(endpoint, status)
    with pytest.raises(InternalServerError) as caught:
        await SPENDING[endpoint](dm, model_id)
    assert caught.value.status_code == status
    assert sent(mock, endpoint) == 1
    assert mock.ledger == []
    assert retry_warnings(caplog) == []
    # The same call works when sent again by the caller: the fault was only one.
    await SPENDING[endpoint](dm, model_id)
    assert sent(mock, endpoint) == 2
    assert charged(mock, endpoint) == 1


async def test_a_generate_that_times_out_after_processing_is_not_repeated(
    mock: MockDeepMode, dm: AsyncClient, model_id: str
) -> None:
    mock.stall("generate", seconds=5, after_processing=True)
    started = time.monotonic()
    with pytest.raises(APITimeoutError):
        await dm.images.generate(model_id=model_id, prompt="a lighthouse", timeout=0.3)
    assert time.monotonic() - started < 2
    assert sent(mock, "generate") == 1
    assert charged(mock, "generate") == 1  # the ambiguous case: charged, and surfaced
    await eventually(lambda: mock.requests[-1].disconnected)
    assert sent(mock, "generate") == 1


async def test_a_generate_dropped_after_processing_is_not_repeated(
    mock: MockDeepMode, dm: AsyncClient, model_id: str
) -> None:
    mock.drop("generate", after_processing=True)
    with pytest.raises(APIConnectionError) as caught:
        await dm.images.generate(model_id=model_id, prompt="a lighthouse")
    assert not isinstance(caught.value, APITimeoutError)
    assert sent(mock, "generate") == 1
    assert charged(mock, "generate") == 1


async def test_a_generate_answered_429_waits_and_is_retried_once(
    mock: MockDeepMode, dm: AsyncClient, model_id: str
) -> None:
    mock.fail("generate", 429, retry_after=0.2)
    started = time.monotonic()
    generation = await dm.images.generate(model_id=model_id, prompt="a lighthouse")
    assert time.monotonic() - started >= 0.19
    assert isinstance(generation, Generation)
    assert len(generation.images) == 1
    assert sent(mock, "generate") == 2
    assert charged(mock, "generate") == 1


async def test_a_generate_answered_503_with_retry_after_is_retried(
    mock: MockDeepMode, dm: AsyncClient, model_id: str
) -> None:
    mock.fail("generate", 503, retry_after=0.05)
    generation = await dm.images.generate(model_id=model_id, prompt="a lighthouse")
    assert len(generation.images) == 1
    assert sent(mock, "generate") == 2
    assert charged(mock, "generate") == 1


async def test_a_generate_answered_503_without_retry_after_is_not_retried(
    mock: MockDeepMode, dm: AsyncClient, model_id: str
) -> None:
    mock.fail("generate", 503)
    with pytest.raises(InternalServerError) as caught:
        await dm.images.generate(model_id=model_id, prompt="a lighthouse")
    assert caught.value.status_code == 503
    assert sent(mock, "generate") == 1
    assert mock.ledger == []


async def test_a_connect_failure_is_retried_even_for_generate(
    closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="deepmode_async")
    base_url = f"http://127.0.0.1:{closed_port}"
    retries = RetryPolicy(max_retries=2, backoff_base=FAST)
    async with AsyncClient("key", base_url=base_url, max_retries=retries) as dm:
        with pytest.raises(APIConnectionError) as caught:
            await dm.images.generate(model_id="m", prompt="a lighthouse")
    assert not isinstance(caught.value, APITimeoutError)
    warnings = retry_warnings(caplog)
    assert len(warnings) == 2
    for number, warning in enumerate(warnings, 1):
        assert f"POST {base_url}/api/images/generate" in warning
        assert f"retry {number} of 2" in warning


# ------------------------------------------------------------------ reads

ReadCall = Callable[[AsyncClient, str], Awaitable[object]]


async def balance(dm: AsyncClient, image_id: str) -> object:
    return await dm.account.balance()


async def retrieve(dm: AsyncClient, image_id: str) -> object:
    return await dm.images.retrieve(image_id)


READS: dict[Endpoint, ReadCall] = {"balance": balance, "retrieve_image": retrieve}


@pytest.fixture
async def image_id(dm: AsyncClient, model_id: str) -> str:
    generation = await dm.images.generate(model_id=model_id, prompt="a lighthouse")
    return generation.images[0].id


@pytest.mark.parametrize("status", [500, 502, 503, 504])
@pytest.mark.parametrize("endpoint", list(READS))
async def test_a_read_retries_a_server_error(
    mock: MockDeepMode, dm: AsyncClient, image_id: str, endpoint: Endpoint, status: int
) -> None:
    mock.fail(endpoint, status)
    result = await READS[endpoint](dm, image_id)
    assert result is not None
    assert sent(mock, endpoint) == 2


@pytest.mark.parametrize("max_retries", [0, 1, 2, 3])
@pytest.mark.parametrize("endpoint", list(READS))
async def test_a_read_gives_up_after_max_retries_plus_one_attempts(
    mock: MockDeepMode, image_id: str, endpoint: Endpoint, max_retries: int
) -> None:
    mock.fail(endpoint, 500, times=10)
    async with make_client(mock, max_retries=max_retries) as dm:
        with pytest.raises(InternalServerError):
            await READS[endpoint](dm, image_id)
    assert sent(mock, endpoint) == max_retries + 1


async def test_a_read_raises_the_last_error(mock: MockDeepMode, dm: AsyncClient) -> None:
    mock.fail("balance", 500, detail="first")
    mock.fail("balance", 502, detail="second")
    mock.fail("balance", 504, detail="third")
    with pytest.raises(InternalServerError) as caught:
        await dm.account.balance()
    assert caught.value.status_code == 504
    assert caught.value.detail == "third"
    assert sent(mock, "balance") == 3


async def test_a_read_retries_a_dropped_connection(
    mock: MockDeepMode, dm: AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="deepmode_async")
    mock.drop("balance", times=2)
    assert await dm.account.balance() == Balance(remaining_balance=mock.balance)
    # Exactly the SDK's attempts reach the server (aiohttp re-sends nothing of its own):
    # two dropped, then the 200.
    assert sent(mock, "balance") == 3
    assert len(retry_warnings(caplog)) == 2
    attempts = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(attempts) == 3
    for number, line in enumerate(attempts[:2], start=1):
        assert "-> ServerDisconnectedError in" in line
        assert line.endswith(f"(attempt {number})")
    assert "-> 200 in" in attempts[2]
    assert attempts[2].endswith("(attempt 3)")


async def test_a_read_gives_up_on_a_connection_that_keeps_dropping(
    mock: MockDeepMode, dm: AsyncClient
) -> None:
    mock.drop("balance", times=20)
    with pytest.raises(APIConnectionError) as caught:
        await dm.account.balance()
    assert not isinstance(caught.value, APITimeoutError)
    assert sent(mock, "balance") == 3  # three attempts, nothing re-sent behind them


async def test_a_read_retries_a_stall_beyond_the_read_timeout(
    mock: MockDeepMode, dm: AsyncClient
) -> None:
    mock.stall("balance", seconds=5)
    started = time.monotonic()
    assert await dm.account.balance(timeout=0.2) == Balance(remaining_balance=mock.balance)
    assert 0.15 <= time.monotonic() - started < 2
    assert sent(mock, "balance") == 2
    await eventually(lambda: mock.requests[0].disconnected)


async def test_a_read_that_always_stalls_times_out_after_every_attempt(
    mock: MockDeepMode,
) -> None:
    mock.stall("balance", seconds=5, times=3)
    async with make_client(mock, max_retries=1) as dm:
        with pytest.raises(APITimeoutError):
            await dm.account.balance(timeout=0.15)
    assert sent(mock, "balance") == 2


# ------------------------------------------------------------------ limits of waiting


async def test_max_retries_zero_disables_retries(mock: MockDeepMode) -> None:
    mock.fail("balance", 429, retry_after=0)
    async with make_client(mock, max_retries=0) as dm:
        with pytest.raises(RateLimitError) as caught:
            await dm.account.balance()
    assert caught.value.retry_after == 0.0
    assert sent(mock, "balance") == 1


@pytest.mark.parametrize("endpoint", ["balance", "generate"])
async def test_a_retry_after_above_the_cap_is_raised_at_once(
    mock: MockDeepMode, dm: AsyncClient, model_id: str, endpoint: Endpoint
) -> None:
    mock.fail(endpoint, 429, retry_after=3600)
    call = (
        dm.account.balance()
        if endpoint == "balance"
        else dm.images.generate(model_id=model_id, prompt="a lighthouse")
    )
    started = time.monotonic()
    with pytest.raises(RateLimitError) as caught:
        await call
    assert time.monotonic() - started < 1
    assert caught.value.retry_after == pytest.approx(3600, abs=1)
    assert sent(mock, endpoint) == 1


async def test_a_retry_after_http_date_is_honoured(mock: MockDeepMode, dm: AsyncClient) -> None:
    # HTTP dates have whole seconds: aim at one at least half a second ahead.
    target = int(time.time()) + 1
    if target - time.time() < 0.5:
        target += 1
    mock.fail("balance", 429, retry_after=email.utils.formatdate(target, usegmt=True))
    await dm.account.balance()
    assert time.time() >= target - 0.05
    assert sent(mock, "balance") == 2


# ------------------------------------------------------------------ logs


async def test_one_debug_line_per_attempt_and_one_warning_per_retry(
    mock: MockDeepMode, dm: AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="deepmode_async")
    mock.fail("balance", 500, times=2)
    await dm.account.balance()
    records = [r for r in caplog.records if r.name == "deepmode_async"]
    debug = [r.getMessage() for r in records if r.levelno == logging.DEBUG]
    pattern = re.compile(
        rf"^GET {re.escape(mock.base_url)}/api/check-balance -> (\d+) in [\d.]+ ms "
        r"\(attempt (\d+)\)$"
    )
    matches = [pattern.match(line) for line in debug]
    assert all(matches), debug
    assert [(m.group(1), m.group(2)) for m in matches if m] == [
        ("500", "1"),
        ("500", "2"),
        ("200", "3"),
    ]
    warnings = retry_warnings(caplog)
    assert len(warnings) == 2
    assert "HTTP 500" in warnings[0]
    assert "retry 1 of 2" in warnings[0]
    assert "retry 2 of 2" in warnings[1]
    assert [r.levelno for r in records] == [
        logging.DEBUG,
        logging.WARNING,
        logging.DEBUG,
        logging.WARNING,
        logging.DEBUG,
    ]


async def test_no_warning_without_a_retry(
    mock: MockDeepMode, dm: AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="deepmode_async")
    await dm.account.balance()
    assert retry_warnings(caplog) == []
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 1


# ------------------------------------------------------------------ RetryState.delay

REQUEST = RequestInfo("POST", "http://127.0.0.1:1/api/images/generate")


def connection_error(cause: BaseException | None = None) -> APIConnectionError:
    error = APIConnectionError("failed", request=REQUEST)
    error.__cause__ = cause
    return error


def answer(status: int, headers: dict[str, str] | None = None) -> APIError:
    return status_error(REQUEST, status, b"", headers or {})


def delay_of(
    policy: RetryPolicy, error: APIError, attempt: int, *, idempotent: bool
) -> float | None:
    """The wait `policy` gives after try number `attempt` failed with `error`."""
    state = policy.start(idempotent=idempotent)
    for _ in range(attempt - 1):
        state = state.increment()
    return state.delay(error)


@given(
    attempt=st.integers(min_value=1, max_value=64),
    base=st.floats(min_value=0.001, max_value=10),
    cap=st.floats(min_value=0.001, max_value=100),
    idempotent=st.booleans(),
)
def test_full_jitter_stays_within_its_bound(
    attempt: int, base: float, cap: float, idempotent: bool
) -> None:
    policy = RetryPolicy(max_retries=64, backoff_base=base, backoff_cap=cap)
    error = connection_error() if idempotent else answer(429)
    delay = delay_of(policy, error, attempt, idempotent=idempotent)
    assert delay is not None
    assert 0 <= delay <= min(cap, base * 2 ** (attempt - 1))


def test_full_jitter_spreads_over_the_whole_range() -> None:
    policy = RetryPolicy(max_retries=5, backoff_base=1.0, backoff_cap=100.0)
    delays = [delay_of(policy, connection_error(), 3, idempotent=True) for _ in range(200)]
    values = [d for d in delays if d is not None]
    assert len(values) == 200
    assert all(0 <= d <= 4.0 for d in values)
    assert min(values) < 1.0  # full jitter, not "half the bound plus jitter"
    assert max(values) > 3.0


def test_the_backoff_is_capped() -> None:
    policy = RetryPolicy(max_retries=50, backoff_base=0.5, backoff_cap=8.0)
    delays = [delay_of(policy, connection_error(), 40, idempotent=True) for _ in range(50)]
    assert all(d is not None and 0 <= d <= 8.0 for d in delays)


def test_a_huge_attempt_number_does_not_overflow() -> None:
    policy = RetryPolicy(max_retries=5000, backoff_base=0.5, backoff_cap=8.0)
    delay = delay_of(policy, connection_error(), 1100, idempotent=True)
    assert delay is not None
    assert 0 <= delay <= 8.0


@pytest.mark.parametrize("idempotent", [True, False])
def test_retry_after_is_honoured(idempotent: bool) -> None:
    policy = RetryPolicy(max_retries=3)
    assert delay_of(policy, answer(429, {"Retry-After": "3"}), 1, idempotent=idempotent) == 3.0
    assert delay_of(policy, answer(503, {"Retry-After": "2.5"}), 2, idempotent=idempotent) == 2.5
    when = email.utils.formatdate(time.time() + 10, usegmt=True)
    delay = delay_of(policy, answer(429, {"Retry-After": when}), 1, idempotent=idempotent)
    assert delay is not None
    assert 8 <= delay <= 10
    # Above the cap: not waited, raised.
    assert delay_of(policy, answer(429, {"Retry-After": "3600"}), 1, idempotent=idempotent) is None


def test_delay_is_none_beyond_max_retries() -> None:
    policy = RetryPolicy(max_retries=2, backoff_base=FAST)
    assert delay_of(policy, connection_error(), 1, idempotent=True) is not None
    assert delay_of(policy, connection_error(), 2, idempotent=True) is not None
    assert delay_of(policy, connection_error(), 3, idempotent=True) is None
    assert delay_of(policy, answer(429, {"Retry-After": "1"}), 3, idempotent=True) is None
    assert delay_of(RetryPolicy(max_retries=0), answer(429), 1, idempotent=True) is None


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_reads_retry_every_transient_status(status: int) -> None:
    assert delay_of(RetryPolicy(), answer(status), 1, idempotent=True) is not None


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 409, 413, 418, 422, 501])
def test_nobody_retries_a_final_answer(status: int) -> None:
    for idempotent in (True, False):
        assert delay_of(RetryPolicy(), answer(status), 1, idempotent=idempotent) is None


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
def test_spending_calls_do_not_retry_an_ambiguous_status(status: int) -> None:
    assert delay_of(RetryPolicy(), answer(status), 1, idempotent=False) is None


def test_spending_calls_retry_only_connections_that_never_sent_the_request() -> None:
    policy = RetryPolicy()
    not_sent = connection_error(aiohttp.ConnectionTimeoutError())
    assert delay_of(policy, not_sent, 1, idempotent=False) is not None
    for cause in (aiohttp.ServerDisconnectedError(), aiohttp.SocketTimeoutError(), None):
        error = connection_error(cause)
        assert delay_of(policy, error, 1, idempotent=False) is None
        assert delay_of(policy, error, 1, idempotent=True) is not None


async def test_the_wait_for_a_retry_is_not_counted_by_the_timeout(
    mock: MockDeepMode, dm: AsyncClient
) -> None:
    # The Retry-After wait (0.4 s) is longer than the read timeout (0.3 s) of each attempt.
    mock.fail("balance", 429, retry_after=0.4)
    assert await dm.account.balance(timeout=0.3) == Balance(remaining_balance=mock.balance)
    assert sent(mock, "balance") == 2
