"""The `deepmode` command line, run as a subprocess against the thread-backed mock."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.server
import json
import os
import pathlib
import pty
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, TypeAlias

import conftest
import pytest
import uvloop
from conftest import wait_until

from deepmode_async import Client
from deepmode_async.testing import MockDeepMode, MockProcess, mock_process, sample_image

DEEPMODE = pathlib.Path(sys.executable).with_name("deepmode")
TIMEOUT = 30
Done: TypeAlias = subprocess.CompletedProcess[str]


@pytest.fixture
def mock() -> Iterator[MockDeepMode]:
    """A fresh thread-backed mock per test, so `requests` and `ledger` start empty."""
    with MockDeepMode() as served:
        yield served


@pytest.fixture
def env(mock: MockDeepMode) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DEEPMODE_")}
    return base | {"DEEPMODE_API_KEY": mock.api_key, "DEEPMODE_BASE_URL": mock.base_url}


@pytest.fixture
def model_id(mock: MockDeepMode) -> str:
    return mock.add_model().id


def command(*args: str, module: bool = False) -> list[str]:
    prefix = [sys.executable, "-m", "deepmode_async"] if module else [str(DEEPMODE)]
    return [*prefix, *args]


def run(env: Mapping[str, str], *args: str, module: bool = False) -> Done:
    (done,) = run_all(env, command(*args, module=module))
    return done


def run_all(
    env: Mapping[str, str],
    *commands: list[str],
    cwd: pathlib.Path | None = None,
    tty: bool = False,
) -> list[Done]:
    """Run the commands side by side (each start costs ~0.3 s of imports), in order.

    stdin is /dev/null (never a terminal). With `tty`, each command's stderr is a
    pseudo-terminal of its own, as on a console (progress bars show), and `stderr`
    holds what that terminal received.
    """
    terminals = [Terminal() for _ in commands] if tty else []
    started: list[subprocess.Popen[str]] = []
    done = []
    try:
        for index, argv in enumerate(commands):
            started.append(
                subprocess.Popen(  # noqa: S603 (our own entry point)
                    argv,
                    env=dict(env),
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=terminals[index].slave if tty else subprocess.PIPE,
                    text=True,
                )
            )
        for terminal in terminals:
            terminal.listen()
        for index, (process, argv) in enumerate(zip(started, commands, strict=True)):
            stdout, stderr = process.communicate(timeout=TIMEOUT)
            if tty:
                stderr = terminals[index].received()
            done.append(subprocess.CompletedProcess(argv, process.returncode, stdout, stderr))
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.communicate()
        for terminal in terminals:
            terminal.close()
    return done


class Terminal:
    """A pseudo-terminal for a child's stderr; a thread drains it (so the child never
    blocks on a full terminal) until the child is gone."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._closed = False

    def listen(self) -> None:
        """Once the child has the slave side: drop ours, so reads end when the child does."""
        os.close(self.slave)
        self.slave = -1
        self._reader.start()

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not chunk:
                return
            self._chunks.append(chunk)

    def received(self) -> str:
        self._reader.join(TIMEOUT)
        assert not self._reader.is_alive(), "the terminal was not closed by the command"
        return b"".join(self._chunks).decode("utf-8", "replace")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.slave >= 0:
            os.close(self.slave)
        if self._reader.is_alive():
            self._reader.join(TIMEOUT)
        os.close(self.master)


def generate_requests(mock: MockDeepMode) -> list[str]:
    """Prompts of the generate calls the server saw."""
    return [r.json["prompt"] for r in mock.requests if r.endpoint == "generate"]


def assert_one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# ----------------------------------------------------------------------------- balance


def test_balance_plain_json_and_module(env: dict[str, str]) -> None:
    plain, as_json, module = run_all(
        env,
        command("balance"),
        command("balance", "--json"),
        command("balance", module=True),
    )
    assert (plain.returncode, plain.stdout, plain.stderr) == (0, "10000 credits\n", "")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {"remaining_balance": 10000}
    assert (module.returncode, module.stdout) == (0, "10000 credits\n"), module.stderr


# ----------------------------------------------------------------------------- generate


