"""Object tags <-> edit fields, both ways (the upload side and the submit side share this).

S3 allows at most 10 tags per object, keys up to 128 and values up to 256
characters, from letters, digits, spaces and ``+ - = . _ : / @``. A prompt with
a comma, an apostrophe or a question mark cannot be a tag value as it is, so
there are two forms:

**Plain form** (what a person types): one tag per field, named after the field::

    prompt=Make the sky purple   seed=42   aspect_ratio=16:9

Used when the prompt only holds ASCII letters, digits, spaces and
``+ - = . _ : / @``, fits in 256 characters and has no leading or trailing
space. Other fields are always plain (numbers, ``true``/``false``, enum values).

**Packed form** (``kx1``, for any other prompt): every field set goes into one
JSON object (compact, keys sorted) that is turned into bytes by the smallest of
three codecs (first byte says which):

* ``0`` UTF-8;
* ``1`` raw DEFLATE of the UTF-8 (ordinary text);
* ``2`` a bit-packing of code points: ``0``+7 bits below U+0080, ``10``+16 bits in
  the rest of the BMP, ``11``+20 bits above (random CJK, emoji, rare scripts).

The bytes are base64url (no padding) and cut into pieces of 380 characters.
Piece ``i`` (0-9) becomes one tag whose **key** is ``kx<i>.`` plus the first 124
characters of the piece and whose **value** is the other 256: keys carry data
too, because values alone (10 x 256 characters) cannot hold 1,000 arbitrary
characters. Capacity is 3,800 base64 characters, 2,850 bytes: any prompt of
1,000 characters fits, together with every other field when its characters are
in the BMP (every living script, CJK included), or with up to three other
fields when every character is an emoji or another astral character.

Decoding merges both forms; a field given twice is refused; tags that are
neither fields nor ``kx`` pieces (a user's own ``owner=...``) are ignored.
Decoding is bounded: the packed document inflates to at most
``MAX_DOCUMENT_BYTES``, must be a flat JSON object of text values, and every
value must be valid Unicode; anything else is an invalid tag, never a fault.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import zlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from kontext_s3.model_schema import TAG_FIELDS

MAX_TAGS = 10
MAX_KEY_CHARS = 128
MAX_VALUE_CHARS = 256

PIECE_PREFIX = "kx"
_PIECE_KEY = re.compile(r"^kx([0-9])\.(.*)$", re.DOTALL)
_KEY_DATA_CHARS = MAX_KEY_CHARS - len("kx0.")
PIECE_CHARS = _KEY_DATA_CHARS + MAX_VALUE_CHARS
PACKED_CAPACITY_CHARS = MAX_TAGS * PIECE_CHARS
#: The most a packed document may inflate to: every field at its longest, with room to spare.
MAX_DOCUMENT_BYTES = 64 * 1024

_PLAIN_SAFE = re.compile(r"^[A-Za-z0-9+\-=._:/@](?:[A-Za-z0-9 +\-=._:/@]*[A-Za-z0-9+\-=._:/@])?$")

_CODEC_UTF8 = 0
_CODEC_DEFLATE = 1
_CODEC_CODEPOINTS = 2


class TagEncodingError(ValueError):
    """The fields cannot be written as tags, or the tags cannot be read back."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def is_plain_safe(text: str) -> bool:
    """True when ``text`` can be a tag value exactly as it is."""
    return len(text) <= MAX_VALUE_CHARS and bool(_PLAIN_SAFE.match(text))


