"""The tag codec: round trips for any text, and the 1,000-character guarantee within S3's limits."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kontext_s3.tag_codec import (
    MAX_KEY_CHARS,
    MAX_TAGS,
    MAX_VALUE_CHARS,
    TagEncodingError,
    decode_tags,
    encode_tags,
    is_plain_safe,
    parse_tagging_header,
    tagging_header,
)

# S3's tag rules (AWS tagging docs; moto enforces the same): letters, digits, spaces, + - = . _ : / @
S3_TAG_CHARS = re.compile(r"^[\w\s+\-=.:/@]*$")

FIELDS = {
    "seed": 4294967295,
    "guidance_scale": 19.75,
    "num_images": 4,
    "output_format": "png",
    "safety_tolerance": "6",
    "enhance_prompt": True,
    "aspect_ratio": "21:9",
    "sync_mode": False,
}


def assert_valid_s3_tags(tags: dict[str, str]) -> None:
    assert len(tags) <= MAX_TAGS
    for key, value in tags.items():
        assert 1 <= len(key) <= MAX_KEY_CHARS, key
        assert len(value) <= MAX_VALUE_CHARS
        assert S3_TAG_CHARS.match(key) and S3_TAG_CHARS.match(value)
        assert not key.startswith("aws")


def random_text(rng: random.Random, low: int, high: int, length: int = 1000) -> str:
    chars: list[str] = []
    while len(chars) < length:
        point = rng.randint(low, high)
        if not 0xD800 <= point <= 0xDFFF:
            chars.append(chr(point))
    return "".join(chars)


text_without_surrogates = st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=400)


@settings(max_examples=300, deadline=None)
@given(prompt=text_without_surrogates)
def test_any_prompt_round_trips(prompt: str) -> None:
    tags = encode_tags({"prompt": prompt})
    assert_valid_s3_tags(tags)
    assert decode_tags(tags) == {"prompt": prompt}


@settings(max_examples=100, deadline=None)
@given(prompt=text_without_surrogates, seed=st.integers(min_value=0, max_value=2**63), ratio=st.sampled_from(["1:1", "16:9", None]))
def test_prompt_and_fields_round_trip_through_the_tagging_header(prompt: str, seed: int, ratio: str | None) -> None:
    fields: dict[str, object] = {"prompt": prompt, "seed": seed, "enhance_prompt": True, "aspect_ratio": ratio}
    tags = encode_tags(fields)
    # What goes over the wire in PutObject's x-amz-tagging header, and back.
    assert parse_tagging_header(tagging_header(tags)) == tags
    expected = {"prompt": prompt, "seed": str(seed), "enhance_prompt": "true"} | ({"aspect_ratio": ratio} if ratio else {})
    assert decode_tags(tags) == expected


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("ASCII with punctuation", 0x20, 0x7E), ("any BMP character", 0x80, 0xFFFF), ("CJK", 0x4E00, 0x9FFF)],
)
def test_1000_characters_of_the_bmp_fit_with_every_other_field(name: str, low: int, high: int) -> None:
    prompt = random_text(random.Random(name), low, high)
    tags = encode_tags({"prompt": prompt, **FIELDS})
    assert_valid_s3_tags(tags)
    assert decode_tags(tags)["prompt"] == prompt


@pytest.mark.parametrize(("name", "low", "high"), [("emoji", 0x1F300, 0x1FAFF), ("any astral character", 0x10000, 0x10FFFF)])
def test_1000_astral_characters_fit_with_three_other_fields(name: str, low: int, high: int) -> None:
    prompt = random_text(random.Random(name), low, high)
    fields = {"prompt": prompt, "seed": 2**32 - 1, "guidance_scale": 19.75, "aspect_ratio": "21:9"}
    tags = encode_tags(fields)
    assert_valid_s3_tags(tags)
    assert decode_tags(tags)["prompt"] == prompt


def test_a_prompt_beyond_the_capacity_is_refused_with_a_reason() -> None:
    prompt = random_text(random.Random(7), 0x10000, 0x10FFFF, length=1500)
    with pytest.raises(TagEncodingError, match="too long to fit in S3 tags"):
        encode_tags({"prompt": prompt})


def test_simple_prompts_stay_readable_plain_tags() -> None:
    tags = encode_tags({"prompt": "Make the sky purple", "seed": 42, "aspect_ratio": "16:9", "enhance_prompt": False})
    assert tags == {"prompt": "Make the sky purple", "seed": "42", "aspect_ratio": "16:9", "enhance_prompt": "false"}


def test_punctuation_moves_the_prompt_into_packed_tags() -> None:
    tags = encode_tags({"prompt": "Replace 'joy' by 'fal', please?", "seed": 1})
    assert "prompt" not in tags and all(k.startswith("kx") for k in tags)
    assert decode_tags(tags) == {"prompt": "Replace 'joy' by 'fal', please?", "seed": "1"}


@pytest.mark.parametrize("text", ["hello, world", " leading space", "trailing ", "it's", "a?", "x" * 257, ""])
def test_plain_safe_refuses_what_s3_or_trimming_would_change(text: str) -> None:
    assert not is_plain_safe(text)


def test_decoding_ignores_unknown_tags_and_refuses_a_field_given_twice() -> None:
    packed = encode_tags({"prompt": "who's there?", "seed": 5})
    assert decode_tags({**packed, "owner": "team-a"}) == {"prompt": "who's there?", "seed": "5"}
    with pytest.raises(TagEncodingError, match="seed is given both"):
        decode_tags({**packed, "seed": "6"})


def test_missing_pieces_are_reported() -> None:
    tags = encode_tags({"prompt": random_text(random.Random(3), 0x4E00, 0x9FFF, 600)})
    assert len(tags) > 2
    first_key = next(k for k in tags if k.startswith("kx0."))
    del tags[first_key]
    with pytest.raises(TagEncodingError, match="incomplete"):
        decode_tags(tags)


def test_reserved_tags_leave_room_for_the_users_own() -> None:
    prompt = random_text(random.Random(5), 0x4E00, 0x9FFF, 900)
    assert len(encode_tags({"prompt": prompt})) <= 8
    with pytest.raises(TagEncodingError, match="only 1 are free"):
        encode_tags({"prompt": prompt}, reserved_tags=9)


def test_unknown_fields_are_refused_when_encoding() -> None:
    with pytest.raises(TagEncodingError, match="image_url"):
        encode_tags({"prompt": "x", "image_url": "https://example.com"})


def test_the_tagging_header_encodes_spaces_as_percent_20() -> None:
    # S3 documents URL-query encoding for x-amz-tagging; "+" is a literal plus in tag values.
    header = tagging_header({"prompt": "make it blue + gold", "seed": "1"})
    assert header == "prompt=make%20it%20blue%20%2B%20gold&seed=1"
    assert parse_tagging_header(header) == {"prompt": "make it blue + gold", "seed": "1"}
