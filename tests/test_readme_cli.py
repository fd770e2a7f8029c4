"""The shell examples of README.md's "Command line" section run against `deepmode mock serve`.

Every command of its ```sh blocks runs as printed, through bash, with the installed
`deepmode` first on PATH and the two variables `mock serve` prints in the environment, in
a directory holding the files the examples name. Only the README's placeholders change:
the example ids become ids the mock knows, and the example callback URLs a loopback
port. A command that cannot run here is in `NOT_RUN`, with why.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from deepmode_async.cli import MOCK_SERVE_PORT
from deepmode_async.testing import sample_image

ROOT = pathlib.Path(__file__).parent.parent
BIN = pathlib.Path(sys.executable).parent
SHELL_BLOCK = re.compile(r"^```(?:sh|bash|console)\n(.*?)^```", re.S | re.M)

#: Commands of the section that are not run, by how they start, and why.
NOT_RUN = {
    "pip install": "installs from a package registry",
    "deepmode demo --live": "needs the real API and a public URL",
    "deepmode mock serve": "the mock the test starts (test_the_mock_serve_lines_print_exports)",
    "export ": "the test sets the variables the mock prints (test_the_exports_are_mock_serves)",
}
#: The README's example ids and URLs, and what they become.
MODEL_ID = ("c6b8a9f7e5d1c3a2f91e3", "MODEL_ID")
IMAGE_IDS = ("93b5e1c7a4f2d6g8h9k1m", "b8a9f7e5d1c3a2f91e3d5")
CALLBACK_URL = re.compile(r"https://myapp\.example\.com/\w+")
FILES = ("me-1.jpg", "me-2.jpg", "me-3.jpg", "IMG_0001.HEIC", "IMG_0002.HEIC", "face.jpg")


def section_commands() -> list[str]:
    """The logical lines of the section's shell blocks, comments and blanks dropped."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in SHELL_BLOCK.findall(section):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(re.sub(r"\s+", " ", command))
    return commands


def reason_not_run(command: str) -> str | None:
    return next((why for start, why in NOT_RUN.items() if command.startswith(start)), None)


@pytest.fixture(scope="module")
def mock_env() -> Iterator[dict[str, str]]:
    """`deepmode mock serve` on a free port, and the environment it says to export."""
    with served(["--port", "0", "--balance", "1000000", "--training-delay", "0"]) as printed:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPMODE_")}
        yield env | printed | {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}


class served:
    """`deepmode mock serve ARGS` as a process; entering gives the variables it printed."""

    def __init__(self, args: list[str]) -> None:
        self.process = subprocess.Popen(  # noqa: S603 (our own CLI)
            [str(BIN / "deepmode"), "mock", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def __enter__(self) -> dict[str, str]:
        assert self.process.stdout is not None
        printed = {}
        for _ in range(2):
            name, _, value = self.process.stdout.readline().strip().partition("=")
            printed[name] = value
        assert set(printed) == {"DEEPMODE_BASE_URL", "DEEPMODE_API_KEY"}, printed
        return printed

    def __exit__(self, *exc_info: object) -> None:
        self.process.send_signal(signal.SIGINT)
        _, stderr = self.process.communicate(timeout=10)
        assert self.process.returncode == 0, stderr


def deepmode(env: dict[str, str], cwd: pathlib.Path, command: str) -> str:
    """Run one shell command line; return its stdout after checking it exited with 0."""
    done = subprocess.run(  # noqa: S603 (the README's own commands, on loopback)
        ["/bin/bash", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, mock_env: dict[str, str]) -> pathlib.Path:
    """A directory with the examples' files, and the ids they name made real."""
    path = tmp_path_factory.mktemp("cli")
    for number, name in enumerate(FILES):
        (path / name).write_bytes(sample_image("png", side=256 + 8 * number))
    (path / "art.png").write_bytes(sample_image("png", side=64))
    (path / "mask.png").write_bytes(sample_image("png", side=64))
    (path / "prompts.txt").write_text("a lighthouse\na harbour at dusk\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ids(workdir: pathlib.Path, mock_env: dict[str, str]) -> dict[str, str]:
    """A trained model's id and two image ids of the mock, made with the CLI itself."""
    model_id = deepmode(
        mock_env,
        workdir,
        "deepmode models create me-1.jpg --gender man --model-type amateur --wait",
    ).split()[0]
    images = deepmode(
        mock_env,
        workdir,
        f"deepmode --json generate --model-id {model_id} --prompt x --num-images 2",
    )
    image_ids = [image["id"] for image in json.loads(images)[0]["generation"]["images"]]
    return dict.fromkeys(MODEL_ID, model_id) | dict(zip(IMAGE_IDS, image_ids, strict=False))


def as_run_here(command: str, ids: dict[str, str]) -> str:
    for example, real in ids.items():
        command = command.replace(example, real)
    return CALLBACK_URL.sub("http://127.0.0.1:9/callback", command)


COMMANDS = section_commands()


@pytest.mark.parametrize(
    "command", [c for c in COMMANDS if reason_not_run(c) is None], ids=lambda c: c[:60]
)
def test_the_command_runs(
    command: str, mock_env: dict[str, str], workdir: pathlib.Path, ids: dict[str, str]
) -> None:
    stdout = deepmode(mock_env, workdir, as_run_here(command, ids))
    assert stdout.strip(), f"{command}: nothing on stdout"


def test_the_section_is_collected_and_most_of_it_runs() -> None:
    assert COMMANDS[0].startswith("pip install"), COMMANDS[:2]
    run = [c for c in COMMANDS if reason_not_run(c) is None]
    assert len(run) >= 15, run
    assert all(c.startswith("deepmode ") for c in run), run


def test_the_mock_serve_lines_print_exports() -> None:
    lines = [c for c in COMMANDS if c.startswith("deepmode mock serve")]
    assert lines
    for line in lines:
        args = line.removeprefix("deepmode mock serve").removesuffix("&").split()
        with served([*args, "--port", "0"]) as printed:
            assert printed["DEEPMODE_BASE_URL"].startswith("http://127.0.0.1:")


def test_the_exports_are_mock_serves(mock_env: dict[str, str]) -> None:
    on_its_default_port = {
        "DEEPMODE_API_KEY": mock_env["DEEPMODE_API_KEY"],
        "DEEPMODE_BASE_URL": re.sub(r":\d+$", f":{MOCK_SERVE_PORT}", mock_env["DEEPMODE_BASE_URL"]),
    }
    exports = [c for c in COMMANDS if c.startswith("export ")]
    assert len(exports) == 2, exports
    for line in exports:
        for word in line.split()[1:]:
            name, _, value = word.partition("=")
            assert value in ("...", on_its_default_port[name]), line
