"""``python -m kontext_s3_tools.emulator``: run the fal emulator on its own."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from kontext_s3_tools.emulator.server import FalEmulator, Faults
from kontext_s3_tools.emulator.tls import write_self_signed
from kontext_s3_tools.signals import wait_until_stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kontext_s3_tools.emulator", description="A local fal queue API for FLUX.1 Kontext [max]."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--key", default="local-fal-key", help="the fal key clients must send (Authorization: Key ...)")
    parser.add_argument("--tls", action="store_true", help="serve https with a fresh self-signed certificate (its path is printed)")
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME=N",
        help="e.g. submit_429=3, lose_webhook=1, error_result=1, processing_ms=500",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        metavar="N",
        help="fal's concurrency limit: at most N requests IN_PROGRESS, the rest IN_QUEUE (default: unlimited; new fal accounts have 2)",
    )
    parser.add_argument("--webhook-attempts", type=int, default=10)
    parser.add_argument("--webhook-backoff", type=float, default=0.25, help="seconds before the first webhook retry (doubles each time)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    tls = write_self_signed(Path(tempfile.mkdtemp(prefix="fal-emulator-"))) if args.tls else None
    emulator = FalEmulator(
        host=args.host,
        port=args.port,
        fal_key=args.key,
        tls=tls,
        faults=Faults.parse(args.fault),
        webhook_attempts=args.webhook_attempts,
        webhook_backoff_seconds=args.webhook_backoff,
        verbose=args.verbose,
        concurrency=args.concurrency,
    ).start()
    print(f"fal emulator on {emulator.base_url}  (JWKS {emulator.jwks_url})", flush=True)
    if tls:
        print(f"certificate: {tls[0]}  (export SSL_CERT_FILE={tls[0]})", flush=True)
    wait_until_stopped()
    emulator.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
