"""Folder recipes: a ``_kontext.json`` under a prefix of the input prefix gives every upload below it its edit.

Tools that move many files (``aws s3 sync``, S3 Batch Operations, upload
widgets) cannot tag each object, so the edit can live beside them instead::

    inputs/catalogue/_kontext.json   {"prompt": "Remove the background", "output_format": "png"}
    inputs/catalogue/shoes/a.jpg     edited with that recipe
    inputs/catalogue/shoes/_kontext.json   nearer, so it wins for everything under shoes/

* The **nearest** recipe wins (the upload's own folder first, then each parent
  up to the input prefix); recipes do not merge with one another.
* An upload's own tags override the recipe **field by field**.
* The recipe used is the version that stood **when the upload arrived**: a
  recipe changed afterwards applies only to later uploads. S3 stamps
  ``LastModified`` to the second, so a recipe written in the same second as an
  upload counts as before it.
* Writing a recipe is not an upload: it never starts a job.
"""

from __future__ import annotations

import json
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError
from pydantic import ValidationError

from kontext_s3.model_schema import TAG_FIELDS, FieldProblem, KontextMaxInput, describe_validation_error

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

RECIPE_FILE = "_kontext.json"
#: A recipe is a handful of fields; anything larger is a mistake, refused before it is parsed.
MAX_RECIPE_BYTES = 64 * 1024
#: A recipe is a flat object of scalars (depth 1); deeper nesting is refused before it is parsed, since the
#: parser recurses per level (python3.13 takes thousands) and pydantic cannot serialise past a few hundred.
MAX_RECIPE_DEPTH = 32


@dataclass(frozen=True)
class Recipe:
    key: str
    version_id: str | None
    fields: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        """What the manifest and the error record say about it."""
        return {"key": self.key, "version_id": self.version_id, "fields": self.fields}


class InvalidRecipe(ValueError):
    """The nearest recipe cannot be used; ``problems`` name its fields, the message names the recipe."""

    def __init__(self, key: str, version_id: str | None, problems: list[FieldProblem]) -> None:
        super().__init__(f"the recipe s3://…/{key} is not a valid edit: " + "; ".join(p.sentence() for p in problems))
        self.key = key
        self.version_id = version_id
        self.problems = problems


def is_recipe(key: str) -> bool:
    return key.rsplit("/", 1)[-1] == RECIPE_FILE


def recipe_keys(key: str, input_prefix: str) -> list[str]:
    """Where a recipe for ``key`` may be, nearest first: its own folder, then each parent down to ``input_prefix``."""
    folder = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
    keys = []
    while folder.startswith(input_prefix) and len(folder) >= len(input_prefix):
        keys.append(folder + RECIPE_FILE)
        if folder == input_prefix:
            break
        folder = folder[:-1].rsplit("/", 1)[0] + "/" if "/" in folder[:-1] else ""
    return keys


