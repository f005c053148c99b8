"""The jobs table's key space: every kind of item it holds, and the one place their keys are spelt.

The table has one key, ``job_id``. A job's item is keyed by its 32-hex-digit id;
every other item starts with ``_`` (no job id does), so a scan can tell them apart:

- ``_upload#<upload id>``: the jobs of one upload, one per edit (``jobs``);
- ``_failure#<upload id>``: the latest failed delivery of an upload's event (``delivery_failures``);
- ``_slots``: the jobs holding one of ``MaxJobsAtFal`` slots (``admission``);
- ``_budget#<UTC day>``: images charged to that day's ``DailyImageBudget`` (``admission``);
- ``_fal-account``: the fal account whose webhooks are ours (``fal_account``);
- ``_latest#<key id>``: the latest upload of a key of an unversioned bucket, which a delete cancels (``latest_uploads``).
"""

from __future__ import annotations

from typing import Any

#: The table's only key attribute.
KEY = "job_id"
UPLOAD_PREFIX = "_upload#"
FAILURE_PREFIX = "_failure#"
SLOTS_ID = "_slots"
BUDGET_PREFIX = "_budget#"
FAL_ACCOUNT_ID = "_fal-account"
LATEST_UPLOAD_PREFIX = "_latest#"


def job(job_id: str) -> dict[str, Any]:
    return {KEY: job_id}


def upload(upload_id: str) -> dict[str, Any]:
    return {KEY: f"{UPLOAD_PREFIX}{upload_id}"}


def failure(upload_id: str) -> dict[str, Any]:
    return {KEY: f"{FAILURE_PREFIX}{upload_id}"}


def slots() -> dict[str, Any]:
    return {KEY: SLOTS_ID}


def budget(day: str) -> dict[str, Any]:
    return {KEY: f"{BUDGET_PREFIX}{day}"}


def fal_account() -> dict[str, Any]:
    return {KEY: FAL_ACCOUNT_ID}


def latest_upload(key_id: str) -> dict[str, Any]:
    return {KEY: f"{LATEST_UPLOAD_PREFIX}{key_id}"}


def is_job(item_id: str) -> bool:
    """A job's own item, not one of the table's bookkeeping items."""
    return not item_id.startswith("_")
