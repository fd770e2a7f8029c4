"""Resource limits: files that change under an upload, things that are not files, and
download destinations that cannot take the images. Each gives a clear typed error,
spends nothing it should not, and leaves no temporary file.

Uploads act mid-way through the `progress=` callback of `models.create`, which runs as
the bytes of a large (sparse) photo go out. The tests may run as root, who can read and
write anything (`ROOT`): where that changes the outcome, they assert what root gets.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import anyio
import pytest
from _support import leftovers
from conftest import eventually, make_client, write_photo

from deepmode_async import (
    AsyncClient,
    BatchResult,
    DeepModeError,
    DownloadError,
    GenerateRequest,
    Generation,
    Image,
    PayloadTooLargeError,
    UploadProgress,
    ValidationError,
)
from deepmode_async._uploads import UploadSourceChanged
from deepmode_async.testing import MockDeepMode
from deepmode_async.testing._records import RecordedRequest

pytestmark = pytest.mark.anyio


def _permissions_apply() -> bool:
    """Whether file permissions stop this process: not for root, unless root runs
    without CAP_DAC_OVERRIDE (as in some containers), so probed rather than guessed
    from `os.geteuid()`."""
    with tempfile.TemporaryDirectory() as directory:
        probe = pathlib.Path(directory, "probe")
        probe.write_bytes(b"")
        probe.chmod(0)
        try:
            probe.open("rb").close()
        except PermissionError:
            return True
        return False


#: Root (with its usual capabilities) reads and writes anything: the tests assert what
#: it gets where that changes the outcome.
ROOT = not _permissions_apply()
MB = 1024 * 1024
BIG = 30 * MB  # sparse on disk: cheap to make, and long enough to act half-way through


def creates(mock: MockDeepMode) -> list[RecordedRequest]:
    return [record for record in mock.requests if record.endpoint == "create_model"]


def at(threshold: int, action: Callable[[], None]) -> Callable[[UploadProgress], None]:
    """A progress callback that runs `action` once, when `threshold` bytes have gone."""
    done = False

    def progress(sent: UploadProgress) -> None:
        nonlocal done
        if not done and sent.bytes_sent >= threshold:
            done = True
            action()

    return progress


async def assert_aborted(mock: MockDeepMode, count: int = 1) -> None:
    """The server saw `count` uploads cut off (no answer sent) and charged nothing."""

    def cut_off() -> bool:
        records = creates(mock)
        return [(r.status, r.disconnected) for r in records] == [(None, True)] * count

    await eventually(cut_off)
    assert mock.ledger == []


# ------------------------------------------------------------------ files that change mid-upload


async def test_a_photo_truncated_mid_upload_fails_alone_among_concurrent_uploads(
    mock: MockDeepMode, dm: AsyncClient, tmp_path: pathlib.Path
) -> None:
    """Three 30 MB trainings at once; the first photo is cut to 1000 bytes after 8 MB
    went out. That call fails naming the file and how far it got, the server saw its
    body cut off, and the other two train and are charged as usual."""
    paths = [write_photo(tmp_path / f"me{index}.jpg", BIG) for index in range(3)]
    outcomes: dict[int, object] = {}

    async def train(index: int) -> None:
        progress = at(8 * MB, lambda: os.truncate(paths[0], 1000)) if index == 0 else None
        try:
            outcomes[index] = await dm.models.create(
                images=[paths[index]], progress=progress, gender="woman", model_type="amateur"
            )
        except DeepModeError as error:
            outcomes[index] = error

    async with anyio.create_task_group() as group:
        for index in range(3):
            group.start_soon(train, index)

    error = outcomes[0]
    assert isinstance(error, UploadSourceChanged), repr(error)
    assert str(error).startswith("'me0.jpg' became shorter while it was uploaded (")
    assert str(error).endswith(f" of {BIG} bytes sent)")
    assert [type(outcomes[i]).__name__ for i in (1, 2)] == ["ModelCreated"] * 2
    await eventually(lambda: any(r.disconnected for r in creates(mock)))
    records = creates(mock)
    assert sorted(str(r.status) for r in records) == ["200", "200", "None"]
    assert sorted(f.size for r in records if r.status == 200 for f in r.files) == [BIG, BIG]
    assert [(r.disconnected, r.files) for r in records if r.status is None] == [(True, [])]
    assert [charge.cost for charge in mock.ledger] == [50, 50]


@pytest.mark.parametrize("change", ["deleted", "made-a-directory", "made-unreadable"])
async def test_a_photo_that_changes_before_its_turn_is_a_clear_error(
    mock: MockDeepMode, dm: AsyncClient, tmp_path: pathlib.Path, change: str
) -> None:
    """The second photo of a training changes while the first one streams: the call
    fails when it comes to it, naming it and saying why, and nothing is charged."""
    first = write_photo(tmp_path / "first.jpg", BIG)
    second = write_photo(tmp_path / "second.jpg", 100_000)

    def act() -> None:
        if change == "deleted":
            second.unlink()
        elif change == "made-a-directory":
            second.unlink()
            second.mkdir()
        else:
            second.chmod(0o000)

    progress = at(4 * MB, act)
    if change == "made-unreadable" and ROOT:  # root reads it anyway: it goes out whole
        await dm.models.create(
            images=[first, second], progress=progress, gender="woman", model_type="amateur"
        )
        (record,) = creates(mock)
        assert record.status == 200
        assert [f.size for f in record.files] == [BIG, 100_000]
        return

    with pytest.raises(UploadSourceChanged) as caught:
        await dm.models.create(
            images=[first, second], progress=progress, gender="woman", model_type="amateur"
        )

    reason = {
        "deleted": "No such file or directory",
        "made-a-directory": "Is a directory",
        "made-unreadable": "Permission denied",
    }[change]
    assert str(caught.value) == f"'second.jpg' could not be opened for upload: {reason}"
    await assert_aborted(mock)


@pytest.mark.parametrize("change", ["deleted", "replaced"])
async def test_a_photo_unlinked_while_it_streams_goes_out_as_it_was_checked(
    mock: MockDeepMode, dm: AsyncClient, tmp_path: pathlib.Path, change: str
) -> None:
    """Deleting (or renaming another file over) a photo whose bytes are streaming does
    not touch the open file: the checked photo goes out whole (POSIX semantics)."""
    first = write_photo(tmp_path / "first.jpg", BIG)
    other = write_photo(tmp_path / "other.jpg", 5000)

    def act() -> None:
        if change == "deleted":
            first.unlink()
        else:
            os.replace(other, first)

    await dm.models.create(
        images=[first], progress=at(8 * MB, act), gender="woman", model_type="amateur"
    )

    (record,) = creates(mock)
    assert record.status == 200
    assert [f.size for f in record.files] == [BIG]
    assert [charge.cost for charge in mock.ledger] == [50]


async def test_a_photo_that_grows_mid_upload_is_a_clear_error(
    mock: MockDeepMode, dm: AsyncClient, tmp_path: pathlib.Path
) -> None:
    """A photo still being written (it grows by 1 MB while it streams) changed size
    under the upload: that is an error naming it, as a shrinking one is, not a silent
    upload of the first 30 MB of a file that now has 31 MB."""
    first = write_photo(tmp_path / "growing.jpg", BIG)

    def grow() -> None:
        with first.open("ab") as file:
            file.write(b"\xff" * MB)

    with pytest.raises(UploadSourceChanged, match="grew while it was uploaded") as caught:
        await dm.models.create(
            images=[first], progress=at(8 * MB, grow), gender="woman", model_type="amateur"
        )

    assert "'growing.jpg'" in str(caught.value)
    await assert_aborted(mock)


async def test_a_photo_swapped_for_a_fifo_before_its_turn_fails_at_once(
    mock: MockDeepMode, dm: AsyncClient, tmp_path: pathlib.Path
) -> None:
    """A checked photo replaced by a named pipe before its part is sent must not hang
    the upload in `open()` (which waits for a writer that may never come): it fails at
    once, naming the file. A watchdog opens the pipe for writing after 1.5 s, so a
    hanging SDK costs this test 1.5 s instead of hanging it."""
    first = write_photo(tmp_path / "first.jpg", 8 * MB)
    second = write_photo(tmp_path / "second.jpg", 100_000)
    stop = threading.Event()

    def watchdog() -> None:
        deadline = time.monotonic() + 5
        stop.wait(1.5)
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                os.close(os.open(second, os.O_WRONLY | os.O_NONBLOCK))  # EOF for a reader
            except OSError:  # no reader yet (ENXIO), or not a pipe any more
                time.sleep(0.01)

    def swap() -> None:
        second.unlink()
        os.mkfifo(second)
        threading.Thread(target=watchdog, daemon=True).start()

    started = time.monotonic()
    try:
        with pytest.raises(UploadSourceChanged, match="is no longer a regular file") as caught:
            await dm.models.create(
                images=[first, second], progress=at(MB, swap), gender="woman", model_type="amateur"
            )
        elapsed = time.monotonic() - started
    finally:
        stop.set()

    assert "'second.jpg'" in str(caught.value)
    assert elapsed < 1.0, f"the upload hung {elapsed:.1f} s in open() of a FIFO: {caught.value}"
    await assert_aborted(mock)


async def test_an_upload_over_the_servers_size_limit_is_a_413_not_retried(
    tmp_path: pathlib.Path,
) -> None:
    """A body larger than the server takes: `PayloadTooLargeError` from its 413, sent
    once (retrying cannot help), nothing charged."""
    big = write_photo(tmp_path / "huge.jpg", 20 * MB)
    async with MockDeepMode(max_upload_size=MB) as mock, make_client(mock) as dm:
        with pytest.raises(PayloadTooLargeError) as caught:
            await dm.models.create(images=[big], gender="woman", model_type="amateur")

        assert caught.value.status_code == 413
        assert "Request body is larger than 1048576 bytes" in str(caught.value)
        assert [r.status for r in creates(mock)] == [413]
        assert mock.ledger == []


# ------------------------------------------------------------------ things that are not photos


@contextlib.contextmanager
def special(kind: str, tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A path that is not a regular image file."""
    path = tmp_path / f"{kind}.jpg"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-to-directory":
        (tmp_path / "folder").mkdir()
        path.symlink_to(tmp_path / "folder")
    elif kind == "dangling-symlink":
        path.symlink_to(tmp_path / "nowhere.jpg")
    else:
        path = pathlib.Path(f"/dev/{kind}")
    yield path