def format_value(value: Any) -> str:
    """The tag text of one field value (``true``/``false`` for booleans, as the model's JSON)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if hasattr(value, "value"):  # enums
        return str(value.value)
    return str(value)


def encode_tags(fields: Mapping[str, Any], *, reserved_tags: int = 0) -> dict[str, str]:
    """Tags for ``fields`` (a subset of the model's tag fields), within ``MAX_TAGS - reserved_tags``.

    ``reserved_tags`` leaves room for tags of the user's own that go on the same object.
    """
    unknown = sorted(set(fields) - set(TAG_FIELDS))
    if unknown:
        raise TagEncodingError(f"not a field of the model: {', '.join(unknown)}", field=unknown[0])
    text_fields = {name: format_value(value) for name, value in fields.items() if value is not None}
    budget = MAX_TAGS - reserved_tags
    prompt = text_fields.get("prompt")
    if prompt is not None and not is_plain_safe(prompt):
        tags = _packed_tags(text_fields)
    else:
        bad = [name for name, text in text_fields.items() if not is_plain_safe(text)]
        tags = _packed_tags(text_fields) if bad else dict(text_fields)
    if len(tags) > budget:
        raise TagEncodingError(
            f"the edit needs {len(tags)} tags but only {budget} are free "
            f"(S3 allows {MAX_TAGS} per object); shorten the prompt or set fewer fields",
            field="prompt",
        )
    return tags


def decode_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """The field texts held by ``tags``: plain field tags merged with the packed pieces."""
    fields: dict[str, str] = {name: value for name, value in tags.items() if name in TAG_FIELDS}
    pieces: dict[int, str] = {}
    for key, value in tags.items():
        match = _PIECE_KEY.match(key)
        if match:
            pieces[int(match.group(1))] = match.group(2) + value
    if not pieces:
        return fields
    packed = _unpack(pieces)
    for name, value in packed.items():
        if name in fields:
            raise TagEncodingError(f"{name} is given both as its own tag and in the packed kx tags", field=name)
        fields[name] = value
    return fields


def tagging_header(tags: Mapping[str, str]) -> str:
    """The ``Tagging=`` / ``x-amz-tagging`` string of PutObject (URL-query encoded, spaces as ``%20``)."""
    return urlencode(list(tags.items()), quote_via=quote, safe="")


def parse_tagging_header(header: str) -> dict[str, str]:
    return dict(parse_qsl(header, keep_blank_values=True))


def _packed_tags(text_fields: Mapping[str, str]) -> dict[str, str]:
    document = json.dumps(dict(sorted(text_fields.items())), ensure_ascii=False, separators=(",", ":"))
    try:
        blob = _compress(document)
    except UnicodeEncodeError as exc:
        raise TagEncodingError("the prompt holds characters that are not valid Unicode text", field="prompt") from exc
    chars = base64.urlsafe_b64encode(blob).rstrip(b"=").decode("ascii")
    if len(chars) > PACKED_CAPACITY_CHARS:
        raise TagEncodingError(
            f"the prompt is too long to fit in S3 tags: it needs {len(chars)} of {PACKED_CAPACITY_CHARS} encoded characters; shorten it",
            field="prompt",
        )
    tags: dict[str, str] = {}
    for index, start in enumerate(range(0, len(chars), PIECE_CHARS)):
        piece = chars[start : start + PIECE_CHARS]
        tags[f"{PIECE_PREFIX}{index}.{piece[:_KEY_DATA_CHARS]}"] = piece[_KEY_DATA_CHARS:]
    return tags


def _unpack(pieces: Mapping[int, str]) -> dict[str, str]:
    indexes = sorted(pieces)
    if indexes != list(range(len(indexes))):
        raise TagEncodingError(f"packed kx tags are incomplete: found pieces {indexes}", field="prompt")
    chars = "".join(pieces[i] for i in indexes)
    try:
        blob = base64.urlsafe_b64decode(chars + "=" * (-len(chars) % 4))
        document = _decompress(blob)
        value = json.loads(document)
    except (binascii.Error, ValueError, zlib.error, RecursionError) as exc:
        raise TagEncodingError(f"packed kx tags cannot be decoded: {str(exc)[:200]}", field="prompt") from exc
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise TagEncodingError("packed kx tags do not hold a set of fields", field="prompt")
    for name, text in value.items():
        try:
            f"{name}{text}".encode()
        except UnicodeEncodeError as exc:
            raise TagEncodingError(f"packed kx tags hold text that is not valid Unicode (in {name[:40]!r})", field="prompt") from exc
    return {str(k): v for k, v in value.items()}


def _compress(text: str) -> bytes:
    utf8 = text.encode("utf-8")
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    candidates = [
        bytes([_CODEC_UTF8]) + utf8,
        bytes([_CODEC_DEFLATE]) + deflater.compress(utf8) + deflater.flush(),
        bytes([_CODEC_CODEPOINTS]) + _pack_codepoints(text),
    ]
    return min(candidates, key=len)


def _decompress(blob: bytes) -> str:
    if not blob:
        raise ValueError("empty")
    codec, body = blob[0], blob[1:]
    if codec == _CODEC_UTF8:
        return body.decode("utf-8")
    if codec == _CODEC_DEFLATE:
        inflater = zlib.decompressobj(-15)
        text = inflater.decompress(body, MAX_DOCUMENT_BYTES)
        if inflater.unconsumed_tail:
            raise ValueError(f"the packed document inflates to more than {MAX_DOCUMENT_BYTES} bytes")
        return text.decode("utf-8")
    if codec == _CODEC_CODEPOINTS:
        return _unpack_codepoints(body)
    raise ValueError(f"unknown codec {codec}")


def _pack_codepoints(text: str) -> bytes:
    bits = 0
    count = 0
    for char in text:
        point = ord(char)
        if 0xD800 <= point <= 0xDFFF:
            raise UnicodeEncodeError("utf-8", text, 0, 1, "lone surrogate")
        if point < 0x80:
            bits, count = (bits << 8) | point, count + 8
        elif point < 0x10000:
            bits, count = (bits << 18) | (0b10 << 16) | point, count + 18
        else:
            bits, count = (bits << 22) | (0b11 << 20) | (point - 0x10000), count + 22
    padding = -count % 8
    return (bits << padding).to_bytes((count + padding) // 8, "big")


def _unpack_codepoints(body: bytes) -> str:
    bits = int.from_bytes(body, "big")
    remaining = len(body) * 8
    chars: list[str] = []

    def take(width: int) -> int:
        nonlocal remaining
        if width > remaining:
            raise ValueError("truncated code point stream")
        remaining -= width
        return (bits >> remaining) & ((1 << width) - 1)

    # Fewer than 8 bits left can only be padding: the shortest code is 8 bits.
    while remaining >= 8:
        if take(1) == 0:
            chars.append(chr(take(7)))
        elif take(1) == 0:
            chars.append(chr(take(16)))
        else:
            chars.append(chr(take(20) + 0x10000))
    return "".join(chars)
