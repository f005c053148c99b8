"""A DynamoDB table over the low-level client, with the resource API's plain Python values.

``boto3.resource("dynamodb")`` loads a resource model on top of the client's
(about 10 ms more at every cold start, measured by ``make bench``); the few
calls the stores make need only the client and boto3's type (de)serializer.
Keys, items, attribute values and results are plain Python, as with a
resource ``Table``, so a store accepts either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

if TYPE_CHECKING:
    from botocore.exceptions import ClientError
    from mypy_boto3_dynamodb import DynamoDBClient

_SERIALIZE = TypeSerializer().serialize
_DESERIALIZE = TypeDeserializer().deserialize


def _to_wire(values: Mapping[str, Any]) -> dict[str, Any]:
    return {name: _SERIALIZE(value) for name, value in values.items()}


def _from_wire(values: Mapping[str, Any]) -> dict[str, Any]:
    return {name: _DESERIALIZE(value) for name, value in values.items()}


def conditional_failure(exc: ClientError) -> bool:
    """A conditional write refused: its condition did not hold."""
    return exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


def retried(exc: ClientError) -> bool:
    """The SDK sent the request more than once, so an earlier attempt of it may have landed (its answer was lost)."""
    return bool(exc.response.get("ResponseMetadata", {}).get("RetryAttempts"))


#: What the stores call ``get_item``/``put_item``/``update_item``/``query`` on: a resource ``Table``, or :class:`Table`.
TableLike = Any


class Table:
    def __init__(self, client: DynamoDBClient, name: str) -> None:
        self.client = client
        self.name = name

    def get_item(self, *, Key: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        answer = self.client.get_item(TableName=self.name, Key=_to_wire(Key), **kwargs)
        return {"Item": _from_wire(answer["Item"])} if "Item" in answer else {}

    def put_item(self, *, Item: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        self.client.put_item(TableName=self.name, Item=_to_wire(Item), **_values(kwargs))
        return {}

    def update_item(self, *, Key: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        answer = self.client.update_item(TableName=self.name, Key=_to_wire(Key), **_values(kwargs))
        return {"Attributes": _from_wire(answer["Attributes"])} if "Attributes" in answer else {}

    def query(self, **kwargs: Any) -> dict[str, Any]:
        return _page(self.client.query(TableName=self.name, **_values(kwargs)))

    def batch_get(self, keys: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The items at ``keys`` that exist, read consistently (at most 100 keys: one BatchGetItem)."""
        request: dict[str, Any] = {self.name: {"Keys": [_to_wire(k) for k in keys], "ConsistentRead": True}}
        found: list[dict[str, Any]] = []
        while request:
            answer = self.client.batch_get_item(RequestItems=request)
            found.extend(_from_wire(item) for item in answer.get("Responses", {}).get(self.name, []))
            request = answer.get("UnprocessedKeys") or {}
        return found

    def scan(self, **kwargs: Any) -> dict[str, Any]:
        return _page(self.client.scan(TableName=self.name, **_values(kwargs)))


def _page(answer: Mapping[str, Any]) -> dict[str, Any]:
    """A query or scan page with plain values, as a resource ``Table`` returns it."""
    result: dict[str, Any] = {"Items": [_from_wire(item) for item in answer.get("Items", [])], "Count": answer.get("Count", 0)}
    if "LastEvaluatedKey" in answer:
        result["LastEvaluatedKey"] = _from_wire(answer["LastEvaluatedKey"])
    return result


def _values(kwargs: dict[str, Any]) -> dict[str, Any]:
    converted = dict(kwargs)
    for name in ("ExpressionAttributeValues", "ExclusiveStartKey"):
        if name in converted:
            converted[name] = _to_wire(converted[name])
    return converted
