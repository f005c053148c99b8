"""Stacks of template.yaml side by side in one account and region, and a first deploy that cannot overspend.

Every physical name the deployed template gives a resource is resolved for stacks with long names (120 and 128
characters, the longest CloudFormation allows) that differ only at the end: each must fit its service's limit
and differ from the other stack's. Names the template leaves out are CloudFormation's (stack name, logical id and
a random suffix, cut to the service's limit), so they fit and differ by construction.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kontext_s3_tools.local_stack import ROOT, TEMPLATE, load_template
from kontext_s3_tools.template_model import Stack, source_logical_id, translate


@dataclass(frozen=True)
class NameRule:
    """The property that names a resource of a type, and the service's rule for that name."""

    prop: str
    longest: int
    shortest: int = 1
    pattern: str = r"[A-Za-z0-9._/#-]+"


#: Limits from the CloudFormation resource schemas cfn-lint ships (``cfnlint/data/schemas/providers``; checked
#: below where they give one) and, where those give none, the services' API references: SQS CreateQueue
#: ("up to 80 characters"), DynamoDB CreateTable (3 to 255), CloudWatch PutDashboard ("maximum length is 255").
NAME_RULES: dict[str, NameRule] = {
    "AWS::Lambda::Function": NameRule("FunctionName", 64, pattern=r"[A-Za-z0-9_-]+"),
    # A layer version's ARN must fit in 140 characters too (Lambda API, LayerVersionArn): see test below.
    "AWS::Lambda::LayerVersion": NameRule("LayerName", 140, pattern=r"[A-Za-z0-9_-]+"),
    "AWS::Scheduler::Schedule": NameRule("Name", 64, pattern=r"[0-9A-Za-z._-]+"),
    "AWS::Scheduler::ScheduleGroup": NameRule("Name", 64, pattern=r"[0-9A-Za-z._-]+"),
    "AWS::IAM::Role": NameRule("RoleName", 64, pattern=r"[\w+=,.@-]+"),
    "AWS::S3::Bucket": NameRule("BucketName", 63, 3, pattern=r"[a-z0-9][a-z0-9.-]*[a-z0-9]"),
    "AWS::DynamoDB::Table": NameRule("TableName", 255, 3, pattern=r"[A-Za-z0-9_.-]+"),
    "AWS::SQS::Queue": NameRule("QueueName", 80, pattern=r"[A-Za-z0-9_-]+(\.fifo)?"),
    "AWS::Logs::LogGroup": NameRule("LogGroupName", 512, pattern=r"[.\-_/#A-Za-z0-9]+"),
    "AWS::CloudWatch::Alarm": NameRule("AlarmName", 255),
    "AWS::CloudWatch::Dashboard": NameRule("DashboardName", 255, pattern=r"[A-Za-z0-9_-]+"),
    "AWS::Events::Rule": NameRule("Name", 64, pattern=r"[.\-_A-Za-z0-9]+"),
    "AWS::Events::ApiDestination": NameRule("Name", 64, pattern=r"[.\-_A-Za-z0-9]+"),
    "AWS::Events::Connection": NameRule("Name", 64, pattern=r"[.\-_A-Za-z0-9]+"),
    "AWS::SecretsManager::Secret": NameRule("Name", 512, pattern=r"[A-Za-z0-9/_+=.@-]+"),
    "AWS::SNS::Topic": NameRule("TopicName", 256, pattern=r"[A-Za-z0-9_-]+"),
}
#: Resource types that have no name of their own in the account (they are attached to another resource).
NAMELESS = {
    "AWS::Lambda::Permission",
    "AWS::Lambda::Url",
    "AWS::Lambda::EventSourceMapping",
    "AWS::SQS::QueuePolicy",
    "AWS::S3::BucketPolicy",
}
#: Every optional resource included: notifications on, an alarm topic, the daily budget's alarm (on by default), an
#: attached bucket's rule.
PARAMETERS = {
    "NotifyUrl": "https://hooks.example.com/kontext",
    "AlarmTopicArn": "arn:aws:sns:us-east-1:123456789012:alarms",
    "AttachedBuckets": "catalogue",
}
#: The longest layer version ARN prefix: the longest partition and region names, then ``:<version>``.
LAYER_ARN_PREFIX = "arn:aws-iso-b:lambda:us-isob-east-1:123456789012:layer:"
LAYER_VERSION_SUFFIX = ":999999"

