"""Image inputs: checked by content before anything is sent, streamed when they are sent.

A path is inspected (size, first bytes) once, then opened only while its part of the
multipart body is written, in chunks, from a worker thread. So any number of large or
concurrent uploads keeps memory and open file descriptors flat, and a retry simply
writes the body again.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pathlib
import stat
import threading
from collections.abc import Callable, Sequence
from typing import IO, Any, Final, TypeAlias

import aiohttp
import anyio.to_thread
import attrs
from aiohttp.abc import AbstractStreamWriter

from . import _validate as check
from ._errors import DeepModeError, ValidationError, report_progress
from ._formats import ACCEPTED_FORMATS, SNIFF_BYTES, ImageFormat, sniff_image_format

#: Anything that can be uploaded as an image.
ImageInput: TypeAlias = (
    str
    | os.PathLike[str]
    | bytes
    | IO[bytes]
    | tuple[str, bytes | IO[bytes]]
    | tuple[str, bytes | IO[bytes], str]
)

#: Bytes read from disk per step: aiohttp's own choice for files.
CHUNK_SIZE: Final = 256 * 1024

_CONTENT_TYPES: Final[dict[ImageFormat, str]] = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "heic": "image/heic",
}
_EXTENSIONS: Final = frozenset({".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif"})


class UploadSourceChanged(DeepModeError):
    """A file changed (or vanished) between its check and its upload."""


@attrs.frozen
class UploadProgress:
    """How far an upload is: image bytes sent of all image bytes. A retry sends the body
    again, so `bytes_sent` starts over with each attempt."""

    bytes_sent: int
    bytes_total: int


UploadProgressCallback: TypeAlias = Callable[[UploadProgress], object]


class _SentCounter:
    """Counts the image bytes of one attempt for the progress callback."""

    def __init__(self, total: int, callback: UploadProgressCallback) -> None:
        self.sent = 0
        self.total = total
        self.callback = callback

    def add(self, count: int) -> None:
        self.sent += count
        report_progress(self.callback, UploadProgress(self.sent, self.total), of="upload")


@attrs.frozen
class UploadFile:
    """One checked image, ready to become a multipart part as often as needed."""

    field: str
    filename: str
    content_type: str
    size: int
    source: pathlib.Path | bytes | IO[bytes]
    start: int = 0  # where a file object's image begins
    #: A path's file as checked (device, inode, size, mtime): what it must still be.
    version: tuple[int, int, int, int] | None = None

    def payload(self, counter: _SentCounter | None = None) -> aiohttp.payload.Payload:
        """A fresh payload for one attempt to send this file (counted by `counter`)."""
        if isinstance(self.source, bytes) and counter is None:
            return aiohttp.payload.BytesPayload(self.source, content_type=self.content_type)
        return _StreamedFile(self, counter)


class _StreamedFile(aiohttp.payload.Payload):
    """A part that opens (or rewinds) its source only while being written, in chunks."""

    def __init__(self, upload: UploadFile, counter: _SentCounter | None) -> None:
        super().__init__(upload.source, content_type=upload.content_type)
        self._upload = upload
        self._size = upload.size
        self._counter = counter

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return f"<{self._upload.size} bytes of {self._upload.filename}>"

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        upload = self._upload
        remaining = upload.size if content_length is None else min(upload.size, content_length)
        if isinstance(upload.source, bytes):  # in memory already: only counted
            view = memoryview(upload.source)[:remaining]
            for start in range(0, remaining, CHUNK_SIZE):
                await self._write(writer, view[start : start + CHUNK_SIZE])
            return
        whole = remaining == upload.size
        opened = _OpenFiles()
        try:
            if isinstance(upload.source, pathlib.Path):
                file = await anyio.to_thread.run_sync(_open, upload.source, upload, opened)
                _check_unchanged(upload, file, "since it was checked")
            else:
                file = upload.source  # a file object: bytes returned above
                await anyio.to_thread.run_sync(file.seek, upload.start)
            while remaining > 0:
                chunk = await anyio.to_thread.run_sync(file.read, min(CHUNK_SIZE, remaining))
                if not chunk:
                    raise UploadSourceChanged(
                        f"{upload.filename!r} became shorter while it was uploaded "
                        f"({upload.size - remaining} of {upload.size} bytes sent)"
                    )
                await self._write(writer, chunk)
                remaining -= len(chunk)
            # A file still being written (a photo still syncing) would otherwise go out
            # cut at its checked size; raising before the closing boundary aborts the body.
            if whole and len(await anyio.to_thread.run_sync(file.read, 1)) > 0:
                raise UploadSourceChanged(
                    f"{upload.filename!r} grew while it was uploaded (it had {upload.size} "
                    "bytes when checked); upload it again once it is complete"
                )
            if isinstance(upload.source, pathlib.Path):  # rewritten in place, same size
                _check_unchanged(upload, file, "while it was uploaded")
        finally:
            opened.close()
            if not isinstance(upload.source, pathlib.Path):
                # The caller's file object stays open (it is theirs), where it was before.
                with contextlib.suppress(OSError, ValueError):
                    upload.source.seek(upload.start)

    async def _write(self, writer: AbstractStreamWriter, chunk: bytes | memoryview) -> None:
        await writer.write(chunk)
        if self._counter is not None:
            self._counter.add(len(chunk))


class _OpenFiles:
    """The file a worker thread opened for a part, closed with the part even when a
    cancellation abandoned the thread before it returned the file."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: list[IO[bytes]] = []
        self._closed = False

    def add(self, file: IO[bytes]) -> None:
        with self._lock:
            if not self._closed:
                self._files.append(file)
                return
        file.close()  # the part is already over: nobody will read this file

    def close(self) -> None:
        with self._lock:
            self._closed = True
            files, self._files = self._files, []
        for file in files:
            file.close()


