"""examples/celery_app.py on real processes: a redis-server (broker, result backend,
shared back-off, journals), one `celery worker --concurrency 2` (prefork) for the
module, the driver (as `python -m examples.celery_app`, or `run_batch` here), and the
mock on a thread of this process, reached over loopback, so its images can be counted
by prompt: one image per charged generate call. Each test uses a model of its own.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import ModuleType
from typing import IO

import pytest
from _redis import RedisServer
from conftest import wait_until

from deepmode_async.testing import MockDeepMode

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "celery_app.py"
CELERY = pathlib.Path(sys.executable).parent / "celery"
PROCESSES = 2
CHUNK_CONCURRENCY = 2


class Worker:
    """A `celery worker` process group and its log."""

    def __init__(self, env: dict[str, str], log: pathlib.Path) -> None:
        self.log = log
        with log.open("wb") as output:
            self.process = self._start(env, output)

    @staticmethod
    def _start(env: dict[str, str], output: IO[bytes]) -> subprocess.Popen[bytes]:
        command = [
            str(CELERY), "-A", "examples.celery_app", "worker",
            "--pool", "prefork", "--concurrency", str(PROCESSES),
            "--loglevel", "INFO", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "--hostname", "test@%h",
        ]  # fmt: skip
        return subprocess.Popen(  # noqa: S603
            command,
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its children die with it, whatever happens here
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> list[int]:
        """The pool's processes (billiard forks them from the worker's main thread)."""
        found = []
        for task in pathlib.Path(f"/proc/{self.process.pid}/task").iterdir():
            found += [int(child) for child in (task / "children").read_text().split()]
        return found

    def wait_ready(self) -> None:
        wait_until(
            lambda: " ready." in self.text() and len(self.children()) == PROCESSES,
            30.0,
            step=0.05,
            describe=lambda: f"the worker did not start:\n{self.text()}",
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # warm shutdown: it closes its children
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        # Whatever is left of the group (a child the main process left behind).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture(scope="module")
def served() -> Iterator[MockDeepMode]:
    with MockDeepMode(balance=1_000_000) as mock:
        yield mock


@pytest.fixture(scope="module")
def env(redis_server: RedisServer, served: MockDeepMode) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "DEEPMODE_API_KEY": served.api_key,
        "DEEPMODE_BASE_URL": served.base_url,
        "DEEPMODE_CHUNK_CONCURRENCY": str(CHUNK_CONCURRENCY),
    }


@pytest.fixture(scope="module")
def worker(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    started = Worker(env, tmp_path_factory.mktemp("celery") / "worker.log")
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def example(env: dict[str, str]) -> Iterator[ModuleType]:
    """The example as a module of this process (the driver's side), on the test Redis."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REDIS_URL", env["REDIS_URL"])
        spec = importlib.util.spec_from_file_location("deepmode_celery_example", EXAMPLE)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve annotations through it
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[spec.name]
            raise
    yield module
    module.app.close()
    del sys.modules[spec.name]


def charges(mock: MockDeepMode, model_id: str) -> collections.Counter[str]:
    """Generate calls the mock charged for, by prompt (one image a call)."""
    return collections.Counter(
        image.prompt for image in mock.images.values() if image.model_id == model_id
    )


def tasks_logged(log: str, event: str) -> list[str]:
    """Ids of the chunk tasks the worker logged as `event` ("received", "succeeded")."""
    return re.findall(rf"Task deepmode\.generate_chunk\[([0-9a-f-]+)\] {event}", log)


def test_a_hundred_prompts_in_ten_chunks_are_a_hundred_charges(
    served: MockDeepMode, worker: Worker, env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    served.set_latency("generate", 0.0)
    model_id = served.add_model().id
    prompts = [f"a lighthouse, take {i}" for i in range(100)]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    before = len(served.ledger)
    command = [
        sys.executable, "-m", "examples.celery_app", str(tmp_path / "prompts.txt"),
        "--model-id", model_id, "--chunk-size", "10", "--timeout", "40",
    ]  # fmt: skip
    run = subprocess.run(  # noqa: S603
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, (run.stdout, run.stderr, worker.text())
    assert run.stdout.startswith("done 100 (100 images; 0 from earlier attempts"), run.stdout
    assert "unknown 0" in run.stdout
    assert "failed 0" in run.stdout
    assert "charged: 100 calls this run" in run.stdout
    assert len(served.ledger) - before == 100
    assert charges(served, model_id) == dict.fromkeys(prompts, 1)
    assert env["DEEPMODE_API_KEY"] not in run.stdout + run.stderr + worker.text()


def test_a_killed_worker_process_loses_its_chunk_which_the_driver_resumes(
    served: MockDeepMode, worker: Worker, example: ModuleType
) -> None:
    served.set_latency("generate", 0.3)  # a chunk: 10 prompts, 2 at a time, ~1.5 s
    model_id = served.add_model().id
    prompts = [f"a harbour at dawn, take {i}" for i in range(40)]
    logged_before = len(worker.text())
    killed: list[int] = []

    def kill_one_busy_process() -> None:
        # Both processes hold a chunk from the first calls on (one chunk each at a
        # time), and none finishes before its fifth wave: this kill is mid-chunk.
        wait_until(lambda: len(charges(served, model_id)) >= 3, 20.0)
        victim = worker.children()[0]
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)

    killer = threading.Thread(target=kill_one_busy_process, daemon=True)
    killer.start()
    summary = example.run_batch(prompts, model_id=model_id, chunk_size=10, timeout=40)
    killer.join(5)
    assert killed, "no worker process was killed"

    log = worker.text()[logged_before:]
    assert f"pid:{killed[0]} exited with 'signal 9 (SIGKILL)'" in log
    # Celery ran the lost task no further: 4 chunks and the one sent again by the
    # driver were received, each once, and only those 4 + 1 - 1 succeeded.
    received, succeeded = tasks_logged(log, "received"), tasks_logged(log, "succeeded")
    assert len(received) == len(set(received)) == 5, log
    assert len(succeeded) == 4, log
    assert len(summary.resent) == 1

    done, unknown = set(summary.done), set(summary.unknown)
    assert not summary.failed, summary.failed
    assert done | unknown == set(range(40))
    assert not done & unknown
    # The lost chunk had started: what it had sent is resumed or reported, not re-sent.
    assert summary.resumed + len(unknown) >= 1, summary.text()
    charged = charges(served, model_id)
    assert max(charged.values()) == 1, charged
    assert all(charged[prompts[index]] == 1 for index in done)
    assert set(charged) <= set(prompts)


def test_a_429_met_by_one_worker_process_pauses_the_other(
    served: MockDeepMode, worker: Worker, example: ModuleType
) -> None:
    """The workers' clients share the back-off through the Redis of the example: while
    the server's Retry-After runs, no process sends a new call, not only the one told."""
    served.set_latency("generate", 0.2)
    model_id = served.add_model().id
    prompts = [f"a quay at night, take {i}" for i in range(20)]  # one chunk per process
    retry_after = 1.5
    seen: dict[str, float] = {}  # request id: when it was first seen here
    stop = threading.Event()

    def watch() -> None:
        injected = False
        while not stop.is_set():
            now = time.monotonic()
            for request in served.requests:
                seen.setdefault(request.request_id, now)
            if not injected and len(charges(served, model_id)) >= 4:  # both chunks under way
                served.fail("generate", 429, retry_after=retry_after, detail="slow down")
                injected = True
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary = example.run_batch(prompts, model_id=model_id, chunk_size=10, timeout=40)
    finally:
        stop.set()
        watcher.join(5)
    assert len(summary.done) == 20, summary.text()

    calls = [r for r in served.requests if r.endpoint == "generate" and r.request_id in seen]
    (told,) = [r for r in calls if r.status == 429]  # answered before its body was read
    paused_from = seen[told.request_id] + 0.3  # the push reaches the others within ms
    paused_until = seen[told.request_id] + retry_after - 0.2
    during = [r.json for r in calls if paused_from < seen[r.request_id] < paused_until]
    assert during == [], during
    # Both chunks were still under way: each sent calls after the pause, too.
    after = {
        prompts.index(r.json["prompt"]) // 10 for r in calls if seen[r.request_id] > paused_until
    }
    assert after == {0, 1}
