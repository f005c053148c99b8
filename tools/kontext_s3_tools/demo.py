"""``make demo``: the whole pipeline on this machine, from an upload to edited images in ``out/``.

Starts moto (AWS), the fal emulator and both handlers; uploads the sample image
with a prompt full of punctuation (so its tags are packed); follows the job;
prints the output keys and the manifest; saves the images under ``out/``.
The "edit" is the emulator's stand-in, not FLUX.1 Kontext: see the README.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kontext_s3_tools.cli import CliError, download, upload_image, wait_for_result
from kontext_s3_tools.gallery import write_gallery
from kontext_s3_tools.local_stack import LocalStack

SAMPLE = Path(__file__).resolve().parent / "assets" / "kitchen.jpg"
PROMPT = "Put a donut next to the flour, and write 'fal' on the bag? Yes: 100% glazed!"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kontext_s3_tools.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    print("starting the local stack: moto server (AWS), fal emulator, submit and webhook handlers ...", flush=True)
    try:
        stack = LocalStack().start()
    except Exception as exc:
        print(f"demo failed: could not start the local stack: {exc}", file=sys.stderr)
        return 1
    try:
        target = stack.target()
        print(f"  bucket s3://{target.bucket}, jobs table {target.table}, fal emulator {stack.emulator.base_url}")
        fields = {"prompt": PROMPT, "num_images": 2, "seed": 42, "aspect_ratio": "4:3", "output_format": "png"}
        uploaded = upload_image(target, SAMPLE, fields, key="inputs/demo/kitchen.jpg")
        print(f"uploaded {SAMPLE.name} as s3://{target.bucket}/{uploaded.key} with the prompt:\n  {PROMPT}")
        print(f"job {uploaded.job_id}:", flush=True)
        # A failed delivery ends the demo at once, with its cause: it has no later delivery worth waiting for.
        result = wait_for_result(
            target, uploaded, timeout=args.timeout, progress=lambda line: print(f"  {line}", flush=True), stop_on_failure=True
        )
        if not result.succeeded:
            assert result.error is not None
            print(f"demo failed: the job failed ({result.error['code']}): {result.error['message']}", file=sys.stderr)
            return 1
        assert result.manifest is not None
        print("outputs:")
        for image in result.manifest["images"]:
            print(f"  s3://{target.bucket}/{image['key']}  {image['width']}x{image['height']}  {image['bytes']} bytes")
        print(f"manifest (s3://{target.bucket}/{uploaded.output_prefix}manifest.json):")
        print(json.dumps(result.manifest, indent=2, ensure_ascii=False))
        saved = download(target, result, args.out)
        print("saved:")
        for path in saved:
            print(f"  {path}")
        index = write_gallery(target, args.out / "gallery")
        print(f"gallery (input beside outputs; open it in a browser): {index.resolve()}")
        print(f"done in {time.monotonic() - started:.1f} s")
        print(
            "note: these images come from the local fal emulator's stand-in edit (a tint and a caption), "
            "not FLUX.1 Kontext [max]; deployed with a fal key, the same code calls the real model."
        )
        return 0
    except CliError as exc:
        # The stack stops with the demo, so nothing goes on after this line: the logs are what is left to read.
        print(f"demo failed: {str(exc).removeprefix('error: ')}; the local stack has stopped; logs: {stack.log_dir}/", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()


if __name__ == "__main__":
    raise SystemExit(main())