def _version(file: IO[bytes]) -> tuple[int, int, int, int]:
    info = os.fstat(file.fileno())
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def _check_unchanged(upload: UploadFile, file: IO[bytes], when: str) -> None:
    """Raise (aborting the body, so nothing is charged) if the file is not the one checked."""
    if upload.version is not None and _version(file) != upload.version:
        raise UploadSourceChanged(
            f"{upload.filename!r} was changed or replaced {when}; upload it again once "
            "it is complete"
        )


def _open(path: pathlib.Path, upload: UploadFile, opened: _OpenFiles) -> IO[bytes]:
    try:
        file = open_regular_file(path)
    except NotARegularFile:
        raise UploadSourceChanged(
            f"{upload.filename!r} is no longer a regular file; it cannot be uploaded"
        ) from None
    except OSError as exc:
        raise UploadSourceChanged(
            f"{upload.filename!r} could not be opened for upload: {exc.strerror}"
        ) from exc
    opened.add(file)
    return file


class NotARegularFile(Exception):
    """A pipe, a socket or a device: no size, maybe no end."""


def why_unreadable(error: OSError | NotARegularFile) -> str:
    """Why `open_regular_file` failed, in words that follow the path's name."""
    if isinstance(error, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(error, NotARegularFile):
        return "is not a regular file"
    if isinstance(error, FileNotFoundError):
        return "does not exist"
    if isinstance(error, PermissionError):
        return "cannot be read: no permission"
    return f"cannot be read: {error.strerror or error}"


def open_regular_file(path: pathlib.Path) -> IO[bytes]:
    """`path` opened for reading if it is a regular file (`IsADirectoryError` or
    `NotARegularFile` if not), checked on the open file itself, not on its name.

    Opened without blocking: opening a FIFO would otherwise wait for a writer, forever.
    """
    nonblocking = getattr(os, "O_NONBLOCK", 0)  # POSIX only; elsewhere no FIFO to fear
    fd = os.open(path, os.O_RDONLY | nonblocking)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise NotARegularFile(path)
        if nonblocking:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class _Form(aiohttp.MultipartWriter):
    """A multipart body that keeps why it stopped (`failure`, as `Request` describes)."""

    failure: DeepModeError | None = None

    async def write(self, writer: AbstractStreamWriter, close_boundary: bool = True) -> None:
        try:
            await super().write(writer, close_boundary)
        except DeepModeError as exc:
            self.failure = exc
            raise


def multipart(
    fields: Sequence[tuple[str, str]],
    files: Sequence[UploadFile],
    progress: UploadProgressCallback | None = None,
) -> Callable[[], aiohttp.MultipartWriter]:
    """A body factory: a new multipart form (text fields, then files) for each attempt,
    reporting the image bytes written to `progress`."""
    total = sum(upload.size for upload in files)

    def build() -> aiohttp.MultipartWriter:
        counter = None if progress is None else _SentCounter(total, progress)
        writer = _Form("form-data")
        for name, value in fields:
            part = writer.append(value, {"Content-Type": "text/plain; charset=utf-8"})
            part.set_content_disposition("form-data", name=name)
        for upload in files:
            part = writer.append_payload(upload.payload(counter))
            part.set_content_disposition("form-data", name=upload.field, filename=upload.filename)
        return writer

    return build


async def check_files(field: str, inputs: Sequence[ImageInput]) -> list[UploadFile]:
    """Check every input and describe it for upload, or raise `ValidationError`.

    Paths and file objects are inspected in a worker thread (a few bytes each), so a
    slow disk does not stall the event loop.
    """
    labels = [f"{field}[{index}]" if len(inputs) > 1 else field for index in range(len(inputs))]
    if all(isinstance(item, bytes) for item in inputs):
        return [_inspect(label, field, item) for label, item in zip(labels, inputs, strict=True)]

    def inspect_all() -> list[UploadFile]:
        return [_inspect(label, field, item) for label, item in zip(labels, inputs, strict=True)]

    return await anyio.to_thread.run_sync(inspect_all)


def unpack(label: str, item: object) -> tuple[object, str | None, str | None]:
    """An input's source, file name and content type: a `(filename, data[,
    content_type])` tuple checked and opened up, anything else as it is."""
    if not isinstance(item, tuple):
        return item, None, None
    if len(item) not in (2, 3) or not isinstance(item[0], str):
        raise ValidationError(
            f"{label}: a tuple must be (filename, bytes or file object[, content_type])"
        )
    filename, source = check.text(f"{label} filename", item[0]), item[1]
    content_type = check.header_value(f"{label} content type", item[2]) if len(item) == 3 else None
    if isinstance(source, str | os.PathLike):
        raise ValidationError(f"{label}: give a path alone, not inside a tuple")
    return source, filename, content_type


def _inspect(label: str, field: str, item: ImageInput) -> UploadFile:
    source, filename, content_type = unpack(label, item)
    upload = _inspect_source(label, field, source, filename)
    return attrs.evolve(upload, content_type=content_type) if content_type else upload


def _inspect_source(label: str, field: str, source: object, filename: str | None) -> UploadFile:
    if isinstance(source, str | os.PathLike):
        path = check.local_path(label, source)
        head, version = _inspect_path(label, path)
        upload = _described(label, field, head, version[2], path, filename or path.name)
        return attrs.evolve(upload, version=version)
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        return _described(label, field, data[:SNIFF_BYTES], len(data), data, filename)
    if isinstance(source, io.IOBase) or hasattr(source, "read"):
        return _inspect_file_object(label, field, source, filename)
    raise ValidationError(
        f"{label} must be a path, bytes, a binary file object or a (filename, data) tuple, "
        f"not {type(source).__name__}"
    )


def _inspect_path(label: str, path: pathlib.Path) -> tuple[bytes, tuple[int, int, int, int]]:
    try:
        with open_regular_file(path) as file:
            head = file.read(SNIFF_BYTES)
            version = _version(file)
    except (OSError, NotARegularFile) as exc:
        raise ValidationError(f"{label}: {str(path)!r} {why_unreadable(exc)}") from None
    return head, version


def _inspect_file_object(label: str, field: str, file: Any, filename: str | None) -> UploadFile:
    name = getattr(file, "name", None)
    if filename is None and isinstance(name, str):
        filename = os.path.basename(name)
    if isinstance(file, io.TextIOBase):
        raise ValidationError(f"{label}: the file object must be opened in binary mode ('rb')")
    try:
        if getattr(file, "closed", False):
            raise ValidationError(f"{label}: the file object is closed")
        if not seekable(file):  # a pipe or a socket: it can be read once only, so keep it
            data = file.read()
            if not isinstance(data, bytes):
                raise ValidationError(
                    f"{label}: the file object must be opened in binary mode ('rb')"
                )
            return _described(label, field, data[:SNIFF_BYTES], len(data), data, filename)
        start = file.tell()
        head = file.read(SNIFF_BYTES)
        if not isinstance(head, bytes):
            raise ValidationError(f"{label}: the file object must be opened in binary mode ('rb')")
        size = file.seek(0, os.SEEK_END) - start
        file.seek(start)
    except UnicodeDecodeError:
        raise ValidationError(
            f"{label}: the file object must be opened in binary mode ('rb')"
        ) from None
    except (OSError, ValueError) as exc:
        raise ValidationError(f"{label}: cannot read the file object: {exc}") from None
    return attrs.evolve(_described(label, field, head, size, file, filename), start=start)


def seekable(file: Any) -> bool:
    try:
        return bool(file.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _described(
    label: str,
    field: str,
    head: bytes,
    size: int,
    source: pathlib.Path | bytes | IO[bytes],
    filename: str | None,
) -> UploadFile:
    image_format = sniff_image_format(head)
    if image_format is None:
        what = f" ({filename!r})" if filename else ""
        raise ValidationError(
            f"{label}{what} is not an image the API accepts: by its content it is not "
            f"{ACCEPTED_FORMATS}" + (" (it is empty)" if size == 0 else "")
        )
    base = field.rstrip("s")
    if not filename:
        filename = f"{base}.{image_format}"
    elif pathlib.PurePath(filename).suffix.lower() not in _EXTENSIONS:
        filename = f"{filename}.{image_format}"  # servers may go by the extension too
    return UploadFile(field, filename, _CONTENT_TYPES[image_format], size, source)
