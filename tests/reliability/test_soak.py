"""Soak: 20 000 generate calls through one `AsyncClient`, in batches, with faults.

The mock runs in a child process, so that this process's memory and file descriptors are
the client's alone (the mock keeps every image and charge it made). It deals 5% 429s, 1%
503s (both with a short `Retry-After`) and 1% connections dropped after processing.
After a warm-up batch the client's RSS and open descriptors are taken; after the last
batch they must be where they were, within a small bound:

- RSS within 10 MiB. What a call leaves behind, if anything, would be its result (a
  `Generation`, about 1 KiB with its strings) or a request/response pair (a few KiB): a
  leak of one of those per call is 20 MiB or more over 19 000 calls, well over the bound,
  while the allocator's own slack and the interpreter's caches stay well under it.
- Open descriptors within the connection pool: each batch keeps at most `CONCURRENCY`
  calls in flight, so at most that many idle keep-alive connections (one descriptor
  each) may remain pooled at either moment; and once the client is closed, exactly as
  many descriptors are open as before it was made.

Run with `-s` to see the numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import attrs
import pytest
from _support import open_fds
from conftest import FAST, eventually

from deepmode_async import AsyncClient, RetryPolicy
from deepmode_async._errors import APIConnectionError
from deepmode_async.batch import GenerateRequest

pytestmark = pytest.mark.anyio

BATCHES = 20
BATCH_SIZE = 1000
CONCURRENCY = 32
RSS_BOUND_KIB = 10 * 1024
MAX_RETRIES = 10  # 429/503 at 6%: running out of retries takes 11 in a row (~1e-13)

# The child: a mock with chaos, its settings on one line, serving until stdin closes, and
# then what it charged on another line.
MOCK_SCRIPT = """
import asyncio, json, sys
from deepmode_async.testing import MockDeepMode

async def main():
    async with MockDeepMode(balance=10**9, max_recorded_requests=10) as mock:
        model = mock.add_model()
        mock.chaos(rate_limited=0.05, unavailable=0.01, dropped=0.01, retry_after=0.001, seed=7)
        settings = {"base_url": mock.base_url, "api_key": mock.api_key, "model_id": model.id}
        print(json.dumps(settings), flush=True)
        await asyncio.to_thread(sys.stdin.read)  # until the test closes it
        print(json.dumps({"charges": len(mock.ledger)}), flush=True)

asyncio.run(main())
"""


@attrs.frozen
class Served:
    base_url: str
    api_key: str
    model_id: str
    process: asyncio.subprocess.Process


@contextlib.asynccontextmanager
async def mock_in_a_child() -> AsyncIterator[Served]:
    # Not measured by coverage even under `coverage run`: the child's speed is not what
    # is tested, and the mock's code is covered by its own tests.
    env = {name: value for name, value in os.environ.items() if not name.startswith("COVERAGE")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        MOCK_SCRIPT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line, f"the mock exited with {await process.wait()} before serving"
        settings = json.loads(line)
        yield Served(settings["base_url"], settings["api_key"], settings["model_id"], process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def stop(served: Served) -> dict[str, Any]:
    """Close the child's stdin, and read what it says it charged."""
    assert served.process.stdin is not None
    assert served.process.stdout is not None
    served.process.stdin.close()
    out, _ = await asyncio.wait_for(served.process.communicate(), 30)
    assert await served.process.wait() == 0
    stats: dict[str, Any] = json.loads(out)
    return stats


def rss_kib() -> int:
    """This process's resident set size, in KiB."""
    gc.collect()
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


class Counter(logging.Handler):
    """Counts the client's retry warnings without keeping them (pytest's capture would)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "; retry " in record.getMessage():
            self.retries += 1


@contextlib.contextmanager
def counting_retries() -> Iterator[Counter]:
    logger = logging.getLogger("deepmode_async")
    counter = Counter()
    logger.addHandler(counter)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield counter
    finally:
        logger.propagate = propagate
        logger.removeHandler(counter)


@attrs.define
class Outcomes:
    ok: int = 0
    dropped: int = 0  # APIConnectionError: a drop after processing, never retried
    other: list[str] = attrs.Factory(list)


async def run_batch(dm: AsyncClient, model_id: str, batch: int, outcomes: Outcomes) -> None:
    requests = (
        GenerateRequest(model_id=model_id, prompt=f"soak {batch} {i}") for i in range(BATCH_SIZE)
    )
    seen = 0
    async for result in dm.images.generate_many(requests, concurrency=CONCURRENCY):
        seen += 1
        if result.ok:
            outcomes.ok += 1
        elif type(result.error) is APIConnectionError:
            outcomes.dropped += 1
        else:
            outcomes.other.append(repr(result.error))
    assert seen == BATCH_SIZE


async def test_20000_calls_leave_memory_and_descriptors_where_they_were() -> None:
    started = time.monotonic()
    outcomes = Outcomes()
    async with mock_in_a_child() as served:
        fds_before_client = open_fds()
        with counting_retries() as counter:
            retries = RetryPolicy(max_retries=MAX_RETRIES, backoff_base=FAST)
            dm = AsyncClient(served.api_key, base_url=served.base_url, max_retries=retries)
            async with dm:
                await run_batch(dm, served.model_id, 0, outcomes)  # warm-up
                rss_start, fds_start = rss_kib(), open_fds()
                for batch in range(1, BATCHES):
                    await run_batch(dm, served.model_id, batch, outcomes)
                rss_end, fds_end = rss_kib(), open_fds()
        await eventually(lambda: open_fds() == fds_before_client)
        stats = await stop(served)
    elapsed = time.monotonic() - started

    calls = BATCHES * BATCH_SIZE
    numbers = (
        f"{calls} calls in {elapsed:.1f} s: {outcomes.ok} ok, {outcomes.dropped} dropped after "
        f"processing, {counter.retries} retries; RSS {rss_start} -> {rss_end} KiB "
        f"({rss_end - rss_start:+d}), open fds {fds_start} -> {fds_end} "
        f"({fds_before_client} without the client)"
    )
    print(f"\nsoak: {numbers}")
    assert outcomes.other == [], numbers
    assert outcomes.ok + outcomes.dropped == calls, numbers
    assert stats["charges"] == calls, numbers  # every call acted on once: ok or dropped after
    assert 0 < outcomes.dropped < calls // 50, numbers  # 1% dealt
    assert counter.retries > calls // 25, numbers  # 6% dealt, all retried
    assert rss_end - rss_start < RSS_BOUND_KIB, numbers
    assert abs(fds_end - fds_start) <= CONCURRENCY, numbers
