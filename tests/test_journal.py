"""Resumable batches: `generate_many(..., journal=...)` never pays twice for a request.

Real parts only: the batch that dies is a `deepmode generate --journal` process, killed
with SIGKILL, SIGINT or SIGTERM once the mock's ledger shows about half the batch
charged; the journal is a real SQLite file or a real redis-server; the mock (one for
the module, on a thread of this process, so its ledger can be read) is reached over
loopback. "Charged" is read from the mock: one image per accepted generate call, each
with its prompt.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import os
import pathlib
import signal
import sqlite3
import sys
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from conftest import make_client
from hypothesis import given
from hypothesis import strategies as st

from deepmode_async import (
    APIConnectionError,
    AsyncClient,
    BatchResult,
    Client,
    GenerateRequest,
    Generation,
    Image,
    InternalServerError,
    NotFoundError,
    OutcomeUnknownError,
    RateLimitError,
    StoreError,
    ValidationError,
)
from deepmode_async._convert import converter
from deepmode_async._journal import NAMESPACE, BatchJournal, Entry
from deepmode_async._requests import generate_body
from deepmode_async.cli._batch import Tally
from deepmode_async.stores import MemoryStore, SQLiteStore
from deepmode_async.testing import MockDeepMode

pytestmark = pytest.mark.anyio

COUNT = 200
CONCURRENCY = 10
LATENCY = 0.05  # seconds a generate call takes: 200 at 10 in flight is about a second


@pytest.fixture(scope="module")
def served() -> Iterator[MockDeepMode]:
    """One mock for the module, on a thread: each test uses a model of its own."""
    with MockDeepMode(balance=1_000_000, latency={"generate": LATENCY}) as mock:
        yield mock


@pytest.fixture
def model(served: MockDeepMode) -> str:
    return served.add_model().id


def requests_for(model_id: str, count: int = COUNT) -> list[GenerateRequest]:
    return [GenerateRequest(model_id=model_id, prompt=f"prompt {i}") for i in range(count)]


def charges(mock: MockDeepMode, model_id: str) -> collections.Counter[str]:
    """Generate calls the mock charged for, by prompt (one image a call)."""
    return collections.Counter(
        image.prompt for image in mock.images.values() if image.model_id == model_id
    )


def generate_calls(mock: MockDeepMode, model_id: str) -> int:
    return sum(
        1
        for record in mock.requests
        if record.endpoint == "generate" and (record.json or {}).get("model_id") == model_id
    )


async def run_all(dm: AsyncClient, requests: list[GenerateRequest], **options: Any) -> list[Any]:
    results = []
    options.setdefault("concurrency", CONCURRENCY)
    async with contextlib.aclosing(dm.images.generate_many(requests, **options)) as stream:
        async for result in stream:
            results.append(result)
    return results


async def interrupted_cli_batch(
    mock: MockDeepMode, model_id: str, tmp_path: pathlib.Path, journal: str, how: signal.Signals
) -> tuple[int, str]:
    """`deepmode generate --journal` of the batch, stopped by `how` at ~100 charges."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(COUNT)))
    env = {**os.environ, "DEEPMODE_API_KEY": mock.api_key, "DEEPMODE_BASE_URL": mock.base_url}
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "deepmode_async",
        "generate",
        "--model-id",
        model_id,
        "--prompts-file",
        str(prompts),
        "--concurrency",
        str(CONCURRENCY),
        "--journal",
        journal,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(30):
            while sum(charges(mock, model_id).values()) < COUNT // 2:
                assert child.returncode is None, "the batch ended before it was stopped"
                await asyncio.sleep(0.005)
        child.send_signal(how)
        _, stderr = await asyncio.wait_for(child.communicate(), 30)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode is not None
    return child.returncode, stderr.decode()


