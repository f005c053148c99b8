"""``template.yaml`` as CloudFormation would deploy it: translated by SAM's own translator, intrinsics resolved.

The local stack reads everything it creates from here (functions with their
handler, environment, timeout, memory, role and policies; event source
mappings; queues with their redrive; the table with its indexes and TTL; the
bucket's notifications; schedules; rules), so the template is the one source of
truth: a variable, a parameter or an index added to it needs no second edit.

``samtranslator`` (which ships with aws-sam-cli) turns the SAM template into
plain CloudFormation offline; :class:`Stack` then evaluates ``Ref``,
``Fn::GetAtt``, ``Fn::Sub``, ``Fn::Join``, ``Fn::Select``, ``Fn::Split``,
``Fn::If`` and conditions against parameter values and the physical ids the
caller gives each resource as it creates it.
"""

from __future__ import annotations

import copy
import logging
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import boto3

ACCOUNT = "123456789012"
REGION = "us-east-1"
NO_VALUE = object()
_SUB = re.compile(r"\$\{([^}!][^}]*)\}")
_LAYER_SUFFIX = re.compile(r"^(.*?)[0-9a-f]{10}$")


def translate(template: Path | str, parameters: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The CloudFormation template SAM deploys for ``template`` (a path, or the YAML text)."""
    from samtranslator.model.exceptions import InvalidDocumentException  # noqa: PLC0415 - only the local stack needs it
    from samtranslator.parser.parser import Parser  # noqa: PLC0415
    from samtranslator.translator.arn_generator import ArnGenerator  # noqa: PLC0415
    from samtranslator.translator.translator import Translator  # noqa: PLC0415
    from samtranslator.yaml_helper import yaml_parse  # noqa: PLC0415

    logging.getLogger("samtranslator").setLevel(logging.ERROR)  # its usage metrics warn on every translation
    text = template.read_text(encoding="utf-8") if isinstance(template, Path) else template
    sam = yaml_parse(text)
    for logical_id, resource in sam.get("Resources", {}).items():
        properties = resource.get("Properties") or {}
        for name in ("CodeUri", "ContentUri"):
            # Local paths, as `sam validate` treats them: the code comes from the build, by logical id.
            if isinstance(properties.get(name), str) and not properties[name].startswith("s3://"):
                properties[name] = f"s3://local-build/{logical_id}.zip"
    ArnGenerator.BOTO_SESSION_REGION_NAME = REGION
    try:
        cfn: dict[str, Any] = Translator(None, Parser(), boto_session=boto3.session.Session(region_name=REGION)).translate(
            sam, parameter_values=dict(parameters or {}), get_managed_policy_map=lambda: {}
        )
    except InvalidDocumentException as exc:
        raise ValueError(f"template.yaml does not translate: {'; '.join(str(c) for c in exc.causes)}") from exc
    return cfn


def source_logical_id(logical_id: str, resource: Mapping[str, Any]) -> str:
    """The id a resource has in template.yaml (SAM suffixes layer versions with a content hash)."""
    if resource.get("Type") == "AWS::Lambda::LayerVersion":
        match = _LAYER_SUFFIX.match(logical_id)
        if match:
            return match.group(1)
    return logical_id


class Stack:
    """Evaluates a translated template's intrinsics. Resources get physical values through ``create``, on first reference."""

    def __init__(
        self,
        cfn: Mapping[str, Any],
        *,
        name: str,
        parameters: Mapping[str, str] | None = None,
        create: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
        stack_uuid: uuid.UUID | None = None,
    ) -> None:
        self.cfn = cfn
        self.name = name
        # CloudFormation's stack ids end in a time-based (version 1) UUID; names built from it are unique per stack.
        self.stack_id = f"arn:aws:cloudformation:{REGION}:{ACCOUNT}:stack/{name}/{stack_uuid or uuid.uuid1()}"
        self.parameters = {key: str(spec.get("Default", "")) for key, spec in cfn.get("Parameters", {}).items()}
        unknown = set(parameters or {}) - set(self.parameters)
        if unknown:
            raise ValueError(f"not parameters of the template: {', '.join(sorted(unknown))}")
        self.parameters.update({k: str(v) for k, v in (parameters or {}).items()})
        self._create = create
        #: logical id -> {"Ref": ..., attribute: ...}, filled as resources are created.
        self.physical: dict[str, dict[str, Any]] = {}
        self._creating: set[str] = set()

    @property
    def resources(self) -> dict[str, Any]:
        resources: dict[str, Any] = self.cfn["Resources"]
        return resources

    def of_type(self, resource_type: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for logical_id, resource in self.resources.items():
            if resource["Type"] == resource_type and self.included(logical_id):
                yield logical_id, resource

    def included(self, logical_id: str) -> bool:
        condition = self.resources[logical_id].get("Condition")
        return condition is None or self.condition(condition)

    def properties(self, logical_id: str) -> dict[str, Any]:
        """The resource's properties with every intrinsic resolved (creating what they refer to)."""
        resolved = self.resolve(copy.deepcopy(self.resources[logical_id].get("Properties", {})))
        assert isinstance(resolved, dict)
        return resolved

    def ensure(self, logical_id: str) -> dict[str, Any]:
        """The physical values of a resource, creating it first if need be."""
        if logical_id in self.physical:
            return self.physical[logical_id]
        if logical_id not in self.resources:
            raise KeyError(f"no resource {logical_id!r} in the template")
        if logical_id in self._creating:
            raise ValueError(f"circular reference through {logical_id}")
        if self._create is None:
            raise KeyError(f"{logical_id} has no physical value")
        self._creating.add(logical_id)
        try:
            self.physical[logical_id] = self._create(logical_id, self.resources[logical_id])
        finally:
            self._creating.discard(logical_id)
        return self.physical[logical_id]

    # -- intrinsics -------------------------------------------------------------------------

    def pseudo(self, name: str) -> Any:
        return {
            "AWS::AccountId": ACCOUNT,
            "AWS::Region": REGION,
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::StackName": self.name,
            "AWS::StackId": self.stack_id,
            "AWS::NoValue": NO_VALUE,
        }[name]

    def ref(self, name: str) -> Any:
        if name.startswith("AWS::"):
            return self.pseudo(name)
        if name in self.parameters:
            value = self.parameters[name]
            # A CommaDelimitedList is a list wherever it is referenced (an empty one is [""], as CloudFormation has it).
            if self.cfn["Parameters"][name].get("Type") == "CommaDelimitedList":
                return [item.strip() for item in value.split(",")]
            return value
        return self.ensure(name)["Ref"]

    def get_att(self, logical_id: str, attribute: str) -> Any:
        values = self.ensure(logical_id)
        if attribute not in values:
            raise KeyError(f"{logical_id} has no attribute {attribute!r} locally")
        return values[attribute]

    def condition(self, name: str) -> bool:
        return bool(self.resolve(self.cfn["Conditions"][name]))

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [item for item in (self.resolve(v) for v in value) if item is not NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, argument),) = value.items()
            if key == "Ref":
                return self.ref(argument)
            if key == "Fn::GetAtt":
                logical_id, attribute = argument if isinstance(argument, list) else argument.split(".", 1)
                return self.get_att(logical_id, attribute)
            if key == "Fn::Sub":
                return self._sub(argument)
            if key == "Fn::Join":
                separator, items = argument
                return str(separator).join(str(x) for x in self.resolve(items))
            if key == "Fn::Select":
                index, items = argument
                return self.resolve(items)[int(self.resolve(index))]
            if key == "Fn::Split":
                separator, text = argument
                return str(self.resolve(text)).split(separator)
            if key == "Fn::If":
                name, then, otherwise = argument
                return self.resolve(then if self.condition(name) else otherwise)
            if key == "Fn::Equals":
                left, right = (self.resolve(x) for x in argument)
                return str(left) == str(right)
            if key == "Fn::Not":
                return not self.resolve(argument[0])
            if key == "Fn::And":
                return all(self.resolve(x) for x in argument)
            if key == "Fn::Or":
                return any(self.resolve(x) for x in argument)
            if key == "Condition":
                return self.condition(argument)
        return {k: r for k, r in ((k, self.resolve(v)) for k, v in value.items()) if r is not NO_VALUE}

    def _sub(self, argument: Any) -> str:
        text, variables = (argument, {}) if isinstance(argument, str) else (argument[0], argument[1])
        values = {name: self.resolve(v) for name, v in variables.items()}

        def one(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in values:
                return str(values[name])
            if "." in name and not name.startswith("AWS::"):
                logical_id, attribute = name.split(".", 1)
                return str(self.get_att(logical_id, attribute))
            return str(self.ref(name))

        return _SUB.sub(one, text)
