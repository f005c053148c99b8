"""The local DynamoDB keeps the promise the pipeline's locks rest on: a conditional write is atomic per item.

A job's hold, a slot and a day's budget are conditional writes; when two callers race for one, DynamoDB lets exactly
one win. moto checks the condition and applies the update as two steps, so under concurrency two writers could both
win (a CI run saw two webhooks hold one job); ``kontext_s3_tools.moto_server`` runs table operations one at a time.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

from botocore.config import Config

from kontext_s3_tools.local_stack import MotoServer, aws_session

RACERS = 20
ROUNDS = 30


def test_of_many_conditional_writes_racing_for_one_item_exactly_one_wins(moto_server: MotoServer) -> None:
    session = aws_session()
    config = Config(max_pool_connections=RACERS)
    table = f"locks-{uuid.uuid4().hex[:8]}"
    admin = session.client("dynamodb", endpoint_url=moto_server.url)
    admin.create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    doubled = []

    def client_of() -> Any:
        # A client (and connection) of its own each time, as each webhook's Lambda has.
        return session.client("dynamodb", endpoint_url=moto_server.url, config=config)

    for round_ in range(ROUNDS):
        key = {"id": {"S": f"job-{round_}"}}
        # A job-sized item (its history, its edit): moto copies it before checking, which is where racers overlapped.
        admin.put_item(TableName=table, Item={**key, "edit": {"S": "x" * 20000}, "history": {"L": [{"S": "event"}] * 400}})
        winners: list[int] = []
        start = threading.Barrier(RACERS)
        threads = [threading.Thread(target=_hold, args=(client_of, table, key, start, winners, racer)) for racer in range(RACERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if len(winners) != 1:
            doubled.append((round_, winners))
    assert doubled == []


def _hold(client_of: Callable[[], Any], table: str, key: dict[str, Any], start: threading.Barrier, winners: list[int], racer: int) -> None:
    client = client_of()
    start.wait()
    try:
        client.update_item(
            TableName=table,
            Key=key,
            UpdateExpression="SET holder = :me, history = list_append(history, :event)",
            ConditionExpression="attribute_not_exists(holder)",
            ExpressionAttributeValues={":me": {"S": str(racer)}, ":event": {"L": [{"S": "held"}]}},
        )
    except client.exceptions.ConditionalCheckFailedException:
        return
    winners.append(racer)
