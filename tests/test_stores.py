"""deepmode_async.stores: one contract, run over MemoryStore, SQLiteStore and RedisStore.

Real parts only: an SQLite file in tmp_path, a real redis-server (tests/_redis.py).
The Redis-only cases (outages, passwords) are in test_stores_redis.py.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepmode_async import DeepModeError, StoreError, ValidationError
from deepmode_async.callbacks import CallbackHub
from deepmode_async.stores import (
    MemoryStore,
    RedisStore,
    SQLiteStore,
    Store,
    as_store,
    open_store,
)

pytestmark = pytest.mark.anyio

WORKER = str(pathlib.Path(__file__).with_name("_store_worker.py"))
KINDS = ["memory", "sqlite", "redis"]
_UNAVAILABLE = "the callback store is unavailable; deliver again later"


def make_store(kind: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest) -> Store:
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return SQLiteStore(tmp_path / "store.db")
    return RedisStore(request.getfixturevalue("redis_url"))


@pytest.fixture(params=KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Store]:
    async with make_store(request.param, tmp_path, request) as made:
        yield made


@pytest.fixture(params=["sqlite", "redis"])
def shared_url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    """The URL of a store that other processes can open too."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    url: str = request.getfixturevalue("redis_url")
    return url


# ----------------------------------------------------------------------------- records


async def test_put_get_delete(store: Store) -> None:
    assert await store.get("ns", "k") is None
    await store.put("ns", "k", b"one")
    assert await store.get("ns", "k") == b"one"
    await store.put("ns", "k", b"two")
    assert await store.get("ns", "k") == b"two"
    assert await store.get("other", "k") is None  # namespaces are apart
    assert await store.delete("ns", "k") is True
    assert await store.delete("ns", "k") is False
    assert await store.get("ns", "k") is None


async def test_get_many_keeps_order_and_gaps(store: Store) -> None:
    for i in range(0, 1200, 2):
        await store.put("many", str(i), str(i).encode())
    keys = [str(i) for i in range(1200)]
    values = await store.get_many("many", keys)
    assert values == [str(i).encode() if i % 2 == 0 else None for i in range(1200)]
    assert await store.get_many("many", []) == []
    some = (key for key in ["0", "1", "2"])  # any iterable, read once
    assert await store.get_many("many", some) == [b"0", None, b"2"]  # type: ignore[arg-type]


async def test_put_many_writes_them_all(store: Store) -> None:
    await store.put("batch", "0", b"old")
    await store.put_many("batch", [(str(i), f"v{i}".encode()) for i in range(700)])
    values = await store.get_many("batch", [str(i) for i in range(701)])
    assert values == [f"v{i}".encode() for i in range(700)] + [None]  # "0" overwritten
    await store.put_many("batch", [])  # nothing to do, and no error
    await store.put_many("short", [("a", b"1"), ("b", b"2")], ttl=0.2)
    assert await store.get_many("short", ["a", "b"]) == [b"1", b"2"]
    await asyncio.sleep(0.3)
    assert await store.get_many("short", ["a", "b"]) == [None, None]
    with pytest.raises(ValidationError):
        await store.put_many("batch", [("k", "not bytes")])  # type: ignore[list-item]
    with pytest.raises(ValidationError):
        await store.put_many("bad:ns", [("k", b"v")])


class _PlainStore(MemoryStore):
    """A store of one's own that has no `put_many`: the interface's default serves."""

    put_many = Store.put_many


async def test_put_many_default_puts_one_by_one() -> None:
    async with _PlainStore() as store:
        await store.put_many("ns", [("a", b"1"), ("b", b"2")])
        assert await store.get_many("ns", ["a", "b"]) == [b"1", b"2"]


async def test_add_sets_only_the_first_time(store: Store) -> None:
    assert await store.add("ns", "k", b"first") is True
    assert await store.add("ns", "k", b"second") is False
    assert await store.get("ns", "k") == b"first"
    results = await asyncio.gather(*(store.add("ns", "race", bytes([i])) for i in range(20)))
    assert results.count(True) == 1
    assert await store.get("ns", "race") == bytes([results.index(True)])


