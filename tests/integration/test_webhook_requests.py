"""What a job's ending costs the webhook in DynamoDB calls: the common case holds the job without reading it first."""

from __future__ import annotations

from tests.helpers import eventually as until
from tests.world import World, world

__all__ = ["world"]


def test_a_webhook_for_a_job_at_fal_holds_it_in_one_write_without_reading_it_first(world: World) -> None:
    _, server = world.webhook(FAL_USER_ID=world.emulator.user_id)
    submit = world.submit(webhook_url=server.url)
    version = world.upload("inputs/cheap.jpg")
    world.gateway.record = True
    assert world.deliver(submit, world.upload_event()) == []
    job = until(lambda: (j := world.job("inputs/cheap.jpg", version)).state.ended and j, timeout=30, what="its webhook")
    world.gateway.record = False
    reads_of_the_job = [
        call
        for call in world.gateway.recorded()
        if call.service == "dynamodb" and call.action == "GetItem" and job.job_id in call.body.decode()
    ]
    assert reads_of_the_job == []  # neither the submit nor the webhook read the job: each holds it by a conditional write
