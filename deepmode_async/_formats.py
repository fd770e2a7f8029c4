"""Image formats the API accepts, recognised by content rather than by file name.

The client checks uploads with this before spending credits, and the mock server
rejects with it what the real API rejects, so both agree on what an image is.
"""

from __future__ import annotations

from typing import Final, Literal

ImageFormat = Literal["jpeg", "png", "webp", "heic"]

#: How many leading bytes `sniff_image_format` needs to decide.
SNIFF_BYTES: Final = 16

ACCEPTED_FORMATS: Final = "jpg, jpeg, png, webp or heic"

# ISO base media file brands of HEIF/HEIC stills and sequences ("ftyp" box, bytes 8-12).
_HEIF_BRANDS: Final = frozenset(
    {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
)


def sniff_image_format(head: bytes) -> ImageFormat | None:
    """Name the accepted image format that `head` (the first bytes of a file) starts, if any."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "heic"
    return None
