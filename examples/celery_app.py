"""A batch too long for one machine, on Celery workers (Redis broker and result backend).

One task per chunk of prompts; each worker process holds one blocking `Client`, with the
back-off shared through the same Redis (a 429 seen by one process pauses them all), and
each chunk runs `generate_many` with a journal in Redis of its own, so a chunk sent again
after its worker died resumes: what was done is not paid again, what was in flight is
reported unknown rather than sent twice.

Run it (from the repository root; `pip install 'deepmode-async[redis]' 'celery[redis]'`):

    export REDIS_URL=redis://localhost:6379/0 DEEPMODE_API_KEY=...
    celery -A examples.celery_app worker --concurrency 4 --loglevel INFO   # on each machine
    python -m examples.celery_app prompts.txt --model-id MODEL_ID          # anywhere

Environment:
    REDIS_URL          broker, result backend, shared back-off and journals (default
                       redis://localhost:6379/0).
    DEEPMODE_API_KEY   read by each worker process; never put in a task or a result.
    DEEPMODE_BASE_URL  another API host, e.g. a `python -m deepmode_async.testing` mock.
    DEEPMODE_CHUNK_CONCURRENCY  requests in flight per chunk (default 8).

The driver (`python -m examples.celery_app --help`, or `run_batch(...)`) reads one prompt
a line, sends the chunks, waits, sends again the chunks whose worker process was killed,
and prints how many prompts are done, unknown (sent, and maybe charged, with no answer
recorded) and failed. Running it again on the same file with the same options resumes
every chunk from its journal, free for what is done.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, signals
from celery.exceptions import WorkerLostError
from celery.result import AsyncResult

from deepmode_async import Client, GenerateRequest, OutcomeUnknownError
from deepmode_async.stores import RedisStore

log = logging.getLogger(__name__)

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
CHUNK_CONCURRENCY = int(os.environ.get("DEEPMODE_CHUNK_CONCURRENCY", "8"))

app = Celery("deepmode_batch", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    # Results cross Celery as JSON: ids, counts and error texts, never objects or keys.
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # At-most-once. A task is acknowledged when a worker process takes it, before it
    # runs, so Celery never runs it a second time by itself: a paid call is never made
    # twice behind your back. A process killed mid-task leaves the task FAILED with
    # WorkerLostError, and the driver decides to send the chunk again; the chunk's
    # journal makes that safe. Keep all three below off: acks_late with
    # reject_on_worker_lost has the broker hand the chunk to another process by itself
    # (and, acked late, after a lost connection, while the first may still be
    # mid-call); retry_on_worker_lost runs it again with no one deciding. That is
    # at-least-once, which for paid calls means paying twice.
    task_acks_late=False,
    task_reject_on_worker_lost=False,
    task_retry_on_worker_lost=False,
    # One chunk at a time per process: a chunk waiting behind a long one in a process's
    # prefetch would be lost with it, and idle processes would have nothing to take.
    worker_prefetch_multiplier=1,
    task_track_started=True,
    result_expires=7 * 24 * 3600,
    broker_connection_retry_on_startup=True,
)

# The one client of this worker process (None in the parent and in the driver).
_client: Client | None = None


@signals.worker_process_init.connect
def _open_client(**_: object) -> None:
    """Made in each worker process after the fork: a client's event loop thread and
    connections do not survive a fork, so the parent must never hold one."""
    global _client
    # store= a Redis URL: a wait the server asks of one process holds every process's
    # new calls (on every machine using this Redis); the client closes it with itself.
    _client = Client(store=REDIS_URL)


@signals.worker_process_shutdown.connect
def _close_client(**_: object) -> None:
    global _client
    if _client is not None:
        _client.close()
        _client = None


def journal_prefix(batch_id: str, chunk: int) -> str:
    """The Redis key prefix of one chunk's journal (`<prefix>journal:<index>`)."""
    return f"deepmode:batch:{batch_id}:chunk:{chunk}:"


@app.task(name="deepmode.generate_chunk")
def generate_chunk(batch_id: str, chunk: int, model_id: str, prompts: list[str]) -> dict[str, Any]:
    """Generate one chunk's prompts; its journal resumes a chunk sent again.

    Returns `{"chunk": n, "results": [{"index", "status", "images", "resumed",
    "error"}]}` with `status` "done", "unknown" (sent by an earlier attempt, may have
    been charged, not sent again) or "failed"; indexes are within the chunk.
    """
    if _client is None:
        raise RuntimeError(
            "no client: this task runs in a worker process of the prefork pool, whose "
            "worker_process_init makes it"
        )
    requests = [GenerateRequest(model_id=model_id, prompt=prompt) for prompt in prompts]
    journal = RedisStore(REDIS_URL, prefix=journal_prefix(batch_id, chunk))
    results: list[dict[str, Any]] = []
    try:
        for result in _client.images.generate_many(
            requests, concurrency=CHUNK_CONCURRENCY, journal=journal
        ):
            entry: dict[str, Any] = {"index": result.index, "resumed": result.resumed}
            if result.ok:
                entry.update(status="done", images=[image.id for image in result.generation.images])
            else:
                unknown = isinstance(result.error, OutcomeUnknownError)
                entry.update(status="unknown" if unknown else "failed", images=[])
                entry["error"] = f"{type(result.error).__name__}: {result.error}"
            results.append(entry)
    finally:
        # The batch does not close a store it was given; its connections live on the
        # client's event loop, which aclose reaches from this thread.
        asyncio.run(journal.aclose())
    return {"chunk": chunk, "results": sorted(results, key=lambda entry: entry["index"])}


