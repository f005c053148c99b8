"""Existing buckets attached to a stack (AttachedBuckets, AttachedKmsKeyArns), judged on the template as deployed.

template.yaml is translated by SAM's own translator and its intrinsics resolved for given parameter values; each
function role's policies are then judged as IAM judges an identity policy (an explicit Deny wins, then any Allow).
"""

from __future__ import annotations

import copy
import re
import uuid
from collections.abc import Mapping
from functools import cache
from typing import Any

import pytest

from kontext_s3_tools.iam_policy import evaluate, statements_of
from kontext_s3_tools.local_stack import TEMPLATE, load_template
from kontext_s3_tools.template_model import ACCOUNT, REGION, Stack, translate

ATTACHED = ("catalogue", "archive")
KEY = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
LAYOUT = {"InputPrefix": "inputs/", "OutputPrefix": "outputs/"}
NONE_ATTACHED = dict(LAYOUT)
TWO_ATTACHED = {**LAYOUT, "AttachedBuckets": ",".join(ATTACHED)}
WITH_KEYS = {**TWO_ATTACHED, "AttachedKmsKeyArns": KEY}
#: The functions that touch S3, and the ones among them that write results and error records.
S3_FUNCTIONS = ("SubmitFunction", "WebhookFunction", "RecoverFunction")
RESULT_WRITERS = ("WebhookFunction", "RecoverFunction")
#: Through S3, as the key policy of an SSE-KMS bucket's key sees the functions' use of it.
VIA_S3 = {"kms:ViaService": f"s3.{REGION}.amazonaws.com"}
SOURCE = load_template()
STACK_UUID = uuid.UUID("6a1b2c3d-9f00-11ef-8000-0242ac120002")


