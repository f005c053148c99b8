"""The docs hold together: the README stays short, every relative link lands, and operating.md's parameters are the template's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from samtranslator.yaml_helper import yaml_parse

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
OPERATING = ROOT / "docs" / "operating.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

#: A row of the parameters table: | `Name` | `default` | what it is for |
PARAMETER_ROW = re.compile(r"^\| `(?P<name>[A-Za-z0-9]+)` \| `(?P<default>[^`]*)` \| (?P<purpose>.*\S) \|$")
#: [text](target) and ![alt](target); a target has no spaces or parentheses here.
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^\s*```")


def template_defaults() -> dict[str, str]:
    """Every parameter of template.yaml, in its order, with its default as the table writes it."""
    template = yaml_parse((ROOT / "template.yaml").read_text(encoding="utf-8"))
    defaults = {}
    for name, spec in template["Parameters"].items():
        value = spec.get("Default", "")
        defaults[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return defaults


def section(text: str, heading: str) -> list[str]:
    """The lines under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    lines = text.splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if re.match(rf"^#{{1,{len(level)}}} ", lines[i])), len(lines))
    return lines[start:end]


def parameters_table() -> list[tuple[str, str, str]]:
    """(name, default, purpose) of each row of operating.md's parameters table, in its order; `""` is empty."""
    rows = []
    for line in section(OPERATING.read_text(encoding="utf-8"), "## Parameters"):
        if not line.startswith("| ") or line.startswith(("| parameter |", "| ---")):
            continue
        match = PARAMETER_ROW.match(line)
        assert match, f"a row of the parameters table is not | `Name` | `default` | purpose |: {line}"
        default = "" if match["default"] == '""' else match["default"]
        rows.append((match["name"], default, match["purpose"]))
    return rows


def without_code(text: str) -> str:
    """The page with its fenced code blocks and inline code blanked (their brackets are not links)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            kept.append("")
            continue
        kept.append("" if fenced else re.sub(r"`[^`]*`", "``", line))
    return "\n".join(kept)


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lowercased, punctuation dropped, spaces to hyphens."""
    found: set[str] = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        if fenced or not re.match(r"^#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


# -- the README ------------------------------------------------------------------------------------------------------


def test_the_readme_is_at_most_200_lines() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_readme_links_each_docs_page() -> None:
    readme = README.read_text(encoding="utf-8")
    for page in PAGES[1:]:
        assert f"(docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


# -- operating.md's parameters table -----------------------------------------------------------------------------------


def test_every_template_parameter_is_in_the_parameters_table_with_its_default() -> None:
    documented = {name: default for name, default, _ in parameters_table()}
    missing = [name for name in template_defaults() if name not in documented]
    assert missing == [], f"template parameters missing from docs/operating.md's parameters table: {missing}"
    wrong = {name: (documented[name], default) for name, default in template_defaults().items() if documented[name] != default}
    assert wrong == {}, "documented default != template default: " + ", ".join(f"{n}: {d!r} != {t!r}" for n, (d, t) in wrong.items())


def test_the_parameters_table_names_no_parameter_the_template_lacks() -> None:
    rows = [name for name, _, _ in parameters_table()]
    unknown = [name for name in rows if name not in template_defaults()]
    assert unknown == [], f"docs/operating.md documents parameters template.yaml does not have: {unknown}"
    assert len(rows) == len(set(rows)), f"a parameter is documented twice: {sorted(n for n in rows if rows.count(n) > 1)}"


def test_the_parameters_table_is_in_the_order_the_guided_deploy_asks() -> None:
    assert [name for name, _, _ in parameters_table()] == list(template_defaults())


def test_every_parameter_says_what_it_is_for() -> None:
    assert all(len(purpose) >= 10 for _, _, purpose in parameters_table())


# -- links ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_that_exists(page: Path) -> None:
    broken = []
    for match in LINK.finditer(without_code(page.read_text(encoding="utf-8"))):
        target = match["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading gives #{anchor}")
    assert broken == [], f"{page.relative_to(ROOT)}: " + "; ".join(broken)
