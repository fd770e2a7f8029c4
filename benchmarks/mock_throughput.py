"""Can the mock serve the benchmarks without becoming their bottleneck?

Starts `python -m deepmode_async.testing` in its own process, trains a model through
the API (the id arrives by callback, as in real life), then drives 1000 `generate`
calls at 100 in flight with raw aiohttp: with 50 ms of server latency (B1's setting,
whose ideal is 1000 / 100 x 50 ms = 0.5 s) and with none (the mock's raw capacity).
Each scenario runs several times; medians are reported, and written to
benchmarks/results.json under "mock_throughput".
"""

from __future__ import annotations

import asyncio
import pathlib
import statistics
import sys
import time
from typing import Any

import aiohttp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import cpu_seconds, served, store, trained_model

CALLS, IN_FLIGHT, ROUNDS = 1000, 100, 5


async def batch(api: aiohttp.ClientSession, base_url: str, model_id: str) -> float:
    """Seconds for CALLS generate calls with at most IN_FLIGHT open at once."""
    slots = asyncio.Semaphore(IN_FLIGHT)
    body = {"model_id": model_id, "prompt": "a benchmark"}

    async def one() -> None:
        async with slots, api.post(f"{base_url}/api/images/generate", json=body) as response:
            response.raise_for_status()
            await response.read()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(CALLS)))
    return time.perf_counter() - started


async def scenario(latency: float) -> dict[str, Any]:
    async with served(latency) as mock:
        base_url, key, pid = mock.base_url, mock.api_key, mock.pid
        connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
        headers = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession(connector=connector, headers=headers) as api:
            model_id = await trained_model(api, base_url)
            await batch(api, base_url, model_id)  # warm-up: connections, caches
            server_cpu, client_cpu = cpu_seconds(pid), time.process_time()
            times = [await batch(api, base_url, model_id) for _ in range(ROUNDS)]
            server_cpu = cpu_seconds(pid) - server_cpu
            client_cpu = time.process_time() - client_cpu
    median = statistics.median(times)
    ideal = CALLS / IN_FLIGHT * latency
    return {
        "latency_s": latency,
        "median_s": round(median, 4),
        "runs_s": [round(t, 4) for t in times],
        "calls_per_s": round(CALLS / median),
        "ideal_s": ideal,
        "ratio_to_ideal": round(median / ideal, 3) if ideal else None,
        "server_cpu_us_per_call": round(server_cpu / (CALLS * ROUNDS) * 1e6),
        "client_cpu_us_per_call": round(client_cpu / (CALLS * ROUNDS) * 1e6),
    }


async def main() -> None:
    rows = [await scenario(0.05), await scenario(0.0)]
    print(f"mock throughput: {CALLS} generate calls, {IN_FLIGHT} in flight, raw aiohttp client")
    print("| server latency | median | calls/s | ideal | ratio to ideal | mock CPU | client CPU |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['ratio_to_ideal']:.2f} x" if row["ratio_to_ideal"] else "-"
        print(
            f"| {row['latency_s'] * 1000:.0f} ms | {row['median_s']:.3f} s | {row['calls_per_s']} "
            f"| {row['ideal_s']:.2f} s | {ratio} | {row['server_cpu_us_per_call']} us "
            f"| {row['client_cpu_us_per_call']} us |"
        )
    store("mock_throughput", rows)


if __name__ == "__main__":
    asyncio.run(main())
