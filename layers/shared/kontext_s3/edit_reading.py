"""Reading the edit an upload asks for: its tags, its folder's recipe as it stood when the upload arrived, and what a
backfill was given; checked against the model's input schema before anything else is looked at.

The answer is typed: an :class:`Edit` to send, :class:`AwaitTags` (no prompt yet, and its tags may still come),
:class:`NoEdit` (new tags that still describe none) or a :class:`~kontext_s3.outcomes.Refusal` (the user's mistake,
for an error record). A fault reading S3 is raised: it is transient, and the delivery policy decides what follows.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from kontext_s3.edit_request import InvalidEditRequest, build_model_input
from kontext_s3.input_image import missing, version_args
from kontext_s3.log import logger
from kontext_s3.model_schema import MATCH_INPUT, TAG_FIELDS, FieldProblem
from kontext_s3.outcomes import Refusal
from kontext_s3.output_store import has_dot_segments
from kontext_s3.recipes import InvalidRecipe, Recipe, RecipeBook
from kontext_s3.s3_events import ObjectChange
from kontext_s3.settings import Settings
from kontext_s3.tag_codec import TagEncodingError, decode_tags

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


@dataclass(frozen=True)
class Intent:
    """What a message the stack sent itself adds to an S3 event (see ``s3_events.notification``)."""

    #: The tags' wait is over (a tag deadline, or a backfill of objects that were never going to be tagged late).
    tags_due: bool = False
    #: Edit fields a backfill was given, below the object's own tags.
    fields: dict[str, str] = field(default_factory=dict)
    #: When a backfill ran: the recipe that stood then applies (it may have been written for the backfill).
    recipe_at: datetime | None = None
    #: A backfill's message (its marks, to send it again unchanged when it must wait).
    backfill: dict[str, Any] | None = None

    @classmethod
    def of(cls, marks: dict[str, Any]) -> Intent:
        given = marks.get("fields")
        fields = {str(k): str(v) for k, v in given.items()} if isinstance(given, dict) else {}
        recipe_at = arrival_at(str(marks["recipe_at"])) if marks.get("recipe_at") else None
        backfill = dict(marks) if marks.get("backfill") else None
        return cls(tags_due=bool(marks.get("tags_due") or backfill), fields=fields, recipe_at=recipe_at, backfill=backfill)


@dataclass(frozen=True)
class Edit:
    """A validated edit, ready to send once its image is examined."""

    body: dict[str, Any]  # the model input, with the object's s3:// address as image_url
    content_type: str
    images: int  # what fal bills
    #: The folder recipe the edit came from, as the job records it (JSON), or None.
    recipe_json: str | None = None
    #: The input image as found (size, orientation) and what preparing it changed (JSON), or None.
    image_json: str | None = None
    #: The edit as asked (recipe, backfill fields, tags; no deployment defaults): what tells one edit from another.
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def input_json(self) -> str:
        """The model input as the job records it (keys sorted, so the same edit is the same text)."""
        return json.dumps(self.body, sort_keys=True)

    @property
    def prepared_key(self) -> str | None:
        """The prepared copy fal is given instead of the upload, when the upload needed one."""
        return (json.loads(self.image_json).get("prepared") or {}).get("key") if self.image_json else None


@dataclass(frozen=True)
class AwaitTags:
    """No prompt yet, inside ``TAG_WAIT_SECONDS``: the upload's tags may come after it."""


@dataclass(frozen=True)
class NoEdit:
    """New tags on an object that still describe no edit: nothing to start, nothing to report yet."""


