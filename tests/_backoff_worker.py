"""A worker process of the shared back-off's cross-process test:

    python tests/_backoff_worker.py BASE_URL API_KEY STORE_URL|- SECONDS CONCURRENCY

makes one call (so its client listens), prints "ready", and on a line in makes balance
calls, CONCURRENCY at a time, for SECONDS; then prints the JSON count of its calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

from deepmode_async import AsyncClient, RateLimitError, RetryPolicy


async def work(base_url: str, key: str, store: str, seconds: float, concurrency: int) -> None:
    calls = refused = 0
    async with AsyncClient(
        key, base_url=base_url, store=None if store == "-" else store, max_retries=RetryPolicy(5)
    ) as dm:
        await dm.account.balance()
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        end = time.monotonic() + seconds

        async def one_at_a_time() -> None:
            nonlocal calls, refused
            while time.monotonic() < end:
                try:
                    await dm.account.balance()
                except RateLimitError:
                    refused += 1
                calls += 1

        await asyncio.gather(*(one_at_a_time() for _ in range(concurrency)))
    print(json.dumps({"calls": calls, "refused": refused}), flush=True)


if __name__ == "__main__":
    logging.getLogger("deepmode_async").setLevel(logging.ERROR)  # a warning per retry
    base_url, key, store, seconds, concurrency = sys.argv[1:]
    asyncio.run(work(base_url, key, store, float(seconds), int(concurrency)))