BASE = ("kontext-s3-side-by-side-" * 6)[:119]
#: Stack names that differ only at the end: 120 and 128 characters (CloudFormation's longest), two of 128, two short.
PAIRS = [(BASE + "a", BASE + "a-second2"), (BASE + "a-second2", BASE + "a-second3"), ("kontext-s3", "kontext-s4")]
assert [len(name) for pair in PAIRS[:2] for name in pair] == [120, 128, 128, 128]

SOURCE = load_template()
CFN = translate(TEMPLATE, PARAMETERS)


def deployed(name: str) -> Stack:
    """The stack CloudFormation would make, before any resource exists: enough to resolve names."""
    assert re.fullmatch(r"[A-Za-z][-A-Za-z0-9]{0,127}", name), "not a valid stack name"
    # CloudFormation's stack ids end in a time-based UUID: two stacks made one after the other.
    return Stack(CFN, name=name, parameters=PARAMETERS, stack_uuid=uuid.uuid1())


def physical_names(stack: Stack) -> Iterator[tuple[str, str, NameRule, str]]:
    """(logical id, type, rule, resolved name) for every resource the template names itself."""
    for logical_id, resource in stack.resources.items():
        if not stack.included(logical_id):
            continue
        rule = NAME_RULES.get(resource["Type"])
        given = (resource.get("Properties") or {}).get(rule.prop) if rule else None
        if rule and given is not None:
            name = stack.resolve(copy.deepcopy(given))
            assert isinstance(name, str), f"{logical_id}.{rule.prop} does not resolve to a name: {name!r}"
            yield logical_id, resource["Type"], rule, name


def test_every_resource_type_is_either_named_by_a_known_rule_or_has_no_name() -> None:
    unknown = {r["Type"] for r in CFN["Resources"].values()} - set(NAME_RULES) - NAMELESS
    assert not unknown, f"add the naming rule of {sorted(unknown)} to NAME_RULES (or NAMELESS)"


@pytest.mark.parametrize(("first", "second"), PAIRS, ids=["120-and-128", "128-and-128", "short"])
def test_every_physical_name_fits_its_service_and_differs_between_two_stacks(first: str, second: str) -> None:
    names = {}
    for stack_name in (first, second):
        stack = deployed(stack_name)
        found = list(physical_names(stack))
        assert found, "the template names nothing? then this test checks nothing"
        for logical_id, kind, rule, name in found:
            assert rule.shortest <= len(name) <= rule.longest, f"{logical_id} ({kind}): {len(name)} characters, {name!r}"
            assert re.fullmatch(rule.pattern, name), f"{logical_id} ({kind}): {name!r} is not a valid name"
        names[stack_name] = {(kind, logical_id): name for logical_id, kind, _, name in found}
    assert names[first].keys() == names[second].keys()
    for key, name in names[first].items():
        same_kind = {n for (kind, _), n in names[second].items() if kind == key[0]}
        assert name not in same_kind, f"{key[1]} ({key[0]}) is {name!r} in both stacks"


def test_the_functions_schedule_queues_table_roles_secrets_and_notification_resources_are_named_by_cloudformation() -> None:
    # Their limits (64 or 80 characters) cannot hold a 128-character stack name, and a name fixed in the template
    # would collide with the next stack's: CloudFormation names them.
    left_to_cloudformation = {
        "AWS::Lambda::Function",
        "AWS::Scheduler::Schedule",
        "AWS::IAM::Role",
        "AWS::DynamoDB::Table",
        "AWS::SQS::Queue",
        "AWS::Events::Rule",
        "AWS::Events::ApiDestination",
        "AWS::Events::Connection",
        "AWS::SecretsManager::Secret",
    }
    kinds = {resource["Type"] for resource in CFN["Resources"].values()}
    assert left_to_cloudformation <= kinds
    for logical_id, resource in CFN["Resources"].items():
        if resource["Type"] in left_to_cloudformation:
            prop = NAME_RULES[resource["Type"]].prop
            assert prop not in resource.get("Properties", {}), f"{logical_id} names itself ({prop})"


