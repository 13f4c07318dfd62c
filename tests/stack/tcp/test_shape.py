"""The shape of `stack.tcp`: each part owns its state, and ownership runs one way.

Checked from the source: no module reaches into another object's
underscored fields (only `self`'s), the modules import each other without
a circle, and no part imports the connection that coordinates them (only
the demux and the package do).
"""

from __future__ import annotations

import ast
from pathlib import Path

import stack.tcp

PACKAGE = Path(stack.tcp.__file__).parent
# NamedTuple's API is public despite its underscore.
NAMEDTUPLE_API = {"_asdict", "_fields", "_make", "_replace"}


def _modules() -> dict[str, ast.Module]:
    return {
        path.stem: ast.parse(path.read_text(), str(path))
        for path in sorted(PACKAGE.glob("*.py"))
        if path.stem != "__init__"
    }


def _imports(tree: ast.Module) -> set[str]:
    """The `stack.tcp` modules a module imports, type-checking imports included."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "stack.tcp":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("stack.tcp."):
                found.add(node.module.removeprefix("stack.tcp."))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("stack.tcp."):
                    found.add(alias.name.removeprefix("stack.tcp."))
    return found


def _offences(name: str, tree: ast.Module) -> list[str]:
    """Attribute accesses to an underscored field of anything but self."""
    return [
        f"{name}.py:{node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and node.attr not in NAMEDTUPLE_API
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
    ]


def test_no_module_touches_another_objects_private_fields() -> None:
    assert [o for name, tree in _modules().items() for o in _offences(name, tree)] == []


def test_the_modules_import_each_other_without_a_circle() -> None:
    modules = _modules()
    graph = {name: _imports(tree) & modules.keys() for name, tree in modules.items()}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, " -> ".join((*path, name))
        if name in done:
            return
        for dep in graph[name]:
            visit(dep, (*path, name))
        done.add(name)

    for name in graph:
        visit(name, ())
    importers = {name for name, deps in graph.items() if "connection" in deps}
    assert importers == {"demux"}


def test_the_checks_see_what_they_look_for() -> None:
    tree = ast.parse("from stack.tcp.rcv import Receiver\nimport stack.tcp.snd\n")
    assert _imports(tree) == {"rcv", "snd"}
    code = "self._a = conn._b + conn.c + self.d._e + h._replace(x=1)._fields"
    assert sorted(_offences("m", ast.parse(code))) == ["m.py:1: conn._b", "m.py:1: self.d._e"]