@pytest.mark.parametrize(
    ("how", "store"),
    [
        (signal.SIGKILL, "sqlite"),
        (signal.SIGINT, "sqlite"),
        (signal.SIGTERM, "sqlite"),
        (signal.SIGKILL, "redis"),
    ],
)
async def test_a_batch_killed_half_way_resumes_without_paying_twice(
    served: MockDeepMode,
    model: str,
    tmp_path: pathlib.Path,
    request: pytest.FixtureRequest,
    how: signal.Signals,
    store: str,
) -> None:
    journal = (
        str(tmp_path / "run.db") if store == "sqlite" else request.getfixturevalue("redis_url")
    )
    code, stderr = await interrupted_cli_batch(served, model, tmp_path, journal, how)
    if how == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:  # the CLI unwound: it says how far it got and how to go on
        assert code == 128 + how, stderr
        assert "interrupted: run the same command to resume" in stderr, stderr
    requests = requests_for(model)
    # A call the mock took just before the kill is charged when its latency is over,
    # the connection gone or not: read the ledger once those have ended.
    await asyncio.sleep(4 * LATENCY)
    before = charges(served, model)
    calls_before = generate_calls(served, model)
    assert COUNT // 2 <= sum(before.values()) < COUNT

    async with make_client(served) as dm:
        results: list[BatchResult] = await run_all(dm, requests, journal=journal)
    after = charges(served, model)
    assert sorted(result.index for result in results) == list(range(COUNT))
    assert max(after.values()) == 1, "a prompt was charged twice"
    unknown = [result for result in results if isinstance(result.error, OutcomeUnknownError)]
    assert len(unknown) <= CONCURRENCY
    resumed = [result for result in results if result.resumed]
    # Everything paid for is resumed; an unknown one was recorded as sent, but the kill
    # may have come before its bytes reached the mock, so it may not be charged.
    unknown_prompts = {result.request.prompt for result in unknown}
    assert {result.request.prompt for result in resumed} - unknown_prompts <= set(before)
    assert set(before) <= {result.request.prompt for result in resumed}
    for result in resumed:  # no call for any of them
        assert after[result.request.prompt] == before[result.request.prompt]
    sent = [result for result in results if not result.resumed]
    assert generate_calls(served, model) - calls_before == len(sent)
    assert all(result.ok for result in sent)
    assert all(after[result.request.prompt] == 1 for result in sent)
    for result in unknown:
        error = result.error
        assert isinstance(error, OutcomeUnknownError)
        assert error.index == result.index
        assert error.request == result.request
        assert error.sent_at.tzinfo is not None
        assert "may have been charged" in str(error)
        assert "resend_unknown" in str(error)
        assert result.resumed
        assert result.generation is None

    # The unknown ones, sent again on request; everything else comes from the journal.
    async with make_client(served) as dm:
        final: list[BatchResult] = await run_all(dm, requests, journal=journal, resend_unknown=True)
    assert sorted(result.index for result in final) == list(range(COUNT))
    assert all(result.ok for result in final)
    again = charges(served, model)
    assert sum(not result.resumed for result in final) == len(unknown)
    for prompt, count in again.items():
        assert count <= (2 if prompt in unknown_prompts else 1)
    assert set(again) == {request.prompt for request in requests}


async def test_a_break_leaves_the_paid_results_in_the_journal(
    served: MockDeepMode, model: str, tmp_path: pathlib.Path
) -> None:
    journal = tmp_path / "run.db"
    requests = requests_for(model, 30)
    async with make_client(served) as dm:
        async with contextlib.aclosing(
            dm.images.generate_many(requests, concurrency=CONCURRENCY, journal=journal)
        ) as stream:
            first = await anext(stream)  # and leave: a `break` after one result
        paid = charges(served, model)
        results = await run_all(dm, requests, journal=journal)
    after = charges(served, model)
    assert max(after.values()) == 1
    by_index = {result.index: result for result in results}
    assert sorted(by_index) == list(range(30))
    again = by_index[first.index]
    assert again.resumed
    assert again.generation == first.generation
    # Whatever was charged before the break is resumed (or unknown), never sent again.
    for result in results:
        if result.request.prompt in paid:
            assert result.resumed
    assert sum(isinstance(r.error, OutcomeUnknownError) for r in results) <= CONCURRENCY


