"""Which output URLs the webhook may fetch.

A signed webhook still names URLs; fetching any URL it names would make our
function a proxy into whatever it can reach (instance metadata, the VPC). Only
URLs that match an allow-list entry are fetched. An entry is a URL prefix,
``scheme://host[:port]/path-prefix``, whose host may start with ``*.`` to match
any subdomain: ``https://*.fal.media/``. The default lists fal's media hosts;
the local stack lists the emulator's file host.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit


class MediaUrlRefused(ValueError):
    pass


_DEFAULT_PORTS = {"https": 443, "http": 80}


def check_media_url(url: str, allowed: Sequence[str]) -> None:
    """Raise :class:`MediaUrlRefused` unless ``url`` matches an entry of ``allowed``."""
    try:
        target = urlsplit(url)
        target_port = target.port or _DEFAULT_PORTS.get(target.scheme)
    except ValueError as exc:
        raise MediaUrlRefused(f"not a valid URL: {url[:200]!r}") from exc
    if target.username or target.password:
        raise MediaUrlRefused("URLs with credentials are never fetched")
    host = (target.hostname or "").lower()
    for entry in allowed:
        rule = urlsplit(entry)
        rule_host = (rule.hostname or "").lower()
        if rule.scheme != target.scheme:
            continue
        if (rule.port or _DEFAULT_PORTS.get(rule.scheme)) != target_port:
            continue
        if rule_host.startswith("*."):
            if not host.endswith(rule_host[1:]):
                continue
        elif host != rule_host:
            continue
        if not target.path.startswith(rule.path or "/"):
            continue
        return
    raise MediaUrlRefused(f"{target.scheme}://{host}{target.path[:100]} is not on the allow-list (ALLOWED_MEDIA_URLS)")
