"""`deepmode_async.prep`: photos made upright, square, sized, and stripped of metadata.

Every image is drawn here with Pillow: a red block marks the true top-left corner, red
bands mark a subject's very edges, and metadata carries strings that must not survive.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import pathlib
import re
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import pillow_heif
import pytest
from PIL import ExifTags, Image, ImageCms, ImageOps, PngImagePlugin

from deepmode_async import ValidationError
from deepmode_async import prep as prep_module
from deepmode_async.prep import (
    DEFAULT_MIN_SIDE,
    OutputFormat,
    PhotoError,
    PreparedPhoto,
    SkippedPhoto,
    TrainingSet,
    TrainingSetError,
    prepare_photo,
    prepare_training_set,
)
from deepmode_async.testing import MockDeepMode, sample_image

pytestmark = pytest.mark.anyio

RED = (220, 20, 20)
BLUE = (20, 40, 200)
GREEN = (20, 180, 40)
WHITE = (255, 255, 255)
SECRET = "WGS-84-SECRET"  # a GPS map datum nobody else writes
XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF>xmp-secret</rdf:RDF></x:xmpmeta>'

Pixel = tuple[int, ...]


def encode(image: Image.Image, fmt: str = "JPEG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def near(pixel: Any, colour: Sequence[int], tolerance: int = 60) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel[:3], colour, strict=True))


def marked(width: int = 400, height: int = 300) -> Image.Image:
    """Blue, with a red block in the top-left quarter: which way is up shows."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width * 2 // 5, height * 2 // 5))
    return image


def photo(seed: int, size: tuple[int, int] = (300, 300)) -> bytes:
    """A distinct small JPEG for each seed."""
    return encode(Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)))


# -- the core SDK stays free of Pillow ---------------------------------------------------


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 (our own interpreter)
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env
    )


def test_the_sdk_and_deepmode_balance_never_load_pillow() -> None:
    code = (
        "import sys\n"
        "import deepmode_async, deepmode_async.cli\n"
        "assert 'PIL' not in sys.modules, 'import'\n"
        "try:\n"
        "    deepmode_async.cli.main(['balance', '--json'])\n"
        "except SystemExit as exit:\n"
        "    print('exit', exit.code, 'PIL' in sys.modules)\n"
    )
    with MockDeepMode() as mock:
        env = {"DEEPMODE_API_KEY": mock.api_key, "DEEPMODE_BASE_URL": mock.base_url}
        done = run_python(code, env={**_base_env(), **env})
    assert done.stderr == ""
    assert '"remaining_balance"' in done.stdout  # the balance was really fetched
    assert done.stdout.splitlines()[-1] == "exit 0 False"


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DEEPMODE_")}


def test_prep_without_pillow_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['PIL'] = None\n"
        "try:\n"
        "    import deepmode_async.prep\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    done = run_python(code)
    assert done.stdout.strip() == (
        "deepmode_async.prep needs Pillow, which the 'images' extra installs: "
        "pip install 'deepmode-async[images]'"
    )


# -- orientation --------------------------------------------------------------------------