def test_the_layer_version_arn_fits_lambdas_140_characters() -> None:
    stack = deployed(BASE + "a-second2")
    [layer] = [name for _, kind, _, name in physical_names(stack) if kind == "AWS::Lambda::LayerVersion"]
    assert len(LAYER_ARN_PREFIX + layer + LAYER_VERSION_SUFFIX) <= 140


def test_the_bucket_name_is_the_one_the_queue_policy_lets_s3_notify_from() -> None:
    stack = deployed(BASE + "a-second2")
    [bucket] = [name for _, kind, _, name in physical_names(stack) if kind == "AWS::S3::Bucket"]
    statements = CFN["Resources"]["UploadsQueuePolicy"]["Properties"]["PolicyDocument"]["Statement"]
    [statement] = [s for s in statements if s.get("Sid") == "S3Notifications"]
    source = stack.resolve(copy.deepcopy(statement["Condition"]["ArnEquals"]["aws:SourceArn"]))
    assert source == f"arn:aws:s3:::{bucket}"


def test_the_name_rules_agree_with_the_cloudformation_schemas_cfn_lint_ships() -> None:
    cfnlint = pytest.importorskip("cfnlint")
    providers = Path(cfnlint.__file__).parent / "data" / "schemas" / "providers" / "us_east_1"
    for kind, rule in NAME_RULES.items():
        path = providers / f"{kind.lower().replace('::', '-')}.json"
        if not path.exists():
            continue
        spec = json.loads(path.read_text())["properties"].get(rule.prop, {})
        if "maxLength" in spec:
            assert spec["maxLength"] == rule.longest, f"{kind}.{rule.prop}: the schema says {spec['maxLength']}"
        if "minLength" in spec:
            assert spec["minLength"] == rule.shortest, f"{kind}.{rule.prop}: the schema says {spec['minLength']}"


def test_data_is_kept_when_the_stack_is_deleted_but_not_when_its_creation_rolls_back() -> None:
    kept = {lid: r for lid, r in SOURCE["Resources"].items() if r.get("DeletionPolicy", "Delete") != "Delete"}
    assert set(kept) == {"InputBucket", "JobsTable"}
    for logical_id, resource in kept.items():
        assert resource["DeletionPolicy"] == "RetainExceptOnCreate", logical_id
        assert resource["UpdateReplacePolicy"] == "Retain", logical_id  # it has no RetainExceptOnCreate


#: The attached buckets' ARNs, built from a list parameter with Fn::Join, whose delimiter cannot be an intrinsic: the
#: one place the template writes a partition (in another one, the attached buckets' objects are refused).
ATTACHED_BUCKET_ARNS = ("arn:aws:s3:::${Joined}", '!Join ["/*,arn:aws:s3:::", ', '!Join [",arn:aws:s3:::", ')


def test_hand_written_arns_take_their_partition_from_the_stack() -> None:
    text = TEMPLATE.read_text(encoding="utf-8")
    for attached in ATTACHED_BUCKET_ARNS:
        text = text.replace(attached, "")
    assert not re.findall(r"arn:aws[-a-z]*:", text)
    assert "arn:${AWS::Partition}:s3:::" in text


# -- a first deploy that cannot overspend -------------------------------------------------------------------------


