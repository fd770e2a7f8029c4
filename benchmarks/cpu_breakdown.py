"""Where B6's CPU goes: generate_many against raw aiohttp, one part of the SDK left out at a time.

B1's calls (1000 `generate` calls at 50 ms server latency, 100 in flight, the mock in its
own process), each way run in turn in every round, on asyncio's loop; before each run a
pause longer than the clients keep idle connections, so that every run opens its 100
connections, as in B1. Only public API: the parts left out are
- the read timeout (`Timeout(connect=None, read=None)`; aiohttp re-arms it on every piece
  of an answer);
- the batch runner (`images.generate` calls gathered under a semaphore, as raw aiohttp
  is, instead of `generate_many`: no results streamed as they complete, no shared
  pacing of 429s, no per-request task bookkeeping of its own).
What is left, the SDK's call itself (validation, the retry loop and its error mapping,
conversion into frozen classes), is the last row against the first. Prints a table of
the median CPU a call (`time.process_time()`, all threads) over `--rounds` rounds.
Not in `make bench`: a diagnosis for B6, run by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import Run, cpu_per_call, served
from batch import IN_FLIGHT, LATENCY, Bench, train

from deepmode_async import AsyncClient, Timeout
from deepmode_async._connection import KEEPALIVE_SECONDS

CALLS = 1000


async def gathered(dm: AsyncClient, model_id: str, tag: str) -> tuple[float, int]:
    """`images.generate` calls under a semaphore of `IN_FLIGHT`, as raw aiohttp's are."""
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def one(index: int) -> bool:
        async with slots:
            generation = await dm.images.generate(
                model_id=model_id, prompt=f"a lighthouse {tag}-{index}"
            )
            return bool(generation.images)

    started = time.perf_counter()
    ok = sum(await asyncio.gather(*(one(index) for index in range(CALLS))))
    return time.perf_counter() - started, ok


async def measure(rounds: int) -> dict[str, float]:
    untimed = Timeout(connect=None, read=None)
    with served(LATENCY) as mock:
        model_id = await train(mock.base_url, mock.api_key)
        bench = Bench(mock.base_url, mock.api_key, model_id)
        async with (
            bench.session() as session,
            AsyncClient(mock.api_key, base_url=mock.base_url) as dm,
            AsyncClient(mock.api_key, base_url=mock.base_url, timeout=untimed) as bare,
        ):
            ways: dict[str, Run] = {
                "raw aiohttp": lambda tag: bench.raw(session, CALLS, tag),
                "generate_many": lambda tag: bench.generate_many(dm, CALLS, tag),
                "generate_many, no read timeout": lambda tag: bench.generate_many(bare, CALLS, tag),
                "images.generate, gathered": lambda tag: gathered(dm, model_id, tag),
                "images.generate, gathered, no read timeout": lambda tag: gathered(
                    bare, model_id, tag
                ),
            }
            # Before each run, a pause longer than clients keep idle connections.
            return await cpu_per_call(ways, rounds, CALLS, pause=KEEPALIVE_SECONDS + 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=15, help="rounds measured (default: 15)")
    args = parser.parse_args()
    us = asyncio.run(measure(args.rounds))
    raw = us["raw aiohttp"]
    print(f"B6 breakdown: {CALLS} calls, {LATENCY * 1000:.0f} ms latency, {IN_FLIGHT} in flight;")
    print(f"median CPU a call over {args.rounds} rounds, asyncio's loop")
    print("| way | CPU a call | against raw aiohttp | more than raw |\n|---|---|---|---|")
    for name, value in us.items():
        print(f"| {name} | {value:.0f} us | {value / raw:.3f} x | {value - raw:+.1f} us |")


if __name__ == "__main__":
    main()
