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
the rest of the SDK never imports it. (`_photo` prepares one photo; this module checks
the arguments and assembles the set.)
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Final

import anyio
import anyio.to_thread
import attrs

from .. import _validate as check
from .._errors import ValidationError
from .._public import publish
from .._uploads import ImageInput
from .._validate import MAX_TRAINING_IMAGES
from . import _photo
from ._photo import (
    SAVE,
    Colour,
    Done,
    Options,
    OutputFormat,
    PadOrCrop,
    PhotoError,
    photo_input,
)

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


def _options(
    size: Any,
    mode: Any,
    background: Any,
    format: Any,
    quality: Any,
    min_side: Any,
    keep_icc: Any,
) -> Options:
    """Every argument checked, before any photo is touched."""
    check.integer("size", size, 1, MAX_SIZE)
    if mode not in ("pad", "crop"):
        raise ValidationError(f"mode must be 'pad' or 'crop', not {check.shown(mode)}")
    if format == "jpg":
        format = "jpeg"
    if format not in SAVE:
        raise ValidationError(f"format must be 'jpeg', 'png' or 'webp', not {check.shown(format)}")
    check.integer("quality", quality, 1, 95)
    check.positive("min_side", min_side)
    check.boolean("keep_icc", keep_icc)
    return Options(size, mode, _colour(background), format, quality, min_side, keep_icc)


def _colour(value: Any) -> tuple[int, int, int]:
    from PIL import ImageColor  # here: `_photo` says what to install when Pillow is missing

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
    return _photo.prepare_one(photo_input(input, "the photo", "photo"), options).data


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
        photo_input(item, f"images[{index}]", f"photo-{index + 1}")
        for index, item in enumerate(check.as_list("inputs", inputs))
    ]
    if not items:
        raise ValidationError("inputs is empty: give 1 to 30 photos")

    claims = _Claims(items)
    results: list[Done | PhotoError | None] = [None] * len(items)
    limiter = anyio.CapacityLimiter(workers)

    async def run(index: int) -> None:
        def work() -> Done:
            claim = functools.partial(claims.claim, index=index)
            return _photo.prepare_one(items[index], options, claim)

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

    def __init__(self, items: Sequence[_photo.Input]) -> None:
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
    items: Sequence[_photo.Input],
    results: Sequence[Done | PhotoError | None],
    hashes: dict[int, str],
    format: OutputFormat,
) -> TrainingSet:
    """The training set in input order, with duplicates settled independently of timing:
    an input with the same content as an earlier one is its duplicate, whatever became
    of the earlier one; then a photo identical once prepared to an earlier kept one."""
    _, extension, content_type = SAVE[format]
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


__dir__ = publish(__name__, globals())
