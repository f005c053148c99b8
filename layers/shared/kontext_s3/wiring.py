"""The clients a handler needs, built from :class:`Settings`, once per execution environment.

Handlers call these at module scope, so warm invocations reuse connections,
the cached fal key and the cached JWKS. AWS clients are made the first time
they are used, not at import: an AWS client costs 5 to 80 ms to make on a
cold start, and many invocations never use some of them (the submit
function's common path publishes no event; most webhooks never read the fal
key). ``make bench`` measures the import and the first event together.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import boto3
import httpx
from botocore.config import Config

from kontext_s3.admission import Admission, DispatchSignal
from kontext_s3.completion import JobFinisher, MediaPolicy
from kontext_s3.delivery_failures import DeliveryFailures
from kontext_s3.dynamo import Table
from kontext_s3.fal_queue import FalKeyMissing, FalQueueClient
from kontext_s3.jobs import JobStore
from kontext_s3.notifications import JobEvents
from kontext_s3.output_store import OutputLayout
from kontext_s3.settings import Settings


def aws_config() -> Config:
    """Standard retries; attempts per call come from AWS_MAX_ATTEMPTS (the template sets it), so an operator can tune them.

    A new object each time: botocore writes the resolved attempt count back into the config it is given.
    """
    return Config(retries={"mode": "standard"}, max_pool_connections=20)


class Lazy:
    """An AWS client made on first use (thread-safe), standing in for the client itself."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._client: Any = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._factory()
                client = self._client
        return getattr(client, name)


def lazy(factory: Callable[[], Any]) -> Any:
    return Lazy(factory)


def s3_client() -> Any:
    # SigV4 explicitly: presigned URLs for the input image must be SigV4 in every region.
    return lazy(lambda: boto3.client("s3", config=Config(signature_version="s3v4").merge(aws_config())))


def job_store(settings: Settings) -> JobStore:
    return JobStore(Table(lazy(lambda: boto3.client("dynamodb", config=aws_config())), settings.jobs_table), ttl_days=settings.job_ttl_days)


def delivery_failures(settings: Settings, jobs: JobStore) -> DeliveryFailures:
    return DeliveryFailures(jobs.table, ttl_days=settings.job_ttl_days)


def job_events(settings: Settings) -> JobEvents:
    return JobEvents(
        lazy(lambda: boto3.client("events", config=aws_config())),
        bus_name=settings.event_bus_name,
        source=settings.event_source,
        stack_bucket=settings.input_bucket,
    )


def admission(settings: Settings, jobs: JobStore) -> Admission:
    return Admission(jobs.table, max_jobs_at_fal=settings.max_jobs_at_fal, daily_image_budget=settings.daily_image_budget)


def slot_freed(settings: Settings) -> DispatchSignal:
    return DispatchSignal(lazy(lambda: boto3.client("sqs", config=aws_config())), settings.uploads_queue_url)


def send_later(settings: Settings) -> Callable[[str, int], None]:
    """Put a body on the uploads queue, delivered after a delay (SQS holds it: nothing sleeps in a function)."""
    sqs = lazy(lambda: boto3.client("sqs", config=aws_config()))

    def send(body: str, delay_seconds: int) -> None:
        sqs.send_message(QueueUrl=settings.uploads_queue_url, MessageBody=body, DelaySeconds=min(900, max(0, delay_seconds)))

    return send


def job_finisher(settings: Settings, s3: Any, jobs: JobStore, http: httpx.Client | None = None) -> JobFinisher:
    return JobFinisher(
        s3=s3,
        jobs=jobs,
        events=job_events(settings),
        layout=OutputLayout(settings.input_prefix, settings.output_prefix),
        http=http,
        media=MediaPolicy(allowed_urls=settings.allowed_media_urls, max_image_bytes=settings.max_output_image_bytes),
        admission=admission(settings, jobs),
        slot_freed=slot_freed(settings),
    )


def fal_key_reader(settings: Settings) -> Callable[[], str]:
    """The fal key from Secrets Manager through Powertools parameters, cached ``FAL_KEY_CACHE_SECONDS``.

    The secret is plain text, or ``{"FAL_KEY": ...}``. The provider (and its client) is made on first read.
    """
    provider: list[Any] = []

    def read() -> str:
        # Imported only when a key is needed: most invocations never read it, and the import costs a cold start.
        from aws_lambda_powertools.utilities.parameters import GetParameterError, SecretsProvider  # noqa: PLC0415

        if not provider:
            provider.append(SecretsProvider(boto3_client=boto3.client("secretsmanager", config=aws_config())))
        try:
            value = str(provider[0].get(settings.fal_key_secret, max_age=settings.fal_key_cache_seconds))
        except GetParameterError as exc:
            # The template creates the secret without a value: until the operator stores the key it has no AWSCURRENT
            # version, and Secrets Manager answers ResourceNotFoundException (as for a secret that does not exist).
            if "ResourceNotFoundException" in str(exc):
                raise FalKeyMissing(settings.fal_key_secret, "has no value" if "staging label" in str(exc) else "does not exist") from exc
            raise
        if value.lstrip().startswith("{"):
            document = json.loads(value)
            value = document.get("FAL_KEY") or document.get("key") or ""
        if not value.strip():
            raise FalKeyMissing(settings.fal_key_secret, "is empty")
        return value.strip()

    return read


def media_http_client() -> httpx.Client:
    """For fal's API and its media hosts: redirects are not followed (the allow-list judges every URL fetched)."""
    return httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0), follow_redirects=False)


def fal_client(settings: Settings, http: httpx.Client) -> FalQueueClient:
    return FalQueueClient(http, base_url=settings.fal_queue_url, key=fal_key_reader(settings), timeout_seconds=settings.fal_timeout_seconds)
