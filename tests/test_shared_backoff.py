"""The shared back-off: a wait the server asks one client for (429, or 503
with `Retry-After`) holds the new calls of every client sharing its store, through
each kind of store; a store that is down leaves the calls going, with one warning."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from _redis import RedisServer
from conftest import eventually

from deepmode_async import AsyncClient, Client, RetryPolicy
from deepmode_async._shared_backoff import NAMESPACE, SharedBackoff, _encode
from deepmode_async.stores import MemoryStore, RedisStore, SQLiteStore, Store
from deepmode_async.testing import MockDeepMode

pytestmark = pytest.mark.anyio

PAUSE = 1.5  # the Retry-After the mock answers with
SLACK = 0.1  # the way of a 429 to the test
# The way of a pause to another client (a push; through SQLite, a commit and a poll):
# generous, as a loaded machine stretches it; a call held for the pause still ends
# PAUSE after the 429, one not held right after this.
PUSH = 0.4

Opener = Callable[[], Store]


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens a store as another process would: the same file, the same Redis (one
    `MemoryStore` is shared as an object, the only way it is shared)."""
    opened: list[Store] = []
    memory = MemoryStore()

    def open_one() -> Store:
        store: Store
        if request.param == "memory":
            store = memory
        elif request.param == "sqlite":
            store = SQLiteStore(tmp_path / "backoff.db")
        else:
            store = RedisStore(request.getfixturevalue("redis_url"))
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.aclose()


def client(mock: MockDeepMode, store: Store | str | None) -> AsyncClient:
    return AsyncClient(
        mock.api_key, base_url=mock.base_url, store=store, max_retries=RetryPolicy(3)
    )


def count(mock: MockDeepMode, status: int) -> int:
    return sum(1 for request in mock.requests if request.status == status)


async def told_to_wait(mock: MockDeepMode, dm: AsyncClient) -> asyncio.Task[object]:
    """`dm`'s balance call, refused once with 429 and `Retry-After: PAUSE`; returns once
    the 429 was answered (the call itself waits and tries again)."""
    mock.fail("balance", 429, retry_after=PAUSE)
    call: asyncio.Task[object] = asyncio.create_task(dm.account.balance())
    await eventually(lambda: count(mock, 429) == 1)
    return call


async def heard(*clients: AsyncClient | Client) -> None:
    """Until the pause told to one client has reached these (a push; through SQLite a
    commit and a poll, which a loaded machine stretches), failing if it does not well
    within the pause: a call made then must be held for the rest of it."""

    def pause_known() -> bool:
        backoffs = [getattr(c, "_async", c)._transport.backoff for c in clients]  # type: ignore[union-attr]
        return all(b is not None and b.until > time.time() for b in backoffs)

    await asyncio.sleep(0.05)
    await eventually(pause_known, within=PAUSE - 0.5)


async def test_a_wait_told_to_one_client_holds_the_new_calls_of_another(
    mock: MockDeepMode, opener: Opener
) -> None:
    async with (
        client(mock, opener()) as first,
        client(mock, opener()) as second,
        client(mock, None) as alone,
    ):
        await asyncio.gather(first.account.balance(), second.account.balance())  # listening
        call = await told_to_wait(mock, first)
        told = time.monotonic()
        await heard(second)
        started = time.monotonic()
        await alone.account.balance()  # shares nothing: not held
        assert time.monotonic() - started < PAUSE / 2
        await second.account.balance()
        assert time.monotonic() - told >= PAUSE - SLACK
        await call
    assert count(mock, 429) == 1


async def test_a_client_that_starts_during_a_pause_sees_it_on_its_first_call(
    mock: MockDeepMode, opener: Opener
) -> None:
    async with client(mock, opener()) as first:
        await first.account.balance()
        call = await told_to_wait(mock, first)
        told = time.monotonic()
        await asyncio.sleep(PUSH)
        async with client(mock, opener()) as later:
            await later.account.balance()
        assert time.monotonic() - told >= PAUSE - SLACK
        await call


async def test_a_503_with_retry_after_is_shared_and_one_without_is_not(
    mock: MockDeepMode,
) -> None:
    store = MemoryStore()
    async with client(mock, store) as first, client(mock, store) as second:
        await asyncio.gather(first.account.balance(), second.account.balance())
        mock.fail("balance", 503)  # no Retry-After: this call's failure, not a pause
        await first.account.balance()
        started = time.monotonic()
        await second.account.balance()
        assert time.monotonic() - started < PAUSE / 2
        mock.fail("balance", 503, retry_after=PAUSE)
        call = asyncio.create_task(first.account.balance())
        await eventually(lambda: count(mock, 503) == 2)
        told = time.monotonic()
        await second.account.balance()
        assert time.monotonic() - told >= PAUSE - SLACK
        await call


async def test_the_blocking_client_shares_the_pause_through_a_store_url(
    mock: MockDeepMode, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'backoff.db'}"  # absolute: sqlite:////tmp/...
    with Client(mock.api_key, base_url=mock.base_url, store=url) as blocking:
        await asyncio.to_thread(blocking.account.balance)
        async with client(mock, url) as dm:
            call = await told_to_wait(mock, dm)
            told = time.monotonic()
            await heard(blocking)
            await asyncio.to_thread(blocking.account.balance)
            assert time.monotonic() - told >= PAUSE - SLACK
            await call


