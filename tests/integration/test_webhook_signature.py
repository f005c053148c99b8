"""fal's signature scheme and the JWKS cache, against keys served over HTTP by the emulator."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from kontext_s3.webhook_signature import JwksCache, JwksUnavailable, SignatureError, verify_fal_webhook
from kontext_s3_tools.emulator import FalEmulator, WebhookSigner
from kontext_s3_tools.local_stack import free_port
from tests.adversarial.hostile import Reply, ScriptedHost


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counting_client() -> tuple[httpx.Client, list[str]]:
    fetched: list[str] = []
    return httpx.Client(event_hooks={"request": [lambda request: fetched.append(str(request.url))]}), fetched


def signed(signer: WebhookSigner, body: bytes = b'{"request_id": "r1"}') -> tuple[dict[str, str], bytes]:
    return signer.headers("r1", "user-1", body), body


def test_keys_are_fetched_once_and_reused(emulator: FalEmulator) -> None:
    http, fetched = counting_client()
    jwks = JwksCache(http, emulator.jwks_url)
    for _ in range(3):
        headers, body = signed(emulator.signer)
        assert verify_fal_webhook(headers, body, jwks).request_id == "r1"
    assert fetched == [emulator.jwks_url]


def test_a_rotated_key_is_learned_by_fetching_again(emulator: FalEmulator) -> None:
    http, fetched = counting_client()
    clock = Clock()
    jwks = JwksCache(http, emulator.jwks_url, clock=clock)
    verify_fal_webhook(*signed(emulator.signer), jwks)
    old_signer = emulator.signer
    emulator.signer = WebhookSigner(key_id="emulator-2")  # fal rotates its key
    try:
        clock.now += 120
        assert verify_fal_webhook(*signed(emulator.signer), jwks).user_id == "user-1"
        assert len(fetched) == 2
        # Forged calls within a minute of a fetch cannot make us fetch again...
        for _ in range(5):
            with pytest.raises(SignatureError):
                verify_fal_webhook(*signed(WebhookSigner()), jwks)
        assert len(fetched) == 2
        # ...and after that minute, a burst of them costs one fetch.
        clock.now += 61
        for _ in range(5):
            with pytest.raises(SignatureError):
                verify_fal_webhook(*signed(WebhookSigner()), jwks)
        assert len(fetched) == 3
    finally:
        emulator.signer = old_signer


def test_the_cache_expires(emulator: FalEmulator) -> None:
    http, fetched = counting_client()
    clock = Clock()
    jwks = JwksCache(http, emulator.jwks_url, ttl_seconds=3600, clock=clock)
    verify_fal_webhook(*signed(emulator.signer), jwks)
    clock.now += 3601
    verify_fal_webhook(*signed(emulator.signer), jwks)
    assert len(fetched) == 2


def test_the_signed_message_is_over_the_exact_bytes(emulator: FalEmulator) -> None:
    jwks = JwksCache(httpx.Client(), emulator.jwks_url)
    headers, body = signed(emulator.signer, b'{"request_id":"r1",  "a": 1}')
    verify_fal_webhook(headers, body, jwks)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_fal_webhook(headers, b'{"request_id":"r1","a":1}', jwks)  # same JSON, other bytes


def test_header_names_are_case_insensitive_and_checked(emulator: FalEmulator) -> None:
    jwks = JwksCache(httpx.Client(), emulator.jwks_url)
    headers, body = signed(emulator.signer)
    assert verify_fal_webhook({k.lower(): v for k, v in headers.items()}, body, jwks).request_id == "r1"
    with pytest.raises(SignatureError, match="not hex"):
        verify_fal_webhook({**headers, "X-Fal-Webhook-Signature": "zz"}, body, jwks)
    with pytest.raises(SignatureError, match="window"):
        verify_fal_webhook(headers, body, jwks, now=time.time() + 301)


def test_unreachable_keys_are_unavailable_not_invalid() -> None:
    jwks = JwksCache(httpx.Client(), f"http://127.0.0.1:{free_port()}/.well-known/jwks.json")
    headers, body = signed(WebhookSigner())
    with pytest.raises(JwksUnavailable):
        verify_fal_webhook(headers, body, jwks)


def test_a_jwks_key_written_with_base64_padding_verifies() -> None:
    signer = WebhookSigner()
    jwk = signer.jwk()
    padded = {**jwk, "x": jwk["x"] + "=" * (-len(jwk["x"]) % 4)}
    assert padded["x"].endswith("=")  # a 32-byte key is 43 characters unpadded
    host = ScriptedHost(lambda _: Reply(200, json.dumps({"keys": [padded]}).encode(), {"Content-Type": "application/json"}))
    try:
        jwks = JwksCache(httpx.Client(), f"{host.url}/.well-known/jwks.json")
        assert verify_fal_webhook(*signed(signer), jwks).request_id == "r1"
    finally:
        host.stop()
