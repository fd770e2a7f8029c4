"""Client, the blocking facade: derived from AsyncClient, safe across threads and loops."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import pathlib
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import assert_type

import pytest
from conftest import wait_until, write_photo

from deepmode_async import (
    Accepted,
    AsyncClient,
    Balance,
    Client,
    DeepModeError,
    Generation,
    Image,
    NotFoundError,
    ValidationError,
)
from deepmode_async._sync import _Blocking
from deepmode_async.testing import MockDeepMode

RESOURCES = ("models", "images", "account")


@pytest.fixture(scope="module")
def served() -> Iterator[MockDeepMode]:
    """The thread-backed mock: sync tests have no loop of their own to run it on."""
    with MockDeepMode(callback_backoff=0.01) as mock:
        yield mock


@pytest.fixture
def mock(served: MockDeepMode) -> MockDeepMode:
    served.clear_faults()
    return served


@pytest.fixture
def dm(mock: MockDeepMode) -> Iterator[Client]:
    with Client(mock.api_key, base_url=mock.base_url) as client:
        yield client


def client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "deepmode-client" and t.is_alive()]


def test_a_script_calls_every_kind_of_method(dm: Client, mock: MockDeepMode) -> None:
    model = mock.add_model()
    balance = dm.account.balance()
    generation = dm.images.generate(model_id=model.id, prompt="a lighthouse", num_images=2)
    accepted = dm.images.generate(
        model_id=model.id, prompt="a lighthouse", callback="http://127.0.0.1:9/cb"
    )
    image = dm.images.retrieve(generation.images[0].id)
    # mypy checks these: the facade's methods return results, not coroutines.
    assert_type(balance, Balance)
    assert_type(generation, Generation)
    assert_type(accepted, Accepted)
    assert_type(image, Image)
    assert_type(dm.images.upscale(image.id), Image)
    assert len(generation.images) == 2
    assert isinstance(accepted, Accepted)
    assert image.id == generation.images[0].id
    assert balance.remaining_balance == mock.balance + 1 + 1 + 3  # before the paid calls


def test_downloads_and_uploads_go_through_the_facade(
    dm: Client, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    photo = write_photo(tmp_path / "me.jpg")
    dm.models.create(images=[photo], gender="woman", model_type="amateur")
    model = mock.add_model()
    generation = dm.images.generate(model_id=model.id, prompt="a lighthouse")
    (path,) = dm.images.download(generation, tmp_path / "out")
    assert path.read_bytes() == mock.image_bytes


def test_errors_arrive_typed_in_the_calling_thread(dm: Client) -> None:
    with pytest.raises(NotFoundError, match="not found"):
        dm.images.retrieve("no-such-image")
    with pytest.raises(ValidationError, match="prompt"):
        dm.images.generate(model_id="m", prompt=" ")


def test_closing_twice_is_harmless_and_later_calls_say_closed(mock: MockDeepMode) -> None:
    dm = Client(mock.api_key, base_url=mock.base_url)
    dm.account.balance()
    assert client_threads()
    dm.close()
    dm.close()
    assert dm.closed
    assert not client_threads()  # the helper thread was joined
    with pytest.raises(DeepModeError, match="closed"):
        dm.account.balance()


def test_a_client_never_used_starts_no_thread(mock: MockDeepMode) -> None:
    with Client(mock.api_key, base_url=mock.base_url) as dm:
        assert repr(dm) == f"Client(base_url={mock.base_url!r})"
        assert not client_threads()


def test_it_refuses_an_aiohttp_session() -> None:
    with pytest.raises(ValidationError, match="AsyncClient"):
        Client("k", session=object())  # type: ignore[arg-type]


def test_eight_threads_share_one_client(dm: Client, mock: MockDeepMode) -> None:
    model = mock.add_model()
    charges_before = len(mock.ledger)
    results: list[Generation] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                results.append(dm.images.generate(model_id=model.id, prompt="a lighthouse"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(results) == 160
    assert all(isinstance(result, Generation) for result in results)
    assert len(mock.ledger) - charges_before == 160
    assert len(client_threads()) == 1  # one loop serves them all


def test_it_works_inside_a_running_event_loop(dm: Client, mock: MockDeepMode) -> None:
    async def notebook_cell() -> int:
        return dm.account.balance().remaining_balance  # a blocking call, as in Jupyter

    assert asyncio.run(notebook_cell()) == mock.balance


def test_ctrl_c_cancels_the_call_in_flight(dm: Client, mock: MockDeepMode) -> None:
    dm.account.balance()  # the loop is up: the interrupt lands while waiting for the call
    mock.stall("balance", seconds=30)
    # What Ctrl+C does: SIGINT to the main thread, where the call waits.
    main = threading.main_thread().ident
    assert main is not None
    sent = len(mock.requests)
    calling = threading.Event()  # cleared if the call ends first: no stray SIGINT later

    def interrupt_once_the_call_is_held() -> None:
        deadline = time.monotonic() + 5
        while len(mock.requests) == sent and time.monotonic() < deadline:
            time.sleep(0.01)
        if calling.is_set():
            signal.pthread_kill(main, signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_once_the_call_is_held)
    calling.set()
    interrupter.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            dm.account.balance()
    finally:
        calling.clear()
        interrupter.join()
    assert time.monotonic() - started < 5
    wait_until(  # the call was cancelled, its connection closed
        lambda: mock.requests[-1].disconnected,
        describe=lambda: "the mock never saw the connection close",
    )
    assert dm.account.balance().remaining_balance == mock.balance  # still usable


def test_a_call_from_the_clients_own_loop_fails_instead_of_hanging(
    dm: Client, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    model = mock.add_model()
    generation = dm.images.generate(model_id=model.id, prompt="a lighthouse")
    errors: list[DeepModeError] = []

    def progress(_: object) -> None:
        try:
            dm.account.balance()  # runs on the helper loop: must not wait for itself
        except DeepModeError as exc:
            errors.append(exc)

    dm.images.download(generation, tmp_path, progress=progress)
    assert errors
    assert "own event loop" in str(errors[0])


def test_every_method_has_the_signature_and_docs_of_its_async_twin(mock: MockDeepMode) -> None:
    async_client = AsyncClient("k")
    sync_client = Client("k")
    assert inspect.signature(Client.__init__) == inspect.signature(AsyncClient.__init__)
    checked = 0
    for resource in RESOURCES:
        async_resource = getattr(async_client, resource)
        sync_resource = getattr(sync_client, resource)
        names = {n for n in dir(async_resource) if not n.startswith("_")}
        assert names == set(dir(sync_resource))
        assert "with_raw_response" in names
        raw_async, raw_sync = async_resource.with_raw_response, sync_resource.with_raw_response
        raw_names = set(dir(raw_async))
        assert raw_names == set(dir(raw_sync))
        assert raw_names < names
        pairs = [(async_resource, sync_resource, n) for n in names - {"with_raw_response"}]
        pairs += [(raw_async, raw_sync, n) for n in raw_names]
        for async_side, sync_side, name in pairs:
            async_method = getattr(async_side, name)
            sync_method = getattr(sync_side, name)
            assert inspect.signature(sync_method) == inspect.signature(async_method), name
            assert sync_method.__doc__ == async_method.__doc__
            assert not inspect.iscoroutinefunction(sync_method)
            checked += 1
    assert checked >= 9 + 8
    sync_client.close()


def test_the_static_types_are_generated_from_the_current_source() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent
    result = subprocess.run(  # noqa: S603
        [sys.executable, str(root / "tools" / "generate_blocking_types.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


class Counter:
    """Stands in for a resource with an async iterator (as generate_many will be)."""

    def __init__(self) -> None:
        self.produced = 0
        self.finished = threading.Event()
        self.cancelled = False

    async def count(self, up_to: int) -> AsyncIterator[int]:
        try:
            for number in range(up_to):
                self.produced += 1
                yield number
                await asyncio.sleep(0)
        except BaseException:
            self.cancelled = True
            raise
        finally:
            self.finished.set()

    async def fail_after(self, count: int) -> AsyncIterator[int]:
        for number in range(count):
            yield number
        raise DeepModeError("ran out")


def test_an_async_iterator_becomes_a_plain_iterator(dm: Client) -> None:
    counter = Counter()
    blocking = _Blocking(counter, dm._loop)
    assert list(blocking.count(5)) == [0, 1, 2, 3, 4]
    assert counter.finished.is_set()
    assert not counter.cancelled


def test_breaking_out_of_the_loop_stops_the_work(dm: Client) -> None:
    counter = Counter()
    for number in _Blocking(counter, dm._loop).count(1_000_000):
        if number == 3:
            break
    assert counter.finished.wait(5)
    assert counter.cancelled
    assert counter.produced < 10


def test_an_error_in_the_iterator_reaches_the_loop(dm: Client) -> None:
    numbers = _Blocking(Counter(), dm._loop).fail_after(2)
    assert [next(numbers), next(numbers)] == [0, 1]
    with pytest.raises(DeepModeError, match="ran out"):
        next(numbers)


def test_a_forgotten_client_is_closed_when_collected(mock: MockDeepMode) -> None:
    dm = Client(mock.api_key, base_url=mock.base_url)
    dm.account.balance()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del dm
        gc.collect()
    assert [w.category for w in caught] == [ResourceWarning]
    assert "was not closed" in str(caught[0].message)
    assert not client_threads()


FORGETFUL_SCRIPT = """
from deepmode_async import Client
from deepmode_async.testing import MockDeepMode, sample_image

