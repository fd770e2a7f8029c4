"""The mock in a process of its own: `mock_process()` starts, reads and stops it."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import IO, Any, Self

import anyio
import anyio.abc
import anyio.from_thread
from anyio.streams.buffered import BufferedByteReceiveStream

from .._errors import DeepModeError

#: What `python -m deepmode_async.testing` and `deepmode mock serve` print once serving
#: (the third line is a comment for people; the blob URL is read from it).
_BASE_URL = "DEEPMODE_BASE_URL="
_API_KEY = "DEEPMODE_API_KEY="
_BLOB_LINE = "# images are served from "
_MODULE = (sys.executable, "-m", "deepmode_async.testing")
_STDERR_SHOWN = 4000  # characters of a failed mock's stderr kept in the error


def mock_process(
    *,
    api_key: str | None = None,
    balance: int | None = None,
    latency: float | None = None,
    training_delay: float | None = None,
    image_size: int | None = None,
    host: str | None = None,
    port: int | None = None,
    blob_port: int | None = None,
    command: Sequence[str] = _MODULE,
    env: Mapping[str, str] | None = None,
    stop_signal: signal.Signals = signal.SIGTERM,
    start_timeout: float = 30.0,
    stop_timeout: float = 5.0,
) -> MockProcess:
    """The mock DeepMode API in its own interpreter, for `async with` (or `with`).

    ```python
    async with mock_process(latency=0.05) as mock:
        async with AsyncClient(mock.api_key, base_url=mock.base_url) as dm:
            ...
    ```

    Entering starts `python -m deepmode_async.testing` with the options given (those
    left at None keep the mock's defaults) and returns once it serves; `mock.base_url`,
    `mock.api_key`, `mock.blob_base_url` and `mock.pid` say where. Leaving sends
    `stop_signal`, kills the mock if it has not exited `stop_timeout` seconds later, and
    always waits for it, also when the body raised or was cancelled; `mock.returncode`
    and `mock.stderr` then tell how it ended. A mock that exits before serving, or does
    not serve within `start_timeout` seconds, raises `DeepModeError` with its stderr.

    `command` is the program that serves (`("deepmode", "mock", "serve")` tests the
    command line's own), `env` its environment (default: this process's). The blocking
    form, `with mock_process() as mock:`, runs the same code on an event loop in a
    background thread.
    """
    options = {
        "--api-key": api_key,
        "--balance": balance,
        "--latency": latency,
        "--training-delay": training_delay,
        "--image-size": image_size,
        "--host": host,
        "--port": port,
        "--blob-port": blob_port,
    }
    argv = [*command]
    for flag, value in options.items():
        if value is not None:
            argv += [flag, str(value)]
    return MockProcess(
        argv,
        env=env,
        secret=api_key,
        stop_signal=stop_signal,
        start_timeout=start_timeout,
        stop_timeout=stop_timeout,
    )


class MockProcess:
    """A mock served by another process; made by `mock_process()`, which documents it."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None,
        secret: str | None,
        stop_signal: signal.Signals,
        start_timeout: float,
        stop_timeout: float,
    ) -> None:
        self._argv = list(argv)
        self._env = dict(env) if env is not None else None
        self._secret = secret
        self._stop_signal = stop_signal
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._process: anyio.abc.Process | None = None
        self._stderr_file: IO[bytes] | None = None
        self._printed: dict[str, str] = {}
        self._portal: contextlib.ExitStack | None = None
        self._pid: int | None = None
        self.returncode: int | None = None
        """How the process ended (negative: the signal that ended it); None until then."""
        self.stderr = ""
        """What the process wrote to stderr, once it has ended."""

    def __repr__(self) -> str:
        if self._process is None:
            return f"MockProcess(not running, returncode={self.returncode})"
        return f"MockProcess(pid={self.pid}, base_url={self.base_url!r})"

    @property
    def pid(self) -> int:
        """The process id, from start on (kept after it ended)."""
        if self._pid is None:
            raise RuntimeError("the mock process was never started: use `async with`")
        return self._pid

    @property
    def base_url(self) -> str:
        """The API's URL, such as `http://127.0.0.1:PORT`."""
        return self._setting("base_url")

    @property
    def api_key(self) -> str:
        """The key the mock accepts."""
        return self._setting("api_key")

    @property
    def blob_base_url(self) -> str:
        """The image host's URL."""
        return self._setting("blob_base_url")

    def _setting(self, name: str) -> str:
        if self._process is None:
            raise RuntimeError("the mock process is not running: use `async with`")
        return self._printed[name]

    # ------------------------------------------------------------------ async form

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the mock and wait until it serves (what `async with` does first)."""
        if self._process is not None:
            raise RuntimeError("the mock process is already running")
        self.returncode, self.stderr = None, ""
        # A file, not a pipe: nobody has to keep reading it for the mock not to block.
        self._stderr_file = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        try:
            self._process = await anyio.open_process(
                self._argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._stderr_file,
                env=self._env,
            )
        except BaseException:
            self._stderr_file.close()
            raise
        self._pid = self._process.pid
        try:
            with anyio.fail_after(self._start_timeout):
                self._printed = await _read_settings(self._process)
        except BaseException as exc:
            if isinstance(exc, _Exited):
                # Let it end on its own: a signal now would make Popen poll, and reap,
                # the child before asyncio's watcher can read its exit status.
                with anyio.move_on_after(self._stop_timeout, shield=True):
                    await self._process.wait()
            await self.stop()
            if isinstance(exc, TimeoutError):
                raise DeepModeError(
                    f"the mock did not serve within {self._start_timeout} s{self._shown_stderr()}"
                ) from None
            if isinstance(exc, _Exited):
                raise DeepModeError(
                    f"the mock exited with {self.returncode} before serving{self._shown_stderr()}"
                ) from None
            raise

    async def stop(self) -> None:
        """Stop the mock and wait for it (what leaving `async with` does); harmless twice."""
        process, self._process = self._process, None
        if process is None:
            return
        with anyio.CancelScope(shield=True):  # a cancelled body must not leave it running
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(self._stop_signal)
                with anyio.move_on_after(self._stop_timeout):
                    await process.wait()
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            await process.aclose()
        self.returncode = process.returncode
        if self._stderr_file is not None:
            self._stderr_file.seek(0)
            self.stderr = self._stderr_file.read().decode(errors="replace")
            self._stderr_file.close()
            self._stderr_file = None

    def _shown_stderr(self) -> str:
        shown = self.stderr.strip()[-_STDERR_SHOWN:]
        if self._secret:
            shown = shown.replace(self._secret, "***")
        return f"; its stderr:\n{shown}" if shown else " (its stderr was empty)"

    # ------------------------------------------------------------------ blocking form

    def __enter__(self) -> Self:
        with contextlib.ExitStack() as stack:
            portal = stack.enter_context(anyio.from_thread.start_blocking_portal())
            portal.call(self.start)
            stack.callback(portal.call, self.stop)
            self._portal = stack.pop_all()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._portal is not None:
            self._portal.close()
            self._portal = None


class _Exited(Exception):
    """The mock's stdout ended before it said where it serves."""


async def _read_settings(process: anyio.abc.Process) -> dict[str, str]:
    """Read the mock's stdout up to its last line about where it serves: the one parser
    of that output."""
    assert process.stdout is not None
    stdout = BufferedByteReceiveStream(process.stdout)
    printed: dict[str, str] = {}
    while "blob_base_url" not in printed:
        try:
            line = (await stdout.receive_until(b"\n", 65536)).decode().strip()
        except (anyio.EndOfStream, anyio.IncompleteRead):
            raise _Exited from None
        if line.startswith(_BASE_URL):
            printed["base_url"] = line.removeprefix(_BASE_URL)
        elif line.startswith(_API_KEY):
            printed["api_key"] = line.removeprefix(_API_KEY)
        elif line.startswith(_BLOB_LINE):
            printed["blob_base_url"] = line.removeprefix(_BLOB_LINE).partition(";")[0]
    if printed.keys() != {"base_url", "api_key", "blob_base_url"}:
        raise DeepModeError(f"the mock did not print its base URL and key: {sorted(printed)}")
    return printed
