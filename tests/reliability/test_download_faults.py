"""Downloads under faults, at the scale of a batch: whole files or a `DownloadError`.

Truncated bodies, connections dropped, stalls past the read timeout, URLs that expire
(once, or again after their refresh), refusals and 404s of the image host, mixed in one
batch of tens of large images. Whatever happens, a file under its final name is the
whole image (checked by SHA-256 while the batch runs and after it), a failure is a
`DownloadError` of its own image only, no temporary file is left, and two downloads
writing the same names into one directory at once never clobber each other.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Sequence

import anyio
import attrs
import pytest
import yarl
from _support import leftovers
from conftest import make_client

from deepmode_async import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    BadRequestError,
    BatchResult,
    DownloadError,
    DownloadProgress,
    GenerateRequest,
    Image,
    NotFoundError,
    PermissionDeniedError,
    Timeout,
)
from deepmode_async.testing import MockDeepMode
from deepmode_async.testing._records import RecordedRequest

pytestmark = pytest.mark.anyio

SIZE = 1024 * 1024  # large enough that a fault at half the body is really mid-stream
SHORT = Timeout(connect=5, read=1.0)  # a stalled body (5 s) gives up quickly


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def downloads(mock: MockDeepMode) -> list[RecordedRequest]:
    return [record for record in mock.requests if record.endpoint == "download"]


def retrieves(mock: MockDeepMode) -> list[RecordedRequest]:
    return [record for record in mock.requests if record.endpoint == "retrieve_image"]


def blob_path(image: Image) -> str:
    return yarl.URL(image.image_url, encoded=True).path


def visible(directory: pathlib.Path) -> list[str]:
    """The names under their final form (temporary files are hidden, `.NAME.XXXX.part`)."""
    return sorted(name for name in os.listdir(directory) if not name.startswith("."))


def assert_whole(paths: Sequence[pathlib.Path], mock: MockDeepMode) -> None:
    expected = sha256(mock.image_bytes)
    assert [sha256(path.read_bytes()) for path in paths] == [expected] * len(paths)


async def images_of(dm: AsyncClient, mock: MockDeepMode, count: int) -> list[Image]:
    """`count` generated images (8 to a call)."""
    model_id = mock.add_model().id
    found: list[Image] = []
    while len(found) < count:
        number = min(8, count - len(found))
        generation = await dm.images.generate(
            model_id=model_id, prompt="a fault", num_images=number
        )
        found.extend(generation.images)
    return found


class Watcher:
    """A progress callback that checks, at every chunk, that each file under its final
    name in `dest` is already whole: a partial file must never be visible."""

    def __init__(self, dest: pathlib.Path, size: int) -> None:
        self.dest = dest
        self.size = size
        self.calls = 0
        self.partial: list[tuple[str, int]] = []

    def __call__(self, progress: DownloadProgress) -> None:
        self.calls += 1
        with os.scandir(self.dest) as entries:
            for entry in entries:
                if not entry.name.startswith("."):
                    size = entry.stat().st_size
                    if size != self.size:
                        self.partial.append((entry.name, size))


# ------------------------------------------------------------------ faults that heal


async def test_transient_faults_mixed_in_one_batch_all_heal_into_whole_files(
    tmp_path: pathlib.Path,
) -> None:
    """40 images of 1 MiB, 8 at a time, while the image host truncates 3 bodies, drops 3
    connections and stalls 2 bodies half-way past the read timeout: every image arrives
    whole after one more try, and no partial file is ever visible."""
    dest = tmp_path / "out"
    async with (
        MockDeepMode(image_size=SIZE) as mock,
        make_client(mock, max_retries=3, timeout=SHORT) as dm,
    ):
        images = await images_of(dm, mock, 40)
        for _ in range(2):  # interleaved, so each kind lands somewhere in the batch
            mock.truncate()
            mock.drop("download")
            mock.stall("download", after_bytes=SIZE // 2, seconds=5)
        mock.truncate()
        mock.drop("download")
        watcher = Watcher(dest, SIZE)

        paths = await dm.images.download(images, dest, concurrency=8, progress=watcher)

        records = downloads(mock)
    assert [path.name for path in paths] == [image.file_name for image in images]
    assert [path.parent for path in paths] == [dest] * 40
    assert_whole(paths, mock)
    assert visible(dest) == sorted(image.file_name for image in images)
    assert sorted(os.listdir(dest)) == visible(dest)
    assert leftovers(dest) == []
    assert watcher.calls > 40  # per chunk
    assert watcher.partial == []
    # Every fault cost exactly one more try of its image; none reached the disk.
    assert len(records) == 48
    assert sorted(str(record.status) for record in records) == ["200"] * 40 + ["None"] * 8
    for image in images:
        tries = [record.status for record in records if record.path == blob_path(image)]
        assert tries[-1] == 200, (image.id, tries)
        assert tries.count(200) == 1, (image.id, tries)
    assert retrieves(mock) == []  # nothing expired: no refresh


async def test_expired_urls_in_a_concurrent_batch_are_refreshed_once_each(
    tmp_path: pathlib.Path,
) -> None:
    """30 expired URLs, 16 at a time, with 4 connections dropped on top: each image is
    re-signed through `images.retrieve` exactly once and arrives whole."""
    async with (
        MockDeepMode(image_size=256 * 1024, url_ttl=60) as mock,
        make_client(mock, max_retries=2) as dm,
    ):
        images = await images_of(dm, mock, 30)
        mock.advance_clock(61)  # every URL handed out is now past its expiry
        mock.drop("download", times=4)

        paths = await dm.images.download(images, tmp_path, concurrency=16)

        records = downloads(mock)
        refreshes = retrieves(mock)
    assert [path.name for path in paths] == [image.file_name for image in images]
    assert_whole(paths, mock)
    assert visible(tmp_path) == sorted(image.file_name for image in images)
    assert leftovers(tmp_path) == []
    assert sorted(record.path for record in refreshes) == sorted(
        f"/api/images/{image.id}" for image in images
    )
    assert [record.status for record in refreshes] == [200] * 30
    assert len(records) == 64  # 30 refused, 4 dropped, 30 served
    for image in images:
        tries = [record for record in records if record.path == blob_path(image)]
        statuses = [record.status for record in tries]
        assert statuses.count(403) == 1, (image.id, statuses)
        assert statuses.count(200) == 1, (image.id, statuses)
        assert statuses[-1] == 200
        assert tries[-1].query != image.image_url.partition("?")[2]  # the fresh signature
    assert sum(record.status is None for record in records) == 4


async def test_urls_that_expire_again_after_their_refresh_fail_each_request_once(
    tmp_path: pathlib.Path,
) -> None:
    """With URLs born expired, each image of a batch is refused, refreshed once, refused
    again: a `DownloadError` for its own request, the paid generation kept, no loop of
    refreshes and no file."""
    async with MockDeepMode(url_ttl=0) as mock, make_client(mock) as dm:
        model_id = mock.add_model().id
        requests = [GenerateRequest(model_id=model_id, prompt=f"p{i}") for i in range(10)]
        results: list[BatchResult] = []
        result: BatchResult  # the loops below rebind it to any result
        async for result in dm.images.generate_many(requests, concurrency=5, download_to=tmp_path):
            results.append(result)

        records = downloads(mock)
        refreshes = retrieves(mock)
        charged = len(mock.ledger)
    assert sorted(result.index for result in results) == list(range(10))
    for result in results:
        assert isinstance(result.error, DownloadError), result
        assert result.generation is not None
        assert result.paths is None
        (image,) = result.generation.images
        assert result.error.image_id == image.id
        assert "its URL has expired or was refused (403)" in str(result.error)
        assert isinstance(result.error.__cause__, PermissionDeniedError)
        assert [r.status for r in records if r.path == blob_path(image)] == [403, 403]
    assert sorted(r.path for r in refreshes) == sorted(
        f"/api/images/{result.generation.images[0].id}"
        for result in results
        if result.generation is not None
    )
    assert len(records) == 20
    assert charged == 10  # the generations were made and paid for; they are kept
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ faults that stay


async def test_permanent_faults_in_a_generate_many_batch_fail_only_their_own_request(
    tmp_path: pathlib.Path,
) -> None:
    """30 requests, 8 in flight, no retries: 2 truncated bodies, 2 bodies stalled half-way,
    1 stall before the answer, 2 404s and a 500 on the image host. Exactly those 8
    requests fail, each with a `DownloadError` saying what happened; the 22 others
    download whole, and only their files are in the directory."""
    async with (
        MockDeepMode(image_size=SIZE) as mock,
        make_client(mock, max_retries=0, timeout=SHORT) as dm,
    ):
        model_id = mock.add_model().id
        for _ in range(2):
            mock.truncate()
            mock.stall("download", after_bytes=SIZE // 2, seconds=5)
            mock.fail("download", 404, detail="gone")
        mock.stall("download", seconds=5)
        mock.fail("download", 500)
        requests = [GenerateRequest(model_id=model_id, prompt=f"p{i}") for i in range(30)]
        results: list[BatchResult] = []
        async for result in dm.images.generate_many(requests, concurrency=8, download_to=tmp_path):
            results.append(result)
        charged = len(mock.ledger)
        attempts = len(downloads(mock))

    assert sorted(result.index for result in results) == list(range(30))
    assert charged == 30
    assert attempts == 30
    failed = [result for result in results if not result.ok]
    fine = [result for result in results if result.ok]

    def kind(result: BatchResult) -> str:
        error = result.error
        assert isinstance(error, DownloadError), repr(error)
        assert result.generation is not None
        assert result.paths is None
        assert error.image_id == result.generation.images[0].id
        text = str(error)
        assert text.startswith(f"Could not download image {error.image_id}: ")
        assert "?[redacted]" in text
        assert "sig=" not in text  # the signed query stays secret
        if "the answer was cut off before its end" in text:
            assert isinstance(error.__cause__, APIConnectionError)
            return "truncated"
        if "timed out: no data from the server within the read timeout" in text:
            assert isinstance(error.__cause__, APITimeoutError)
            return "stalled"
        if "-> 404: gone" in text:
            assert isinstance(error.__cause__, NotFoundError)
            return "404"
        if "-> 500" in text:
            return "500"
        raise AssertionError(text)

    assert sorted(kind(result) for result in failed) == sorted(
        ["truncated"] * 2 + ["stalled"] * 3 + ["404"] * 2 + ["500"]
    )
    assert len(fine) == 22
    paths = [path for result in fine for path in result.paths or ()]
    assert len(paths) == 22
    assert_whole(paths, mock)
    assert visible(tmp_path) == sorted(path.name for path in paths)
    assert leftovers(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == visible(tmp_path)


async def test_refusals_of_the_image_host_fail_alone_among_concurrent_downloads(
    tmp_path: pathlib.Path, closed_port: int
) -> None:
    """An app downloading one image per task, all at once, into one directory: a 404 of a
    missing blob, a URL for an unknown image (403, then the refresh 404s), a path that is
    not a blob (400), a host that is down, and a tampered path (403, healed by the
    refresh) each end on their own, while 12 good images arrive whole."""
    async with MockDeepMode() as mock, make_client(mock, max_retries=2) as dm:
        good = await images_of(dm, mock, 12)
        template = good[0]
        query = template.image_url.partition("?")[2]
        missing = attrs.evolve(
            template,
            id="missing",
            file_name="missing.jpeg",
            # signed, no blob
            image_url=mock._state.signed_url("/deepmode-user-image/missing.jpeg"),
        )
        unknown = attrs.evolve(
            template,
            id="unknown",
            file_name="unknown.jpeg",
            image_url=f"{mock.blob_base_url}/deepmode-user-image/unknown.jpeg",
        )
        not_a_blob = attrs.evolve(
            template,
            id="not-a-blob",
            file_name="not-a-blob.jpeg",
            image_url=f"{mock.blob_base_url}/a/b/c?{query}",
        )
        down = attrs.evolve(
            template,
            id="down",
            file_name="down.jpeg",
            image_url=f"http://127.0.0.1:{closed_port}/deepmode-user-image/x.jpeg?{query}",
        )
        tampered = attrs.evolve(  # good[1] with another path, its signature kept
            good[1], image_url=f"{mock.blob_base_url}/deepmode-user-image/other.jpeg?{query}"
        )
        everything = [*good[:1], missing, *good[2:6], unknown, not_a_blob, down, *good[6:]]
        outcomes: dict[str, pathlib.Path | DownloadError] = {}

        async def fetch(image: Image) -> None:
            try:
                (outcomes[image.id],) = await dm.images.download(image, tmp_path)
            except DownloadError as error:
                outcomes[image.id] = error

        async with anyio.create_task_group() as group:
            for image in [*everything, tampered]:
                group.start_soon(fetch, image)

        records = downloads(mock)
        mock_requests = mock.requests
        refreshes = [record.path for record in retrieves(mock)]

    def error_of(image: Image) -> DownloadError:
        error = outcomes[image.id]
        assert isinstance(error, DownloadError), repr(error)
        assert error.image_id == image.id
        return error

    assert isinstance(error_of(missing).__cause__, NotFoundError)
    assert "-> 404: BlobNotFound The specified blob does not exist." in str(error_of(missing))
    assert [r.status for r in records if r.path == "/deepmode-user-image/missing.jpeg"] == [404]
    assert "its URL expired and could not be refreshed" in str(error_of(unknown))
    assert "Image 'unknown' not found" in str(error_of(unknown))
    assert isinstance(error_of(not_a_blob).__cause__, BadRequestError)
    assert "-> 400: InvalidUri" in str(error_of(not_a_blob))
    assert [r.status for r in mock_requests if r.path == "/a/b/c"] == [400]  # not retried
    assert isinstance(error_of(down).__cause__, APIConnectionError)
    assert f"cannot connect to 127.0.0.1:{closed_port}" in str(error_of(down))
    # A refusal (403) is refreshed once; the others are not the URL's fault.
    assert sorted(refreshes) == sorted(["/api/images/unknown", f"/api/images/{tampered.id}"])
    assert [r.status for r in records if r.path == "/deepmode-user-image/other.jpeg"] == [403]

    # The 12 good images, good[1] through its tampered URL, arrive whole under their names.
    saved = [outcomes[image.id] for image in good]
    paths = [path for path in saved if isinstance(path, pathlib.Path)]
    assert paths == [tmp_path / image.file_name for image in good], saved
    assert_whole(paths, mock)
    assert visible(tmp_path) == sorted(image.file_name for image in good)
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------ two writers, one dest


async def test_two_downloads_of_the_same_images_into_one_dest_never_clobber(
    tmp_path: pathlib.Path,
) -> None:
    """Two downloads of the same 10 images into one directory at once (overwrite off),
    where a file of the user's already holds the first name: the user's file is kept,
    and each download gets whole files of its own (`NAME-2`, `NAME-3`)."""
    async with (
        MockDeepMode(image_size=SIZE) as mock,
        make_client(mock) as dm,
    ):
        images = await images_of(dm, mock, 10)
        mine = tmp_path / images[0].file_name
        mine.write_bytes(b"the user's own file")
        mock.set_latency("download", 0.05)  # both downloads are in flight together

        async def download() -> list[pathlib.Path]:
            return await dm.images.download(images, tmp_path, concurrency=5)

        first: list[pathlib.Path] = []
        second: list[pathlib.Path] = []

        async def into(result: list[pathlib.Path]) -> None:
            result.extend(await download())

        async with anyio.create_task_group() as group:
            group.start_soon(into, first)
            group.start_soon(into, second)

    assert mine.read_bytes() == b"the user's own file"
    assert len(first) == len(second) == 10
    assert set(first).isdisjoint(second)
    for index, image in enumerate(images):
        stem = image.file_name.removesuffix(".jpeg")
        expected = (
            {f"{stem}-2.jpeg", f"{stem}-3.jpeg"}
            if index == 0
            else {image.file_name, f"{stem}-2.jpeg"}
        )
        assert {first[index].name, second[index].name} == expected
    assert_whole(first + second, mock)
    assert visible(tmp_path) == sorted([mine.name, *(p.name for p in first + second)])
    assert leftovers(tmp_path) == []


async def test_two_overwriting_downloads_into_one_dest_leave_one_whole_file_each(
    tmp_path: pathlib.Path,
) -> None:
    """With `overwrite=True`, two downloads of the same images at once both succeed on
    the same names, replacing a stale file: each name holds the whole image at the end."""
    async with (
        MockDeepMode(image_size=SIZE) as mock,
        make_client(mock) as dm,
    ):
        images = await images_of(dm, mock, 10)
        stale = tmp_path / images[3].file_name
        stale.write_bytes(b"stale")
        mock.set_latency("download", 0.05)
        results: list[list[pathlib.Path]] = []

        async def download() -> None:
            results.append(
                await dm.images.download(images, tmp_path, concurrency=5, overwrite=True)
            )

        async with anyio.create_task_group() as group:
            group.start_soon(download)
            group.start_soon(download)
        attempts = len(downloads(mock))

    expected = [tmp_path / image.file_name for image in images]
    assert results == [expected, expected]
    assert attempts == 20
    assert_whole(expected, mock)
    assert visible(tmp_path) == sorted(image.file_name for image in images)
    assert leftovers(tmp_path) == []