class EditReader:
    def __init__(self, s3: S3Client, settings: Settings) -> None:
        self._s3 = s3
        self._settings = settings
        #: One recipe book per input bucket (the stack's own, and each attached one), made when first needed.
        self._recipe_books: dict[str, RecipeBook] = {}

    def read(self, change: ObjectChange, intent: Intent) -> Edit | AwaitTags | NoEdit | Refusal:
        if has_dot_segments(change.key):
            return Refusal("unsupported_key", "the key has '.' or '..' path segments, which URLs cannot carry; rename the upload")
        tags = self._read_tags(change)
        if isinstance(tags, Refusal):
            return tags
        fields_given, unknown = tags
        recipe = self._recipe_for(change, intent)
        if isinstance(recipe, Refusal):
            return Refusal(recipe.code, recipe.message, recipe.problems, recipe.recipe, {**intent.fields, **fields_given})
        described = recipe.describe() if recipe else None
        # Recipe, then what a backfill was given, then the upload's own tags, field by field; an empty tag
        # does not erase what comes before it.
        given = {name: value for name, value in {**intent.fields, **fields_given}.items() if str(value).strip()}
        fields = {**(recipe.fields if recipe else {}), **given}
        if not str(fields.get("prompt", "")).strip():
            if change.tagged:
                return NoEdit()
            if change.created and not intent.tags_due and self._settings.tag_wait_seconds:
                return AwaitTags()
        # "match" is ours, not the model's: the allowed ratio nearest the input's, once its size is known.
        match = str(fields.get("aspect_ratio", "")).strip().lower() == MATCH_INPUT
        try:
            # Validated before touching the image: a bad tag is the commonest mistake and costs nothing to report.
            checked = {name: value for name, value in fields.items() if not (match and name == "aspect_ratio")}
            model_input = build_model_input(checked, self._settings.model_defaults, s3_uri(change))
        except InvalidEditRequest as exc:
            where = f"the tags and the recipe {recipe.key}" if recipe else "the tags"
            problems = [*exc.problems, *near_misses(unknown)]
            return Refusal("invalid_tags", f"{where} do not describe a valid edit: {exc}", problems, described, fields)
        body = model_input.to_request_body()
        if match:
            body["aspect_ratio"] = MATCH_INPUT
        # With the s3:// address: the presigned URL is a credential, never stored.
        return Edit(
            body=body,
            content_type="",
            images=model_input.num_images,
            recipe_json=json.dumps(described, sort_keys=True) if described else None,
            fields=fields,
        )

    def _read_tags(self, change: ObjectChange) -> tuple[dict[str, str], list[str]] | Refusal:
        """The edit fields the tags give, and the tag keys that are no field (a misspelt one is named on refusal)."""
        try:
            tag_set = self._s3.get_object_tagging(**version_args(change))["TagSet"]  # type: ignore[arg-type]
        except ClientError as exc:
            if missing(exc):
                return Refusal("input_missing", "the uploaded object no longer exists")
            raise
        tags = {t["Key"]: t["Value"] for t in tag_set}
        try:
            fields = decode_tags(tags)
        except TagEncodingError as exc:
            return Refusal("invalid_tags", str(exc), [FieldProblem(field=exc.field or "prompt", message=str(exc))], fields=dict(tags))
        unknown = sorted(set(tags) - set(fields) - {k for k in tags if k.startswith("kx")})
        if unknown:
            logger.debug("tags that are not model fields were ignored", extra={"ignored_tags": unknown})
        return fields, unknown

    def _recipe_for(self, change: ObjectChange, intent: Intent) -> Recipe | Refusal | None:
        # The recipe as it stood when the upload arrived; for a backfill, as it stands now (written for it).
        try:
            return self._recipes(change.bucket).for_upload(change.key, intent.recipe_at or self._arrival(change))
        except InvalidRecipe as exc:
            recipe = {"key": exc.key, "version_id": exc.version_id}
            return Refusal("invalid_recipe", f"{exc}; fix the recipe and upload again", exc.problems, recipe)

    def _recipes(self, bucket: str) -> RecipeBook:
        book = self._recipe_books.get(bucket)
        if book is None:
            book = self._recipe_books[bucket] = RecipeBook(self._s3, bucket, self._settings.input_prefix)
        return book

    def _arrival(self, change: ObjectChange) -> datetime:
        """When the upload arrived: its event's time, or for a tag event, when the tagged version was written.

        A tag event comes when the tags change, maybe long after the upload; its edit is still the one that stood
        when the upload arrived (a recipe changed since, or a bulk re-tag of a folder, asks nothing new).
        """
        if not change.tagged:
            return arrival_at(change.event_time) or datetime.now(UTC)
        head = self._s3.head_object(**version_args(change))  # type: ignore[arg-type]
        return head["LastModified"]


#: How alike a tag key must be to a field's name to be taken for a misspelling of it (difflib's ratio).
NEAR_MISS_RATIO = 0.75


def near_misses(keys: list[str]) -> list[FieldProblem]:
    """Tag keys that look like a misspelt field name, each as a problem naming the field it was probably meant as."""
    problems = []
    for key in keys:
        close = difflib.get_close_matches(key.lower(), TAG_FIELDS, n=1, cutoff=NEAR_MISS_RATIO)
        if close:
            problems.append(FieldProblem(field=key, message=f"{key}: did you mean {close[0]}? (tag keys must be spelt as the field)"))
    return problems


def arrival_at(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def s3_uri(change: ObjectChange) -> str:
    return f"s3://{change.bucket}/{change.key}" + (f"?versionId={change.version_id}" if change.version_id else "")
