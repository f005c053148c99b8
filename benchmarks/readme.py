"""Putting measured tables into a docs page, between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``, only when asked."""

from __future__ import annotations

from pathlib import Path


def replace_section(readme: Path, name: str, text: str) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = readme.read_text(encoding="utf-8")
    if start not in content or end not in content:
        raise ValueError(f"{readme} has no {start} ... {end} section to replace")
    before, rest = content.split(start, 1)
    _, after = rest.split(end, 1)
    readme.write_text(f"{before}{start}\n{text.strip()}\n{end}{after}", encoding="utf-8")
