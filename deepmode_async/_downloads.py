"""Downloads: parallel, bounded, atomic, with names that cannot escape their directory.

Each image streams into a hidden temporary file in the destination directory and is
renamed into place only when complete, so no partial file is ever visible under its
final name and nothing is left behind on an error or a cancellation. The signed URL is
sent byte for byte, to the image host only, without the API key; an expired one (403)
is refreshed once through `images.retrieve`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import re
import tempfile
import time
import unicodedata
import zlib
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Final, TypeAlias

import aiohttp
import anyio
import anyio.to_thread
import attrs
from yarl import URL

from . import _validate as check
from ._encoding import BodyDecoder
from ._errors import (
    APIError,
    DeepModeError,
    DownloadError,
    PermissionDeniedError,
    ValidationError,
    report_progress,
)
from ._failures import CutShort
from ._tasks import map_bounded
from ._timeout import Timeout
from ._transport import Transport
from ._types import Generation, Image, RemixResult

#: What `images.download` accepts: one of these or an iterable of them.
Downloadable: TypeAlias = Image | RemixResult | Generation

#: Bytes read and written per step: what asyncio receives at a time, so no joining.
_CHUNK_SIZE: Final = 256 * 1024
#: A write slower than this means a slow disk (NFS, USB): the rest of that file is
#: written from worker threads, so the event loop is not held up. Page-cache writes
#: of a chunk take about 0.1 ms, and a thread hop for each costs more than that
#: (benchmarks/download.py).
_SLOW_WRITE: Final = 0.002
#: Bytes of UTF-8 a file name may take: well under the 255 of common file systems, to
#: leave room for the `-2` of a duplicate and for the temporary file's affixes.
_MAX_NAME_BYTES: Final = 200
_UNSAFE_CHARACTERS: Final = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
_WINDOWS_RESERVED: Final = frozenset(
    {"con", "prn", "aux", "nul", "conin$", "conout$"}
    | {f"{port}{digit}" for port in ("com", "lpt") for digit in "0123456789\u00b9\u00b2\u00b3"}
)


@attrs.frozen
class DownloadProgress:
    """How far a download is: files finished of all files, and bytes received so far."""

    files_done: int
    files_total: int
    bytes_done: int


ProgressCallback: TypeAlias = Callable[[DownloadProgress], object]


def flatten(items: Downloadable | Iterable[Downloadable]) -> list[Image | RemixResult]:
    """The images to download, in order, from an image, a generation or an iterable."""
    found: list[Image | RemixResult] = []
    pending = [items] if isinstance(items, Image | RemixResult | Generation) else items
    try:
        iterator = iter(pending)
    except TypeError:
        raise ValidationError(
            "items must be an Image, a RemixResult, a Generation or an iterable of them, "
            f"not {type(items).__name__}"
        ) from None
    for item in iterator:
        if isinstance(item, Generation):
            found.extend(item.images)
        elif isinstance(item, Image | RemixResult):
            found.append(item)
        else:
            raise ValidationError(
                f"items must be Images, RemixResults or Generations, not {type(item).__name__}"
            )
    return found


def safe_file_name(name: str, fallback: str = "image.jpeg") -> str:
    """`name` as a plain file name: no directories, no `..`, no control characters,
    nothing Windows reserves, and at most 200 bytes of UTF-8 (the extension is kept)."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    if len(name) > 4 * _MAX_NAME_BYTES:  # cut a huge name before the work below; keep its end
        name = name[: 3 * _MAX_NAME_BYTES] + name[-32:]
    name = unicodedata.normalize("NFC", name)
    name = _UNSAFE_CHARACTERS.sub("_", name)
    name = "".join(ch if ch.isprintable() else "_" for ch in name)
    name = name.strip(" .")  # no hidden files, no "..", no trailing dot (Windows drops it)
    if not name:
        return fallback
    stem, dot, suffix = name.rpartition(".")
    if not dot or len(suffix) > 16:
        stem, suffix = name, ""
    stem = stem[:_MAX_NAME_BYTES]  # characters first, so that trimming bytes below is short
    suffix = f".{suffix}" if suffix else ""
    while len((stem + suffix).encode()) > _MAX_NAME_BYTES:
        stem = stem[:-1]
    stem = stem.rstrip(" .") or "image"  # before the check: Windows drops them too
    if stem.split(".")[0].rstrip(" ").lower() in _WINDOWS_RESERVED:
        stem = f"_{stem}"
    return stem + suffix


