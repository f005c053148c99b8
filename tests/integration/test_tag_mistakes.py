"""The commonest mistakes in an upload's tags end in a record that says how to fix them."""

from __future__ import annotations

from tests.world import World, world

__all__ = ["world"]


def test_a_misspelt_tag_key_is_named_in_the_record_with_the_field_it_was_meant_as(world: World) -> None:
    submit = world.submit(TAG_WAIT_SECONDS="0")
    version = world.upload("inputs/typo.jpg", tags={"promt": "Make it red"})
    assert world.deliver(submit, world.upload_event()) == []
    job = world.job("inputs/typo.jpg", version)
    assert job.error_code == "invalid_tags"
    problems = {p["field"]: p["message"] for p in world.error_record(job)["problems"]}
    assert problems["promt"].startswith("promt: did you mean prompt?")
    assert world.posts() == 0
