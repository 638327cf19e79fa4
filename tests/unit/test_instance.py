"""One pybridge per state directory: the second one is refused, naming the first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pydriver.errors import HostError
from pydriver.instance import LOCK_NAME, claim_state_dir


def test_the_second_claim_is_refused_naming_the_first(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = claim_state_dir(state, "the host service, pid 42")
    try:
        with pytest.raises(HostError) as refused:
            claim_state_dir(state, "the managed plugin, pid 7 in its namespace")
        message = str(refused.value)
        assert "another pybridge (the host service, pid 42)" in message
        assert str(state) in message
        assert "not both" in message
    finally:
        os.close(first)
    # The holder's name stays as the first wrote it.
    assert (state / LOCK_NAME).read_text() == "the host service, pid 42\n"


def test_the_directory_is_free_again_once_its_holder_closes(tmp_path: Path) -> None:
    first = claim_state_dir(tmp_path, "the host service, pid 42")
    os.close(first)  # what the kernel does when the process ends, however it ends
    second = claim_state_dir(tmp_path, "the host service, pid 43")
    os.close(second)
    assert (tmp_path / LOCK_NAME).read_text() == "the host service, pid 43\n"


def test_a_missing_state_directory_is_created_private(tmp_path: Path) -> None:
    state = tmp_path / "a" / "b"
    os.close(claim_state_dir(state, "x"))
    assert state.is_dir()
    assert (state.stat().st_mode & 0o777) == 0o700
    assert ((state / LOCK_NAME).stat().st_mode & 0o777) == 0o600


def test_an_unusable_state_directory_is_one_sentence(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(HostError, match="cannot open"):
        claim_state_dir(blocker / "state", "x")
