"""The VXLAN data plane on the real kernel, in throwaway namespaces: two hosts on an underlay,
each with the segment's bridge (the same gateway address on both) and a container; pybridge's
netlink writes the tunnel entries tunnel.plan() asks for, and the containers reach each other
by address, with nothing learnt and no ARP across the tunnel."""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest

from pydriver.netlink import Netlink
from pydriver.tunnel import RemoteEndpoint, TunnelEntries, mtu_for, plan, wanted
from tests.hostenv import probe, require_root, run

pytestmark = pytest.mark.privileged
ip = ipaddress.ip_address
VNI, PORT = 100, 4789


def ns_run(ns: str, *argv: str, check: bool = True) -> str:
    return run(["ip", "netns", "exec", ns, *argv], check=check).stdout


@pytest.fixture
def lab() -> Iterator[dict[str, str]]:
    """Namespaces: an underlay with a bridge, two hosts (eth0 203.0.113.1/.2) each with a
    bridge pybseg (10.70.0.1/16 on both) and a container (10.70.N.10)."""
    require_root()
    tag = secrets.token_hex(3)
    names = {k: f"pbt-{k}{tag}" for k in ("ul", "h1", "h2", "c1", "c2")}
    for ns in names.values():
        run(["ip", "netns", "add", ns])
        ns_run(ns, "ip", "link", "set", "lo", "up")
    try:
        ns_run(names["ul"], "ip", "link", "add", "ul", "type", "bridge")
        ns_run(names["ul"], "ip", "link", "set", "ul", "up")
        for n in (1, 2):
            host, container = names[f"h{n}"], names[f"c{n}"]
            ns_run(
                names["ul"],
                "ip",
                "link",
                "add",
                f"u{n}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host,
            )
            ns_run(names["ul"], "ip", "link", "set", f"u{n}", "master", "ul", "up")
            ns_run(host, "ip", "addr", "add", f"203.0.113.{n}/24", "dev", "eth0")
            ns_run(host, "ip", "link", "set", "eth0", "up")
            ns_run(host, "ip", "link", "add", "pybseg", "type", "bridge")
            ns_run(host, "ip", "addr", "add", "10.70.0.1/16", "dev", "pybseg")
            ns_run(host, "ip", "link", "set", "pybseg", "up")
            ns_run(
                host,
                "ip",
                "link",
                "add",
                "pyv",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                container,
            )
            ns_run(host, "ip", "link", "set", "pyv", "master", "pybseg", "up")
            ns_run(container, "ip", "link", "set", "eth0", "address", f"02:50:0a:46:0{n}:0a")
            ns_run(container, "ip", "addr", "add", f"10.70.{n}.10/16", "dev", "eth0")
            ns_run(container, "ip", "link", "set", "eth0", "up")
            ns_run(container, "ip", "route", "add", "default", "via", "10.70.0.1")
        yield names
    finally:
        for ns in names.values():
            run(["ip", "netns", "del", ns], check=False)


@pytest.fixture
async def hosts(lab: dict[str, str]) -> AsyncIterator[list[Netlink]]:
    links = [Netlink(netns=lab["h1"]), Netlink(netns=lab["h2"])]
    for link in links:
        await link.open()
    try:
        yield links
    finally:
        for link in links:
            await link.close()


def ping(ns: str, address: str) -> bool:
    """Whether any of a few echo requests is answered (the first may wait for ARP: the
    container's entry for an address that did not answer a moment ago is retried)."""
    out = probe(["ip", "netns", "exec", ns, "busybox", "ping", "-c", "3", "-W", "1", address])
    received = re.search(r"(\d+) packets received", out)
    return received is not None and int(received.group(1)) > 0


async def test_containers_on_two_hosts_reach_each_other_through_the_tunnel(
    lab: dict[str, str], hosts: list[Netlink]
) -> None:
    vteps = [ip("203.0.113.1"), ip("203.0.113.2")]
    endpoints = [
        RemoteEndpoint(f"02:50:0a:46:0{n}:0a", vteps[n - 1], (ip(f"10.70.{n}.10"),)) for n in (1, 2)
    ]
    assert not ping(lab["c1"], "10.70.2.10")  # no tunnel yet
    for n, host in enumerate(hosts):
        assert await host.ensure_vxlan("pyx-seg", VNI, PORT, vteps[n], "eth0", "pybseg")
        assert not await host.ensure_vxlan("pyx-seg", VNI, PORT, vteps[n], "eth0", "pybseg")
        want = wanted(vteps, endpoints, own_vtep=vteps[n])
        await host.apply_tunnel("pyx-seg", plan(want, await host.tunnel_entries("pyx-seg")))
        assert await host.tunnel_entries("pyx-seg") == want
        assert plan(want, await host.tunnel_entries("pyx-seg")) == []
    link = ns_run(lab["h1"], "ip", "-d", "-o", "link", "show", "pyx-seg")
    assert "nolearning" in link
    assert "proxy" in link
    assert f"mtu {mtu_for(1500, 4)}" in link
    assert ping(lab["c1"], "10.70.2.10")
    assert ping(lab["c2"], "10.70.1.10")
    # The gateway answers locally on both hosts (the same address), never across.
    assert ping(lab["c1"], "10.70.0.1")
    # The container on host 2 leaves: host 1 forgets it, and nothing of it is left.
    gone = wanted(vteps, endpoints[:1], own_vtep=vteps[0])
    await hosts[0].apply_tunnel("pyx-seg", plan(gone, await hosts[0].tunnel_entries("pyx-seg")))
    assert await hosts[0].tunnel_entries("pyx-seg") == gone
    # Host 2 leaves the segment: no flooding to it any more, so nothing reaches it (what the
    # bridge learnt still points at the tunnel, which has nowhere to send it).
    alone = wanted(vteps[:1], endpoints[:1], own_vtep=vteps[0])
    await hosts[0].apply_tunnel("pyx-seg", plan(alone, await hosts[0].tunnel_entries("pyx-seg")))
    assert await hosts[0].tunnel_entries("pyx-seg") == TunnelEntries(frozenset(), {}, {})
    assert not ping(lab["c1"], "10.70.2.10")