def test_generate_json(mock: MockDeepMode, env: dict[str, str], model_id: str) -> None:
    result = run(
        env, "generate", "--model-id", model_id, "--prompt", "a lighthouse", "--num-images", "2",
        "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    items = json.loads(result.stdout)
    assert len(items) == 1
    item = items[0]
    assert (item["index"], item["prompt"], item["ok"], item["error"]) == (
        0,
        "a lighthouse",
        True,
        None,
    )
    images = item["generation"]["images"]
    assert len(images) == 2
    assert {image["id"] for image in images} <= set(mock.images)
    assert [charge.endpoint for charge in mock.ledger] == ["generate"]


def test_generate_plain(mock: MockDeepMode, env: dict[str, str], model_id: str) -> None:
    result = run(env, "generate", "--model-id", model_id, "--prompt", "a lighthouse")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("[0] ")
    image_id, url = lines[0].split()[1:]
    assert image_id in mock.images
    assert url.startswith("http://127.0.0.1:")


def test_generate_batch_downloads(
    mock: MockDeepMode, env: dict[str, str], model_id: str, tmp_path: pathlib.Path
) -> None:
    out = tmp_path / "out"
    result = run(
        env, "generate", "--model-id", model_id, "--prompt", "a cat", "--count", "3",
        "--concurrency", "2", "--out", str(out), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    items = json.loads(result.stdout)
    assert [item["index"] for item in items] == [0, 1, 2]
    assert all(item["ok"] for item in items)
    paths = [pathlib.Path(path) for item in items for path in item["paths"]]
    assert len(paths) == 3
    files = sorted(out.iterdir())
    assert files == sorted(paths)
    assert not [f for f in files if f.name.startswith(".")]
    assert all(f.read_bytes() == mock.image_bytes for f in files)
    assert generate_requests(mock) == ["a cat"] * 3


def test_generate_batch_plain_lines_with_out(
    mock: MockDeepMode, env: dict[str, str], model_id: str, tmp_path: pathlib.Path
) -> None:
    result = run(
        env, "generate", "--model-id", model_id, "--prompt", "a cat", "--count", "2",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stdout.splitlines())
    assert [line.split()[0] for line in lines] == ["[0]", "[1]"]
    for line in lines:
        path = pathlib.Path(line.split()[1])
        assert path.parent == tmp_path
        assert path.read_bytes() == mock.image_bytes


def test_images_paid_for_are_shown_when_their_download_fails(
    mock: MockDeepMode, env: dict[str, str], model_id: str, tmp_path: pathlib.Path
) -> None:
    mock.fail("download", 500, times=1000)
    art, mask = write_photos(tmp_path, 2)
    generated, remixed = run_all(
        env,
        command("generate", "--model-id", model_id, "--prompt", "a cat", "--num-images", "2",
                "--out", str(tmp_path / "g"), "--max-retries", "0"),
        command("remix", "--model-id", model_id, "--artwork-image", art, "--mask-image", mask,
                "--out", str(tmp_path / "r"), "--max-retries", "0"),
    )  # fmt: skip
    assert generated.returncode == remixed.returncode == 1
    # Each image's id and URL on stdout (`deepmode download ID` fetches it again), the
    # failure on stderr.
    (line,) = generated.stdout.splitlines()
    assert line.startswith("[0] ")
    ids = line.split()[1::2]
    assert sorted(ids) == sorted(image.id for image in mock.images.values())
    assert "failed" in generated.stderr
    remix_id = remixed.stdout.split()[0]
    assert remix_id in mock.remixes
    assert not list((tmp_path / "g").glob("*"))
    assert not list((tmp_path / "r").glob("*"))


def test_generate_prompts_file(
    mock: MockDeepMode, env: dict[str, str], model_id: str, tmp_path: pathlib.Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n  a dog  \n   \na bird\n", encoding="utf-8")
    result = run(env, "generate", "--model-id", model_id, "--prompts-file", str(prompts), "--json")
    assert result.returncode == 0, result.stderr
    items = json.loads(result.stdout)
    assert [(item["index"], item["prompt"]) for item in items] == [
        (0, "a cat"),
        (1, "a dog"),
        (2, "a bird"),
    ]
    assert sorted(generate_requests(mock)) == ["a bird", "a cat", "a dog"]
    assert len(mock.ledger) == 3


def test_generate_prompts_from_a_pipe_with_every_line_break_and_a_bad_line_named(
    mock: MockDeepMode, env: dict[str, str], model_id: str, tmp_path: pathlib.Path
) -> None:
    args = ("generate", "--model-id", model_id, "--json")
    piped = subprocess.run(  # noqa: S603 (our own entry point)
        command(*args, "--prompts-file", "/dev/stdin"),
        env=env,
        input="a cat\na dog\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert piped.returncode == 0, piped.stderr  # a pipe is read once, and kept
    assert [item["prompt"] for item in json.loads(piped.stdout)] == ["a cat", "a dog"]
    breaks = tmp_path / "breaks.txt"
    breaks.write_text("a cat\u2028a dog\x0ca bird\r\na fish\ra bee\n", encoding="utf-8")
    split = run(env, *args, "--prompts-file", str(breaks))
    assert split.returncode == 0, split.stderr  # lines as str.splitlines sees them
    assert [item["prompt"] for item in json.loads(split.stdout)] == [
        "a cat",
        "a dog",
        "a bird",
        "a fish",
        "a bee",
    ]
    calls = len(mock.ledger)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a cat\n" * 3000 + b"a \xff dog\n")
    refused = run(env, "generate", "--model-id", model_id, "--prompts-file", str(bad))
    assert refused.returncode == 2
    assert "line 3001 is not UTF-8" in refused.stderr
    assert len(mock.ledger) == calls == 7  # nothing sent for a file with a bad line


def test_a_long_prompts_file_runs_in_flat_memory(tmp_path: pathlib.Path) -> None:
    """Prompts are streamed from the file and results counted, not kept: 12,000 prompts
    take about the memory of 2,000 (keeping them took ~1.1 KiB each)."""

    def peak_rss_mib(env: Mapping[str, str], model_id: str, count: int) -> float:
        prompts = tmp_path / f"prompts-{count}.txt"
        prompts.write_text("".join(f"a lighthouse number {i}\n" for i in range(count)))
        args = ["generate", "--model-id", model_id, "--prompts-file", str(prompts)]
        child = subprocess.Popen(  # noqa: S603 (our own entry point)
            command(*args, "--concurrency", "50"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # The peak of the child's own memory (VmHWM starts again at exec, unlike
        # ru_maxrss, which a forked child inherits from this big process).
        peak = 0
        while child.poll() is None:
            with contextlib.suppress(OSError):
                for line in pathlib.Path(f"/proc/{child.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
            time.sleep(0.02)
        assert child.returncode == 0
        return peak / 1024

    with mock_process(balance=10**6) as served:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPMODE_")}
        env |= {"DEEPMODE_API_KEY": served.api_key, "DEEPMODE_BASE_URL": served.base_url}
        photo = tmp_path / "me.jpg"
        photo.write_bytes(sample_image())
        args = ("models", "create", str(photo), "--gender", "man", "--model-type", "professional")
        trained = run(env, "--json", *args, "--wait")
        assert trained.returncode == 0, trained.stderr
        model_id = json.loads(trained.stdout)["id"]
        small, large = peak_rss_mib(env, model_id, 2000), peak_rss_mib(env, model_id, 12_000)
    assert large - small < 5.0, (small, large)


# ----------------------------------------------------------------------------- failures


def test_generate_unknown_model_fails(mock: MockDeepMode, env: dict[str, str]) -> None:
    args = ("generate", "--model-id", "no-such-model", "--prompt", "a cat")
    plain, as_json, debug = run_all(
        env, command(*args), command(*args, "--json"), command(*args, "--debug")
    )
    assert plain.returncode == 1
    # The failure's detail and the summary, both on stderr; no result on stdout.
    assert plain.stdout == ""
    detail, summary = plain.stderr.splitlines()
    assert detail.startswith("[0] failed: "), detail
    assert "404" in detail, detail
    assert summary == "error: 1 of 1 requests failed"

    assert as_json.returncode == 1
    assert_one_error_line(as_json.stderr)
    (item,) = json.loads(as_json.stdout)
    assert (item["ok"], item["generation"], item["paths"]) == (False, None, None)
    assert item["error"]
    assert item["error_type"].endswith("Error")

    assert debug.returncode == 1
    assert "Traceback" in debug.stderr

    assert len(generate_requests(mock)) == 3
    assert mock.ledger == []


def normalized(text: str) -> str:
    return text.replace("-", "").replace("_", "").lower()


def test_generate_validation_before_any_request(
    mock: MockDeepMode, env: dict[str, str], model_id: str, tmp_path: pathlib.Path
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n", encoding="utf-8")
    cases = {
        "--prompt must not be empty": ["--prompt", ""],
        "--num-images must be": ["--prompt", "a cat", "--num-images", "9"],
        "--prompt or --prompts-file": [],
        "--count": ["--prompt", "a cat", "--count", "0"],
        "cannot read --prompts-file": ["--prompts-file", str(tmp_path / "missing.txt")],
        "no prompts": ["--prompts-file", str(empty)],
        "--prompts-file, not both": ["--prompt", "a", "--prompts-file", str(empty)],
        "--count is for --prompt": ["--prompts-file", str(empty), "--count", "2"],
    }
    results = run_all(
        env, *(command("generate", "--model-id", model_id, *args) for args in cases.values())
    )
    for needle, result in zip(cases, results, strict=True):
        assert result.returncode == 2, (needle, result.stdout, result.stderr)
        line = assert_one_error_line(result.stderr)
        assert normalized(needle) in normalized(line), line
        assert result.stdout == ""
    assert mock.requests == []


def test_a_journal_that_cannot_be_opened_says_so_without_a_resume_hint(
    mock: MockDeepMode, env: dict[str, str], model_id: str, tmp_path: pathlib.Path
) -> None:
    done = run(env, "generate", "--model-id", model_id, "--prompt", "x", "--journal", str(tmp_path))
    assert done.returncode == 1
    line = assert_one_error_line(done.stderr)  # nothing was interrupted: no resume hint
    assert "cannot write the SQLite store" in line, line
    assert generate_requests(mock) == []


def test_an_interrupted_json_batch_still_prints_what_was_paid_for(
    mock: MockDeepMode, env: dict[str, str], model_id: str
) -> None:
    mock.set_latency("generate", 0.3)
    args = ("generate", "--model-id", model_id, "--count", "40", "--concurrency", "2", "--json")
    child = subprocess.Popen(  # noqa: S603
        command(*args, "--prompt", "x"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    # Charged when the mock takes a call: with 2 at a time, 6 charges mean 4 answered.
    wait_until(lambda: len(mock.ledger) >= 6, within=TIMEOUT)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=TIMEOUT)
    assert child.returncode == 130, stderr
    printed = json.loads(stdout)
    assert 2 <= len(printed) <= len(mock.ledger)
    assert all(item["ok"] and item["generation"]["images"] for item in printed)


def test_output_that_cannot_be_written_is_one_error_line(env: dict[str, str]) -> None:
    with open("/dev/full", "w") as full:
        done = subprocess.run(  # noqa: S603
            command("balance"), env=env, stdout=full, stderr=subprocess.PIPE, text=True,
            timeout=TIMEOUT, check=False,
        )  # fmt: skip
    assert done.returncode == 1
    assert assert_one_error_line(done.stderr) == (
        "error: cannot write the output: No space left on device"
    )


def test_generate_bad_ratio_is_an_argparse_error(
    mock: MockDeepMode, env: dict[str, str], model_id: str
) -> None:
    result = run(env, "generate", "--model-id", model_id, "--prompt", "a", "--ratio", "wide")
    assert result.returncode == 2
    assert "invalid choice: 'wide'" in result.stderr
    assert "Traceback" not in result.stderr
    assert mock.requests == []


def test_wrong_key_is_401_and_not_echoed(mock: MockDeepMode, env: dict[str, str]) -> None:
    key = "wrong-key-0123456789"
    result = run(env, "balance", "--api-key", key)
    assert result.returncode == 1
    line = assert_one_error_line(result.stderr)
    assert "401" in line
    assert key not in result.stderr
    assert key not in result.stdout
    assert [r.status for r in mock.requests] == [401]


def test_no_key_at_all(mock: MockDeepMode, env: dict[str, str]) -> None:
    del env["DEEPMODE_API_KEY"]
    result = run(env, "balance")
    assert result.returncode in (1, 2)
    line = assert_one_error_line(result.stderr)
    assert "DEEPMODE_API_KEY" in line, line
    assert "--api-key" in line, line
    assert "AsyncClient" not in line, line
    assert "api_key=" not in line, line
    assert mock.requests == []


def test_an_empty_key_and_a_missing_demo_photo_are_said_in_cli_terms(
    mock: MockDeepMode, env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    empty, photo = run_all(
        env,
        command("balance", "--api-key", ""),  # with DEEPMODE_API_KEY set too
        command("demo", "--live", "--yes", "--photo", str(tmp_path / "none.jpg")),
    )
    assert empty.returncode == photo.returncode == 2
    assert assert_one_error_line(empty.stderr) == (
        "error: --api-key is empty: give the key, or leave the option out"
    )
    assert assert_one_error_line(photo.stderr).startswith("error: --photo: ")
    assert mock.ledger == []


def test_common_options_before_or_after_the_command(
    mock: MockDeepMode, env: dict[str, str]
) -> None:
    clean = {k: v for k, v in env.items() if not k.startswith("DEEPMODE_")}
    where = ("--api-key", mock.api_key, "--base-url", mock.base_url)
    before, after, both = run_all(
        clean,
        command(*where, "--json", "balance"),
        command("balance", *where, "--json"),
        # Given twice: the one after the command wins.
        command("--api-key", "wrong-key", *where[2:], "balance", "--api-key", mock.api_key),
    )
    for done in (before, after):
        assert (done.returncode, json.loads(done.stdout)) == (
            0,
            {"remaining_balance": 10_000},
        ), done.stderr
    assert (both.returncode, both.stdout) == (0, "10000 credits\n"), both.stderr
    assert [r.status for r in mock.requests] == [200, 200, 200]


def test_version_and_help_with_defaults(env: dict[str, str]) -> None:
    version, top, generate, serve = run_all(
        env,
        command("--version"),
        command("--help"),
        command("generate", "--help"),
        command("mock", "serve", "--help"),
    )
    assert (version.returncode, version.stdout) == (0, "deepmode 0.1.0.dev0\n")
    assert top.returncode == 0
    assert "--api-key" in top.stdout
    assert "--version" in top.stdout
    flat = " ".join(generate.stdout.split())
    for shown in ("(default: 8)", "(default: portrait)", "(default: 1)"):
        assert shown in flat, generate.stdout
    assert "(default: None)" not in flat
    assert "(default: False)" not in flat
    flat = " ".join(serve.stdout.split())
    for shown in ("(default: 8765)", "(default: 10000)", "(default: mock-key)"):
        assert shown in flat, serve.stdout


def test_no_command_prints_usage(env: dict[str, str]) -> None:
    result = run(env)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: deepmode")
    assert result.stdout == ""


# ----------------------------------------------------------------------------- download


def test_download_by_id(
    mock: MockDeepMode, env: dict[str, str], model_id: str, tmp_path: pathlib.Path
) -> None:
    generated = run(
        env, "generate", "--model-id", model_id, "--prompt", "a cat", "--num-images", "2",
        "--json",
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    ids = [image["id"] for image in json.loads(generated.stdout)[0]["generation"]["images"]]
    assert len(ids) == 2

    out = tmp_path / "dl"
    result = run(env, "download", *ids, "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    paths = [pathlib.Path(path) for path in json.loads(result.stdout)]
    assert len(paths) == 2
    assert len(set(paths)) == 2
    for path in paths:
        assert path.parent == out
        assert path.read_bytes() == mock.image_bytes
    assert sorted(out.iterdir()) == sorted(paths)


def test_download_unknown_id_fails(env: dict[str, str], tmp_path: pathlib.Path) -> None:
    result = run(env, "download", "no-such-image", "--out", str(tmp_path))
    assert result.returncode == 1
    assert_one_error_line(result.stderr)
    assert list(tmp_path.iterdir()) == []


def test_download_fetches_the_ids_side_by_side(
    mock: MockDeepMode, env: dict[str, str], model_id: str, tmp_path: pathlib.Path
) -> None:
    with Client(mock.api_key, base_url=mock.base_url) as dm:
        generations = [dm.images.generate(model_id=model_id, prompt="p") for _ in range(6)]
    ids = [generation.images[0].id for generation in generations]
    mock.peak_in_flight = 0
    mock.set_latency("retrieve_image", 0.5)  # long enough for every start to overlap
    result = run(env, "download", *ids, "--out", str(tmp_path / "dl"), "--concurrency", "3")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 6
    assert [r.endpoint for r in mock.requests].count("retrieve_image") == 6
    assert mock.peak_in_flight == 3  # --concurrency bounds the lookups too

    # An API that lets two in at a time: the lookups slow down together instead of each
    # using up its retries on 429s.
    mock.limit_concurrency(2, retry_after=0.1)
    mock.set_latency("retrieve_image", 0.3)
    result = run(env, "download", *ids, "--out", str(tmp_path / "paced"), "--concurrency", "6")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "paced").iterdir())) == 6
    mock.limit_concurrency(None)

    # One unknown id among them: one error line naming it, and nothing downloaded.
    mock.set_latency("retrieve_image", 0)
    result = run(env, "download", *ids[:3], "no-such-image", "--out", str(tmp_path / "bad"))
    assert result.returncode == 1
    assert "no-such-image" in assert_one_error_line(result.stderr)
    assert not (tmp_path / "bad").exists() or list((tmp_path / "bad").iterdir()) == []

    # An id that cannot be one is refused before any lookup.
    sent = len(mock.requests)
    result = run(env, "download", ids[0], "", "--out", str(tmp_path / "bad"))
    assert result.returncode == 2
    assert assert_one_error_line(result.stderr).startswith("error: IMAGE_ID #2 ")
    assert len(mock.requests) == sent


# ----------------------------------------------------------------------------- mock serve


def test_mock_serve_then_balance(tmp_path: pathlib.Path) -> None:
    with mock_serve("k1") as (server, env):
        assert env["DEEPMODE_API_KEY"] == "k1"
        assert env["DEEPMODE_BASE_URL"].startswith("http://127.0.0.1:")

        result = run(env, "balance")
        assert (result.returncode, result.stdout) == (0, "10000 credits\n"), result.stderr

    assert server.returncode == 0, server.stderr
    assert "Traceback" not in server.stderr


def test_the_cli_runs_on_uvloop_when_it_is_installed(
    env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    assert uvloop.Loop.__module__ == "uvloop"  # installed (the dev extra brings it)
    done = run(env, "--debug", "balance")
    assert (done.returncode, done.stdout) == (0, "10000 credits\n"), done.stderr
    assert "event loop: uvloop.Loop" in done.stderr

    (tmp_path / "uvloop.py").write_text("raise ImportError('not installed')\n")
    done = run(env | {"PYTHONPATH": str(tmp_path)}, "--debug", "balance")
    assert (done.returncode, done.stdout) == (0, "10000 credits\n"), done.stderr
    assert "event loop: asyncio." in done.stderr
    assert "uvloop" not in done.stderr


def test_a_connection_failure_is_one_line_without_retry_warnings(
    env: dict[str, str], closed_port: int
) -> None:
    env = {**env, "DEEPMODE_BASE_URL": f"http://127.0.0.1:{closed_port}"}
    done = run(env, "balance")
    assert done.returncode == 1
    line = assert_one_error_line(done.stderr)
    assert "cannot connect" in line
    debug = run(env, "balance", "--debug")
    assert "retry 1 of 2" in debug.stderr  # the warnings are there when asked for


def test_timeout_and_max_retries_set_the_clients(mock: MockDeepMode, env: dict[str, str]) -> None:
    mock.stall("balance", seconds=30)
    started = time.monotonic()
    done = run(env, "balance", "--timeout", "0.3", "--max-retries", "0")
    assert done.returncode == 1
    assert "timed out" in assert_one_error_line(done.stderr)
    assert time.monotonic() - started < 10  # not the 30 s stall, nor 600 s by default
    assert [r.endpoint for r in mock.requests] == ["balance"]  # and no second try

    mock.clear_faults()
    mock.fail("balance", 503, retry_after=0)
    assert run(env, "balance", "--max-retries", "0").returncode == 1
    mock.fail("balance", 503, retry_after=0)
    assert run(env, "balance").returncode == 0  # retried by default
    assert [r.status for r in mock.requests[1:]] == [503, 503, 200]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--timeout", "0"], "--timeout"),
        (["--timeout", "nan"], "--timeout"),
        (["--max-retries", "-1"], "--max-retries"),
    ],
)
def test_bad_timeout_or_max_retries_is_a_usage_error(
    mock: MockDeepMode, env: dict[str, str], args: list[str], named: str
) -> None:
    done = run(env, "balance", *args)
    assert done.returncode == 2
    assert assert_one_error_line(done.stderr).startswith(f"error: {named} must be")
    assert mock.requests == []


def test_a_bad_timeout_is_refused_before_the_live_demo_asks_or_writes(
    tmp_path: pathlib.Path,
) -> None:
    photo = tmp_path / "me.jpg"
    photo.write_bytes(sample_image())
    out = tmp_path / "out"
    args = ["demo", "--live", "--yes", "--photo", str(photo), "--out", str(out)]
    done = run(clean_env(), *args, "--timeout", "-1", "--api-key", "k")
    assert done.returncode == 2
    assert assert_one_error_line(done.stderr).startswith("error: --timeout must be")
    assert not out.exists()


def test_download_concurrency_is_checked_before_any_request(
    mock: MockDeepMode, env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    done = run(env, "download", "some-id", "--out", str(tmp_path), "--concurrency", "0")
    assert done.returncode == 2
    assert "--concurrency" in assert_one_error_line(done.stderr)
    assert mock.requests == []


# ----------------------------------------------------------------------------- helpers (new)


JPEG_MAGIC = b"\xff\xd8\xff"
MODEL_OPTIONS = ("--gender", "woman", "--model-type", "amateur")


def clean_env() -> dict[str, str]:
    """This process's environment without any DEEPMODE_ setting."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DEEPMODE_")}


def write_photos(directory: pathlib.Path, count: int) -> list[str]:
    """conftest's photos, as the command-line arguments they become."""
    return [str(path) for path in conftest.write_photos(directory, count)]


def generated_image_ids(mock: MockDeepMode, model_id: str, count: int) -> list[str]:
    """Ids of `count` images generated through the SDK (not the CLI: no process start)."""
    with Client(mock.api_key, base_url=mock.base_url) as dm:
        generation = dm.images.generate(model_id=model_id, prompt="a cat", num_images=count)
    return [image.id for image in generation.images]


def is_jpeg(path: pathlib.Path) -> bool:
    return path.read_bytes()[:3] == JPEG_MAGIC


@contextlib.contextmanager
def mock_serve(api_key: str) -> Iterator[tuple[MockProcess, dict[str, str]]]:
    """`deepmode mock serve` as a process, and an environment pointing at it; stopped
    as Ctrl+C would at the end."""
    env = clean_env()
    with mock_process(
        command=(str(DEEPMODE), "mock", "serve"),
        env=env,
        port=0,
        api_key=api_key,
        stop_signal=signal.SIGINT,
        start_timeout=TIMEOUT,
        stop_timeout=TIMEOUT,
    ) as server:
        yield (
            server,
            env | {"DEEPMODE_BASE_URL": server.base_url, "DEEPMODE_API_KEY": server.api_key},
        )


class Hook:
    """A callback endpoint on loopback, served by a thread, recording the JSON it gets."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        bodies = self.bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/callback"

    def body(self, index: int = 0) -> Any:
        """The `index`th body received, once it has arrived."""
        wait_until(lambda: len(self.bodies) > index)
        return self.bodies[index]


@pytest.fixture
def hook() -> Iterator[Hook]:
    hook = Hook()
    thread = threading.Thread(target=hook.server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield hook
    finally:
        hook.server.shutdown()
        thread.join()
        hook.server.server_close()


# ----------------------------------------------------------------------------- models create


def test_models_create_uploads_the_photos(
    mock: MockDeepMode, env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    photos = write_photos(tmp_path, 2)
    result = run(env, "models", "create", *photos, *MODEL_OPTIONS, "--name", "Ann")
    assert (result.returncode, result.stdout) == (0, "Created model successfully\n"), result.stderr
    assert "Traceback" not in result.stderr
    (request,) = mock.requests
    assert (request.endpoint, request.method, request.status) == ("create_model", "POST", 200)
    assert request.headers["Content-Type"].startswith("multipart/form-data")
    assert request.form == {"gender": "woman", "model_type": "amateur", "name": "Ann"}
    assert [(f.field, f.filename, f.format) for f in request.files] == [
        ("images", "photo-1.jpg", "jpeg"),
        ("images", "photo-2.jpg", "jpeg"),
    ]
    assert [f.size for f in request.files] == [pathlib.Path(p).stat().st_size for p in photos]
    assert [charge.endpoint for charge in mock.ledger] == ["create_model"]


def test_models_create_from_urls_plain_and_json(mock: MockDeepMode, env: dict[str, str]) -> None:
    urls = ["https://photos.example/1.jpg", "https://photos.example/2.jpg"]
    args = ("models", "create", "--image-url", urls[0], "--image-url", urls[1], *MODEL_OPTIONS)
    plain, as_json = run_all(env, command(*args), command(*args, "--json"))
    assert (plain.returncode, plain.stdout) == (0, "Created model successfully\n"), plain.stderr
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {"message": "Created model successfully"}
    requests = mock.requests
    assert len(requests) == 2
    for request in requests:
        assert (request.endpoint, request.status, request.files) == ("create_model", 200, [])
        assert request.json == {"gender": "woman", "model_type": "amateur", "image_urls": urls}


def test_models_create_wait_timeout_is_said_in_command_terms(
    mock: MockDeepMode, env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    mock.training_delay = 30.0  # still training when the wait ends
    photos = write_photos(tmp_path, 1)
    args = ("models", "create", *photos, "--gender", "man", "--model-type", "professional")
    done = run(env, *args, "--wait", "--wait-timeout", "0.5", "--callback-port", "0")
    assert done.returncode == 1, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: no model callback arrived within --wait-timeout (0.5 s)")
    assert "--callback-port" in error
    assert "longer --wait-timeout" in error
    for library_term in ("adapter", "mounted", "hub", "wait("):
        assert library_term not in error
    assert done.stdout == ""


def test_a_wait_with_no_wait_timeout_option_names_none() -> None:
    """The demo's wait (no --wait-timeout option) runs out in its own terms."""
    from deepmode_async import CallbackTimeoutError
    from deepmode_async.cli._hub import local_hub

    async def wait() -> str:
        options = argparse.Namespace(callback_port=0, public_url=None)  # as the demo's
        with pytest.raises(CallbackTimeoutError) as caught:
            async with local_hub("http://127.0.0.1:9", options, ttl=0.3) as hub:
                await hub.expect("model").wait()
        return str(caught.value)

    message = asyncio.run(wait())
    assert message.startswith("no model callback arrived within 0.3 s"), message
    assert "--callback-port" in message
    assert "--wait-timeout" not in message


def test_models_create_wait_prints_the_trained_model(
    mock: MockDeepMode, env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    photos = write_photos(tmp_path, 3)
    args = ("models", "create", *photos, "--gender", "man", "--model-type", "professional")
    as_json, plain = run_all(
        env,
        command(*args, "--wait", "--json", "--name", "Bob"),
        command(*args, "--wait", "--wait-timeout", "60"),
    )
    assert as_json.returncode == 0, as_json.stderr
    model = json.loads(as_json.stdout)
    models = mock.models
    assert model["id"] in models
    assert (model["name"], model["gender"], model["active"]) == ("Bob", "man", True)
    assert dt.datetime.fromisoformat(model["expire_at"]) == models[model["id"]].expire_at.replace(
        microsecond=0
    )

    assert plain.returncode == 0, plain.stderr
    (line,) = plain.stdout.splitlines()
    model_id, rest = line.split(" ", 1)
    assert model_id in models
    assert model_id != model["id"]
    assert rest.startswith("trained; expires ")
    assert "waiting for the training callback" in plain.stderr
    assert "Traceback" not in plain.stderr

    # Each --wait sent its own hub's URL as the callback, and the training result landed.
    requests = [r for r in mock.requests if r.endpoint == "create_model"]
    assert len(requests) == 2
    assert all(r.form["callback"].startswith("http://127.0.0.1:") for r in requests)
    wait_until(lambda: sum(d.delivered for d in mock.callbacks) == 2)
    assert {d.body["id"] for d in mock.callbacks} == {model["id"], model_id}
    assert [c.endpoint for c in mock.ledger] == ["create_model"] * 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_models_create_wait_behind_a_tunnel_with_a_path(
    mock: MockDeepMode, env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    # A tunnel forwards https://public.example/hooks/... to 127.0.0.1:PORT/hooks/...;
    # here the "tunnel" is the identity, so the public URL is loopback with a path.
    port = free_port()
    public = f"http://127.0.0.1:{port}/hooks/deepmode"
    result = run(
        env, "models", "create", *write_photos(tmp_path, 1), *MODEL_OPTIONS, "--wait",
        "--public-url", public, "--callback-port", str(port), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["id"] in mock.models
    (request,) = [r for r in mock.requests if r.endpoint == "create_model"]
    assert request.form["callback"].startswith(public + "/")


def test_a_reader_that_goes_away_ends_the_command_quietly(
    env: dict[str, str], model_id: str
) -> None:
    # `deepmode generate ... | head -1`: the pipe closes while results are still coming.
    process = subprocess.Popen(  # noqa: S603 (our own entry point)
        command("generate", "--model-id", model_id, "--prompt", "p", "--count", "40",
                "--concurrency", "2"),
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        assert process.stdout.readline().startswith(b"[")
        process.stdout.close()
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=TIMEOUT) == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert stderr == ""


def test_models_create_refusals_before_any_request(
    mock: MockDeepMode, env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    (photo,) = write_photos(tmp_path, 1)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo\n", encoding="utf-8")
    url = ("--image-url", "https://photos.example/1.jpg")
    cases: dict[str, list[str]] = {
        "drop --callback": [photo, "--wait", "--callback", "https://hooks.example/cb"],
        "give the photos": [],
        "not both": [photo, *url],
        "not 31": [photo] * 31,
        "PHOTO #2 ('notes.txt') is not an image": [photo, str(notes)],
        f"PHOTO: {str(tmp_path / 'missing.jpg')!r} does not exist": [
            str(tmp_path / "missing.jpg")
        ],
        "--image-url #1 must be an absolute http or https URL": ["--image-url", "notaurl"],
        "--wait-timeout": [photo, "--wait", "--wait-timeout", "0"],
        "--public-url": [photo, "--wait", "--base-url", "https://api.example.invalid"],
        "--callback-port it forwards to": [
            photo, "--wait", "--public-url", "https://tunnel.example",
        ],
        "--callback-port must be 0 to 65535": [photo, "--wait", "--callback-port", "70000"],
        "are for --wait": [photo, "--public-url", "https://tunnel.example/cb"],
    }  # fmt: skip
    results = run_all(
        env, *(command("models", "create", *args, *MODEL_OPTIONS) for args in cases.values())
    )
    for needle, result in zip(cases, results, strict=True):
        assert result.returncode == 2, (needle, result.stdout, result.stderr)
        line = assert_one_error_line(result.stderr)
        assert needle in line, line
        assert result.stdout == ""
    assert mock.requests == []
    assert mock.ledger == []


# ----------------------------------------------------------------------------- models extend


def test_models_extend_plain_json_and_unknown(mock: MockDeepMode, env: dict[str, str]) -> None:
    first, second = mock.add_model(), mock.add_model()
    expiries = first.expire_at, second.expire_at  # the mock updates these objects
    plain, as_json, unknown = run_all(
        env,
        command("models", "extend", first.id),
        command("models", "extend", second.id, "--json"),
        command("models", "extend", "no-such-model"),
    )
    models = mock.models
    assert models[first.id].expire_at == expiries[0] + dt.timedelta(days=30)
    assert models[second.id].expire_at == expiries[1] + dt.timedelta(days=30)

    assert plain.returncode == 0, plain.stderr
    expected = models[first.id].expire_at
    assert plain.stdout == f"{first.id} expires {expected:%Y-%m-%d %H:%M} UTC\n"

    assert as_json.returncode == 0, as_json.stderr
    extension = json.loads(as_json.stdout)
    assert list(extension) == ["updated_expire_at"]
    updated = dt.datetime.fromisoformat(extension["updated_expire_at"])
    assert updated == models[second.id].expire_at.replace(microsecond=0)
    assert updated.utcoffset() == dt.timedelta(0)

    assert (unknown.returncode, unknown.stdout) == (1, "")
    assert "404" in assert_one_error_line(unknown.stderr)
    assert sorted(c.endpoint for c in mock.ledger) == ["extend_model"] * 2


# ----------------------------------------------------------------------------- upscale


def test_upscale_plain_out_and_callback(
    mock: MockDeepMode, env: dict[str, str], model_id: str, tmp_path: pathlib.Path, hook: Hook
) -> None:
    (image_id,) = generated_image_ids(mock, model_id, 1)
    out = tmp_path / "up"
    plain, downloaded, accepted, refused = run_all(
        env,
        command("upscale", image_id),
        command("upscale", image_id, "--out", str(out)),
        command("upscale", image_id, "--callback", hook.url),
        command("upscale", image_id, "--callback", hook.url, "--out", str(tmp_path / "no")),
    )
    assert plain.returncode == 0, plain.stderr
    upscaled_id, url = plain.stdout.split()
    images = mock.images
    assert images[upscaled_id].upscaled
    assert url.startswith(mock.blob_base_url)

    assert downloaded.returncode == 0, downloaded.stderr
    path = pathlib.Path(downloaded.stdout.strip())
    assert path.parent == out
    assert list(out.iterdir()) == [path]
    assert is_jpeg(path)
    assert path.read_bytes() == mock.image_bytes

    assert (accepted.returncode, accepted.stdout) == (0, "Upscaling images...\n"), accepted.stderr
    body = hook.body()
    assert body["upscaled"] is True
    assert body["id"] in mock.images

    assert refused.returncode == 2
    assert "--callback" in assert_one_error_line(refused.stderr)
    assert not (tmp_path / "no").exists()

    upscales = [r for r in mock.requests if r.endpoint == "upscale"]
    assert len(upscales) == 3  # the refused one sent nothing
    assert sorted(str(r.json.get("callback")) for r in upscales) == sorted(
        [hook.url, "None", "None"]
    )
    assert [c.endpoint for c in mock.ledger].count("upscale") == 3


# ----------------------------------------------------------------------------- remix


def test_remix_and_face_id_remix(
    mock: MockDeepMode, env: dict[str, str], model_id: str, tmp_path: pathlib.Path
) -> None:
    art, mask, face = write_photos(tmp_path, 3)
    images = ("--artwork-image", art, "--mask-image", mask)
    out = tmp_path / "out"
    remix, face_id, downloaded = run_all(
        env,
        command("remix", "--model-id", model_id, *images, "--prompt", "in oil"),
        command("remix", "--identity-image", face, *images, "--json"),
        command("remix", "--model-id", model_id, *images, "--out", str(out)),
    )
    remixes = mock.remixes
    assert remix.returncode == 0, remix.stderr
    remix_id, url, status = remix.stdout.split()
    assert (remixes[remix_id].kind, remixes[remix_id].model_id) == ("remix", model_id)
    assert url.startswith(mock.blob_base_url)
    assert status == "completed"

    assert face_id.returncode == 0, face_id.stderr
    result = json.loads(face_id.stdout)
    assert remixes[result["id"]].kind == "face_id_remix"
    assert remixes[result["id"]].model_id is None
    assert result["status"] == "completed"

    assert downloaded.returncode == 0, downloaded.stderr
    path = pathlib.Path(downloaded.stdout.strip())
    assert list(out.iterdir()) == [path]
    assert is_jpeg(path)

    sent = [r for r in mock.requests if r.endpoint in ("remix", "face_id_remix")]
    by_path = sorted(
        (r.path, r.form.get("model_id"), sorted(f.field for f in r.files)) for r in sent
    )
    assert by_path == [
        ("/api/face-id-remix", None, ["artwork_image", "identity_image", "mask_image"]),
        ("/api/remix/generate", model_id, ["artwork_image", "mask_image"]),
        ("/api/remix/generate", model_id, ["artwork_image", "mask_image"]),
    ]
    assert sorted(c.endpoint for c in mock.ledger) == ["face_id_remix", "remix", "remix"]


def test_remix_refusals_before_any_request(
    mock: MockDeepMode, env: dict[str, str], model_id: str, tmp_path: pathlib.Path
) -> None:
    art, mask, face = write_photos(tmp_path, 3)
    images = ["--artwork-image", art, "--mask-image", mask]
    cases: dict[str, list[str]] = {
        "--identity-image": ["--model-id", model_id, "--identity-image", face],
        "--model-id": [],
        "--mode sync": ["--model-id", model_id, "--mode", "async", "--out", str(tmp_path / "d")],
    }
    results = run_all(env, *(command("remix", *images, *args) for args in cases.values()))
    for needle, result in zip(cases, results, strict=True):
        assert result.returncode == 2, (needle, result.stdout, result.stderr)
        assert needle in assert_one_error_line(result.stderr)
        assert result.stdout == ""
    assert mock.requests == []
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- generate --callback


def test_generate_callback(
    mock: MockDeepMode, env: dict[str, str], model_id: str, tmp_path: pathlib.Path, hook: Hook
) -> None:
    args = ("generate", "--model-id", model_id, "--prompt", "p", "--callback", hook.url)
    accepted, batch, with_out = run_all(
        env,
        command(*args, "--num-images", "2"),
        command(*args, "--count", "2"),
        command(*args, "--out", str(tmp_path / "d")),
    )
    assert (accepted.returncode, accepted.stdout) == (0, "Generating images...\n"), accepted.stderr
    for refused, needle in ((batch, "--callback"), (with_out, "--out")):
        assert refused.returncode == 2
        assert needle in assert_one_error_line(refused.stderr)
        assert refused.stdout == ""
    (request,) = mock.requests
    assert request.endpoint == "generate"
    assert (request.json["callback"], request.json["num_images"]) == (hook.url, 2)
    body = hook.body()
    assert len(body["images"]) == 2
    assert {image["id"] for image in body["images"]} <= set(mock.images)
    assert [c.endpoint for c in mock.ledger] == ["generate"]


# ----------------------------------------------------------------------------- demo


def test_demo_against_the_embedded_mock(tmp_path: pathlib.Path) -> None:
    plain, as_json = run_all(
        clean_env(), command("demo"), command("demo", "--json", "--out", "X"), cwd=tmp_path
    )
    assert plain.returncode == 0, plain.stderr
    files = sorted((tmp_path / "deepmode-demo").iterdir())
    assert len(files) == 12
    assert all(is_jpeg(f) for f in files)
    last = plain.stdout.splitlines()[-1]
    assert last.startswith("done in "), plain.stdout
    assert "12 images" in last
    assert last.endswith("56 credits spent")

    assert as_json.returncode == 0, as_json.stderr
    summary = json.loads(as_json.stdout)
    assert summary["credits_spent"] == 56
    assert summary["model_id"]
    assert summary["api"].startswith("http://127.0.0.1:")
    paths = [tmp_path / path for path in summary["images"]]
    assert len(paths) == len(set(paths)) == 12
    assert all(path.parent == tmp_path / "X" and is_jpeg(path) for path in paths)
    assert sorted(paths) == sorted((tmp_path / "X").iterdir())
    assert summary["bytes_downloaded"] == sum(path.stat().st_size for path in paths)


def test_demo_refusals(mock: MockDeepMode, env: dict[str, str], tmp_path: pathlib.Path) -> None:
    (photo,) = write_photos(tmp_path, 1)
    cases: dict[str, list[str]] = {
        "--photo is for --live": ["--photo", photo],
        "give --photo": ["--live"],
        "--yes": ["--live", "--photo", photo],  # stdin is not a terminal
        "are for --live": ["--api-key", "some-key"],
    }
    results = run_all(env, *(command("demo", *args) for args in cases.values()), cwd=tmp_path)
    for needle, result in zip(cases, results, strict=True):
        assert result.returncode == 2, (needle, result.stdout, result.stderr)
        assert needle in assert_one_error_line(result.stderr)
    assert mock.requests == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photo-1.jpg"]


def test_demo_live_with_yes(
    mock: MockDeepMode, env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    photos = write_photos(tmp_path / "photos", 2)
    out = tmp_path / "out"
    result = run(
        env, "demo", "--live", "--yes", "--photo", photos[0], "--photo", photos[1],
        "--out", str(out), "--gender", "man",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].endswith("56 credits spent")
    assert [(c.endpoint, c.cost) for c in mock.ledger] == [("create_model", 50)] + [
        ("generate", 1)
    ] * 6
    (create,) = [r for r in mock.requests if r.endpoint == "create_model"]
    assert [f.filename for f in create.files] == ["photo-1.jpg", "photo-2.jpg"]
    assert (create.form["gender"], create.form["name"]) == ("man", "deepmode demo")
    files = sorted(out.iterdir())
    assert len(files) == 12
    assert all(f.read_bytes() == mock.image_bytes for f in files)


def test_demo_live_exits_1_when_a_generate_call_fails(
    mock: MockDeepMode, env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    photos = write_photos(tmp_path / "photos", 1)
    mock.fail("generate", 500, times=1)
    result = run(env, "demo", "--live", "--yes", "--photo", photos[0], "--out", str(tmp_path))
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines()[-1].endswith("55 credits spent")  # 50 + 5 of 6 calls
    detail, summary = result.stderr.splitlines()
    assert detail.startswith("["), detail
    assert "failed: " in detail, detail
    assert "500" in detail, detail
    assert summary == "error: 1 of 6 generate calls failed"
    assert "failed" not in result.stdout
    assert len(list(tmp_path.glob("*.jp*g"))) == 10


# ----------------------------------------------------------------------------- a mock process


def test_the_whole_flow_against_a_mock_serve_process(tmp_path: pathlib.Path) -> None:
    photos = write_photos(tmp_path / "photos", 2)
    with mock_serve("k-test") as (server, env):
        assert env["DEEPMODE_API_KEY"] == "k-test"
        assert env["DEEPMODE_BASE_URL"].startswith("http://127.0.0.1:")
        balance = run(env, "balance", "--json")
        assert balance.returncode == 0, balance.stderr
        assert json.loads(balance.stdout) == {"remaining_balance": 10_000}
        created = run(env, "models", "create", *photos, *MODEL_OPTIONS, "--wait", "--json")
        assert created.returncode == 0, created.stderr
        model = json.loads(created.stdout)
        assert model["active"] is True

        out = tmp_path / "d"
        generated = run(
            env, "generate", "--model-id", model["id"], "--prompt", "x", "--count", "3",
            "--out", str(out), "--json",
        )  # fmt: skip
        assert generated.returncode == 0, generated.stderr
        items = json.loads(generated.stdout)
        assert [item["ok"] for item in items] == [True] * 3
        ids = [image["id"] for item in items for image in item["generation"]["images"]]
        files = sorted(out.iterdir())
        assert len(ids) == len(files) == 3

        again = tmp_path / "d2"
        downloaded, extended = run_all(
            env,
            command("download", *ids, "--out", str(again), "--json"),
            command("models", "extend", model["id"]),
        )
        assert downloaded.returncode == 0, downloaded.stderr
        paths = sorted(pathlib.Path(path) for path in json.loads(downloaded.stdout))
        assert [path.name for path in paths] == [f.name for f in files]
        assert [path.read_bytes() for path in paths] == [f.read_bytes() for f in files]
        assert extended.returncode == 0, extended.stderr
        assert extended.stdout.startswith(f"{model['id']} expires ")

        after = run(env, "balance", "--json")
        assert after.returncode == 0, after.stderr
        assert json.loads(after.stdout) == {"remaining_balance": 10_000 - 50 - 3 - 20}

    assert server.returncode == 0, server.stderr
    assert "mock stopped" in server.stderr
    assert "Traceback" not in server.stderr


# ----------------------------------------------------------------------------- progress bars


def terminal_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a command whose stderr is a terminal rich will draw on."""
    hidden = {"TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_TERMINAL", "NO_COLOR"}
    return {k: v for k, v in env.items() if k not in hidden} | {
        "TERM": "xterm-256color",
        "COLUMNS": "100",
    }


def test_generate_progress_bar_on_a_terminal_keeps_results_on_stdout(
    mock: MockDeepMode, env: dict[str, str], model_id: str, tmp_path: pathlib.Path
) -> None:
    out = tmp_path / "d"
    args = ("--model-id", model_id, "--prompt", "a", "--count", "4", "--out", str(out))
    (result,) = run_all(terminal_env(env), command("generate", *args), tty=True)
    assert result.returncode == 0, result.stderr
    assert "generating" in result.stderr
    assert "Traceback" not in result.stderr
    lines = sorted(result.stdout.splitlines())
    assert [line.split()[0] for line in lines] == ["[0]", "[1]", "[2]", "[3]"], result.stderr
    assert sorted(pathlib.Path(line.split()[1]) for line in lines) == sorted(out.iterdir())


def test_download_and_upload_progress_bars_on_a_terminal(
    mock: MockDeepMode, env: dict[str, str], model_id: str, tmp_path: pathlib.Path
) -> None:
    ids = generated_image_ids(mock, model_id, 3)
    photos = write_photos(tmp_path / "photos", 2)
    out = tmp_path / "d"
    downloaded, created = run_all(
        terminal_env(env),
        command("download", *ids, "--out", str(out)),
        command("models", "create", *photos, *MODEL_OPTIONS),
        tty=True,
    )
    assert downloaded.returncode == 0, downloaded.stderr
    assert "downloading" in downloaded.stderr
    assert sorted(pathlib.Path(line) for line in downloaded.stdout.splitlines()) == sorted(
        out.iterdir()
    )
    assert len(list(out.iterdir())) == 3

    assert (created.returncode, created.stdout) == (0, "Created model successfully\n")
    assert "uploading" in created.stderr
    for result in (downloaded, created):
        assert "Traceback" not in result.stderr
    (create,) = [r for r in mock.requests if r.endpoint == "create_model"]
    assert [f.filename for f in create.files] == ["photo-1.jpg", "photo-2.jpg"]


def test_a_bad_out_is_refused_before_any_credit_is_spent(
    mock: MockDeepMode, env: dict[str, str], model_id: str, tmp_path: pathlib.Path
) -> None:
    taken = tmp_path / "afile"
    taken.write_text("not a directory\n", encoding="utf-8")
    image_id = generated_image_ids(mock, model_id, 1)[0]
    charged = len(mock.ledger)
    artwork, mask = write_photos(tmp_path, 2)
    results = run_all(
        env,
        command("upscale", image_id, "--out", str(taken)),
        command("remix", "--model-id", model_id, "--artwork-image", artwork,
                "--mask-image", mask, "--out", str(taken)),
        command("demo", "--out", str(taken)),
    )  # fmt: skip
    for result in results:
        assert result.returncode == 2, result.stderr
        assert "--out" in assert_one_error_line(result.stderr)
    assert len(mock.ledger) == charged


def test_mock_serve_on_a_port_in_use_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run(clean_env(), "mock", "serve", "--port", str(taken.getsockname()[1]))
    assert result.returncode == 1
    assert "cannot listen" in assert_one_error_line(result.stderr)


# ----------------------------------------------------------------------------- signals


@pytest.mark.parametrize(
    ("signum", "code", "message"),
    [
        (signal.SIGTERM, 143, "terminated by SIGTERM"),
        (signal.SIGHUP, 129, "terminated by SIGHUP"),
        (signal.SIGINT, 130, "interrupted"),
    ],
)
def test_a_signal_mid_download_unwinds_and_leaves_no_temporary_file(
    tmp_path: pathlib.Path, signum: int, code: int, message: str
) -> None:
    with MockDeepMode(image_size=100_000) as big:
        (image_id,) = generated_image_ids(big, big.add_model().id, 1)
        big.stall("download", after_bytes=1000, seconds=30)
        out = tmp_path / "out"
        env = clean_env() | {"DEEPMODE_API_KEY": big.api_key, "DEEPMODE_BASE_URL": big.base_url}
        process = signalled(command("download", image_id, "--out", str(out)), env, out, signum)
    stdout, stderr = process.communicate()
    assert (process.returncode, stderr.strip(), stdout) == (code, message, "")
    assert list(out.iterdir()) == []


def signalled(
    argv: list[str], env: dict[str, str], watched: pathlib.Path, signum: int
) -> subprocess.Popen[str]:
    """Run `argv` until a file shows up under `watched`, then send it `signum` and let it
    finish. One still running 20 s later is made to print where each of its threads is
    (faulthandler, on SIGABRT), and the test fails with that."""
    process = subprocess.Popen(  # noqa: S603 (our own entry point)
        argv,
        env=env | {"PYTHONFAULTHANDLER": "1"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: watched.exists() and any(watched.rglob("*.*")), within=TIMEOUT)
        process.send_signal(signum)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        try:
            _, stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # not even SIGABRT ended it
            process.kill()
            _, stderr = process.communicate()
        pytest.fail(f"still running 20 s after {signal.Signals(signum).name}:\n{stderr}")
    except BaseException:
        process.kill()
        process.communicate()
        raise
    return process


def test_sigterm_during_the_demo_removes_its_sample_photos(tmp_path: pathlib.Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    process = signalled(
        command("demo", "--out", str(tmp_path / "out")),
        clean_env() | {"TMPDIR": str(temp)},
        temp,
        signal.SIGTERM,
    )
    _, stderr = process.communicate()
    assert (process.returncode, stderr.strip().splitlines()[-1]) == (143, "terminated by SIGTERM")
    assert list(temp.iterdir()) == []
