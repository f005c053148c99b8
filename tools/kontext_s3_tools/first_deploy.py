"""``make deploy``: a first deploy that asks only what a first deploy must decide.

``sam deploy --guided`` asks every one of the template's parameters, in order, without their descriptions: forty
questions. A first deploy decides four things: the stack's name, its region, how many images a UTC day it may pay
for (``DailyImageBudget``, shown with what it costs), and, optionally, the fal account whose webhooks it accepts
(``FalUserId``). Everything else takes the template's default and can be changed later with ``sam deploy
--parameter-overrides``. This asks those four, shows the ``sam deploy`` command it runs, and runs it on the built
artifact (``make build``), with the change set shown for confirmation as ``samconfig.toml`` asks.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILT_TEMPLATE = ROOT / ".aws-sam" / "build" / "template.yaml"
#: What fal charged per image of FLUX.1 Kontext [max] when this was written (template.yaml's DailyImageBudget says so).
PRICE_PER_IMAGE_USD = 0.08
DEFAULT_STACK = "kontext-s3"
DEFAULT_BUDGET = 100


@dataclass(frozen=True)
class FirstDeploy:
    stack_name: str
    region: str
    daily_image_budget: int
    fal_user_id: str

    def sam_command(self, sam: str) -> list[str]:
        overrides = [f"DailyImageBudget={self.daily_image_budget}"]
        if self.fal_user_id:
            overrides.append(f"FalUserId={self.fal_user_id}")
        return [
            sam,
            "deploy",
            "--template-file",
            str(BUILT_TEMPLATE),
            "--stack-name",
            self.stack_name,
            "--region",
            self.region,
            "--parameter-overrides",
            *overrides,
        ]


def spend(budget: int) -> str:
    if budget == 0:
        return "no limit: every upload is sent and paid"
    return f"at most ${budget * PRICE_PER_IMAGE_USD:,.2f} a day at ${PRICE_PER_IMAGE_USD} an image"


def ask(args: argparse.Namespace, read: Callable[[str], str]) -> FirstDeploy:
    """The four answers: from the options, else asked, each with its default."""

    def answer(given: str | None, question: str, default: str) -> str:
        if given is not None:
            return given
        return read(f"{question} [{default}]: ").strip() or default

    stack = answer(args.stack_name, "Stack name", DEFAULT_STACK)
    region = answer(args.region, "AWS region", "us-east-1")
    while True:
        text = answer(
            None if args.daily_image_budget is None else str(args.daily_image_budget),
            f"Images a UTC day it may send to fal (DailyImageBudget; {DEFAULT_BUDGET} is {spend(DEFAULT_BUDGET)}; 0 is no limit)",
            str(DEFAULT_BUDGET),
        )
        if text.isdigit():
            break
        print(f"  {text!r} is not a whole number of images", file=sys.stderr)
        args.daily_image_budget = None
    fal_user = answer(
        args.fal_user_id,
        "Your fal user id (FalUserId; empty: the first account whose signed webhook proves itself ours is pinned)",
        "",
    )
    return FirstDeploy(stack, region, int(text), fal_user)


def main(argv: list[str] | None = None, read: Callable[[str], str] = input) -> int:
    parser = argparse.ArgumentParser(prog="make deploy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack-name")
    parser.add_argument("--region")
    parser.add_argument("--daily-image-budget", type=int)
    parser.add_argument("--fal-user-id")
    parser.add_argument("--sam", default="sam", help="the sam executable")
    parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    args = parser.parse_args(argv)
    if not BUILT_TEMPLATE.is_file() and not args.dry_run:
        print("error: no built artifact in .aws-sam/build: run make build first", file=sys.stderr)
        return 2
    try:
        chosen = ask(args, read)
    except (EOFError, KeyboardInterrupt):
        print("\nnothing deployed", file=sys.stderr)
        return 130
    command = chosen.sam_command(args.sam)
    print(f"daily budget: {chosen.daily_image_budget} images ({spend(chosen.daily_image_budget)})")
    print("deploying with: " + shlex.join(command))
    if args.dry_run:
        return 0
    done = subprocess.run(command, cwd=ROOT, check=False)
    if done.returncode == 0:
        print(
            "next: store the fal key (key_id:key_secret) in the stack's secret, named by its FalKeySecretArn output:\n"
            f"  aws secretsmanager put-secret-value --region {chosen.region} --secret-string 'KEY_ID:KEY_SECRET' --secret-id "
            f'"$(aws cloudformation describe-stacks --region {chosen.region} --stack-name {chosen.stack_name} '
            '--query "Stacks[0].Outputs[?OutputKey==\'FalKeySecretArn\'].OutputValue" --output text)"'
        )
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())
