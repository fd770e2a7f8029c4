"""Large uploads stream from disk: memory and open files stay flat however big the photos.

The mock runs in another process, so only the client's memory is measured.
"""

from __future__ import annotations

import os
import pathlib
import time
import tracemalloc
from collections.abc import Iterator

import anyio
import pytest
from conftest import write_photos

from deepmode_async import AsyncClient, ModelCreated
from deepmode_async.testing import MockProcess, mock_process

pytestmark = [pytest.mark.anyio, pytest.mark.dm(max_retries=0, fast=False)]

FILES = 30
FILE_SIZE = 4 * 1024 * 1024
PEAK_LIMIT = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def mock() -> Iterator[MockProcess]:
    """Here the mock is `python -m deepmode_async.testing` in its own process."""
    with mock_process(port=0) as process:
        yield process
    assert process.returncode == 0, process.stderr


@pytest.fixture
def photos(tmp_path: pathlib.Path) -> list[pathlib.Path]:
    """30 files of 4 MB: a real JPEG header (all the mock checks) and padding."""
    return write_photos(tmp_path, FILES, size=FILE_SIZE)


def files_open_under(directory: pathlib.Path) -> int:
    """How many of this process's file descriptors are open on files in `directory`."""
    count = 0
    prefix = str(directory) + os.sep
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own fd, for one)
            continue
        count += target.startswith(prefix)
    return count


async def test_training_upload_streams_with_flat_memory_and_few_open_files(
    dm: AsyncClient, photos: list[pathlib.Path], tmp_path: pathlib.Path
) -> None:
    assert sum(path.stat().st_size for path in photos) == FILES * FILE_SIZE  # 120 MiB
    before = (await dm.account.balance()).remaining_balance  # also opens the session
    fd_peak = 0
    sampling = True

    async def sample_open_files() -> None:
        nonlocal fd_peak
        while sampling:
            fd_peak = max(fd_peak, files_open_under(tmp_path))
            await anyio.sleep(0.002)

    tracemalloc.start()
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(sample_open_files)
            started = time.monotonic()
            created = await dm.models.create(images=photos, gender="woman", model_type="amateur")
            elapsed = time.monotonic() - started
            sampling = False
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    print(f"upload of {FILES} x {FILE_SIZE} B: tracemalloc peak {peak} B, {elapsed:.2f} s")
    print(f"files open at once: {fd_peak}")
    assert isinstance(created, ModelCreated)
    assert created.message == "Created model successfully"
    assert peak < PEAK_LIMIT, peak  # reading the files first would show ~120 MiB
    assert 1 <= fd_peak <= 2, fd_peak  # each file is open only while its part is sent
    assert files_open_under(tmp_path) == 0
    after = (await dm.account.balance()).remaining_balance
    assert before - after == 50


def test_the_memory_measure_sees_file_contents(photos: list[pathlib.Path]) -> None:
    """The instrument's control: one photo read into memory already shows its 4 MiB."""
    tracemalloc.start()
    try:
        data = photos[0].read_bytes()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(data) == FILE_SIZE
    assert peak >= FILE_SIZE
