"""read_header: an image's type, stored size and orientation from its first bytes, without Pillow."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, features

from kontext_s3.image_header import HEADER_BYTES, ImageHeader, read_header

ROOT = Path(__file__).resolve().parents[2]
SIZE = (301, 203)  # odd and unequal, so an off-by-one or a swap shows
AVIF = pytest.mark.skipif(not features.check("avif"), reason="this Pillow cannot write AVIF")


def encode(fmt: str, orientation: int | None = None, size: tuple[int, int] = SIZE, **options: Any) -> bytes:
    image = Image.new("RGB", size, (200, 40, 40))
    if orientation is not None:
        exif = image.getexif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def tiff(order: str, orientation: int, field_type: int = 3) -> bytes:
    """A TIFF header whose IFD0 holds an unrelated tag, then the orientation."""
    o = "<" if order == "II" else ">"
    value = struct.pack(o + "HH", orientation, 0) if field_type == 3 else struct.pack(o + "I", orientation)
    entries = struct.pack(o + "HHI4s", 0x010F, 2, 4, b"Cam\0") + struct.pack(o + "HHI", 0x0112, field_type, 1) + value
    return order.encode() + struct.pack(o + "HIH", 42, 8, 2) + entries + b"\0\0\0\0"


def with_app1(jpeg: bytes, payload: bytes) -> bytes:
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I", 8 + len(body)) + kind + body


def full_box(kind: bytes, *payload: bytes, version: int = 0, flags: int = 0) -> bytes:
    return box(kind, bytes([version]) + flags.to_bytes(3, "big"), *payload)


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    return box(b"ftyp", major, b"\0\0\0\0", *compatible)


def ispe(width: int, height: int) -> bytes:
    return full_box(b"ispe", struct.pack(">II", width, height))


def heif(brands: bytes, properties: list[bytes], associations: dict[int, list[int]] | None, version: int = 0, flags: int = 0) -> bytes:
    """ftyp, then meta with item 1 primary and ipco holding ``properties``, then an mdat as real files have."""
    meta = [full_box(b"hdlr", b"\0" * 4, b"pict", b"\0" * 13)]
    ipma = b""
    if associations is not None:
        meta.append(full_box(b"pitm", struct.pack(">H", 1)))
        entries = b"".join(
            (struct.pack(">I" if version else ">H", item) + bytes([len(indices)]))
            + b"".join(struct.pack(">H" if flags & 1 else ">B", 0x8000 | i if flags & 1 else 0x80 | i) for i in indices)
            for item, indices in associations.items()
        )
        ipma = full_box(b"ipma", struct.pack(">I", len(associations)), entries, version=version, flags=flags)
    meta.append(box(b"iprp", box(b"ipco", *properties), ipma))
    return brands + full_box(b"meta", *meta) + box(b"mdat", b"\0" * 64)


# A grid image as phones write them: tiles first in ipco, the primary (grid) item's own size and rotation later.
GRID = heif(
    ftyp(b"heic", b"mif1", b"heic"),
    [box(b"hvcC", b"\0" * 23), ispe(512, 512), ispe(4032, 3024), full_box(b"colr", b"nclx"), box(b"irot", b"\x03")],
    {2: [1, 2], 3: [1, 2], 1: [3, 4, 5]},
)


@pytest.mark.parametrize(
    ("fmt", "options", "content_type"),
    [
        ("JPEG", {}, "image/jpeg"),
        ("JPEG", {"progressive": True}, "image/jpeg"),  # SOF2, not SOF0
        ("PNG", {}, "image/png"),
        ("GIF", {}, "image/gif"),
        ("WEBP", {}, "image/webp"),  # VP8
        ("WEBP", {"lossless": True}, "image/webp"),  # VP8L
        ("WEBP", {"icc_profile": b"\0" * 128}, "image/webp"),  # VP8X
        pytest.param("AVIF", {}, "image/avif", marks=AVIF),
    ],
)
def test_type_and_size_of_images_pillow_writes(fmt: str, options: dict[str, Any], content_type: str) -> None:
    header = read_header(encode(fmt, **options))
    assert header == ImageHeader(content_type, *SIZE, orientation=1)
    assert header.upright_size == SIZE


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", pytest.param("AVIF", marks=AVIF)])  # AVIF turns it into irot/imir
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_read_and_quarter_turns_swap_the_upright_size(fmt: str, orientation: int) -> None:
    header = read_header(encode(fmt, orientation))
    assert header is not None
    assert (header.width, header.height, header.orientation) == (*SIZE, orientation)
    assert header.upright_size == (SIZE[::-1] if orientation >= 5 else SIZE)


@pytest.mark.parametrize("order", ["II", "MM"])
@pytest.mark.parametrize("field_type", [3, 4])
def test_jpeg_exif_in_either_byte_order_and_as_short_or_long(order: str, field_type: int) -> None:
    header = read_header(with_app1(encode("JPEG"), b"Exif\0\0" + tiff(order, 8, field_type)))
    assert header == ImageHeader("image/jpeg", *SIZE, orientation=8)


@pytest.mark.parametrize(
    "app1",
    [
        b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>",  # XMP, not Exif
        b"Exif\0\0" + tiff("II", 9),  # out of range
        b"Exif\0\0" + tiff("MM", 6)[:20],  # IFD cut short
        b"Exif\0\0XX*\0\x08\0\0\0",  # unknown byte order
        b"Exif\0\0II*\0\xff\xff\0\0",  # IFD0 beyond the segment
    ],
)
def test_unusable_app1_segments_leave_the_orientation_at_1(app1: bytes) -> None:
    assert read_header(with_app1(encode("JPEG"), app1)) == ImageHeader("image/jpeg", *SIZE, orientation=1)


def test_webp_exif_with_the_jpeg_prefix_some_writers_keep() -> None:
    data = encode("WEBP", 3)
    at = data.index(b"EXIF")
    size = struct.unpack_from("<I", data, at + 4)[0] + 6
    prefixed = data[:at] + b"EXIF" + struct.pack("<I", size) + b"Exif\0\0" + data[at + 8 :]
    assert (read_header(prefixed) or ImageHeader("", None, None)).orientation == 3


def test_a_frame_header_beyond_header_bytes_gives_the_type_without_a_size() -> None:
    data = encode("JPEG", 6)
    at = data.index(b"\xff\xdb")  # after the Exif APP1, a 64 KiB APP2 (an ICC profile) pushes SOF0 out of reach
    data = data[:at] + b"\xff\xe2\xff\xff" + b"\0" * 65533 + data[at:]
    assert read_header(data) == ImageHeader("image/jpeg", None, None, orientation=6)
    assert read_header(data[:HEADER_BYTES]) == read_header(data)


def test_heic_grid_reports_the_primary_items_size_and_rotation_not_the_first_tiles() -> None:
    header = read_header(GRID)
    assert header == ImageHeader("image/heic", 4032, 3024, orientation=6)
    assert header.upright_size == (3024, 4032)


@pytest.mark.parametrize(("version", "flags"), [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_ipma_with_wide_item_ids_and_wide_property_indices(version: int, flags: int) -> None:
    data = heif(ftyp(b"heic"), [ispe(512, 512), ispe(64, 48)], {2: [1], 1: [2]}, version=version, flags=flags)
    assert read_header(data) == ImageHeader("image/heic", 64, 48, orientation=1)


def test_minimal_heif_without_item_associations_takes_the_first_ispe() -> None:
    data = ftyp(b"mif1", b"mif1", b"heic") + full_box(b"meta", box(b"iprp", box(b"ipco", ispe(640, 480), ispe(1, 1))))
    assert read_header(data) == ImageHeader("image/heic", 640, 480, orientation=1)


def test_box_sizes_of_0_and_1_are_understood() -> None:
    large = struct.pack(">I4sQ", 1, b"free", 16 + 5) + b"12345"  # 64-bit largesize
    data = ftyp(b"avif") + large + full_box(b"meta", box(b"iprp", box(b"ipco", ispe(7, 9))))
    assert read_header(data) == ImageHeader("image/avif", 7, 9)
    to_end = ftyp(b"avif") + b"\0\0\0\0meta" + b"\0" * 4 + box(b"iprp", box(b"ipco", ispe(7, 9)))  # size 0: to the end
    assert read_header(to_end) == ImageHeader("image/avif", 7, 9)


@pytest.mark.parametrize(
    ("transforms", "orientation"),
    [
        # (property, its byte) in ipma order; the expected EXIF orientation of the same display
        ([(b"irot", 1)], 8),
        ([(b"irot", 2)], 3),
        ([(b"irot", 3)], 6),
        ([(b"imir", 1)], 2),  # mode 1: left and right swap
        ([(b"imir", 0)], 4),  # mode 0: top and bottom swap
        ([(b"irot", 1), (b"imir", 0)], 5),
        ([(b"irot", 3), (b"imir", 0)], 7),
        ([(b"imir", 0), (b"irot", 1)], 7),  # mirrored first, then turned
        ([(b"imir", 1), (b"irot", 1)], 5),
    ],
)
def test_heif_irot_and_imir_become_an_exif_orientation(transforms: list[tuple[bytes, int]], orientation: int) -> None:
    properties = [ispe(40, 30)] + [box(kind, bytes([value])) for kind, value in transforms]
    data = heif(ftyp(b"heic"), properties, {1: list(range(1, len(properties) + 1))})
    assert read_header(data) == ImageHeader("image/heic", 40, 30, orientation)


@pytest.mark.parametrize(
    ("brands", "content_type"),
    [
        (ftyp(b"heic", b"mif1", b"heic"), "image/heic"),
        (ftyp(b"mif1", b"mif1", b"heic"), "image/heic"),
        (ftyp(b"msf1", b"msf1", b"hevc"), "image/heic"),
        (ftyp(b"mif1", b"mif1", b"miaf"), "image/heif"),
        (ftyp(b"avif", b"avif", b"mif1", b"miaf"), "image/avif"),
        (ftyp(b"mif1", b"mif1", b"avif"), "image/avif"),
        (ftyp(b"avif", b"heic"), "image/avif"),  # the major brand decides
        (ftyp(b"heic", b"avif"), "image/heic"),
        (ftyp(b"isom", b"isom", b"mp41"), None),  # a video, not an image
        (box(b"free") + ftyp(b"heic"), None),  # ftyp must come first
    ],
)
def test_the_brands_decide_heic_heif_or_avif(brands: bytes, content_type: str | None) -> None:
    header = read_header(brands)
    assert (header and header.content_type) == content_type
    if header is not None:
        assert (header.width, header.orientation, header.upright_size) == (None, 1, None)


def test_heic_written_by_pillow_heif() -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    assert read_header(encode("HEIF", size=(300, 202))) == ImageHeader("image/heic", 300, 202, orientation=1)
    # An odd side is stored as the coded size, one more, cropped back by a clean-aperture box this reader does
    # not apply: the submit function records a HEIC's size from the decoded image, which it always converts.
    assert read_header(encode("HEIF")) == ImageHeader("image/heic", SIZE[0] + 1, SIZE[1] + 1, orientation=1)


@pytest.mark.parametrize("data", [b"", b"\xff\xd8", b"hello world", b"RIFF\0\0\0\0WAVEfmt ", b"\0\0\0\x08ftyp", b"\x89PNG\r\n\x1a\n"])
def test_what_is_not_a_recognised_image_or_too_short_to_tell(data: bytes) -> None:
    header = read_header(data)
    assert header is None or (header.width is None and header.upright_size is None)


def samples() -> list[bytes]:
    found = [encode("JPEG", 6), encode("PNG", 3), encode("GIF"), encode("WEBP", 5), encode("WEBP", lossless=True), GRID]
    return [*found, encode("AVIF", 7)] if features.check("avif") else found


@pytest.mark.parametrize("data", samples(), ids=lambda d: d[:12].hex())
def test_every_prefix_is_read_without_raising_and_never_with_a_wrong_size(data: bytes) -> None:
    full = read_header(data)
    assert full is not None and full.width is not None
    for end in range(len(data)):
        header = read_header(data[:end])
        if header is not None:
            assert header.content_type == full.content_type
            assert header.width in (None, full.width) and header.height in (None, full.height)
            assert header.orientation in (1, full.orientation)
            if header.width is not None and full.content_type in ("image/jpeg", "image/heic", "image/avif"):
                assert header.orientation == full.orientation  # these store the orientation before the size


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(samples()), st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8))
def test_corrupted_headers_never_raise(data: bytes, flips: list[tuple[int, int]]) -> None:
    corrupted = bytearray(data)
    for at, value in flips:
        corrupted[at % len(corrupted)] = value
    header = read_header(bytes(corrupted))
    assert header is None or 1 <= header.orientation <= 8


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\0\0\0\0WEBP", b"\0\0\0\x18ftypheic\0\0\0\0mif1"]),
    st.binary(max_size=512),
)
def test_garbage_after_a_signature_never_raises(signature: bytes, rest: bytes) -> None:
    read_header(signature + rest)


def test_importing_the_module_does_not_import_pillow() -> None:
    code = "import sys; import kontext_s3.image_header; assert 'PIL' not in sys.modules, sorted(sys.modules)"
    env = {**os.environ, "PYTHONPATH": "layers/shared"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
