"""`images.download`: ordered, atomic, bounded, sanitized downloads from the image host."""

from __future__ import annotations

import functools
import os
import pathlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import attrs
import pytest
import yarl
from conftest import eventually
from hypothesis import given
from hypothesis import strategies as st

from deepmode_async import (
    APITimeoutError,
    AsyncClient,
    DownloadError,
    DownloadProgress,
    Generation,
    Image,
    NotFoundError,
    PermissionDeniedError,
    RemixResult,
    ValidationError,
    _downloads,
)
from deepmode_async._downloads import safe_file_name, unique_names
from deepmode_async.testing import MockDeepMode, sample_image
from deepmode_async.testing._records import RecordedRequest

pytestmark = pytest.mark.anyio

T = TypeVar("T")


def fast(client: AsyncClient) -> AsyncClient:
    """The client with retries that do not sleep for real."""
    client._transport.retry = attrs.evolve(client._transport.retry, backoff_base=0.001)
    return client


async def generate(dm: AsyncClient, mock: MockDeepMode, num_images: int) -> Generation:
    return await dm.images.generate(
        model_id=mock.add_model().id, prompt="a lighthouse", num_images=num_images
    )


async def remix(dm: AsyncClient, mock: MockDeepMode, mode: str = "sync") -> RemixResult:
    return await dm.images.remix(
        model_id=mock.add_model().id,
        artwork_image=sample_image("jpeg"),
        mask_image=sample_image("png"),
        prompt="on a beach",
        mode=mode,
    )


def downloads(mock: MockDeepMode) -> list[RecordedRequest]:
    return [record for record in mock.requests if record.endpoint == "download"]


def blob_path(image: Image | RemixResult) -> str:
    return yarl.URL(image.image_url, encoded=True).path


def raw_query(image: Image | RemixResult) -> str:
    return image.image_url.partition("?")[2]


def listing(directory: pathlib.Path) -> list[str]:
    return sorted(os.listdir(directory))


async def timed(mock: MockDeepMode, work: Callable[[], Awaitable[T]]) -> tuple[T, int, float]:
    """Run `work`; return its result, the most download requests the image host had open
    at once (sampled server-side from `mock.requests`) and the seconds it took."""
    peak = 0
    finished = anyio.Event()

    async def sample() -> None:
        nonlocal peak
        while not finished.is_set():
            open_now = sum(
                1 for record in downloads(mock) if record.status is None and not record.disconnected
            )
            peak = max(peak, open_now)
            await anyio.sleep(0.005)

    async with anyio.create_task_group() as group:
        group.start_soon(sample)
        started = time.monotonic()
        result = await work()
        elapsed = time.monotonic() - started
        finished.set()
    return result, peak, elapsed


# ------------------------------------------------------------------ what gets downloaded


