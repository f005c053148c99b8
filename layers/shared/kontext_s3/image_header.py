"""An image's type, stored size and EXIF orientation, from its first bytes alone.

Pure Python on purpose: it runs on the Lambda cold path after one ranged GET of :data:`HEADER_BYTES`,
where importing Pillow would cost more than the whole read. Every read is a slice (slices never raise,
and ``int.from_bytes(b"")`` is 0), and every loop moves forward by at least one header, so garbage or
truncated input ends in ``None`` or in a header without a size, never in an exception or a long loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from kontext_s3.image_types import sniff_image

#: Bytes callers fetch; :func:`read_header` looks no further, so a whole file and a ranged GET agree.
HEADER_BYTES = 65536
#: How far a second read looks for a size the first did not reach (a JPEG's frame header after large EXIF, ICC or
#: XMP segments); past it, the image is refused rather than sent unmeasured.
SIZE_SCAN_BYTES = 1024 * 1024

_ORIENTATION_TAG = 0x0112
_BYTE_ORDERS: dict[bytes, Literal["little", "big"]] = {b"II": "little", b"MM": "big"}
_AVIF_BRANDS = {b"avif", b"avis"}
_HEIC_BRANDS = {b"heic", b"heix", b"hevc", b"heim", b"heis", b"hevm", b"hevs"}
_HEIF_BRANDS = {b"mif1", b"msf1"}
# HEIF's irot turns anticlockwise by quarter turns (index), then imir mode 0 mirrors top to bottom:
# the EXIF orientations that ask for the same display.
_IROT_ORIENTATIONS = (1, 8, 3, 6)
_IMIR_ORIENTATIONS = (4, 5, 2, 7)


@dataclass(frozen=True)
class ImageHeader:
    content_type: str
    #: As stored, before any orientation is applied; ``None`` when the size lies beyond the bytes given.
    width: int | None
    height: int | None
    #: EXIF orientation 1..8; 1 when absent, unreadable or beyond the bytes given.
    orientation: int = 1

    @property
    def upright_size(self) -> tuple[int, int] | None:
        """The size as displayed: orientations 5..8 turn the image a quarter, swapping width and height."""
        if self.width is None or self.height is None:
            return None
        return (self.height, self.width) if self.orientation >= 5 else (self.width, self.height)


def read_header(first_bytes: bytes, *, limit: int = HEADER_BYTES) -> ImageHeader | None:
    """The header of a JPEG, PNG, GIF, WebP, HEIC/HEIF or AVIF image, or ``None`` when the bytes are none of these."""
    data = bytes(first_bytes[:limit])
    content_type = sniff_image(data)
    if content_type == "image/jpeg":
        return _jpeg(data)
    if content_type == "image/png":
        width, height = (_be(data[16:20]), _be(data[20:24])) if data[12:16] == b"IHDR" and len(data) >= 24 else (None, None)
        return ImageHeader(content_type, width, height, _png_orientation(data))
    if content_type == "image/gif":
        return ImageHeader(content_type, *((_le(data[6:8]), _le(data[8:10])) if len(data) >= 10 else (None, None)))
    if content_type == "image/webp":
        return _webp(data)
    return _bmff(data)


def _be(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


def _le(raw: bytes) -> int:
    return int.from_bytes(raw, "little")


def _tiff_orientation(tiff: bytes) -> int:
    order = _BYTE_ORDERS.get(tiff[:2])
    if order is None or int.from_bytes(tiff[2:4], order) != 42:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        if int.from_bytes(tiff[entry : entry + 2], order) == _ORIENTATION_TAG:
            # A SHORT sits left-justified in the 4-byte value field; some writers use a LONG.
            size = 2 if int.from_bytes(tiff[entry + 2 : entry + 4], order) == 3 else 4
            value = int.from_bytes(tiff[entry + 8 : entry + 8 + size], order)
            return value if 1 <= value <= 8 else 1
    return 1


def _jpeg(data: bytes) -> ImageHeader:
    width = height = None
    orientation = 1
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte: the marker code is in the next byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers carry no length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # entropy-coded data follows, and the frame header comes before it
            break
        length = _be(data[pos + 2 : pos + 4])
        if length < 2:
            break
        segment = data[pos + 4 : pos + 2 + length]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if len(segment) >= 5:
                # A height of 0 is defined later by a DNL marker, after the scan we never read.
                height, width = _be(segment[1:3]) or None, _be(segment[3:5])
            break  # APP segments precede the frame header, so there is nothing more to learn
        if marker == 0xE1 and segment.startswith(b"Exif\0\0") and orientation == 1:
            orientation = _tiff_orientation(segment[6:])
        pos += 2 + length
    return ImageHeader("image/jpeg", width, height, orientation)


def _png_orientation(data: bytes) -> int:
    pos = 8
    while pos + 8 <= len(data):
        length, kind = _be(data[pos : pos + 4]), data[pos + 4 : pos + 8]
        if kind == b"eXIf":
            return _tiff_orientation(data[pos + 8 : pos + 8 + length])
        if kind in (b"IDAT", b"IEND"):  # eXIf must precede the image data
            break
        pos += 12 + length
    return 1


def _webp(data: bytes) -> ImageHeader:
    width = height = None
    orientation = 1
    pos = 12
    while pos + 8 <= len(data):
        kind, size = data[pos : pos + 4], _le(data[pos + 4 : pos + 8])
        body = data[pos + 8 : pos + 8 + size]
        if kind == b"VP8X" and len(body) >= 10:  # the canvas; later chunks describe frames
            width, height = _le(body[4:7]) + 1, _le(body[7:10]) + 1
        elif kind == b"VP8 " and width is None and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":
            width, height = _le(body[6:8]) & 0x3FFF, _le(body[8:10]) & 0x3FFF
        elif kind == b"VP8L" and width is None and len(body) >= 5 and body[0] == 0x2F:
            bits = _le(body[1:5])
            width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        elif kind == b"EXIF":
            # The spec says a bare TIFF header, but some writers keep the JPEG APP1 prefix.
            orientation = _tiff_orientation(body.removeprefix(b"Exif\0\0"))
        pos += 8 + size + (size & 1)  # chunks are padded to an even length
    return ImageHeader("image/webp", width, height, orientation)


def _boxes(data: bytes, start: int, end: int, clip: bool = True) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of the ISO BMFF boxes in ``data[start:end]``, clipped to the bytes given unless told."""
    end = min(end, len(data))
    while start + 8 <= end:
        size, kind, header = _be(data[start : start + 4]), data[start + 4 : start + 8], 8
        if size == 1:
            size, header = _be(data[start + 8 : start + 16]), 16
        elif size == 0:  # the last box runs to the end of its container
            size = end - start
        if size < header:  # corrupt, and a box that does not advance would loop forever
            return
        yield kind, start + header, min(start + size, end) if clip else start + size
        start += size


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    return next(((s, e) for k, s, e in _boxes(data, start, end) if k == kind), None)