def parse_recipe(key: str, version_id: str | None, raw: bytes) -> Recipe:
    """The recipe's fields, checked with the same schema as the tags; raises :class:`InvalidRecipe`."""

    def refuse(field: str, message: str) -> InvalidRecipe:
        return InvalidRecipe(key, version_id, [FieldProblem(field=field, message=message)])

    if len(raw) > MAX_RECIPE_BYTES:
        raise refuse("(file)", f"is over {MAX_RECIPE_BYTES} bytes, the most a recipe may be")
    try:
        text = raw.decode(json.detect_encoding(raw))
    except UnicodeDecodeError as exc:
        raise refuse("(file)", f"is not JSON (not UTF-8, UTF-16 or UTF-32 text: {exc.reason})") from exc
    if _nesting(text) > MAX_RECIPE_DEPTH:
        raise refuse("(file)", f"nests values more than {MAX_RECIPE_DEPTH} levels deep; a recipe is one object of edit fields")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: kept, though the depth check comes first
        raise refuse("(file)", f"is not JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise refuse("(file)", 'must be a JSON object of edit fields, such as {"prompt": "..."}')
    unknown = sorted(set(document) - set(TAG_FIELDS))
    if unknown:
        raise refuse(unknown[0], f"is not an edit field (the fields are {', '.join(TAG_FIELDS)})")
    try:
        # The prompt may come from the upload's tags instead; a placeholder lets the rest be checked alone.
        KontextMaxInput.model_validate({"prompt": "-", **document, "image_url": "s3://recipe"})
    except ValidationError as exc:
        raise InvalidRecipe(key, version_id, describe_validation_error(exc, document)) from exc
    return Recipe(key=key, version_id=version_id, fields=document)


def _nesting(text: str) -> int:
    """How deep ``text``'s brackets nest, outside strings: known before any parser recurses that deep."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


#: A recipe key's HEAD is reused, within one execution environment, for uploads that arrived before it was made, for
#: this long and for this many keys: a batch of uploads into one folder looks its recipes up once, not once each.
HEAD_REUSE_SECONDS = 60
HEAD_REUSE_KEYS = 512
CLOCK_MARGIN_SECONDS = 0.5
#: A batch's records run on threads: one HEAD of a key at a time, so the records waiting for it are answered by it.
HEAD_LOCK_STRIPES = 16
#: Recipe versions read, kept by (key, version): a version never changes.
READ_REUSE_VERSIONS = 64


@dataclass(frozen=True)
class _Head:
    """What a HEAD of a recipe key found: its current version, or nothing (``deleted``: a delete marker)."""

    #: S3's answer describes the key as it stood at this moment or later (the HEAD was sent after it).
    seen_at: datetime
    current: dict[str, Any] | None
    deleted: bool


class RecipeBook:
    """Finds the recipe that stood for an upload when it arrived.

    A HEAD made at moment H tells what stood at any earlier moment as well as a HEAD made later would (the version
    current at H and when it was written, or that none was ever written), so it serves every upload that arrived
    before H: only uploads newer than the last look cost a request.
    """

    def __init__(self, s3: S3Client, bucket: str, input_prefix: str, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._input_prefix = input_prefix
        self._clock = clock
        self._heads: dict[str, _Head] = {}
        self._head_locks = [threading.Lock() for _ in range(HEAD_LOCK_STRIPES)]
        self._read_versions: dict[tuple[str, str | None], Recipe] = {}

    def for_upload(self, key: str, arrived: datetime) -> Recipe | None:
        for candidate in recipe_keys(key, self._input_prefix):
            found = self._as_of(candidate, arrived)
            if found is not None:
                return found
        return None

    def _head(self, key: str, arrived: datetime) -> _Head:
        # Ten records of a batch into one folder would otherwise all miss the cache at once and HEAD the key ten times.
        with self._head_locks[zlib.crc32(key.encode("utf-8")) % HEAD_LOCK_STRIPES]:
            return self._head_once(key, arrived)

    def _head_once(self, key: str, arrived: datetime) -> _Head:
        seen = self._heads.get(key)
        now = self._clock()
        # The arrival as S3 stamped it, to the millisecond (not cut to the second as LastModified comparisons are):
        # only an upload that arrived before the HEAD was made may be answered by it.
        if seen is not None and arrived <= seen.seen_at and now - seen.seen_at < timedelta(seconds=HEAD_REUSE_SECONDS):
            return seen
        # Half a second back for the clocks: S3 stamps arrivals with its own, and AWS keeps both within milliseconds.
        seen_at = now - timedelta(seconds=CLOCK_MARGIN_SECONDS)
        try:
            head = _Head(seen_at, dict(self._s3.head_object(Bucket=self._bucket, Key=key)), deleted=False)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404", "NotFound"):
                raise
            headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            head = _Head(seen_at, None, deleted=headers.get("x-amz-delete-marker") == "true")
        if len(self._heads) >= HEAD_REUSE_KEYS:
            self._heads.clear()
        self._heads[key] = head
        return head

    def _as_of(self, key: str, arrived: datetime) -> Recipe | None:
        # A HEAD first: no recipe here is the common case, and its 404 tells "never one" from "deleted since"
        # (x-amz-delete-marker), so only a recipe changed or deleted after the upload costs a listing.
        head = self._head(key, arrived)
        current = head.current
        if current is None and not head.deleted:
            return None
        if current is not None and current["LastModified"] <= _to_second(arrived):
            return self._read(key, current.get("VersionId"))
        # Changed (or deleted) since the upload: the version that stood then, if any.
        stood = []
        for listing in self._s3.get_paginator("list_object_versions").paginate(Bucket=self._bucket, Prefix=key):
            stood += [
                entry
                for entry in [*listing.get("Versions", []), *listing.get("DeleteMarkers", [])]
                if entry["Key"] == key and entry["LastModified"] <= _to_second(arrived)
            ]
        if not stood:
            return None
        latest = max(stood, key=lambda entry: entry["LastModified"])
        if "ETag" not in latest:  # a delete marker: no recipe stood then
            return None
        return self._read(key, latest["VersionId"])

    def _read(self, key: str, version_id: str | None) -> Recipe:
        # Only a real version is the same bytes next time: an unversioned bucket's "null" names whatever is there now.
        version_id = _version(version_id)
        if version_id and (key, version_id) in self._read_versions:
            return self._read_versions[(key, version_id)]
        recipe = read_recipe(self._s3, self._bucket, key, version_id)
        if version_id:
            if len(self._read_versions) >= READ_REUSE_VERSIONS:
                self._read_versions.clear()
            self._read_versions[(key, version_id)] = recipe
        return recipe


def read_recipe(s3: S3Client, bucket: str, key: str, version_id: str | None = None) -> Recipe:
    """The recipe at ``key`` (that version, else the current one), checked by :func:`parse_recipe`.

    No more than one byte past the cap is read: a huge object there costs nothing to refuse.
    """
    version = _version(version_id)
    extra = {"VersionId": version} if version else {}
    answer = s3.get_object(Bucket=bucket, Key=key, **extra)  # type: ignore[arg-type]
    try:
        body = answer["Body"].read(MAX_RECIPE_BYTES + 1)
    finally:
        answer["Body"].close()
    return parse_recipe(key, version or _version(answer.get("VersionId")), body)


def _to_second(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


def _version(version_id: str | None) -> str | None:
    return None if version_id in (None, "null") else version_id
