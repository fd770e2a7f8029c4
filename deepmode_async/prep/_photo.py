"""One photo made ready for training: read, checked, upright, square, re-encoded.

The Pillow work of `deepmode_async.prep`, which holds the public names and the set.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import threading
from collections.abc import Callable
from typing import IO, Any, Final, Literal, TypeAlias

import attrs

from .. import _validate as check
from .._errors import ValidationError
from .._formats import ACCEPTED_FORMATS, SNIFF_BYTES, ImageFormat, sniff_image_format
from .._uploads import (
    NotARegularFile,
    open_regular_file,
    seekable,
    unpack,
    why_unreadable,
)

try:
    from PIL import Image
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "deepmode_async.prep needs Pillow, which the 'images' extra installs: "
        "pip install 'deepmode-async[images]'"
    ) from exc

PadOrCrop: TypeAlias = Literal["pad", "crop"]
OutputFormat: TypeAlias = Literal["jpeg", "jpg", "png", "webp"]
Colour: TypeAlias = str | tuple[int, int, int]

_PILLOW_FORMATS: Final[dict[ImageFormat, str]] = {
    "jpeg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "heic": "HEIF",
}
SAVE: Final[dict[str, tuple[str, str, str]]] = {  # Pillow name, extension, type
    "jpeg": ("JPEG", ".jpg", "image/jpeg"),
    "png": ("PNG", ".png", "image/png"),
    "webp": ("WEBP", ".webp", "image/webp"),
}
_INSTALL: Final = "pip install 'deepmode-async[images]'"
_HASH_CHUNK: Final = 1024 * 1024

# EXIF orientation -> the transpose that makes the stored pixels upright (as ImageOps).
_UPRIGHT: Final[dict[int, Image.Transpose]] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION_TAG: Final = 0x0112


class PhotoError(ValidationError):
    """A photo cannot be prepared. `.source` names it, `.reason` says what is wrong and
    what to do, in one line; the message is `"{source}: {reason}"`."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


@attrs.frozen
class Options:
    """`prepare_photo`'s arguments, checked."""

    size: int
    mode: PadOrCrop
    background: tuple[int, int, int]
    format: OutputFormat
    quality: int
    min_side: int
    keep_icc: bool


# -- inputs ---------------------------------------------------------------------------


@attrs.frozen
class Input:
    """One input as given, with its names; read only inside a worker thread."""

    source: str  # how reports name it
    stem: str  # the upload name without its extension
    data: pathlib.Path | bytes | IO[bytes]


def photo_input(item: Any, label: str, stem: str) -> Input:
    """Name an input the way uploads do: a path as given, a tuple's or a file object's
    file name, else `label`; its upload name is that name's stem, else `stem`. Types are
    checked here, nothing is read."""
    # A content type is checked as uploads check it, then dropped: the prepared photo
    # has its own.
    item, filename, _ = unpack(label, item)
    if isinstance(item, str | os.PathLike):
        path = check.local_path(label, item)
        return Input(str(path), path.stem or stem, path)
    if isinstance(item, bytes | bytearray | memoryview):
        data: bytes | IO[bytes] = bytes(item)
    elif hasattr(item, "read"):
        if isinstance(item, io.TextIOBase):
            raise ValidationError(f"{label}: the file object must be opened in binary mode")
        data = item
        name = getattr(item, "name", None)
        if filename is None and isinstance(name, str) and name:
            filename = os.path.basename(name)
    else:
        raise ValidationError(
            f"{label} must be a path, bytes, a binary file object or a (filename, data) "
            f"tuple, not {type(item).__name__}"
        )
    if filename:
        return Input(filename, pathlib.PurePath(filename).stem or stem, data)
    return Input(label, stem, data)


def _read_file_object(source: str, file: IO[bytes]) -> bytes:
    """All of a file object from where it is, which is where it is left."""
    try:
        start = file.tell() if seekable(file) else None
        data = file.read()
        if start is not None:
            file.seek(start)
    except Exception as exc:  # whatever a file-like object raises (a zip member: BadZipFile)
        raise PhotoError(source, f"cannot read the file object: {exc}") from None
    if not isinstance(data, bytes):
        raise PhotoError(source, "the file object must be opened in binary mode ('rb')")
    return data


def _hash_path(source: str, path: pathlib.Path) -> tuple[bytes, str]:
    """The first bytes and the SHA-256 of a file, read in chunks (never whole)."""
    digest = hashlib.sha256()
    try:
        with open_regular_file(path) as file:
            head = file.read(SNIFF_BYTES)
            digest.update(head)
            while chunk := file.read(_HASH_CHUNK):
                digest.update(chunk)
    except (OSError, NotARegularFile) as exc:
        raise PhotoError(source, why_unreadable(exc)) from None
    return head, digest.hexdigest()


# -- one photo ------------------------------------------------------------------------


@attrs.frozen
class Done:
    """A prepared photo with the hashes of its input and of its result."""

    data: bytes
    original_size: tuple[int, int]
    input_hash: str
    output_hash: str


_heif_lock = threading.Lock()
_heif_registered = False


def _open_heif() -> None:
    """Make Pillow read HEIC, on first need (importing pillow-heif takes ~0.2 s)."""
    global _heif_registered
    import pillow_heif  # only HEIC inputs pay for it; ImportError when not installed

    with _heif_lock:
        if not _heif_registered:
            pillow_heif.register_heif_opener()
            _heif_registered = True


