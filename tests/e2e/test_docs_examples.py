"""Every ``aws ...`` example in a bash block of README.md and docs/*.md, run with the real AWS CLI against a local stack.

An example is a command line (lines joined where one ends in ``\\``) that calls ``aws``. Each runs as written,
under ``bash -c`` with ``set -euo pipefail``, in a folder holding the ``photo.jpg`` and ``catalogue/`` the examples
name, with the shell variables the docs say they are: ``$BUCKET``, ``$TABLE``, ``$FAL_KEY_SECRET``, ``$DLQ_URL``
(the stack's outputs), and must exit 0. A line ending in ``# deployed only`` needs a deployed stack (CloudFormation,
``sam deploy``): it is skipped, and the few there are must be the ones listed in ``DEPLOYED_ONLY``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kontext_s3_tools import cli
from kontext_s3_tools.local_stack import LocalStack
from tests.helpers import jpeg_bytes

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = "# deployed only"
#: ``aws`` as a command: at the start of a line, after ``$(``, or after ``;``, ``&``, ``|`` or ``(``.
AWS_CALL = re.compile(r"(?:^|[;&|(]\s*|\$\(\s*)aws\s")
SAM_DEPLOYS = re.compile(r"(?:^|[\s/])sam\s+(?:deploy|delete)\b")
#: Examples that change the stack's data for good: run after all the others, in page order.
DESTRUCTIVE = re.compile(r"\baws\s+(?:s3\s+rm|s3api\s+delete-(?:objects|bucket)|dynamodb\s+delete-table)\b")
#: What may be marked deployed only, and why it cannot run on the local stack. Anything else must run.
DEPLOYED_ONLY = {
    "cloudformation describe-stacks": "the local stack has no CloudFormation stack: it provisions the resources itself",
    "sam deploy": "deploys to AWS",
    "sam delete": "deletes the stack in AWS",
    "logs filter-log-events": "the local functions log to files, not CloudWatch Logs",
    "sqs start-message-move-task": "moto does not implement it",
}
MAX_DEPLOYED_ONLY = 10


@dataclass(frozen=True)
class Example:
    page: str
    line: int
    command: str

    @property
    def deployed_only(self) -> bool:
        return self.command.rstrip().endswith(MARK)

    @property
    def destructive(self) -> bool:
        return bool(DESTRUCTIVE.search(self.command))

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    def __str__(self) -> str:
        return f"{self.id}: {' '.join(self.command.split())}"


def bash_blocks(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number of the block's first line, its lines dedented) for each ```bash block, indented ones included."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```bash\s*$", lines[i])
        i += 1
        if not fence:
            continue
        indent, start, block = len(fence[1]), i + 1, []
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            block.append(lines[i][indent:])
            i += 1
        i += 1
        yield start, block


def command_lines(start: int, block: list[str]) -> Iterator[tuple[int, str]]:
    """(line number, command) of each command line of a block: continued lines (ending in \\) joined as bash joins them."""
    current: list[str] = []
    first = start
    for number, line in enumerate(block, start):
        if not current:
            first = number
        current.append(line)
        if not line.rstrip().endswith("\\"):
            command = "\n".join(current)
            current = []
            if command.strip() and not command.lstrip().startswith("#"):
                yield first, command
    if current:
        yield first, "\n".join(current)


def collect() -> list[Example]:
    """Every example that calls aws, and every line marked deployed only, in page order."""
    found = []
    for page in PAGES:
        for start, block in bash_blocks(page.read_text(encoding="utf-8")):
            for number, command in command_lines(start, block):
                example = Example(str(page.relative_to(ROOT)), number, command)
                if AWS_CALL.search(command) or example.deployed_only or SAM_DEPLOYS.search(command):
                    found.append(example)
    return found


EXAMPLES = collect()
#: The order they run in: everything else first, then what empties and deletes the bucket and the table.
RUN_ORDER = [e for e in EXAMPLES if not e.destructive] + [e for e in EXAMPLES if e.destructive]


def aws_cli() -> str:
    """The real AWS CLI installed beside this Python (the test extra has it), else the one on the PATH."""
    found = shutil.which("aws", path=str(Path(sys.executable).parent)) or shutil.which("aws")
    assert found, "the AWS CLI is not installed: it is in the test extra (pip install -e '.[test]')"
    return found


@dataclass
class World:
    stack: LocalStack
    workdir: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("docs-examples")
    (workdir / "photo.jpg").write_bytes(jpeg_bytes(160, 120, (90, 140, 200)))
    (workdir / "catalogue").mkdir()
    (workdir / "catalogue" / "shoe.jpg").write_bytes(jpeg_bytes(96, 96, (200, 60, 60)))
    (workdir / "catalogue" / "bag.jpg").write_bytes(jpeg_bytes(96, 64, (60, 160, 60)))
    home = tmp_path_factory.mktemp("home")  # no ~/.aws of whoever runs the tests
    with LocalStack(recovery_interval_seconds=None) as stack:
        # An input that has been edited once, as the examples that list, copy and re-tag its outputs assume.
        target = stack.target()
        uploaded = cli.upload_image(target, workdir / "photo.jpg", {"prompt": "Make the sky purple"}, key="inputs/photo.jpg")
        assert cli.wait_for_result(target, uploaded, timeout=60, progress=lambda _: None).succeeded
        # What `make stack` writes, for the example that reads it in a subshell.
        (workdir / "out").mkdir()
        (workdir / "out" / "stack.env").write_text(
            "".join(f"{name}={shlex.quote(value)}\n" for name, value in stack.cli_environment().items()), encoding="utf-8"
        )
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KONTEXT_S3_"))}
        env = {
            **inherited,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # kontext-s3 and aws
            "HOME": str(home),
            "AWS_CONFIG_FILE": str(home / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
            **stack.cli_environment(),
            # The stack's outputs, under the names the docs give them.
            "BUCKET": stack.resources.bucket,
            "TABLE": stack.resources.table,
            "FAL_KEY_SECRET": stack.resources.secret_arn,
            "DLQ_URL": stack.resources.dlq_url,
            "AWS_CLI": aws_cli(),
        }
        yield World(stack, workdir, env)


# The AWS CLI v1 ignores AWS_ENDPOINT_URL for SQS (and a few other services) in the regions where it pins their
# legacy endpoint, us-east-1 among them (awscli.customizations.overridesslcommonname), unless --endpoint-url is
# given: every call is given it, which is what AWS_ENDPOINT_URL says for the rest.
PREAMBLE = 'set -euo pipefail\naws() { "$AWS_CLI" --endpoint-url "$AWS_ENDPOINT_URL" "$@"; }\n'


def run(world: World, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", PREAMBLE + command], cwd=world.workdir, env=world.env, capture_output=True, text=True, timeout=180, check=False
    )


@pytest.mark.parametrize(
    "example",
    [
        pytest.param(
            e, id=e.id, marks=[pytest.mark.skip(reason=f"deployed only: {' '.join(e.command.split())[:80]}")] if e.deployed_only else []
        )
        for e in RUN_ORDER
    ],
)
def test_the_example_runs_against_the_local_stack(world: World, example: Example) -> None:
    result = run(world, example.command)
    assert result.returncode == 0, f"{example}\nexit {result.returncode}\nstdout: {result.stdout[-1500:]}\nstderr: {result.stderr[-1500:]}"
    if "put-secret-value" in example.command:
        # The example stored the key in the stack's own fal key secret, in the format it documents; the stack's
        # emulator gets its own key back, so that the examples after this one still reach fal.
        secrets = world.stack.client("secretsmanager")
        stored = secrets.get_secret_value(SecretId=world.env["FAL_KEY_SECRET"])["SecretString"]
        assert re.fullmatch(r"[A-Z_]+:[A-Z_]+", stored), stored
        secrets.put_secret_value(SecretId=world.env["FAL_KEY_SECRET"], SecretString=world.stack.fal_key)


def test_there_are_examples_to_run_on_every_page_that_has_them() -> None:
    runnable = [e for e in EXAMPLES if not e.deployed_only]
    assert len(runnable) >= 15, [str(e) for e in runnable]
    assert {e.page for e in runnable} >= {"README.md", "docs/operating.md", "docs/tags-and-recipes.md"}


def test_the_deployed_only_examples_are_few_and_listed() -> None:
    skipped = [e for e in EXAMPLES if e.deployed_only]
    unlisted = [str(e) for e in skipped if not any(kind in " ".join(e.command.split()) for kind in DEPLOYED_ONLY)]
    assert unlisted == [], f"marked deployed only, but not a kind DEPLOYED_ONLY lists: {unlisted}"
    assert len(skipped) <= MAX_DEPLOYED_ONLY, [str(e) for e in skipped]


def test_every_deploy_and_delete_is_marked_deployed_only() -> None:
    unmarked = [str(e) for e in EXAMPLES if SAM_DEPLOYS.search(e.command) and not e.deployed_only]
    assert unmarked == []
