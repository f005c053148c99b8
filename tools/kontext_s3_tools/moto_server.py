"""moto's server (``python -m kontext_s3_tools.moto_server``), with S3's notifications put right.

moto's notification records carry neither ``versionId`` nor a ``sequencer``; S3's carry both (the version on a
versioned bucket, the sequencer always). Without them the submit function pays a HEAD per upload to find the
version, which it never pays on AWS; here the records name them as S3 does. One sequencer is drawn per change,
from one counter: every destination of the change (queue, topic, function, EventBridge) sees the same one, and a
later change of a key has a greater one. A removal's record names the key, version and sequencer only, as S3's do
(moto adds the size and ETag of what was removed).

moto's PutObject stores an upload's tags through the same backend call as the
PutObjectTagging API, and that call sends ``s3:ObjectTagging:Put``: every
upload, tagged or not, is followed by a tagging event. S3 sends that event for
the tagging APIs (PutObjectTagging), which is what the pipeline routes for
late tags. Here the event is sent only when the PutObjectTagging API is what
changed the tags. (The submit function takes a repeated edit as a duplicate
either way; ``tests/integration/test_submit.py`` shows it with the tagging API.)
Likewise moto's CompleteMultipartUpload stores the object through PutObject and
sends ``s3:ObjectCreated:Put`` before ``s3:ObjectCreated:CompleteMultipartUpload``;
S3 sends the second only.

Deletes on a versioned bucket: moto sends nothing for a plain delete (S3 sends
``s3:ObjectRemoved:DeleteMarkerCreated``, naming the new delete marker), and
for a version deleted by id it sends ``s3:ObjectRemoved:Delete`` only when no
version of the key is left, naming the latest version rather than the one
deleted (S3 sends it for every version deleted, naming it). Here both are sent as S3 sends them.

S3's events through EventBridge (a bucket whose notification configuration has
``EventBridgeConfiguration``, as buckets the stack did not create are attached):

* ``GetBucketNotificationConfiguration`` answers ``EventBridgeConfiguration: {}``
  once it was put, as S3 does (moto leaves it out, so a tool merging its own
  configuration into a bucket's could not see that delivery is on);
* each change is delivered to the rules of the account's default bus only (S3
  does not send to custom buses; moto sent to every bus), skipping disabled rules;
* ``detail`` is as S3 fills it (moto 5.2 sends ``eTag``, a ``version-id`` of
  ``"null"`` on an unversioned bucket, a reason of ``ObjectCreated`` or
  ``ObjectRemoved``, one constant sequencer, one constant event id and
  request id, and no ``deletion-type``):
  - ``Object Created``: ``object.{key, size, etag, version-id, sequencer}``
    and ``reason`` = the API (``PutObject``, ``POST Object``, ``CopyObject``,
    ``CompleteMultipartUpload``);
  - ``Object Deleted``: ``object.{key, version-id, sequencer}`` (a delete
    marker's also has its ``etag``, the empty object's), ``reason``
    ``DeleteObject`` and ``deletion-type`` ``Permanently Deleted`` (an
    unversioned object, or a version deleted by id) or ``Delete Marker Created``;
  - ``Object Tags Added`` / ``Object Tags Deleted`` (the tagging APIs only)
    and ``Object ACL Updated``: ``object.{key, etag, version-id}``, no size,
    sequencer or reason (restores and transitions: with the size);
  (the fields each type carries: S3's documentation's examples, EventBridge's
  schema registry for ``aws.s3``, and events AWS sent that are published);
  ``version-id`` only on a versioned bucket; ``request-id``, ``requester``
  (the account) and ``source-ip-address`` on each; a new event id per event.
  The key is sent as stored, not URL-encoded as S3's own notification records
  encode it: AWS does not document EventBridge's encoding.

DynamoDB's writes are atomic per item, and its conditional writes are the
pipeline's locks (a job's hold, a slot, a day's budget). moto checks a
condition and then applies the update as two steps of Python, so two
concurrent writers can both pass one condition (seen under load: two webhooks
holding one job). Here the table operations run one at a time, as each item's
do on DynamoDB (``tests/integration/test_local_dynamodb.py``).
"""

from __future__ import annotations

import copy
import itertools
import random
import string
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

from moto.core.utils import unix_time
from moto.dynamodb.models import DynamoDBBackend
from moto.s3 import models, notifications, responses
from moto.server import main

Event = notifications.S3NotificationEvent

_calls = threading.local()
_sequence = itertools.count(1)
_get_s3_event = notifications._get_s3_event
_send_event = notifications.send_event
_backend_tagging = models.S3Backend.put_object_tagging
_api_tagging = responses.S3Response.put_object_tagging
_complete_multipart = models.S3Backend.complete_multipart_upload
_delete_object = models.S3Backend.delete_object
_get_bucket_notification = responses.S3Response.get_bucket_notification

