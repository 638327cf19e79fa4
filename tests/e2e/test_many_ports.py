"""Thousands of published ports on one container: pybridge holds a socket for each (so it needs
a file descriptor limit above the usual 1024), answers quickly, and `docker rm` leaves no rule."""

from __future__ import annotations

import os
import re
import time

from tests.e2e.conftest import MODE, Docker, plugin_pid, tcp_from
from tests.e2e.test_ports import published_for
from tests.harness import wait_for
from tests.hostenv import OutsideHost, firewall_dump

FIRST, LAST = 20000, 22999  # 3000 ports
ANSWERING = (FIRST, 21500, LAST)


def dnat_rules_for(ports: range) -> int:
    wanted = {str(port) for port in ports}
    return sum(
        1
        for match in re.finditer(r"-A PYBRIDGE-DNAT .*--dport (\d+) ", firewall_dump())
        if match.group(1) in wanted
    )


def test_three_thousand_published_ports(d: Docker, outside: OutsideHost) -> None:
    ports = range(FIRST, LAST + 1)
    net = d.network()
    started = time.monotonic()
    c = d.run(
        net,
        "-p",
        f"{FIRST}-{LAST}:{FIRST}-{LAST}",
        command=("pbtest-echo", "tcp", *(str(port) for port in ANSWERING)),
    )
    elapsed = time.monotonic() - started
    assert len(published_for(c)) == len(ports)
    for port in ANSWERING:
        assert tcp_from(outside, outside.host_ip, port, outside.ip) == outside.ip
    assert wait_for(lambda: dnat_rules_for(ports) == len(ports), timeout=10)
    # One held socket per port (the host service and the managed plugin alike).
    descriptors = len(os.listdir(f"/proc/{plugin_pid()}/fd"))
    assert descriptors >= len(ports), (MODE, descriptors)
    print(f"docker run with {len(ports)} published ports took {elapsed:.1f} s")

    d.rm_container(c)
    assert wait_for(lambda: dnat_rules_for(ports) == 0, timeout=10)
    assert published_for(c) == []
    assert len(os.listdir(f"/proc/{plugin_pid()}/fd")) < descriptors - len(ports) + 50
    d.rm_network(net)