# The transpose that stores an upright picture so that EXIF orientation n shows it upright.
STORED_AS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def oriented(orientation: int, fmt: str = "JPEG") -> bytes:
    """`marked()` stored turned or mirrored, with the EXIF orientation that undoes it."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    data = encode(marked().transpose(STORED_AS[orientation]), fmt, exif=exif)
    # The sample itself is right: Pillow's own exif_transpose shows it upright.
    upright = ImageOps.exif_transpose(decode(data))
    assert upright.size == (400, 300)
    assert near(upright.getpixel((20, 20)), RED)
    assert near(upright.getpixel((380, 280)), BLUE)
    return data


def assert_upright_landscape(data: bytes) -> None:
    """`marked()` padded into 640 x 640: the photo is 640 x 480 at y 80..560."""
    image = decode(data)
    assert (image.format, image.size, image.mode) == ("JPEG", (640, 640), "RGB")
    assert near(image.getpixel((320, 20)), WHITE)  # padding above: landscape
    assert near(image.getpixel((320, 620)), WHITE)  # and below
    assert near(image.getpixel((60, 140)), RED)  # the marker top-left
    assert near(image.getpixel((580, 140)), BLUE)  # not top-right
    assert near(image.getpixel((60, 500)), BLUE)  # not bottom-left
    assert near(image.getpixel((580, 500)), BLUE)
    assert image.getexif().get(ExifTags.Base.Orientation) is None


@pytest.mark.parametrize("orientation", range(2, 9))
def test_every_exif_orientation_comes_out_upright(orientation: int) -> None:
    assert_upright_landscape(prepare_photo(oriented(orientation)))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_orientation_of_png_and_webp_is_applied_too(fmt: str) -> None:
    assert_upright_landscape(prepare_photo(oriented(6, fmt)))


# -- metadata -------------------------------------------------------------------------------


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def with_metadata(fmt: str = "JPEG") -> bytes:
    """A photo with GPS EXIF, XMP, an ICC profile (and a comment for JPEG)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "PhoneMaker"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 22.0, 7.5)
    gps[ExifTags.GPS.GPSMapDatum] = SECRET
    params: dict[str, Any] = {"exif": exif, "xmp": XMP, "icc_profile": srgb_profile()}
    if fmt == "JPEG":
        params["comment"] = "comment-secret"
    if fmt == "PNG":  # Pillow writes XMP and text into PNG as chunks of a PngInfo
        params["pnginfo"] = PngImagePlugin.PngInfo()
        params["pnginfo"].add_itxt("XML:com.adobe.xmp", XMP.decode())
        params["pnginfo"].add_text("Comment", "comment-secret")
    data = encode(marked(), fmt, **params)
    source = decode(data)  # everything really is in the input
    assert source.getexif().get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSMapDatum] == SECRET
    assert {"xmp", "icc_profile"} <= set(source.info)
    assert SECRET.encode() in data
    return data


def assert_no_metadata(data: bytes) -> None:
    image = decode(data)
    assert len(image.getexif()) == 0
    assert not {"exif", "xmp", "icc_profile", "comment", "XML:com.adobe.xmp"} & set(image.info)
    for secret in (SECRET.encode(), b"xmp-secret", b"comment-secret", b"PhoneMaker"):
        assert secret not in data
    assert b"Exif\x00\x00" not in data


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_gps_exif_xmp_comment_and_icc_in_none_out(fmt: str) -> None:
    data = prepare_photo(with_metadata(fmt))
    assert_no_metadata(data)
    # JPEG markers: no APP1 (EXIF, XMP), APP2 (ICC) or COM segment at all. In the
    # compressed data 0xFF is always followed by 0x00 or a restart marker, so the
    # search cannot be fooled by pixels.
    for marker in (b"\xff\xe1", b"\xff\xe2", b"\xff\xfe"):
        assert marker not in data
    assert_upright_landscape(data)


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_png_and_webp_outputs_carry_no_metadata_chunks(fmt: OutputFormat) -> None:
    data = prepare_photo(with_metadata(), format=fmt)
    assert_no_metadata(data)
    chunks = [b"eXIf", b"iTXt", b"tEXt", b"zTXt", b"iCCP"] if fmt == "png" else [b"EXIF", b"XMP "]
    for chunk in [*chunks, b"ICCP"]:
        assert chunk not in data


def test_keep_icc_keeps_an_rgb_profile_and_nothing_else() -> None:
    data = prepare_photo(with_metadata(), keep_icc=True)
    image = decode(data)
    assert image.info["icc_profile"] == srgb_profile()
    assert len(image.getexif()) == 0
    assert SECRET.encode() not in data
    assert b"xmp-secret" not in data
    # A profile that does not describe RGB pixels (a grey one) is dropped.
    grey = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    assert grey[16:20] != b"RGB "
    source = encode(Image.new("RGB", (300, 300), BLUE), icc_profile=grey)
    assert "icc_profile" not in decode(prepare_photo(source, keep_icc=True)).info


# -- shape ------------------------------------------------------------------------------------