async def test_replace_is_compare_and_set(store: Store) -> None:
    assert await store.replace("ns", "k", b"a", b"b") is False  # absent
    await store.put("ns", "k", b"a")
    assert await store.replace("ns", "k", b"x", b"b") is False
    assert await store.get("ns", "k") == b"a"
    assert await store.replace("ns", "k", b"a", b"b") is True
    assert await store.get("ns", "k") == b"b"
    results = await asyncio.gather(*(store.replace("ns", "k", b"b", bytes([i])) for i in range(20)))
    assert results.count(True) == 1


async def test_ttl_hides_and_then_removes(store: Store) -> None:
    await store.put("t", "short", b"v", ttl=0.3)
    await store.put("t", "long", b"v", ttl=60)
    await store.put("t", "forever", b"v")
    assert await store.get("t", "short") == b"v"
    await asyncio.sleep(0.45)
    assert await store.get("t", "short") is None
    assert await store.get_many("t", ["short", "long", "forever"]) == [None, b"v", b"v"]
    assert sorted([key async for key, _ in store.items("t")]) == ["forever", "long"]
    assert await store.replace("t", "short", b"v", b"w") is False
    assert await store.delete("t", "short") is False
    await store.put("t", "short", b"v", ttl=0.2)
    await asyncio.sleep(0.3)
    assert await store.add("t", "short", b"again") is True  # over an expired record
    assert await store.get("t", "short") == b"again"
    # A write sets the expiry afresh: ttl=None keeps the record.
    await store.put("t", "long", b"v2")
    assert await store.replace("t", "forever", b"v", b"w", ttl=0.2) is True
    await asyncio.sleep(0.3)
    assert await store.get("t", "forever") is None
    assert await store.get("t", "long") == b"v2"


async def test_a_ttl_longer_than_the_store_can_count_is_kept_as_long_as_it_can(
    store: Store,
) -> None:
    # Redis adds a ttl to its clock in 64-bit milliseconds: 1e16 s would overflow it.
    for ttl in (1e16, 1e300, sys.float_info.max, 10**300):
        await store.put("t", "put", b"v", ttl=ttl)
        assert await store.add("t", f"add-{ttl}", b"v", ttl=ttl) is True
        assert await store.replace("t", "put", b"v", b"w", ttl=ttl) is True
        await store.put_many("t", [("many", b"v")], ttl=ttl)
        assert await store.add_and_publish("t", f"ap-{ttl}", b"v", "c", ttl=ttl) is True
    assert await store.get_many("t", ["put", "many", f"add-{10**300}"]) == [b"w", b"v", b"v"]


async def test_a_hub_that_keeps_its_callbacks_for_ever_works_on_every_store(
    store: Store,
) -> None:
    hub = CallbackHub("http://127.0.0.1:9/cb", store=store, ttl=1e300)
    try:
        pending = hub.expect("upscale")
        await pending.saved()
        body = {"id": "i", "file_name": "i.png", "model_id": "m", "prompt": "p"}
        body["image_url"] = "https://blob.example.com/i.png"
        assert await hub.areceive(pending.token, json.dumps(body).encode()) == (200, "received")
        assert (await pending.wait(timeout=5)).id == "i"
    finally:
        hub.close()


async def test_items_streams_every_live_record(store: Store) -> None:
    for i in range(1234):
        await store.put("it", f"k:{i}", str(i).encode())
    await store.put("it-other", "x", b"x")
    seen = {key: value async for key, value in store.items("it")}
    assert seen == {f"k:{i}": str(i).encode() for i in range(1234)}
    assert [pair async for pair in store.items("empty")] == []


@pytest.mark.parametrize("kind", KINDS)
async def test_items_of_ten_thousand_come_page_by_page(
    kind: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest
) -> None:
    async with make_store(kind, tmp_path, request) as store:
        await asyncio.gather(
            *(
                asyncio.gather(
                    *(store.put("big", f"{i:05}", b"x" * 100) for i in range(j, j + 500))
                )
                for j in range(0, 10_000, 500)
            )
        )
        iterator = store.items("big")
        first = await anext(iterator)
        # Written after the iteration began: a store that had read everything up
        # front could not show it. (SCAN makes no promise for it, so Redis is spared.)
        await store.put("big", "zzzzz", b"late")
        rest = [pair async for pair in iterator]
        keys = [first[0]] + [key for key, _ in rest]
        expected = {f"{i:05}" for i in range(10_000)}
        if kind == "sqlite":
            assert keys == [*sorted(expected), "zzzzz"]
        else:
            assert set(keys) - {"zzzzz"} == expected
            assert len(keys) - keys.count("zzzzz") == 10_000