async def test_a_different_input_is_refused_before_any_call(
    served: MockDeepMode, model: str, tmp_path: pathlib.Path
) -> None:
    journal = tmp_path / "run.db"
    requests = requests_for(model, 12)
    async with make_client(served) as dm:
        await run_all(dm, requests, journal=journal)
        calls = generate_calls(served, model)
        changed = [*requests[:7], GenerateRequest(model_id=model, prompt="else"), *requests[8:]]
        with pytest.raises(ValidationError, match=r"requests\[7\] .*different prompt"):
            await run_all(dm, changed, journal=journal)
        other = requests_for(model, 12)[::-1]  # another batch's input
        with pytest.raises(ValidationError, match=r"requests\[0\]"):
            await run_all(dm, [*other, *requests_for(model, 3)], journal=journal)
        assert generate_calls(served, model) == calls
        # Nothing was lost: the journal still resumes the batch it recorded.
        results = await run_all(dm, requests, journal=journal)
    assert all(result.resumed and result.ok for result in results)
    assert generate_calls(served, model) == calls


async def test_a_longer_input_sends_only_the_new_requests(
    served: MockDeepMode, model: str, tmp_path: pathlib.Path
) -> None:
    journal = tmp_path / "run.db"
    async with make_client(served) as dm:
        await run_all(dm, requests_for(model, 5), journal=journal)
        # Past the first window of records, read ahead of the input no further.
        results = await run_all(dm, requests_for(model, 600), journal=journal, concurrency=100)
    assert sorted(result.index for result in results) == list(range(600))
    assert sum(result.resumed for result in results) == 5
    assert max(charges(served, model).values()) == 1


async def test_failures_where_the_server_did_not_act_are_sent_again(
    served: MockDeepMode, model: str, tmp_path: pathlib.Path
) -> None:
    journal = str(tmp_path / "run.db")
    requests = [
        GenerateRequest(model_id=model, prompt="fine"),
        GenerateRequest(model_id="no-such-model", prompt="refused"),  # 404: not acted on
    ]
    async with make_client(served, max_retries=0) as dm:
        first = {r.index: r for r in await run_all(dm, requests, journal=journal)}
        assert isinstance(first[1].error, NotFoundError)
        calls = len([r for r in served.requests if r.endpoint == "generate"])
        second = {r.index: r for r in await run_all(dm, requests, journal=journal)}
    assert second[0].resumed
    assert second[0].ok
    assert isinstance(second[1].error, NotFoundError)
    assert not second[1].resumed
    assert len([r for r in served.requests if r.endpoint == "generate"]) == calls + 1


async def test_failures_where_the_server_may_have_acted_are_unknown(
    served: MockDeepMode, model: str, tmp_path: pathlib.Path
) -> None:
    journal = str(tmp_path / "run.db")
    requests = [GenerateRequest(model_id=model, prompt="server error")]
    async with make_client(served, max_retries=0) as dm:
        served.fail("generate", 500, times=1)
        first = await run_all(dm, requests, journal=journal)
        assert isinstance(first[0].error, InternalServerError)
        (again,) = await run_all(dm, requests, journal=journal)
        error = again.error
        assert isinstance(error, OutcomeUnknownError)
        assert again.resumed
        assert "InternalServerError" in error.reason
        (last,) = await run_all(dm, requests, journal=journal, resend_unknown=True)
    assert last.ok
    assert not last.resumed


async def test_missing_files_of_resumed_results_are_fetched_again_free(
    served: MockDeepMode, model: str, tmp_path: pathlib.Path
) -> None:
    journal, out = tmp_path / "run.db", tmp_path / "out"
    requests = requests_for(model, 6)
    async with make_client(served) as dm:
        first = {r.index: r for r in await run_all(dm, requests, journal=journal, download_to=out)}
        assert all(result.ok and result.paths for result in first.values())
        gone = first[2].paths[0]
        gone.unlink()
        charged = sum(charges(served, model).values())
        again = {r.index: r for r in await run_all(dm, requests, journal=journal, download_to=out)}
    assert sum(charges(served, model).values()) == charged
    assert all(result.resumed and result.ok for result in again.values())
    assert again[2].paths == (gone,)
    assert gone.read_bytes() == served.image_bytes
    assert {index: r.paths for index, r in again.items()} == {
        index: r.paths for index, r in first.items()
    }
    assert sorted(path.name for path in out.iterdir()) == sorted(
        path.name for result in first.values() for path in result.paths
    )  # no temporary file left, nothing twice


