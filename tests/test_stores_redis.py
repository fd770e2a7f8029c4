"""RedisStore against a real redis-server: outages, passwords, clients you made."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Iterator

import pytest
import redis.asyncio
from _redis import RedisServer, free_port

from deepmode_async import StoreError, ValidationError
from deepmode_async.callbacks import CallbackHub
from deepmode_async.stores import RedisStore, Subscription, open_store

pytestmark = pytest.mark.anyio

PASSWORD = "s3cr3t-Pa55"


@pytest.fixture(scope="module")
def locked_server() -> Iterator[RedisServer]:
    """A redis-server with `requirepass`."""
    server = RedisServer(password=PASSWORD)
    server.start()
    yield server
    server.close()


def assert_no_password(error: BaseException, *texts: str) -> None:
    seen = [str(error), repr(error), repr(error.__cause__), repr(error.__context__), *texts]
    assert not any(PASSWORD in text for text in seen), seen
    assert error.__cause__ is None


async def next_message(sub: Subscription, within: float) -> bytes:
    """The next real message (gaps skipped), failing after `within` seconds."""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        message = await sub.next(left)
        if message is not None:
            return message
    raise AssertionError("no message in time")


async def test_a_stopped_redis_raises_store_error_and_recovers(
    redis_server: RedisServer, redis_url: str
) -> None:
    async with RedisStore(redis_url) as store:
        await store.put("ns", "k", b"v")
        redis_server.stop()
        try:
            started = time.monotonic()
            for call in (
                store.get("ns", "k"),
                store.put("ns", "k", b"w"),
                store.publish("c", b"m"),
            ):
                with pytest.raises(
                    StoreError, match=r"cannot reach Redis at redis://127\.0\.0\.1"
                ) as caught:
                    await call
                assert "is redis-server running?" in str(caught.value)
                assert caught.value.__cause__ is None
            with pytest.raises(StoreError):
                async with store.subscribe("c"):
                    pass
            assert time.monotonic() - started < 5, "an outage must fail fast, not hang"
        finally:
            redis_server.start()
        # The same store, not a new one: redis-py reconnects.
        await store.put("ns", "k", b"after")
        assert await store.get("ns", "k") == b"after"
        async with store.subscribe("c") as sub:
            await store.publish("c", b"m")
            assert await sub.next(5) == b"m"


async def test_a_subscription_rides_out_a_restart(
    redis_server: RedisServer, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        RedisStore(redis_url) as store,
        RedisStore(redis_url) as other,
        store.subscribe("wake") as sub,
    ):
        await other.publish("wake", b"one")
        assert await sub.next(5) == b"one"
        redis_server.stop()
        # While Redis is down, a waiter just waits (no exception), then hears of
        # the gap once the subscription is back, and gets what is published after.
        assert await sub.next(0.3) is None
        redis_server.start()
        started = time.monotonic()
        assert await sub.next(10) is None  # the gap: re-read your state
        assert time.monotonic() - started < 5
        await other.publish("wake", b"two")
        assert await next_message(sub, 5) == b"two"
    assert any("subscriptions resume" in record.getMessage() for record in caplog.records)


async def test_a_password_never_shows(locked_server: RedisServer) -> None:
    url = locked_server.url
    assert PASSWORD in url
    async with RedisStore(url) as store:
        assert PASSWORD not in repr(store)
        await store.put("ns", "k", b"v")
        assert await store.get("ns", "k") == b"v"
        assert len(store.secret("signing")) == 32
    wrong = url.replace(PASSWORD, "not-" + PASSWORD)
    async with RedisStore(wrong) as store:
        with pytest.raises(StoreError, match="refused the credentials") as caught:
            await store.get("ns", "k")
        assert_no_password(caught.value, repr(store))
        assert "redis://:***@127.0.0.1" in str(caught.value)
    none = url.replace(f":{PASSWORD}@", "")
    async with RedisStore(none) as store:
        with pytest.raises(StoreError, match=r"requires a password|refused the credentials"):
            await store.get("ns", "k")
    refused = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    async with open_store(refused) as store:
        with pytest.raises(StoreError) as caught:
            await store.put("ns", "k", b"v")
        assert str(caught.value).startswith("cannot reach Redis at redis://:***@127.0.0.1:")
        assert "connection refused" in str(caught.value).lower()
        assert_no_password(caught.value, repr(store))
        with pytest.raises(StoreError) as caught:
            store.secret("signing")
        assert_no_password(caught.value)


async def test_a_password_in_the_query_string_works_and_never_shows(
    locked_server: RedisServer,
) -> None:
    url = f"redis://127.0.0.1:{locked_server.port}/0?password={PASSWORD}"
    async with RedisStore(url) as store:
        assert PASSWORD not in repr(store)
        assert "password=***" in repr(store)
        await store.put("ns", "k", b"v")
    with pytest.raises(ValidationError, match="unexpected keyword argument 'Password'") as bad:
        RedisStore(f"{url}&Password={PASSWORD}")  # not a setting redis-py takes
    assert_no_password(bad.value)
    refused = f"redis://127.0.0.1:{free_port()}/0?password={PASSWORD}&db=0"
    async with RedisStore(refused) as store:
        with pytest.raises(StoreError) as caught:
            await store.get("ns", "k")
        assert_no_password(caught.value, repr(store))
        hub = CallbackHub("http://127.0.0.1:9/cb", store=store)
        assert PASSWORD not in repr(hub)


@pytest.mark.parametrize("odd", ["/", "?", "#", "["])
def test_a_url_whose_unescaped_password_breaks_parsing_never_shows_it(odd: str) -> None:
    secret = f"s3cr{odd}{PASSWORD}"
    with pytest.raises(ValidationError, match="not a Redis URL") as caught:
        open_store(f"redis://default:{secret}@localhost:6379/0")
    assert_no_password(caught.value)
    assert "s3cr" not in str(caught.value)
    assert "redis://default:***@localhost:6379/0" in str(caught.value)


@pytest.mark.parametrize(
    "query", [f"pass%77ord={PASSWORD}", f"PASSWORD={PASSWORD}", f"db=0;password=x#{PASSWORD}"]
)
def test_a_query_password_however_spelled_never_shows(query: str) -> None:
    try:
        shown = repr(open_store(f"redis://localhost:6379/0?{query}"))
    except ValidationError as error:  # a spelling redis-py does not take: said at once
        shown = str(error)
    assert PASSWORD not in shown
    assert "=***" in shown


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://localhost/0?protocol=7", "protocol must be either 2 or 3"),
        ("rediss://localhost/0?ssl_cert_reqs=bogus", "Invalid SSL Certificate"),
        ("redis://localhost/0?connection_class=x", "not callable"),
    ],
)
def test_a_setting_redis_py_refuses_is_a_validation_error_at_once(url: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        RedisStore(url)


def test_a_password_with_an_at_sign_never_shows() -> None:
    store = open_store(f"redis://default:s3cr@{PASSWORD}@localhost:6379/0")
    assert repr(store) == "RedisStore('redis://default:***@localhost:6379/0', prefix='deepmode:')"


async def test_no_password_in_the_logs_of_an_outage(
    locked_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with RedisStore(locked_server.url) as store, store.subscribe("c") as sub:
        locked_server.stop()
        assert await sub.next(0.5) is None
        locked_server.start()
        assert await sub.next(10) is None
    assert caplog.records, "the outage was not logged"
    assert not any(PASSWORD in record.getMessage() for record in caplog.records)


async def test_a_client_you_made_gives_its_settings(locked_server: RedisServer) -> None:
    mine = redis.asyncio.Redis(host="127.0.0.1", port=locked_server.port, password=PASSWORD)
    try:
        store = RedisStore(mine, prefix="app1:")
        assert PASSWORD not in repr(store)
        assert "redis://:***@127.0.0.1" in repr(store)
        async with store:
            await store.put("ns", "k", b"v")
            assert await mine.get("app1:ns:k") == b"v"  # the documented key layout
            # Usable from another loop too (the store makes a client per loop).
            assert await asyncio.to_thread(asyncio.run, store.get("ns", "k")) == b"v"
        assert await mine.ping()  # yours, and still open
    finally:
        await mine.aclose()


async def test_prefixes_keep_stores_apart(redis_url: str) -> None:
    async with RedisStore(redis_url, prefix="a:") as a, RedisStore(redis_url, prefix="b:") as b:
        await a.put("ns", "k", b"a")
        assert await b.get("ns", "k") is None
        assert [pair async for pair in b.items("ns")] == []
        # Glob characters in a namespace are matched literally by items().
        await a.put("n*", "k", b"star")
        assert [pair async for pair in a.items("ns")] == [("k", b"a")]
        assert a.secret("s") != b.secret("s")


def test_bad_redis_urls_and_arguments() -> None:
    with pytest.raises(ValidationError, match="not a Redis URL") as caught:
        RedisStore(f"http://:{PASSWORD}@host/0")
    assert PASSWORD not in str(caught.value)
    with pytest.raises(ValidationError, match=r"a redis:// URL or a redis\.asyncio\.Redis"):
        RedisStore(42)  # type: ignore[arg-type]


def test_without_the_redis_package(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in sys.modules if name == "redis" or name.startswith("redis.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(StoreError, match=r"pip install 'deepmode-async\[redis\]'"):
        RedisStore("redis://localhost:6379/0")
    with pytest.raises(StoreError, match="needs the redis package"):
        open_store("redis://localhost:6379/0")


def test_ended_loops_leave_nothing_behind(redis_url: str) -> None:
    store = RedisStore(redis_url)
    for i in range(5):
        asyncio.run(store.put("ns", str(i), b"v"))
    assert asyncio.run(store.get_many("ns", [str(i) for i in range(5)])) == [b"v"] * 5
    assert len(store._loops) == 1  # the clients of the loops that ended were closed, dropped
    asyncio.run(store.aclose())