def file_names(images: Sequence[Image | RemixResult]) -> list[str]:
    """The names that downloading `images` together gives their files (before a `-2`
    for a name taken in the directory already)."""
    return unique_names(
        [safe_file_name(image.file_name, safe_file_name(f"{image.id}.jpeg")) for image in images]
    )


def unique_names(names: Sequence[str]) -> list[str]:
    """`names` with `-2`, `-3`... added where one repeats (ignoring case, as some disks do)."""
    seen: set[str] = set()
    result: list[str] = []
    for name in names:
        candidate, counter = name, 1
        while candidate.lower() in seen:
            counter += 1
            candidate = _numbered(name, counter)
        seen.add(candidate.lower())
        result.append(candidate)
    return result


def _numbered(name: str, counter: int) -> str:
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}-{counter}.{suffix}" if dot and stem else f"{name}-{counter}"


def check_destination(dest: str | os.PathLike[str]) -> pathlib.Path:
    """The destination directory, created if missing, or a `ValidationError`."""
    if not isinstance(dest, str | os.PathLike):
        raise ValidationError(f"dest must be a directory path, not {type(dest).__name__}")
    path = check.local_path("dest", dest)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValidationError(f"dest {str(path)!r} exists and is not a directory") from None
    except OSError as exc:
        raise ValidationError(f"dest {str(path)!r} cannot be created: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValidationError(f"dest {str(path)!r} is not writable")
    return path


#: Images downloaded at once by `images.download` (and by a batch, per generation).
DOWNLOAD_CONCURRENCY: Final = 16


class Downloader:
    """Downloads images through the transport; `refresh` re-signs an expired URL."""

    def __init__(self, transport: Transport, refresh: Callable[[str], Awaitable[Image]]) -> None:
        self._transport = transport
        self._refresh = refresh

    async def download(
        self,
        images: Sequence[Image | RemixResult],
        dest: pathlib.Path,
        *,
        concurrency: int,
        overwrite: bool,
        progress: ProgressCallback | None,
        timeout: Timeout,
    ) -> list[pathlib.Path]:
        """Download `images` into `dest`; the paths follow their order.

        The first failure cancels the downloads still running and is raised; files
        already complete stay.
        """
        names = file_names(images)
        tracker = _Tracker(len(images), progress)

        async def one(index: int) -> pathlib.Path:
            path = await self._one(images[index], dest / names[index], overwrite, tracker, timeout)
            tracker.file_done()
            return path

        return await map_bounded(one, range(len(images)), concurrency)

    async def _one(
        self,
        image: Image | RemixResult,
        target: pathlib.Path,
        overwrite: bool,
        tracker: _Tracker,
        timeout: Timeout,
    ) -> pathlib.Path:
        url = image.image_url
        refreshed = False
        while True:
            try:
                request = self._transport.plain_request(_signed_url(url, image))
                consume = _FileWriter(target, overwrite, tracker).consume
                return await self._transport.send(request, consume, timeout=timeout)
            except PermissionDeniedError as exc:
                if refreshed or not isinstance(image, Image):
                    raise _failed(image, "its URL has expired or was refused (403)") from exc
                url = await self._refreshed_url(image)
                refreshed = True
            except APIError as exc:
                raise _failed(image, str(exc)) from exc
            except OSError as exc:  # the local disk, not the network
                reason = exc.strerror or str(exc)  # not the temporary file's name
                raise _failed(image, f"cannot write {str(target)!r}: {reason}") from exc
            except DownloadError as exc:
                if exc.image_id is not None:
                    raise
                raise _failed(image, str(exc)) from exc

    async def _refreshed_url(self, image: Image) -> str:
        try:
            fresh = await self._refresh(image.id)
        except DeepModeError as exc:
            raise _failed(image, f"its URL expired and could not be refreshed: {exc}") from exc
        return fresh.image_url


def _signed_url(url: str, image: Image | RemixResult) -> URL:
    try:
        parsed = URL(url, encoded=True)  # byte for byte: re-encoding breaks the signature
        usable = parsed.scheme in ("http", "https") and bool(parsed.host) and parsed.port
    except (TypeError, ValueError):  # UnicodeError is a ValueError: a bad IDNA host
        usable = False
    if not usable:
        raise _failed(image, "its image_url is not an absolute http(s) URL")
    return parsed


def _failed(image: Image | RemixResult, reason: str) -> DownloadError:
    return DownloadError(f"Could not download image {image.id}: {reason}", image_id=image.id)


class _Tracker:
    """Counts files and bytes for the progress callback."""

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total = total
        self.files = 0
        self.bytes = 0
        self.callback = callback

    def add_bytes(self, count: int) -> None:
        self.bytes += count
        self._report()

    def file_done(self) -> None:
        self.files += 1
        self._report()

    def _report(self) -> None:
        if self.callback is not None:
            progress = DownloadProgress(self.files, self.total, self.bytes)
            report_progress(self.callback, progress, of="download")


def _decoded(decoder: BodyDecoder, chunk: bytes) -> Iterator[bytes]:
    try:
        yield from decoder.decode(chunk)
    except zlib.error as exc:  # not a transient fault: not retried
        raise DownloadError(f"its {decoder.encoding} encoding is broken: {exc}") from None


@functools.cache
def _file_mode() -> int:
    """The mode a new file gets here: 0666 less the process's umask."""
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


class _FileWriter:
    """Streams one answer into a temporary file and renames it into place when complete."""

    def __init__(self, target: pathlib.Path, overwrite: bool, tracker: _Tracker) -> None:
        self.target = target
        self.overwrite = overwrite
        self.tracker = tracker

    async def consume(self, response: aiohttp.ClientResponse) -> pathlib.Path:
        if response.status != 200:  # a 204 or a partial answer is not the image
            raise DownloadError(f"the image host answered {response.status}, not the image")
        decoder = BodyDecoder(response.headers.get("Content-Encoding", ""), _CHUNK_SIZE)
        if not decoder.supported:
            raise DownloadError(
                f"the image host sent it {decoder.encoding!r}-encoded, which is unsupported"
            )
        fd, temp_name = tempfile.mkstemp(
            dir=self.target.parent, prefix=f".{self.target.name[:40]}.", suffix=".part"
        )
        received = written = 0
        try:
            os.fchmod(fd, _file_mode())  # mkstemp's 0600 would outlive the rename
            on_loop = True
            with os.fdopen(fd, "wb") as file:
                async for chunk in response.content.iter_chunked(_CHUNK_SIZE):
                    received += len(chunk)
                    for data in _decoded(decoder, chunk):
                        if on_loop:
                            started = time.perf_counter()
                            file.write(data)
                            on_loop = time.perf_counter() - started < _SLOW_WRITE
                        else:
                            await anyio.to_thread.run_sync(file.write, data)
                        written += len(data)
                        self.tracker.add_bytes(len(data))
            if not decoder.complete:  # retried, as any answer cut short
                raise CutShort(f"its {decoder.encoding} stream ended early")
            expected = response.content_length
            if expected is not None and received != expected:
                raise CutShort(f"received {received} of {expected} bytes")
            if on_loop:
                return self._move_into_place(pathlib.Path(temp_name))
            return await anyio.to_thread.run_sync(self._move_into_place, pathlib.Path(temp_name))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp_name)
            if written:
                with contextlib.suppress(Exception):  # a failing progress callback, again
                    self.tracker.add_bytes(-written)  # a retry starts this file over
            raise

    def _move_into_place(self, temp: pathlib.Path) -> pathlib.Path:
        if self.overwrite:
            os.replace(temp, self.target)
            return self.target
        counter = 1
        candidate = self.target
        while True:
            try:
                os.link(temp, candidate)  # fails if the name is taken: never clobbers
            except FileExistsError:
                counter += 1
                candidate = self.target.with_name(_numbered(self.target.name, counter))
                continue
            except OSError:  # no hard links on this file system
                if candidate.exists():
                    counter += 1
                    candidate = self.target.with_name(_numbered(self.target.name, counter))
                    continue
                os.replace(temp, candidate)
                return candidate
            temp.unlink()
            return candidate