async def test_a_rerun_into_another_directory_downloads_its_files_there_free(
    served: MockDeepMode, model: str, tmp_path: pathlib.Path
) -> None:
    journal, first_dir, second_dir = tmp_path / "run.db", tmp_path / "A", tmp_path / "B"
    requests = requests_for(model, 3)
    async with make_client(served) as dm:
        first = await run_all(dm, requests, journal=journal, download_to=first_dir)
        charged = sum(charges(served, model).values())
        again = await run_all(dm, requests, journal=journal, download_to=second_dir)
        # Back to the first directory: its files are still there, under their names.
        back = await run_all(dm, requests, journal=journal, download_to=first_dir)
    assert sorted(p for r in back for p in r.paths) == sorted(p for r in first for p in r.paths)
    assert sum(charges(served, model).values()) == charged
    assert all(r.resumed and r.ok and r.paths for r in again)
    assert {path.parent for r in again for path in r.paths} == {second_dir}
    assert sorted(path.name for path in second_dir.iterdir()) == sorted(
        path.name for r in first for path in r.paths
    )
    assert len(list(first_dir.iterdir())) == 3  # no "-2" copies there


async def test_files_a_failed_download_left_are_kept_and_not_fetched_twice(
    served: MockDeepMode, model: str, tmp_path: pathlib.Path
) -> None:
    journal, out = tmp_path / "run.db", tmp_path / "out"
    requests = [GenerateRequest(model_id=model, prompt="two", num_images=2)]
    async with make_client(served) as dm:
        (first,) = await run_all(dm, requests, journal=journal, download_to=out)
        kept, lost = first.paths
        # As a run whose second download failed leaves it: no paths recorded, one file.
        rewrite_record(journal, "0", lambda record: {k: v for k, v in record.items() if k != "p"})
        lost.unlink()
        kept_at = kept.stat().st_mtime_ns
        (again,) = await run_all(dm, requests, journal=journal, download_to=out)
    assert again.resumed
    assert again.paths == (kept, lost)
    assert kept.stat().st_mtime_ns == kept_at  # not downloaded again
    assert sorted(out.iterdir()) == sorted([kept, lost])  # no "-2" copy


async def test_a_journal_that_is_not_a_database_is_refused_before_any_call(
    served: MockDeepMode, model: str, tmp_path: pathlib.Path
) -> None:
    journal = tmp_path / "run.db"
    journal.write_bytes(b"this is not sqlite" * 100)
    async with make_client(served) as dm:
        with pytest.raises(StoreError, match="not a usable SQLite database"):
            await run_all(dm, requests_for(model, 3), journal=journal)
    assert generate_calls(served, model) == 0
    assert journal.read_bytes() == b"this is not sqlite" * 100  # nothing lost


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda record: b"{not json", id="not json"),
        pytest.param(lambda record: {**record, "t": 1e300}, id="sent in the far future"),
        pytest.param(lambda record: {**record, "t": float("nan")}, id="sent at NaN"),
        pytest.param(lambda record: {**record, "t": -5.0}, id="sent before 1970"),
    ],
)
async def test_a_damaged_record_is_refused_before_any_call(
    damage: Any, served: MockDeepMode, model: str, tmp_path: pathlib.Path
) -> None:
    journal = tmp_path / "run.db"
    async with make_client(served) as dm:
        await run_all(dm, requests_for(model, 3), journal=journal)
        rewrite_record(journal, "1", damage)
        calls = generate_calls(served, model)
        with pytest.raises(StoreError, match=r"requests\[1\] is not readable"):
            await run_all(dm, requests_for(model, 3), journal=journal)
    assert generate_calls(served, model) == calls


