"""B3: downloading 64 images of 5 MiB each (320 MiB), 16 in flight.

The mock runs in its own process (`--image-size 5242880`); 8 `images.generate` calls of 8
images each (through `AsyncClient`) make the 64 images, whose signed `image_url`s every
contender fetches from the mock's image host (no Authorization header: that host refuses
it). Contenders, each writing every image to a file in a fresh temporary directory:
- `images.download`: `AsyncClient.images.download(images, dir, concurrency=16)`;
- `raw aiohttp`: one `ClientSession` (`TCPConnector(limit=16)`) and a semaphore of 16,
  `response.content.iter_chunked(256 KiB)` written with a plain `file.write` in the loop
  to a file named by the image id: the fastest simple raw way found (`--raw-variants` also
  times the same with each write offloaded by `asyncio.to_thread`: slower here, about
  0.8 x, as writes into the page cache are quick and each hop to a thread and back costs
  more than it saves, which is why the SDK, too, writes on the loop while writes are fast);
- `curl --parallel`: one `curl --parallel --parallel-max 16 --config FILE -s -S --fail`
  process (and `--globoff`, `--no-progress-meter`: curl 7.88 draws its
  parallel meter despite `-s`), FILE holding a `url = ...` / `output = ...` pair per image
  (only where curl is installed).
Each contender is warmed up once, then every round runs them all in turn. The URLs are
checked to stay valid for the whole benchmark (the mock signs them for an hour) and would
be refreshed through `images.retrieve` otherwise; writing the curl config, making and
deleting the directories are outside the timed part. After each run every file must be
there with exactly 5 MiB. Reported: the median wall time, MB/s (10^6 bytes), the ratio to
raw aiohttp's throughput (target for `images.download`: >= 0.9) and the client CPU time
per run (`time.process_time()` of this process, all threads; for curl the CPU of the
child from `getrusage(RUSAGE_CHILDREN)`; the mock's CPU is in neither). Writes "download"
into benchmarks/results.json (not with `--quick`: 16 images, 2 rounds). `--profile` (or
a missed target) runs `images.download` once more under cProfile and prints the top (the
event-loop thread only: the writes in worker threads show only in the CPU time).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime as dt
import gc
import pathlib
import pstats
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
from yarl import URL

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import machine, served, store, trained_model

from deepmode_async import AsyncClient, Image

IMAGE_BYTES, IN_FLIGHT, PER_CALL = 5 * 1024 * 1024, 16, 8
RAW_CHUNK = 256 * 1024
VALID_FOR = dt.timedelta(minutes=5)  # a URL must stay valid this long: far beyond a run
TARGET = 0.9  # images.download throughput / raw aiohttp throughput

Run = Callable[[list[Image], pathlib.Path], Awaitable[None]]


class Contender:
    """One way of downloading; `run(images, directory)` fetches them all into `directory`."""

    def __init__(self, name: str, run: Run, child_cpu: bool = False) -> None:
        self.name, self.run, self.child_cpu = name, run, child_cpu
        self.times: list[float] = []
        self.cpu: list[float] = []


def cpu_now(child: bool) -> float:
    """This process's CPU seconds, or those of its waited-for children (curl)."""
    if not child:
        return time.process_time()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def raw_aiohttp(
    session: aiohttp.ClientSession,
    images: list[Image],
    dest: pathlib.Path,
    *,
    offload: bool = False,
) -> None:
    """Stream each image to its file; with `offload`, every write goes through
    `asyncio.to_thread` (the alternative timed by `--raw-variants`)."""
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def one(image: Image) -> None:
        # encoded=True: the signed query goes byte for byte, as a re-encoded one gets a 403
        async with slots, session.get(URL(image.image_url, encoded=True)) as response:
            response.raise_for_status()
            with (dest / f"{image.id}.jpeg").open("wb") as file:
                async for chunk in response.content.iter_chunked(RAW_CHUNK):
                    if offload:
                        await asyncio.to_thread(file.write, chunk)
                    else:
                        file.write(chunk)

    await asyncio.gather(*(one(image) for image in images))


