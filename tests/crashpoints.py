"""The crash points of pydriver, read from its source: every name passed to
``faults.point(...)`` (or bound to it with ``functools.partial``), so the crash test covers a
point the day it is added. A call whose name is not written out (a variable) cannot be
followed and is an error: write the name as a literal (``a if c else b`` of literals is fine)."""

from __future__ import annotations

import ast
from pathlib import Path

import pydriver

FAULTS_MODULE = "pydriver.faults"
PACKAGE_DIR = Path(pydriver.__file__).resolve().parent


class Unfollowable(Exception):
    """A use of faults.point whose point name cannot be read from the source."""


def crash_points(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Every crash point name in the package, sorted, each once."""
    names: set[str] = set()
    for path in sorted(package_dir.rglob("*.py")):
        relative = path.relative_to(package_dir.parent)
        module = ".".join(relative.with_suffix("").parts)
        names |= points_in(path.read_text(), module, str(relative))
    return sorted(names)


def points_in(source: str, module: str, where: str = "<source>") -> set[str]:
    """The crash point names used in one module's source (``module``: its dotted name)."""
    tree = ast.parse(source)
    modules, functions = _aliases(tree, module)

    def is_point(node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            return node.id in functions
        return (
            isinstance(node, ast.Attribute)
            and node.attr == "point"
            and _dotted(node.value) in modules
        )

    names: set[str] = set()
    followed: set[int] = set()
    for call in ast.walk(tree):
        if not isinstance(call, ast.Call):
            continue
        if is_point(call.func):
            names |= _literal_names(call.args[0] if call.args else None, where, call)
            followed.add(id(call.func))
        for i, arg in enumerate(call.args):
            if is_point(arg):  # functools.partial(faults.point, "name")
                nxt = call.args[i + 1] if i + 1 < len(call.args) else None
                names |= _literal_names(nxt, where, call)
                followed.add(id(arg))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Name | ast.Attribute)
            and is_point(node)
            and id(node) not in followed
        ):
            raise Unfollowable(
                f"{where}:{node.lineno}: faults.point is used in a way the crash test cannot "
                "follow; call it (or functools.partial it) with the point's name written out"
            )
    return names


def _aliases(tree: ast.Module, module: str) -> tuple[set[str], set[str]]:
    """Names bound to the faults module, and to its point function, in this module."""
    package = module.rsplit(".", 1)[0]
    modules: set[str] = set()
    functions: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == FAULTS_MODULE:
                    modules.add(alias.asname or FAULTS_MODULE)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            for alias in node.names:
                if base == FAULTS_MODULE and alias.name == "point":
                    functions.add(alias.asname or "point")
                elif _join(base, alias.name) == FAULTS_MODULE:
                    modules.add(alias.asname or alias.name)
    return modules, functions


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if node.level == 0:
        return node.module or ""
    parts = package.split(".")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _join(base: str, name: str) -> str:
    return f"{base}.{name}" if base else name


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def _literal_names(node: ast.expr | None, where: str, call: ast.Call) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _literal_names(node.body, where, call) | _literal_names(node.orelse, where, call)
    raise Unfollowable(
        f"{where}:{call.lineno}: a crash point's name must be written out as a string, "
        "so that the crash test finds it"
    )