async def test_a_locked_journal_sends_nothing_says_why_and_stops_the_batch(
    served: MockDeepMode, model: str, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "run.db"
    count = 40
    async with make_client(served) as dm:
        await run_all(dm, requests_for(model, 2), journal=path)  # the file and its table
        calls = generate_calls(served, model)
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # another process writing, and taking its time
        outcome: list[Any] = []

        async def run(journal: SQLiteStore) -> None:
            batch = dm.images.generate_many(
                requests_for(model, count), concurrency=4, journal=journal
            )
            async for result in batch:
                outcome.append(result)

        started = time.monotonic()
        try:
            async with SQLiteStore(path, timeout=0.3) as journal:
                with pytest.raises(StoreError, match=r"the batch stopped: .*locked") as stop:
                    await run(journal)
        finally:
            holder.rollback()
            holder.close()
        # One wait for the lock, not one a request: the batch stopped at the first.
        assert time.monotonic() - started < 3.0
        assert "run the batch again" in str(stop.value).lower()
        assert generate_calls(served, model) == calls  # not one request went out unrecorded
        indexes = sorted(result.index for result in outcome)
        assert indexes[:2] == [0, 1]
        assert len(indexes) < count  # the rest were never started
        for result in outcome:  # the recorded ones can still be read (WAL): resumed
            if result.index < 2:
                assert result.resumed
                assert result.ok
            else:
                assert isinstance(result.error, StoreError), result
                assert "locked" in str(result.error)
        # `deepmode generate --journal` counts them as not sent, as they were not.
        tally = Tally(keep=False)
        for result in outcome:
            tally.add(result)
        unsent = len(outcome) - 2
        assert tally.journal_summary() == (
            f"journal: 2 resumed, 0 sent, {unsent} not sent (the journal could not record "
            f"them), 0 unknown, {unsent} failed"
        )
        # Nothing lost: once the lock is gone the batch resumes where it was.
        results = await run_all(dm, requests_for(model, count), journal=path)
    assert sum(result.resumed for result in results) == 2
    assert len(results) == count
    assert all(result.ok for result in results)


async def test_a_journal_where_nothing_can_be_written_is_refused_before_any_call(
    served: MockDeepMode, model: str
) -> None:
    async with make_client(served) as dm:
        with pytest.raises(StoreError, match="writable"):
            await run_all(dm, requests_for(model, 3), journal="/proc/deepmode-journal.db")
    assert generate_calls(served, model) == 0


class SlowJournal(MemoryStore):
    """A store whose writes take a while (a loaded disk): a batch left early has
    requests cancelled while their record that they are sent is being written."""

    async def put_many(
        self, ns: str, items: Sequence[tuple[str, bytes]], *, ttl: float | None = None
    ) -> None:
        await asyncio.sleep(0.2)
        await super().put_many(ns, items, ttl=ttl)


async def test_a_request_stopped_while_recorded_as_sent_is_not_taken_for_sent() -> None:
    # Leaving a batch early (break, Ctrl+C) can cancel a request while its record
    # that it is sent is being written: it never went out, and a rerun must send it.
    store = SlowJournal()
    request = GenerateRequest(model_id="m", prompt="p")
    journal = BatchJournal(store, owned=False, resend_unknown=False, refresh=no_refresh)
    recording = asyncio.create_task(journal.sent(0, request))
    await asyncio.sleep(0.05)  # the write is under way
    recording.cancel()
    with pytest.raises(asyncio.CancelledError):
        await recording
    await journal.aclose()  # the writes under way end
    entry = (await journal.window(0))[0]
    assert journal.unknown(0, request, entry) is None  # so it is sent again
    assert entry.error == "stopped before it was sent"
    # One that was recorded in full, then stopped, may have gone out: unknown.
    journal = BatchJournal(store, owned=False, resend_unknown=False, refresh=no_refresh)
    await journal.sent(1, request)
    await journal.aclose()
    assert journal.unknown(1, request, (await journal.window(0))[1]) is not None


async def no_refresh(image_id: str) -> Image:
    raise AssertionError("not called")


async def test_a_request_waiting_out_a_pause_when_stopped_is_sent_on_the_rerun(
    served: MockDeepMode, model: str, tmp_path: pathlib.Path
) -> None:
    journal, requests = tmp_path / "run.db", requests_for(model, 6)
    async with make_client(served) as dm:
        served.fail("generate", 429, retry_after=5)  # request 0: the batch pauses 5 s
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):  # stopped while the others wait it out
                await run_all(dm, requests, concurrency=2, journal=journal)
        again = sorted(
            await run_all(dm, requests, concurrency=2, journal=journal), key=lambda r: r.index
        )
    assert [r.index for r in again] == list(range(6))
    # The request that met the 429 (0 or 1, both went at once) had its retry stopped:
    # unknown, as the journal cannot tell. Those that waited out the pause were not sent.
    unknown = [r for r in again if isinstance(r.error, OutcomeUnknownError)]
    assert len(unknown) == 1
    assert unknown[0].index in (0, 1)
    assert all(r.ok for r in again if r is not unknown[0])
    assert sum(charges(served, model).values()) == 5


