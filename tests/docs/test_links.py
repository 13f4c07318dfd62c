"""The docs stand on their own: every link and path they name is in the repository.

A link to a file beside the checkout (a shared notes folder, another clone)
works on one machine and nowhere else. Markdown links `[text](target)` and
backquoted relative paths to markdown files (`../notes/design.md`) are both
followed; web addresses are left alone.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")
QUOTED_PATH = re.compile(r"`([^`\s]*/[^`\s]*\.md)(?:#[^`]*)?`")


def markdown_files() -> list[Path]:
    return sorted([ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("fuzz/*.md")])


def broken_links(text: str, path: Path) -> list[str]:
    """What in `text` (the page at `path`) points outside the repository or nowhere."""
    targets = [m.group(1) for m in LINK.finditer(text)]
    targets += [m.group(1) for m in QUOTED_PATH.finditer(text)]
    found = []
    for target in targets:
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file_part = target.split("#", 1)[0]
        # Relative to the page, or (a backquoted path) to the repository.
        inside = [
            c
            for c in ((path.parent / file_part).resolve(), (ROOT / file_part).resolve())
            if c.is_relative_to(ROOT)
        ]
        if not inside:
            found.append(f"{path.name}: {target} is outside the repository")
        elif not any(c.exists() for c in inside):
            found.append(f"{path.name}: {target} does not exist")
    return found


def test_every_link_in_the_docs_stays_inside_the_repository() -> None:
    problems = [p for path in markdown_files() for p in broken_links(path.read_text(), path)]
    assert problems == []


def test_links_outside_the_repository_or_to_nothing_are_found() -> None:
    text = "See `../shared/design.md`, [notes](../../notes/x.md), [ok](usage.md#flags)."
    assert broken_links(text, ROOT / "docs" / "architecture.md") == [
        "architecture.md: ../../notes/x.md is outside the repository",
        "architecture.md: ../shared/design.md does not exist",
    ]
