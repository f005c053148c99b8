"""Judging one AWS call against a role's policy statements, as IAM does for identity policies.

moto enforces IAM resource by resource for S3 and SQS only; for DynamoDB,
Secrets Manager, EventBridge and CloudWatch it judges every call against
``"*"``. The local stack's AWS gateway therefore judges those calls itself,
with this evaluator: an explicit Deny wins, then any Allow whose actions and
resources match (``*`` and ``?`` wildcards, actions case-insensitive). The
condition operators the template uses (``StringEquals``, ``StringLike`` and
their negations, ``Bool``) are evaluated against the request's context keys;
a condition on a key the request does not carry does not match.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


def _listed(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _wildcard(pattern: str, value: str, *, case_sensitive: bool) -> bool:
    if not case_sensitive:
        pattern, value = pattern.lower(), value.lower()
    regex = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(regex, value, flags=re.DOTALL) is not None


def _matches_any(patterns: Iterable[str], value: str, *, case_sensitive: bool) -> bool:
    return any(_wildcard(p, value, case_sensitive=case_sensitive) for p in patterns)


def _condition_holds(condition: Mapping[str, Any], context: Mapping[str, str]) -> bool:
    for operator, tests in condition.items():
        for key, expected in tests.items():
            actual = context.get(key) if key in context else context.get(key.lower())
            values = _listed(expected)
            if actual is None:
                return False
            if operator == "StringEquals":
                ok = actual in values
            elif operator == "StringNotEquals":
                ok = actual not in values
            elif operator == "StringLike":
                ok = any(fnmatch.fnmatchcase(actual, v) for v in values)
            elif operator == "StringNotLike":
                ok = not any(fnmatch.fnmatchcase(actual, v) for v in values)
            elif operator in ("ArnEquals", "ArnLike"):
                ok = any(fnmatch.fnmatchcase(actual, v) for v in values)
            elif operator == "Bool":
                ok = actual.lower() in [v.lower() for v in values]
            else:
                return False  # an operator we do not model never grants
            if not ok:
                return False
    return True


def _applies(statement: Mapping[str, Any], action: str, resource: str, context: Mapping[str, str]) -> bool:
    if "NotAction" in statement:
        if _matches_any(_listed(statement["NotAction"]), action, case_sensitive=False):
            return False
    elif not _matches_any(_listed(statement.get("Action")), action, case_sensitive=False):
        return False
    if "NotResource" in statement:
        if _matches_any(_listed(statement["NotResource"]), resource, case_sensitive=True):
            return False
    elif not _matches_any(_listed(statement.get("Resource")), resource, case_sensitive=True):
        return False
    return _condition_holds(statement.get("Condition") or {}, context)


def evaluate(statements: Iterable[Mapping[str, Any]], action: str, resource: str, context: Mapping[str, str] | None = None) -> Decision:
    """Whether ``statements`` allow ``action`` on ``resource``."""
    context = context or {}
    allowed_by: str | None = None
    for statement in statements:
        if not _applies(statement, action, resource, context):
            continue
        sid = str(statement.get("Sid") or "a statement")
        if statement.get("Effect") == "Deny":
            return Decision(False, f"explicitly denied by {sid}")
        allowed_by = allowed_by or sid
    if allowed_by:
        return Decision(True, f"allowed by {allowed_by}")
    return Decision(False, "no identity-based policy allows it")


def statements_of(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    statement = document.get("Statement", [])
    return [dict(s) for s in ([statement] if isinstance(statement, dict) else statement)]