async def test_bad_journal_arguments() -> None:
    async with AsyncClient("k", base_url="http://127.0.0.1:9") as dm:
        with pytest.raises(ValidationError, match="journal must be"):
            await run_all(dm, [], journal=42)
        with pytest.raises(ValidationError, match="resend_unknown"):
            await run_all(dm, [], journal=MemoryStore(), resend_unknown="yes")
        # A new MemoryStore each run: a rerun would pay for everything again.
        with pytest.raises(ValidationError, match="could never resume"):
            await run_all(dm, [], journal="memory://")


async def test_a_record_whose_answer_is_not_a_generation_is_a_failure_and_not_resent(
    served: MockDeepMode, model: str, tmp_path: pathlib.Path
) -> None:
    journal = tmp_path / "run.db"
    async with make_client(served) as dm:
        await run_all(dm, requests_for(model, 3), journal=journal)
        rewrite_record(journal, "1", lambda record: {**record, "g": {"x": 1}})
        calls = generate_calls(served, model)
        results = await run_all(dm, requests_for(model, 3), journal=journal)
        results.sort(key=lambda result: result.index)
    assert generate_calls(served, model) == calls  # it was answered once: not paid twice
    assert [result.resumed for result in results] == [True, True, True]
    assert [result.ok for result in results] == [True, False, True]
    error = results[1].error
    assert isinstance(error, StoreError)
    assert "holds an answer that is not readable" in str(error)
    assert "does not fit Generation" in str(error)


def rewrite_record(journal: pathlib.Path, key: str, damage: Any) -> None:
    """Rewrite one record of an SQLite journal with `damage(record)`: JSON that is not a
    record of ours, or bytes as they are."""
    with sqlite3.connect(journal) as conn:
        (value,) = conn.execute("SELECT value FROM records WHERE key = ?", (key,)).fetchone()
        changed = damage(json.loads(value))
        if not isinstance(changed, bytes):
            changed = json.dumps(changed).encode()
        conn.execute("UPDATE records SET value = ? WHERE key = ?", (changed, key))


@given(
    st.dictionaries(st.sampled_from(["model_id", "prompt", "ratio"]), st.text(), min_size=1),
    st.floats(min_value=0, max_value=4e9),
    st.one_of(st.none(), st.lists(st.text(), max_size=3).map(tuple)),
    st.one_of(st.none(), st.text()),
    st.booleans(),
)
def test_records_round_trip(
    request: dict[str, str], sent_at: float, paths: Any, error: str | None, acted: bool
) -> None:
    entry = Entry(request, sent_at, None, paths, error, None if error is None else acted)
    assert Entry.decode(0, entry.encode()) == entry


