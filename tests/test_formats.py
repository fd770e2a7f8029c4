from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from deepmode_async._formats import sniff_image_format
from deepmode_async.testing import sample_image

HEIC_HEAD = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_samples_are_real_images_of_their_format(fmt: str) -> None:
    data = sample_image(fmt)
    assert sniff_image_format(data) == fmt
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.size == (16, 16)
        assert image.format == fmt.upper()


@pytest.mark.parametrize("size", [675, 676, 679, 66_208, 66_211, 5 * 1024 * 1024])
def test_padded_jpeg_has_exact_size_and_decodes(size: int) -> None:
    data = sample_image("jpeg", size=size)
    assert len(data) == size
    with Image.open(io.BytesIO(data)) as image:
        image.load()


def test_padding_is_refused_where_it_cannot_work() -> None:
    with pytest.raises(ValueError, match="only JPEG"):
        sample_image("png", size=10_000)
    with pytest.raises(ValueError, match="at least"):
        sample_image("jpeg", size=len(sample_image()) + 2)


def test_heic_and_rejections() -> None:
    assert sniff_image_format(HEIC_HEAD) == "heic"
    assert sniff_image_format(b"GIF89a" + bytes(10)) is None
    assert sniff_image_format(b"") is None
    assert sniff_image_format(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None


@given(st.binary(max_size=64))
def test_sniffing_never_raises(data: bytes) -> None:
    assert sniff_image_format(data) in {None, "jpeg", "png", "webp", "heic"}
