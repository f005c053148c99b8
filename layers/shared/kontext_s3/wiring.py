"""The clients a handler needs, built once per execution environment from :class:`Settings`.

Handlers call these at module scope (Lambda's init phase), so warm invocations
reuse connections, the cached fal key and the cached JWKS.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import boto3
import httpx
from aws_lambda_powertools.utilities.parameters import SecretsProvider
from botocore.config import Config

from kontext_s3.completion import JobFinisher, MediaPolicy
from kontext_s3.fal_queue import FalQueueClient
from kontext_s3.jobs import JobStore
from kontext_s3.notifications import JobEvents
from kontext_s3.output_store import OutputLayout
from kontext_s3.settings import Settings

# Attempts per call come from AWS_MAX_ATTEMPTS (the template sets it), so an operator can tune them.
AWS_CONFIG = Config(retries={"mode": "standard"}, max_pool_connections=20)


def s3_client() -> Any:
    # SigV4 explicitly: presigned URLs for the input image must be SigV4 in every region.
    return boto3.client("s3", config=Config(signature_version="s3v4").merge(AWS_CONFIG))


def job_store(settings: Settings) -> JobStore:
    return JobStore(boto3.resource("dynamodb", config=AWS_CONFIG).Table(settings.jobs_table), ttl_days=settings.job_ttl_days)


def job_finisher(settings: Settings, s3: Any, jobs: JobStore, http: httpx.Client | None = None) -> JobFinisher:
    return JobFinisher(
        s3=s3,
        jobs=jobs,
        events=JobEvents(boto3.client("events", config=AWS_CONFIG), bus_name=settings.event_bus_name, source=settings.event_source),
        layout=OutputLayout(settings.input_prefix, settings.output_prefix),
        http=http,
        media=MediaPolicy(allowed_urls=settings.allowed_media_urls, max_image_bytes=settings.max_output_image_bytes),
    )


def fal_key_reader(settings: Settings) -> Callable[[], str]:
    """The fal key from Secrets Manager, cached ``FAL_KEY_CACHE_SECONDS``: plain text, or ``{"FAL_KEY": ...}``."""
    secrets = SecretsProvider(boto3_client=boto3.client("secretsmanager", config=AWS_CONFIG))

    def read() -> str:
        value = str(secrets.get(settings.fal_key_secret, max_age=settings.fal_key_cache_seconds))
        if value.lstrip().startswith("{"):
            document = json.loads(value)
            value = document.get("FAL_KEY") or document.get("key") or ""
        return value.strip()

    return read


def media_http_client() -> httpx.Client:
    """For fal's API and its media hosts: output files can be large and slow to start; redirects are not followed."""
    return httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0), follow_redirects=False)


def fal_client(settings: Settings, http: httpx.Client) -> FalQueueClient:
    return FalQueueClient(http, base_url=settings.fal_queue_url, key=fal_key_reader(settings), timeout_seconds=settings.fal_timeout_seconds)