# (kind, the error's text after the argument's name; {path} is the path's repr)
SPECIAL = [
    ("directory", "{path} is a directory, not a file"),
    ("fifo", "{path} is not a regular file"),
    ("zero", "{path} is not a regular file"),
    ("null", "{path} is not a regular file"),
    ("symlink-to-directory", "{path} is a directory, not a file"),
    ("dangling-symlink", "{path} does not exist"),
]


@pytest.mark.parametrize(("kind", "says"), SPECIAL, ids=[kind for kind, _ in SPECIAL])
async def test_things_that_are_not_photos_are_refused_before_any_request(
    mock: MockDeepMode, dm: AsyncClient, tmp_path: pathlib.Path, kind: str, says: str
) -> None:
    """A directory, a pipe (never opened: that would block), a device, a link to a
    directory or to nothing, as a training photo or as a remix's artwork: a
    `ValidationError` naming the argument and the path, before any byte is sent."""
    good = write_photo(tmp_path / "good.jpg")
    with special(kind, tmp_path) as path, anyio.fail_after(5):
        with pytest.raises(ValidationError) as caught:
            await dm.models.create(images=[good, path], gender="woman", model_type="amateur")
        assert str(caught.value) == "images[1]: " + says.format(path=repr(str(path)))
        with pytest.raises(ValidationError) as caught:
            await dm.images.remix(
                model_id=mock.add_model().id, artwork_image=path, mask_image=good, prompt="p"
            )
        assert str(caught.value) == "artwork_image: " + says.format(path=repr(str(path)))
    assert mock.requests == []
    assert mock.ledger == []


