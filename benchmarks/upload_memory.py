"""B2 (first cut): memory and speed of training a model from 30 x 20 MB photos.

The mock runs in its own process. Contenders, alternating, several rounds each:
- `sdk`: `dm.models.create(images=[paths])`, which streams each file from disk;
- `raw`: aiohttp `FormData` with open file objects (aiohttp streams them too);
- `bytes`: the files read into memory first, then `dm.models.create(images=[bytes])`,
  which is what SDKs that accept only bytes make their users do.
Reports median seconds and MB/s, and, in a separate traced run each, the tracemalloc
peak and the growth of the process's resident memory. Writes "upload_memory" into
benchmarks/results.json.
"""

from __future__ import annotations

import asyncio
import gc
import os
import pathlib
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable

import aiohttp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import served, store

from deepmode_async import AsyncClient
from deepmode_async.testing import sample_image

FILES, FILE_MB, ROUNDS = 30, 20, 7  # 3 rounds gave 0.8-1.3 x for the same code


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc)."""
    pages = int(pathlib.Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def write_photos(directory: pathlib.Path) -> list[pathlib.Path]:
    head = sample_image("jpeg")
    padding = os.urandom(1024 * 1024)
    paths = []
    for index in range(FILES):
        path = directory / f"photo-{index:02}.jpg"
        with path.open("wb") as file:
            file.write(head)
            for _ in range(FILE_MB):
                file.write(padding)
        paths.append(path)
    return paths


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_photos(pathlib.Path(tmp))
        total_mb = sum(path.stat().st_size for path in paths) / 1e6
        async with served(0.0) as mock:
            base_url, api_key = mock.base_url, mock.api_key
            dm = AsyncClient(api_key, base_url=base_url)
            raw = aiohttp.ClientSession(headers={"Authorization": f"Bearer {api_key}"})

            async def sdk() -> None:
                await dm.models.create(images=paths, gender="woman", model_type="amateur")

            async def raw_formdata() -> None:
                form = aiohttp.FormData({"gender": "woman", "model_type": "amateur"})
                for path in paths:
                    form.add_field("images", path.open("rb"), filename=path.name)
                async with raw.post(f"{base_url}/api/models", data=form) as response:
                    response.raise_for_status()

            async def read_first() -> None:
                data = [path.read_bytes() for path in paths]
                await dm.models.create(images=data, gender="woman", model_type="amateur")

            contenders: dict[str, Callable[[], Awaitable[None]]] = {
                "sdk": sdk,
                "raw": raw_formdata,
                "bytes": read_first,
            }
            await sdk()  # warm up: connections, thread pool, page cache
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for _ in range(ROUNDS):
                for name, run in contenders.items():
                    started = time.perf_counter()
                    await run()
                    times[name].append(time.perf_counter() - started)
            memory: dict[str, dict[str, float]] = {}
            for name, run in contenders.items():
                gc.collect()
                rss_before = rss_bytes()
                tracemalloc.start()
                await run()
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                memory[name] = {
                    "tracemalloc_peak_mib": peak / 2**20,
                    "rss_growth_mib": (rss_bytes() - rss_before) / 2**20,
                }
            await raw.close()
            await dm.aclose()

    results = {}
    print(f"models.create with {FILES} x {FILE_MB} MB ({total_mb:.0f} MB), median of {ROUNDS}")
    print("| contender | seconds | MB/s | vs raw | tracemalloc peak | RSS growth |")
    print("|---|---|---|---|---|---|")
    raw_median = statistics.median(times["raw"])
    for name in contenders:
        median = statistics.median(times[name])
        results[name] = {
            "median_s": median,
            "runs_s": [round(seconds, 4) for seconds in times[name]],
            "mb_per_s": total_mb / median,
            **memory[name],
        }
        print(
            f"| {name} | {median:.3f} | {total_mb / median:.0f} | {raw_median / median:.2f} x "
            f"| {memory[name]['tracemalloc_peak_mib']:.1f} MiB "
            f"| {memory[name]['rss_growth_mib']:.1f} MiB |"
        )
    store(
        "upload_memory",
        {"files": FILES, "file_mb": FILE_MB, "rounds": ROUNDS, "results": results},
    )


if __name__ == "__main__":
    asyncio.run(main())