async def curl_parallel(images: list[Image], dest: pathlib.Path) -> None:
    config = dest / "curl.config"  # written before the timer starts: see `timed`
    process = await asyncio.create_subprocess_exec(
        "curl", "--parallel", "--parallel-max", str(IN_FLIGHT), "--config", str(config),
        "-s", "-S", "--fail", "--globoff", "--no-progress-meter",
    )  # fmt: skip
    if await process.wait() != 0:
        raise RuntimeError(f"curl exited with {process.returncode}")


def write_curl_config(images: list[Image], dest: pathlib.Path) -> None:
    lines = []
    for image in images:
        lines.append(f'url = "{image.image_url}"')
        lines.append(f'output = "{dest / f"{image.id}.jpeg"}"')
    (dest / "curl.config").write_text("\n".join(lines) + "\n")


def check_files(name: str, dest: pathlib.Path, count: int) -> None:
    files = [path for path in dest.iterdir() if path.name != "curl.config"]
    sizes = sorted({path.stat().st_size for path in files})
    if len(files) != count or sizes != [IMAGE_BYTES]:
        raise RuntimeError(f"{name}: {len(files)} files of sizes {sizes}, not {count} x 5 MiB")


def expiry(url: str) -> dt.datetime:
    """When a signed URL expires: its `se=` (Azure SAS) time."""
    [value] = parse_qs(urlsplit(url).query)["se"]
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


async def valid_urls(dm: AsyncClient, images: list[Image]) -> list[Image]:
    """`images`, each re-signed through `images.retrieve` if it expires within VALID_FOR."""
    soon = dt.datetime.now(dt.UTC) + VALID_FOR
    return [
        image if expiry(image.image_url) > soon else await dm.images.retrieve(image.id)
        for image in images
    ]


