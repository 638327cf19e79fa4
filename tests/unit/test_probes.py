"""The test suite's own probe check: a "cannot reach" assertion must not pass because the
probe never ran. Outputs below are what the tools printed on this kind of machine."""

from __future__ import annotations

import subprocess

import pytest

from tests.hostenv import probed


def result(code: int, stdout: str = "", stderr: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(["probe"], code, stdout, stderr)


@pytest.mark.parametrize(
    ("code", "stdout", "stderr"),
    [
        (1, "", "nc: timed out"),
        (1, "", "nc: can't connect to remote host (127.0.0.1): Connection refused"),
        (1, "", "nc: can't connect to remote host (10.1.2.3): Network is unreachable"),
        (1, "", "nc: can't connect to remote host: Connection refused"),  # (IPv6)
        (1, "PING 10.1.2.1 (10.1.2.1): 56 data bytes\n\n--- 10.1.2.1 ping statistics ---\n"
            "1 packets transmitted, 0 packets received, 100% packet loss\n", ""),
        (1, "PING 10.1.2.3 (10.1.2.3): 56 data bytes\n", "ping: sendto: Network is unreachable"),
        (1, "", "Traceback (most recent call last):\n  ...\nTimeoutError: timed out"),
        (1, "", "Traceback (most recent call last):\n  ...\nConnectionRefusedError: [Errno 111]"),
        (1, "", "Traceback (most recent call last):\n  ...\nOSError: [Errno 113] No route to host"),
    ],
)  # fmt: skip
def test_a_probe_that_went_out_and_got_nothing_back_is_an_empty_answer(
    code: int, stdout: str, stderr: str
) -> None:
    assert probed(result(code, stdout, stderr), "probe") == stdout.strip()


@pytest.mark.parametrize(
    ("code", "stderr"),
    [
        (1, 'exec of "ping" failed: No such file or directory'),  # ip netns exec, no ping
        (1, 'Cannot open network namespace "pbt-x": No such file or directory'),
        (127, "ping: applet not found"),
        (126, "OCI runtime exec failed: exec failed: unable to start container process"),
        (1, "Error response from daemon: No such container: pbt-c"),
        (1, "nc: bad address 'nosuchhost'"),
        (1, "nc: can't connect to remote host: Invalid argument"),  # (fe80:: with no scope)
        (1, "ping: sendto: Invalid argument"),
        (1, "Traceback (most recent call last):\n  ...\nOSError: [Errno 22] Invalid argument"),
    ],
)
def test_a_probe_that_never_ran_fails_the_test(code: int, stderr: str) -> None:
    with pytest.raises(AssertionError, match="never ran"):
        probed(result(code, "", stderr), "probe")


def test_an_answer_is_returned_stripped() -> None:
    assert probed(result(0, "10.213.60.1\n"), "probe") == "10.213.60.1"
