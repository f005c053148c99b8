"""Copying fal's output images into S3: bounded in number, size and time, and only bytes of the format asked for.

At most the ``num_images`` that were asked, each streamed with a size cap, all within a total deadline, fetched
only from the media hosts on the allow-list (redirects are not followed), and stored only when their first bytes
are the image format asked for.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
from botocore.exceptions import BotoCoreError, ClientError

from kontext_s3.image_types import SNIFF_BYTES, sniff_image
from kontext_s3.jobs import Job
from kontext_s3.log import logger
from kontext_s3.output_store import ERROR_NAME, PREPARED_INPUT_NAME, OutputLayout, TooLarge, extension_of, parse_data_uri, stream_to_s3
from kontext_s3.redact import redact

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class DeliveryFault(RuntimeError):
    """Copying the outputs failed for a reason a retry may fix: answer 5xx, keep the job open."""


class NotAnImage(ValueError):
    """An output's bytes are not the image format that was asked for."""


@dataclass(frozen=True)
class CopiedImage:
    key: str
    content_type: str
    bytes: int


@dataclass
class MediaPolicy:
    allowed_urls: Sequence[str]
    max_image_bytes: int
    #: Longest wait for any one read: a stalled host is given up on after this, a trickling one at the deadline.
    read_timeout_seconds: float = 5.0
    parallel_downloads: int = 4


class OutputCopier:
    def __init__(self, s3: S3Client, layout: OutputLayout, http: httpx.Client | None, media: MediaPolicy) -> None:
        self.s3 = s3
        self.layout = layout
        self.http = http
        self.media = media

    def copy_all(self, job: Job, targets: list[str | httpx.URL], expected: str | None, deadline: float) -> list[CopiedImage]:
        """Every output, in order; raises :class:`NotAnImage` or :class:`DeliveryFault`."""
        with ThreadPoolExecutor(max_workers=max(1, min(self.media.parallel_downloads, len(targets)))) as pool:
            return list(pool.map(lambda pair: self._copy_image(job, pair[0], pair[1], expected, deadline), enumerate(targets)))

    def _copy_image(self, job: Job, index: int, url: str | httpx.URL, expected: str | None, deadline: float) -> CopiedImage:
        try:
            if isinstance(url, str):  # a data: URI (sync_mode)
                data = parse_data_uri(url)
                kind = _check_kind(index, data.data[:SNIFF_BYTES], expected)
                key = self.layout.image_key(job.output_prefix, index, extension_of(kind))
                self.s3.put_object(Bucket=job.bucket, Key=key, Body=data.data, ContentType=kind)
                return CopiedImage(key=key, content_type=kind, bytes=len(data.data))
            if self.http is None:
                raise DeliveryFault("no HTTP client to fetch output images with")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeliveryFault(f"output image {index}: no time left to fetch it")
            timeout = httpx.Timeout(min(self.media.read_timeout_seconds, remaining))
            with self.http.stream("GET", url, timeout=timeout, follow_redirects=False) as response:
                if response.status_code != 200:
                    raise DeliveryFault(f"output image {index}: the media host answered HTTP {response.status_code}")
                # Bytes as they arrive (a chunk size would wait for that many, past any deadline).
                chunks = _until(deadline, index, response.iter_bytes())
                head, chunks = _peek(chunks, SNIFF_BYTES)
                kind = _check_kind(index, head, expected)
                key = self.layout.image_key(job.output_prefix, index, extension_of(kind))
                size = stream_to_s3(self.s3, job.bucket, key, chunks, content_type=kind, max_bytes=self.media.max_image_bytes)
                return CopiedImage(key=key, content_type=kind, bytes=size)
        except (NotAnImage, DeliveryFault):
            raise
        except (httpx.HTTPError, ClientError, BotoCoreError, TooLarge, ValueError) as exc:
            raise DeliveryFault(f"output image {index}: {type(exc).__name__}: {redact(str(exc))}") from exc

    def remove_outputs(self, job: Job) -> None:
        """Remove what an earlier holder of this job may have left (images, manifest), before writing ours."""
        listing = self.s3.list_objects_v2(Bucket=job.bucket, Prefix=job.output_prefix)
        # The prepared input is the submit function's, and what the manifest points at: it stays.
        kept = (ERROR_NAME, f"{PREPARED_INPUT_NAME}.")
        stale = [item["Key"] for item in listing.get("Contents", []) if not item["Key"].rsplit("/", 1)[-1].startswith(kept)]
        for key in stale:
            self.s3.delete_object(Bucket=job.bucket, Key=key)
        if stale:
            logger.info("removed files an earlier holder left", extra={"removed": len(stale)})


def _check_kind(index: int, head: bytes, expected: str | None) -> str:
    kind = sniff_image(head)
    if kind is None:
        raise NotAnImage(f"output image {index} is not an image (its first bytes are {head[:8]!r})")
    if expected and kind != expected:
        raise NotAnImage(f"output image {index} is {kind}, but {expected} was asked for")
    return kind


def _until(deadline: float, index: int, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The chunks, stopping with :class:`DeliveryFault` at ``deadline`` (a trickling host must not hold us)."""
    for chunk in chunks:
        if time.monotonic() > deadline:
            raise DeliveryFault(f"output image {index}: still downloading at the deadline")
        yield chunk


def _peek(chunks: Iterator[bytes], size: int) -> tuple[bytes, Iterator[bytes]]:
    """The first ``size`` bytes of a chunk stream, and the whole stream."""
    taken: list[bytes] = []
    have = 0
    for chunk in chunks:
        taken.append(chunk)
        have += len(chunk)
        if have >= size:
            break
    return b"".join(taken)[:size], itertools.chain(taken, chunks)