async def test_keys_and_namespaces_are_checked(store: Store) -> None:
    for bad_ns in ["", "a:b", 3]:
        with pytest.raises(ValidationError, match="namespace"):
            await store.get(bad_ns, "k")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="lone surrogate"):
        await store.put("ns", "\ud800", b"v")
    with pytest.raises(ValidationError, match="bytes"):
        await store.put("ns", "k", "text")  # type: ignore[arg-type]
    for bad_ttl in [0, -1, float("inf"), float("nan"), True, "60", 10**400]:
        with pytest.raises(ValidationError, match="ttl"):
            await store.put("ns", "k", b"v", ttl=bad_ttl)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="channel"):
        await store.publish("", b"m")


async def test_a_closed_store_says_so(
    tmp_path: pathlib.Path, request: pytest.FixtureRequest
) -> None:
    for kind in KINDS:
        store = make_store(kind, tmp_path, request)
        await store.put("ns", "k", b"v")
        await store.aclose()
        await store.aclose()  # idempotent
        with pytest.raises(StoreError, match="closed"):
            await store.get("ns", "k")


async def test_closing_a_store_wakes_its_subscribers_for_good(
    tmp_path: pathlib.Path, request: pytest.FixtureRequest
) -> None:
    for kind in KINDS:
        store = make_store(kind, tmp_path, request)
        async with store.subscribe("ch") as sub:
            waiting = asyncio.create_task(sub.next(None))
            await asyncio.sleep(0.05)
            await store.aclose()
            assert await asyncio.wait_for(waiting, 5) is None, kind  # a gap: look again
            with pytest.raises(StoreError, match="closed"):
                await store.get("ns", "k")  # which says why
            with pytest.raises(StoreError, match="closed"):
                await sub.next(None)  # and it never waits again


# ----------------------------------------------------------------------------- pub/sub


async def test_subscribers_get_what_is_published_after(store: Store) -> None:
    await store.publish("ch", b"before")
    async with store.subscribe("ch") as one, store.subscribe("ch") as two:
        async with store.subscribe("elsewhere") as other:
            for i in range(5):
                await store.publish("ch", b"m%d" % i)
            for sub in (one, two):
                assert [await sub.next(5) for _ in range(5)] == [b"m%d" % i for i in range(5)]
            assert await other.next(0.05) is None
        assert await one.next(0) is None
        for bad_timeout in ["1", float("nan"), True]:
            with pytest.raises(ValidationError, match="timeout"):
                await one.next(bad_timeout)  # type: ignore[arg-type]
        await store.publish("ch", b"late")
        assert await one.next(10**400) == b"late"  # beyond a float: no limit
        started = time.monotonic()
        assert await one.next(0.2) is None
        assert time.monotonic() - started >= 0.19


async def test_add_and_publish_announces_only_what_it_set(store: Store) -> None:
    async with store.subscribe("news") as sub:
        assert await store.add_and_publish("n", "k", b"first", "news", ttl=60)
        assert not await store.add_and_publish("n", "k", b"second", "news", ttl=60)
        assert await sub.next(timeout=5) == b"first"
        assert await sub.next(timeout=0.2) is None  # the second was not set, nor announced
    assert await store.get("n", "k") == b"first"
    assert await store.add_and_publish("n", "forever", b"v", "news")  # no ttl
    assert await store.get("n", "forever") == b"v"


async def test_a_subscriber_on_another_loop_and_thread_is_woken(store: Store) -> None:
    ready, got = threading.Event(), []

    async def other_loop() -> None:
        async with store.subscribe("x-loop") as sub:
            await store.put("from", "thread", b"1")  # records work on this loop too
            ready.set()
            got.append(await sub.next(10))

    thread = threading.Thread(target=asyncio.run, args=(other_loop(),))
    thread.start()
    await asyncio.to_thread(ready.wait, 10)
    await store.publish("x-loop", b"hello")
    await asyncio.to_thread(thread.join, 10)
    assert got == [b"hello"]
    assert await store.get("from", "thread") == b"1"


