"""``python -m kontext_s3_tools.stack``: run the local stack until Ctrl-C, for the CLI to talk to."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from kontext_s3_tools.local_stack import LocalStack
from kontext_s3_tools.signals import wait_until_stopped

ENV_FILE = Path("out") / "stack.env"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kontext_s3_tools.stack", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="log every emulator request")
    args = parser.parse_args(argv)
    stack = LocalStack(verbose=args.verbose).start()
    print("local kontext-s3 stack is up:")
    print(f"  AWS (moto server)  {stack.moto.url}")
    print(f"  fal emulator       {stack.emulator.base_url}")
    print(f"  webhook (Fn URL)   {stack.webhook.url}")
    ENV_FILE.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Written by make stack; kontext-s3 reads it from {ENV_FILE} (or --env-file). Valid while pid {os.getpid()} runs."]
    values = {**stack.cli_environment(), "KONTEXT_S3_STACK_PID": str(os.getpid())}
    # The submit function's tag wait, so `kontext-s3 status` can say how long an untagged upload waits.
    if stack.environment.get("TAG_WAIT_SECONDS"):
        values["KONTEXT_S3_TAG_WAIT_SECONDS"] = stack.environment["TAG_WAIT_SECONDS"]
    lines += [f"{name}={shlex.quote(value)}" for name, value in values.items()]
    ENV_FILE.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"endpoints written to {ENV_FILE}; in another shell, from this folder:")
    print('  kontext-s3 upload tools/kontext_s3_tools/assets/kitchen.jpg --prompt "Put a donut next to the flour." --wait')
    # Not `set -a; . out/stack.env`: exported names and endpoint would aim every later command at this stack, and
    # kontext-s3 refuses --stack beside a KONTEXT_S3_BUCKET that is not the stack's own.
    print(f"(elsewhere: kontext-s3 --env-file {ENV_FILE.resolve()} ..., or: export KONTEXT_S3_ENV_FILE={ENV_FILE.resolve()})")
    try:
        wait_until_stopped()
    finally:
        stack.stop()
        ENV_FILE.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
