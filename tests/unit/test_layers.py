"""The logic depends on interfaces, never on adapters: no logic module imports one (nor what
only adapters may use), so the logic runs in these tests over fakes. Adapters are wired in
cli.py alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pydriver"

# Modules that decide: pure, or talking to the host only through pydriver/interfaces.py.
LOGIC = (
    "cluster",
    "clusterhost",
    "clusterview",
    "segments",
    "tunnel",
    "clustermodel",
    "blocks",
    "background",
    "bridges",
    "driver",
    "errors",
    "eviction",
    "firewall_writer",
    "flows",
    "interfaces",
    "ipam",
    "ipamdriver",
    "locks",
    "metrics",
    "model",
    "naming",
    "options",
    "ports",
    "protocol",
    "publishing",
    "removal",
    "rules",
    "spares",
    "startup",
    "state",
    "upkeep",
    "veths",
)
# The adapters, and what only adapters use.
ADAPTERS = {
    "netlink",
    "hostports",
    "instance",
    "etcdstore",
    "clusterstart",
    "store",
    "firewall",
    "sysctl",
    "sandboxes",
    "process",
    "pauses",
    "unixhttp",
    "server",
    "cli",
}
FORBIDDEN = {"pyroute2", "aiohttp", "aetcd", "sqlite3", "subprocess", "socket"}


def imported(module: str) -> set[str]:
    """The modules ``pydriver.<module>`` imports: pydriver's by their short name, others by
    their top-level package."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from .x import y
                if node.module:
                    names.add(node.module.split(".")[0])
                else:
                    names |= {alias.name for alias in node.names}
            elif node.module and node.module.startswith("pydriver."):
                names.add(node.module.split(".")[1])
            elif node.module:
                names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", LOGIC)
def test_logic_imports_no_adapter(module: str) -> None:
    found = imported(module)
    assert not found & ADAPTERS, f"pydriver/{module}.py imports adapters {found & ADAPTERS}"
    assert not found & FORBIDDEN, f"pydriver/{module}.py imports {found & FORBIDDEN}"


def test_every_module_is_placed() -> None:
    """A new module is either logic or an adapter (or a tool): say which."""
    tools = {
        "__init__",
        "checks",
        "clusterreport",
        "doctor",
        "dockerapi",
        "faults",
        "logs",
        "peers",
        "prune",
        "pruning",
        "report",
    }
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert modules == set(LOGIC) | ADAPTERS | tools, modules ^ (set(LOGIC) | ADAPTERS | tools)
