"""`dm.models.create(progress=...)`: upload progress per attempt, and the bytes it sends.

The mock keeps only the size and the sniffed format of each file part. To check the bytes
themselves, some tests put a loopback TCP relay (`Tee`) between the client and the mock
that keeps everything the client sent, and take the multipart body apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import pathlib
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import attrs
import pytest
from yarl import URL

import deepmode_async
from deepmode_async import (
    APIConnectionError,
    APIStatusError,
    AsyncClient,
    Client,
    DeepModeError,
    UploadProgress,
    ValidationError,
)
from deepmode_async._uploads import CHUNK_SIZE, ImageInput, _SentCounter, _StreamedFile, check_files
from deepmode_async.testing import MockDeepMode, sample_image

pytestmark = pytest.mark.anyio

TRAINING: dict[str, Any] = {"gender": "woman", "model_type": "amateur"}


def image(size: int, seed: int) -> bytes:
    """A JPEG of exactly `size` bytes whose tail is random: a misplaced chunk shows."""
    head = sample_image("jpeg")
    return head + random.Random(seed).randbytes(size - len(head))


def steps(*sizes: int) -> list[int]:
    """The `bytes_sent` values expected for files of `sizes`, written chunk by chunk."""
    sent, values = 0, []
    for size in sizes:
        for start in range(0, size, CHUNK_SIZE):
            sent += min(CHUNK_SIZE, size - start)
            values.append(sent)
    return values


def attempts(calls: Sequence[UploadProgress]) -> list[list[int]]:
    """`bytes_sent` split into attempts: a new attempt starts where the count goes down."""
    runs: list[list[int]] = []
    for call in calls:
        if not runs or call.bytes_sent <= runs[-1][-1]:
            runs.append([])
        runs[-1].append(call.bytes_sent)
    return runs


# ---------------------------------------------------------------- a relay that keeps bytes


class Tee:
    """A TCP relay on 127.0.0.1 in front of `mock`; `sent` holds, per connection, every
    byte the client wrote."""

    def __init__(self, mock: MockDeepMode) -> None:
        port = URL(mock.base_url).port
        assert port is not None
        self._target = port
        self.sent: list[bytearray] = []
        self.base_url = ""
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Tee:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._relay(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers.append(up_writer)
        kept = bytearray()
        self.sent.append(kept)

        async def pump(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, keep: bytearray | None
        ) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    if keep is not None:
                        keep += data
                    sink.write(data)
                    await sink.drain()
            writer.close()  # either side ending ends the relay
            up_writer.close()

        await asyncio.gather(pump(reader, up_writer, kept), pump(up_reader, writer, None))

    def requests(self) -> list[tuple[dict[str, str], bytes]]:
        """Every request the client sent (head, body), in the order of connections."""
        found = []
        for stream in self.sent:
            rest = bytes(stream)
            while rest:
                head, separator, rest = rest.partition(b"\r\n\r\n")
                assert separator, "an incomplete request head"
                lines = head.decode("latin-1").split("\r\n")
                headers = {"": lines[0]}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                assert "content-length" in headers, f"no Content-Length: {headers}"
                length = int(headers["content-length"])
                found.append((headers, rest[:length]))
                rest = rest[length:]
        return found


def file_parts(headers: dict[str, str], body: bytes) -> list[tuple[str, bytes]]:
    """The (Content-Disposition, content) of each part of a multipart body with a file."""
    kind, _, params = headers["content-type"].partition(";")
    assert kind.strip() == "multipart/form-data"
    boundary = params.strip().removeprefix("boundary=").strip('"').encode()
    pieces = body.split(b"--" + boundary)
    assert pieces[0] == b""
    assert pieces[-1] == b"--\r\n"
    parts = []
    for piece in pieces[1:-1]:
        assert piece.startswith(b"\r\n")
        assert piece.endswith(b"\r\n")
        head, _, content = piece[2:-2].partition(b"\r\n\r\n")
        disposition = next(
            line.partition(b":")[2].strip().decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-disposition:")
        )
        if "filename=" in disposition:
            parts.append((disposition, content))
    return parts


@pytest.fixture
async def tee(mock: MockDeepMode) -> AsyncIterator[Tee]:
    async with Tee(mock) as relay:
        yield relay


@pytest.fixture
async def teed(mock: MockDeepMode, tee: Tee) -> AsyncIterator[AsyncClient]:
    """A client whose bytes go through `tee` to `mock`."""
    async with AsyncClient(mock.api_key, base_url=tee.base_url, max_retries=0) as client:
        yield client


def sent_files(tee: Tee) -> list[bytes]:
    """The file contents of the last request the client sent."""
    headers, body = tee.requests()[-1]
    assert headers[""] == "POST /api/models HTTP/1.1"
    return [content for _, content in file_parts(headers, body)]


# ---------------------------------------------------------------- paths


async def test_paths_report_every_chunk_up_to_the_total_and_arrive_intact(
    teed: AsyncClient, tee: Tee, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    sizes = [600_000, 1_000, CHUNK_SIZE, 300_000]  # several chunks, one, exactly one, two
    contents = [image(size, seed) for seed, size in enumerate(sizes)]
    paths = []
    for index, content in enumerate(contents):
        path = tmp_path / f"photo{index}.jpg"
        path.write_bytes(content)
        paths.append(path)
    calls: list[UploadProgress] = []

    created = await teed.models.create(images=paths, progress=calls.append, **TRAINING)

    assert created.message == "Created model successfully"
    assert all(type(call) is UploadProgress for call in calls)
    assert {call.bytes_total for call in calls} == {sum(sizes)} == {1_163_144}
    sent = [call.bytes_sent for call in calls]
    assert sent == steps(*sizes)  # 3 + 1 + 1 + 2 updates, each a chunk further
    assert len(sent) == 7
    assert all(a < b for a, b in itertools.pairwise(sent))
    assert sent[-1] == sum(sizes)
    (record,) = mock.requests
    assert record.status == 200
    assert [(f.filename, f.size, f.format) for f in record.files] == [
        (f"photo{index}.jpg", size, "jpeg") for index, size in enumerate(sizes)
    ]
    assert sent_files(tee) == contents  # byte for byte, in order


# ---------------------------------------------------------------- in-memory inputs


async def test_bytes_file_objects_and_tuples_mixed_report_in_chunks_and_arrive_intact(
    teed: AsyncClient, tee: Tee, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    big = image(700_000, 1)  # bytes over the chunk size: three updates
    small = image(5_000, 2)
    in_memory = image(300_000, 3)
    on_disk = image(270_000, 4)
    named = image(2_000, 5)
    (tmp_path / "disk.jpg").write_bytes(on_disk)
    buffer = io.BytesIO(b"skip me" + in_memory)
    buffer.read(7)  # a file object uploads from where it stands
    inputs: list[ImageInput] = [big, buffer, ("named.jpg", named), small]
    calls: list[UploadProgress] = []
    with (tmp_path / "disk.jpg").open("rb") as disk_file:
        inputs.append(("from-disk.jpg", disk_file))

        await teed.models.create(images=inputs, progress=calls.append, **TRAINING)

        assert disk_file.tell() == 0  # the caller's file is left where it was
    assert buffer.tell() == 7
    contents = [big, in_memory, named, small, on_disk]
    sizes = [len(content) for content in contents]
    assert {call.bytes_total for call in calls} == {sum(sizes)}
    sent = [call.bytes_sent for call in calls]
    assert sent == steps(*sizes)
    assert sent[:3] == [CHUNK_SIZE, 2 * CHUNK_SIZE, 700_000]  # the big bytes, in steps
    assert all(a < b for a, b in itertools.pairwise(sent))
    assert sent[-1] == sum(sizes)
    assert [(f.size, f.format) for f in mock.requests[-1].files] == [(s, "jpeg") for s in sizes]
    assert [f.filename for f in mock.requests[-1].files][2::2] == ["named.jpg", "from-disk.jpg"]
    assert sent_files(tee) == contents


async def test_uploads_without_progress_send_the_same_bytes(
    teed: AsyncClient, tee: Tee, mock: MockDeepMode
) -> None:
    big, small = image(600_000, 7), image(3_000, 8)
    inputs: list[ImageInput] = [big, io.BytesIO(small), ("t.jpg", small)]

    await teed.models.create(images=inputs, **TRAINING)
    without = sent_files(tee)
    calls: list[UploadProgress] = []
    await teed.models.create(images=inputs, progress=calls.append, **TRAINING)  # same inputs
    with_progress = sent_files(tee)

    assert without == with_progress == [big, small, small]
    assert [r.status for r in mock.requests] == [200, 200]
    assert calls[-1] == UploadProgress(603_000 + 3_000, 606_000)
    # Without a counter, bytes go out as aiohttp's own BytesPayload; with one, streamed.
    (upload,) = await check_files("images", [big])
    assert type(upload.payload()) is aiohttp.payload.BytesPayload
    counted = upload.payload(_SentCounter(upload.size, calls.append))
    assert isinstance(counted, _StreamedFile)


# ---------------------------------------------------------------- retries


@pytest.mark.parametrize("status", [429, 503])
async def test_a_retried_upload_counts_again_from_the_start(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path, status: int
) -> None:
    # Small bytes first: their only chunk is written (and counted) before the refusal
    # can arrive, so the refused attempt reports something. A path first would not:
    # the refusal can come back while its first chunk is read from disk.
    first_image = image(10_000, 9)
    path = tmp_path / "big.jpg"
    path.write_bytes(image(800_000, 10))
    total = 810_000
    mock.fail("create_model", status, retry_after=0)  # retried even for a paid POST
    calls: list[UploadProgress] = []

    await dm.models.create(images=[first_image, path], progress=calls.append, **TRAINING)

    assert [r.status for r in mock.requests] == [status, 200]
    assert len(mock.ledger) == 1
    assert {call.bytes_total for call in calls} == {total}
    first, second = attempts(calls)  # exactly two attempts: the count went down once
    expected = steps(10_000, 800_000)
    assert 1 <= len(first) <= len(expected)
    assert first == expected[: len(first)]  # however far the refused attempt got
    assert second == expected  # from the first chunk again, all the way
    assert second[0] == 10_000
    assert calls[-1] == UploadProgress(total, total)
    assert [f.size for f in mock.requests[-1].files] == [10_000, 800_000]


async def test_a_call_that_is_not_retried_reports_one_attempt(
    dm: AsyncClient, mock: MockDeepMode
) -> None:
    mock.fail("create_model", 500)  # a paid call is not repeated after a 500
    calls: list[UploadProgress] = []
    with pytest.raises(APIStatusError) as caught:
        await dm.models.create(images=[image(300_000, 11)], progress=calls.append, **TRAINING)
    assert caught.value.status_code == 500
    assert [r.status for r in mock.requests] == [500]
    assert len(attempts(calls)) <= 1
    assert [call.bytes_sent for call in calls] == steps(300_000)[: len(calls)]


# ---------------------------------------------------------------- no upload, bad callbacks


async def test_image_urls_never_call_progress(dm: AsyncClient, mock: MockDeepMode) -> None:
    calls: list[UploadProgress] = []
    await dm.models.create(
        image_urls=["http://example.com/a.jpg", "http://example.com/b.png"],
        progress=calls.append,
        **TRAINING,
    )
    assert calls == []
    (record,) = mock.requests
    assert record.status == 200
    assert record.json["image_urls"] == ["http://example.com/a.jpg", "http://example.com/b.png"]
    assert record.files == []


@pytest.mark.parametrize("progress", [5, "print", [print]])
async def test_a_progress_that_is_not_callable_is_rejected_before_sending(
    dm: AsyncClient, mock: MockDeepMode, progress: Any
) -> None:
    with pytest.raises(ValidationError, match="progress must be a callable"):
        await dm.models.create(
            images=[sample_image()],
            progress=progress,
            **TRAINING,
        )
    assert mock.requests == []
    assert mock.ledger == []


class Boom(Exception):
    pass


@pytest.mark.parametrize("fail_at", ["first", "last"])
async def test_a_progress_callback_that_raises_fails_the_call_typed_and_uncharged(
    dm: AsyncClient, mock: MockDeepMode, fail_at: str
) -> None:
    total = 600_000
    raised: list[Boom] = []
    calls: list[UploadProgress] = []

    def progress(update: UploadProgress) -> None:
        calls.append(update)
        if fail_at == "first" or update.bytes_sent == total:
            raised.append(Boom(f"at {update.bytes_sent}"))
            raise raised[-1]

    with pytest.raises(DeepModeError) as caught:
        await dm.models.create(images=[image(total, 12)], progress=progress, **TRAINING)

    # The SDK's own error, not a network failure (which callers might retry); the
    # user's exception is its cause, and aiohttp's wrapper is not shown.
    assert not isinstance(caught.value, APIConnectionError)
    assert caught.value.__cause__ is raised[0]
    assert caught.value.__suppress_context__
    assert str(caught.value) == (
        f"the upload stopped: its progress callback raised Boom: {raised[0]}"
    )
    assert len(raised) == 1  # never retried: the callback is not called again
    expected = steps(total)
    assert [call.bytes_sent for call in calls] == (expected[:1] if fail_at == "first" else expected)
    # The body was cut short (even after its last image byte): nothing was charged.
    assert mock.ledger == []
    assert all(r.status != 200 for r in mock.requests)
    assert mock.models == {}
    # The client still works afterwards.
    await dm.models.create(images=[sample_image()], **TRAINING)
    assert len(mock.ledger) == 1


# ---------------------------------------------------------------- the blocking client, exports


def test_the_blocking_client_reports_progress(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "photo.jpg"
    content = image(500_000, 13)
    path.write_bytes(content)
    calls: list[UploadProgress] = []
    with MockDeepMode() as mock, Client(mock.api_key, base_url=mock.base_url) as dm:
        created = dm.models.create(
            images=[path, ("b.jpg", image(1_000, 14))], progress=calls.append, **TRAINING
        )
        files = mock.requests[-1].files
    assert created.message == "Created model successfully"
    assert all(type(call) is UploadProgress for call in calls)
    assert [call.bytes_sent for call in calls] == steps(500_000, 1_000)
    assert calls[-1] == UploadProgress(501_000, 501_000)
    assert [(f.filename, f.size) for f in files] == [("photo.jpg", 500_000), ("b.jpg", 1_000)]


def test_upload_progress_is_exported_and_frozen() -> None:
    assert "UploadProgress" in deepmode_async.__all__
    progress = UploadProgress(bytes_sent=3, bytes_total=10)
    assert (progress.bytes_sent, progress.bytes_total) == (3, 10)
    assert progress == UploadProgress(3, 10)
    assert hash(progress) == hash(UploadProgress(3, 10))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        progress.bytes_sent = 4  # type: ignore[misc]
    assert progress.bytes_sent == 3
