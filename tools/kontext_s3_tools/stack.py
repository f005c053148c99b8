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
    lines += [
        f"{name}={shlex.quote(value)}" for name, value in {**stack.cli_environment(), "KONTEXT_S3_STACK_PID": str(os.getpid())}.items()
    ]
    ENV_FILE.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"endpoints written to {ENV_FILE}; in another shell, from this folder:")
    print('  kontext-s3 upload tools/kontext_s3_tools/assets/kitchen.jpg --prompt "Put a donut next to the flour." --wait')
    print(f"(elsewhere: kontext-s3 --env-file {ENV_FILE.resolve()} ..., or: set -a; . {ENV_FILE.resolve()}; set +a)")
    try:
        wait_until_stopped()
    finally:
        stack.stop()
        ENV_FILE.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
