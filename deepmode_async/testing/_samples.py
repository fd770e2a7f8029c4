"""Small, real, decodable images: what the mock serves and what tests upload."""

from __future__ import annotations

import base64
import functools
import struct
import zlib
from typing import Final, Literal

SampleFormat = Literal["jpeg", "png", "webp"]

# 16x16 colour gradients encoded by Pillow (JPEG q80, PNG, lossless WebP).
_SAMPLES: Final[dict[str, bytes]] = {
    "jpeg": base64.b64decode(
        "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAYEBQYFBAYGBQYHBwYIChAKCgkJChQODwwQFxQYGBcUFhYaHSUfGhsj"
        "HBYWICwgIyYnKSopGR8tMC0oMCUoKSj/2wBDAQcHBwoIChMKChMoGhYaKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgo"
        "KCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCj/wAARCAAQABADASIAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAA"
        "AAECAwQFBgcICQoL/8QAtRAAAgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEGE1FhByJxFDKBkaEII0KxwRVS0fAk"
        "M2JyggkKFhcYGRolJicoKSo0NTY3ODk6Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWGh4iJipKT"
        "lJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXGx8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/8QA"
        "HwEAAwEBAQEBAQEBAQAAAAAAAAECAwQFBgcICQoL/8QAtREAAgECBAQDBAcFBAQAAQJ3AAECAxEEBSExBhJBUQdh"
        "cRMiMoEIFEKRobHBCSMzUvAVYnLRChYkNOEl8RcYGRomJygpKjU2Nzg5OkNERUZHSElKU1RVVldYWVpjZGVmZ2hp"
        "anN0dXZ3eHl6goOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0tba3uLm6wsPExcbHyMnK0tPU1dbX2Nna4uPk"
        "5ebn6Onq8vP09fb3+Pn6/9oADAMBAAIRAxEAPwDy/SfDv3fk/Suz0nw7935P0rsdJ8O/d+T9K7PSfDv3fk/SvXx2"
        "eb6mfCvEfw6n/9k="
    ),
    "png": base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAHklEQVR4nGNkYFggwMBAPGJhEGAgCYxqGNUwdDQA"
        "AH+qAr6YvXOiAAAAAElFTkSuQmCC"
    ),
    "webp": base64.b64decode(
        "UklGRi4AAABXRUJQVlA4TCIAAAAvD8ADALkyRPQ/dhHR/wCRtk0l3L/hwdOBGNCYAKoO1H8A"
    ),
}

# A JPEG comment segment: marker, 2-byte length counting itself, up to 65533 bytes of text.
_COM_MARKER: Final = b"\xff\xfe"
_COM_MAX_DATA: Final = 65533
_JFIF_HEADER_END: Final = 20  # SOI (2 bytes) + APP0 marker (2) + APP0 segment (16)


@functools.cache
def sample_image(
    format: SampleFormat = "jpeg", *, size: int | None = None, side: int | None = None
) -> bytes:
    """A real, decodable 16x16 image, padded with JPEG comments to exactly `size` bytes.

    `size` (JPEG only) lets benchmarks download multi-megabyte images that any decoder
    still opens. `side` (PNG only) makes a `side` x `side` picture instead, a pattern
    of its own for each side: `sample_image("png", side=640)` is a photo that
    `deepmode_async.prep` accepts (it needs 256 px). The result is cached: calling it
    again is free.
    """
    if side is not None:
        if format != "png" or size is not None:
            raise ValueError("side= makes PNG samples only, without size=")
        return _png(side)
    data = _SAMPLES[format]
    if size is None or size == len(data):
        return data
    if format != "jpeg":
        raise ValueError("only JPEG samples can be padded to a size")
    padding = size - len(data)
    if padding < 4:
        raise ValueError(f"a JPEG sample is at least {len(data) + 4} bytes")
    segments = []
    while padding:
        # Never leave a remainder too small to hold a segment header of its own.
        chunk = min(padding, _COM_MAX_DATA + 4)
        if 0 < padding - chunk < 4:
            chunk -= 4
        segments.append(_COM_MARKER + (chunk - 2).to_bytes(2, "big") + bytes(chunk - 4))
        padding -= chunk
    return data[:_JFIF_HEADER_END] + b"".join(segments) + data[_JFIF_HEADER_END:]


def _png(side: int) -> bytes:
    """An RGB PNG, side x side: a gradient under a grid whose pitch depends on the side,
    so that two sides make two different pictures, also once scaled alike."""
    if not 1 <= side <= 8192:
        raise ValueError(f"side must be 1 to 8192 pixels, not {side}")
    pitch = 8 + side % 23
    rows = bytearray()
    for y in range(side):
        rows.append(0)  # filter: none
        for x in range(side):
            line = 255 if (x // pitch + y // pitch) % 2 else 0
            rows += bytes((x * 255 // side, y * 255 // side, line))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows), 6))
        + chunk(b"IEND", b"")
    )
