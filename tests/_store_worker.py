"""A separate process using a store, for the cross-process tests and benchmarks/stores.py.

    python tests/_store_worker.py add URL WORKER KEYS         -> "ready"; on a line in,
                                                                 adds KEYS keys, then
                                                                 the JSON list it won
    python tests/_store_worker.py listen URL CHANNEL COUNT    -> "ready", then one line
                                                                 per message: its
                                                                 latency in ms
    python tests/_store_worker.py secret URL                  -> the secret, hex

`listen` messages carry the sender's `time.time()`; the latency is measured on arrival.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

from deepmode_async.stores import open_store


async def add(url: str, worker: str, keys: int) -> None:
    async with open_store(url) as store:
        await store.get("race", "warm-up")  # connected before the start
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        order = [str(key) for key in range(keys)]
        random.Random(worker).shuffle(order)  # each its own order: they meet on every key
        won = [key for key in order if await store.add("race", key, worker.encode())]
    print(json.dumps(won), flush=True)


async def listen(url: str, channel: str, count: int) -> None:
    async with open_store(url) as store, store.subscribe(channel) as sub:
        print("ready", flush=True)
        received = 0
        while received < count:
            message = await sub.next(30)
            if message is None:
                continue
            print(f"{(time.time() - float(message)) * 1000:.3f}", flush=True)
            received += 1


def main() -> None:
    command, url, *rest = sys.argv[1:]
    if command == "add":
        asyncio.run(add(url, rest[0], int(rest[1])))
    elif command == "listen":
        asyncio.run(listen(url, rest[0], int(rest[1])))
    elif command == "secret":
        print(open_store(url).secret("signing").hex(), flush=True)
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main()