class DeployedStack(Stack):
    """The stack CloudFormation would make of template.yaml for ``parameters``, with made-up physical ids.

    Its CommaDelimitedList parameters are lists, as CloudFormation's Ref gives them (``template_model``).
    """

    def __init__(self, parameters: Mapping[str, str]) -> None:
        values = dict(parameters)
        super().__init__(translate(TEMPLATE, values), name="kontext-s3", parameters=values, create=self._physical, stack_uuid=STACK_UUID)

    def _physical(self, logical_id: str, resource: dict[str, Any]) -> dict[str, Any]:
        name = f"kontext-s3-{logical_id}-ABC123"
        kind = resource["Type"]
        if kind == "AWS::S3::Bucket":
            bucket = self.resolve(copy.deepcopy(resource["Properties"]["BucketName"]))
            return {"Ref": bucket, "Arn": f"arn:aws:s3:::{bucket}"}
        if kind == "AWS::SQS::Queue":
            url = f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/{name}"
            return {"Ref": url, "Arn": f"arn:aws:sqs:{REGION}:{ACCOUNT}:{name}", "QueueName": name}
        if kind == "AWS::Events::Rule":
            return {"Ref": name, "Arn": f"arn:aws:events:{REGION}:{ACCOUNT}:rule/{name}"}
        if kind == "AWS::DynamoDB::Table":
            return {"Ref": name, "Arn": f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{name}"}
        if kind == "AWS::Lambda::Url":
            return {"Ref": name, "FunctionUrl": f"https://{logical_id.lower()}.lambda-url.{REGION}.on.aws/"}
        arn = f"arn:aws:{kind.split('::')[1].lower()}:{REGION}:{ACCOUNT}:{name}"
        return {"Ref": arn, "Arn": arn}


@cache
def _deployed(parameters: tuple[tuple[str, str], ...]) -> DeployedStack:
    return DeployedStack(dict(parameters))


def deployed(parameters: Mapping[str, str]) -> DeployedStack:
    return _deployed(tuple(sorted(parameters.items())))


def role_policies(parameters: Mapping[str, str], function: str) -> list[dict[str, Any]]:
    stack = deployed(parameters)
    policies: list[dict[str, Any]] = stack.properties(f"{function}Role").get("Policies", [])
    return policies


def role_statements(parameters: Mapping[str, str], function: str) -> list[dict[str, Any]]:
    return [s for policy in role_policies(parameters, function) for s in statements_of(policy["PolicyDocument"])]


def allowed(
    function: str, action: str, resource: str, context: Mapping[str, str] | None = None, parameters: Mapping[str, str] = TWO_ATTACHED
) -> bool:
    return evaluate(role_statements(parameters, function), action, resource, context).allowed


def stack_bucket(parameters: Mapping[str, str] = TWO_ATTACHED) -> str:
    stack = deployed(parameters)
    bucket: str = stack.ref("InputBucket")
    return bucket


# -- reading uploads ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bucket", ATTACHED)
@pytest.mark.parametrize("action", ["s3:GetObject", "s3:GetObjectVersion", "s3:GetObjectTagging", "s3:GetObjectVersionTagging"])
def test_the_submit_function_reads_uploads_in_each_attached_bucket(bucket: str, action: str) -> None:
    assert allowed("SubmitFunction", action, f"arn:aws:s3:::{bucket}/inputs/a.jpg")
    assert allowed("SubmitFunction", action, f"arn:aws:s3:::{bucket}/inputs/shop/shoe 1.jpg")


@pytest.mark.parametrize(
    ("action", "resource"),
    [
        ("s3:GetObject", "arn:aws:s3:::catalogue/private/a.jpg"),  # outside the input prefix
        ("s3:GetObject", "arn:aws:s3:::catalogue/inputs"),
        ("s3:GetObject", "arn:aws:s3:::other-bucket/inputs/a.jpg"),  # a bucket the stack is not attached to
        ("s3:GetObjectTagging", "arn:aws:s3:::other-bucket/inputs/a.jpg"),
        ("s3:GetObject", "arn:aws:s3:::catalogue-2/inputs/a.jpg"),  # a name that only starts like an attached one
        ("s3:GetObject", "arn:aws:s3:::catalogue/outputs/a.jpg/0123/image-0.png"),  # results, not prepared inputs
        ("s3:PutObject", "arn:aws:s3:::catalogue/inputs/x"),  # never writes uploads
        ("s3:DeleteObject", "arn:aws:s3:::catalogue/inputs/x"),
        ("s3:PutObject", "arn:aws:s3:::other-bucket/outputs/x"),
        ("s3:PutObjectTagging", "arn:aws:s3:::catalogue/inputs/x"),
        ("s3:DeleteBucket", "arn:aws:s3:::catalogue"),
    ],
)
def test_the_submit_function_is_refused_elsewhere(action: str, resource: str) -> None:
    assert not allowed("SubmitFunction", action, resource)


def test_the_submit_function_still_reads_and_writes_the_stacks_own_bucket() -> None:
    bucket = stack_bucket()
    assert allowed("SubmitFunction", "s3:GetObject", f"arn:aws:s3:::{bucket}/inputs/a.jpg")
    assert allowed("SubmitFunction", "s3:PutObject", f"arn:aws:s3:::{bucket}/outputs/a.jpg/0123/error.json")
    assert allowed("SubmitFunction", "s3:GetObject", f"arn:aws:s3:::{bucket}/outputs/a.jpg/0123/input-prepared.png")
    assert not allowed("SubmitFunction", "s3:GetObject", f"arn:aws:s3:::{bucket}/private/a.jpg")
    assert not allowed("SubmitFunction", "s3:PutObject", f"arn:aws:s3:::{bucket}/inputs/a.jpg")


@pytest.mark.parametrize("bucket", ATTACHED)
def test_the_submit_function_writes_error_records_and_prepared_inputs_beside_attached_uploads(bucket: str) -> None:
    job = f"arn:aws:s3:::{bucket}/outputs/shop/a.jpg/{'ab' * 16}"
    assert allowed("SubmitFunction", "s3:PutObject", f"{job}/error.json")
    assert allowed("SubmitFunction", "s3:DeleteObject", f"{job}/input-prepared.png")
    # fal fetches the prepared copy through a URL this role presigns.
    assert allowed("SubmitFunction", "s3:GetObject", f"{job}/input-prepared.png")


def test_the_submit_function_lists_attached_buckets_as_it_lists_its_own() -> None:
    for bucket in ATTACHED:
        arn = f"arn:aws:s3:::{bucket}"
        assert allowed("SubmitFunction", "s3:ListBucketVersions", arn, {"s3:prefix": "inputs/a.jpg"})
        assert not allowed("SubmitFunction", "s3:ListBucketVersions", arn, {"s3:prefix": "private/"})
        assert not allowed("SubmitFunction", "s3:ListBucketVersions", arn)
        # Without ListBucket S3 answers 403 for a missing key; the stack's own bucket has it unconditioned too.
        assert allowed("SubmitFunction", "s3:ListBucket", arn)
    assert not allowed("SubmitFunction", "s3:ListBucket", "arn:aws:s3:::other-bucket")
    assert not allowed("SubmitFunction", "s3:ListBucketVersions", "arn:aws:s3:::other-bucket", {"s3:prefix": "inputs/"})


# -- writing results ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("function", RESULT_WRITERS)
@pytest.mark.parametrize("bucket", ATTACHED)
def test_result_writers_write_outputs_beside_attached_uploads(function: str, bucket: str) -> None:
    job = f"arn:aws:s3:::{bucket}/outputs/shop/a.jpg/{'ab' * 16}"
    for action in ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"):
        assert allowed(function, action, f"{job}/image-0.png"), action
    assert allowed(function, "s3:ListBucket", f"arn:aws:s3:::{bucket}", {"s3:prefix": "outputs/shop/a.jpg/"})
    assert not allowed(function, "s3:ListBucket", f"arn:aws:s3:::{bucket}", {"s3:prefix": "inputs/"})


@pytest.mark.parametrize("function", RESULT_WRITERS)
@pytest.mark.parametrize(
    ("action", "resource"),
    [
        ("s3:PutObject", "arn:aws:s3:::catalogue/inputs/x"),  # into the input prefix: a recursive trigger
        ("s3:PutObject", "arn:aws:s3:::catalogue/private/x"),
        ("s3:PutObject", "arn:aws:s3:::other-bucket/outputs/x"),
        ("s3:DeleteObject", "arn:aws:s3:::other-bucket/outputs/x"),
        ("s3:AbortMultipartUpload", "arn:aws:s3:::other-bucket/outputs/x"),
        ("s3:GetObject", "arn:aws:s3:::catalogue/inputs/a.jpg"),  # they read nothing in S3
        ("s3:GetObject", "arn:aws:s3:::catalogue/outputs/x"),
    ],
)
def test_result_writers_are_refused_elsewhere(function: str, action: str, resource: str) -> None:
    assert not allowed(function, action, resource)
    assert not allowed(function, "s3:ListBucket", "arn:aws:s3:::other-bucket", {"s3:prefix": "outputs/"})


@pytest.mark.parametrize("function", RESULT_WRITERS)
def test_result_writers_still_write_the_stacks_own_outputs(function: str) -> None:
    bucket = stack_bucket()
    assert allowed(function, "s3:PutObject", f"arn:aws:s3:::{bucket}/outputs/a.jpg/0123/manifest.json")
    assert not allowed(function, "s3:PutObject", f"arn:aws:s3:::{bucket}/inputs/a.jpg")


# -- with no attached bucket: the policies are what they were -----------------------------------------------------------


@pytest.mark.parametrize("function", S3_FUNCTIONS)
def test_with_no_attached_bucket_each_role_has_only_its_own_statements(function: str) -> None:
    without = role_policies(NONE_ATTACHED, function)
    with_attached = role_policies(WITH_KEYS, function)
    # The stack's own statements are the same either way; the attached buckets only add whole policies.
    assert without == with_attached[: len(without)]
    assert len(with_attached) == len(without) + 2
    statements = [s for policy in without for s in statements_of(policy["PolicyDocument"])]
    assert all(s["Effect"] == "Allow" and "NotResource" not in s for s in statements)
    assert not [s for s in statements if any(str(a).startswith("kms:") for a in s["Action"])]
    for statement in statements:
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        assert resources and all(r and not r.endswith(":::") and ":::*" not in r for r in resources), statement
    assert not allowed(function, "s3:GetObject", "arn:aws:s3:::catalogue/inputs/a.jpg", parameters=NONE_ATTACHED)
    assert not allowed(function, "s3:PutObject", "arn:aws:s3:::catalogue/outputs/a.jpg", parameters=NONE_ATTACHED)


def test_with_no_attached_bucket_there_is_no_rule_queue_statement_or_output() -> None:
    stack = deployed(NONE_ATTACHED)
    assert not stack.included("AttachedBucketsRule")
    [statement] = statements_of(stack.properties("UploadsQueuePolicy")["PolicyDocument"])
    assert statement["Sid"] == "S3Notifications"
    assert not stack.condition(stack.cfn["Outputs"]["AttachedBucketNames"]["Condition"])
    assert stack.properties("SubmitFunction")["Environment"]["Variables"]["ATTACHED_BUCKETS"] == ""


# -- events from the attached buckets --------------------------------------------------------------------------------


def test_the_rule_takes_the_attached_buckets_uploads_deletions_and_late_tags_under_the_input_prefix() -> None:
    stack = deployed(TWO_ATTACHED)
    rule = stack.properties("AttachedBucketsRule")
    assert rule["EventBusName"] == "default"  # the only bus S3 sends to
    assert "Name" not in rule  # named by CloudFormation, as every rule of the template
    assert rule["EventPattern"] == {
        "source": ["aws.s3"],
        "detail-type": ["Object Created", "Object Deleted", "Object Tags Added"],
        "detail": {"bucket": {"name": list(ATTACHED)}, "object": {"key": [{"prefix": "inputs/"}]}},
    }
    [target] = rule["Targets"]
    assert target["Arn"] == stack.get_att("UploadsQueue", "Arn")


def test_the_queue_policy_admits_the_rule_and_no_other() -> None:
    stack = deployed(TWO_ATTACHED)
    queue = stack.get_att("UploadsQueue", "Arn")
    statements = statements_of(stack.properties("UploadsQueuePolicy")["PolicyDocument"])
    from_events = [s for s in statements if s["Principal"] == {"Service": "events.amazonaws.com"}]
    assert from_events
    rule = stack.get_att("AttachedBucketsRule", "Arn")
    assert evaluate(from_events, "sqs:SendMessage", queue, {"aws:SourceArn": rule}).allowed
    other_rule = f"arn:aws:events:{REGION}:{ACCOUNT}:rule/someone-elses"
    assert not evaluate(from_events, "sqs:SendMessage", queue, {"aws:SourceArn": other_rule}).allowed
    assert not evaluate(from_events, "sqs:SendMessage", queue).allowed
    # S3's own statement is unchanged: the stack's bucket, from this account.
    [from_s3] = [s for s in statements if s["Principal"] == {"Service": "s3.amazonaws.com"}]
    assert from_s3["Condition"]["ArnEquals"]["aws:SourceArn"] == f"arn:aws:s3:::{stack_bucket()}"


def test_the_functions_know_the_attached_buckets_and_the_operator_is_told_to_attach_them() -> None:
    stack = deployed(TWO_ATTACHED)
    for function in S3_FUNCTIONS:
        assert stack.properties(function)["Environment"]["Variables"]["ATTACHED_BUCKETS"] == "catalogue,archive"
    output = stack.cfn["Outputs"]["AttachedBucketNames"]
    assert stack.condition(output["Condition"])
    assert stack.resolve(copy.deepcopy(output["Value"])) == "catalogue,archive"
    description = " ".join(output["Description"].split())
    assert "kontext-s3 attach <bucket>" in description
    assert "can neither turn on nor see" in description  # whether a bucket's delivery is on


# -- KMS -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("function", S3_FUNCTIONS)
def test_kms_statements_appear_only_with_keys(function: str) -> None:
    for parameters in (NONE_ATTACHED, TWO_ATTACHED):
        statements = role_statements(parameters, function)
        assert not [s for s in statements if any(str(a).startswith("kms:") for a in s["Action"])]
        assert not allowed(function, "kms:Decrypt", KEY, VIA_S3, parameters=parameters)


def test_the_submit_function_decrypts_attached_uploads_and_encrypts_what_it_writes_beside_them() -> None:
    assert allowed("SubmitFunction", "kms:Decrypt", KEY, VIA_S3, parameters=WITH_KEYS)
    assert allowed("SubmitFunction", "kms:GenerateDataKey", KEY, VIA_S3, parameters=WITH_KEYS)


@pytest.mark.parametrize("function", RESULT_WRITERS)
def test_result_writers_encrypt_with_the_attached_keys(function: str) -> None:
    assert allowed(function, "kms:GenerateDataKey", KEY, VIA_S3, parameters=WITH_KEYS)
    assert allowed(function, "kms:Decrypt", KEY, VIA_S3, parameters=WITH_KEYS)  # a multipart upload's parts


@pytest.mark.parametrize("function", S3_FUNCTIONS)
def test_the_keys_are_used_through_s3_only_and_no_other_key(function: str) -> None:
    other_key = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/ffffffff-12ab-34cd-56ef-1234567890ab"
    assert not allowed(function, "kms:Decrypt", other_key, VIA_S3, parameters=WITH_KEYS)
    assert not allowed(function, "kms:Decrypt", KEY, parameters=WITH_KEYS)
    assert not allowed(function, "kms:Decrypt", KEY, {"kms:ViaService": f"secretsmanager.{REGION}.amazonaws.com"}, parameters=WITH_KEYS)
    assert not allowed(function, "kms:CreateGrant", KEY, VIA_S3, parameters=WITH_KEYS)


# -- parameters ----------------------------------------------------------------------------------------------------


def _accepted(parameter: str, value: str) -> bool:
    """CloudFormation's check of a CommaDelimitedList: the pattern must match each member."""
    pattern = SOURCE["Parameters"][parameter]["AllowedPattern"]
    return all(re.fullmatch(pattern, member.strip()) for member in value.split(","))


@pytest.mark.parametrize("value", ["", "catalogue", "catalogue,archive", "my.bucket-2,abc"])
def test_attached_bucket_names_that_are_accepted(value: str) -> None:
    assert _accepted("AttachedBuckets", value)


@pytest.mark.parametrize("value", ["*", "catalogue,*", "catalogue/inputs", "Catalogue", "ab", "a*b", "-catalogue"])
def test_attached_bucket_names_that_would_widen_the_roles_are_refused(value: str) -> None:
    assert not _accepted("AttachedBuckets", value)


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("", True),
        (KEY, True),
        (f"{KEY},arn:aws-cn:kms:cn-north-1:{ACCOUNT}:key/mrk-1234abcd", True),
        ("*", False),
        (f"arn:aws:kms:{REGION}:{ACCOUNT}:key/*", False),
        (f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/photos", False),  # an alias grants no use of its key
    ],
)
def test_attached_kms_key_arns_are_key_arns(value: str, accepted: bool) -> None:
    assert _accepted("AttachedKmsKeyArns", value) is accepted


