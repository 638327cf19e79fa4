"""Docker's sandbox files as evidence that a container is gone (the mounted case is in
tests/privileged/test_kernel.py)."""

from __future__ import annotations

from pathlib import Path

from pydriver.sandboxes import sandbox_released


async def test_an_empty_sandbox_file_means_docker_destroyed_the_sandbox(tmp_path: Path) -> None:
    key = tmp_path / "1a2b3c4d5e6f"
    key.touch()
    assert await sandbox_released(str(key))


async def test_a_file_not_visible_here_is_no_evidence(tmp_path: Path) -> None:
    # (a managed plugin never sees dockerd's files)
    assert not await sandbox_released(str(tmp_path / "missing"))
    assert not await sandbox_released(str(tmp_path))  # not a sandbox file