def _primary_properties(data: bytes, meta: tuple[int, int], iprp: tuple[int, int]) -> list[int]:
    """1-based ``ipco`` indices of the primary item's properties; [] when ``pitm`` or ``ipma`` is missing."""
    pitm, ipma = _child(data, meta[0] + 4, meta[1], b"pitm"), _child(data, *iprp, b"ipma")
    if pitm is None or ipma is None:
        return []
    id_size = 2 if data[pitm[0] : pitm[0] + 1] == b"\0" else 4
    primary = _be(data[pitm[0] + 4 : pitm[0] + 4 + id_size])
    s, e = ipma
    id_size = 2 if data[s : s + 1] == b"\0" else 4
    index_size, mask = (2, 0x7FFF) if _be(data[s + 3 : s + 4]) & 1 else (1, 0x7F)  # the top bit marks "essential"
    pos = s + 8
    for _ in range(_be(data[s + 4 : s + 8])):
        if pos + id_size + 1 > e:
            break
        item, count = _be(data[pos : pos + id_size]), data[pos + id_size]
        pos += id_size + 1
        listed = range(pos, pos + count * index_size, index_size)
        if item == primary:  # a list cut short could lack a property that matters: none rather than a wrong one
            return [_be(data[p : p + index_size]) & mask for p in listed] if listed.stop <= e else []
        pos = listed.stop
    return []