def edged(width: int, height: int) -> Image.Image:
    """A subject that fills the frame to its very edges: red 15 px bands, blue inside,
    a green square in the centre."""
    image = Image.new("RGB", (width, height), RED)
    image.paste(BLUE, (15, 15, width - 15, height - 15))
    cx, cy = width // 2, height // 2
    image.paste(GREEN, (cx - 50, cy - 50, cx + 50, cy + 50))
    return image


@pytest.mark.parametrize("tall", [False, True], ids=["3:1", "1:3"])
def test_pad_keeps_the_whole_subject_inside_the_square(tall: bool) -> None:
    size = 640

    def at(x: int, y: int) -> Pixel:  # coordinates of the wide case, turned for the tall
        pixel = image.getpixel((y, x) if tall else (x, y))
        assert isinstance(pixel, tuple)
        return pixel

    source = edged(300, 900) if tall else edged(900, 300)
    image = decode(prepare_photo(encode(source), size=size))
    assert image.size == (size, size)
    # The photo is 640 x 213 at y 213..427: every edge band is still there.
    top, bottom = 214, 426
    for x, y in [(3, 320), (636, 320), (320, top + 3), (320, bottom - 3), (3, top + 3)]:
        assert near(at(x, y), RED), (x, y)
    assert near(at(320, 320), GREEN)
    assert near(at(100, 320), BLUE)
    for x, y in [(320, 100), (320, 540), (3, 3), (636, 636)]:
        assert near(at(x, y), WHITE), (x, y)


@pytest.mark.parametrize("tall", [False, True], ids=["3:1", "1:3"])
def test_crop_keeps_the_centred_square(tall: bool) -> None:
    source = edged(300, 900) if tall else edged(900, 300)
    image = decode(prepare_photo(encode(source), mode="crop", size=300))
    assert image.size == (300, 300)
    # The centre 300 x 300 of the photo, at its own scale: the green square in the middle,
    # the bands along the long sides kept, the short sides' bands cut off.
    assert near(image.getpixel((150, 150)), GREEN)
    kept, cut = ((5, 150), (150, 5)) if tall else ((150, 5), (5, 150))
    assert near(image.getpixel(kept), RED)
    assert near(image.getpixel(cut), BLUE)
    assert not any(near(image.getpixel(p), WHITE) for p in [(2, 2), (297, 297), (150, 2)])


def test_small_photos_are_scaled_up_to_the_size() -> None:
    image = decode(prepare_photo(encode(edged(300, 300)), mode="crop"))
    assert image.size == (640, 640)
    assert near(image.getpixel((5, 320)), RED)
    assert near(image.getpixel((320, 320)), GREEN)


def test_transparency_goes_onto_the_background_in_every_format() -> None:
    source = Image.new("RGBA", (400, 400), (0, 0, 0, 0))
    source.paste((*BLUE, 255), (100, 100, 300, 300))
    data = encode(source, "PNG")
    outputs: list[tuple[OutputFormat, bytes]] = [
        ("jpeg", b"\xff\xd8\xff"),
        ("png", b"\x89PNG"),
        ("webp", b"RIFF"),
    ]
    for fmt, magic in outputs:
        prepared = prepare_photo(data, format=fmt, size=400)
        assert prepared.startswith(magic)
        image = decode(prepared)
        assert image.mode == "RGB"
        assert near(image.getpixel((10, 10)), WHITE), fmt
        assert near(image.getpixel((200, 200)), BLUE), fmt
    black = decode(prepare_photo(data, background="black", size=400))
    assert near(black.getpixel((10, 10)), (0, 0, 0))
    tinted = decode(prepare_photo(encode(marked(600, 300)), background=(10, 200, 10), size=400))
    assert near(tinted.getpixel((200, 10)), (10, 200, 10))


def test_the_format_asked_for_is_written() -> None:
    source = encode(marked())
    assert decode(prepare_photo(source)).format == "JPEG"
    assert decode(prepare_photo(source, format="jpg")).format == "JPEG"
    assert decode(prepare_photo(source, format="png")).format == "PNG"
    assert decode(prepare_photo(source, format="webp")).format == "WEBP"
    small = prepare_photo(source, quality=5)
    large = prepare_photo(source, quality=95)
    assert len(small) < len(large)


