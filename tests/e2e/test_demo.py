"""The README's first command, as a user runs it (in its own process, with its own local stack)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kontext_s3_tools.demo", *args], capture_output=True, text=True, timeout=180, check=False)


def test_the_demo_leaves_edited_images_and_the_manifest_in_out(tmp_path: Path) -> None:
    result = run_demo("--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    [job_dir] = [p for p in (tmp_path / "out").iterdir() if p.name != "gallery"]
    gallery = tmp_path / "out" / "gallery" / "index.html"
    assert gallery.is_file() and str(gallery.resolve()) in result.stdout
    assert "Put a donut next to the flour" in gallery.read_text()
    assert sorted(p.name for p in job_dir.iterdir()) == ["image-0.png", "image-1.png", "manifest.json"]
    assert (job_dir / "image-0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((job_dir / "manifest.json").read_text())
    assert manifest["input"]["prompt"] == "Put a donut next to the flour, and write 'fal' on the bag? Yes: 100% glazed!"
    assert "outputs/demo/kitchen.jpg/" in result.stdout and "manifest" in result.stdout


def test_the_demo_fails_loudly(tmp_path: Path) -> None:
    result = run_demo("--out", str(tmp_path / "out"), "--timeout", "0")
    assert result.returncode == 1
    assert "demo failed: no result after 0 s" in result.stderr
    assert "Traceback" not in result.stderr
