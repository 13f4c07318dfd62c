"""docs/architecture.md's table of packages names every module, and only those."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def documented_modules() -> set[str]:
    """The modules the package table names, as paths without `.py`."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    found = set()
    for package, cell in re.findall(r"^\| `([a-z0-9_/]+/)` \| (.+?) \|", text, re.M):
        # `wire/` (ipv4, tcp, ...) names a subpackage and its modules.
        for sub, inner in re.findall(r"`([a-z0-9_]+)/` \(([^)]*)\)", cell):
            found.update(f"{package}{sub}/{name.strip()}" for name in inner.split(","))
        cell = re.sub(r"`[a-z0-9_]+/` \([^)]*\)", "", cell)
        found.update(f"{package}{name}" for name in re.findall(r"`([a-z0-9_]+)`", cell))
    return found


def actual_modules() -> set[str]:
    found = set()
    packages = ("stack", "outbounds", "tun2sx/dataplane", "tun2sx/naming", "tun2sx/control")
    for package in (*packages, "tun2sx/lab"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name != "__init__.py":
                found.add(str(path.relative_to(ROOT).with_suffix("")))
    return found


def test_the_package_table_names_every_module() -> None:
    documented = documented_modules()
    assert documented, "the table was not found"
    assert sorted(actual_modules() - documented) == []
    assert sorted(documented - actual_modules()) == []
