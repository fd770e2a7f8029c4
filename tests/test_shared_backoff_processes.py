"""The shared back-off across real processes: 4 workers on one account against the mock
in a process of its own, which answers 429 with `Retry-After` at random (as a server
pacing an account does). Sharing a Redis store, they knock during a pause a quarter as
often, at most, as each on its own (issue 19's figures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from deepmode_async.testing import mock_process

HERE = Path(__file__).resolve().parent
PROCESSES, CONCURRENCY, SECONDS = 4, 8, 2.5
RATE_LIMITED, RETRY_AFTER = 0.02, 1.0


def run_workers(base_url: str, api_key: str, store: str) -> list[dict[str, int]]:
    argv = [sys.executable, str(HERE / "_backoff_worker.py"), base_url, api_key, store]
    workers = [
        subprocess.Popen(  # noqa: S603 (our own interpreter and script)
            [*argv, str(SECONDS), str(CONCURRENCY)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    try:
        for worker in workers:  # every one listening before any starts
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "ready"
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        return [json.loads(worker.stdout.readline()) for worker in workers if worker.stdout]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
            for pipe in (worker.stdin, worker.stdout):
                if pipe is not None:
                    pipe.close()


def refusals(store: str) -> tuple[int, int]:
    """The 429s the mock answered in one run of the workers, and the calls they made."""
    command = (
        sys.executable,
        str(HERE / "_backoff_mock.py"),
        "--rate-limited",
        str(RATE_LIMITED),
        "--retry-after",
        str(RETRY_AFTER),
    )
    with mock_process(command=command) as mock:
        results = run_workers(mock.base_url, mock.api_key, store)
    answered = json.loads(mock.stderr.partition("answered: ")[2].splitlines()[0])
    return answered.get("429", 0), sum(result["calls"] for result in results)


def test_four_processes_sharing_redis_knock_a_quarter_as_often(redis_url: str) -> None:
    alone, alone_calls = refusals("-")
    shared, shared_calls = refusals(redis_url)
    print(f"429s: {alone} alone ({alone_calls} calls), {shared} shared ({shared_calls} calls)")
    assert alone >= 8, "the run did not meet the server's pacing often enough to tell"
    assert shared * 4 <= alone
