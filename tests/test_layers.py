"""The package rules of docs/architecture.md ("Layers"), read from the source.

Every import statement counts, at module level or inside a function (the
lazy imports) or under `TYPE_CHECKING`: a layer that imports another only
for annotations still cannot be read, tested or reused without it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FLOWS = ("tcpflow", "udpflow", "dnsserve", "splice")

# (the importing modules, the modules they may not import, why)
RULES: tuple[tuple[str, str, str], ...] = (
    ("stack", "tun2sx", "the stack is sans-I/O and knows nothing of the program"),
    ("stack", "outbounds", "the stack is sans-I/O and knows nothing of the program"),
    ("outbounds", "tun2sx", "outbounds give streams to whoever asks"),
    ("tun2sx.naming", "tun2sx.dataplane", "naming depends on neither runtime nor control"),
    ("tun2sx.naming", "tun2sx.control", "naming depends on neither runtime nor control"),
    ("tun2sx.dataplane", "tun2sx.control", "control builds the data plane, not the reverse"),
    *(
        (
            f"tun2sx.dataplane.{flow}",
            "tun2sx.dataplane.engine",
            "flows see the engine as a FlowContext",
        )
        for flow in FLOWS
    ),
)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    """The dotted name of `path`, and whether it is a package's __init__."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def imported_modules(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """Every module an import statement in `source` names, with its line.

    `from a import b` names both `a` and `a.b` (b may be a submodule);
    relative imports are resolved against `module`.
    """
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def violations(root: Path) -> list[str]:
    """Each import in `root`'s packages that breaks a rule, as `file:line: what`."""
    found: dict[tuple[Path, int, str], str] = {}
    for top in ("stack", "outbounds", "tun2sx"):
        for path in sorted((root / top).rglob("*.py")):
            module, is_package = _module_name(path, root)
            for line, target in imported_modules(path.read_text(), module, is_package):
                for importer, forbidden, why in RULES:
                    if _within(module, importer) and _within(target, forbidden):
                        where = path.relative_to(root)
                        # One report per statement and rule, naming the
                        # longest module (`from a import b`: `a.b`).
                        found[where, line, forbidden] = (
                            f"{where}:{line}: {module} imports {target} ({why})"
                        )
    return list(found.values())


def test_the_source_keeps_the_package_rules() -> None:
    assert violations(ROOT) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("stack/tcp/conn.py", "import tun2sx.dataplane.tun\n", "stack.tcp.conn imports tun2sx"),
        ("stack/seq.py", "def f():\n    from outbounds import base\n", "imports outbounds"),
        ("outbounds/socks5.py", "from tun2sx.naming import router\n", "imports tun2sx.naming"),
        ("tun2sx/naming/fakeip.py", "from ..dataplane import context\n", "tun2sx.dataplane"),
        (
            "tun2sx/naming/router.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from tun2sx.control.app import Settings\n",
            "imports tun2sx.control.app",
        ),
        ("tun2sx/dataplane/engine.py", "from tun2sx.control import stats\n", "tun2sx.control"),
        ("tun2sx/dataplane/splice.py", "from . import engine\n", "tun2sx.dataplane.engine"),
        ("tun2sx/dataplane/udpflow.py", "import tun2sx.dataplane.engine as e\n", ".engine"),
    ],
)
def test_a_broken_rule_is_found(tmp_path: Path, name: str, text: str, expected: str) -> None:
    root = _tree(tmp_path, {"stack/__init__.py": "", name: text})
    (found,) = violations(root)
    assert found.startswith(f"{name}:") and expected in found


def test_allowed_imports_are_not_reported(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "outbounds/socks5.py": "from stack.wire import ipv4\n",
            "tun2sx/dataplane/tcpflow.py": "from tun2sx.dataplane.context import FlowContext\n",
            "tun2sx/dataplane/engine.py": "from tun2sx.dataplane import tcpflow\n",
            "tun2sx/control/app.py": "from tun2sx.dataplane.engine import Engine\n",
            "tun2sx/naming/router.py": "from outbounds.base import Outbound\n",
        },
    )
    assert violations(root) == []
