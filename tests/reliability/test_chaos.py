"""Chaos batch: `generate_many` through a mock that deals faults at random.

500 requests meet 20% 429s and 5% 503s (both with `Retry-After`), 5% connections dropped
after the server did the work (and charged for it), 3% 500s and 0-5 ms of latency. The
promises of the README (Retries, Long batches) under that weather:

- every request yields exactly one result;
- the server acts on each prompt at most once (at most one charge per prompt);
- a 429 or a 503 with `Retry-After` is retried until the call goes through;
- what may have been acted on is never repeated and surfaces as a typed error: a drop
  after processing as `APIConnectionError`, a 500 as `InternalServerError`, one failed
  result per such fault;
- the charged prompts that failed are exactly those dropped after processing;
- nothing is left unclosed.

The server's side is read from `mock.requests` (each attempt and what it was answered)
and `mock.ledger` (charges, joined to attempts by request id and keyed by prompt).
"""

from __future__ import annotations

import collections
import gc
import logging
import time
import warnings
from collections.abc import Iterable, Sequence

import attrs
import pytest
from conftest import FAST, make_client

from deepmode_async import Client
from deepmode_async._errors import (
    APIConnectionError,
    APIStatusError,
    InternalServerError,
    RateLimitError,
)
from deepmode_async.batch import BatchResult, GenerateRequest
from deepmode_async.testing import MockDeepMode, RecordedRequest

pytestmark = pytest.mark.anyio

BALANCE = 10**6


def deal_chaos(mock: MockDeepMode, seed: int) -> None:
    """The weather of the issue's chaos batch."""
    mock.chaos(
        rate_limited=0.20,
        unavailable=0.05,
        dropped=0.05,
        server_error=0.03,
        latency=(0.0, 0.005),
        retry_after=0.01,
        seed=seed,
    )


# A 429 or 503 is dealt to a quarter of the attempts; a call runs out of retries only after
# 1 + MAX_RETRIES of them in a row (more, as a batch forgives refusals while others get
# through): 0.25 ** 13 ≈ 1.5e-8 per request. Such a request is still accounted for below.
MAX_RETRIES = 12
RETRYABLE = (429, 503)
DROPPED = "dropped"  # a record without status: the connection closed instead of an answer


def outcome(record: RecordedRequest) -> int | str:
    return record.status if record.status is not None else DROPPED


@attrs.frozen
class Tally:
    """What the server dealt and what the batch made of it, for the report and the asserts."""

    dealt: dict[int | str, int]  # attempts by outcome: 200, 429, 503, 500, "dropped"
    results: dict[str, int]  # results by outcome: ok, or the error's class name
    retries: int  # attempts beyond the first, over all prompts
    exhausted: int  # prompts whose last attempt was still a 429/503

    def __str__(self) -> str:
        return (
            f"faults dealt {self.dealt}, results {self.results}, retries {self.retries}, "
            f"retries exhausted {self.exhausted}"
        )