async def test_an_unreadable_photo_is_refused_before_any_request_unless_root(
    mock: MockDeepMode, dm: AsyncClient, tmp_path: pathlib.Path
) -> None:
    locked = write_photo(tmp_path / "locked.jpg", 50_000)
    locked.chmod(0o000)
    if ROOT:  # permissions do not stop root: the photo goes out whole
        await dm.models.create(images=[locked], gender="woman", model_type="amateur")
        assert [[f.size for f in r.files] for r in creates(mock)] == [[50_000]]
        return
    with pytest.raises(ValidationError) as caught:
        await dm.models.create(images=[locked], gender="woman", model_type="amateur")
    assert str(caught.value) == f"images: {str(locked)!r} cannot be read: no permission"
    assert mock.requests == []


# ------------------------------------------------------------------ download destinations


async def test_bad_download_destinations_are_refused_before_spending(
    mock: MockDeepMode, dm: AsyncClient, tmp_path: pathlib.Path
) -> None:
    """`generate_many(download_to=...)` checks the directory before the first paid
    call: a regular file, a path under a file, a NUL byte (and, except for root, a
    read-only directory) each give a `ValidationError` naming `dest`, and cost nothing."""
    model_id = mock.add_model().id
    a_file = tmp_path / "file"
    a_file.write_bytes(b"mine")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    cases: list[tuple[str | pathlib.Path, str]] = [
        (a_file, f"dest {str(a_file)!r} exists and is not a directory"),
        (a_file / "sub", f"dest {str(a_file / 'sub')!r} cannot be created: Not a directory"),
        (f"{tmp_path}/a\0b", "dest contains a NUL byte, which no path can hold"),
    ]
    if not ROOT:
        cases.append((locked, f"dest {str(locked)!r} is not writable"))

    async def run(dest: str | pathlib.Path) -> list[BatchResult]:
        requests = [GenerateRequest(model_id=model_id, prompt="p")]
        return [result async for result in dm.images.generate_many(requests, download_to=dest)]

    for dest, message in cases:
        with pytest.raises(ValidationError) as caught:
            await run(dest)
        assert str(caught.value) == message
    assert mock.requests == []
    assert mock.ledger == []
    assert a_file.read_bytes() == b"mine"

    if ROOT:  # a read-only directory is writable for root: the batch just works
        results = await run(locked)
        assert [r.ok for r in results] == [True]
        assert [path.read_bytes() for path in results[0].paths or ()] == [mock.image_bytes]


