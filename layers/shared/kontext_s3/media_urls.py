"""Which output URLs the webhook may fetch.

A signed webhook still names URLs; fetching any URL it names would make our
function a proxy into whatever it can reach (instance metadata, the VPC). Only
URLs that match an allow-list entry are fetched. An entry is a URL prefix,
``scheme://host[:port]/path-prefix``, whose host may start with ``*.`` to match
any subdomain: ``https://*.fal.media/``. The default lists fal's media hosts;
the local stack lists the emulator's file host.

The URL is judged as it will be requested, not as it is written: it is parsed
the way the HTTP client parses it (which resolves ``..``), and a path with dot
segments, raw or percent-encoded, or with encoded slashes, is refused outright,
since a server may resolve them after the check.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

import httpx


class MediaUrlRefused(ValueError):
    pass


_DEFAULT_PORTS = {"https": 443, "http": 80}
_ENCODED_SEPARATORS = ("%2f", "%5c")


def check_media_url(url: str, allowed: Sequence[str]) -> httpx.URL:
    """The URL to request, or :class:`MediaUrlRefused` unless it matches an entry of ``allowed``."""
    try:
        raw = urlsplit(url)
        target = httpx.URL(url)
        target_port = target.port or _DEFAULT_PORTS.get(target.scheme)
    except (ValueError, httpx.InvalidURL) as exc:
        raise MediaUrlRefused(f"not a valid URL: {url[:200]!r}") from exc
    if raw.username or raw.password or target.userinfo:
        raise MediaUrlRefused("URLs with credentials are never fetched")
    if "\\" in raw.path or any(sep in raw.path.lower() for sep in _ENCODED_SEPARATORS):
        raise MediaUrlRefused(f"the URL path has backslashes or encoded separators: {raw.path[:100]!r}")
    for segment in raw.path.split("/"):
        if unquote(unquote(segment)) in (".", ".."):
            raise MediaUrlRefused(f"the URL path has dot segments: {raw.path[:100]!r}")
    host = target.host.lower()
    path = target.path
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
        if not path.startswith(rule.path or "/"):
            continue
        return target
    raise MediaUrlRefused(f"{target.scheme}://{host}{path[:100]} is not on the allow-list (ALLOWED_MEDIA_URLS)")
