"""moto's server (``python -m kontext_s3_tools.moto_server``), with S3's notifications put right.

moto's notification records carry neither ``versionId`` nor a ``sequencer``; S3's carry both (the version on a
versioned bucket, the sequencer always). Without them the submit function pays a HEAD per upload to find the
version, which it never pays on AWS; here the records name them as S3 does.

moto's PutObject stores an upload's tags through the same backend call as the
PutObjectTagging API, and that call sends ``s3:ObjectTagging:Put``: every
upload, tagged or not, is followed by a tagging event. S3 sends that event for
the tagging APIs (PutObjectTagging), which is what the pipeline routes for
late tags. Here the event is sent only when the PutObjectTagging API is what
changed the tags. (The submit function takes a repeated edit as a duplicate
either way; ``tests/integration/test_submit.py`` shows it with the tagging API.)
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

from moto.s3 import models, notifications, responses
from moto.server import main

_calls = threading.local()
_sequence = itertools.count(1)
_get_s3_event = notifications._get_s3_event
_send_event = notifications.send_event
_backend_tagging = models.S3Backend.put_object_tagging
_api_tagging = responses.S3Response.put_object_tagging


def _send_unless_quiet(account_id: str, event_name: Any, bucket: Any, key: Any) -> None:
    if event_name == notifications.S3NotificationEvent.OBJECT_TAGGING_PUT_EVENT and getattr(_calls, "quiet", False):
        return
    _send_event(account_id, event_name, bucket, key)


def _backend_tagging_quiet_unless_api(self: Any, key: Any, tags: Any) -> Any:
    _calls.quiet = not getattr(_calls, "api", False)
    try:
        return _backend_tagging(self, key, tags)
    finally:
        _calls.quiet = False


def _api_tagging_marked(self: Any) -> Any:
    _calls.api = True
    try:
        return _api_tagging(self)
    finally:
        _calls.api = False


def _s3_event_as_s3_sends_it(event_name: str, bucket: Any, key: Any, notification_id: str) -> dict[str, Any]:
    event: dict[str, Any] = _get_s3_event(event_name, bucket, key, notification_id)
    record = event["Records"][0]["s3"]["object"]
    version = getattr(key, "version_id", None)
    if version and version != "null":
        record["versionId"] = version
    # Ordered per key, as S3's are: a hexadecimal string compared by length, then lexically.
    record["sequencer"] = f"{next(_sequence):016X}"
    return event


notifications._get_s3_event = _s3_event_as_s3_sends_it
notifications.send_event = _send_unless_quiet
models.S3Backend.put_object_tagging = _backend_tagging_quiet_unless_api  # type: ignore[method-assign]
responses.S3Response.put_object_tagging = _api_tagging_marked  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
