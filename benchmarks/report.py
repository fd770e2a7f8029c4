"""The latest results as markdown: every benchmark target with its measured value.

Reads benchmarks/results.json (written by the benchmark scripts), writes
benchmarks/RESULTS.md, and puts the targets table into README.md between the
`<!-- bench:start -->` and `<!-- bench:end -->` markers. `make bench` runs it last.
"""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import re
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import RESULTS, machine

HERE = pathlib.Path(__file__).parent
REPORT = HERE / "RESULTS.md"
README = HERE.parent / "README.md"
MARKERS = re.compile(r"(<!-- bench:start -->\n).*?(<!-- bench:end -->)", re.DOTALL)

Row = tuple[str, str, str, bool | None]  # benchmark, target, measured, met


def targets(results: dict[str, Any]) -> list[Row]:
    """One row per target; a benchmark that has not run yet says so."""
    rows: list[Row] = []

    def add(key: str, make: Callable[[Any], list[Row]]) -> None:
        if key in results:
            rows.extend(make(results[key]))
        else:
            rows.append((key, "(not run)", "-", None))

    add("batch", _batch)
    add("upload_memory", _upload)
    add("download", _download)
    add("sync_overhead", _sync)
    add("import_time", _imports)
    add("scaling", _scaling)
    add("hub", _hub)
    add("shared_backoff", _shared_backoff)
    add("journal", _journal)
    return rows


def _batch(batch: dict[str, Any]) -> list[Row]:
    c = batch["contenders"]
    sdk = c["generate_many"]
    over_httpx = sdk["median_s"] / c["httpx.AsyncClient"]["median_s"]
    over_requests = sdk["median_s"] / c["requests, 100 threads"]["median_s"]
    return [
        ("B1 batch", "<= 1.05 x raw aiohttp", f"{sdk['ratio_to_raw_aiohttp']:.2f} x",
         sdk["ratio_to_raw_aiohttp"] <= 1.05),
        ("B1 batch", "<= 1.3 x ideal", f"{sdk['ratio_to_ideal']:.2f} x",
         sdk["ratio_to_ideal"] <= 1.3),
        ("B1 batch", "faster than httpx.AsyncClient", f"{over_httpx:.2f} x its time",
         over_httpx < 1),
        ("B1 batch", "faster than requests + 100 threads", f"{over_requests:.2f} x its time",
         over_requests < 1),
        *_cpu(batch.get("b6")),
    ]  # fmt: skip


def _cpu(b6: dict[str, Any] | None) -> list[Row]:
    if b6 is None:  # results of a batch.py older than the two loops
        return [("B6 CPU", "(not run)", "-", None)]
    rows: list[Row] = [
        (
            "B6 CPU",
            "<= 1.10 x raw aiohttp's a call, same loop (asyncio)",
            f"{b6['ratio']:.2f} x ({b6['sdk_us']} us vs {b6['raw_us']} us)",
            b6["ratio"] <= 1.10,
        ),
    ]
    uv = b6.get("uvloop")
    if uv is None:
        rows.append(
            (
                "B6 CPU",
                "<= 0.85 x raw aiohttp's on asyncio, with uvloop",
                "(uvloop not installed)",
                None,
            )
        )
    else:
        rows.append(
            (
                "B6 CPU",
                "<= 0.85 x raw aiohttp's on asyncio, with uvloop",
                f"{uv['ratio_to_raw_on_asyncio']:.2f} x ({uv['sdk_us']} us; raw aiohttp "
                f"on uvloop {uv['raw_us']} us)",
                uv["ratio_to_raw_on_asyncio"] <= 0.85,
            )
        )
    return rows  # fmt: skip


def _shared_backoff(result: dict[str, Any]) -> list[Row]:
    b1, zero = result["b1"], result["zero"]
    return [
        ("B9 shared pacing", "<= 1.05 x B1 without store=", f"{b1['ratio']:.2f} x "
         f"(0 ms latency: {zero['ratio']:.2f} x, {zero['calls_per_s']['RedisStore']} calls/s)",
         b1["ratio"] <= 1.05),
    ]  # fmt: skip


def _hub(hub: dict[str, Any]) -> list[Row]:
    redis, sqlite, memory = hub["redis"], hub["sqlite"], hub["memory"]
    rows: list[Row] = [
        ("B7 hub", "delivery-to-wake p99 <= 20 ms (Redis, 4 processes)",
         f"{redis['wake_p99_ms']} ms (p50 {redis['wake_p50_ms']} ms)", redis["wake_p99_ms"] <= 20),
        ("B7 hub", "delivery-to-wake p99 <= 250 ms (SQLite, 4 processes)",
         f"{sqlite['wake_p99_ms']} ms (p50 {sqlite['wake_p50_ms']} ms)",
         sqlite["wake_p99_ms"] <= 250),
        ("B7 hub", ">= 2000 deliveries/s a process (Redis)",
         f"{redis['deliveries_per_s']:,}/s (SQLite {sqlite['deliveries_per_s']:,}/s,"
         f" memory {memory['deliveries_per_s']:,}/s)", redis["deliveries_per_s"] >= 2000),
    ]  # fmt: skip
    if "before_stores" in memory:  # measured side by side since the hub went on stores
        before = memory["before_stores"]
        rows.append(
            ("B7 hub", "MemoryStore no slower than the hub before stores",
             f"{memory['deliveries_ratio']:.2f} x deliveries/s, {memory['cycles_ratio']:.2f} x"
             f" expect-deliver-wait cycles/s; wake p50 {memory['wake_p50_ms']} ms"
             f" ({before['wake_p50_ms']} ms before)",
             min(memory["deliveries_ratio"], memory["cycles_ratio"]) >= 1.0)
        )  # fmt: skip
    return rows


