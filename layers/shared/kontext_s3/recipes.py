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
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError
from pydantic import ValidationError

from kontext_s3.model_schema import TAG_FIELDS, FieldProblem, KontextMaxInput, describe_validation_error

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

RECIPE_FILE = "_kontext.json"
#: A recipe is a handful of fields; anything larger is a mistake, refused before it is parsed.
MAX_RECIPE_BYTES = 64 * 1024


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
        raise refuse("(file)", f"is {len(raw)} bytes; a recipe may be at most {MAX_RECIPE_BYTES}")
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:
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


class RecipeBook:
    """Finds the recipe that stood for an upload when it arrived."""

    def __init__(self, s3: S3Client, bucket: str, input_prefix: str) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._input_prefix = input_prefix

    def for_upload(self, key: str, arrived: datetime) -> Recipe | None:
        for candidate in recipe_keys(key, self._input_prefix):
            found = self._as_of(candidate, arrived)
            if found is not None:
                return found
        return None

    def _as_of(self, key: str, arrived: datetime) -> Recipe | None:
        # A HEAD first: no recipe here is the common case, and its 404 tells "never one" from "deleted since"
        # (x-amz-delete-marker), so only a recipe changed or deleted after the upload costs a listing.
        try:
            current = self._s3.head_object(Bucket=self._bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404", "NotFound"):
                raise
            headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            if headers.get("x-amz-delete-marker") != "true":
                return None
            current = None
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
        version = _version(version_id)
        extra = {"VersionId": version} if version else {}
        body = self._s3.get_object(Bucket=self._bucket, Key=key, **extra)["Body"].read(MAX_RECIPE_BYTES + 1)  # type: ignore[arg-type]
        return parse_recipe(key, version, body)


def _to_second(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


def _version(version_id: str | None) -> str | None:
    return None if version_id in (None, "null") else version_id
