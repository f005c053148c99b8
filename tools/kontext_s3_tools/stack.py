"""``python -m kontext_s3_tools.stack``: run the local stack until Ctrl-C, for the CLI to talk to."""

from __future__ import annotations

import argparse
import shlex

from kontext_s3_tools.local_stack import LocalStack
from kontext_s3_tools.signals import wait_until_stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kontext_s3_tools.stack", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="log every emulator request")
    args = parser.parse_args(argv)
    stack = LocalStack(verbose=args.verbose).start()
    print("local kontext-s3 stack is up:")
    print(f"  AWS (moto server)  {stack.moto.url}")
    print(f"  fal emulator       {stack.emulator.base_url}")
    print(f"  webhook (Fn URL)   {stack.webhook.url}")
    print("in another shell:")
    for name, value in stack.cli_environment().items():
        print(f"  export {name}={shlex.quote(value)}")
    print('  kontext-s3 upload tools/kontext_s3_tools/assets/kitchen.jpg --prompt "Put a donut next to the flour." --wait')
    wait_until_stopped()
    stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
