"""The sans-I/O stack must never pull in trio (a layering rule of the design)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import stack


def test_importing_every_stack_module_does_not_import_trio() -> None:
    names = [m.name for m in pkgutil.walk_packages(stack.__path__, "stack.")]
    assert "stack.tcp.connection" in names and "stack.seq" in names
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'trio' or m.startswith('trio.'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
