"""The `deepmode` command line, run as a subprocess against the thread-backed mock."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from typing import TypeAlias

import pytest

from deepmode_async.testing import MockDeepMode

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


def run_all(env: Mapping[str, str], *commands: list[str]) -> list[Done]:
    """Run the commands side by side (each start costs ~0.3 s of imports), in order."""
    started = [
        subprocess.Popen(  # noqa: S603 (our own entry point)
            argv,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in commands
    ]
    done = []
    try:
        for process, argv in zip(started, commands, strict=True):
            stdout, stderr = process.communicate(timeout=TIMEOUT)
            done.append(subprocess.CompletedProcess(argv, process.returncode, stdout, stderr))
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return done


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


# ----------------------------------------------------------------------------- failures


def test_generate_unknown_model_fails(mock: MockDeepMode, env: dict[str, str]) -> None:
    args = ("generate", "--model-id", "no-such-model", "--prompt", "a cat")
    plain, as_json, debug = run_all(
        env, command(*args), command(*args, "--json"), command(*args, "--debug")
    )
    assert plain.returncode == 1
    assert_one_error_line(plain.stderr)
    lines = plain.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("[0] failed: ")

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
        "prompt": ["--prompt", ""],
        "num_images": ["--prompt", "a cat", "--num-images", "9"],
        "--prompt or --prompts-file": [],
        "--count": ["--prompt", "a cat", "--count", "0"],
        "cannot read --prompts-file": ["--prompts-file", str(tmp_path / "missing.txt")],
        "no prompts": ["--prompts-file", str(empty)],
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
    assert "DEEPMODE_API_KEY" in assert_one_error_line(result.stderr)
    assert mock.requests == []


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


# ----------------------------------------------------------------------------- mock serve


def test_mock_serve_then_balance(tmp_path: pathlib.Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPMODE_")}
    server = subprocess.Popen(  # noqa: S603 (our own entry point)
        [str(DEEPMODE), "mock", "serve", "--port", "0", "--api-key", "k1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        found: dict[str, str] = {}
        deadline = time.monotonic() + TIMEOUT
        while not {"DEEPMODE_BASE_URL", "DEEPMODE_API_KEY"} <= found.keys():
            assert time.monotonic() < deadline
            line = server.stdout.readline()
            assert line, "mock serve exited before printing its settings"
            name, sep, value = line.strip().partition("=")
            if sep and name.startswith("DEEPMODE_"):
                found[name] = value
        assert found["DEEPMODE_API_KEY"] == "k1"
        assert found["DEEPMODE_BASE_URL"].startswith("http://127.0.0.1:")

        result = run(env | found, "balance")
        assert (result.returncode, result.stdout) == (0, "10000 credits\n"), result.stderr

        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=TIMEOUT)
        assert server.returncode == 0, stderr
        assert "Traceback" not in stderr
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()


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


def test_download_concurrency_is_checked_before_any_request(
    mock: MockDeepMode, env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    done = run(env, "download", "some-id", "--out", str(tmp_path), "--concurrency", "0")
    assert done.returncode == 2
    assert "--concurrency" in assert_one_error_line(done.stderr)
    assert mock.requests == []