def check_batch(
    mock: MockDeepMode, requests: list[GenerateRequest], results: Sequence[BatchResult]
) -> Tally:
    """Assert every promise of the chaos batch; return the numbers.

    A call refused before processing (429, 503, 500) is answered before its body is read,
    so its record has no prompt: such an attempt is tied to its prompt through the
    `request_id` its error carries when it is the last, and otherwise counted.
    """
    count = len(requests)
    # Exactly one result per request, each prompt once.
    assert sorted(result.index for result in results) == list(range(count))
    for result in results:
        assert result.request is requests[result.index]
    assert collections.Counter(r.request.prompt for r in results) == collections.Counter(
        request.prompt for request in requests
    )

    records = mock.requests
    by_id = {record.request_id: record for record in records}
    # Attempts the server carried out (read, acted on, charged): answered 200 or dropped.
    processed: dict[str, list[RecordedRequest]] = collections.defaultdict(list)
    for record in records:
        assert record.endpoint == "generate", record
        assert record.disconnected is False, record  # the client never gave up on one
        if outcome(record) in (200, DROPPED):
            processed[record.json["prompt"]].append(record)
        else:
            assert outcome(record) in (*RETRYABLE, 500), record

    # At most once: never more than one charge per prompt, and one per carried-out call.
    charged = collections.Counter(by_id[charge.request_id].json["prompt"] for charge in mock.ledger)
    twice = {prompt: n for prompt, n in charged.items() if n > 1}
    assert twice == {}, f"prompts acted on more than once: {twice}"
    assert charged == collections.Counter({p: len(done) for p, done in processed.items()})
    assert len(mock.images) == len(mock.ledger)  # one image per charge, none without one

    exhausted = 0
    for result in results:
        prompt = result.request.prompt
        done = [outcome(record) for record in processed[prompt]]
        if result.ok:
            assert done == [200], (prompt, done)
            assert result.generation is not None
            (image,) = result.generation.images
            assert mock.images[image.id].prompt == prompt
        elif done:
            # Acted on, answer lost: surfaced as a connection error, never repeated.
            assert done == [DROPPED], (prompt, done, result.error)
            assert type(result.error) is APIConnectionError, (prompt, result.error)
        else:
            # Refused before processing; the error names the attempt that was last.
            assert isinstance(result.error, APIStatusError), (prompt, result.error)
            assert result.error.request_id is not None
            last = by_id[result.error.request_id]
            assert last.status == result.error.status_code, (last, result.error)
            if last.status == 500:
                assert isinstance(result.error, InternalServerError), result.error
            else:  # still refused after every retry: possible, not expected in this lifetime
                exhausted += 1
                assert last.status in RETRYABLE, last
                expected = RateLimitError if last.status == 429 else InternalServerError
                assert isinstance(result.error, expected), result.error

    dealt = collections.Counter(outcome(record) for record in records)
    outcomes = collections.Counter(
        "ok" if result.ok else type(result.error).__name__ for result in results
    )
    tally = Tally(
        dealt=dict(dealt),
        results=dict(outcomes),
        retries=len(records) - count,
        exhausted=exhausted,
    )
    # Each request's last attempt is its only one that was not a 429/503: nothing was
    # tried again after a 200, a 500 or a drop, and every 429/503 was tried again (but the
    # last one of an exhausted request).
    assert dealt[200] + dealt[500] + dealt[DROPPED] == count - exhausted, tally
    assert dealt[429] + dealt[503] == tally.retries + exhausted, tally
    # One failed result per fault that may have been acted on (plus exhausted requests).
    failed = [result for result in results if not result.ok]
    assert outcomes["ok"] == dealt[200], tally
    assert outcomes["APIConnectionError"] == dealt[DROPPED], tally
    assert len(failed) == dealt[500] + dealt[DROPPED] + exhausted, tally
    # The charged prompts that failed are exactly those dropped after processing.
    failed_and_charged = {r.request.prompt for r in failed if charged[r.request.prompt]}
    dropped = {record.json["prompt"] for record in records if record.status is None}
    assert failed_and_charged == dropped, tally
    assert mock.balance == BALANCE - len(mock.ledger)
    return tally


def chaos_requests(model_id: str, count: int) -> list[GenerateRequest]:
    return [GenerateRequest(model_id=model_id, prompt=f"chaos {i}") for i in range(count)]


def assert_no_leaks(
    caught: Iterable[warnings.WarningMessage], log: pytest.LogCaptureFixture
) -> None:
    gc.collect()  # an unclosed session or socket warns when collected
    messages = [f"{w.category.__name__}: {w.message}" for w in caught]
    assert messages == []
    unclosed = [r.getMessage() for r in log.records if "nclosed" in r.getMessage()]
    assert unclosed == []


async def test_a_batch_of_500_through_chaos(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")  # where aiohttp reports unclosed things
    count = 500
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with MockDeepMode(balance=BALANCE) as mock:
            requests = chaos_requests(mock.add_model().id, count)
            deal_chaos(mock, seed=500)
            started = time.monotonic()
            async with make_client(mock, max_retries=MAX_RETRIES) as dm:
                results = [result async for result in dm.images.generate_many(requests)]
            elapsed = time.monotonic() - started
            tally = check_batch(mock, requests, results)
        assert_no_leaks(caught, caplog)
    print(f"\nchaos batch of {count} in {elapsed:.2f} s: {tally}")
    # The weather was as ordered, roughly: enough of every fault for the asserts to bite.
    assert tally.dealt[429] > 100, tally
    assert tally.dealt[503] > 15, tally
    assert tally.dealt[DROPPED] > 10, tally
    assert tally.dealt[500] > 5, tally
    assert tally.exhausted == 0, tally


def test_a_blocking_batch_of_100_through_chaos(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    count = 100
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with MockDeepMode(balance=BALANCE) as mock:  # on a thread of its own
            requests = chaos_requests(mock.add_model().id, count)
            deal_chaos(mock, seed=100)
            with Client(mock.api_key, base_url=mock.base_url, max_retries=MAX_RETRIES) as dm:
                transport = dm._async._transport
                transport.retry = attrs.evolve(transport.retry, backoff_base=FAST)
                results = list(dm.images.generate_many(requests))
            tally = check_batch(mock, requests, results)
        assert_no_leaks(caught, caplog)
    print(f"\nblocking chaos batch of {count}: {tally}")
    assert tally.dealt[429] > 10, tally
    assert tally.dealt[DROPPED] + tally.dealt[500] > 0, tally
    assert tally.exhausted == 0, tally
