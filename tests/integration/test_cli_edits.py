"""What happens to an upload's edit, said before it is paid for: a prompt, a recipe, tags later, or a refusal.

And the tags for either S3 call (``put-object --tagging`` takes a query string,
``put-object-tagging --tagging`` a TagSet), and ``status`` while an upload waits
for its tags. The CLI runs as the operator runs it, against the moto server.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from kontext_s3.model_schema import MAX_QUOTE_CHARS
from kontext_s3.tag_codec import decode_tags, parse_tagging_header
from kontext_s3_tools import cli
from kontext_s3_tools.local_stack import aws_environment
from tests.helpers import Aws, jpeg_bytes
from tests.integration.test_cli import image
from tests.integration.test_cli_target import kontext_s3, one_line

__all__ = ["image"]


@pytest.fixture
def env(aws: Aws, tmp_path: Path) -> dict[str, str]:
    """The aws fixture's resources, named by the environment (no TagWaitSeconds known)."""
    return {
        **{name: value for name, value in os.environ.items() if not name.startswith("KONTEXT_S3_")},
        **aws_environment(aws.endpoint),
        "KONTEXT_S3_BUCKET": aws.resources.bucket,
        "KONTEXT_S3_TABLE": aws.resources.table,
    }


def keys(aws: Aws) -> list[str]:
    return aws.keys(aws.resources.input_prefix)


# -- an upload with no prompt --------------------------------------------------------------------


def test_no_prompt_and_no_recipe_is_refused_before_anything_is_uploaded(aws: Aws, env: dict[str, str], image: Path, tmp_path: Path) -> None:
    code, _, err = kontext_s3(env, tmp_path, "upload", str(image), "--key", "inputs/x/photo.jpg")
    assert code == cli.EXIT_USAGE
    assert one_line(err) == (
        "error: no prompt and no recipe for inputs/x/: give --prompt, put a recipe "
        "(kontext-s3 recipe put inputs/x/ --prompt ...), or --tags-later if you will tag it"
    )
    assert keys(aws) == []


def test_a_recipe_without_a_prompt_does_not_give_the_edit(aws: Aws, env: dict[str, str], image: Path, tmp_path: Path) -> None:
    aws.s3.put_object(Bucket=aws.resources.bucket, Key="inputs/plain/_kontext.json", Body=b'{"output_format": "png"}')
    code, _, err = kontext_s3(env, tmp_path, "upload", str(image), "--key", "inputs/plain/a/photo.jpg", "--seed", "3")
    line = one_line(err)
    assert code == cli.EXIT_USAGE
    assert line.startswith(f"error: no prompt and the recipe s3://{aws.resources.bucket}/inputs/plain/_kontext.json gives no prompt")
    assert keys(aws) == ["inputs/plain/_kontext.json"]


def test_an_upload_under_a_recipe_says_which_recipe_gives_its_edit(aws: Aws, env: dict[str, str], image: Path, tmp_path: Path) -> None:
    code, _, err = kontext_s3(env, tmp_path, "recipe", "put", "shop/", "--prompt", "Remove the background")
    assert code == 0, err
    version = aws.s3.head_object(Bucket=aws.resources.bucket, Key="inputs/shop/_kontext.json")["VersionId"]
    code, out, err = kontext_s3(env, tmp_path, "upload", str(image), "--key", "inputs/shop/shoes/a.jpg", "--seed", "4")
    assert code == 0, err
    assert (
        f"no --prompt: the recipe s3://{aws.resources.bucket}/inputs/shop/_kontext.json (version {version}) gives the edit; "
        "the fields given here override it field by field"
    ) in out.splitlines()
    # There, tags given later would be a second edit, a second paid job.
    code, _, err = kontext_s3(env, tmp_path, "upload", str(image), "--key", "inputs/shop/b.jpg", "--tags-later")
    assert code == cli.EXIT_USAGE and "would run a second (paid) job" in one_line(err)
    assert "inputs/shop/b.jpg" not in keys(aws)