#: What a delete marker's EventBridge event names as its ETag: the empty object's MD5, as S3's does.
EMPTY_ETAG = "d41d8cd98f00b204e9800998ecf8427e"
#: EventBridge's ``reason`` for each S3 event it carries one for (creations and deletions).
REASONS: dict[str, str] = {
    Event.OBJECT_CREATED_PUT_EVENT: "PutObject",
    Event.OBJECT_CREATED_POST_EVENT: "POST Object",
    Event.OBJECT_CREATED_COPY_EVENT: "CopyObject",
    Event.OBJECT_CREATED_COMPLETE_MULTIPART_UPLOAD_EVENT: "CompleteMultipartUpload",
    Event.OBJECT_REMOVED_DELETE_EVENT: "DeleteObject",
    Event.OBJECT_REMOVED_DELETE_MARKER_CREATED_EVENT: "DeleteObject",
    Event.LIFECYCLEEXPIRATION_DELETE_EVENT: "Lifecycle Expiration",
    Event.LIFECYCLE_EXPIRATION_DELETE_MARKER_CREATED_EVENT: "Lifecycle Expiration",
}
#: EventBridge's S3 detail types whose ``object`` has no size (the others, creations, restores and transitions, have).
_NO_SIZE = {"Object Deleted", "Object Tags Added", "Object Tags Deleted", "Object ACL Updated"}
_MARKER_EVENTS: set[str] = {Event.OBJECT_REMOVED_DELETE_MARKER_CREATED_EVENT, Event.LIFECYCLE_EXPIRATION_DELETE_MARKER_CREATED_EVENT}


@dataclass(frozen=True)
class _DeleteMarker:
    """A delete marker as the notification code reads a key (moto's ``FakeDeleteMarker`` has no ETag or size)."""

    name: str
    version_id: str
    etag: str = EMPTY_ETAG
    size: int = 0


def _quiet(*event_names: Any) -> set[Any]:
    quiet: set[Any] = getattr(_calls, "quiet", None) or set()
    _calls.quiet = quiet | set(event_names)
    return quiet


def _sequencer() -> str:
    # Ordered per key, as S3's are: a hexadecimal string compared by length, then lexically.
    return getattr(_calls, "sequencer", None) or f"{next(_sequence):016X}"


def _send_unless_quiet(account_id: str, event_name: Any, bucket: Any, key: Any) -> None:
    if event_name in (getattr(_calls, "quiet", None) or ()):
        return
    _calls.sequencer = f"{next(_sequence):016X}"  # one change: one sequencer, whichever destinations hear of it
    try:
        _send_event(account_id, event_name, bucket, key)
    finally:
        _calls.sequencer = None


def _backend_tagging_quiet_unless_api(self: Any, key: Any, tags: Any) -> Any:
    before = _quiet() if getattr(_calls, "api", False) else _quiet(Event.OBJECT_TAGGING_PUT_EVENT)
    try:
        return _backend_tagging(self, key, tags)
    finally:
        _calls.quiet = before


def _api_tagging_marked(self: Any) -> Any:
    _calls.api = True
    try:
        return _api_tagging(self)
    finally:
        _calls.api = False


def _complete_multipart_once(self: Any, *args: Any, **kwargs: Any) -> Any:
    before = _quiet(Event.OBJECT_CREATED_PUT_EVENT)
    try:
        return _complete_multipart(self, *args, **kwargs)
    finally:
        _calls.quiet = before


def _delete_object_as_s3_notifies(
    self: Any, bucket_name: str, key_name: str, version_id: str | None = None, bypass: bool = False
) -> tuple[bool, dict[str, Any]]:
    bucket = self.get_bucket(bucket_name)
    if not getattr(bucket, "is_versioned", False):
        return _delete_object(self, bucket_name, key_name, version_id, bypass)
    deleted = None
    if version_id is not None:
        deleted = next((k for k in bucket.keys.getlist(key_name, []) if str(k.version_id) == str(version_id)), None)
    before = _quiet(Event.OBJECT_REMOVED_DELETE_EVENT)
    try:
        done, meta = _delete_object(self, bucket_name, key_name, version_id, bypass)
    finally:
        _calls.quiet = before
    if not done:
        return done, meta
    if version_id is None:
        marker = bucket.keys.get(key_name)
        event, key = Event.OBJECT_REMOVED_DELETE_MARKER_CREATED_EVENT, _DeleteMarker(key_name, str(marker.version_id))
    elif deleted is not None:
        event, key = Event.OBJECT_REMOVED_DELETE_EVENT, deleted
        if isinstance(deleted, models.FakeDeleteMarker):
            key = _DeleteMarker(key_name, str(deleted.version_id))
    else:
        return done, meta
    notifications.send_event(self.account_id, event, bucket, key)
    return done, meta


def _s3_event_as_s3_sends_it(event_name: str, bucket: Any, key: Any, notification_id: str) -> dict[str, Any]:
    event: dict[str, Any] = _get_s3_event(event_name, bucket, key, notification_id)
    record = event["Records"][0]["s3"]["object"]
    version = getattr(key, "version_id", None)
    if version and version != "null":
        record["versionId"] = version
    if event_name.startswith("s3:ObjectRemoved:"):
        record.pop("size", None)
        record.pop("eTag", None)
    record["sequencer"] = _sequencer()
    return event