async def test_a_generation_downloads_in_order_with_its_file_names(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    generation = await generate(dm, mock, 3)
    dest = tmp_path / "out"

    paths = await dm.images.download(generation, dest)

    assert paths == [dest / image.file_name for image in generation.images]
    for path in paths:
        assert path.read_bytes() == mock.image_bytes
    assert listing(dest) == sorted(image.file_name for image in generation.images)


async def test_a_single_image_downloads(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    (image,) = (await generate(dm, mock, 1)).images

    paths = await dm.images.download(image, tmp_path)

    assert paths == [tmp_path / image.file_name]
    assert paths[0].read_bytes() == mock.image_bytes
    assert [record.path for record in downloads(mock)] == [blob_path(image)]


async def test_a_remix_result_downloads(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    result = await remix(dm, mock)

    paths = await dm.images.download(result, tmp_path)

    assert paths == [tmp_path / result.file_name]
    assert paths[0].read_bytes() == mock.image_bytes
    assert [(r.path, r.status) for r in downloads(mock)] == [(blob_path(result), 200)]


async def test_a_mixed_list_keeps_the_input_order(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    result = await remix(dm, mock)
    generation = await generate(dm, mock, 2)
    (single,) = (await generate(dm, mock, 1)).images
    expected = [result.file_name, *(i.file_name for i in generation.images), single.file_name]

    paths = await dm.images.download([result, generation, single], tmp_path, concurrency=4)

    assert [path.name for path in paths] == expected
    assert all(path.parent == tmp_path for path in paths)
    assert [path.read_bytes() for path in paths] == [mock.image_bytes] * 4
    everything: list[Image | RemixResult] = [result, *generation.images, single]
    assert sorted(r.path for r in downloads(mock)) == sorted(blob_path(i) for i in everything)


async def test_the_image_host_gets_no_key_and_the_exact_signed_query(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    generation = await generate(dm, mock, 2)
    result = await remix(dm, mock)
    images: list[Image | RemixResult] = [*generation.images, result]

    await dm.images.download(images, tmp_path)

    seen = {record.path: record for record in downloads(mock)}
    assert sorted(seen) == sorted(blob_path(image) for image in images)
    for image in images:
        record = seen[blob_path(image)]
        assert record.status == 200
        assert "authorization" not in {name.lower() for name in record.headers}
        # The mock signs every URL with %2B and %2F in it: a re-encoded query gets a 403.
        assert "%2B" in raw_query(image)
        assert "%2F" in raw_query(image)
        assert record.query == raw_query(image)
    # The API itself did get the key.
    api_calls = [r for r in mock.requests if r.endpoint in ("generate", "remix")]
    assert [r.headers.get("Authorization") for r in api_calls] == ["[redacted]"] * 2


async def test_invalid_arguments_are_refused_before_any_request(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    generation = await generate(dm, mock, 1)
    bad_calls: list[Callable[[], Awaitable[Any]]] = [
        functools.partial(dm.images.download, generation, tmp_path, concurrency=0),
        functools.partial(dm.images.download, 42, tmp_path),  # type: ignore[arg-type]
        functools.partial(dm.images.download, [generation, "x"], tmp_path),  # type: ignore[list-item]
        functools.partial(dm.images.download, generation, tmp_path, progress="no"),  # type: ignore[arg-type]
    ]
    for call in bad_calls:
        with pytest.raises(ValidationError):
            await call()
    assert downloads(mock) == []
    assert listing(tmp_path) == []


# ------------------------------------------------------------------ bounded concurrency


async def test_concurrency_bounds_the_downloads_in_flight(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    generations = [await generate(dm, mock, 6), await generate(dm, mock, 6)]
    mock.set_latency("download", 0.5)  # a wave: far longer than starting twelve takes

    paths, peak, elapsed = await timed(
        mock, lambda: dm.images.download(generations, tmp_path / "three", concurrency=3)
    )

    assert len(paths) == 12
    assert peak == 3
    assert elapsed >= 1.9  # four waves of 0.5 s

    paths, peak, elapsed = await timed(
        mock, lambda: dm.images.download(generations, tmp_path / "twelve", concurrency=12)
    )

    assert len(paths) == 12
    assert peak == 12
    assert elapsed < 1.5  # one wave, not two or more
    assert [p.read_bytes() for p in paths] == [mock.image_bytes] * 12


# ------------------------------------------------------------------ names


async def test_an_existing_file_is_kept_unless_overwrite(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    (image,) = (await generate(dm, mock, 1)).images
    image = attrs.evolve(image, file_name="name.jpeg")
    (tmp_path / "name.jpeg").write_bytes(b"old")

    assert await dm.images.download(image, tmp_path) == [tmp_path / "name-2.jpeg"]
    assert (tmp_path / "name.jpeg").read_bytes() == b"old"
    assert (tmp_path / "name-2.jpeg").read_bytes() == mock.image_bytes

    assert await dm.images.download(image, tmp_path) == [tmp_path / "name-3.jpeg"]
    assert (tmp_path / "name.jpeg").read_bytes() == b"old"

    assert await dm.images.download(image, tmp_path, overwrite=True) == [tmp_path / "name.jpeg"]
    assert (tmp_path / "name.jpeg").read_bytes() == mock.image_bytes
    assert listing(tmp_path) == ["name-2.jpeg", "name-3.jpeg", "name.jpeg"]


async def test_duplicate_names_in_a_batch_become_unique(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    generation = await generate(dm, mock, 4)
    names = ["same.jpeg", "same.jpeg", "SAME.jpeg", "same.jpeg"]
    images = [
        attrs.evolve(image, file_name=name)
        for image, name in zip(generation.images, names, strict=True)
    ]

    paths = await dm.images.download(images, tmp_path)

    assert [p.name for p in paths] == ["same.jpeg", "same-2.jpeg", "SAME-3.jpeg", "same-4.jpeg"]
    assert [p.read_bytes() for p in paths] == [mock.image_bytes] * 4
    assert listing(tmp_path) == sorted(p.name for p in paths)


HOSTILE_NAMES = [
    "../../etc/passwd",
    "/abs/path.jpeg",
    "a/b\\c.jpeg",
    "..",
    ".",
    "",
    "con.jpeg",
    "x" * 1000 + ".jpeg",
    "bad\x00\n\r\tname.jpeg",
    "evil\u202egpj.exe",
    "a:b?.jpeg",
    ".hidden.jpeg",
    "trailing. . ",
    "é" * 300 + ".jpeg",
]


def assert_safe_name(name: str) -> None:
    assert name
    assert name not in (".", "..")
    assert not name.startswith(".")
    assert not any(ch in name for ch in "/\\\x00")
    assert name.isprintable(), repr(name)
    assert len(name.encode()) <= 200, len(name.encode())


async def test_hostile_file_names_stay_inside_dest(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    generation = await generate(dm, mock, 8)
    more = await generate(dm, mock, 8)
    sources = [*generation.images, *more.images][: len(HOSTILE_NAMES)]
    images = [
        attrs.evolve(image, file_name=name)
        for image, name in zip(sources, HOSTILE_NAMES, strict=True)
    ]
    dest = tmp_path / "out"

    paths = await dm.images.download(images, dest)

    assert len(paths) == len(HOSTILE_NAMES)
    assert len({p.name.lower() for p in paths}) == len(paths)
    for path in paths:
        assert path.parent == dest, path
        assert_safe_name(path.name)
        assert path.read_bytes() == mock.image_bytes
    assert listing(tmp_path) == ["out"]  # nothing escaped the destination
    assert listing(dest) == sorted(p.name for p in paths)
    assert not pathlib.Path("/abs/path.jpeg").exists()
    by_input = dict(zip(HOSTILE_NAMES, paths, strict=True))
    assert by_input["../../etc/passwd"].name == "passwd"
    assert by_input["/abs/path.jpeg"].name == "path.jpeg"
    assert by_input["a/b\\c.jpeg"].name == "c.jpeg"
    assert by_input["con.jpeg"].name.lower() != "con.jpeg"
    assert by_input["x" * 1000 + ".jpeg"].name.endswith(".jpeg")


HOSTILE_PIECES = st.sampled_from(
    [
        *["..", ".", "/", "\\", "\x00", "\n", "con", "CON", "nul", ".jpeg", " ", "\u202e"],
        *["é", "😀", "e\u0301", "x" * 60, "a:b", "?", "*", "\x7f", "\u200b", "\ufeff", "-2"],
    ]
)
NAMES = st.one_of(
    st.text(),
    st.text(max_size=600),
    st.lists(HOSTILE_PIECES, max_size=40).map("".join),
    st.lists(st.one_of(HOSTILE_PIECES, st.text(max_size=5)), max_size=80).map("".join),
)


@given(NAMES)
def test_safe_file_name_makes_any_text_a_plain_file_name(name: str) -> None:
    result = safe_file_name(name, "fallback.jpeg")

    assert_safe_name(result)
    assert not result.endswith((".", " "))
    stem = result.split(".")[0].lower()
    assert stem not in {"con", "prn", "aux", "nul"}


@pytest.mark.parametrize(
    "name",
    [
        "con .jpeg", "nul .png", "aux. .jpg", "COM\u00b9.jpeg", "lpt\u00b3.png",
        "CONIN$.jpeg", "conout$", "LPT0.jpeg", "com0.tar.gz", "prn . .jpeg",
    ],
)  # fmt: skip
def test_no_name_windows_reserves_comes_out_under_any_spelling(name: str) -> None:
    # Windows reads a name up to its first dot, trailing spaces and dots dropped, and
    # reserves the devices under every case: each of these is one of them.
    result = safe_file_name(name, "fallback.jpeg")
    assert result.startswith("_"), result
    assert_safe_name(result)


@given(st.lists(st.one_of(st.sampled_from(["a.jpeg", "A.JPEG", "a-2.jpeg", "b", "B"]), NAMES)))
def test_unique_names_are_unique_ignoring_case(names: list[str]) -> None:
    safe = [safe_file_name(name, "image.jpeg") for name in names]

    result = unique_names(safe)

    assert len(result) == len(safe)
    assert len({name.lower() for name in result}) == len(result)
    for index, (before, after) in enumerate(zip(safe, result, strict=True)):
        taken = {name.lower() for name in result[:index]}
        if before.lower() not in taken:
            assert after == before  # a name is changed only when it must be
        else:
            assert after != before
        stem, dot, suffix = before.rpartition(".")
        if dot and stem:
            assert after.endswith(f".{suffix}")


# ------------------------------------------------------------------ expired URLs


async def test_expired_urls_are_refreshed_once(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    generation = await generate(dm, mock, 3)
    mock.advance_clock(7200)

    paths = await dm.images.download(generation, tmp_path)

    assert [p.name for p in paths] == [image.file_name for image in generation.images]
    assert [p.read_bytes() for p in paths] == [mock.image_bytes] * 3
    for image in generation.images:
        retrieved = [
            r
            for r in mock.requests
            if r.endpoint == "retrieve_image" and r.path == f"/api/images/{image.id}"
        ]
        assert [r.status for r in retrieved] == [200]
        attempts = [r for r in downloads(mock) if r.path == blob_path(image)]
        assert [r.status for r in attempts] == [403, 200]
        assert attempts[0].query == raw_query(image)
        assert attempts[1].query != raw_query(image)  # the refreshed signature


async def test_an_expired_remix_url_cannot_be_refreshed(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    result = await remix(dm, mock)
    mock.advance_clock(7200)

    with pytest.raises(DownloadError, match="expired") as caught:
        await dm.images.download(result, tmp_path)

    assert caught.value.image_id == result.id
    assert [r.status for r in downloads(mock)] == [403]
    assert [r for r in mock.requests if r.endpoint == "retrieve_image"] == []
    assert listing(tmp_path) == []


# ------------------------------------------------------------------ failures leave nothing


async def test_a_download_truncated_every_time_fails_and_leaves_nothing(
    tmp_path: pathlib.Path,
) -> None:
    async with (
        MockDeepMode(image_size=3 * 1024 * 1024) as mock,
        fast(AsyncClient(mock.api_key, base_url=mock.base_url, max_retries=2)) as dm,
    ):
        (image,) = (await generate(dm, mock, 1)).images
        mock.truncate(times=10)

        with pytest.raises(DownloadError) as caught:
            await dm.images.download(image, tmp_path)

        assert caught.value.image_id == image.id
        assert len(downloads(mock)) == 3  # the first attempt and two retries
        assert os.listdir(tmp_path) == []


async def test_a_download_truncated_once_is_retried_whole(tmp_path: pathlib.Path) -> None:
    async with (
        MockDeepMode(image_size=3 * 1024 * 1024) as mock,
        fast(AsyncClient(mock.api_key, base_url=mock.base_url, max_retries=2)) as dm,
    ):
        (image,) = (await generate(dm, mock, 1)).images
        mock.truncate(times=1)

        (path,) = await dm.images.download(image, tmp_path)

        assert path == tmp_path / image.file_name
        assert path.stat().st_size == 3 * 1024 * 1024
        assert path.read_bytes() == mock.image_bytes
        assert len(downloads(mock)) == 2
        assert listing(tmp_path) == [image.file_name]


async def test_a_remix_not_ready_yet_is_a_download_error(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    mock.set_latency("remix", 60)
    result = await remix(dm, mock, mode="async")
    assert result.status == "processing"

    with pytest.raises(DownloadError, match="404") as caught:
        await dm.images.download(result, tmp_path)

    assert caught.value.image_id == result.id
    assert [r.status for r in downloads(mock)] == [404]  # not retried
    assert listing(tmp_path) == []


async def test_a_stall_mid_body_times_out_and_leaves_nothing(
    mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    async with AsyncClient(mock.api_key, base_url=mock.base_url, max_retries=0) as dm:
        (image,) = (await generate(dm, mock, 1)).images
        mock.stall("download", seconds=5, after_bytes=100)
        started = time.monotonic()

        with pytest.raises(DownloadError) as caught:
            await dm.images.download(image, tmp_path, timeout=0.3)

        assert time.monotonic() - started < 2
        assert "timed out" in str(caught.value)
        assert caught.value.image_id == image.id
        assert os.listdir(tmp_path) == []
        await eventually(lambda: [r.disconnected for r in downloads(mock)] == [True])


async def test_the_first_failure_stops_the_queue_and_keeps_finished_files(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    done = await generate(dm, mock, 2)
    mock.set_latency("remix", 60)
    not_ready = await remix(dm, mock, mode="async")
    never = await generate(dm, mock, 3)

    with pytest.raises(DownloadError) as caught:
        await dm.images.download([done, not_ready, never], tmp_path, concurrency=1)

    assert caught.value.image_id == not_ready.id
    assert listing(tmp_path) == sorted(image.file_name for image in done.images)
    for image in done.images:
        assert (tmp_path / image.file_name).read_bytes() == mock.image_bytes
    # The images queued after the failure were never requested.
    assert [r.path for r in downloads(mock)] == [
        *(blob_path(image) for image in done.images),
        blob_path(not_ready),
    ]


async def test_the_first_failure_cancels_downloads_in_flight(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    slow = await generate(dm, mock, 3)
    mock.set_latency("remix", 60)
    not_ready = await remix(dm, mock, mode="async")
    # The image host answers 404 at once, but takes 5 s for an image it has.
    mock.set_latency("download", 5)
    started = time.monotonic()

    with pytest.raises(DownloadError) as caught:
        await dm.images.download([slow, not_ready], tmp_path)

    assert time.monotonic() - started < 2
    assert caught.value.image_id == not_ready.id
    assert listing(tmp_path) == []

    def slow_ones_hung_up() -> bool:
        records = [r for r in downloads(mock) if r.path != blob_path(not_ready)]
        return len(records) == 3 and all(r.disconnected for r in records)

    await eventually(slow_ones_hung_up)


async def test_cancelling_a_download_leaves_no_temp_files(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    generation = await generate(dm, mock, 4)
    mock.stall("download", seconds=5, after_bytes=100, times=4)
    dest = tmp_path / "out"

    def four_temp_files() -> bool:
        names = os.listdir(dest) if dest.is_dir() else []
        return len(names) == 4 and all(n.startswith(".") and n.endswith(".part") for n in names)

    async with anyio.create_task_group() as group:
        group.start_soon(functools.partial(dm.images.download, generation, dest))
        await eventually(four_temp_files)  # all four are mid-body
        group.cancel_scope.cancel()

    assert os.listdir(dest) == []
    await eventually(
        lambda: (
            [r.disconnected for r in downloads(mock)] == [True] * 4
            and all(r.status is None for r in downloads(mock))
        )
    )

    # The client is still fine.
    paths = await dm.images.download(generation, dest)
    assert [p.name for p in paths] == [image.file_name for image in generation.images]
    assert [p.read_bytes() for p in paths] == [mock.image_bytes] * 4
    assert listing(dest) == sorted(p.name for p in paths)


# ------------------------------------------------------------------ progress and dest


async def test_progress_reports_files_and_bytes(tmp_path: pathlib.Path) -> None:
    size = 2 * 1024 * 1024 + 17
    async with (
        MockDeepMode(image_size=size) as mock,
        fast(AsyncClient(mock.api_key, base_url=mock.base_url)) as dm,
    ):
        generation = await generate(dm, mock, 3)
        mock.truncate(times=1)  # a retried file starts its bytes over
        seen: list[DownloadProgress] = []

        await dm.images.download(generation, tmp_path, progress=seen.append, concurrency=2)

        assert len(downloads(mock)) == 4
    assert len(seen) > 3  # per chunk, not only per file
    assert all(isinstance(p, DownloadProgress) for p in seen)
    assert {p.files_total for p in seen} == {3}
    assert [p.files_done for p in seen] == sorted(p.files_done for p in seen)
    assert sorted({p.files_done for p in seen}) == [0, 1, 2, 3]
    assert seen[-1] == DownloadProgress(files_done=3, files_total=3, bytes_done=3 * size)
    assert all(0 <= p.bytes_done <= 3 * size for p in seen)


async def test_a_missing_dest_is_created(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    (image,) = (await generate(dm, mock, 1)).images
    dest = tmp_path / "a" / "b" / "c"

    paths = await dm.images.download(image, str(dest))

    assert dest.is_dir()
    assert paths == [dest / image.file_name]
    assert paths[0].read_bytes() == mock.image_bytes


async def test_a_dest_that_cannot_be_written_is_refused_before_any_request(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    generation = await generate(dm, mock, 1)
    a_file = tmp_path / "file"
    a_file.write_bytes(b"not a directory")
    bad = [a_file, a_file / "sub"]
    if os.geteuid() != 0:  # root may write into any directory: only files stop it
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        bad += [locked, locked / "sub"]

    for dest in bad:
        with pytest.raises(ValidationError, match="dest"):
            await dm.images.download(generation, dest)

    assert downloads(mock) == []
    assert a_file.read_bytes() == b"not a directory"


async def test_a_download_error_keeps_the_error_that_caused_it(
    mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    """`DownloadError.__cause__` is the API error behind it, with its status and detail."""
    async with AsyncClient(mock.api_key, base_url=mock.base_url, max_retries=0) as dm:
        expired = await remix(dm, mock)
        (image,) = (await generate(dm, mock, 1)).images
        mock.set_latency("remix", 60)
        not_ready = await remix(dm, mock, mode="async")

        with pytest.raises(DownloadError) as caught:
            await dm.images.download(not_ready, tmp_path)
        assert isinstance(caught.value.__cause__, NotFoundError), repr(caught.value.__cause__)

        mock.stall("download", seconds=5, after_bytes=100)
        with pytest.raises(DownloadError) as caught:
            await dm.images.download(image, tmp_path, timeout=0.3)
        assert isinstance(caught.value.__cause__, APITimeoutError), repr(caught.value.__cause__)

        mock.advance_clock(7200)
        with pytest.raises(DownloadError) as caught:
            await dm.images.download(expired, tmp_path)
        cause = caught.value.__cause__
        assert isinstance(cause, PermissionDeniedError), repr(cause)
        assert cause.status_code == 403


# ------------------------------------------------------------------ writing to disk


@pytest.mark.parametrize(("slow_write", "threaded"), [(10.0, False), (0.0, True)])
async def test_large_images_arrive_whole_from_the_loop_or_from_threads(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, slow_write: float, threaded: bool
) -> None:
    # Writes happen on the loop while they are fast (benchmarks/download.py); one slower
    # than _SLOW_WRITE (every write, at 0.0) sends the rest of that file to worker threads.
    monkeypatch.setattr(_downloads, "_SLOW_WRITE", slow_write)
    hops: list[str] = []
    run_sync = anyio.to_thread.run_sync

    async def counting(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        hops.append(getattr(func, "__name__", ""))
        return await run_sync(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    size = 3 * _downloads._CHUNK_SIZE + 12_345  # several chunks, the last one short
    async with (
        MockDeepMode(image_size=size) as mock,
        AsyncClient(mock.api_key, base_url=mock.base_url) as dm,
    ):
        generation = await generate(dm, mock, 3)
        paths = await dm.images.download(generation, tmp_path)
        image = mock.image_bytes

    assert [path.read_bytes() == image for path in paths] == [True] * 3
    assert listing(tmp_path) == sorted(path.name for path in paths)  # no .part left
    writes = hops.count("write")
    # Threaded: the chunks after each file's first (measured) write go to threads.
    assert writes >= 3 if threaded else writes == 0, hops
    assert hops.count("_move_into_place") == (3 if threaded else 0)
