"""The job lifecycle is stated once, in the transitions table; the documented diagram and the code follow it."""

from __future__ import annotations

import re
from pathlib import Path

from kontext_s3.jobs import Job, JobState
from kontext_s3.jobs.transitions import Hold, T, diagram

ROOT = Path(__file__).resolve().parents[2]
LAYER = ROOT / "layers" / "shared" / "kontext_s3"


def test_the_documented_diagram_is_the_one_the_table_makes() -> None:
    page = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    documented = page.split("<!-- lifecycle:begin -->", 1)[1].split("<!-- lifecycle:end -->", 1)[0]
    assert documented.strip() == f"```mermaid\n{diagram()}```", "docs/design.md's diagram differs from transitions.diagram()"


def test_every_state_is_reached_and_only_a_failure_nothing_of_which_reached_fal_leaves_an_ended_state() -> None:
    reached = {t.target for t in T.all()} | {JobState.SUBMITTING}
    assert reached == set(JobState)
    for transition in T.all():
        for case in transition.cases:
            if case.source.ended:
                assert transition is T.TAKE_OVER and case.requires.name in ("RETRYABLE", "NEVER_SENT"), transition.name


def test_sending_leaves_only_on_the_senders_own_word_or_its_death() -> None:
    # The point of no return: back to SUBMITTING (or the line) only on fal's "not enqueued", said by the sender.
    for transition in T.all():
        for case in transition.cases:
            if case.source is JobState.SENDING and transition.target in (JobState.SUBMITTING, JobState.WAITING):
                assert case.hold is Hold.MINE and transition.name.startswith("not enqueued")
            if transition is T.BEGIN_SEND:
                assert case.hold is Hold.MINE_LIVE


def test_every_attribute_a_transition_clears_or_sets_is_a_field_of_a_job() -> None:
    known = set(Job.model_fields) | {"open_shard", "open_order", "notify_until_ms"}
    for transition in T.all():
        assert set(transition.clears) <= known, transition.name
        assert {name for name, _ in transition.fixed} <= known, transition.name


def test_no_state_name_is_written_as_a_literal_outside_the_jobs_package() -> None:
    names = "|".join(state.value for state in JobState)
    pattern = re.compile(rf"""["']({names})["']""")
    offenders = []
    for path in [*LAYER.glob("*.py"), *(ROOT / "functions").glob("*/app.py")]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            # fal's own request statuses share a word with ours ("COMPLETED"): those come from fal's answers.
            if pattern.search(line) and "status" not in line and "state ==" not in line:
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []
