"""The one configuration object, read from the environment.

Each field's alias is the environment variable ``template.yaml`` sets, so the
template, the local stack and this file use the same names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kontext_s3.model_schema import ENDPOINT_ID, OPTIONAL_TAG_FIELDS, KontextMaxInput

DEFAULT_FAL_MEDIA_URLS = "https://fal.media/,https://*.fal.media/,https://storage.googleapis.com/falserverless/"


class SettingsError(RuntimeError):
    """The environment does not describe a working deployment."""


class Settings(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    jobs_table: str = Field(alias="JOBS_TABLE")
    #: The CloudFormation stack: a dimension of every metric, so two stacks in one account do not mix.
    stack_name: str = Field(default="", alias="STACK_NAME")
    input_bucket: str = Field(default="", alias="INPUT_BUCKET")
    #: Existing buckets the stack was attached to (``AttachedBuckets``): their events come through EventBridge, their
    #: uploads live under the same ``INPUT_PREFIX`` and their outputs beside them under ``OUTPUT_PREFIX``.
    attached_buckets: tuple[str, ...] = Field(default=(), alias="ATTACHED_BUCKETS")
    input_prefix: str = Field(default="inputs/", alias="INPUT_PREFIX")
    output_prefix: str = Field(default="outputs/", alias="OUTPUT_PREFIX")

    fal_queue_url: str = Field(default="https://queue.fal.run", alias="FAL_QUEUE_URL")
    fal_endpoint: str = Field(default=ENDPOINT_ID, alias="FAL_ENDPOINT")
    fal_key_secret: str = Field(default="", alias="FAL_KEY_SECRET_ARN")
    fal_key_cache_seconds: int = Field(default=300, ge=0, alias="FAL_KEY_CACHE_SECONDS")
    fal_timeout_seconds: float = Field(default=10.0, gt=0, alias="FAL_TIMEOUT_SECONDS")
    webhook_url: str = Field(default="", alias="WEBHOOK_URL")

    image_transport: Literal["presigned-url", "data-uri"] = Field(default="presigned-url", alias="IMAGE_TRANSPORT")
    presign_expiry_seconds: int = Field(default=3600, ge=60, le=604800, alias="PRESIGN_EXPIRY_SECONDS")
    max_input_bytes: int = Field(default=50 * 1024 * 1024, gt=0, alias="MAX_INPUT_BYTES")
    #: Refused before any submit: more pixels than this (read from the header), or a side shorter than that.
    max_input_pixels: int = Field(default=25_000_000, gt=0, alias="MAX_INPUT_PIXELS")
    min_input_side: int = Field(default=32, ge=1, alias="MIN_INPUT_SIDE")
    max_receive_count: int = Field(default=5, ge=1, alias="MAX_RECEIVE_COUNT")
    #: Admission (see ``admission``): requests kept open at fal, and images a UTC day may cost; 0 is no limit.
    max_jobs_at_fal: int = Field(default=0, ge=0, alias="MAX_JOBS_AT_FAL")
    daily_image_budget: int = Field(default=0, ge=0, alias="DAILY_IMAGE_BUDGET")
    #: The uploads queue, where a freed slot is signalled to the submit function.
    uploads_queue_url: str = Field(default="", alias="UPLOADS_QUEUE_URL")
    #: How long fal keeps its copies of the outputs (X-Fal-Object-Lifecycle-Preference); 0 is fal's default.
    fal_media_retention_seconds: int = Field(default=0, ge=0, alias="FAL_MEDIA_RETENTION_SECONDS")
    #: How long an upload with no edit waits for tags that come after it; and whether changed tags start a new job.
    tag_wait_seconds: int = Field(default=300, ge=0, le=900, alias="TAG_WAIT_SECONDS")
    rerun_on_tag_change: bool = Field(default=True, alias="RERUN_ON_TAG_CHANGE")
    job_ttl_days: int = Field(default=30, ge=1, alias="JOB_TTL_DAYS")

    fal_jwks_url: str = Field(default="https://rest.alpha.fal.ai/.well-known/jwks.json", alias="FAL_JWKS_URL")
    jwks_cache_seconds: int = Field(default=6 * 3600, ge=0, alias="JWKS_CACHE_SECONDS")
    signature_tolerance_seconds: int = Field(default=300, ge=1, alias="SIGNATURE_TOLERANCE_SECONDS")
    #: This stack's fal account; empty: pinned from the first webhook that proves itself ours.
    fal_user_id: str = Field(default="", alias="FAL_USER_ID")
    webhook_max_body_bytes: int = Field(default=6 * 1024 * 1024, gt=0, alias="WEBHOOK_MAX_BODY_BYTES")
    allowed_media_urls: tuple[str, ...] = Field(default=tuple(DEFAULT_FAL_MEDIA_URLS.split(",")), alias="ALLOWED_MEDIA_URLS")
    max_output_image_bytes: int = Field(default=100 * 1024 * 1024, gt=0, alias="MAX_OUTPUT_IMAGE_BYTES")

    event_bus_name: str = Field(default="", alias="EVENT_BUS_NAME")
    event_source: str = Field(default="kontext-s3", alias="EVENT_SOURCE")

    # The template keeps deployments to sane minimums; local runs use seconds.
    recovery_after_seconds: int = Field(default=900, ge=0, alias="RECOVERY_AFTER_SECONDS")
    job_max_age_seconds: int = Field(default=6 * 3600, ge=1, alias="JOB_MAX_AGE_SECONDS")

    #: Deployment-wide defaults for optional model fields (``DEFAULT_SEED`` ... ``DEFAULT_SYNC_MODE``).
    model_defaults: dict[str, str] = Field(default_factory=dict)

    @field_validator("input_prefix", "output_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or not value.endswith("/"):
            raise ValueError("must be a non-empty key prefix ending in '/'")
        return value

    @field_validator("allowed_media_urls", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(item.strip() for item in (value or DEFAULT_FAL_MEDIA_URLS).split(",") if item.strip())
        return value

    @field_validator("attached_buckets", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    def is_input_bucket(self, bucket: str) -> bool:
        """Whether uploads in ``bucket`` are ours to edit: the stack's own bucket, or one it was attached to."""
        return bucket == self.input_bucket or bucket in self.attached_buckets

    @field_validator("fal_queue_url", "webhook_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        defaults = {name: env[f"DEFAULT_{name.upper()}"] for name in OPTIONAL_TAG_FIELDS if env.get(f"DEFAULT_{name.upper()}", "").strip()}
        try:
            settings = cls.model_validate({**env, "model_defaults": defaults})
        except ValidationError as exc:
            raise SettingsError(f"invalid configuration: {exc}") from exc
        settings.check_defaults()
        if settings.input_prefix.startswith(settings.output_prefix) or settings.output_prefix.startswith(settings.input_prefix):
            raise SettingsError("INPUT_PREFIX and OUTPUT_PREFIX overlap: outputs would trigger new jobs")
        return settings

    def check_defaults(self) -> None:
        """Refuse a deployment whose defaults the model would refuse, at cold start, not per upload."""
        try:
            KontextMaxInput.model_validate({"prompt": "x", "image_url": "x", **self.model_defaults})
        except ValidationError as exc:
            fields = ", ".join(f"DEFAULT_{str(e['loc'][0]).upper()}" for e in exc.errors())
            raise SettingsError(f"deployment default out of the model's range: {fields}") from exc
