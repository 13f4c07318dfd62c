"""Test modules stand alone: none imports another test module or a conftest.

What several tests share (fixtures' helpers, fakes, the capability check)
lives in tests/support/, so deleting or moving one test file breaks no
other, and pytest never collects a test twice through an import.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_test_module(name: str) -> bool:
    last = name.rpartition(".")[2]
    return last.startswith("test_") or last == "conftest"


def test_no_module_under_tests_imports_a_test_module() -> None:
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            bad = [n for n in names if n.startswith("tests.") and _is_test_module(n)]
            if bad:
                found.append(f"{path.relative_to(TESTS.parent)}:{node.lineno}: {bad[0]}")
    assert found == []