def test_the_daily_image_budget_has_a_limit_by_default_and_says_what_it_costs() -> None:
    budget = SOURCE["Parameters"]["DailyImageBudget"]
    assert int(budget["Default"]) > 0
    description = " ".join(budget["Description"].split())
    assert "$0.08" in description  # fal's price per Kontext [max] image, as the README gives it
    assert f"default {budget['Default']} is at most ${int(budget['Default']) * 0.08:g} a UTC day" in description
    assert "0 means no limit" in description


def test_the_parameters_are_asked_in_the_order_of_their_groups_with_first_deploy_decisions_first() -> None:
    groups = SOURCE["Metadata"]["AWS::CloudFormation::Interface"]["ParameterGroups"]
    in_groups = [name for group in groups for name in group["Parameters"]]
    assert in_groups == list(SOURCE["Parameters"])  # each once, in the order `sam deploy --guided` asks them
    assert groups[0]["Parameters"] == ["DailyImageBudget", "FalUserId"]
    assert "first deploy" in groups[0]["Label"]["default"]
    # A NoEcho parameter is asked with no default: Enter would not get past it.
    assert not [name for name, spec in SOURCE["Parameters"].items() if spec.get("NoEcho")]
    assert all("Default" in spec for spec in SOURCE["Parameters"].values())


def test_a_guided_deploy_asks_the_stack_name_region_and_every_parameter_and_takes_every_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    guided = pytest.importorskip("samcli.commands.deploy.guided_context")  # aws-sam-cli: the dev install only
    config = tomllib.loads((ROOT / "samconfig.toml").read_text())["default"]
    asked: list[str] = []

    def answer(text: str, default: Any = None, **_: Any) -> Any:
        asked.append(re.sub(r"\x1b\[[0-9;]*m", "", text).strip())
        assert default is not None, f"{asked[-1]!r} has no default: Enter does not answer it"
        return default

    monkeypatch.setattr(guided, "prompt", answer)
    monkeypatch.setattr(guided, "confirm", answer)
    monkeypatch.setattr(guided, "manage_stack", lambda **_: "aws-sam-cli-managed-default-bucket")
    monkeypatch.setattr(guided, "print_managed_s3_bucket_info", lambda _: None)
    monkeypatch.setattr(guided.GuidedContext, "prompt_image_repository", lambda *_, **__: {})  # no image functions
    context = guided.GuidedContext(
        template_file=str(TEMPLATE),
        stack_name=config["global"]["parameters"]["stack_name"],
        s3_bucket=None,
        image_repository=None,
        image_repositories=None,
        s3_prefix=config["deploy"]["parameters"]["s3_prefix"],
        resolve_s3=config["deploy"]["parameters"]["resolve_s3"],
        region="us-east-1",
        confirm_changeset=config["deploy"]["parameters"]["confirm_changeset"],
        capabilities=config["deploy"]["parameters"]["capabilities"],
        disable_rollback=False,
    )
    from samcli.commands._utils.template import get_template_parameters

    context.guided_prompts(get_template_parameters(str(TEMPLATE)))

    assert asked == [
        "Stack Name",
        "AWS Region",
        *(f"Parameter {name}" for name in SOURCE["Parameters"]),
        "Confirm changes before deploy",
        "Allow SAM CLI IAM role creation",
        "Disable rollback",
        "Save arguments to configuration file",
        "SAM configuration file",
        "SAM configuration environment",
    ]
    assert asked[2:4] == ["Parameter DailyImageBudget", "Parameter FalUserId"]
    assert context.guided_stack_name == "kontext-s3"
    overrides = context.guided_parameter_overrides
    assert overrides["DailyImageBudget"] == {"Value": str(SOURCE["Parameters"]["DailyImageBudget"]["Default"]), "Hidden": False}


def test_the_named_layer_keeps_the_logical_id_the_local_stack_finds_its_build_by() -> None:
    # SAM suffixes a layer's logical id with a hash of its properties, LayerName included; the local stack strips it.
    [layer] = [lid for lid, r in CFN["Resources"].items() if r["Type"] == "AWS::Lambda::LayerVersion"]
    assert source_logical_id(layer, CFN["Resources"][layer]) == "SharedLayer"