async def test_another_account_on_the_same_store_is_not_held(mock: MockDeepMode) -> None:
    store = MemoryStore()
    other_key = "sk-other-account"
    async with (
        client(mock, store) as first,
        AsyncClient(other_key, base_url=mock.base_url, store=store, max_retries=0) as other,
    ):
        await first.account.balance()
        call = await told_to_wait(mock, first)
        told = time.monotonic()
        with pytest.raises(Exception, match="401"):  # the mock knows one key; it answers
            await other.account.balance()
        assert time.monotonic() - told < PAUSE / 2
        await call


@pytest.fixture
def outage_server() -> Iterator[RedisServer]:
    """A redis-server of this test's own, with a password, to stop in the middle."""
    server = RedisServer(password="s3cret-backoff-pw")
    server.start()
    yield server
    server.close()


def store_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("deepmode_async")
        and record.levelno >= logging.WARNING
        and "; retry " not in record.getMessage()  # a retry's own line, one per retry
    ]


async def test_redis_down_during_a_run_calls_go_on_with_one_warning(
    mock: MockDeepMode, outage_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deepmode_async")
    async with client(mock, outage_server.url) as dm:
        assert "s3cret" not in repr(dm._transport.backoff)
        await asyncio.gather(*(dm.account.balance() for _ in range(10)))
        outage_server.stop()
        for _ in range(3):  # pauses to announce while the store is down
            mock.fail("balance", 429, retry_after=0.05, times=2)
            results = await asyncio.gather(*(dm.account.balance() for _ in range(20)))
            assert len(results) == 20
        warnings = store_warnings(caplog)
        backoff_warnings = [line for line in warnings if "shared back-off" in line]
        assert len(backoff_warnings) == 1, warnings
        # The store's own subscription says so too, once; nothing else warns.
        assert len(warnings) <= 2, warnings
        outage_server.start()
        mock.fail("balance", 429, retry_after=0.05)
        await dm.account.balance()  # announced again: the store is back
        await eventually(lambda: "reachable again" in caplog.text, within=10)
    assert count(mock, 429) == 7
    assert "s3cret" not in caplog.text


async def test_a_store_down_from_the_start_does_not_stop_the_first_call(
    mock: MockDeepMode, closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="deepmode_async")
    started = time.monotonic()
    async with client(mock, f"redis://:pw-never-shown@127.0.0.1:{closed_port}/0") as dm:
        await asyncio.gather(*(dm.account.balance() for _ in range(5)))
    assert time.monotonic() - started < 3
    backoff_warnings = [line for line in store_warnings(caplog) if "shared back-off" in line]
    assert len(backoff_warnings) == 1
    assert "pw-never-shown" not in caplog.text


async def test_a_client_from_with_options_shares_the_pause_and_leaves_it_open(
    mock: MockDeepMode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path}/pause.db"  # opened, and so closed, by `first`
    async with client(mock, url) as first, client(mock, url) as other:
        await asyncio.gather(first.account.balance(), other.account.balance())  # listening
        async with first.with_options(max_retries=5) as derived:  # closed at the end
            await derived.account.balance()
        call = await told_to_wait(mock, first)  # the original's back-off still works
        told = time.monotonic()
        await heard(other)
        await other.account.balance()
        assert time.monotonic() - told >= PAUSE - SLACK
        await call
    assert "unreachable" not in caplog.text


async def pause_found_by_a_new_client(opener: Opener) -> float:
    """What is left of the pause a client starting now finds in the store (it is held
    by it on its first call), in seconds."""
    late = SharedBackoff(opener(), "acct", cap=60.0, owns_store=False)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(late.hold(), 0.5)  # held by what it found
        return late.until - time.time()
    finally:
        await late.aclose()


async def test_a_shorter_pause_told_meanwhile_never_cuts_a_longer_one_short(
    opener: Opener,
) -> None:
    """Two clients told to wait at once, neither having heard the other: the store
    keeps the later deadline, which a client starting afterwards is held by."""
    longer, shorter = (SharedBackoff(opener(), "acct", cap=60.0, owns_store=False) for _ in "ab")
    try:
        for backoff in (longer, shorter):
            await backoff.hold()  # listening; no pause yet
        longer.told(5.0)
        shorter.told(1.0)  # before it hears of the longer one
        await asyncio.gather(*(b._announcer for b in (longer, shorter) if b._announcer))
        assert await pause_found_by_a_new_client(opener) > 3.0
    finally:
        for backoff in (longer, shorter):
            await backoff.aclose()


async def test_a_later_deadline_from_a_clock_ahead_is_kept_until_it_ends(opener: Opener) -> None:
    """A client whose clock runs 10 s ahead wrote a deadline 10.3 s off by this clock,
    in a record that lives its 0.3 s pause: a pause told here (3 s) keeps that deadline,
    and keeps its record until then, so a client starting a second later is held."""
    store = opener()
    told = SharedBackoff(store, "acct", cap=60.0, owns_store=False)
    try:
        await told.hold()  # listening; no pause yet
        await store.put(NAMESPACE, told._key, _encode(time.time() + 10.3), ttl=0.3)
        told.told(3.0)
        if told._announcer is not None:
            await told._announcer
        await asyncio.sleep(0.6)  # the record's own 0.3 s are over
        assert await pause_found_by_a_new_client(opener) > 1.5
    finally:
        await told.aclose()