async def generated(dm: AsyncClient, mock: MockDeepMode, number: int) -> list[Image]:
    generation = await dm.images.generate(
        model_id=mock.add_model().id, prompt="p", num_images=number
    )
    return list(generation.images)


async def test_a_file_name_taken_by_a_directory(
    mock: MockDeepMode, dm: AsyncClient, tmp_path: pathlib.Path
) -> None:
    """A directory already has the image's name: without `overwrite` the image goes
    next to it as `NAME-2`; with `overwrite` (a directory is not a file to replace) it
    is a `DownloadError` saying so. The directory and its content are untouched."""
    (image,) = await generated(dm, mock, 1)
    taken = tmp_path / image.file_name
    taken.mkdir()
    (taken / "keep.txt").write_text("keep")

    (path,) = await dm.images.download(image, tmp_path)
    assert path == tmp_path / image.file_name.replace(".jpeg", "-2.jpeg")
    assert path.read_bytes() == mock.image_bytes

    with pytest.raises(DownloadError) as caught:
        await dm.images.download(image, tmp_path, overwrite=True)
    assert caught.value.image_id == image.id
    assert f"cannot write {str(taken)!r}: Is a directory" in str(caught.value)
    assert isinstance(caught.value.__cause__, IsADirectoryError)
    assert (taken / "keep.txt").read_text() == "keep"
    assert sorted(os.listdir(tmp_path)) == sorted([taken.name, path.name])
    assert leftovers(tmp_path) == []