def test_the_new_parameters_are_in_their_own_group_with_descriptions() -> None:
    groups = SOURCE["Metadata"]["AWS::CloudFormation::Interface"]["ParameterGroups"]
    [group] = [g for g in groups if "AttachedBuckets" in g["Parameters"]]
    assert group["Parameters"] == ["AttachedBuckets", "AttachedKmsKeyArns"]
    for name in group["Parameters"]:
        spec = SOURCE["Parameters"][name]
        assert spec["Type"] == "CommaDelimitedList" and spec["Default"] == "" and len(spec["Description"]) > 80


# -- no circular dependency --------------------------------------------------------------------------------------------


def _references(value: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(value, list):
        for item in value:
            found |= _references(item)
    elif isinstance(value, dict):
        for key, argument in value.items():
            if key == "Ref" and isinstance(argument, str):
                found.add(argument)
            elif key == "Fn::GetAtt":
                found.add(argument[0] if isinstance(argument, list) else argument.split(".", 1)[0])
            elif key == "Fn::Sub":
                text = argument if isinstance(argument, str) else argument[0]
                found |= {name.split(".", 1)[0] for name in re.findall(r"\$\{([^}!][^}]*)\}", text)}
            found |= _references(argument)
    return found


def test_the_attached_resources_make_no_dependency_cycle() -> None:
    resources = deployed(WITH_KEYS).resources
    graph = {
        lid: {r for r in _references(res.get("Properties", {})) if r in resources}
        | set([res["DependsOn"]] if isinstance(res.get("DependsOn"), str) else res.get("DependsOn", []))
        for lid, res in resources.items()
    }
    state: dict[str, str] = {}

    def visit(node: str, path: tuple[str, ...]) -> None:
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"dependency cycle: {' -> '.join((*path, node))}"
        state[node] = "open"
        for child in graph[node]:
            visit(child, (*path, node))
        state[node] = "done"

    for node in graph:
        visit(node, ())
    assert "AttachedBucketsRule" in graph["UploadsQueuePolicy"]
    assert "UploadsQueuePolicy" in graph["InputBucket"]


def test_no_output_is_named_like_a_list_parameter() -> None:
    # SAM CLI resolves an output key named like a parameter as a Ref to it (samcli/lib/intrinsic_resolver); a list
    # there is an unhashable key, and `sam build`, `sam deploy --guided` and `sam local` stop.
    lists = {name for name, spec in SOURCE["Parameters"].items() if spec["Type"] == "CommaDelimitedList"}
    assert lists == {"AttachedBuckets", "AttachedKmsKeyArns"}
    assert not lists & set(SOURCE["Outputs"])