mock = MockDeepMode()
mock.__enter__()
dm = Client(mock.api_key, base_url=mock.base_url)
dm.account.balance()
print("called", flush=True)
"""


def test_a_forgotten_client_does_not_hang_or_leak_at_exit() -> None:
    result = subprocess.run(  # noqa: S603
        [sys.executable, "-W", "always::ResourceWarning", "-c", FORGETFUL_SCRIPT],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "called\n"
    assert "was not closed" in result.stderr
    for noise in ("Unclosed client session", "Event loop is closed", "Traceback"):
        assert noise not in result.stderr


class Batcher:
    """Shaped like generate_many: yields from inside a task group."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    async def batch(self, count: int) -> AsyncIterator[int]:
        import anyio

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(anyio.sleep, 0)
                for number in range(count):
                    yield number
        finally:
            self.closed.set()


def test_breaking_out_of_a_task_group_iterator_keeps_the_client_alive(dm: Client) -> None:
    batcher = Batcher()
    for number in _Blocking(batcher, dm._loop).batch(100):
        if number == 2:
            break
    assert batcher.closed.wait(5)
    assert dm.account.balance().remaining_balance > 0  # the loop survived


def test_closing_while_an_iteration_is_paused_does_not_hang(mock: MockDeepMode) -> None:
    dm = Client(mock.api_key, base_url=mock.base_url)
    counter = Counter()
    numbers = _Blocking(counter, dm._loop).count(100)
    assert next(numbers) == 0
    closer = threading.Thread(target=dm.close)
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "close() hung on a paused iteration"
    with pytest.raises(DeepModeError, match="closed"):
        next(numbers)
    assert not client_threads()


