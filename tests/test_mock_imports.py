"""What the mock's entry point and the CLI load: neither pulls in the other."""

from __future__ import annotations

import subprocess
import sys

import pytest


def loaded_after(statement: str, *modules: str) -> dict[str, bool]:
    """Which of `modules` a fresh interpreter has loaded after running `statement`."""
    code = f"import sys\n{statement}\nprint(*(name in sys.modules for name in {modules!r}))"
    done = subprocess.run(  # noqa: S603 (this interpreter, our own code)
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return dict(zip(modules, (flag == "True" for flag in done.stdout.split()), strict=True))


def test_the_mock_entry_point_does_not_load_the_cli() -> None:
    loaded = loaded_after(
        "import deepmode_async.testing.__main__",
        "deepmode_async.cli",
        "deepmode_async._mock_options",
    )
    assert loaded == {"deepmode_async.cli": False, "deepmode_async._mock_options": True}


def test_the_cli_builds_its_parser_without_loading_the_mock() -> None:
    statement = (
        "from deepmode_async.cli import _parser\n"
        "_parser().parse_args(['mock', 'serve', '--port', '0', '--api-key', 'k'])"
    )
    loaded = loaded_after(statement, "deepmode_async.testing", "deepmode_async.testing._mock")
    assert loaded == {"deepmode_async.testing": False, "deepmode_async.testing._mock": False}


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "deepmode_async.testing", "--help"],
        [sys.executable, "-m", "deepmode_async", "mock", "serve", "--help"],
    ],
    ids=["python -m deepmode_async.testing", "deepmode mock serve"],
)
def test_both_entry_points_offer_the_same_options(command: list[str]) -> None:
    done = subprocess.run(  # noqa: S603 (this interpreter, our own code)
        command, capture_output=True, text=True, timeout=60, check=True
    )
    options = {word.split("=")[0] for word in done.stdout.split() if word.startswith("--")}
    assert options == {
        "--help",
        "--host",
        "--port",
        "--blob-port",
        "--api-key",
        "--balance",
        "--training-delay",
        "--latency",
        "--image-size",
    }