async def test_a_symlink_under_the_final_name_is_never_written_through(
    mock: MockDeepMode, dm: AsyncClient, tmp_path: pathlib.Path
) -> None:
    """A link under the image's name pointing outside dest: the file it points to is
    never written. Without `overwrite` the image goes to `NAME-2`; with it, the link
    itself is replaced by the image."""
    (image,) = await generated(dm, mock, 1)
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    link = dest / image.file_name
    link.symlink_to(outside)

    (path,) = await dm.images.download(image, dest)
    assert path.name == image.file_name.replace(".jpeg", "-2.jpeg")
    assert link.is_symlink()

    (path,) = await dm.images.download(image, dest, overwrite=True)
    assert path == link
    assert not link.is_symlink()
    assert link.read_bytes() == mock.image_bytes
    assert outside.read_text() == "secret"
    assert leftovers(tmp_path) == []


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """No file of this process may grow past `limit` bytes (EFBIG, as a full disk gives
    ENOSPC); Python ignores SIGXFSZ, so writes fail with an OSError instead."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


async def test_a_disk_that_refuses_writes_mid_download_fails_each_request_and_keeps_it(
    tmp_path: pathlib.Path,
) -> None:
    """Writes refused half-way through each 2 MiB image (a file size limit stands in for
    a full disk): each request of the batch has a `DownloadError` saying the file cannot
    be written, keeps its paid generation, and leaves nothing; once there is room, the
    kept generations download whole without paying again."""
    async with MockDeepMode(image_size=2 * MB) as mock, make_client(mock) as dm:
        model_id = mock.add_model().id
        requests = [GenerateRequest(model_id=model_id, prompt=f"p{i}") for i in range(4)]
        results: list[BatchResult] = []
        result: BatchResult  # the loop below rebinds it to any result
        with file_size_limit(MB):
            async for result in dm.images.generate_many(requests, download_to=tmp_path):
                results.append(result)

        assert sorted(result.index for result in results) == [0, 1, 2, 3]
        for result in results:
            assert isinstance(result.error, DownloadError), repr(result.error)
            assert "cannot write" in str(result.error)
            assert str(result.error).endswith(": File too large")
            assert result.generation is not None
        assert os.listdir(tmp_path) == []

        kept = [result.generation for result in results if result.generation is not None]
        paths = await dm.images.download(kept, tmp_path)
        assert [path.read_bytes() == mock.image_bytes for path in paths] == [True] * 4
        assert len(mock.ledger) == 4
    assert leftovers(tmp_path) == []


async def test_a_dest_removed_mid_download_is_a_download_error(tmp_path: pathlib.Path) -> None:
    """The destination directory is deleted while four images are half-written in it:
    a `DownloadError` saying the file cannot be written; the directory is not made
    again and nothing is left anywhere."""
    dest = tmp_path / "dest"
    async with MockDeepMode(image_size=MB) as mock, make_client(mock) as dm:
        images = await generated(dm, mock, 4)
        mock.stall("download", after_bytes=100, seconds=0.6, times=4)
        outcome: list[BaseException] = []

        async def download() -> None:
            try:
                await dm.images.download(images, dest)
            except DownloadError as error:
                outcome.append(error)

        async with anyio.create_task_group() as group:
            group.start_soon(download)
            await eventually(lambda: dest.is_dir() and len(leftovers(dest)) == 4)
            shutil.rmtree(dest)

    (error,) = outcome
    assert isinstance(error, DownloadError)
    assert error.image_id in {image.id for image in images}
    assert "cannot write" in str(error)
    assert "No such file or directory" in str(error)
    assert os.listdir(tmp_path) == []


async def test_a_dest_replaced_by_a_file_mid_batch_fails_the_later_requests_only(
    mock: MockDeepMode, dm: AsyncClient, tmp_path: pathlib.Path
) -> None:
    """After two results of a batch (one request at a time), its directory is replaced
    by a file: the later requests fail with a typed error saying the destination is not
    a directory and keep their paid generations; the user's file is untouched."""
    dest = tmp_path / "dest"
    model_id = mock.add_model().id
    requests = [GenerateRequest(model_id=model_id, prompt=f"p{i}") for i in range(4)]
    results: list[BatchResult] = []
    result: BatchResult  # the loops below rebind it to any result
    async for result in dm.images.generate_many(requests, concurrency=1, download_to=dest):
        results.append(result)
        if len(results) == 2:
            assert [len(os.listdir(dest))] == [2]
            shutil.rmtree(dest)
            dest.write_bytes(b"a file now")

    assert [result.ok for result in results] == [True, True, False, False]
    for result in results[2:]:
        assert isinstance(result.error, DownloadError), repr(result.error)
        assert isinstance(result.generation, Generation)
        target = dest / result.generation.images[0].file_name
        assert str(result.error).endswith(f"cannot write {str(target)!r}: Not a directory")
    assert dest.read_bytes() == b"a file now"
    assert len(mock.ledger) == 4
    assert leftovers(tmp_path) == []
