"""make deploy asks the four things a first deploy decides, and deploys every other parameter at its default."""

from __future__ import annotations

import pytest
from samtranslator.yaml_helper import yaml_parse

from kontext_s3_tools import first_deploy
from kontext_s3_tools.local_stack import TEMPLATE


def run(answers: list[str], capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[list[str], str]:
    asked: list[str] = []

    def read(question: str) -> str:
        asked.append(question)
        return answers.pop(0)

    assert first_deploy.main(["--dry-run", "--sam", "sam", *argv], read=read) == 0
    return asked, capsys.readouterr().out


def test_a_first_deploy_asks_four_questions_and_takes_their_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    asked, out = run(["", "", "", ""], capsys)
    assert [q.split(" [")[0].split(" (")[0] for q in asked] == [
        "Stack name",
        "AWS region",
        "Images a UTC day it may send to fal",
        "Your fal user id",
    ]
    assert "$8.00 a day" in asked[2]
    command = out.splitlines()[-1]
    assert "--stack-name kontext-s3 --region us-east-1 --parameter-overrides DailyImageBudget=100" in command
    assert "FalUserId" not in command  # empty: the template's default (the first proven account is pinned)


def test_answers_and_options_reach_the_command_and_a_budget_that_is_no_number_is_asked_again(
    capsys: pytest.CaptureFixture[str],
) -> None:
    asked, out = run(["ten", "25", "user-1"], capsys, "--stack-name", "dev", "--region", "eu-west-1")
    assert len(asked) == 3  # the stack and region were given; the budget asked twice
    assert "dev --region eu-west-1 --parameter-overrides DailyImageBudget=25 FalUserId=user-1" in out
    assert "at most $2.00 a day" in out


def test_the_price_it_quotes_is_the_one_the_template_states() -> None:
    description = yaml_parse(TEMPLATE.read_text(encoding="utf-8"))["Parameters"]["DailyImageBudget"]["Description"]
    assert f"${first_deploy.PRICE_PER_IMAGE_USD}" in description
    assert int(yaml_parse(TEMPLATE.read_text(encoding="utf-8"))["Parameters"]["DailyImageBudget"]["Default"]) == first_deploy.DEFAULT_BUDGET