async def test_secret_is_32_random_bytes_made_once(store: Store) -> None:
    first = store.secret("signing")
    assert len(first) == 32
    assert store.secret("signing") == first
    assert store.secret("other") != first


async def test_secret_is_shared_by_processes(shared_url: str) -> None:
    here = open_store(shared_url)
    try:
        mine = here.secret("signing")
        theirs = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, WORKER, "secret", shared_url],
            capture_output=True,
            check=True,
            text=True,
        )
        assert bytes.fromhex(theirs.stdout.strip()) == mine
    finally:
        await here.aclose()


# ----------------------------------------------------------------------------- processes


async def test_add_is_atomic_across_processes(shared_url: str) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            WORKER,
            "add",
            shared_url,
            f"w{n}",
            "2000",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for n in range(4)
    ]
    for proc in procs:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"ready\n"
    for proc in procs:  # all at once, so they race
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
    outputs = [await proc.communicate() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0]
    won = [json.loads(out) for out, _ in outputs]
    assert sorted(key for keys in won for key in keys) == sorted(map(str, range(2000)))
    assert all(keys for keys in won), "the race was not a race: one worker won everything"
    async with open_store(shared_url) as store:
        values = await store.get_many("race", [str(i) for i in range(2000)])
    for n, keys in enumerate(won):
        assert all(values[int(key)] == f"w{n}".encode() for key in keys)


