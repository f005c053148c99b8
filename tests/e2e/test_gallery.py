"""The before/after gallery, opened from disk in a real headless browser (Playwright driving Chromium).

The browser is Debian's ``chromium`` (``/usr/bin/chromium``, installed by
``.ci/run``), or the one named by ``KONTEXT_CHROMIUM``; Playwright's own
download cannot reach its servers here. No browser is a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import Dialog, sync_playwright

from kontext_s3_tools import cli
from kontext_s3_tools.gallery import write_gallery
from kontext_s3_tools.local_stack import LocalStack
from tests.helpers import jpeg_bytes

pytestmark = pytest.mark.e2e

HOSTILE = "</td><script>alert(1)</script><img src=x onerror=alert(2)>"
SCREENSHOT = Path(__file__).resolve().parents[2] / "out" / "gallery-screenshot.png"


def chromium() -> str:
    path = os.environ.get("KONTEXT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "no Chromium: apt-get install chromium (or set KONTEXT_CHROMIUM); .ci/run installs it"
    return path


def test_the_gallery_shows_every_job_with_its_images_and_runs_nothing_from_the_data(stack: LocalStack, tmp_path: Path) -> None:
    target = stack.target()
    prefix = "e2e/gallery/"
    good = [
        cli.upload_bytes(target, jpeg_bytes(120, 90, (200, 60 + 60 * i, 40)), f"g{i}.jpg", {"prompt": p}, key=f"inputs/{prefix}{i}.jpg")
        for i, p in enumerate(["Make the sky purple", HOSTILE])
    ]
    for uploaded in good:
        assert cli.wait_for_result(target, uploaded, timeout=90, progress=lambda _: None).succeeded
    stack.emulator.set_faults(error_result=1)
    failed = cli.upload_bytes(target, jpeg_bytes(), "bad.jpg", {"prompt": "this one fails"}, key=f"inputs/{prefix}bad.jpg")
    assert not cli.wait_for_result(target, failed, timeout=90, progress=lambda _: None).succeeded

    index = write_gallery(target, tmp_path / "gallery", prefix=prefix)
    html = index.read_text()
    assert "<script>" not in html  # the hostile prompt is text, not markup

    dialogs: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium(),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"],
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})

            def record(dialog: Dialog) -> None:
                dialogs.append(dialog.message)
                dialog.dismiss()

            page.on("dialog", record)
            page.goto(index.as_uri())
            page.wait_for_load_state("load")
            widths = page.eval_on_selector_all("img", "images => images.map(i => i.complete ? i.naturalWidth : 0)")
            assert len(widths) == 3 + 2 and all(w > 0 for w in widths), widths  # 3 inputs, 2 outputs (the failed job has none)
            failed_card = page.locator(f"#job-{failed.job_id}")
            assert "failed: fal_error" in failed_card.inner_text() and "emulator fault" in failed_card.inner_text()
            assert HOSTILE in page.locator(f"#job-{good[1].job_id} .prompt").inner_text()
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
    assert dialogs == []  # no script from the data ran
