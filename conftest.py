"""Plain `pytest` as a user other than root runs the unit tests only (the fast lane): the
privileged and end-to-end tests need root (network namespaces, iptables, a dockerd). Naming
them (`pytest tests/privileged`) still runs them, and each then says it needs root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NEED_ROOT = ("tests/privileged", "tests/e2e", "tests/multihost")
_HERE = Path(__file__).resolve().parent


def _unit_only(config: pytest.Config) -> bool:
    return os.geteuid() != 0 and config.args_source == pytest.Config.ArgsSource.TESTPATHS


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if _unit_only(config) and collection_path in {_HERE / d for d in NEED_ROOT}:
        return True
    return None  # pytest decides as usual


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    if _unit_only(config):
        terminalreporter.write_line(
            f"not root: ran the unit tests only ({' and '.join(NEED_ROOT)} need root: "
            "sudo scripts/test.sh)"
        )
