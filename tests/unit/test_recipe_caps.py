"""Recipes of any shape end as InvalidRecipe, with problems that are short plain text the error record can hold."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest

from kontext_s3.model_schema import MAX_PROBLEM_CHARS, FieldProblem
from kontext_s3.recipes import MAX_RECIPE_BYTES, MAX_RECIPE_DEPTH, InvalidRecipe, parse_recipe

KEY = "inputs/shop/_kontext.json"


def nested(depth: int, inner: bytes = b"") -> bytes:
    return b"[" * depth + inner + b"]" * depth


def refused(raw: bytes) -> list[FieldProblem]:
    with pytest.raises(InvalidRecipe) as info:
        parse_recipe(KEY, "v1", raw)
    problems = info.value.problems
    assert problems
    # What the submit function writes into error.json: it must serialise, and stay small.
    record = json.dumps([p.model_dump(mode="json") for p in problems])
    assert len(record) < 2 * MAX_PROBLEM_CHARS, record[:300]
    assert len(str(info.value)) < 2 * MAX_PROBLEM_CHARS
    return problems


@pytest.fixture
def deep_parser() -> Iterator[None]:
    """The recursion limit raised as python3.13 (the functions' runtime) in effect has it for the JSON parser:
    there, a value thousands of levels deep parses, and only then did the trouble start."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    yield
    sys.setrecursionlimit(before)


@pytest.mark.parametrize("depth", [5000, 300, MAX_RECIPE_DEPTH + 1])
def test_a_value_nested_deep_is_refused_before_it_is_parsed(depth: int, deep_parser: None) -> None:
    raw = b'{"prompt": "x", "seed": ' + nested(depth) + b"}"
    [problem] = refused(raw)
    assert problem.field == "(file)" and f"more than {MAX_RECIPE_DEPTH} levels deep" in problem.message


def test_a_recipe_that_is_all_nesting_is_refused() -> None:
    assert "levels deep" in refused(nested(5000))[0].message
    assert "levels deep" in refused(b"{" * 10_000)[0].message  # unclosed too


def test_brackets_inside_strings_do_not_count() -> None:
    recipe = parse_recipe(KEY, None, json.dumps({"prompt": "[" * 3000 + '\\"{' * 100}).encode())
    assert recipe.fields["prompt"].startswith("[[[")


def test_a_recipe_over_the_size_cap_is_refused_naming_the_cap() -> None:
    raw = json.dumps({"prompt": "x" * (100 * 1024)}).encode()
    [problem] = refused(raw)
    assert problem.field == "(file)" and str(MAX_RECIPE_BYTES) in problem.message


@pytest.mark.parametrize("value", [json.loads(nested(20, b"1")), {"a": {"b": {"c": [1, 2, 3]}}}, list(range(10_000))])
def test_a_field_holding_a_list_or_object_gives_a_short_plain_problem(value: object) -> None:
    [problem] = refused(json.dumps({"prompt": "x", "seed": value}).encode())
    assert problem.field == "seed" and problem.value is None
    assert problem.message.startswith(("a list of", "an object of")) and "[" not in problem.message


def test_a_field_nested_to_the_depth_cap_still_gives_a_short_problem() -> None:
    # 40 levels as the review gave it is over the cap; just under it, the value reaches validation.
    assert "levels deep" in refused(b'{"prompt": "x", "seed": ' + nested(40) + b"}")[0].message
    [problem] = refused(b'{"prompt": "x", "seed": ' + nested(MAX_RECIPE_DEPTH - 1) + b"}")
    assert problem.field == "seed" and len(problem.sentence()) < 200


def test_a_long_value_or_field_name_is_shortened() -> None:
    [problem] = refused(json.dumps({"prompt": "x" * 5000}).encode())
    assert problem.field == "prompt" and "more characters" in problem.message and len(problem.sentence()) < 500
    assert isinstance(problem.value, str) and len(problem.value) <= 200
    [problem] = refused(json.dumps({"z" * 30_000: 1}).encode())
    assert len(problem.field) <= 200
