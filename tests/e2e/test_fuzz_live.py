"""Hostile input against the running plugin itself: every reply is JSON with a clear Err, the
process stays up, its memory stays bounded, and rejected requests change no state."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import plugin_pid, plugin_socket
from tests.fuzzing import RAW_BODIES, ROUTES, check_reply
from tests.hostenv import post_raw, run

REQUESTS = 1500


def rss_kib() -> int:
    pid = plugin_pid()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def state() -> str:
    code = (
        "from pydriver.store import read_state; from pathlib import Path; import json;"
        "n, e = read_state(Path('/var/lib/pydriver'));"
        "print(json.dumps([[x.to_dict() for x in n], [x.to_dict() for x in e]], sort_keys=True))"
    )
    return run([sys.executable, "-c", code]).stdout


def pools() -> set[str]:
    code = (
        "import sqlite3, json; db = sqlite3.connect('file:/var/lib/pydriver/state.db?mode=ro',"
        " uri=True); print(json.dumps([r[0] for r in db.execute('SELECT id FROM pools')]))"
    )
    return set(json.loads(run([sys.executable, "-c", code]).stdout))


def test_fuzz_the_live_plugin(environment: None) -> None:
    sock = plugin_socket()
    before_state, before_pools = state(), pools()
    pid_before = plugin_pid()
    warm = rss_kib()
    statuses: list[int] = []

    @settings(
        max_examples=REQUESTS, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(method=st.sampled_from(ROUTES), body=RAW_BODIES)
    def fuzz(method: str, body: bytes) -> None:
        status, reply = post_raw(sock, method, body)
        check_reply(status, reply)
        statuses.append(status)

    fuzz()
    assert len(statuses) >= REQUESTS // 2
    grown = rss_kib() - warm
    assert grown < 20 * 1024, f"RSS grew by {grown} KiB over {len(statuses)} requests"
    assert plugin_pid() == pid_before  # never restarted
    # Some fuzzed requests are valid: an empty RequestPool asks for an automatic pool. Give
    # those back, as Docker would; nothing else may have changed.
    for pool_id in pools() - before_pools:
        status, _ = post_raw(
            sock, "IpamDriver.ReleasePool", json.dumps({"PoolID": pool_id}).encode()
        )
        assert status == 200
    assert pools() == before_pools
    assert state() == before_state, "fuzzing changed pybridge's state"
    assert post_raw(sock, "Plugin.Activate", b"")[0] == 200