async def test_publish_wakes_a_subscriber_in_another_process(shared_url: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, WORKER, "listen", shared_url, "wake", "20", stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"ready\n"
        latencies = []
        async with open_store(shared_url) as store:
            for _ in range(20):
                await store.publish("wake", str(time.time()).encode())
                latencies.append(float(await asyncio.wait_for(proc.stdout.readline(), 10)))
        budget = 250 if shared_url.startswith("sqlite") else 50  # ms, loaded CI machine
        assert max(latencies) < budget, latencies
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


# ----------------------------------------------------------------------------- sqlite


_FORKED = """
import asyncio, os, sys
from deepmode_async.stores import SQLiteStore

store = SQLiteStore(sys.argv[1])

async def parent():
    await store.put("ns", "k", b"parent")
    async with store.subscribe("ch") as sub:  # the parent's threads all running
        await store.publish("ch", b"hello")
        assert await sub.next(5) == b"hello"

asyncio.run(parent())
pid = os.fork()
if pid == 0:
    async def child():
        await asyncio.wait_for(store.put("ns", "c", b"child"), 5)
        assert await asyncio.wait_for(store.get("ns", "k"), 5) == b"parent"
        async with store.subscribe("ch") as sub:
            await store.publish("ch", b"from the child")
            assert await sub.next(5) == b"from the child"
        assert store.secret("s") == store.secret("s")
        inherited = list(store._file._inherited)  # the parent's, never used here
        await store.aclose()
        assert inherited and all(conn.total_changes >= 0 for conn in inherited)  # still open
    try:
        asyncio.run(child())
    except BaseException as error:
        print("child:", repr(error), flush=True)
        os._exit(1)
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
assert asyncio.run(store.get("ns", "c")) == b"child"  # and the parent's store goes on
print("ok")
"""


def test_sqlite_a_store_inherited_by_a_forked_child_works_there(tmp_path: pathlib.Path) -> None:
    # A fresh interpreter: forking pytest itself (threads and all) is not the test.
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-c", _FORKED, str(tmp_path / "s.db")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ok"


async def test_sqlite_keeps_its_records_across_instances(tmp_path: pathlib.Path) -> None:
    async with SQLiteStore(tmp_path / "s.db") as first:
        await first.put("ns", "k", b"kept")
        secret = first.secret("signing")
    async with SQLiteStore(str(tmp_path / "s.db")) as again:
        assert await again.get("ns", "k") == b"kept"
        assert again.secret("signing") == secret


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("missing-dir/sub/store.db", "directory must exist"),
        (".", "the path must be a file"),
        ("/proc/deepmode-store.db", "writable"),
    ],
)
async def test_sqlite_unusable_paths_raise_store_error(
    path: str, says: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with SQLiteStore(path) as store:
        with pytest.raises(StoreError, match=says) as caught:
            await store.put("ns", "k", b"v")
        assert caught.value.__cause__ is None
        with pytest.raises(StoreError):
            store.secret("signing")


@pytest.mark.parametrize("timeout", [float("nan"), "10", -1, True, float("inf")])
def test_sqlite_a_bad_timeout_is_refused_at_once(timeout: Any, tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValidationError, match="timeout must be seconds"):
        SQLiteStore(tmp_path / "s.db", timeout=timeout)


@pytest.mark.parametrize("path", [123, b"/tmp/x.db", "", ":memory:", "a\0b"])
def test_sqlite_a_bad_path_is_refused_at_once(path: Any) -> None:
    with pytest.raises(ValidationError, match="needs the path of a file"):
        SQLiteStore(path)


async def test_sqlite_a_timeout_beyond_what_sqlite_counts_waits_as_long_as_it_can(
    tmp_path: pathlib.Path,
) -> None:
    async with SQLiteStore(tmp_path / "s.db", timeout=10**400) as store:
        await store.put("ns", "k", b"v")
        assert await store.get("ns", "k") == b"v"


async def test_sqlite_a_file_that_is_not_a_database(tmp_path: pathlib.Path) -> None:
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    async with SQLiteStore(tmp_path / "junk.db") as store:
        with pytest.raises(StoreError, match="not a usable SQLite database"):
            await store.get("ns", "k")
        with pytest.raises(StoreError, match="not a usable SQLite database"):
            await store.put("ns", "k", b"v")  # the write thread's first connection
        with pytest.raises(StoreError, match="not a usable SQLite database"):
            store.secret("signing")
        hub = CallbackHub("http://127.0.0.1:9/cb", store=store)
        with pytest.raises(StoreError, match="not a usable SQLite database"):
            hub.expect("model")
        assert await hub.areceive("A" * 43, b"{}") == (503, _UNAVAILABLE)
        hub.close()


async def test_sqlite_locked_before_its_first_connection(tmp_path: pathlib.Path) -> None:
    import sqlite3

    path = tmp_path / "locked-early.db"
    holder = sqlite3.connect(path, isolation_level=None)  # another process's long write
    holder.execute("CREATE TABLE theirs (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        async with SQLiteStore(path, timeout=0.2) as store:
            with pytest.raises(StoreError, match=r"stayed locked for more than 0\.2 s"):
                await store.get("ns", "k")
            with pytest.raises(StoreError, match=r"stayed locked for more than 0\.2 s"):
                await store.put("ns", "k", b"v")
            with pytest.raises(StoreError, match="stayed locked"):
                store.secret("signing")
    finally:
        holder.execute("ROLLBACK")
        holder.close()


async def test_sqlite_a_lock_held_too_long(tmp_path: pathlib.Path) -> None:
    import sqlite3

    path = tmp_path / "locked.db"
    async with SQLiteStore(path, timeout=0.2) as store:
        await store.put("ns", "k", b"v")
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreError, match=r"stayed locked for more than 0\.2 s"):
                await store.put("ns", "k", b"w")
            assert await store.get("ns", "k") == b"v"  # readers go on in WAL mode
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        await store.put("ns", "k", b"w")  # and it works again


# ----------------------------------------------------------------------------- urls


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("memory://", MemoryStore),
        ("sqlite:///relative/x.db", SQLiteStore),
        ("sqlite:////absolute/x.db", SQLiteStore),
        ("redis://localhost:6379/0", RedisStore),
        ("rediss://:pw@localhost:6380/1", RedisStore),
    ],
)
def test_open_store_forms(url: str, kind: type[Store]) -> None:
    store = open_store(url)
    assert type(store) is kind
    assert as_store(url).__class__ is kind
    assert as_store(store) is store
    if isinstance(store, SQLiteStore):
        expected = (
            "/absolute/x.db" if "////" in url else str(pathlib.Path("relative/x.db").absolute())
        )
        assert store.path == expected
    assert "pw" not in repr(store)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "memory",
        "sqlite://x.db",
        "sqlite:///",
        "postgres://u:hunter2@h/db",
        "redis:/x",
        "mem://",
    ],
)
def test_bad_store_urls_name_the_forms(url: str) -> None:
    with pytest.raises(ValidationError) as caught:
        open_store(url)
    assert "sqlite:////absolute/path.db" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_as_store_refuses_other_things() -> None:
    with pytest.raises(ValidationError, match="a store must be a Store or a store URL"):
        as_store(None)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="SQLiteStore needs the path of a file"):
        SQLiteStore(":memory:")
    assert issubclass(StoreError, DeepModeError)