def test_tags_later_uploads_without_tags_and_says_how_long_the_stack_waits(
    aws: Aws, env: dict[str, str], image: Path, tmp_path: Path
) -> None:
    env = {**env, "KONTEXT_S3_TAG_WAIT_SECONDS": "120"}
    code, out, err = kontext_s3(env, tmp_path, "upload", str(image), "--key", "inputs/late/a.jpg", "--tags-later")
    assert code == 0, err
    assert (
        "no prompt yet: the stack waits up to 120 s for its tags (TagWaitSeconds); then, with no prompt, it fails with an "
        "invalid_tags error record"
    ) in out.splitlines()
    assert f"tag it: aws s3api put-object-tagging --bucket {aws.resources.bucket} --key inputs/late/a.jpg" in out
    assert aws.s3.get_object_tagging(Bucket=aws.resources.bucket, Key="inputs/late/a.jpg")["TagSet"] == []
    # Unknown here: said as the parameter's name.
    code, out, err = kontext_s3({**env, "KONTEXT_S3_TAG_WAIT_SECONDS": ""}, tmp_path, "upload", str(image), "--tags-later")
    assert code == 0, err
    assert "the stack waits for its tags (TagWaitSeconds)" in out


def test_tags_later_is_refused_where_it_cannot_work(aws: Aws, env: dict[str, str], image: Path, tmp_path: Path) -> None:
    code, _, err = kontext_s3({**env, "KONTEXT_S3_TAG_WAIT_SECONDS": "0"}, tmp_path, "upload", str(image), "--tags-later")
    assert code == cli.EXIT_USAGE and "does not wait for tags (TagWaitSeconds=0)" in one_line(err)
    code, _, err = kontext_s3(env, tmp_path, "upload", str(image), "--tags-later", "--prompt", "x")
    assert code == cli.EXIT_USAGE and one_line(err).startswith("error: --tags-later is for an upload without --prompt")
    assert keys(aws) == []


def test_free_tags_are_not_an_option_nor_an_abbreviation_of_tags_later(aws: Aws, env: dict[str, str], image: Path, tmp_path: Path) -> None:
    # The CLI has no free-tag option; `--tag` must not be taken as the start of --tags-later (an upload with no edit).
    for argv in (["--tag", "prompt=x"], ["--tags"], ["--tag"]):
        code, _, err = kontext_s3(env, tmp_path, "upload", str(image), *argv)
        assert code == cli.EXIT_USAGE and f"unrecognized arguments: {argv[0]}" in one_line(err)
    assert keys(aws) == []


def test_long_values_in_the_no_edit_refusal_are_shortened(aws: Aws, env: dict[str, str], image: Path, tmp_path: Path) -> None:
    code, _, err = kontext_s3(env, tmp_path, "upload", str(image), "--key", "inputs/" + "k" * 900 + "/photo.jpg")
    line = one_line(err)
    assert code == cli.EXIT_USAGE and line.startswith("error: no prompt and no recipe for inputs/kkk")
    assert "more characters" in line and len(line) < 2 * MAX_QUOTE_CHARS + 200


# -- status while the upload waits for its tags --------------------------------------------------


def untagged(aws: Aws, key: str) -> None:
    aws.s3.put_object(Bucket=aws.resources.bucket, Key=key, Body=jpeg_bytes())


def test_status_of_an_untagged_upload_says_it_waits_for_tags_and_what_follows(aws: Aws, env: dict[str, str], tmp_path: Path) -> None:
    untagged(aws, "inputs/late.jpg")
    code, out, err = kontext_s3({**env, "KONTEXT_S3_TAG_WAIT_SECONDS": "300"}, tmp_path, "status", "inputs/late.jpg")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[2].startswith("state    no prompt tag or recipe yet: waiting up to 300 s for tags (TagWaitSeconds), until 20")
    assert "without one the upload fails with an invalid_tags error record" in lines[3]
    assert lines[4].startswith("tag it   aws s3api put-object-tagging") and "--for put-object-tagging" in lines[4]
    # Unknown here: said by the parameter's name.
    code, out, err = kontext_s3(env, tmp_path, "status", "inputs/late.jpg")
    assert code == 0, err
    assert "waiting for its tags (TagWaitSeconds)" in out


