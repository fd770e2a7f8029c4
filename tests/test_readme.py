"""Every ```python block of the docs (README.md, docs/*.md, benchmarks/README.md) runs.

A block runs as printed, as a script (or, when it defines `test_` functions, as a
pytest file) against a mock whose address and key are in the environment, as after
`deepmode mock serve` and its two exports, in a directory holding the photos the
examples name. A block that is not a whole program says so on the line before it:

    <!-- fragment: names=dm,model -->   run inside `async with` a harness giving these
    <!-- fragment: compile -->          compiled only (it needs a server of yours)

The names a fragment may ask for are those of `_readme_harness.provide`.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from deepmode_async.testing import MockDeepMode, sample_image

ROOT = pathlib.Path(__file__).parent.parent
DOCS = sorted(
    path
    for pattern in ("README.md", "docs/**/*.md", "benchmarks/README.md", "examples/*.md")
    for path in ROOT.glob(pattern)
)
BLOCK = re.compile(
    r"(?:^[ \t]*<!-- fragment: (?P<marker>[^>]*?) -->\n)?^[ \t]*```python\n(?P<code>.*?)^[ \t]*```",
    re.S | re.M,
)
#: The photos the examples name, each a distinct picture prep takes.
PHOTOS = ("me-1.jpg", "me-2.png", "me-3.jpg", "IMG_0001.HEIC", "IMG_0002.jpg")
TIMEOUT = 60


def blocks() -> Iterator[object]:
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for found in BLOCK.finditer(text):
            line = text.count("\n", 0, found.start("code"))
            yield pytest.param(
                found["marker"],
                textwrap.dedent(found["code"]),
                id=f"{path.relative_to(ROOT)}:{line}",
            )


@pytest.fixture(scope="module")
def mock() -> Iterator[MockDeepMode]:
    with MockDeepMode(balance=1_000_000) as served:
        yield served


def script_for(marker: str | None, code: str) -> str:
    if marker is None:
        return code
    if marker == "compile":
        compile(code, "<block>", "exec", flags=0x2000)  # PyCF_ALLOW_TOP_LEVEL_AWAIT
        return ""
    found = re.fullmatch(r"names=([\w,]+)", marker)
    assert found, f"unknown fragment marker: {marker!r}"
    names = found[1].split(",")
    body = textwrap.indent(code, " " * 8)
    return (
        "import asyncio\n\nfrom _readme_harness import provide\n\n\n"
        "async def fragment() -> None:\n"
        f"    async with provide({names!r}) as given:\n"
        f"        {', '.join(names)}, = (given[name] for name in {names!r})\n"
        f"{body}\n\nasyncio.run(fragment())\n"
    )


@pytest.mark.parametrize(("marker", "code"), list(blocks()))
def test_the_block_runs(
    marker: str | None, code: str, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    script = script_for(marker, code)
    if not script:
        return
    for number, name in enumerate(PHOTOS):
        (tmp_path / name).write_bytes(sample_image("png", side=256 + 8 * number))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPMODE_")}
    env |= {
        "DEEPMODE_API_KEY": mock.api_key,
        "DEEPMODE_BASE_URL": mock.base_url,
        "PYTHONPATH": str(pathlib.Path(__file__).parent),
    }
    if "def test_" in code:
        (tmp_path / "test_block.py").write_text(script, encoding="utf-8")
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_block.py"]
    else:
        (tmp_path / "block.py").write_text(script, encoding="utf-8")
        argv = [sys.executable, "block.py"]
    done = subprocess.run(  # noqa: S603 (our own interpreter)
        argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_doc_with_python_has_its_blocks_collected() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(list(blocks())) >= readme.count("```python")
