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
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web

from deepmode_async.testing import sample_image

CALLS, IN_FLIGHT, ROUNDS = 1000, 100, 5
RESULTS = pathlib.Path(__file__).with_name("results.json")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@asynccontextmanager
async def mock_process(latency: float) -> AsyncIterator[tuple[str, str, int]]:
    """A mock in a separate interpreter; yields its base URL, key and pid."""
    command = [sys.executable, "-m", "deepmode_async.testing", "--latency", str(latency)]
    command += ["--balance", str(10**9)]  # benchmarks make many paid calls
    process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    settings: dict[str, str] = {}
    try:
        while len(settings) < 2:
            line = await process.stdout.readline()
            if not line:
                raise RuntimeError(f"the mock exited with {await process.wait()} before serving")
            key, _, value = line.decode().strip().partition("=")
            settings[key] = value
        yield settings["DEEPMODE_BASE_URL"], settings["DEEPMODE_API_KEY"], process.pid
    finally:
        process.terminate()
        await process.wait()


async def trained_model(api: aiohttp.ClientSession, base_url: str) -> str:
    """Train a model and return the id its training callback brings."""
    arrived: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_callback(request: web.Request) -> web.Response:
        arrived.set_result((await request.json())["id"])
        return web.Response()

    app = web.Application()
    app.router.add_post("/cb", on_callback)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    form = aiohttp.FormData({"gender": "man", "model_type": "professional"})
    form.add_field("callback", f"http://127.0.0.1:{runner.addresses[0][1]}/cb")
    form.add_field("images", sample_image(), filename="me.jpg")
    async with api.post(f"{base_url}/api/models", data=form) as response:
        response.raise_for_status()
    model_id = await asyncio.wait_for(arrived, 10)
    await runner.cleanup()
    return model_id


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
    async with mock_process(latency) as (base_url, key, pid):
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
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["mock_throughput"] = rows
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
