"""The upload's image as fal will see it: checked against the limits, prepared when it must be, and measured.

From one ranged GET of the first 64 KiB (:mod:`kontext_s3.image_header`): the
type, the size and the EXIF orientation. That refuses what is not an image,
too many bytes or pixels, or too small, before anything is sent; writes a
prepared copy beside the job's outputs when fal should not see the upload as
stored (:mod:`kontext_s3.input_prep`); and turns ``aspect_ratio=match`` into
the model's allowed ratio nearest the input's upright size.

On an unversioned bucket (an attached one) a key names whatever was written
last, and fal fetches its input only when the request starts. So the upload is
read only while its bytes are still the event's (``If-Match`` on its eTag), and
fal is given a pinned copy of those bytes beside the job's outputs: a rewrite of
the key while the job waits is an upload of its own, never the bytes this job
sends.
"""

from __future__ import annotations

import io
import json
from contextlib import closing
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from kontext_s3.image_header import HEADER_BYTES, SIZE_SCAN_BYTES, ImageHeader, gif_canvas, read_header
from kontext_s3.input_prep import CONVERTED, SUPPORTED, TAKEN, UnreadableImage, changes_needed, one_at_a_time, prepare
from kontext_s3.log import logger
from kontext_s3.model_schema import MATCH_INPUT, nearest_aspect_ratio
from kontext_s3.output_store import OutputLayout, extension_of
from kontext_s3.s3_events import ObjectChange
from kontext_s3.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class RefusedInput(Exception):
    """The upload cannot be sent as it is, and retrying will not change that (the user's to fix)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SeenImage:
    #: The model input, with ``aspect_ratio=match`` resolved.
    body: dict[str, Any]
    #: What fal is given: the upload's type, or the prepared copy's.
    content_type: str
    #: For the job and the manifest: the input's type, bytes, upright size and orientation, and ``prepared``.
    image_json: str


class InputImages:
    def __init__(self, s3: S3Client, settings: Settings) -> None:
        self._s3 = s3
        self._settings = settings

    def still_there(self, bucket: str, key: str, version_id: str | None) -> bool:
        """Whether the uploaded version can still be read (a job waiting in line checks before it is sent)."""
        try:
            self._s3.head_object(Bucket=bucket, Key=key, **({"VersionId": version_id} if version_id else {}))  # type: ignore[arg-type]
        except ClientError as exc:
            if missing(exc):
                return False
            raise
        return True

    def examine(self, change: ObjectChange, output_prefix: str, body: dict[str, Any], *, deadline: float) -> SeenImage:
        header, size = self._header(change)
        upright = header.upright_size
        image: dict[str, Any] = {"content_type": header.content_type, "bytes": size, "orientation": header.orientation}
        if upright:
            image.update(width=upright[0], height=upright[1])
        content_type, body = header.content_type, dict(body)
        changes = changes_needed(header)
        if changes:
            prepared = self._prepared_copy(change, output_prefix, header, changes, deadline)
            content_type, upright = prepared["content_type"], (prepared["width"], prepared["height"])
            # Decoded, the size is exact: a HEIC header gives the coded size, which a crop box may trim.
            image.update(width=upright[0], height=upright[1], prepared=prepared)
        elif not change.version_id:
            image.update(prepared=self._pinned_copy(change, output_prefix, header, size))
        if body.get("aspect_ratio") == MATCH_INPUT:
            if upright is None:
                raise RefusedInput("unsupported_object", "aspect_ratio=match needs the image's size, which its header does not give")
            body["aspect_ratio"] = image["aspect_ratio_matched"] = nearest_aspect_ratio(*upright)
        return SeenImage(body, content_type, json.dumps(image, sort_keys=True))

    def _prepared_copy(
        self, change: ObjectChange, output_prefix: str, header: ImageHeader, changes: list[dict[str, str]], deadline: float
    ) -> dict[str, Any]:
        """Write the upright / converted copy fal is given, beside the job's outputs.

        Read, decode, turn, encode and write all happen in the one decoding turn: ten records of a batch each holding
        a whole photo while they wait for it were what overran the function's memory.
        """
        key = ""
        with one_at_a_time(deadline):
            data = self._s3.get_object(**_read_args(change))["Body"].read()  # type: ignore[arg-type]
            try:
                prepared = prepare(data, header, max_pixels=self._settings.max_input_pixels)
            except UnreadableImage as exc:
                raise RefusedInput("unsupported_object", str(exc)) from exc
            finally:
                del data
            key = OutputLayout.prepared_input_key(output_prefix, prepared.extension)
            self._s3.put_object(Bucket=change.bucket, Key=key, Body=prepared.data, ContentType=prepared.content_type)
        logger.info("input prepared for fal", extra={"changes": [c["change"] for c in changes], "prepared_key": key})
        return {
            "key": key,
            "content_type": prepared.content_type,
            "width": prepared.width,
            "height": prepared.height,
            "bytes": len(prepared.data),
            "changes": changes,
        }

    def _pinned_copy(self, change: ObjectChange, output_prefix: str, header: ImageHeader, size: int) -> dict[str, Any]:
        """Copy the upload's bytes, as the event named them, to where fal is sent (an unversioned bucket's key moves on)."""
        key = OutputLayout.prepared_input_key(output_prefix, extension_of(header.content_type))
        try:
            self._s3.copy_object(
                Bucket=change.bucket,
                Key=key,
                CopySource={"Bucket": change.bucket, "Key": change.key},
                # The copy is fal's, not the user's: without their tags (copying tags needs s3:PutObjectTagging too).
                TaggingDirective="REPLACE",
                **({"CopySourceIfMatch": f'"{change.etag}"'} if change.etag else {}),  # type: ignore[arg-type]
            )
        except ClientError as exc:
            raise _refusal(exc) from exc
        upright = header.upright_size or (0, 0)
        why = "the bucket is unversioned: fal is given a copy of the bytes that were uploaded, not what the key holds later"
        return {
            "key": key,
            "content_type": header.content_type,
            "width": upright[0],
            "height": upright[1],
            "bytes": size,
            "changes": [{"change": "pinned", "why": why}],
        }

    def _header(self, change: ObjectChange) -> tuple[ImageHeader, int]:
        """The image's header and size; refuses what is not an image, outside the limits, or deleted since.

        One ranged GET of the key's *current* object answers both "is it still there" (a delete
        marker hides a deleted upload: 404) and "what is it"; only when the upload was overwritten
        since does a second GET read the uploaded version itself.
        """
        first_range = f"bytes=0-{HEADER_BYTES - 1}"
        try:
            first = self._s3.get_object(Bucket=change.bucket, Key=change.key, Range=first_range, **_same_bytes(change))  # type: ignore[arg-type]
            if change.version_id and first.get("VersionId") not in (change.version_id, None, "null"):
                first = self._s3.get_object(Range=first_range, **version_args(change))  # type: ignore[arg-type]
            first_bytes = first["Body"].read()
        except ClientError as exc:
            raise _refusal(exc) from exc
        size = _object_size(first.get("ContentRange"), first.get("ContentLength", 0))
        header = read_header(first_bytes)
        if header is None or header.content_type not in TAKEN | CONVERTED:
            raise RefusedInput("unsupported_object", f"the uploaded object is not a {SUPPORTED} image")
        if size > self._settings.max_input_bytes:
            raise RefusedInput(
                "unsupported_object", f"the image is {size} bytes; the limit is {self._settings.max_input_bytes} (MAX_INPUT_BYTES)"
            )
        if (header.width is None or header.height is None) and size > len(first_bytes):
            # The size marker lies past the first read (large EXIF or ICC segments before a JPEG's frame header).
            more = self._s3.get_object(Range=f"bytes=0-{SIZE_SCAN_BYTES - 1}", **_read_args(change))  # type: ignore[arg-type]
            header = read_header(more["Body"].read(), limit=SIZE_SCAN_BYTES) or header
        if header.content_type == "image/gif":
            # A decoder draws every frame: a frame larger than the logical screen is decoded at its own size.
            body = io.BytesIO(first_bytes) if size <= len(first_bytes) else self._s3.get_object(**_read_args(change))["Body"]  # type: ignore[arg-type]
            with closing(body):  # the whole object's stream, read block by block: let go of its connection either way
                width, height = gif_canvas(body.read)
            header = replace(header, width=width, height=height)
        self._within_limits(header, size)
        return header, size

    def _within_limits(self, header: ImageHeader, size: int) -> None:
        limits = self._settings
        if header.width is None or header.height is None:
            # Never skipped: what cannot be measured cannot be held to MAX_INPUT_PIXELS, and fal would decode it anyway.
            raise RefusedInput(
                "unsupported_object",
                f"the image's size is not in its first {SIZE_SCAN_BYTES} bytes, so it cannot be checked against the pixel "
                "limit (MAX_INPUT_PIXELS); save it again with its metadata after the image header",
            )
        pixels = header.width * header.height
        if pixels > limits.max_input_pixels:
            raise RefusedInput(
                "unsupported_object",
                f"the image is {header.width}x{header.height} = {pixels} pixels; the limit is {limits.max_input_pixels} "
                "(MAX_INPUT_PIXELS): scale it down and upload it again",
            )
        if min(header.width, header.height) < limits.min_input_side:
            raise RefusedInput(
                "unsupported_object",
                f"the image is {header.width}x{header.height}; each side must be at least {limits.min_input_side} pixels (MIN_INPUT_SIDE)",
            )


def version_args(change: ObjectChange) -> dict[str, str]:
    kwargs = {"Bucket": change.bucket, "Key": change.key}
    if change.version_id:
        kwargs["VersionId"] = change.version_id
    return kwargs


def _read_args(change: ObjectChange) -> dict[str, str]:
    return {**version_args(change), **_same_bytes(change)}


def _same_bytes(change: ObjectChange) -> dict[str, str]:
    """On an unversioned bucket, read the key only while it still holds the event's bytes."""
    return {"IfMatch": f'"{change.etag}"'} if not change.version_id and change.etag else {}


def _refusal(exc: ClientError) -> Exception:
    """What S3's refusal to read an upload means for the user, or the error itself when it is not theirs to fix."""
    error = exc.response.get("Error", {})
    code, message = error.get("Code"), str(error.get("Message") or "")
    if missing(exc):
        return RefusedInput("input_missing", "the input was deleted before it could be processed")
    if code == "InvalidRange":  # an empty object
        return RefusedInput("unsupported_object", "the uploaded object is empty")
    if code in ("PreconditionFailed", "412"):
        message = "the key was written again before this upload was read: the new bytes are an upload of their own"
        return RefusedInput("input_replaced", message)
    if code == "AccessDenied" and "kms:" in message:
        # The bucket's objects are encrypted with a key the stack was not given (AttachedKmsKeyArns): retrying cannot help.
        return RefusedInput("input_unreadable", f"S3 refused to read the input: {message}; add the key's ARN to AttachedKmsKeyArns")
    return exc


def missing(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "NoSuchVersion", "404", "NotFound")


def _object_size(content_range: str | None, content_length: int) -> int:
    """The whole object's size from a ranged GET's ``Content-Range: bytes 0-65535/12345678``."""
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return content_length
