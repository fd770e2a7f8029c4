"""AsyncClient configuration and life: arguments, environment, session ownership, closing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import aiohttp
import attrs
import pytest

from deepmode_async import AsyncClient, DeepModeError, Timeout, ValidationError
from deepmode_async.testing import MockDeepMode

pytestmark = [pytest.mark.anyio, pytest.mark.dm(fast=False)]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in ("DEEPMODE_API_KEY", "DEEPMODE_BASE_URL", "DEEPMODE_LOG"):
        monkeypatch.delenv(name, raising=False)
    logger = logging.getLogger("deepmode_async")
    level, handlers = logger.level, list(logger.handlers)
    yield monkeypatch
    logger.setLevel(level)
    logger.handlers[:] = handlers


async def test_key_and_base_url_come_from_the_environment(
    mock: MockDeepMode, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("DEEPMODE_API_KEY", mock.api_key)
    clean_env.setenv("DEEPMODE_BASE_URL", mock.base_url)
    async with AsyncClient() as dm:
        assert dm.base_url == mock.base_url
        assert (await dm.account.balance()).remaining_balance == mock.balance


async def test_arguments_win_over_the_environment(
    mock: MockDeepMode, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("DEEPMODE_API_KEY", "not-the-key")
    clean_env.setenv("DEEPMODE_BASE_URL", "http://127.0.0.1:9")
    async with AsyncClient(mock.api_key, base_url=mock.base_url) as dm:
        await dm.account.balance()
    assert mock.requests[-1].status == 200


def test_the_default_base_url_is_the_public_api(clean_env: pytest.MonkeyPatch) -> None:
    assert AsyncClient("k").base_url == "https://api.deepmode.ai"


def test_no_key_anywhere_says_how_to_set_one(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(DeepModeError, match="DEEPMODE_API_KEY"):
        AsyncClient()


def test_repr_shows_the_base_url_never_the_key(clean_env: pytest.MonkeyPatch) -> None:
    dm = AsyncClient("sk-very-secret", base_url="http://127.0.0.1:1")
    assert repr(dm) == "AsyncClient(base_url='http://127.0.0.1:1')"
    assert "sk-very-secret" not in repr(vars(dm.images)) + repr(dm.models) + str(dm)


def test_timeout_is_a_frozen_value_with_sensible_defaults() -> None:
    timeout = Timeout()
    assert (timeout.connect, timeout.read, timeout.total) == (10.0, 600.0, None)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        timeout.read = 1  # type: ignore[misc]
    assert attrs.evolve(timeout, total=30).total == 30
    assert AsyncClient("k", timeout=5).timeout == Timeout(read=5)
    assert AsyncClient("k", timeout=Timeout(connect=1)).timeout.connect == 1


@pytest.mark.parametrize("bad", [0, -1, True, "5"])
def test_a_timeout_must_be_positive_seconds(bad: object) -> None:
    with pytest.raises(ValidationError, match=r"Timeout\.read"):
        Timeout(read=bad)  # type: ignore[arg-type]


def test_a_timeout_of_the_wrong_kind_is_refused() -> None:
    with pytest.raises(ValidationError, match="timeout must be"):
        AsyncClient("k", timeout="soon")  # type: ignore[arg-type]


def test_the_session_is_created_lazily(clean_env: pytest.MonkeyPatch) -> None:
    # Constructing outside any event loop is fine: nothing touches aiohttp yet.
    dm = AsyncClient("k")
    assert dm._transport._pool._session is None


async def test_closing_twice_is_harmless_and_later_calls_say_closed(
    mock: MockDeepMode,
) -> None:
    dm = AsyncClient(mock.api_key, base_url=mock.base_url)
    await dm.account.balance()
    session = dm._transport._pool._session
    await dm.aclose()
    await dm.aclose()
    assert dm.closed
    assert session is not None
    assert session.closed
    with pytest.raises(DeepModeError, match="closed"):
        await dm.account.balance()


async def test_a_session_passed_in_is_used_and_left_open(mock: MockDeepMode) -> None:
    seen: list[str] = []

    async def on_start(
        session: aiohttp.ClientSession, context: object, params: aiohttp.TraceRequestStartParams
    ) -> None:
        seen.append(params.url.path)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        async with AsyncClient(mock.api_key, base_url=mock.base_url, session=session) as dm:
            await dm.account.balance()
        assert not session.closed
        assert seen == ["/api/check-balance"]


async def test_default_headers_and_user_agent_go_to_the_api_only(
    mock: MockDeepMode, tmp_path: object
) -> None:
    headers = {"X-Team": "imaging"}
    async with AsyncClient(mock.api_key, base_url=mock.base_url, default_headers=headers) as dm:
        model = mock.add_model()
        generation = await dm.images.generate(model_id=model.id, prompt="a lighthouse")
        await dm.images.download(generation, str(tmp_path))
    api, blob = mock.requests[0], mock.requests[-1]
    assert api.headers["X-Team"] == "imaging"
    assert api.headers["User-Agent"].startswith("deepmode-async/")
    assert blob.endpoint == "download"
    assert "X-Team" not in blob.headers
    assert "Authorization" not in blob.headers


async def test_a_client_belongs_to_the_loop_it_first_ran_in(mock: MockDeepMode) -> None:
    dm = AsyncClient(mock.api_key, base_url=mock.base_url)
    await dm.account.balance()

    async def elsewhere() -> None:
        await dm.account.balance()

    error: list[BaseException] = []

    def other_loop() -> None:
        try:
            asyncio.run(elsewhere())
        except BaseException as exc:
            error.append(exc)

    await asyncio.to_thread(other_loop)
    await dm.aclose()
    assert len(error) == 1
    assert isinstance(error[0], DeepModeError)
    assert "event loop" in str(error[0])


def test_deepmode_log_turns_on_debug_logging_to_stderr(
    clean_env: pytest.MonkeyPatch, sdk_logger: logging.Logger
) -> None:
    logger = sdk_logger
    clean_env.setenv("DEEPMODE_LOG", "debug")
    AsyncClient("k")
    assert logger.level == logging.DEBUG
    assert len(logger.handlers) == 1
    AsyncClient("k")  # a second client adds no second handler
    assert len(logger.handlers) == 1


async def test_deepmode_log_debug_logs_one_line_per_attempt(
    mock: MockDeepMode, clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clean_env.setenv("DEEPMODE_LOG", "debug")
    async with AsyncClient(mock.api_key, base_url=mock.base_url) as dm:
        with caplog.at_level(logging.DEBUG, logger="deepmode_async"):
            await dm.account.balance()
    lines = [r.getMessage() for r in caplog.records if r.name == "deepmode_async"]
    assert len(lines) == 1
    assert lines[0].startswith(f"GET {mock.base_url}/api/check-balance -> 200 in ")
    assert lines[0].endswith("(attempt 1)")
    assert mock.api_key not in lines[0]


async def test_max_connections_bounds_the_calls_in_flight(mock: MockDeepMode) -> None:
    mock.set_latency("balance", 0.1)
    async with AsyncClient(mock.api_key, base_url=mock.base_url, max_connections=3) as dm:
        await asyncio.gather(*(dm.account.balance() for _ in range(12)))
    assert mock.peak_in_flight == 3  # the other nine waited for a pooled connection