# ----------------------------------------------------------------------------- hypothesis

KEYS = st.text(max_size=40) | st.sampled_from(["", ":", "a:b:c", "é✓中", "*?[]\\", "\x00"])
VALUES = st.binary(max_size=300)


@pytest.mark.parametrize("kind", KINDS)
def test_any_key_and_value_round_trip(
    kind: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest
) -> None:
    with asyncio.Runner() as runner:
        store = make_store(kind, tmp_path, request)

        async def check(key: str, value: bytes, other: bytes) -> None:
            assert await store.add("h", key, value) is True
            assert await store.get("h", key) == value
            assert await store.get_many("h", [key, key]) == [value, value]
            assert await store.replace("h", key, value, other) is True
            assert [pair async for pair in store.items("h")] == [(key, other)]
            async with store.subscribe(key or "-") as sub:
                await store.publish(key or "-", value)
                assert await sub.next(5) == value
            assert await store.delete("h", key) is True

        @given(KEYS, VALUES, VALUES)
        def run(key: str, value: bytes, other: bytes) -> None:
            runner.run(check(key, value, other))

        try:
            run()
        finally:
            runner.run(store.aclose())


async def test_many_loops_and_threads_at_once(store: Store) -> None:
    """Four threads, each with a loop of its own, racing `add` on the same keys."""

    async def race(worker: int) -> list[str]:
        order = [str(key) for key in range(150)]
        order = order[worker * 37 :] + order[: worker * 37]
        return [key for key in order if await store.add("loops", key, b"%d" % worker)]

    won = await asyncio.gather(
        *(asyncio.to_thread(asyncio.run, race(worker)) for worker in range(4))
    )
    assert sorted(key for keys in won for key in keys) == sorted(map(str, range(150)))
    values = await store.get_many("loops", [str(key) for key in range(150)])
    for worker, keys in enumerate(won):
        assert all(values[int(key)] == b"%d" % worker for key in keys)


class _Text(str):
    """A str subclass: the checks' fast path takes exact types only."""


_NAMES = st.one_of(
    st.text(max_size=8),
    st.text(max_size=8).map(_Text),
    st.sampled_from(["callbacks", "journal", "a:b", "", "\udc80", "é"]),
    st.integers(),
    st.none(),
)


@given(ns=_NAMES, key=_NAMES)
def test_the_fast_address_check_agrees_with_the_full_one(ns: object, key: object) -> None:
    """`check_address` takes the common case first; it must accept and refuse exactly
    what `check_ns` and `check_key` do."""
    from deepmode_async.stores._base import check_address, check_key, check_ns

    def outcome(check: Any) -> bool:
        try:
            check()
        except ValidationError:
            return False
        return True

    both = outcome(lambda: (check_ns(ns), check_key(key)))
    assert outcome(lambda: check_address(ns, key)) == both


@given(value=st.one_of(st.binary(max_size=8), st.integers(), st.floats(), st.none()))
def test_the_fast_value_and_ttl_checks_agree_with_the_full_ones(value: object) -> None:
    from deepmode_async.stores._base import check_ttl, check_value

    for check in (check_value, check_ttl):
        try:
            result: object = check(value)
        except ValidationError:
            result = ValidationError
        if isinstance(value, bytes) and check is check_value:
            assert result == value
        elif check is check_ttl and isinstance(value, float):
            ok = 0 < value < float("inf")
            assert result == (value if ok else ValidationError)


async def test_a_memory_store_rewritten_often_keeps_its_expiry_index_small() -> None:
    """Each write with a ttl indexes its expiry; rewriting the same records must not
    keep an index entry a write (they would live as long as the ttl)."""
    store = MemoryStore()

    async def rewrite(times: int) -> None:
        for round_ in range(times):
            await store.put("ns", f"key-{round_ % 10}", b"%d" % round_, ttl=3600.0)

    await rewrite(2_000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await rewrite(20_000)  # ~1.5 MiB of index entries if they were all kept
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 100_000, grown
    assert await store.get("ns", "key-9") == b"19999"
    await store.put("ns", "short", b"x", ttl=0.01)
    await asyncio.sleep(0.02)
    assert await store.get("ns", "short") is None
