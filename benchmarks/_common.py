"""What every benchmark shares: the mock in its own process (`served`), a trained model, CPU and
memory readings, and benchmarks/results.json."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from deepmode_async.testing import MockProcess, mock_process, sample_image

RESULTS = pathlib.Path(__file__).with_name("results.json")
#: One way of making a benchmark's calls: `run(tag)` returns (wall seconds, answers ok).
Run = Callable[[str], Awaitable[tuple[float, int]]]


async def cpu_per_call(
    ways: Mapping[str, Run],
    rounds: int,
    calls: int,
    *,
    pause: float = 0.0,
    walls: dict[str, float] | None = None,
) -> dict[str, float]:
    """Each way run in turn, a round unmeasured then `rounds` measured (after `pause`
    seconds each time): the median CPU a call of each (`time.process_time()`, all
    threads), in microseconds; into `walls`, if given, each way's median wall time in
    seconds. A way with an answer not ok raises."""
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    wall: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in ["warm", *map(str, range(rounds))]:
        for name, run in ways.items():
            if pause:
                await asyncio.sleep(pause)
            gc.collect()
            started = time.process_time()
            seconds, ok = await run(f"{round_}-{name}")
            spent = time.process_time() - started
            if ok != calls:
                raise RuntimeError(f"{name}: {ok} of {calls} calls succeeded")
            if round_ != "warm":
                cpu[name].append(spent)
                wall[name].append(seconds)
    if walls is not None:
        walls.update({name: statistics.median(runs) for name, runs in wall.items()})
    return {name: statistics.median(runs) / calls * 1e6 for name, runs in cpu.items()}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib() -> float:
    """This process's resident memory now, in MiB (Linux /proc)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def machine() -> str:
    """The machine a result was measured on, for the tables."""
    return (
        f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
        f"aiohttp {aiohttp.__version__}"
    )


def served(latency: float, **options: Any) -> MockProcess:
    """`mock_process()` with enough credits for any benchmark and `latency` per call;
    `options` are more of its options (`image_size=...`)."""
    return mock_process(latency=latency, balance=10**9, **options)


async def trained_model(api: aiohttp.ClientSession, base_url: str) -> str:
    """Train a model with raw aiohttp and return the id its training callback brings."""
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


def store(key: str, value: Any) -> None:
    """Put one benchmark's results into results.json, keeping the others'."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[key] = value
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
