"""Parsing the sample events in events/ (as AWS sends them) and moto's thinner ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kontext_s3.s3_events import MalformedNotification, parse_notification

EVENTS = Path(__file__).resolve().parents[2] / "events"


def body_of(name: str) -> str:
    return str(json.loads((EVENTS / name).read_text())["Records"][0]["body"])


def test_a_real_s3_put_event() -> None:
    [change] = parse_notification(body_of("sqs-s3-put.json"))
    assert change.created and change.key == "inputs/kitchen/flour.jpg"
    assert change.version_id == "3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY" and change.sequencer == "0062E4F5A1B2C3D4E5"


def test_keys_are_decoded_plus_percent_and_unicode() -> None:
    [change] = parse_notification(body_of("sqs-s3-put-unicode-key.json"))
    assert change.key == "inputs/my photos/café ☕ 50% off.jpg"


def test_the_test_event_has_no_changes() -> None:
    assert parse_notification(body_of("sqs-s3-test-event.json")) == []


def test_moto_style_events_without_identity_or_version_parse() -> None:
    body = {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "awsRegion": "us-east-1",
                "eventTime": "2026-11-24T10:00:00.000Z",
                "eventName": "ObjectCreated:Put",
                "s3": {"bucket": {"name": "b", "arn": "arn:aws:s3:::b"}, "object": {"key": "inputs%2Fa+b.jpg", "size": 3, "eTag": "e"}},
            }
        ]
    }
    [change] = parse_notification(json.dumps(body))
    assert (change.key, change.version_id, change.sequencer, change.etag) == ("inputs/a b.jpg", None, None, "e")


@pytest.mark.parametrize("body", ["not json", "[]", '{"Records": "x"}', '{"hello": 1}', '{"Records": [{"eventSource": "aws:sqs"}]}'])
def test_anything_else_is_malformed(body: str) -> None:
    with pytest.raises(MalformedNotification):
        parse_notification(body)