def prepare_one(
    item: Input,
    options: Options,
    claim: Callable[[str], str | None] | None = None,
) -> Done:
    """Read, check and prepare one photo; raise `PhotoError` saying what is wrong.

    `claim(input_hash)` is asked as soon as the input is read: a reason back means this
    input has the same content as an earlier one, and it goes no further.
    """
    source = item.source
    if isinstance(item.data, pathlib.Path):
        head, input_hash = _hash_path(source, item.data)
        opened: pathlib.Path | IO[bytes] = item.data  # Pillow reads it as it decodes
    else:
        data = item.data if isinstance(item.data, bytes) else _read_file_object(source, item.data)
        head, input_hash = data[:SNIFF_BYTES], hashlib.sha256(data).hexdigest()
        opened = io.BytesIO(data)
    if claim is not None and (duplicate := claim(input_hash)) is not None:
        raise PhotoError(source, duplicate)
    kind = sniff_image_format(head)
    if kind is None:
        empty = " (it is empty)" if not head else ""
        raise PhotoError(
            source,
            f"not an image DeepMode takes: by its content it is not {ACCEPTED_FORMATS}"
            f"{empty}; export it as JPEG or PNG",
        )
    if kind == "heic":
        try:
            _open_heif()
        except ImportError:
            raise PhotoError(
                source,
                f"a HEIC photo, which needs the pillow-heif package to be read: {_INSTALL} "
                "(or export it as JPEG)",
            ) from None
    data_out, original_size = _convert(source, opened, kind, options)
    return Done(data_out, original_size, input_hash, hashlib.sha256(data_out).hexdigest())


def _convert(
    source: str, opened: pathlib.Path | IO[bytes], kind: ImageFormat, options: Options
) -> tuple[bytes, tuple[int, int]]:
    """Decode, check, orient, square, resize and encode one photo."""
    pillow_format = _PILLOW_FORMATS[kind]
    try:
        with Image.open(opened, formats=[pillow_format]) as image:
            width, height = image.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and width * height > limit:  # Pillow only warns up to 2x
                raise PhotoError(source, _too_many_pixels())
            if min(width, height) < options.min_side:
                raise PhotoError(
                    source,
                    f"{width} x {height} is below the minimum side of {options.min_side} px; "
                    "use a larger photo",
                )
            return _render(image, options)
    except PhotoError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PhotoError(source, _too_many_pixels()) from None
    except Exception as exc:  # Pillow and its plugins raise many kinds on bad data
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise PhotoError(
            source,
            f"cannot be read as {kind.upper()}: the file is damaged or cut short ({detail}); "
            "copy or export it again",
        ) from None


def _too_many_pixels() -> str:
    return (
        f"more pixels than Pillow's safety limit of {Image.MAX_IMAGE_PIXELS:,} "
        "(a possible decompression bomb); save it at a smaller size"
    )


def _render(image: Image.Image, options: Options) -> tuple[bytes, tuple[int, int]]:
    size = options.size
    width, height = image.size
    # Decode big JPEGs at a reduced scale (1/2 .. 1/8) still at least as big as needed.
    scale = size / (max(width, height) if options.mode == "pad" else min(width, height))
    if scale < 1:
        image.draft(None, (max(1, int(width * scale) + 1), max(1, int(height * scale) + 1)))
    image.load()
    icc = image.info.get("icc_profile") if options.keep_icc else None
    turn = _UPRIGHT.get(_orientation(image))
    original = (height, width) if turn is not None and turn in _SWAPS else (width, height)

    image = _flat(image)
    width, height = image.size
    if options.mode == "pad":
        scale = size / max(width, height)
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        box = (0.0, 0.0, float(width), float(height))
    else:
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        target, box = (size, size), (left, top, left + side, top + side)
    resized = image.resize(target, Image.Resampling.LANCZOS, box=box, reducing_gap=2.0)
    if turn is not None:
        resized = resized.transpose(turn)

    # A new image holds only pixels: nothing of the source's `info` (EXIF, XMP, ...).
    canvas = Image.new("RGB", (size, size), options.background)
    offset = ((size - resized.width) // 2, (size - resized.height) // 2)
    if resized.mode == "RGBA":
        canvas.paste(resized.convert("RGB"), offset, resized.getchannel("A"))
    else:
        canvas.paste(resized, offset)

    pillow_name, _, _ = SAVE[options.format]
    params: dict[str, Any] = {}
    if options.format != "png":
        params["quality"] = options.quality
    if isinstance(icc, bytes) and icc[16:20] == b"RGB ":  # an RGB profile fits RGB pixels
        params["icc_profile"] = icc
    out = io.BytesIO()
    canvas.save(out, pillow_name, **params)
    return out.getvalue(), original


_SWAPS: Final = frozenset(
    {
        Image.Transpose.TRANSPOSE,
        Image.Transpose.ROTATE_270,
        Image.Transpose.TRANSVERSE,
        Image.Transpose.ROTATE_90,
    }
)


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # unreadable EXIF: treat the photo as upright
        return 1
    return value if isinstance(value, int) else 1


def _flat(image: Image.Image) -> Image.Image:
    """The pixels as RGB, or RGBA when the photo has transparency."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit grey: scale down
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    wanted = "RGBA" if has_alpha else "RGB"
    return image if image.mode == wanted else image.convert(wanted)
