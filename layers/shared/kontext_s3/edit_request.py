"""An upload's tags (plus deployment defaults) as a validated model input."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError

from kontext_s3.model_schema import FieldProblem, KontextMaxInput, allowed_values, describe_validation_error


class InvalidEditRequest(ValueError):
    def __init__(self, problems: list[FieldProblem]) -> None:
        super().__init__("; ".join(p.sentence() for p in problems))
        self.problems = problems


def build_model_input(fields: Mapping[str, str], defaults: Mapping[str, str], image_url: str) -> KontextMaxInput:
    """Tags win over deployment defaults, which win over the model's own defaults."""
    values: dict[str, str] = {**defaults, **fields}
    if not values.get("prompt", "").strip():
        raise InvalidEditRequest(
            [
                FieldProblem(
                    field="prompt",
                    message="is required but was not given (tag 'prompt', or the packed kx tags)",
                    allowed=allowed_values("prompt"),
                )
            ]
        )
    try:
        return KontextMaxInput.model_validate({**values, "image_url": image_url})
    except ValidationError as exc:
        raise InvalidEditRequest(describe_validation_error(exc, values)) from exc
