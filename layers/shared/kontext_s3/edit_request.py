"""An upload's tags (plus deployment defaults) as a validated model input."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from kontext_s3.model_schema import FieldProblem, KontextMaxInput, allowed_values, describe_validation_error


class InvalidEditRequest(ValueError):
    def __init__(self, problems: list[FieldProblem]) -> None:
        super().__init__("; ".join(p.sentence() for p in problems))
        self.problems = problems


def build_model_input(fields: Mapping[str, Any], defaults: Mapping[str, str], image_url: str) -> KontextMaxInput:
    """The upload's fields (tags over its recipe) win over deployment defaults, which win over the model's own."""
    values: dict[str, Any] = {**defaults, **fields}
    if not str(values.get("prompt") or "").strip():
        raise InvalidEditRequest(
            [
                FieldProblem(
                    field="prompt",
                    message="is required but was not given (tag 'prompt', the packed kx tags, or a folder recipe _kontext.json)",
                    allowed=allowed_values("prompt"),
                )
            ]
        )
    try:
        return KontextMaxInput.model_validate({**values, "image_url": image_url})
    except ValidationError as exc:
        raise InvalidEditRequest(describe_validation_error(exc, values)) from exc