def _brand_type(brands: list[bytes]) -> str | None:
    for brand in brands:  # the major brand first, then the compatible ones in the order given
        if brand in _AVIF_BRANDS:
            return "image/avif"
        if brand in _HEIC_BRANDS:
            return "image/heic"
    # Only the generic HEIF structure brands: the codec is unknown (or neither HEVC nor AV1).
    return "image/heif" if _HEIF_BRANDS.intersection(brands) else None


def _bmff(data: bytes) -> ImageHeader | None:
    if data[4:8] != b"ftyp":
        return None
    _, start, end = next(_boxes(data, 0, len(data)), (b"", 0, 0))
    content_type = _brand_type([data[i : i + 4] for i in (start, *range(start + 8, end - 3, 4))])
    if content_type is None:
        return None
    width = height = mode = None
    angle, mirrored_first = 0, False
    meta = next(((s, e) for k, s, e in _boxes(data, 0, len(data), clip=False) if k == b"meta"), None)
    iprp = meta and _child(data, meta[0] + 4, meta[1], b"iprp")  # meta is a full box: skip version and flags
    ipco = iprp and _child(data, *iprp, b"ipco")
    if meta and iprp and ipco:
        properties = list(_boxes(data, *ipco))
        # The first ispe may be a grid tile's or a thumbnail's: prefer the primary item's own properties.
        chosen = [properties[i - 1] for i in _primary_properties(data, meta, iprp) if 0 < i <= len(properties)]
        # Without pitm and ipma, take the first ispe, unless they may only lie beyond the bytes given.
        for kind, s, e in chosen or (properties if meta[1] <= len(data) else []):
            if kind == b"ispe" and width is None and e - s >= 12:
                width, height = _be(data[s + 4 : s + 8]), _be(data[s + 8 : s + 12])
            elif kind == b"irot" and e > s:
                angle, mirrored_first = data[s] & 3, mode is not None
            elif kind == b"imir" and e > s:
                mode = data[s] & 1
    # Properties apply in order, and mirroring then turning by a equals turning by -a then mirroring.
    angle = -angle % 4 if mirrored_first else angle
    if mode == 1:  # a left-right mirror is a half turn and a top-bottom mirror
        angle, mode = (angle + 2) % 4, 0
    return ImageHeader(content_type, width, height, (_IROT_ORIENTATIONS if mode is None else _IMIR_ORIENTATIONS)[angle])


def gif_canvas(read: Callable[[int], bytes]) -> tuple[int, int]:
    """The size a GIF decodes at: its logical screen, or larger where a frame reaches past it.

    Reads the block structure from ``read`` (a file's ``read``), skipping each frame's compressed data sub-block by
    sub-block, so memory stays at one sub-block whatever the file's size. Stops at the trailer or the end of data.
    """
    screen = read(13)
    width, height = _le(screen[6:8]), _le(screen[8:10])
    if len(screen) == 13 and screen[10] & 0x80:
        read(3 << ((screen[10] & 0x07) + 1))  # the global colour table
    while True:
        kind = read(1)
        if kind == b"\x2c":  # an image descriptor: left, top, width, height, flags
            frame = read(9)
            if len(frame) < 9:
                break
            width = max(width, _le(frame[0:2]) + _le(frame[4:6]))
            height = max(height, _le(frame[2:4]) + _le(frame[6:8]))
            if frame[8] & 0x80:
                read(3 << ((frame[8] & 0x07) + 1))  # the frame's local colour table
            read(1)  # LZW minimum code size
        elif kind == b"\x21":  # an extension: its label, then sub-blocks
            read(1)
        else:  # the trailer (0x3B), the end of the data, or garbage
            break
        if not _skip_sub_blocks(read):
            break
    return width, height


def _skip_sub_blocks(read: Callable[[int], bytes]) -> bool:
    """Skip data sub-blocks up to their terminator; False when the data ends first."""
    while True:
        length = read(1)
        if not length:
            return False
        if length == b"\x00":
            return True
        if len(read(length[0])) < length[0]:
            return False
