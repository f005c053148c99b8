"""Sizes a reader can hold: no module over 400 lines and no class over 250 in the layer, so a change stays reviewable."""

from __future__ import annotations

import ast
from pathlib import Path

LAYER = Path(__file__).resolve().parents[2] / "layers" / "shared" / "kontext_s3"
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250


def test_no_module_or_class_of_the_layer_outgrows_what_a_reader_holds() -> None:
    too_big = []
    for path in sorted(LAYER.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(LAYER)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_big.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_big.append(f"{name}: class {node.name}, {node.end_lineno - node.lineno + 1} lines")
    assert too_big == []
