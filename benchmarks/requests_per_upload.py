"""AWS requests per edited upload, by function and service, on the local stack with the template's defaults.

Every AWS call the functions make goes through the stack's gateway, which knows each function's credentials; the
CLI's own calls (the uploads, the polling) are the administrator's and are not counted. The uploads run to their
end (webhook included), then the recovery function runs once, as its schedule would during such a run.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kontext_s3_tools import cli
from kontext_s3_tools.aws_gateway import judged_targets
from kontext_s3_tools.load import _image
from kontext_s3_tools.local_stack import TEMPLATE, LocalStack

#: Lambda's event source mapping reads and deletes the queue's messages with the function's role; not the function's.
#: Nor are fal's fetches of the presigned input URL (one GetObject per request sent, signed by the submit function).
MAPPING_CALLS = {("sqs", "ReceiveMessage"), ("sqs", "DeleteMessage"), ("sqs", "DeleteMessageBatch"), ("sqs", "ChangeMessageVisibility")}


def template_default(parameter: str) -> str:
    from samtranslator.yaml_helper import yaml_parse

    return str(yaml_parse(TEMPLATE.read_text(encoding="utf-8"))["Parameters"][parameter]["Default"])


def measure(uploads: int = 20, *, at_once: bool = False) -> dict[str, Any]:
    """``at_once``: the uploads made together, as ``aws s3 sync`` makes them (they reach the submit function in
    batches); else one after another, as people upload."""
    # The template's own default budget (the local stack has none): its bookkeeping is part of what an upload costs.
    with LocalStack(recovery_interval_seconds=None, parameters={"DailyImageBudget": template_default("DailyImageBudget")}) as stack:
        target = stack.target()
        stack.gateway.record = True

        def upload(i: int) -> cli.Uploaded:
            return cli.upload_bytes(target, _image(i), f"{i}.jpg", {"prompt": "Add a hat"}, key=f"{target.input_prefix}requests/{i}.jpg")

        if at_once:
            with ThreadPoolExecutor(max_workers=10) as pool:
                sent = list(pool.map(upload, range(uploads)))
        else:
            sent = [upload(i) for i in range(uploads)]
        jobs = target.jobs()
        assert jobs is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            ended = [job for u in sent if (job := jobs.get(u.job_id)) is not None and job.state.ended]
            if len(ended) == uploads:
                break
            time.sleep(0.5)
        time.sleep(1.0)  # the last webhook's final writes
        stack.run_recovery()
        stack.gateway.record = False
        calls = stack.gateway.recorded()
        functions = {key: identity.function for key, identity in stack.gateway.identities.items()}
    counted = Counter(
        (functions[c.access_key], c.service, judged_targets(c)[0][0])
        for c in calls
        if c.access_key in functions and (c.service, c.action) not in MAPPING_CALLS and not c.presigned
    )
    by_function: Counter[str] = Counter()
    by_service: Counter[str] = Counter()
    for (function, service, _), n in counted.items():
        by_function[function] += n
        by_service[f"{function} {service}"] += n
    return {
        "uploads": uploads,
        "at_once": at_once,
        "ended": len(ended),
        "per_upload": round(sum(counted.values()) / uploads, 1),
        "by_function": {k: round(v / uploads, 2) for k, v in sorted(by_function.items())},
        "by_function_and_service": {k: round(v / uploads, 2) for k, v in sorted(by_service.items())},
        "by_call": {f"{f} {a}": round(n / uploads, 2) for (f, _, a), n in sorted(counted.items())},
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"AWS requests per edited upload ({result['uploads']} uploads {'at once' if result['at_once'] else 'one after another'}, "
        f"template defaults, recovery run once): **{result['per_upload']}**",
        "",
        "| function and IAM action | requests per upload |",
        "| --- | ---: |",
    ]
    lines += [f"| {name} | {n} |" for name, n in result["by_call"].items()]
    return "\n".join(lines) + "\n"