def _request_id() -> str:
    return "".join(random.choices(string.ascii_uppercase + string.digits, k=16))


def _event_bridge_detail(account_id: str, bucket: Any, event_name: str, key: Any) -> dict[str, Any]:
    """``detail`` as S3 fills it for ``event_name`` (see the module docstring)."""
    detail_type = notifications._detail_type(event_name)
    obj: dict[str, Any] = {"key": key.name}
    created, deleted = detail_type == "Object Created", detail_type == "Object Deleted"
    if detail_type not in _NO_SIZE:
        obj["size"] = key.size
    if not deleted or event_name in _MARKER_EVENTS:
        obj["etag"] = str(key.etag).replace('"', "")
    version = getattr(key, "version_id", None)
    if bucket.is_versioned and version and version != "null":
        obj["version-id"] = version
    if created or deleted:
        obj["sequencer"] = _sequencer()
    detail: dict[str, Any] = {
        "version": "0",
        "bucket": {"name": bucket.name},
        "object": obj,
        "request-id": _request_id(),
        "requester": account_id,
        "source-ip-address": "127.0.0.1",
    }
    if event_name in REASONS:
        detail["reason"] = REASONS[event_name]
    if deleted:
        detail["deletion-type"] = "Delete Marker Created" if event_name in _MARKER_EVENTS else "Permanently Deleted"
    return detail


def _send_event_bridge_message(account_id: str, bucket: Any, event_name: str, key: Any) -> None:
    """The change as S3 puts it on the account's default bus, to that bus's enabled rules."""
    try:
        from moto.events.models import events_backends  # noqa: PLC0415 - as moto imports it, when needed
        from moto.events.utils import _BASE_EVENT_MESSAGE  # noqa: PLC0415

        event = copy.deepcopy(_BASE_EVENT_MESSAGE)
        event.update(
            {
                "id": str(uuid.uuid4()),
                "detail-type": notifications._detail_type(event_name),
                "source": "aws.s3",
                "account": account_id,
                "time": unix_time(),
                "region": bucket.region_name,
                "resources": [bucket.arn],
                "detail": _event_bridge_detail(account_id, bucket, event_name, key),
            }
        )
        bus = events_backends[account_id][bucket.region_name].event_buses.get("default")
        for rule in list(bus.rules.values()) if bus else []:
            if getattr(rule, "state", "ENABLED") != "DISABLED":
                rule.send_to_targets(event, transform_input=False)
    except Exception:  # noqa: S110 - as moto: delivery is asynchronous on AWS, and never fails the S3 call
        pass


_EVENT_BRIDGE_ON = b"<EventBridgeConfiguration></EventBridgeConfiguration>"


def _get_bucket_notification_with_event_bridge(self: Any) -> Any:
    answer = _get_bucket_notification(self)
    configuration = self.backend.get_bucket_notification_configuration(self.bucket_name)
    if configuration is None or configuration.event_bridge is None:
        return answer
    status, headers, body = answer
    text = body.encode() if isinstance(body, str) else bytes(body)
    if b"</NotificationConfiguration>" in text:
        text = text.replace(b"</NotificationConfiguration>", _EVENT_BRIDGE_ON + b"</NotificationConfiguration>", 1)
    else:  # an empty document: <NotificationConfiguration .../>
        start = text.index(b"<NotificationConfiguration")
        end = text.index(b"/>", start)
        text = text[:end] + b">" + _EVENT_BRIDGE_ON + b"</NotificationConfiguration>" + text[end + 2 :]
    headers = {k: v for k, v in dict(headers).items() if k.lower() != "content-length"}
    return status, headers, text.decode() if isinstance(body, str) else text


notifications._get_s3_event = _s3_event_as_s3_sends_it
notifications.send_event = _send_unless_quiet
notifications._send_event_bridge_message = _send_event_bridge_message
models.S3Backend.put_object_tagging = _backend_tagging_quiet_unless_api  # type: ignore[method-assign]
models.S3Backend.complete_multipart_upload = _complete_multipart_once  # type: ignore[method-assign]
models.S3Backend.delete_object = _delete_object_as_s3_notifies  # type: ignore[method-assign]
responses.S3Response.put_object_tagging = _api_tagging_marked  # type: ignore[method-assign]
responses.S3Response.get_bucket_notification = _get_bucket_notification_with_event_bridge  # type: ignore[method-assign]


#: One table operation at a time: see the module's docstring (DynamoDB's per-item atomicity).
_dynamodb_lock = threading.RLock()
#: The backend's calls that read or write items (BatchGetItem, BatchWriteItem and TransactGetItems call these).
_ITEM_OPERATIONS = ("put_item", "get_item", "update_item", "delete_item", "query", "scan", "transact_write_items")


def _one_at_a_time(operation: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(operation)
    def atomic(*args: Any, **kwargs: Any) -> Any:
        with _dynamodb_lock:
            return operation(*args, **kwargs)

    return atomic


for _name in _ITEM_OPERATIONS:
    setattr(DynamoDBBackend, _name, _one_at_a_time(getattr(DynamoDBBackend, _name)))

if __name__ == "__main__":
    main()
