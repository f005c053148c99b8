"""template.yaml agrees with the code it deploys (cfn-lint checks the rest)."""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any

import pytest

from kontext_s3.model_schema import OPTIONAL_TAG_FIELDS
from kontext_s3.settings import Settings
from kontext_s3_tools.local_stack import ROOT, load_template

TEMPLATE = load_template()
RESOURCES: dict[str, Any] = TEMPLATE["Resources"]
FUNCTIONS = {name: r for name, r in RESOURCES.items() if r["Type"] == "AWS::Serverless::Function"}
SETTINGS_NAMES = {field.alias for field in Settings.model_fields.values() if field.alias}


def env_of(function: str) -> dict[str, Any]:
    return {**TEMPLATE["Globals"]["Function"]["Environment"]["Variables"], **FUNCTIONS[function]["Properties"]["Environment"]["Variables"]}


def statements(function: str) -> list[dict[str, Any]]:
    """The function's unconditional statements: its access to the stack's own bucket and resources.

    The attached buckets' policies (``!If [HasAttachedBuckets, ...]``) are tested in test_template_attached.py.
    """
    return [s for policy in FUNCTIONS[function]["Properties"]["Policies"] if "If" not in policy for s in policy["Statement"]]


@pytest.mark.parametrize("function", sorted(FUNCTIONS))
def test_every_variable_the_template_sets_is_a_setting(function: str) -> None:
    for name in env_of(function):
        if name.startswith(("POWERTOOLS_", "AWS_", "MALLOC_")):
            continue  # read by Powertools, the AWS SDK and glibc themselves
        if name.startswith("DEFAULT_"):
            continue  # read as model defaults; checked below
        assert name in SETTINGS_NAMES, f"{function} sets {name}, which no setting reads"


def test_every_optional_model_field_has_a_deployment_default() -> None:
    defaults = {name for name in env_of("SubmitFunction") if name.startswith("DEFAULT_")}
    assert defaults == {f"DEFAULT_{field.upper()}" for field in OPTIONAL_TAG_FIELDS}
    # and Settings reads exactly those names
    assert Settings.from_env({"JOBS_TABLE": "t", "DEFAULT_ASPECT_RATIO": "1:1", "DEFAULT_SEED": "3"}).model_defaults == {
        "aspect_ratio": "1:1",
        "seed": "3",
    }


def test_the_queue_outlasts_six_submit_timeouts_and_redrives_to_the_dlq() -> None:
    queue = RESOURCES["UploadsQueue"]["Properties"]
    assert queue["VisibilityTimeout"] >= 6 * FUNCTIONS["SubmitFunction"]["Properties"]["Timeout"]
    assert queue["RedrivePolicy"]["maxReceiveCount"] == {"Ref": "MaxReceiveCount"}
    assert env_of("SubmitFunction")["MAX_RECEIVE_COUNT"] == {"Ref": "MaxReceiveCount"}


def test_only_the_input_prefix_triggers_jobs() -> None:
    for config in RESOURCES["InputBucket"]["Properties"]["NotificationConfiguration"]["QueueConfigurations"]:
        assert config["Filter"]["S3Key"]["Rules"] == [{"Name": "prefix", "Value": {"Ref": "InputPrefix"}}]


@pytest.mark.parametrize("function", ["WebhookFunction", "RecoverFunction"])
def test_result_writers_may_write_only_under_the_output_prefix(function: str) -> None:
    writes = [s for s in statements(function) if any(a.startswith("s3:Put") or a.startswith("s3:Delete") for a in s["Action"])]
    assert writes
    for statement in writes:
        assert statement["Resource"]["Sub"].endswith("/${OutputPrefix}*")
    assert not [s for s in statements(function) if "s3:GetObject" in s["Action"]]


def test_the_submit_function_reads_only_inputs_and_their_prepared_copies() -> None:
    reads = sorted(s["Resource"]["Sub"] for s in statements("SubmitFunction") if "s3:GetObject" in s["Action"])
    assert [read.rsplit(":::", 1)[-1] for read in reads] == [
        "${InputBucket}/${InputPrefix}*",
        "${InputBucket}/${OutputPrefix}*/input-prepared.*",
    ]


def test_the_webhook_is_a_public_function_url_that_checks_signatures_itself() -> None:
    assert RESOURCES["WebhookFunctionUrl"]["Properties"] == {"TargetFunctionArn": {"Ref": "WebhookFunction"}, "AuthType": "NONE"}
    permissions = {r["Properties"]["Action"] for r in RESOURCES.values() if r["Type"] == "AWS::Lambda::Permission"}
    assert permissions == {"lambda:InvokeFunctionUrl", "lambda:InvokeFunction"}  # a public URL needs both
    assert env_of("SubmitFunction")["WEBHOOK_URL"] == {"GetAtt": "WebhookFunctionUrl.FunctionUrl"}


def test_the_layer_is_built_for_python_313_on_arm64() -> None:
    layer = RESOURCES["SharedLayer"]
    assert layer["Metadata"] == {"BuildMethod": "makefile", "BuildArchitecture": "arm64"}
    makefile = (ROOT / "layers" / "shared" / "Makefile").read_text()
    assert "LAYER_PLATFORM ?= manylinux2014_aarch64" in makefile and "--python-version 3.13" in makefile
    assert TEMPLATE["Globals"]["Function"]["Runtime"] == "python3.13"
    assert TEMPLATE["Globals"]["Function"]["Architectures"] == ["arm64"]


def test_the_dashboard_body_is_json() -> None:
    body, _ = RESOURCES["Dashboard"]["Properties"]["DashboardBody"]["Sub"]
    widgets = json.loads(re.sub(r"\$\{[^}]+\}", "X", body))["widgets"]
    named = {m[1] for w in widgets for m in w["properties"]["metrics"] if m[0] == "KontextS3"}
    assert {"JobsSubmitted", "JobsSucceeded", "JobsFailed", "DuplicatesSkipped", "FalRetries", "EndToEndLatency"} <= named


def test_a_guided_deploy_on_defaults_is_not_stopped_by_an_authentication_question() -> None:
    # `sam deploy --guided` asks "<resource> has no authentication. Is this okay? [y/N]" for each resource
    # auth_per_resource reports as unauthenticated, and stops on the default answer.
    providers = pytest.importorskip("samcli.lib.providers.sam_stack_provider")  # aws-sam-cli: the dev install, not the 3.13 run
    from samcli.commands.deploy.auth_utils import auth_per_resource

    stacks, _ = providers.SamLocalStackProvider.get_stacks(str(ROOT / "template.yaml"))
    unauthenticated = [name for name, authenticated in auth_per_resource(stacks) if not authenticated]
    assert unauthenticated == []
    # ...while the webhook stays public, authenticating callers itself.
    assert RESOURCES["WebhookFunctionUrl"]["Properties"]["AuthType"] == "NONE"


def test_samconfig_answers_what_a_first_deploy_needs() -> None:
    config = tomllib.loads((ROOT / "samconfig.toml").read_text())
    deploy = config["default"]["deploy"]["parameters"]
    assert config["default"]["global"]["parameters"]["stack_name"]
    assert deploy["capabilities"] == "CAPABILITY_IAM" and deploy["resolve_s3"] is True
