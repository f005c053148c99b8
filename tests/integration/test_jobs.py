"""The jobs table's transitions against DynamoDB (moto over HTTP)."""

from __future__ import annotations

from typing import Any

import pytest

from kontext_s3.jobs import JobConflict, JobState, JobStore, now_ms
from tests.helpers import Aws


class AnswerLostOnce:
    """A table whose first write lands but whose answer is lost, so the SDK sends it again.

    This is what botocore's retry does after a timeout or a reset connection: the
    retry of a conditional write then fails the condition its own first attempt changed.
    """

    def __init__(self, table: Any) -> None:
        self._table = table

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._table, name)
        if name not in ("put_item", "update_item"):
            return attribute

        def twice(**kwargs: Any) -> Any:
            attribute(**kwargs)  # lands; its answer never arrives
            return attribute(**kwargs)  # the retry

        return twice


def new_job(store: JobStore, job_id: str = "a" * 32, lease_ms: int = 60_000) -> Any:
    return store.create(
        job_id=job_id,
        bucket="b",
        key="inputs/k.jpg",
        version_id="v",
        etag="e",
        sequencer=None,
        event_time=None,
        output_prefix="outputs/k.jpg/x/",
        lease_ms=lease_ms,
    )


def test_only_one_create_wins(aws: Aws) -> None:
    store = JobStore(aws.table())
    assert new_job(store) is not None
    assert new_job(store) is None


def test_a_retried_create_whose_first_attempt_landed_is_still_ours(aws: Aws) -> None:
    store = JobStore(AnswerLostOnce(aws.table()))  # type: ignore[arg-type]
    job = new_job(store)
    assert job is not None and job.state is JobState.SUBMITTING
    assert new_job(JobStore(aws.table())) is None  # and it is still a duplicate for anyone else


def test_a_retried_transition_whose_first_attempt_landed_is_still_ours(aws: Aws) -> None:
    store = JobStore(AnswerLostOnce(aws.table()))  # type: ignore[arg-type]
    job = new_job(store)
    assert job is not None
    submitted = store.mark_submitted(
        job.job_id, request_id="r1", gateway_request_id=None, status_url="s", response_url="r", cancel_url="c", input_json="{}"
    )
    assert submitted.state is JobState.SUBMITTED
    done = store.complete(job.job_id, output_keys=["o"], manifest_key="m")
    assert done is not None and done.state is JobState.COMPLETED


def test_the_lease_decides_who_may_resume(aws: Aws) -> None:
    store = JobStore(aws.table())
    job = new_job(store)
    assert job is not None and job.lease_until_ms
    assert store.claim(job.job_id, lease_ms=1000) is None  # held
    store.release(job.job_id, job.lease_until_ms, reason="503")
    claimed = store.claim(job.job_id, lease_ms=1000)
    assert claimed is not None and claimed.attempts == 2 and claimed.lease_until_ms
    assert store.claim(job.job_id, lease_ms=1000) is None


def test_endings_are_final(aws: Aws) -> None:
    store = JobStore(aws.table())
    job = new_job(store)
    assert job is not None
    store.mark_submitted(
        job.job_id, request_id="r", gateway_request_id=None, status_url="s", response_url="r", cancel_url="c", input_json="{}"
    )
    assert store.complete(job.job_id, output_keys=["o"], manifest_key="m") is not None
    assert store.complete(job.job_id, output_keys=["o"], manifest_key="m") is None
    assert store.fail(job.job_id, code="x", message="y", error_key="e") is None
    ended = store.get(job.job_id)
    assert ended is not None and ended.state is JobState.COMPLETED
    with pytest.raises(JobConflict):
        store.mark_submitted(
            job.job_id, request_id="r2", gateway_request_id=None, status_url="s", response_url="r", cancel_url="c", input_json="{}"
        )


def test_open_jobs_are_found_by_state_and_age_and_leave_the_index_when_they_end(aws: Aws) -> None:
    store = JobStore(aws.table())
    ids = [f"{i:032x}" for i in range(3)]
    for job_id in ids:
        job = new_job(store, job_id)
        assert job is not None
        store.mark_submitted(
            job_id, request_id=job_id, gateway_request_id=None, status_url="s", response_url="r", cancel_url="c", input_json="{}"
        )
    assert sorted(j.job_id for j in store.open_jobs(JobState.SUBMITTED, now_ms() + 1)) == ids
    assert store.open_jobs(JobState.SUBMITTED, now_ms() - 60_000) == []
    store.complete(ids[0], output_keys=[], manifest_key="m")
    assert sorted(j.job_id for j in store.open_jobs(JobState.SUBMITTED, now_ms() + 1)) == ids[1:]
