"""Checking that a webhook comes from fal, as fal documents it.

Headers ``X-Fal-Webhook-Request-Id``, ``-User-Id``, ``-Timestamp`` (unix
seconds) and ``-Signature`` (hex). The signed message is the UTF-8 of::

    request_id + "\\n" + user_id + "\\n" + timestamp + "\\n" + sha256_hex(raw_body)

over the exact bytes received, verified with Ed25519 against the keys of fal's
JWKS; any key that verifies is enough. A timestamp more than 300 s away from
now is refused (replay window).

fal's headers name no key id, so "a key id we do not know" shows up as "no
cached key verifies": the JWKS is then fetched again (at most once a minute,
so forged requests cannot make us hammer fal) and the check repeated. Keys are
cached for ``JWKS_CACHE_SECONDS`` across invocations.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

HEADERS = ("x-fal-webhook-request-id", "x-fal-webhook-user-id", "x-fal-webhook-timestamp", "x-fal-webhook-signature")


class SignatureError(Exception):
    """The request is not a valid fal webhook (answer 401)."""


class JwksUnavailable(Exception):
    """fal's keys could not be fetched (answer 503, so fal retries)."""


@dataclass(frozen=True)
class VerifiedWebhook:
    request_id: str
    user_id: str
    timestamp: int


class JwksCache:
    def __init__(
        self,
        http: httpx.Client,
        url: str,
        *,
        ttl_seconds: float = 6 * 3600,
        min_refresh_seconds: float = 60,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._url = url
        self._ttl = ttl_seconds
        self._min_refresh = min_refresh_seconds
        self._clock = clock
        self._keys: list[Ed25519PublicKey] = []
        self._fetched_at: float | None = None
        self._lock = threading.Lock()

    def keys(self) -> list[Ed25519PublicKey]:
        with self._lock:
            if self._fetched_at is None or self._clock() - self._fetched_at > self._ttl:
                self._fetch()
            return list(self._keys)

    def refresh(self) -> bool:
        """Fetch again unless we just did; True when a fetch happened."""
        with self._lock:
            if self._fetched_at is not None and self._clock() - self._fetched_at < self._min_refresh:
                return False
            self._fetch()
            return True

    def _fetch(self) -> None:
        try:
            response = self._http.get(self._url, timeout=5.0)
            response.raise_for_status()
            document = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise JwksUnavailable(f"cannot fetch fal's JWKS from {self._url}: {exc}") from exc
        keys = []
        for jwk in document.get("keys", []) if isinstance(document, dict) else []:
            if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519" and isinstance(jwk.get("x"), str):
                raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
                keys.append(Ed25519PublicKey.from_public_bytes(raw))
        if not keys:
            raise JwksUnavailable(f"fal's JWKS at {self._url} holds no Ed25519 key")
        self._keys = keys
        self._fetched_at = self._clock()


def verify_fal_webhook(
    headers: Mapping[str, str],
    raw_body: bytes,
    jwks: JwksCache,
    *,
    tolerance_seconds: int = 300,
    now: float | None = None,
) -> VerifiedWebhook:
    """The verified sender of a webhook, or :class:`SignatureError` saying what is wrong."""
    lowered = {k.lower(): v for k, v in headers.items()}
    missing = [name for name in HEADERS if not lowered.get(name)]
    if missing:
        raise SignatureError(f"missing header {', '.join(missing)}")
    request_id = lowered["x-fal-webhook-request-id"]
    user_id = lowered["x-fal-webhook-user-id"]
    stamp = lowered["x-fal-webhook-timestamp"]
    try:
        timestamp = int(stamp)
    except ValueError as exc:
        raise SignatureError("X-Fal-Webhook-Timestamp is not a unix time") from exc
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        raise SignatureError(f"timestamp is {int(current - timestamp)} s from now, outside the {tolerance_seconds} s window")
    try:
        signature = bytes.fromhex(lowered["x-fal-webhook-signature"])
    except (ValueError, binascii.Error) as exc:
        raise SignatureError("X-Fal-Webhook-Signature is not hex") from exc
    message = "\n".join([request_id, user_id, stamp, hashlib.sha256(raw_body).hexdigest()]).encode("utf-8")
    if _any_verifies(jwks.keys(), signature, message) or (jwks.refresh() and _any_verifies(jwks.keys(), signature, message)):
        return VerifiedWebhook(request_id=request_id, user_id=user_id, timestamp=timestamp)
    raise SignatureError("signature does not verify with any of fal's keys")


def _any_verifies(keys: list[Ed25519PublicKey], signature: bytes, message: bytes) -> bool:
    for key in keys:
        try:
            key.verify(signature, message)
        except InvalidSignature:
            continue
        return True
    return False
