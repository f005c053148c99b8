"""Where results go in S3, and how they get there.

Layout: an upload ``<INPUT_PREFIX><path>`` has its results under
``<OUTPUT_PREFIX><path>/<job_id>/``::

    outputs/photos/cat.jpg/3f2a.../image-0.jpg
    outputs/photos/cat.jpg/3f2a.../manifest.json     (success)
    outputs/photos/cat.jpg/3f2a.../error.json        (failure)

so listing ``outputs/<path>/`` shows every run of that input without the jobs
table, and the job id (a hash of bucket, key and version) tells runs apart.
Keys are deterministic: a repeated webhook overwrites identical objects.
Outputs never land under the input prefix, so they never trigger a new job.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from boto3.s3.transfer import TransferConfig

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MANIFEST_NAME = "manifest.json"
ERROR_NAME = "error.json"
#: The input as fal is given it when it is not the upload as stored (prepared, or pinned on an unversioned bucket).
PREPARED_INPUT_NAME = "input-prepared"
_MAX_KEY_BYTES = 1024
_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif"}
_PART_BYTES = 5 * 1024 * 1024  # S3's smallest multipart part: the most a copy holds in memory


@dataclass(frozen=True)
class OutputLayout:
    input_prefix: str
    output_prefix: str

    def job_prefix(self, key: str, job_id: str) -> str:
        relative = key[len(self.input_prefix) :] if key.startswith(self.input_prefix) else key
        if has_dot_segments(relative):
            # Such keys are refused; their error record must not land outside the output prefix's tree.
            return f"{self.output_prefix}_unsupported-keys/{job_id}/"
        prefix = f"{self.output_prefix}{relative}/{job_id}/"
        # S3 keys stop at 1,024 bytes; a very long input key keeps its results by job id alone.
        if len(prefix.encode("utf-8")) + 32 > _MAX_KEY_BYTES:
            prefix = f"{self.output_prefix}_long-keys/{job_id}/"
        return prefix

    @staticmethod
    def image_key(job_prefix: str, index: int, ext: str) -> str:
        return f"{job_prefix}image-{index}.{ext}"

    @staticmethod
    def manifest_key(job_prefix: str) -> str:
        return job_prefix + MANIFEST_NAME

    @staticmethod
    def error_key(job_prefix: str) -> str:
        return job_prefix + ERROR_NAME

    @staticmethod
    def prepared_input_key(job_prefix: str, ext: str) -> str:
        return f"{job_prefix}{PREPARED_INPUT_NAME}.{ext}"


def has_dot_segments(key: str) -> bool:
    """True when a ``.`` or ``..`` path segment is in ``key``: HTTP clients and servers normalise them away."""
    return any(segment in (".", "..") for segment in key.split("/"))


def extension_of(content_type: str) -> str:
    return _EXTENSIONS.get(content_type.split(";", maxsplit=1)[0].strip().lower(), "bin")


def write_json(s3: S3Client, bucket: str, key: str, document: dict[str, Any]) -> None:
    s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=json.dumps(document, indent=2, ensure_ascii=False, sort_keys=False).encode("utf-8"),
        ContentType="application/json",
    )


class TooLarge(ValueError):
    pass


class _IterReader(io.RawIOBase):
    """A read-only file over an iterator of byte chunks, so boto3's transfer can stream it."""

    def __init__(self, chunks: Iterator[bytes], limit: int) -> None:
        self._chunks = chunks
        self._pending = b""
        self._limit = limit
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
            self.total += len(self._pending)
            if self.total > self._limit:
                raise TooLarge(f"image is larger than the {self._limit}-byte limit")
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def stream_to_s3(s3: S3Client, bucket: str, key: str, chunks: Iterator[bytes], *, content_type: str, max_bytes: int) -> int:
    """Copy ``chunks`` to ``s3://bucket/key``; memory stays at one 5 MiB part whatever the size.

    Returns the number of bytes written.
    """
    reader = _IterReader(chunks, max_bytes)
    config = TransferConfig(
        multipart_threshold=_PART_BYTES,
        multipart_chunksize=_PART_BYTES,
        max_concurrency=1,
        use_threads=False,
    )
    s3.upload_fileobj(
        io.BufferedReader(reader, buffer_size=64 * 1024),
        bucket,
        key,
        ExtraArgs={"ContentType": content_type},
        Config=config,
    )
    return reader.total


@dataclass(frozen=True)
class DataUri:
    content_type: str
    data: bytes


def parse_data_uri(uri: str) -> DataUri:
    """``data:image/png;base64,....`` as bytes (fal's ``sync_mode`` answers)."""
    if not uri.startswith("data:") or "," not in uri:
        raise ValueError("not a data: URI")
    header, payload = uri[5:].split(",", 1)
    parts = header.split(";")
    if "base64" not in parts[1:]:
        raise ValueError("data: URI is not base64")
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"data: URI has bad base64: {exc}") from exc
    return DataUri(content_type=parts[0] or "application/octet-stream", data=data)
