"""The emulator's own check of a Kontext [max] request body, with fal's 422 ``detail`` shape.

Written from the model page independently of ``kontext_s3.model_schema``, so a
mistake in the pipeline's schema shows up as a 422 from the emulator instead of
being agreed with.
"""

from __future__ import annotations

from typing import Any

_ASPECT = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")


def _error(field: str, msg: str, kind: str) -> dict[str, Any]:
    return {"loc": ["body", field], "msg": msg, "type": kind}


def check_input(body: Any) -> list[dict[str, Any]]:
    """fal-style validation errors for ``body``; empty when the model would accept it."""
    if not isinstance(body, dict):
        return [{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}]
    errors: list[dict[str, Any]] = []
    for required in ("prompt", "image_url"):
        if required not in body:
            errors.append(_error(required, "field required", "value_error.missing"))
        elif not isinstance(body[required], str):
            errors.append(_error(required, "str type expected", "type_error.str"))
    known = {
        "prompt",
        "seed",
        "guidance_scale",
        "sync_mode",
        "num_images",
        "output_format",
        "safety_tolerance",
        "enhance_prompt",
        "aspect_ratio",
        "image_url",
    }
    for name in sorted(set(body) - known):
        errors.append(_error(name, "extra fields not permitted", "value_error.extra"))
    if "seed" in body and (not isinstance(body["seed"], int) or isinstance(body["seed"], bool)):
        errors.append(_error("seed", "value is not a valid integer", "type_error.integer"))
    if "guidance_scale" in body:
        value = body["guidance_scale"]
        if not isinstance(value, int | float) or isinstance(value, bool):
            errors.append(_error("guidance_scale", "value is not a valid float", "type_error.float"))
        elif not 1 <= value <= 20:
            errors.append(_error("guidance_scale", "ensure this value is between 1 and 20", "value_error.number.not_in_range"))
    if "num_images" in body:
        value = body["num_images"]
        if not isinstance(value, int) or isinstance(value, bool):
            errors.append(_error("num_images", "value is not a valid integer", "type_error.integer"))
        elif not 1 <= value <= 4:
            errors.append(_error("num_images", "ensure this value is between 1 and 4", "value_error.number.not_in_range"))
    for flag in ("sync_mode", "enhance_prompt"):
        if flag in body and not isinstance(body[flag], bool):
            errors.append(_error(flag, "value could not be parsed to a boolean", "type_error.bool"))
    enums = {"output_format": ("jpeg", "png"), "safety_tolerance": ("1", "2", "3", "4", "5", "6"), "aspect_ratio": _ASPECT}
    for name, allowed in enums.items():
        if name in body and body[name] not in allowed:
            errors.append(
                _error(
                    name, f"value is not a valid enumeration member; permitted: {', '.join(repr(a) for a in allowed)}", "type_error.enum"
                )
            )
    return errors
