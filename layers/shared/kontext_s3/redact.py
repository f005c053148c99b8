"""Keeping credentials out of what we store and send.

A presigned input URL carries the function role's access key id, session token
and signature in its query (``X-Amz-*``). fal's error payloads may echo the
input, ``image_url`` included, and error messages may quote URLs. Everything
written to S3, DynamoDB, events and logs passes through :func:`redact`, which
drops those query parameters (SigV4 and SigV2) and any ``Authorization`` value.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_URL = re.compile(r"""https?://[^\s"'<>\\]+""")
_AUTH_HEADER = re.compile(r"(?i)(authorization\s*[:=]\s*)(\S+(?:\s+\S+)?)")
_SIGV2 = {"awsaccesskeyid", "signature", "expires"}
REDACTED = "[redacted]"


def _credential_param(name: str) -> bool:
    lowered = name.lower()
    return lowered.startswith("x-amz-") or lowered in _SIGV2


def redact_url(url: str) -> str:
    """``url`` without credential query parameters."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.query:
        return url
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not _credential_param(k)]
    if len(kept) == len(parse_qsl(parts.query, keep_blank_values=True)):
        return url
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(kept), parts.fragment))


def redact_text(text: str) -> str:
    if "://" not in text and "uthorization" not in text:
        return text
    text = _URL.sub(lambda match: redact_url(match.group(0)), text)
    return _AUTH_HEADER.sub(lambda match: match.group(1) + REDACTED, text)


def redact(value: Any) -> Any:
    """``value`` (text, or JSON-like data) with credentials removed; other values unchanged."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and k.lower() == "authorization" else redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value
