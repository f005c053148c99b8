"""The model schema says exactly what fal's model page says."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kontext_s3.model_schema import (
    OPTIONAL_TAG_FIELDS,
    TAG_FIELDS,
    KontextMaxInput,
    KontextMaxOutput,
    allowed_values,
    describe_validation_error,
)


def test_the_defaults_are_the_model_pages() -> None:
    body = KontextMaxInput(prompt="Put a donut next to the flour.", image_url="https://v3.fal.media/x.png").to_request_body()
    # The page's own input example, field for field.
    assert body == {
        "prompt": "Put a donut next to the flour.",
        "guidance_scale": 3.5,
        "sync_mode": False,
        "num_images": 1,
        "output_format": "jpeg",
        "safety_tolerance": "2",
        "enhance_prompt": False,
        "image_url": "https://v3.fal.media/x.png",
    }


def test_every_field_of_the_page_is_a_tag_field() -> None:
    assert set(TAG_FIELDS) == {
        "prompt",
        "seed",
        "guidance_scale",
        "sync_mode",
        "num_images",
        "output_format",
        "safety_tolerance",
        "enhance_prompt",
        "aspect_ratio",
    }
    assert "prompt" not in OPTIONAL_TAG_FIELDS


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        ("guidance_scale", [1, 3.5, 20], [0.99, 20.01, -1]),
        ("num_images", [1, 4], [0, 5]),
        ("output_format", ["jpeg", "png"], ["webp", "jpg", "JPEG"]),
        ("safety_tolerance", ["1", "6"], ["0", "7", "strict"]),
        ("aspect_ratio", ["21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21"], ["5:4", "16/9"]),
    ],
)
def test_limits_are_the_pages_limits(field: str, good: list[object], bad: list[object]) -> None:
    for value in good:
        KontextMaxInput.model_validate({"prompt": "p", "image_url": "u", field: value})
    for value in bad:
        with pytest.raises(ValidationError):
            KontextMaxInput.model_validate({"prompt": "p", "image_url": "u", field: value})


def test_safety_tolerance_is_sent_as_a_string() -> None:
    body = KontextMaxInput.model_validate({"prompt": "p", "image_url": "u", "safety_tolerance": "5"}).to_request_body()
    assert body["safety_tolerance"] == "5"


def test_prompt_and_image_url_are_required() -> None:
    with pytest.raises(ValidationError) as info:
        KontextMaxInput.model_validate({})
    assert {e["loc"][0] for e in info.value.errors()} == {"prompt", "image_url"}


def test_a_refusal_names_the_field_and_the_allowed_range() -> None:
    with pytest.raises(ValidationError) as info:
        KontextMaxInput.model_validate({"prompt": "p", "image_url": "u", "num_images": "9", "output_format": "gif"})
    sentences = sorted(p.sentence() for p in describe_validation_error(info.value, {"num_images": "9", "output_format": "gif"}))
    assert sentences == [
        "num_images: '9' is not accepted (allowed: an integer from 1 to 4)",
        "output_format: 'gif' is not accepted (allowed: one of jpeg, png)",
    ]


def test_allowed_values_read_from_the_schema() -> None:
    assert allowed_values("guidance_scale") == "a number from 1 to 20"
    assert allowed_values("safety_tolerance") == "one of 1, 2, 3, 4, 5, 6"
    assert allowed_values("enhance_prompt") == "true or false"
    assert allowed_values("seed") == "an integer"


def test_the_output_needs_every_field_the_page_marks_required() -> None:
    complete = {
        "images": [{"url": "https://fal.media/files/a.jpg", "width": 1024, "height": 768, "content_type": "image/jpeg"}],
        "timings": {"inference": 2.1},
        "seed": 42,
        "has_nsfw_concepts": [False],
        "prompt": "p",
    }
    assert KontextMaxOutput.model_validate(complete).images[0].width == 1024
    for missing in ("images", "timings", "seed", "has_nsfw_concepts", "prompt"):
        with pytest.raises(ValidationError):
            KontextMaxOutput.model_validate({k: v for k, v in complete.items() if k != missing})
