"""What kind of image some bytes are, from their first bytes (never from a name or a Content-Type)."""

from __future__ import annotations

_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"GIF87a", 0, "image/gif"),
    (b"GIF89a", 0, "image/gif"),
    (b"WEBP", 8, "image/webp"),
)
#: Bytes :func:`sniff_image` needs to decide.
SNIFF_BYTES = 16
#: ``output_format`` values of the model and the type their bytes must have.
OUTPUT_FORMAT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}


def sniff_image(first_bytes: bytes) -> str | None:
    """``image/jpeg``, ``image/png``, ``image/webp``, ``image/gif``, or ``None`` when the bytes are none of these."""
    for signature, offset, content_type in _SIGNATURES:
        if first_bytes[offset : offset + len(signature)] == signature:
            if content_type == "image/webp" and not first_bytes.startswith(b"RIFF"):
                continue
            return content_type
    return None