async def test_the_cli_resumes_and_says_how_it_went(
    served: MockDeepMode, model: str, tmp_path: pathlib.Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\n")
    env = {**os.environ, "DEEPMODE_API_KEY": served.api_key, "DEEPMODE_BASE_URL": served.base_url}
    base = ["-m", "deepmode_async", "generate", "--model-id", model, "--prompts-file", str(prompts)]

    async def deepmode(*args: str) -> tuple[int, str]:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            *base,
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        _, stderr = await asyncio.wait_for(child.communicate(), 60)
        assert child.returncode is not None
        return child.returncode, stderr.decode()

    journal = str(tmp_path / "run.db")
    first, second = await asyncio.gather(
        deepmode("--journal", journal, "--out", str(tmp_path / "out")),
        deepmode("--resend-unknown"),  # refused: it means something only with --journal
    )
    assert first == (0, "journal: 0 resumed, 3 sent, 0 unknown, 0 failed\n")
    assert second[0] != 0
    assert "--resend-unknown needs --journal" in second[1]
    again = await deepmode("--journal", journal, "--out", str(tmp_path / "out"))
    assert again == (0, "journal: 3 resumed, 0 sent, 0 unknown, 0 failed\n")
    assert charges(served, model) == {"a": 1, "b": 1, "c": 1}


async def test_chaos_with_interrupted_reruns_never_charges_twice(tmp_path: pathlib.Path) -> None:
    """20 % 429s and 5 % connections dropped after the call was charged, three runs
    broken off part way and a last one to the end: every prompt charged at most once."""
    journal = tmp_path / "run.db"
    async with MockDeepMode() as mock, make_client(mock) as dm:
        model_id = mock.add_model().id
        mock.chaos("generate", rate_limited=0.2, dropped=0.05, seed=18)
        requests = requests_for(model_id, 120)
        for stop_after in (15, 40, 70):
            async with contextlib.aclosing(
                dm.images.generate_many(requests, concurrency=CONCURRENCY, journal=journal)
            ) as stream:
                seen = 0
                async for _ in stream:
                    seen += 1
                    if seen == stop_after:
                        break
        results = await run_all(dm, requests, journal=journal)
        charged = charges(mock, model_id)
    assert sorted(result.index for result in results) == list(range(120))
    assert max(charged.values()) == 1
    assert sum(charged.values()) == len(mock.ledger)
    for result in results:
        if result.ok:
            assert charged[result.request.prompt] == 1
        elif result.resumed:  # dropped in an earlier run: its outcome cannot be known
            assert isinstance(result.error, OutcomeUnknownError), result.error
        else:  # dropped (or refused with 429s too often) in this one
            assert isinstance(result.error, APIConnectionError | RateLimitError), result.error
    assert any(isinstance(result.error, OutcomeUnknownError) for result in results)


async def fill_journal(path: pathlib.Path, count: int) -> list[GenerateRequest]:
    """A journal of `count` recorded results, as a finished batch leaves it."""
    requests = requests_for("model-1", count)
    image = Image("img", "a.jpg", "model-1", "https://blob.example/a.jpg?sig=x", "p", None)
    generation = converter.unstructure(Generation((image,)))
    async with SQLiteStore(path) as store:
        await store.put_many(
            NAMESPACE,
            [
                (str(i), Entry(generate_body(r), 1.0, generation).encode())
                for i, r in enumerate(requests)
            ],
        )
    return requests


async def test_resuming_a_long_journal_keeps_memory_flat(tmp_path: pathlib.Path) -> None:
    peaks = []
    for count in (1_000, 10_000):
        path = tmp_path / f"{count}.db"
        requests = await fill_journal(path, count)
        gc.collect()
        tracemalloc.start()
        try:
            resumed = 0
            async with AsyncClient("k", base_url="http://127.0.0.1:9") as dm:  # no call
                async for result in dm.images.generate_many(iter(requests), journal=path):
                    resumed += result.resumed and result.ok
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert resumed == count
    assert peaks[1] < peaks[0] * 1.3 + 256 * 1024, peaks  # ten times the records


def test_the_blocking_client_resumes_too(
    served: MockDeepMode, model: str, tmp_path: pathlib.Path
) -> None:
    journal = tmp_path / "run.db"
    requests = requests_for(model, 5)
    with Client(served.api_key, base_url=served.base_url) as dm:
        first = list(dm.images.generate_many(requests, journal=journal))
        again = list(dm.images.generate_many(requests, journal=journal))
    assert all(result.ok and not result.resumed for result in first)
    assert all(result.ok and result.resumed for result in again)
    assert {r.index: r.generation for r in again} == {r.index: r.generation for r in first}
    assert max(charges(served, model).values()) == 1
