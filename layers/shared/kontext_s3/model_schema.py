"""FLUX.1 Kontext [max] input and output, as fal's model page gives them.

Source: ``fal-ai/flux-pro/kontext/max`` API page (see ``../shared/reference``).
Every field, default, range and enum here is copied from that page; nothing is
loosened, so a value we accept is a value fal accepts. One bound is ours: the
page gives ``prompt`` no maximum, and we cap it at ``MAX_PROMPT_CHARS`` so that
a job record stays small and a runaway prompt is refused before it is paid for
(the model's text encoder reads far fewer tokens than that).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kontext_s3.text import shorten

ENDPOINT_ID = "fal-ai/flux-pro/kontext/max"
MAX_PROMPT_CHARS = 4000
#: How much of a value given to us a one-line message quotes (a 4,000-character prompt is not echoed whole).
MAX_QUOTE_CHARS = 200
#: A problem's message: a sentence with one quoted value, and room for a fal detail summarised.
MAX_PROBLEM_CHARS = 1000


class OutputFormat(StrEnum):
    JPEG = "jpeg"
    PNG = "png"


class SafetyTolerance(StrEnum):
    # The model page types this as a string enum, not an integer range.
    ONE = "1"
    TWO = "2"
    THREE = "3"
    FOUR = "4"
    FIVE = "5"
    SIX = "6"


class AspectRatio(StrEnum):
    R21_9 = "21:9"
    R16_9 = "16:9"
    R4_3 = "4:3"
    R3_2 = "3:2"
    R1_1 = "1:1"
    R2_3 = "2:3"
    R3_4 = "3:4"
    R9_16 = "9:16"
    R9_21 = "9:21"


#: ``aspect_ratio=match`` (ours, not the model's): the allowed ratio nearest the input image's.
MATCH_INPUT = "match"


def nearest_aspect_ratio(width: int, height: int) -> str:
    """The model's allowed ratio nearest ``width:height`` (compared as logarithms, so 2:1 and 1:2 are equally far)."""

    def distance(ratio: AspectRatio) -> float:
        w, h = (int(part) for part in ratio.value.split(":"))
        return abs(math.log((width / height) / (w / h)))

    return min(AspectRatio, key=distance).value


class KontextMaxInput(BaseModel):
    """The request body of ``POST https://queue.fal.run/fal-ai/flux-pro/kontext/max``."""

    model_config = ConfigDict(extra="forbid", use_enum_values=True)

    prompt: str = Field(max_length=MAX_PROMPT_CHARS, description="The prompt to generate an image from.")
    seed: int | None = Field(default=None, description="Same seed and prompt give the same image.")
    guidance_scale: float = Field(default=3.5, ge=1, le=20, description="CFG scale.")
    sync_mode: bool = Field(default=False, description="Return media as data URIs.")
    num_images: int = Field(default=1, ge=1, le=4, description="Number of images to generate.")
    output_format: OutputFormat = Field(default=OutputFormat.JPEG)
    safety_tolerance: SafetyTolerance = Field(default=SafetyTolerance.TWO)
    enhance_prompt: bool = Field(default=False)
    aspect_ratio: AspectRatio | None = Field(default=None)
    image_url: str = Field(description="Image prompt for the omni model.")

    def to_request_body(self) -> dict[str, Any]:
        """The JSON body we send: every field with its value, unset optionals left out."""
        return self.model_dump(mode="json", exclude_none=True)


#: Fields a user may set through object tags (``image_url`` is ours to set).
TAG_FIELDS: tuple[str, ...] = tuple(name for name in KontextMaxInput.model_fields if name != "image_url")
OPTIONAL_TAG_FIELDS: tuple[str, ...] = tuple(name for name in TAG_FIELDS if name != "prompt")


class OutputImage(BaseModel):
    """``fal__toolkit__image__image__Image``: ``url`` always, the rest where fal gives it."""

    model_config = ConfigDict(extra="allow")

    url: str
    content_type: str | None = None
    file_name: str | None = None
    file_size: int | None = None
    width: int | None = None
    height: int | None = None


class KontextMaxOutput(BaseModel):
    """The model output; every field is marked required on the model page."""

    model_config = ConfigDict(extra="allow")

    images: list[OutputImage]
    timings: dict[str, Any]
    seed: int
    has_nsfw_concepts: list[bool]
    prompt: str


def allowed_values(field: str) -> str:
    """A human sentence of what ``field`` accepts, derived from the schema itself."""
    schema = KontextMaxInput.model_json_schema()
    prop = schema["properties"][field]
    defs = schema.get("$defs", {})
    options = [prop, *prop.get("anyOf", [])]
    for option in options:
        ref = option.get("$ref")
        if ref:
            enum = defs[ref.rsplit("/", 1)[-1]]["enum"]
            return "one of " + ", ".join(str(v) for v in enum)
    kinds = {o.get("type") for o in options if o.get("type") not in (None, "null")}
    if "minimum" in prop and "maximum" in prop:
        kind = "an integer" if "integer" in kinds else "a number"
        return f"{kind} from {_num(prop['minimum'])} to {_num(prop['maximum'])}"
    if "boolean" in kinds:
        return "true or false"
    if "integer" in kinds:
        return "an integer"
    if "maxLength" in prop:
        return f"text of at most {prop['maxLength']} characters"
    return "text"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def quote(value: object) -> str:
    """``value`` as a message names it: its ``repr`` shortened, or for a list or object only its kind.

    A container's ``repr`` could be of any size and depth (a recipe is JSON); its kind and length are always short.
    """
    if isinstance(value, str | int | float | bool) or value is None:
        return shorten(repr(value), MAX_QUOTE_CHARS)
    if isinstance(value, list | tuple):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, dict):
        return f"an object of {len(value)} field(s)"
    return f"a value of type {type(value).__name__}"


class FieldProblem(BaseModel):
    """One thing wrong with one field, phrased for the person who set it.

    Plain, bounded text only: the problem goes into ``error.json`` and one-line messages, which must always
    serialise and stay short whatever was given (a value nested thousands deep, a 60 KB field name).
    """

    field: str
    #: The value given, when it is a scalar (text shortened); a list or object is named in ``message`` instead.
    value: str | int | float | bool | None = None
    message: str
    allowed: str | None = None

    @field_validator("value", mode="before")
    @classmethod
    def _scalar(cls, value: object) -> object:
        if isinstance(value, str):
            return shorten(value, MAX_QUOTE_CHARS)
        return value if isinstance(value, int | float | bool) else None

    @field_validator("field")
    @classmethod
    def _short_field(cls, field: str) -> str:
        return shorten(field, MAX_QUOTE_CHARS)

    @field_validator("message")
    @classmethod
    def _short_message(cls, message: str) -> str:
        return shorten(message, MAX_PROBLEM_CHARS)

    def sentence(self) -> str:
        text = f"{self.field}: {self.message}"
        if self.allowed:
            text += f" (allowed: {self.allowed})"
        return text


def describe_validation_error(error: ValidationError, values: Mapping[str, Any]) -> list[FieldProblem]:
    """Turn pydantic's errors into one :class:`FieldProblem` per field, naming the allowed range."""
    problems: list[FieldProblem] = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else "input"
        if item["type"] == "missing":
            message = "is required but was not given"
        elif item["type"] == "extra_forbidden":
            message = "is not a field of the model"
        else:
            message = f"{quote(values.get(field, item.get('input')))} is not accepted"
        allowed = allowed_values(field) if field in KontextMaxInput.model_fields else None
        problems.append(FieldProblem(field=field, value=values.get(field), message=message, allowed=allowed))
    return problems