def test_sixteen_bit_grey_and_palette_photos_become_rgb() -> None:
    grey = Image.new("I;16", (300, 300), 32768)  # 50 % grey in 16 bits
    image = decode(prepare_photo(encode(grey, "PNG")))
    assert image.mode == "RGB"
    assert near(image.getpixel((320, 320)), (128, 128, 128), 3)
    palette = marked().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert_upright_landscape(prepare_photo(encode(palette, "PNG")))


def test_inputs_as_file_objects_and_tuples(tmp_path: pathlib.Path) -> None:
    data = encode(marked())
    buffer = io.BytesIO(b"junk" + data)
    buffer.seek(4)
    assert_upright_landscape(prepare_photo(buffer))
    assert buffer.tell() == 4  # left where it was
    assert_upright_landscape(prepare_photo(("holiday.jpg", data)))
    assert_upright_landscape(prepare_photo(("holiday.jpg", io.BytesIO(data), "image/jpeg")))
    path = tmp_path / "holiday.jpg"
    path.write_bytes(data)
    assert_upright_landscape(prepare_photo(path))
    assert_upright_landscape(prepare_photo(str(path)))
    with path.open("rb") as file:
        assert_upright_landscape(prepare_photo(file))


def test_broken_or_odd_exif_leaves_the_photo_as_it_is() -> None:
    blue = Image.new("RGB", (400, 300), BLUE)
    blue.paste(RED, (0, 0, 160, 120))
    # An orientation given as text: ignored.
    text = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x02\x00\x04\x00\x00\x00abc\x00"
    text += b"\x00" * 4  # no next IFD
    assert_upright_landscape(prepare_photo(encode(blue, exif=text)))
    # EXIF cut short: Pillow warns while opening a JPEG. Where warnings are errors (as
    # here) the photo is refused as damaged; where they are not, it is used.
    cut = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00\x12\x01\x03\x00"
    assert "damaged or cut short (Corrupt EXIF data." in reason_for(encode(blue, exif=cut))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert_upright_landscape(prepare_photo(encode(blue, exif=cut)))
    # A PNG reads its EXIF only when asked: the orientation is then taken as upright.
    assert_upright_landscape(prepare_photo(encode(blue, "PNG", exif=cut[6:])))