# ---------------------------------------------------------------------- the driver


@dataclass
class Summary:
    """What a batch came to, by prompt index in the input."""

    done: dict[int, list[str]] = field(default_factory=dict)  # index: image ids
    resumed: int = 0  # of `done`: recorded by an earlier attempt, not paid again
    unknown: dict[int, str] = field(default_factory=dict)  # index: why
    failed: dict[int, str] = field(default_factory=dict)  # index: error text
    resent: list[int] = field(default_factory=list)  # chunks sent again (worker lost)

    def text(self) -> str:
        images = sum(len(ids) for ids in self.done.values())
        return (
            f"done {len(self.done)} ({images} images; {self.resumed} from earlier attempts, "
            f"not charged again), unknown {len(self.unknown)} (sent, may have been "
            f"charged), failed {len(self.failed)}; charged: {len(self.done) - self.resumed} "
            f"calls this run, up to {len(self.unknown)} more unknown; chunks sent again "
            f"after a lost worker: {len(self.resent)}"
        )


def batch_id_of(prompts: Sequence[str], model_id: str, chunk_size: int) -> str:
    """The same input cut the same way gets the same id: a rerun resumes its journals."""
    digest = hashlib.sha256(json.dumps([model_id, chunk_size, list(prompts)]).encode())
    return digest.hexdigest()[:16]


def run_batch(
    prompts: Sequence[str],
    *,
    model_id: str,
    chunk_size: int = 100,
    batch_id: str | None = None,
    max_resends: int = 3,
    timeout: float | None = None,
    poll: float = 0.2,
) -> Summary:
    """Send `prompts` as chunks of `chunk_size`, wait for all of them, send a chunk again
    (at most `max_resends` times) when its worker process was lost, and sum up.

    A chunk that is not finished after `timeout` seconds (its whole worker gone, say:
    acknowledged early, nobody runs it again) is counted failed; run the batch again
    with the same arguments and its journal resumes it.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    batch_id = batch_id or batch_id_of(prompts, model_id, chunk_size)
    chunks = [
        list(prompts[start : start + chunk_size]) for start in range(0, len(prompts), chunk_size)
    ]

    def send(chunk: int) -> AsyncResult[Any]:
        return generate_chunk.delay(batch_id, chunk, model_id, chunks[chunk])

    summary = Summary()
    pending = {chunk: send(chunk) for chunk in range(len(chunks))}
    resends = dict.fromkeys(pending, 0)
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        for chunk, result in list(pending.items()):
            if not result.ready():
                continue
            del pending[chunk]
            start = chunk * chunk_size
            outcome = result.get(propagate=False)
            succeeded = result.successful()
            result.forget()  # read once: no need to keep it in Redis for a week
            if succeeded:
                _add(summary, start, outcome)
            elif isinstance(outcome, WorkerLostError) and resends[chunk] < max_resends:
                log.warning("chunk %d: its worker process was lost; sending it again", chunk)
                resends[chunk] += 1
                summary.resent.append(chunk)
                pending[chunk] = send(chunk)
            else:
                for index in range(start, start + len(chunks[chunk])):
                    summary.failed[index] = f"{type(outcome).__name__}: {outcome}"
        if pending and deadline is not None and time.monotonic() > deadline:
            for chunk in pending:
                for index in range(chunk * chunk_size, chunk * chunk_size + len(chunks[chunk])):
                    summary.failed[index] = "not finished in time; run the batch again to resume"
            break
        if pending:
            time.sleep(poll)
    return summary


def _add(summary: Summary, start: int, outcome: dict[str, Any]) -> None:
    for entry in outcome["results"]:
        index = start + entry["index"]
        if entry["status"] == "done":
            summary.done[index] = entry["images"]
            summary.resumed += bool(entry["resumed"])
        elif entry["status"] == "unknown":
            summary.unknown[index] = entry["error"]
        else:
            summary.failed[index] = entry["error"]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m examples.celery_app PROMPTS --model-id ID`: 0 when every prompt is done."""
    parser = argparse.ArgumentParser(prog="python -m examples.celery_app", description=__doc__)
    parser.add_argument("prompts", type=pathlib.Path, help="a text file, one prompt a line")
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--chunk-size", type=int, default=100)
    parser.add_argument("--batch-id", help="default: derived from the input, to resume it")
    parser.add_argument("--timeout", type=float, help="seconds to wait for the chunks")
    args = parser.parse_args(argv)
    lines = args.prompts.read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    summary = run_batch(
        prompts,
        model_id=args.model_id,
        chunk_size=args.chunk_size,
        batch_id=args.batch_id,
        timeout=args.timeout,
    )
    print(summary.text())
    for index, reason in sorted({**summary.unknown, **summary.failed}.items()):
        print(f"  [{index}] {prompts[index]!r}: {reason}")
    return 0 if len(summary.done) == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