def test_status_reads_the_wait_from_the_stacks_parameter_or_the_env_file(aws: Aws, env: dict[str, str], tmp_path: Path) -> None:
    untagged(aws, "inputs/late.jpg")
    name = f"kontext-{uuid.uuid4().hex[:10]}"
    template = {
        "Parameters": {"TagWaitSeconds": {"Type": "Number", "Default": "300"}},
        "Resources": {"Placeholder": {"Type": "AWS::SQS::Queue"}},
        "Outputs": {"InputBucketName": {"Value": aws.resources.bucket}, "JobsTableName": {"Value": aws.resources.table}},
    }
    aws.client("cloudformation").create_stack(
        StackName=name, TemplateBody=json.dumps(template), Parameters=[{"ParameterKey": "TagWaitSeconds", "ParameterValue": "42"}]
    )
    outside = {k: v for k, v in env.items() if k not in ("KONTEXT_S3_BUCKET", "KONTEXT_S3_TABLE")}
    code, out, err = kontext_s3(outside, tmp_path, "--stack", name, "status", "inputs/late.jpg")
    assert code == 0, err
    assert "waiting up to 42 s for tags (TagWaitSeconds)" in out
    (tmp_path / "out").mkdir()
    values = {**aws_environment(aws.endpoint), "KONTEXT_S3_BUCKET": aws.resources.bucket, "KONTEXT_S3_TABLE": aws.resources.table}
    values.update({"KONTEXT_S3_TAG_WAIT_SECONDS": "77", "KONTEXT_S3_STACK_PID": str(os.getpid())})
    (tmp_path / "out" / "stack.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    code, out, err = kontext_s3(outside, tmp_path, "status", "inputs/late.jpg")
    assert code == 0, err
    assert "waiting up to 77 s for tags (TagWaitSeconds)" in out


def test_status_of_an_upload_that_has_its_prompt_is_still_no_job(aws: Aws, env: dict[str, str], tmp_path: Path) -> None:
    aws.s3.put_object(Bucket=aws.resources.bucket, Key="inputs/tagged.jpg", Body=jpeg_bytes(), Tagging="prompt=x")
    code, _, err = kontext_s3(env, tmp_path, "status", "inputs/tagged.jpg")
    assert code == cli.EXIT_FAILED and one_line(err).startswith("error: no job ")


# -- tags for both S3 calls ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit",
    [["--prompt", "Now in red"], ["--prompt", "Replace 'joy' by 'fal', keep the font?", "--seed", "7", "--num-images", "2"]],
    ids=["plain", "packed"],
)
def test_tags_for_put_object_and_for_put_object_tagging_hold_the_same_edit(
    aws: Aws, env: dict[str, str], tmp_path: Path, edit: list[str]
) -> None:
    code, query, err = kontext_s3(env, tmp_path, "tags", *edit)
    assert code == 0, err
    code, tag_set, err = kontext_s3(env, tmp_path, "tags", "--for", "put-object-tagging", *edit)
    assert code == 0, err
    assert len(query.splitlines()) == len(tag_set.splitlines()) == 1
    from_query = decode_tags(parse_tagging_header(query.strip()))
    document = json.loads(tag_set)
    assert set(document) == {"TagSet"}
    from_json = decode_tags({tag["Key"]: tag["Value"] for tag in document["TagSet"]})
    assert from_query == from_json and from_json["prompt"] == edit[1]
    # As S3 takes them: the query string on PutObject, the TagSet on PutObjectTagging.
    bucket = aws.resources.bucket
    aws.s3.put_object(Bucket=bucket, Key="inputs/q.jpg", Body=jpeg_bytes(), Tagging=query.strip())
    aws.s3.put_object(Bucket=bucket, Key="inputs/t.jpg", Body=jpeg_bytes())
    aws.s3.put_object_tagging(Bucket=bucket, Key="inputs/t.jpg", Tagging=document)

    def stored(key: str) -> dict[str, str]:
        return decode_tags({t["Key"]: t["Value"] for t in aws.s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]})

    assert stored("inputs/q.jpg") == stored("inputs/t.jpg") == from_json


def test_tags_default_form_is_still_the_query_string(env: dict[str, str], tmp_path: Path) -> None:
    code, out, err = kontext_s3(env, tmp_path, "tags", "--prompt", "Make it snow", "--seed", "7")
    assert code == 0, err
    assert out == "prompt=Make%20it%20snow&seed=7\n"