def test_calls_in_flight_when_another_thread_closes_get_a_typed_error(
    mock: MockDeepMode,
) -> None:
    dm = Client(mock.api_key, base_url=mock.base_url, max_retries=2)
    dm.account.balance()
    mock.fail("balance", 503, retry_after=5, times=8)  # calls wait in their backoff
    errors: list[BaseException] = []

    def call() -> None:
        try:
            dm.account.balance()
        except BaseException as exc:
            errors.append(exc)

    callers = [threading.Thread(target=call) for _ in range(4)]
    for caller in callers:
        caller.start()
    time.sleep(0.3)
    dm.close()
    for caller in callers:
        caller.join(10)
    assert len(errors) == 4
    assert all(isinstance(error, DeepModeError) for error in errors), errors
    assert all("closed" in str(error) for error in errors)


def test_close_from_the_clients_own_loop_does_not_deadlock(
    mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    dm = Client(mock.api_key, base_url=mock.base_url)
    model = mock.add_model()
    generation = dm.images.generate(model_id=model.id, prompt="a lighthouse")

    def progress(_: object) -> None:
        dm.close()

    # Whether the download finishes first or its session goes away under it, no hang.
    with contextlib.suppress(DeepModeError):
        dm.images.download(generation, tmp_path, progress=progress)
    assert dm.closed
    wait_until(lambda: not client_threads(), describe=lambda: "the loop thread was not stopped")


def test_a_forgotten_client_is_closed_without_the_cycle_collector(mock: MockDeepMode) -> None:
    dm = Client(mock.api_key, base_url=mock.base_url)
    dm.account.balance()
    gc.disable()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del dm
    finally:
        gc.enable()
    assert [w.category for w in caught] == [ResourceWarning]
    assert not client_threads()


FORK_SCRIPT = """
import os, sys
from deepmode_async import Client
from deepmode_async.testing import MockDeepMode

mock = MockDeepMode()
mock.__enter__()
dm = Client(mock.api_key, base_url=mock.base_url)
dm.account.balance()
pid = os.fork()
if pid == 0:
    try:
        dm.account.balance()  # the child starts a loop of its own
        dm.close()
        os._exit(0)
    except BaseException as exc:
        print("child failed:", repr(exc), flush=True)
        os._exit(1)
_, status = os.waitpid(pid, 0)
dm.close()
print("child exit", os.waitstatus_to_exitcode(status), flush=True)
"""


def test_a_forked_child_starts_its_own_loop() -> None:
    result = subprocess.run(  # noqa: S603
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", FORK_SCRIPT],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.stdout.strip().endswith("child exit 0"), result.stdout + result.stderr
