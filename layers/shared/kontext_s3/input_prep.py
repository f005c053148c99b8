"""Prepared inputs: the upload as fal should see it, when the upload as stored would mislead the model.

Phones store photos sideways with an EXIF orientation that viewers apply and
fal's runner may not, and cameras store HEIC/HEIF or AVIF, which fal is not
documented to take. Such an upload gets a prepared copy (turned upright,
converted to JPEG, or PNG when it has transparency) written beside its
outputs; fal is given that copy, and the manifest says what changed and why.

Whether an upload needs this is decided from its header alone
(:mod:`kontext_s3.image_header`); Pillow, and pillow-heif for HEIC/HEIF, are
imported only when one does, so the common path's cold start never pays for them.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kontext_s3.image_header import ImageHeader

#: What fal takes as it is; everything else in :data:`CONVERTED` is converted.
TAKEN = {"image/jpeg", "image/png", "image/webp", "image/gif"}
CONVERTED = {"image/heic", "image/heif", "image/avif"}
SUPPORTED = "JPEG, PNG, WebP, GIF, HEIC/HEIF or AVIF"
_NAMES = {"image/heic": "HEIC", "image/heif": "HEIF", "image/avif": "AVIF"}


class UnreadableImage(ValueError):
    """The bytes claim an image format but do not decode as one."""


@dataclass(frozen=True)
class Prepared:
    data: bytes
    content_type: str
    extension: str
    width: int
    height: int


def changes_needed(header: ImageHeader) -> list[dict[str, str]]:
    """What must change before fal sees the upload (``[]`` for nearly every upload), each with its reason."""
    changes = []
    if header.content_type in CONVERTED:
        name = _NAMES[header.content_type]
        changes.append({"change": "converted", "why": f"{name} is not among the formats fal takes (JPEG, PNG, WebP, GIF)"})
    if header.orientation != 1:
        changes.append({"change": "turned upright", "why": f"EXIF orientation {header.orientation}: viewers turn it, the model would not"})
    return changes


#: One image read, decoded, turned, encoded and written at a time per execution environment: a decoded photo is
#: width x height x 3-4 bytes, more than once while it is turned, and a batch's records run on ten threads of one
#: 512 MB function. The whole of it is under the lock, the read and the write included (see ``input_image``).
_ONE_AT_A_TIME = threading.Lock()
#: What a decode is left of the invocation at least (or half of what remains, in a shorter invocation): less, and the
#: image waits for a later delivery. A 25 MP photo decodes, turns and encodes in a second or two.
DECODE_RESERVE_SECONDS = 15.0
#: A progressive photo has about 10 scans; each one is a pass over the whole image. Thousands of them hold a decoder
#: for minutes (a hostile file can repeat its last scan): libjpeg-turbo's own tools stop at 500, we at far fewer.
MAX_JPEG_SCANS = 100


class NoTimeToDecode(RuntimeError):
    """Too little of the invocation is left to decode safely: transient, the next delivery tries again."""


@contextmanager
def one_at_a_time(deadline: float) -> Iterator[None]:
    """The decoding turn, waited for no longer than the invocation allows (the batch's other records go on)."""
    remaining = deadline - time.monotonic()
    wait = remaining - min(DECODE_RESERVE_SECONDS, remaining / 2)
    if wait <= 0 or not _ONE_AT_A_TIME.acquire(timeout=wait):
        raise NoTimeToDecode("too little time was left in this invocation to prepare the image; it is tried again")
    try:
        yield
    finally:
        _ONE_AT_A_TIME.release()


def prepare(data: bytes, header: ImageHeader, *, max_pixels: int) -> Prepared:
    """Decode, turn upright and re-encode (JPEG, or PNG when transparent); raises :class:`UnreadableImage`.

    The caller holds :func:`one_at_a_time`. ``max_pixels`` is checked again on the decoder's own reading of the size,
    before any pixel is decoded: the header reader may not have found the size in the bytes it was given.
    """
    from PIL import Image, ImageOps  # noqa: PLC0415 - only for the uploads that need it

    if header.content_type in ("image/heic", "image/heif"):
        import pillow_heif  # noqa: PLC0415 - only for HEIC/HEIF uploads

        pillow_heif.register_heif_opener()
    if header.content_type == "image/jpeg":
        # Each scan starts with an SOS marker (FF DA); entropy-coded data stuffs every FF, so none hides in it.
        scans = data.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise UnreadableImage(
                f"the JPEG has {scans} scans, more than the {MAX_JPEG_SCANS} that are decoded (a progressive photo has "
                "about 10): it would take too long to prepare; save it again as an ordinary JPEG"
            )
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > max_pixels:
                raise UnreadableImage(
                    f"the image is {opened.width}x{opened.height} = {opened.width * opened.height} pixels; "
                    f"the limit is {max_pixels} (MAX_INPUT_PIXELS)"
                )
            image: Any = ImageOps.exif_transpose(opened)  # applies the orientation and drops the tag
            if image is not opened:
                opened.close()  # the decoded original is no longer needed while the turned copy is encoded
            transparent = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
            out = io.BytesIO()
            mode, fmt, options = ("RGBA", "PNG", {}) if transparent else ("RGB", "JPEG", {"quality": 95, "subsampling": 0})
            (image if image.mode == mode else image.convert(mode)).save(out, fmt, **options)
            width, height = image.size
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(f"the image is too large to decode safely: {exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's ways of saying "not a valid image"
        raise UnreadableImage(f"the {header.content_type} image could not be decoded: {exc}") from exc
    content_type, extension = ("image/png", "png") if transparent else ("image/jpeg", "jpg")
    return Prepared(out.getvalue(), content_type, extension, width, height)