class Unseekable(io.RawIOBase):
    """A stream read once, like a pipe."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._data.readinto(buffer)


class TextReader:
    """Something with a read() that gives text."""

    def read(self) -> str:
        return "text"


def test_odd_file_objects() -> None:
    assert_upright_landscape(prepare_photo(io.BufferedReader(Unseekable(encode(marked())))))
    closed = io.BytesIO(encode(marked()))
    closed.close()
    with pytest.raises(PhotoError, match=r"^the photo: cannot read the file object: I/O operation"):
        prepare_photo(closed)
    with pytest.raises(PhotoError, match=r"must be opened in binary mode \('rb'\)$"):
        prepare_photo(TextReader())  # type: ignore[arg-type]


# -- photos that cannot be used ------------------------------------------------------------


def reason_for(data: bytes, **options: Any) -> str:
    with pytest.raises(PhotoError) as caught:
        prepare_photo(("IMG_1.jpg", data), **options)
    assert caught.value.source == "IMG_1.jpg"
    assert str(caught.value) == f"IMG_1.jpg: {caught.value.reason}"
    return caught.value.reason


def test_unusable_photos_raise_photo_error_saying_why() -> None:
    jpeg = encode(marked())
    assert reason_for(jpeg[: len(jpeg) // 2]).startswith(
        "cannot be read as JPEG: the file is damaged or cut short (image file is truncated"
    )
    assert reason_for(b"hello, this is a text file") == (
        "not an image DeepMode takes: by its content it is not jpg, jpeg, png, webp or heic; "
        "export it as JPEG or PNG"
    )
    assert "(it is empty)" in reason_for(b"")
    assert reason_for(encode(Image.new("RGB", (1, 1)), "PNG")) == (
        f"1 x 1 is below the minimum side of {DEFAULT_MIN_SIDE} px; use a larger photo"
    )
    assert reason_for(encode(Image.new("RGB", (1000, 99))), min_side=100) == (
        "1000 x 99 is below the minimum side of 100 px; use a larger photo"
    )
    assert isinstance(prepare_photo(encode(Image.new("RGB", (1000, 100))), min_side=100), bytes)
    assert reason_for(encode(Image.new("RGB", (2, 1)), "GIF")).startswith("not an image")


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 100,
        b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x01" * 64,
        b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64,
        encode(marked(), "PNG")[:200],
        encode(marked(), "WEBP")[:-40],
    ],
    ids=["jpeg", "png", "webp", "heic", "cut-png", "cut-webp"],
)
def test_pillow_errors_never_escape(data: bytes) -> None:
    reason = reason_for(data)
    assert "damaged or cut short" in reason


def test_a_decompression_bomb_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300)
    reason = (
        "more pixels than Pillow's safety limit of 90,000 (a possible decompression bomb); "
        "save it at a smaller size"
    )
    over = encode(Image.new("RGB", (400, 300)))  # between 1x and 2x: Pillow warns
    assert reason_for(over) == reason  # pytest turns the warning into an exception
    with warnings.catch_warnings():  # as in an app: Pillow only warns, prep refuses
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert reason_for(over) == reason
    far_over = encode(Image.new("RGB", (1000, 300)))  # over 2x: Pillow raises
    assert reason_for(far_over) == reason
    assert isinstance(prepare_photo(encode(Image.new("RGB", (300, 300)))), bytes)


def test_a_missing_file_or_a_directory(tmp_path: pathlib.Path) -> None:
    with pytest.raises(PhotoError, match=r"missing\.jpg: does not exist$"):
        prepare_photo(tmp_path / "missing.jpg")
    with pytest.raises(PhotoError, match=r"is a directory, not a file$"):
        prepare_photo(tmp_path)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    with pytest.raises(PhotoError, match=r"pipe\.jpg: is not a regular file$"):
        prepare_photo(fifo)


# -- HEIC -----------------------------------------------------------------------------------


def heic(image: Image.Image, **params: Any) -> bytes:
    pillow_heif.register_heif_opener()
    return encode(image, "HEIF", quality=90, **params)


def test_heic_is_read_through_pillow_heif_and_stripped() -> None:
    exif = Image.Exif()
    exif[ExifTags.IFD.GPSInfo] = {ExifTags.GPS.GPSMapDatum: SECRET}
    data = heic(marked(), exif=exif, xmp=XMP)
    assert data[4:12] == b"ftypheic"
    assert SECRET.encode() in data
    out = prepare_photo(data)
    assert_upright_landscape(out)
    assert_no_metadata(out)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_heic_is_not_turned_twice(orientation: int) -> None:
    """In HEIC the picture's own transforms (irot, imir) say how it is shown, and the EXIF
    orientation only repeats them (iPhones write both). pillow-heif applies the transforms
    and resets the EXIF orientation; prep must not turn the photo again."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    stored = marked().transpose(STORED_AS[orientation])
    stored.info["exif"] = exif.tobytes()  # pillow-heif writes it as an irot box, and keeps it
    data = heic(stored)
    assert b"irot" in data
    assert_upright_landscape(prepare_photo(data))


async def test_heic_without_pillow_heif_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = heic(marked())
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # `import pillow_heif` fails
    assert reason_for(data) == (
        "a HEIC photo, which needs the pillow-heif package to be read: "
        "pip install 'deepmode-async[images]' (or export it as JPEG)"
    )
    result = await prepare_training_set([("a.heic", data), encode(marked())])
    assert result.skipped == [SkippedPhoto("a.heic", reason_for(data))]
    assert [photo.name for photo in result.photos] == ["photo-2.jpg"]


# -- argument errors --------------------------------------------------------------------------