def _journal(journal: dict[str, Any]) -> list[Row]:
    ratio, added = journal["wall_ratio"], journal["cpu_us_added"]
    resume = journal["resume"][-1]
    return [
        ("B8 journal", "<= 1.10 x the wall time of B1 without", f"{ratio:.2f} x", ratio <= 1.10),
        ("B8 journal", "<= +40 us CPU a call", f"+{added:.0f} us", added <= 40),
        ("B8 journal", f"resume rate ({resume['count']} recorded)",
         f"{resume['per_s']}/s, peak {resume['peak_traced_mib']} MiB traced", None),
    ]  # fmt: skip


def _upload(upload: dict[str, Any]) -> list[Row]:
    r = upload["results"]
    peak = r["sdk"]["tracemalloc_peak_mib"]
    speed = r["sdk"]["mb_per_s"] / r["raw"]["mb_per_s"]
    return [
        ("B2 upload", "tracemalloc peak <= 8 MiB", f"{peak:.1f} MiB", peak <= 8),
        ("B2 upload", ">= 0.9 x raw aiohttp throughput", f"{speed:.2f} x", speed >= 0.9),
    ]


def _download(download: dict[str, Any]) -> list[Row]:
    c = download["contenders"]
    speed = c["images.download"]["mb_per_s"] / c["raw aiohttp"]["mb_per_s"]
    return [("B3 download", ">= 0.9 x raw aiohttp throughput", f"{speed:.2f} x", speed >= 0.9)]


def _sync(sync: dict[str, Any]) -> list[Row]:
    overhead = sync["overhead_us_per_call"]
    threads = sync["concurrent_sync_threads_s"] / sync["concurrent_async_s"]
    return [
        ("B4 sync", "<= 200 us a call", f"{overhead:.0f} us", overhead <= 200),
        ("B4 sync", f"{sync['threads']} threads reach the async throughput",
         f"{threads:.2f} x the async time", None),
    ]  # fmt: skip


def _imports(imports: dict[str, Any]) -> list[Row]:
    ratio = imports["ratio"]
    measured = f"{ratio:.2f} x ({imports['sdk_ms']:.0f} ms vs {imports['deps_ms']:.0f} ms)"
    return [("B5 import", "<= 1.25 x the four dependencies", measured, ratio <= 1.25)]


def _scaling(scaling: dict[str, Any]) -> list[Row]:
    sdk = {
        (row["calls"], row["in_flight"]): row
        for row in scaling["rows"]
        if row["contender"] == "generate_many"
    }
    small, large = sdk[1000, 100], sdk[10000, 100]
    cpu = large["cpu_us_per_call"] / small["cpu_us_per_call"]
    rss = large["rss_peak_mib"] - small["rss_peak_mib"]
    by_flight = ", ".join(
        f"{flight}: {sdk[1000, flight]['ratio_to_raw_aiohttp']:.2f} x"
        for flight in (10, 100, 1000)
        if (1000, flight) in sdk
    )
    return [
        ("Scaling", "CPU a call flat from 1000 to 10000 calls (<= 1.2 x)",
         f"{cpu:.2f} x ({small['cpu_us_per_call']} -> {large['cpu_us_per_call']} us)", cpu <= 1.2),
        ("Scaling", "memory flat from 1000 to 10000 calls (peak RSS + <= 4 MiB)",
         f"{rss:+.1f} MiB ({small['rss_peak_mib']} -> {large['rss_peak_mib']} MiB)", rss <= 4),
        ("Scaling", "generate_many vs raw aiohttp by calls in flight (1000 calls)", by_flight,
         None),
    ]  # fmt: skip


def table(rows: list[Row]) -> str:
    lines = ["| benchmark | target | measured | met |", "|---|---|---|---|"]
    mark = {True: "yes", False: "**no**", None: "-"}
    lines += [f"| {name} | {target} | {value} | {mark[met]} |" for name, target, value, met in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    stamp = f"Measured {dt.date.today():%Y-%m-%d} on {machine()}."
    targets_table = table(targets(results))
    REPORT.write_text(
        "# Latest benchmark results\n\n"
        f"{stamp} Written by `make bench` (`benchmarks/report.py`); the figures behind "
        "them are in `results.json`, each script's own table in its output.\n\n" + targets_table
    )
    print(targets_table)
    readme = README.read_text()
    if not MARKERS.search(readme):
        print("README.md has no <!-- bench:start --> / <!-- bench:end --> markers")
        return
    block = f"{stamp}\n\n{targets_table}"
    README.write_text(MARKERS.sub(lambda m: m.group(1) + block + m.group(2), readme, count=1))


if __name__ == "__main__":
    main()
