"""The emulator, driven by a client nobody here wrote: fal's own ``fal-client`` package, unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kontext_s3_tools.emulator import FalEmulator
from kontext_s3_tools.emulator.tls import write_self_signed
from tests.helpers import jpeg_bytes

pytestmark = pytest.mark.e2e
DRIVER = Path(__file__).resolve().parents[1] / "fal_client_driver.py"


@pytest.fixture
def tls_emulator(tmp_path: Path) -> Iterator[tuple[FalEmulator, Path]]:
    cert, key = write_self_signed(tmp_path / "tls")
    # Half a second in the queue: the client sees IN_QUEUE, and a cancel can catch a queued request.
    emulator = FalEmulator(fal_key="client-key:client-secret", tls=(cert, key), webhook_attempts=1, faults={"queue_ms": 500}).start()
    yield emulator, cert
    emulator.stop()


def test_fal_client_submits_polls_fetches_and_cancels_unchanged(tls_emulator: tuple[FalEmulator, Path]) -> None:
    emulator, cert = tls_emulator
    host = emulator.base_url.removeprefix("https://")
    image_url = emulator.host_file("inputs/flour.jpg", jpeg_bytes(320, 200), "image/jpeg")
    env = {
        **os.environ,
        "FAL_QUEUE_RUN_HOST": host,
        "FAL_RUN_HOST": host,
        "FAL_KEY": "client-key:client-secret",
        "SSL_CERT_FILE": str(cert),
    }
    run = subprocess.run(
        [sys.executable, str(DRIVER), image_url, "https://example.invalid/hook"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout)
    assert seen["status_url"] == f"https://{host}/fal-ai/flux-pro/requests/{seen['request_id']}/status"
    assert seen["statuses"][0] == "Queued" and seen["statuses"][-1] == "Completed"
    assert seen["status_by_id"] == "Completed"
    assert seen["same_result"] is True
    result = seen["result"]
    assert result["seed"] == 11
    assert [image["content_type"] for image in result["images"]] == ["image/png", "image/png"]
    assert result["has_nsfw_concepts"] == [False, False]
    # fal's docs do not say what status a cancelled request reports; the emulator says COMPLETED
    # (with an error), and fal-client reads that without complaint.
    assert seen["cancelled_status"] == "Completed"
    assert sum(1 for r in emulator.requests.values() if r.cancelled) == 1
    assert seen["refused"]["status"] == 422
    [submit] = [s for s in emulator.submits() if s["body"].get("num_images") == 2 and s["webhook_url"]]
    assert submit["webhook_url"] == "https://example.invalid/hook"


def reference_page() -> Path:
    """The model's API page, in the contracts folder ``shared/reference`` beside the checkout."""
    for folder in Path(__file__).resolve().parents:
        page = folder / "shared" / "reference" / "fal-kontext-max-api.txt"
        if page.is_file():
            return page
    raise AssertionError("shared/reference/fal-kontext-max-api.txt is not beside this checkout: the contracts are needed")


def quick_start() -> str:
    """The model page's Quick Start, exactly as the page gives it."""
    page = reference_page().read_text(encoding="utf-8")
    code = page.split("\nQuick Start\n", 1)[1].split("\nExamples\n", 1)[0]
    assert "fal_client.subscribe(" in code and "with_logs=True" in code
    return code.strip() + "\n"


def test_the_model_pages_quick_start_runs_verbatim_against_the_emulator(tls_emulator: tuple[FalEmulator, Path], tmp_path: Path) -> None:
    emulator, cert = tls_emulator
    host = emulator.base_url.removeprefix("https://")
    # The page's image lives on fal's media store: the emulator holds it there as fal would.
    emulator.host_file("files/rabbit/rmgBxhwGYb2d3pl3x9sKf_output.png", jpeg_bytes(320, 200), "image/jpeg")
    emulator.set_faults(processing_ms=1500)  # in progress long enough for the client's polls (every 0.1 s) to see it
    script = tmp_path / "quick_start.py"
    script.write_text(quick_start(), encoding="utf-8")
    env = {
        **os.environ,
        "FAL_QUEUE_RUN_HOST": host,
        "FAL_RUN_HOST": host,
        "FAL_KEY": "client-key:client-secret",
        "SSL_CERT_FILE": str(cert),
    }
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    # on_queue_update iterated update.logs while the request ran (fal-client asks for them with ?logs=true).
    assert "emulator: editing" in run.stdout
    assert "'images': [{" in run.stdout and "Put a donut next to the flour." in run.stdout
