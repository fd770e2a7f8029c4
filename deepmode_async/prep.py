"""Photo preparation for training: upright, square, the right size, and without metadata.

DeepMode trains a model from 1 to 30 photos of one subject. Training works best on
square photos (the API's trainer crops anything else to a square, which may cut the
subject off), so this module turns phone photos into what it wants:

```python
from deepmode_async.prep import prepare_training_set

photos = await prepare_training_set(paths)          # 640 x 640 JPEGs, white padding
for skipped in photos.skipped:
    print(f"{skipped.source}: {skipped.reason}")
await dm.models.create(images=photos.images, gender="woman", model_type="amateur")
```

**Prepared photos carry no metadata.** The photos leave your machine, so every prepared
photo is a new image holding only pixels: no EXIF (no GPS location, no camera, no
date), no XMP, no comments, no thumbnails, and no ICC colour profile unless you ask
for it with `keep_icc=True`.

Each photo is turned upright by its EXIF orientation, then made square: `mode="pad"`
(the default) keeps the whole photo visible and fills the rest with `background`;
`mode="crop"` keeps the centred square. It is resized to `size` x `size` (640 by
default) and written as an RGB JPEG (or PNG / WebP with `format=`). Transparency is
composited onto `background`, in every format: the result is always opaque RGB.

Inputs are what `dm.models.create(images=...)` takes: paths, bytes, binary file objects,
`(filename, data)` tuples, in JPEG, PNG, WebP or HEIC (HEIC through `pillow-heif`, part
of the `images` extra). This module needs Pillow: `pip install 'deepmode-async[images]'`;
the rest of the SDK never imports it.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any, Final, Literal, TypeAlias

import anyio
import anyio.to_thread
import attrs

from . import _validate as check
from ._errors import ValidationError
from ._formats import ACCEPTED_FORMATS, SNIFF_BYTES, ImageFormat, sniff_image_format
from ._uploads import (
    ImageInput,
    NotARegularFile,
    _seekable,
    open_regular_file,
    unpack,
    why_unreadable,
)
from ._validate import MAX_TRAINING_IMAGES

try:
    from PIL import Image, ImageColor
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "deepmode_async.prep needs Pillow, which the 'images' extra installs: "
        "pip install 'deepmode-async[images]'"
    ) from exc

__all__ = [
    "DEFAULT_MIN_SIDE",
    "DEFAULT_SIZE",
    "MAX_SIZE",
    "Colour",
    "OutputFormat",
    "PadOrCrop",
    "PhotoError",
    "PreparedPhoto",
    "SkippedPhoto",
    "TrainingSet",
    "TrainingSetError",
    "prepare_photo",
    "prepare_training_set",
]

#: The side of the square the training API asks for.
DEFAULT_SIZE: Final = 640

#: Photos whose shorter side (in pixels) is below this are refused: blown up more than
#: 2.5 times to 640 px, they teach the model blur. Pass `min_side=` to change it.
DEFAULT_MIN_SIDE: Final = 256

#: The largest `size` accepted (a 4096 x 4096 canvas is already 48 MB of pixels).
MAX_SIZE: Final = 4096

PadOrCrop: TypeAlias = Literal["pad", "crop"]
OutputFormat: TypeAlias = Literal["jpeg", "jpg", "png", "webp"]
Colour: TypeAlias = str | tuple[int, int, int]

_PILLOW_FORMATS: Final[dict[ImageFormat, str]] = {
    "jpeg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "heic": "HEIF",
}
_SAVE: Final[dict[str, tuple[str, str, str]]] = {  # Pillow name, extension, type
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
class PreparedPhoto:
    """One prepared photo: `data` is the image file, `name` its upload file name (the
    source's stem with the new extension, unique within a training set), `source` how
    reports name the input, `original_size` its (width, height) as seen upright."""

    name: str
    data: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")
    source: str
    original_size: tuple[int, int]
    content_type: str = "image/jpeg"

    @property
    def upload(self) -> tuple[str, bytes, str]:
        """`(name, data, content_type)`, as `dm.models.create(images=[...])` takes it."""
        return (self.name, self.data, self.content_type)


@attrs.frozen
class SkippedPhoto:
    """An input left out of a training set, and why (one readable line)."""

    source: str
    reason: str


@attrs.frozen
class TrainingSet:
    """The usable photos, in input order, and the inputs skipped, each with its reason."""

    photos: list[PreparedPhoto]
    skipped: list[SkippedPhoto]

    @property
    def images(self) -> list[tuple[str, bytes, str]]:
        """The photos as `dm.models.create(images=...)` takes them."""
        return [photo.upload for photo in self.photos]


class TrainingSetError(ValidationError):
    """The inputs do not make a training set DeepMode takes (none usable, or more than
    30). `.training_set` holds what preparing them gave, skip reasons included."""

    def __init__(self, message: str, training_set: TrainingSet) -> None:
        super().__init__(message)
        self.training_set = training_set


@attrs.frozen
class _Options:
    size: int
    mode: PadOrCrop
    background: tuple[int, int, int]
    format: OutputFormat
    quality: int
    min_side: int
    keep_icc: bool


def _options(
    size: Any,
    mode: Any,
    background: Any,
    format: Any,
    quality: Any,
    min_side: Any,
    keep_icc: Any,
) -> _Options:
    """Every argument checked, before any photo is touched."""
    check.integer("size", size, 1, MAX_SIZE)
    if mode not in ("pad", "crop"):
        raise ValidationError(f"mode must be 'pad' or 'crop', not {check.shown(mode)}")
    if format == "jpg":
        format = "jpeg"
    if format not in _SAVE:
        raise ValidationError(f"format must be 'jpeg', 'png' or 'webp', not {check.shown(format)}")
    check.integer("quality", quality, 1, 95)
    check.positive("min_side", min_side)
    check.boolean("keep_icc", keep_icc)
    return _Options(size, mode, _colour(background), format, quality, min_side, keep_icc)


def _colour(value: Any) -> tuple[int, int, int]:
    if isinstance(value, str):
        try:
            rgb = ImageColor.getrgb(value)
        except ValueError:
            raise ValidationError(
                f"background must be a colour name or '#rrggbb', not {check.shown(value)}"
            ) from None
        return (rgb[0], rgb[1], rgb[2])
    if (
        isinstance(value, tuple)
        and len(value) == 3
        and all(
            isinstance(part, int) and not isinstance(part, bool) and 0 <= part <= 255
            for part in value
        )
    ):
        return (value[0], value[1], value[2])
    raise ValidationError(
        "background must be a colour name, '#rrggbb' or an (r, g, b) tuple of 0-255, "
        f"not {check.shown(value)}"
    )


# -- inputs ---------------------------------------------------------------------------


@attrs.frozen
class _Input:
    """One input as given, with its names; read only inside a worker thread."""

    source: str  # how reports name it
    stem: str  # the upload name without its extension
    data: pathlib.Path | bytes | IO[bytes]


def _input(item: Any, label: str, stem: str) -> _Input:
    """Name an input the way uploads do: a path as given, a tuple's or a file object's
    file name, else `label`; its upload name is that name's stem, else `stem`. Types are
    checked here, nothing is read."""
    # A content type is checked as uploads check it, then dropped: the prepared photo
    # has its own.
    item, filename, _ = unpack(label, item)
    if isinstance(item, str | os.PathLike):
        path = check.local_path(label, item)
        return _Input(str(path), path.stem or stem, path)
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
        return _Input(filename, pathlib.PurePath(filename).stem or stem, data)
    return _Input(label, stem, data)


def _read_file_object(source: str, file: IO[bytes]) -> bytes:
    """All of a file object from where it is, which is where it is left."""
    try:
        start = file.tell() if _seekable(file) else None
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
class _Done:
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


def _prepare_one(
    item: _Input,
    options: _Options,
    claim: Callable[[str], str | None] | None = None,
) -> _Done:
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
    return _Done(data_out, original_size, input_hash, hashlib.sha256(data_out).hexdigest())


def _convert(
    source: str, opened: pathlib.Path | IO[bytes], kind: ImageFormat, options: _Options
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


def _render(image: Image.Image, options: _Options) -> tuple[bytes, tuple[int, int]]:
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

    pillow_name, _, _ = _SAVE[options.format]
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


def prepare_photo(
    input: ImageInput,
    *,
    size: int = DEFAULT_SIZE,
    mode: PadOrCrop = "pad",
    background: Colour = "white",
    format: OutputFormat = "jpeg",
    quality: int = 90,
    min_side: int = DEFAULT_MIN_SIDE,
    keep_icc: bool = False,
) -> bytes:
    """One photo prepared for training: the bytes of a `size` x `size` image file.

    The photo is turned upright by its EXIF orientation, made square (`"pad"`: all of it
    visible on `background`; `"crop"`: the centred square), resized, and written as RGB
    `format` (`"jpeg"` or `"jpg"`, `"png"`, `"webp"`; `quality` 1-95 for JPEG and WebP). The result
    carries no metadata: no EXIF (no GPS location), no XMP, no comments, and no ICC
    profile unless `keep_icc=True` (kept as is when it is an RGB profile; nothing is
    converted to sRGB). Transparency is composited onto `background`.

    `input` is a path, bytes, a binary file object (read from where it is, and left
    there) or a `(filename, data)` tuple. Synchronous and CPU-bound: from async code,
    run it in a worker thread, or use `prepare_training_set`.

    Raises `ValidationError` for a bad argument, before reading anything, and
    `PhotoError` (a `ValidationError`) when the photo cannot be used: not an image,
    damaged, smaller than `min_side` px on its shorter side, too many pixels, or HEIC
    without `pillow-heif`.
    """
    options = _options(size, mode, background, format, quality, min_side, keep_icc)
    return _prepare_one(_input(input, "the photo", "photo"), options).data


async def prepare_training_set(
    inputs: Iterable[ImageInput],
    *,
    size: int = DEFAULT_SIZE,
    mode: PadOrCrop = "pad",
    background: Colour = "white",
    format: OutputFormat = "jpeg",
    quality: int = 90,
    min_side: int = DEFAULT_MIN_SIDE,
    keep_icc: bool = False,
    workers: int = 2,
) -> TrainingSet:
    """Prepare photos for `dm.models.create(images=...)`, skipping the unusable ones.

    Each photo is prepared as by `prepare_photo` (same options). Inputs that cannot be
    used are skipped with a one-line reason in `.skipped`: not an image, damaged, a
    shorter side below `min_side` px (256 by default), too many pixels, HEIC without
    `pillow-heif`, or a duplicate: the same file content as an earlier input, or the
    same picture once prepared (photos that differ only in their metadata). The first
    of duplicates is kept. `.photos` are in input order, named after their sources
    (`IMG_0001.jpg` for `IMG_0001.HEIC`; `-2`, `-3`... keep names unique).

    The work runs in worker threads, `workers` photos at a time, so the event loop stays
    free and memory holds at most `workers` decoded photos (big JPEGs are decoded at a
    reduced scale). Files are read in those threads too.

    Raises `ValidationError` for a bad argument before any work, and `TrainingSetError`
    (a `ValidationError`, with the `.training_set`) when no photo is usable or more than
    30 are: DeepMode takes 1 to 30.
    """
    options = _options(size, mode, background, format, quality, min_side, keep_icc)
    check.integer("workers", workers, 1, 64)
    items = [
        _input(item, f"images[{index}]", f"photo-{index + 1}")
        for index, item in enumerate(check.as_list("inputs", inputs))
    ]
    if not items:
        raise ValidationError("inputs is empty: give 1 to 30 photos")

    claims = _Claims(items)
    results: list[_Done | PhotoError | None] = [None] * len(items)
    limiter = anyio.CapacityLimiter(workers)

    async def run(index: int) -> None:
        def work() -> _Done:
            return _prepare_one(items[index], options, lambda digest: claims.claim(digest, index))

        try:
            results[index] = await anyio.to_thread.run_sync(work, limiter=limiter)
        except PhotoError as error:
            results[index] = error

    async with anyio.create_task_group() as group:
        for index in range(len(items)):
            group.start_soon(run, index)
    training_set = _assemble(items, results, claims.hashes, options.format)
    _check_count(training_set)
    return training_set


class _Claims:
    """The content hash of each input read so far, shared by the worker threads."""

    def __init__(self, items: Sequence[_Input]) -> None:
        self._items = items
        self._lock = threading.Lock()
        self.hashes: dict[int, str] = {}
        self._first: dict[str, int] = {}

    def claim(self, digest: str, index: int) -> str | None:
        """A reason to skip this input when an earlier one is known to have its content.

        Only a shortcut: inputs finish reading in any order, so `_assemble` settles
        duplicates again, in input order.
        """
        with self._lock:
            self.hashes[index] = digest
            first = self._first.setdefault(digest, index)
            if first >= index:
                self._first[digest] = index
                return None
        return _duplicate(self._items[first].source, self._items[index].source)


def _duplicate(first: str, source: str) -> str:
    if first == source:
        return "given more than once (its first time is kept)"
    return f"a duplicate of {first} (the same file content)"


def _assemble(
    items: Sequence[_Input],
    results: Sequence[_Done | PhotoError | None],
    hashes: dict[int, str],
    format: OutputFormat,
) -> TrainingSet:
    """The training set in input order, with duplicates settled independently of timing:
    an input with the same content as an earlier one is its duplicate, whatever became
    of the earlier one; then a photo identical once prepared to an earlier kept one."""
    _, extension, content_type = _SAVE[format]
    photos: list[PreparedPhoto] = []
    skipped: list[SkippedPhoto] = []
    first_input: dict[str, int] = {}
    first_output: dict[str, str] = {}
    names: set[str] = set()
    for index, (item, result) in enumerate(zip(items, results, strict=True)):
        assert result is not None
        digest = hashes.get(index)
        if digest is not None and (first := first_input.setdefault(digest, index)) != index:
            skipped.append(SkippedPhoto(item.source, _duplicate(items[first].source, item.source)))
            continue
        if isinstance(result, PhotoError):
            skipped.append(SkippedPhoto(item.source, result.reason))
            continue
        earlier = first_output.setdefault(result.output_hash, item.source)
        if earlier != item.source:
            reason = f"the same picture as {earlier} once prepared (they differ only in metadata)"
            skipped.append(SkippedPhoto(item.source, reason))
            continue
        name = _unique(item.stem, extension, names)
        photos.append(
            PreparedPhoto(name, result.data, item.source, result.original_size, content_type)
        )
    return TrainingSet(photos, skipped)


def _unique(stem: str, extension: str, taken: set[str]) -> str:
    name, number = f"{stem}{extension}", 1
    while name.lower() in taken:
        number += 1
        name = f"{stem}-{number}{extension}"
    taken.add(name.lower())
    return name


def _check_count(training_set: TrainingSet) -> None:
    count = len(training_set.photos)
    if 1 <= count <= MAX_TRAINING_IMAGES:
        return
    if count == 0:
        reasons = "; ".join(f"{s.source}: {s.reason}" for s in training_set.skipped)
        message = f"no photo is usable for training (DeepMode takes 1 to 30): {reasons}"
    else:
        message = (
            f"{count} photos are usable, but DeepMode takes 1 to {MAX_TRAINING_IMAGES}: "
            f"leave out {count - MAX_TRAINING_IMAGES}"
        )
    raise TrainingSetError(message, training_set)