BAD_ARGUMENTS = [
    ({"size": 0}, "size must be from 1 to 4096, not 0"),
    ({"size": -640}, "size must be from 1 to 4096"),
    ({"size": 4097}, "size must be from 1 to 4096"),
    ({"size": 640.0}, "size must be an int"),
    ({"mode": "fit"}, "mode must be 'pad' or 'crop', not 'fit'"),
    ({"format": "gif"}, "format must be 'jpeg', 'png' or 'webp', not 'gif'"),
    ({"quality": 0}, "quality must be from 1 to 95, not 0"),
    ({"quality": 96}, "quality must be from 1 to 95, not 96"),
    ({"quality": True}, "quality must be an int"),
    ({"background": "not-a-colour"}, "background must be a colour name or '#rrggbb'"),
    ({"background": (256, 0, 0)}, "an (r, g, b) tuple of 0-255"),
    ({"background": (1, 2)}, "an (r, g, b) tuple of 0-255"),
    ({"min_side": 0}, "min_side must be a positive int"),
    ({"keep_icc": "yes"}, "keep_icc must be True or False"),
]


@pytest.mark.parametrize(("options", "message"), BAD_ARGUMENTS)
def test_bad_arguments_are_refused_before_any_work(
    options: dict[str, Any], message: str, tmp_path: pathlib.Path
) -> None:
    # Were the photo looked at, this would be a PhotoError about the missing file.
    with pytest.raises(ValidationError, match=re.escape(message)):
        prepare_photo(tmp_path / "missing.jpg", **options)
    with pytest.raises(ValidationError) as caught:
        prepare_photo(tmp_path / "missing.jpg", **options)
    assert not isinstance(caught.value, PhotoError)


