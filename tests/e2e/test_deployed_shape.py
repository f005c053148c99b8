"""The local stack runs what is deployed: the template's own wiring, the built artifact, one least-privilege role per function."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kontext_s3.jobs import JobState
from kontext_s3_tools import cli
from kontext_s3_tools.local_stack import TEMPLATE, LocalStack
from tests.e2e.test_pipeline import image_file
from tests.helpers import eventually

pytestmark = pytest.mark.e2e


def edited_template(tmp_path: Path, old: str, new: str) -> Path:
    text = TEMPLATE.read_text()
    assert text.count(old) == 1, f"{old!r} is not in template.yaml exactly once"
    copy = tmp_path / "template.yaml"
    copy.write_text(text.replace(old, new))
    return copy


def test_a_variable_added_to_a_copy_of_the_template_is_in_the_running_function(tmp_path: Path) -> None:
    template = edited_template(
        tmp_path, '        AWS_MAX_ATTEMPTS: "6"\n', '        AWS_MAX_ATTEMPTS: "6"\n        KONTEXT_PROBE: seen-in-the-function\n'
    )
    with LocalStack(template=template, recovery_interval_seconds=None, log_dir=tmp_path / "logs") as stack:
        webhook = stack.functions[stack.function_id("webhook")]
        webhook.warm()
        [pid] = webhook.pids()
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"KONTEXT_PROBE=seen-in-the-function" in environment
        assert b"AWS_LAMBDA_FUNCTION_NAME=" + webhook.spec.name.encode() in environment


def test_each_function_works_with_its_own_role_and_every_call_it_made_was_allowed(stack: LocalStack, tmp_path: Path) -> None:
    # A warm submit function reads the fal key once per FAL_KEY_CACHE_SECONDS: maybe in an earlier test.
    earlier = stack.gateway.recorded_judgements()
    stack.gateway.judgements.clear()
    target = stack.target()
    uploaded = cli.upload_image(target, image_file(tmp_path), {"prompt": "as deployed"}, key="inputs/deployed/roles.jpg")
    assert cli.wait_for_result(target, uploaded, timeout=60, progress=lambda _: None).succeeded
    stack.run_recovery()
    judgements = stack.gateway.recorded_judgements()
    by_function = {j.function for j in judgements}
    assert {stack.function_id("submit"), stack.function_id("webhook"), stack.function_id("recover")} <= by_function
    refused = [j for j in judgements if not j.allowed]
    assert refused == [], refused
    actions = {(j.function, j.action) for j in judgements}
    key_reads = [j for j in [*earlier, *judgements] if j.action == "secretsmanager:GetSecretValue"]
    assert {j.function for j in key_reads} == {stack.function_id("submit")} and all(j.allowed for j in key_reads)
    assert (stack.function_id("webhook"), "dynamodb:UpdateItem") in actions
    assert (stack.function_id("recover"), "dynamodb:Query") in actions
    # The webhook's role cannot read the fal key: the template does not grant it.
    webhook_role = [j.resource for j in judgements if j.function == stack.function_id("webhook") and j.action.startswith("secretsmanager")]
    assert webhook_role == []


def test_removing_one_permission_from_one_function_fails_the_pipeline_with_an_error_naming_the_action(tmp_path: Path) -> None:
    template = edited_template(
        tmp_path,
        "Action: [dynamodb:GetItem, dynamodb:UpdateItem, dynamodb:PutItem]",  # the webhook function's jobs statement
        "Action: [dynamodb:GetItem, dynamodb:PutItem]",
    )
    with LocalStack(template=template, recovery_interval_seconds=None, webhook_attempts=2, log_dir=tmp_path / "logs") as stack:
        target = stack.target()
        uploaded = cli.upload_image(target, image_file(tmp_path), {"prompt": "no permission"}, key="inputs/denied.jpg")
        webhook = stack.function_id("webhook")
        eventually(
            lambda: any("not authorized to perform: dynamodb:UpdateItem" in line for line in stack.function_log(webhook)),
            timeout=60,
            what="the webhook's access error",
        )
        refused = [j for j in stack.gateway.recorded_judgements() if not j.allowed]
        assert {(j.function, j.action) for j in refused} == {(webhook, "dynamodb:UpdateItem")}
        time.sleep(1)
        job = stack.jobs().get(uploaded.job_id)
        assert job is not None and job.state is JobState.SUBMITTED  # the outputs never land: the failure is visible, not silent
        assert all(d.get("status_code") != 200 for d in stack.emulator.deliveries if "status_code" in d)