async def make_images(dm: AsyncClient, model_id: str, count: int) -> list[Image]:
    generations = await asyncio.gather(
        *(
            dm.images.generate(
                model_id=model_id, prompt=f"a lighthouse {call}", num_images=PER_CALL
            )
            for call in range(count // PER_CALL)
        )
    )
    images = [image for generation in generations for image in generation.images]
    if len(images) != count:
        raise RuntimeError(f"generated {len(images)} images, not {count}")
    return images


async def timed(
    contender: Contender,
    images: list[Image],
    scratch: pathlib.Path,
    profiler: cProfile.Profile | None = None,
) -> float:
    """One run into a fresh directory, checked and deleted; returns wall seconds."""
    dest = pathlib.Path(tempfile.mkdtemp(dir=scratch))
    try:
        if contender.name == "curl --parallel":
            write_curl_config(images, dest)
        gc.collect()
        cpu = cpu_now(contender.child_cpu)
        started = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        await contender.run(images, dest)
        if profiler is not None:
            profiler.disable()
        seconds = time.perf_counter() - started
        contender.cpu.append(cpu_now(contender.child_cpu) - cpu)
        check_files(contender.name, dest, len(images))
        return seconds
    finally:
        shutil.rmtree(dest)


async def measure(
    count: int, rounds: int, profile: bool, raw_variants: bool
) -> tuple[list[Contender], pstats.Stats | None]:
    async with served(0.0, image_size=IMAGE_BYTES) as mock:
        base_url, api_key = mock.base_url, mock.api_key
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {api_key}"}) as api:
            model_id = await trained_model(api, base_url)
        connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
        async with (
            AsyncClient(api_key, base_url=base_url) as dm,
            aiohttp.ClientSession(connector=connector) as session,  # no key: the blob host
        ):
            images = await make_images(dm, model_id, count)
            left = min(expiry(image.image_url) for image in images) - dt.datetime.now(dt.UTC)
            print(f"image URLs valid for {left.total_seconds():.0f} s more (mock default)")
            images = await valid_urls(dm, images)  # a no-op unless the mock signs for < 5 min

            async def sdk(images: list[Image], dest: pathlib.Path) -> None:
                paths = await dm.images.download(images, dest, concurrency=IN_FLIGHT)
                if len(paths) != len(images):
                    raise RuntimeError(f"images.download returned {len(paths)} paths")

            contenders = [
                Contender("images.download", sdk),
                Contender("raw aiohttp", lambda i, d: raw_aiohttp(session, i, d)),
            ]
            if raw_variants:
                contenders.append(
                    Contender(
                        "raw aiohttp, to_thread writes",
                        lambda i, d: raw_aiohttp(session, i, d, offload=True),
                    )
                )
            if shutil.which("curl"):
                contenders.append(Contender("curl --parallel", curl_parallel, child_cpu=True))
            with tempfile.TemporaryDirectory(prefix="deepmode-b3-") as scratch:
                for contender in contenders:  # warm up: connections, threads, caches
                    await timed(contender, images, pathlib.Path(scratch))
                    contender.cpu.clear()
                for _ in range(rounds):
                    images = await valid_urls(dm, images)  # outside the timing
                    for contender in contenders:
                        contender.times.append(
                            await timed(contender, images, pathlib.Path(scratch))
                        )
                stats = None
                ours, raw = (statistics.median(c.times) for c in contenders[:2])
                if profile or raw / ours < TARGET:
                    stats = await profiled(contenders[0], images, pathlib.Path(scratch))
    return contenders, stats


async def profiled(
    contender: Contender, images: list[Image], scratch: pathlib.Path
) -> pstats.Stats:
    profiler = cProfile.Profile()
    seconds = await timed(contender, images, scratch, profiler)
    cpu = contender.cpu.pop()
    print(f"profiled images.download run: {seconds:.3f} s, CPU {cpu:.3f} s (all threads)")
    return pstats.Stats(profiler).strip_dirs()


def report(contenders: list[Contender], count: int, rounds: int) -> dict[str, Any]:
    total_mb = count * IMAGE_BYTES / 1e6
    medians = {c.name: statistics.median(c.times) for c in contenders}
    raw = medians["raw aiohttp"]
    rows: dict[str, Any] = {}
    print(
        f"B3: {count} images of {IMAGE_BYTES // 2**20} MiB ({total_mb:.0f} MB), "
        f"{IN_FLIGHT} in flight; median of {rounds} rounds"
    )
    print("| contender | median | best | MB/s | throughput vs raw aiohttp | CPU per run |")
    print("|---|---|---|---|---|---|")
    for contender in contenders:
        median = medians[contender.name]
        cpu = statistics.median(contender.cpu)
        rows[contender.name] = {
            "median_s": round(median, 4),
            "runs_s": [round(t, 4) for t in contender.times],
            "mb_per_s": round(total_mb / median, 1),
            "ratio_to_raw_aiohttp": round(raw / median, 3),
            "cpu_s": round(cpu, 4),
        }
        print(
            f"| {contender.name} | {median:.3f} s | {min(contender.times):.3f} s "
            f"| {total_mb / median:.0f} | {raw / median:.2f} x | {cpu:.3f} s |"
        )
    ratio = raw / medians["images.download"]
    print(
        f"images.download: {ratio:.2f} x raw aiohttp's throughput (target >= {TARGET}): "
        f"{'met' if ratio >= TARGET else 'MISSED'}"
    )
    return {
        "images": count,
        "image_mb": IMAGE_BYTES // 2**20,
        "concurrency": IN_FLIGHT,
        "rounds": rounds,
        "machine": machine(),
        "contenders": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="16 images, 2 rounds, no results")
    parser.add_argument("--profile", action="store_true", help="cProfile one images.download")
    parser.add_argument(
        "--raw-variants",
        action="store_true",
        help="also time raw aiohttp with writes offloaded by asyncio.to_thread",
    )
    args = parser.parse_args()
    count, rounds = (16, 2) if args.quick else (64, 5)
    contenders, stats = asyncio.run(measure(count, rounds, args.profile, args.raw_variants))
    results = report(contenders, count, rounds)
    if stats is not None:
        print("\ncProfile of one images.download run (event-loop thread), by own time:")
        stats.sort_stats("tottime").print_stats(20)
        print("by cumulative time:")
        stats.sort_stats("cumulative").print_stats(25)
    if not args.quick:
        results["contenders"].pop("raw aiohttp, to_thread writes", None)
        store("download", results)


if __name__ == "__main__":
    main()