async def test_bad_training_set_arguments(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "missing.jpg"
    cases: list[tuple[Any, dict[str, Any], str]] = [
        ([missing], {"workers": 0}, "workers must be from 1 to 64, not 0"),
        ([missing], {"size": 0}, "size must be from 1 to 4096, not 0"),
        ([missing], {"mode": "fill"}, "mode must be 'pad' or 'crop'"),
        ([], {}, "inputs is empty: give 1 to 30 photos"),
        (str(missing), {}, "inputs must be a list, not str"),
        ([missing, 42], {}, r"images\[1\] must be a path, bytes, a binary file object"),
        ([("a.jpg", str(missing))], {}, r"images\[0\]: give a path alone, not inside a tuple"),
        ([(b"",)], {}, r"images\[0\]: a tuple must be \(filename, bytes or file object"),
        ([io.StringIO("text")], {}, "must be opened in binary mode"),
    ]
    for inputs, options, message in cases:
        with pytest.raises(ValidationError, match=message) as caught:
            await prepare_training_set(inputs, **options)
        assert not isinstance(caught.value, PhotoError | TrainingSetError)


# -- training sets -----------------------------------------------------------------------------


async def test_a_training_set_keeps_order_names_and_says_what_it_skipped(
    tmp_path: pathlib.Path,
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "IMG_0001.JPG", tmp_path / "b" / "IMG_0001.jpeg"
    first.write_bytes(oriented(6))
    second.write_bytes(photo(1))
    text = tmp_path / "notes.jpg"
    text.write_text("remember the milk")
    jpeg = encode(marked(500, 300))
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(jpeg[: len(jpeg) // 2])
    tiny = encode(Image.new("RGB", (1, 1)), "PNG")
    plain = marked(400, 300)
    bare = encode(plain, quality=90)
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "PhoneMaker"
    same_pixels = encode(plain, quality=90, exif=exif)  # differs only in its EXIF
    assert bare != same_pixels

    result = await prepare_training_set(
        [
            first,
            str(text),
            second,
            corrupt,
            ("tiny.png", tiny),
            photo(2),
            photo(2),  # the same bytes again
            str(second),  # the same file again
            ("bare.jpg", bare),
            ("copy.jpg", same_pixels),
            io.BytesIO(photo(3)),
        ],
        size=320,
    )
    assert isinstance(result, TrainingSet)
    assert [(p.name, p.source, p.original_size) for p in result.photos] == [
        ("IMG_0001.jpg", str(first), (400, 300)),  # as seen upright
        ("IMG_0001-2.jpg", str(second), (300, 300)),
        ("photo-6.jpg", "images[5]", (300, 300)),
        ("bare.jpg", "bare.jpg", (400, 300)),
        ("photo-11.jpg", "images[10]", (300, 300)),
    ]
    for prepared in result.photos:
        assert isinstance(prepared, PreparedPhoto)
        assert prepared.content_type == "image/jpeg"
        assert decode(prepared.data).size == (320, 320)
    assert result.images[0] == ("IMG_0001.jpg", result.photos[0].data, "image/jpeg")
    reasons = {skip.source: skip.reason for skip in result.skipped}
    assert [skip.source for skip in result.skipped] == [
        str(text),
        str(corrupt),
        "tiny.png",
        "images[6]",
        str(second),
        "copy.jpg",
    ]
    assert reasons[str(text)].startswith("not an image DeepMode takes")
    assert reasons[str(corrupt)].startswith("cannot be read as JPEG: the file is damaged")
    assert reasons["tiny.png"] == "1 x 1 is below the minimum side of 256 px; use a larger photo"
    assert reasons["images[6]"] == "a duplicate of images[5] (the same file content)"
    assert reasons[str(second)] == "given more than once (its first time is kept)"
    assert reasons["copy.jpg"] == (
        "the same picture as bare.jpg once prepared (they differ only in metadata)"
    )
    assert_upright_landscape(prepare_photo(first))  # the training set's photo is the same picture
    assert result.photos[0].data == prepare_photo(first, size=320)


async def test_duplicates_are_settled_in_input_order_whatever_finishes_first() -> None:
    big = encode(marked(3000, 2000))
    small = encode(marked(600, 400))
    # The later copy of `big` is read long after the small one finished: still a duplicate.
    result = await prepare_training_set([small, big, photo(5), big, small], workers=3)
    assert [p.source for p in result.photos] == ["images[0]", "images[1]", "images[2]"]
    assert result.skipped == [
        SkippedPhoto("images[3]", "a duplicate of images[1] (the same file content)"),
        SkippedPhoto("images[4]", "a duplicate of images[0] (the same file content)"),
    ]


async def test_a_duplicate_read_after_its_original_is_not_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: list[int] = []
    real_open = Image.open

    def counting_open(fp: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(1)
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    data = photo(7)
    result = await prepare_training_set([data, data, data], workers=1)  # one at a time
    assert len(result.photos) == 1
    assert len(result.skipped) == 2
    assert len(opened) == 1


async def test_no_usable_photo_is_an_error_listing_every_reason(tmp_path: pathlib.Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    with pytest.raises(TrainingSetError) as caught:
        await prepare_training_set([text, ("dot.png", encode(Image.new("RGB", (1, 1)), "PNG"))])
    error = caught.value
    assert isinstance(error, ValidationError)
    assert str(error) == (
        f"no photo is usable for training (DeepMode takes 1 to 30): {text}: not an image "
        "DeepMode takes: by its content it is not jpg, jpeg, png, webp or heic; export it as "
        "JPEG or PNG; dot.png: 1 x 1 is below the minimum side of 256 px; use a larger photo"
    )
    assert error.training_set.photos == []
    assert len(error.training_set.skipped) == 2


async def test_more_than_thirty_usable_photos_is_an_error() -> None:
    inputs = [photo(seed) for seed in range(31)]
    with pytest.raises(TrainingSetError) as caught:
        await prepare_training_set(inputs, size=32)
    assert str(caught.value) == "31 photos are usable, but DeepMode takes 1 to 30: leave out 1"
    assert len(caught.value.training_set.photos) == 31
    result = await prepare_training_set(inputs[:30], size=32)  # 30 is fine
    assert len(result.photos) == 30


async def test_thirty_one_inputs_with_a_duplicate_are_thirty_photos() -> None:
    inputs = [photo(seed) for seed in range(30)] + [photo(0)]
    result = await prepare_training_set(inputs, size=32)
    assert len(result.photos) == 30
    assert result.skipped == [
        SkippedPhoto("images[30]", "a duplicate of images[0] (the same file content)")
    ]


# -- the event loop stays free, memory stays bounded -----------------------------------------

LARGE = (4000, 3000)


@pytest.fixture(scope="session")
def large_photos(tmp_path_factory: pytest.TempPathFactory) -> list[pathlib.Path]:
    """30 different 4000 x 3000 JPEGs of textured noise (about 1.5 MB each), made once."""
    folder = tmp_path_factory.mktemp("large")
    noise = Image.merge("RGB", [Image.effect_noise((500, 375), 80) for _ in range(3)])
    base = noise.resize(LARGE, Image.Resampling.BILINEAR)

    def write(index: int) -> pathlib.Path:
        image = base.copy()
        image.paste((index * 8, 255 - index * 8, 128), (index * 100, 0, index * 100 + 400, 400))
        path = folder / f"large-{index:02d}.jpg"
        image.save(path, "JPEG", quality=85)
        return path

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # Pillow encodes without the GIL
        return list(pool.map(write, range(30)))


async def test_the_loop_keeps_ticking_while_thirty_large_photos_are_prepared(
    large_photos: list[pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = threading.Lock()
    running, peak = 0, 0
    threads: set[int] = set()  # where the photos were prepared
    real_prepare = prep_module._photo.prepare_one

    def counted(*args: Any) -> Any:
        nonlocal running, peak
        with lock:
            threads.add(threading.get_ident())
            running += 1
            peak = max(peak, running)
        try:
            return real_prepare(*args)
        finally:
            with lock:
                running -= 1

    resized: list[tuple[int, int]] = []  # the size of each decoded photo, before resizing
    real_resize: Callable[..., Image.Image] = Image.Image.resize

    def recording_resize(self: Image.Image, *args: Any, **kwargs: Any) -> Image.Image:
        with lock:
            resized.append(self.size)
        return real_resize(self, *args, **kwargs)

    monkeypatch.setattr(prep_module._photo, "prepare_one", counted)
    monkeypatch.setattr(Image.Image, "resize", recording_resize)

    gaps: list[float] = []
    done = anyio.Event()

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await anyio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with anyio.create_task_group() as group:
        group.start_soon(heartbeat)
        started = time.perf_counter()
        result = await prepare_training_set(large_photos, workers=2)
        elapsed = time.perf_counter() - started
        done.set()

    assert [p.name for p in result.photos] == [f"large-{i:02d}.jpg" for i in range(30)]
    assert result.skipped == []
    assert all(p.original_size == LARGE for p in result.photos)
    assert peak == 2  # two photos at a time, never more
    # Each was decoded at a quarter of its side (1000 x 750 >= 640 wide), not 12 MP.
    assert resized == [(1000, 750)] * 30
    assert threading.get_ident() not in threads  # the work never ran on the loop's thread
    # Measured on 2 cores: longest gap ~15-25 ms, ~1.6 s for the 30 photos. Done on the
    # loop, a gap would last at least one photo; the bounds leave room for a loaded machine.
    assert max(gaps) < 0.25, f"longest gap {max(gaps) * 1000:.0f} ms"
    assert len(gaps) >= elapsed / 0.01 / 4
    print(f"30 photos in {elapsed:.2f} s, longest gap {max(gaps) * 1000:.1f} ms")


async def test_sample_images_of_any_side_are_photos_prep_takes() -> None:
    inputs = [sample_image("png", side=side) for side in (256, 300, 640)]
    result = await prepare_training_set([*inputs, sample_image("png")])
    # Three distinct pictures, each big enough; the 16 px sample is too small.
    assert len(result.photos) == 3
    (small,) = result.skipped
    assert "256" in small.reason
    assert Image.open(io.BytesIO(inputs[2])).size == (640, 640)
    with pytest.raises(ValueError, match="PNG samples only"):
        sample_image("jpeg", side=640)
    with pytest.raises(ValueError, match="1 to 8192"):
        sample_image("png", side=0)
