"""The kernel and firewall adapters, and the whole driver, for real inside throwaway network
namespaces (root, no Docker). Both iptables flavours are exercised here; the host's own
firewall and links are never touched."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pydriver import protocol as p
from pydriver.driver import NetworkDriver
from pydriver.errors import BridgeFull, Conflict, HostError
from pydriver.firewall import Backend, IptablesFirewall, tool
from pydriver.hostports import SocketReservations, port_holder
from pydriver.interfaces import MAX_BRIDGE_PORTS
from pydriver.naming import RETIRED_LINK_GROUP
from pydriver.netlink import Netlink
from pydriver.rules import NetworkRules, jumps_present, parse_save, pybridge_rules_in
from pydriver.store import SqliteStore
from tests.hostenv import require_root, run
from tests.privileged.netns_sysctl import NetnsSysctl

pytestmark = pytest.mark.privileged


def _netns() -> str:
    name = "pbt-" + secrets.token_hex(4)
    run(["ip", "netns", "add", name])
    run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
    return name


@pytest.fixture
def netns() -> Iterator[str]:
    require_root()
    names = [_netns()]
    try:
        yield names[0]
    finally:
        for name in names:
            run(["ip", "netns", "del", name], check=False)


@pytest.fixture
async def nl(netns: str) -> AsyncIterator[Netlink]:
    link = Netlink(netns=netns)
    await link.open()
    try:
        yield link
    finally:
        await link.close()


def in_ns(ns: str, *argv: str, check: bool = True) -> str:
    return run(["ip", "netns", "exec", ns, *argv], check=check).stdout


async def test_bridge_is_idempotent_and_refuses_non_bridges(nl: Netlink, netns: str) -> None:
    assert await nl.ensure_bridge("pyb-test", "02:00:00:00:00:aa", 1400) is True
    assert await nl.ensure_bridge("pyb-test", "02:00:00:00:00:aa", 1400) is False
    gw = ipaddress.ip_interface("10.213.40.1/24")
    await nl.ensure_address("pyb-test", gw)
    await nl.ensure_address("pyb-test", gw)  # EEXIST is success
    await nl.set_link("pyb-test", up=True)
    link = await nl.get_link("pyb-test")
    assert link is not None
    assert link.kind == "bridge"
    assert link.mtu == 1400
    assert link.up
    assert link.mac == "02:00:00:00:00:aa"
    assert await nl.link_addresses("pyb-test") == [gw]
    assert any(r.destination == gw.network and r.device == "pyb-test" for r in await nl.routes())
    await nl.remove_address("pyb-test", gw)
    await nl.remove_address("pyb-test", gw)  # already gone is success
    in_ns(netns, "ip", "link", "add", "pbt-dummy", "type", "veth", "peer", "name", "pbt-dummy2")
    with pytest.raises(Conflict, match="not a bridge"):
        await nl.ensure_bridge("pbt-dummy", "02:00:00:00:00:ab", None)
    assert await nl.delete_link("pyb-test") is True
    assert await nl.delete_link("pyb-test") is False


async def assert_on_bridge(nl: Netlink, host_name: str, peer_name: str, bridge_name: str) -> None:
    """The pair as an endpoint has it: the host end up on the bridge, MTU 1300 on both ends,
    the container's end still down (Docker brings it up in the container) with its MAC."""
    host, peer = await nl.get_link(host_name), await nl.get_link(peer_name)
    bridge = await nl.get_link(bridge_name)
    assert host is not None
    assert peer is not None
    assert bridge is not None
    assert host.master == bridge.index
    assert host.up
    assert not peer.up
    assert (host.mtu, peer.mtu, peer.mac) == (1300, 1300, "02:11:22:33:44:55")


async def test_veth_pair(nl: Netlink) -> None:
    await nl.ensure_bridge("pyb-test", "02:00:00:00:00:aa", None)
    assert await nl.ensure_veth("pyvaaaaaaaaaaaa", "pycaaaaaaaaaaaa", "02:11:22:33:44:55", 1300)
    assert not await nl.ensure_veth("pyvaaaaaaaaaaaa", "pycaaaaaaaaaaaa", "02:11:22:33:44:55", 1300)
    await nl.set_link("pyvaaaaaaaaaaaa", master="pyb-test", up=True)
    await assert_on_bridge(nl, "pyvaaaaaaaaaaaa", "pycaaaaaaaaaaaa", "pyb-test")
    assert await nl.delete_link("pyvaaaaaaaaaaaa")
    assert await nl.get_link("pycaaaaaaaaaaaa") is None  # the pair goes together


async def test_a_spare_pair_is_made_bare_and_attached_like_a_new_one(
    nl: Netlink, netns: str
) -> None:
    await nl.ensure_bridge("pyb-test", "02:00:00:00:00:aa", None)
    assert await nl.create_spare_veth("pysaaaaaaaaaaaa", "pytaaaaaaaaaaaa")
    assert not await nl.create_spare_veth("pysaaaaaaaaaaaa", "pytaaaaaaaaaaaa")  # taken
    host = await nl.get_link("pysaaaaaaaaaaaa")
    assert host is not None
    assert host.master is None
    assert not host.up
    assert await nl.attach_veth(
        "pysaaaaaaaaaaaa", "pytaaaaaaaaaaaa", "02:11:22:33:44:55", 1300, "pyb-test", hairpin=True
    )
    await assert_on_bridge(nl, "pysaaaaaaaaaaaa", "pytaaaaaaaaaaaa", "pyb-test")
    details = json.loads(in_ns(netns, "ip", "-d", "-j", "link", "show", "pysaaaaaaaaaaaa"))
    assert details[0]["linkinfo"]["info_slave_data"]["hairpin"] is True
    # Taken off the bridge (a removed container's, before it is deleted); twice is fine.
    await nl.retire("pysaaaaaaaaaaaa", "pytaaaaaaaaaaaa")
    await nl.retire("pysaaaaaaaaaaaa", "pytaaaaaaaaaaaa")
    detached = await nl.get_link("pysaaaaaaaaaaaa")
    assert detached is not None
    assert detached.master is None
    assert detached.group == RETIRED_LINK_GROUP
    # A pair that is gone (either end) is reported, not made.
    assert await nl.delete_link("pysaaaaaaaaaaaa")
    await nl.retire("pysaaaaaaaaaaaa", "pytaaaaaaaaaaaa")  # gone: nothing to do
    assert not await nl.attach_veth(
        "pysaaaaaaaaaaaa", "pytaaaaaaaaaaaa", "02:11:22:33:44:55", None, "pyb-test"
    )


def port_state(netns: str, name: str) -> str:
    return str(json.loads(in_ns(netns, "bridge", "-j", "link", "show", "dev", name))[0]["state"])


async def test_a_pair_put_on_a_bridge_forwards_only_once_its_container_end_is_up(
    netns: str,
) -> None:
    """A new veth's state is "unknown" until the kernel's link watcher (up to a second
    later) sees its carrier is off, and a bridge takes "unknown" for "up": a pair put on a
    bridge at once would forward without a carrier, and the watcher would take it out later,
    under the rtnl lock, walking every port of the bridge. Made by pybridge (host end
    "dormant", then read back), both kinds of pair are disabled ports until their container's
    end comes up, then forwarding.

    In pybridge's own namespace, as it runs: a Netlink for another namespace reads links
    back to find them, which on Linux 6.8 and newer settles the state and hides the problem."""
    script = (
        "import asyncio, json, subprocess; from pydriver.netlink import Netlink\n"
        "def state(name):\n"
        "    out = subprocess.run(['bridge', '-j', 'link', 'show', 'dev', name],\n"
        "                         capture_output=True, text=True, check=True).stdout\n"
        "    return json.loads(out)[0]['state']\n"
        "async def main():\n"
        "    nl = Netlink(); await nl.open()\n"
        "    await nl.ensure_bridge('pyb-test', '02:00:00:00:00:aa', None)\n"
        "    await nl.set_link('pyb-test', up=True)\n"
        "    states = []\n"
        "    for n in range(8):\n"
        "        spare, peer, new = f'pys{n:012d}', f'pyt{n:012d}', f'pyv{n:012d}'\n"
        "        assert await nl.create_spare_veth(spare, peer)\n"
        "        assert await nl.attach_veth(spare, peer, '02:11:22:33:44:55', None,\n"
        "                                    'pyb-test', hairpin=True)\n"
        "        assert await nl.ensure_veth(new, f'pyc{n:012d}', '02:11:22:33:44:56', None,\n"
        "                                    'pyb-test')\n"
        "        states += [state(spare), state(new)]\n"
        "    await nl.close()\n"
        "    print(json.dumps(states))\n"
        "asyncio.run(main())\n"
    )
    states = json.loads(in_ns(netns, sys.executable, "-c", script))
    assert states == ["disabled"] * 16  # not dormant, most were "forwarding"
    in_ns(netns, "ip", "link", "set", "pyt000000000000", "up")  # the container's end
    for _ in range(40):
        if port_state(netns, "pys000000000000") == "forwarding":
            break
        await asyncio.sleep(0.05)
    assert port_state(netns, "pys000000000000") == "forwarding"
    assert port_state(netns, "pyv000000000000") == "disabled"


async def test_a_spare_attached_to_a_full_bridge_is_reported_as_such(
    nl: Netlink, netns: str
) -> None:
    await nl.ensure_bridge("pyb-test", "02:00:00:00:00:aa", None)
    batch = "".join(
        f"link add pbt-f{i} master pyb-test type veth peer name pbt-g{i}\n"
        for i in range(MAX_BRIDGE_PORTS)
    )
    run(["ip", "-n", netns, "-batch", "-"], input=batch)
    assert await nl.create_spare_veth("pysbbbbbbbbbbbb", "pytbbbbbbbbbbbb")
    with pytest.raises(BridgeFull, match="at most 1023 interfaces"):
        await nl.attach_veth(
            "pysbbbbbbbbbbbb", "pytbbbbbbbbbbbb", "02:00:00:00:01:01", None, "pyb-test"
        )
    await nl.delete_link("pbt-f0")
    assert await nl.attach_veth(
        "pysbbbbbbbbbbbb", "pytbbbbbbbbbbbb", "02:00:00:00:01:01", None, "pyb-test"
    )


@pytest.mark.parametrize("backend", ["nft", "legacy"])
async def test_firewall_apply_is_atomic_idempotent_and_cleans_up(
    netns: str, backend: Backend
) -> None:
    save = [tool(backend, 4, "save")]
    in_ns(netns, tool(backend, 4), "-N", "DOCKER-USER")
    in_ns(netns, tool(backend, 4), "-A", "FORWARD", "-j", "DOCKER-USER")
    in_ns(netns, tool(backend, 4), "-A", "FORWARD", "-j", "ACCEPT")
    firewall = IptablesFirewall(backend, netns=netns)
    nets = [
        NetworkRules(
            "pyb-one",
            (ipaddress.ip_network("10.213.41.0/24"),),
            (ipaddress.ip_network("fd00:213:41::/64"),),
        ),
        # Every kind of rule an internal network adds (raw, DNAT RETURN) reads back the same.
        NetworkRules(
            "br-pbtinternal",
            (ipaddress.ip_network("10.213.43.0/24"),),
            (ipaddress.ip_network("fd00:213:43::/64"),),
            internal=True,
            gateways=(ipaddress.ip_address("10.213.43.1"), ipaddress.ip_address("fd00:213:43::1")),
        ),
    ]
    for _ in range(3):
        await firewall.apply(nets)
    assert await firewall.drift(nets) == []
    text = in_ns(netns, *save)
    assert jumps_present(text) == [
        "-A FORWARD -j PYBRIDGE-FORWARD",
        "-A FORWARD -j PYBRIDGE-ISOLATION",
        "-A PREROUTING -m addrtype --dst-type LOCAL -j PYBRIDGE-DNAT",
        "-A OUTPUT -m addrtype --dst-type LOCAL -j PYBRIDGE-DNAT",
        "-A POSTROUTING -j PYBRIDGE-POSTROUTING",
        "-A PREROUTING -j PYBRIDGE-PREROUTING",
    ]
    forward = [r for r in parse_save(text)["filter"][1] if r.startswith("-A FORWARD")]
    assert forward[:2] == ["-A FORWARD -j DOCKER-USER", "-A FORWARD -j PYBRIDGE-FORWARD"]
    rules = pybridge_rules_in(text)
    assert "-A PYBRIDGE-POSTROUTING -s 10.213.41.0/24 ! -o pyb-one -j MASQUERADE" in rules["nat"]
    text6 = in_ns(netns, tool(backend, 6, "save"))
    assert "-A PYBRIDGE-POSTROUTING -s fd00:213:41::/64 ! -o pyb-one -j MASQUERADE" in text6
    # Someone flushes FORWARD (a firewall reload): drift sees it, and a forced apply (what
    # self-healing does) restores exactly one jump.
    in_ns(netns, tool(backend, 4), "-F", "FORWARD")
    assert any("jump" in problem for problem in await firewall.drift(nets))
    await firewall.apply(nets, force=True)
    assert await firewall.drift(nets) == []
    assert jumps_present(in_ns(netns, *save)).count("-A FORWARD -j PYBRIDGE-FORWARD") == 1
    await firewall.apply([])
    for family in (4, 6):
        assert "PYBRIDGE" not in in_ns(netns, tool(backend, family, "save"))
    await firewall.apply([])  # nothing left to remove is fine


def _hex() -> str:
    return secrets.token_hex(32)


@pytest.mark.parametrize("backend", ["nft", "legacy"])
async def test_driver_datapath_with_forward_drop(
    netns: str, nl: Netlink, tmp_path: Path, backend: Backend
) -> None:
    """A miniature host in a netns with FORWARD DROP: two "containers" (netns) on a pybridge
    network reach each other and, masqueraded, an "outside" netns; nothing is left after."""
    ipt = tool(backend, 4)
    in_ns(netns, ipt, "-P", "FORWARD", "DROP")
    # Make bridged traffic cross iptables, as br_netfilter does on our hosts.
    in_ns(netns, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1", check=False)
    containers = [_netns(), _netns()]
    outside = _netns()
    store = SqliteStore(tmp_path)
    try:
        driver = NetworkDriver(
            store,
            nl,
            IptablesFirewall(backend, netns=netns),
            NetnsSysctl(netns),
            host_ports=SocketReservations(),
            port_holder=port_holder,
        )
        network_id = _hex()
        await driver.create_network(
            p.parse_create_network(
                {
                    "NetworkID": network_id,
                    "Options": {"com.docker.network.generic": {}},
                    "IPv4Data": [{"Pool": "10.213.42.0/24", "Gateway": "10.213.42.1/24"}],
                    "IPv6Data": None,
                }
            )
        )
        # The outside host hangs off the miniature host on 198.51.100.0/24, no route back.
        in_ns(netns, "ip", "link", "add", "pbt-up", "type", "veth", "peer", "name", "pbt-o")
        in_ns(netns, "ip", "link", "set", "pbt-o", "netns", outside)
        in_ns(netns, "ip", "addr", "add", "198.51.100.1/24", "dev", "pbt-up")
        in_ns(netns, "ip", "link", "set", "pbt-up", "up")
        in_ns(outside, "ip", "addr", "add", "198.51.100.2/24", "dev", "pbt-o")
        in_ns(outside, "ip", "link", "set", "pbt-o", "up")
        endpoints = []
        for i, ns in enumerate(containers):
            endpoint_id = _hex()
            endpoints.append(endpoint_id)
            address = f"10.213.42.{10 + i}/24"
            await driver.create_endpoint(
                p.parse_create_endpoint(
                    {
                        "NetworkID": network_id,
                        "EndpointID": endpoint_id,
                        "Interface": {"Address": address, "AddressIPv6": "", "MacAddress": ""},
                        "Options": {},
                    }
                )
            )
            joined = await driver.join(
                p.parse_join(
                    {
                        "NetworkID": network_id,
                        "EndpointID": endpoint_id,
                        "SandboxKey": f"/run/netns/{ns}",
                        "Options": {},
                    }
                )
            )
            # Do what Docker does with the Join answer.
            in_ns(netns, "ip", "link", "set", joined.src_name, "netns", ns)
            in_ns(ns, "ip", "link", "set", joined.src_name, "name", "eth0")
            in_ns(ns, "ip", "addr", "add", address, "dev", "eth0")
            in_ns(ns, "ip", "link", "set", "eth0", "up")
            in_ns(ns, "ip", "route", "add", "default", "via", str(joined.gateway))
        ping = ["busybox", "ping", "-c", "1", "-W", "2"]
        in_ns(containers[0], *ping, "10.213.42.11")
        in_ns(containers[1], *ping, "10.213.42.10")
        in_ns(containers[0], *ping, "10.213.42.1")
        in_ns(containers[0], *ping, "198.51.100.2")  # only works masqueraded
        # Nothing from outside gets into the network (no published ports).
        in_ns(outside, "ip", "route", "add", "10.213.42.0/24", "via", "198.51.100.1")
        assert " 0 packets received" in in_ns(outside, *ping, "10.213.42.10", check=False)

        for endpoint_id in endpoints:
            await driver.leave(
                p.parse_endpoint_ref({"NetworkID": network_id, "EndpointID": endpoint_id})
            )
            await driver.delete_endpoint(
                p.parse_endpoint_ref({"NetworkID": network_id, "EndpointID": endpoint_id})
            )
        await driver.delete_network(p.parse_network_ref({"NetworkID": network_id}))
        # The gateway address goes before the answer; veths, bridge and rules just after.
        assert "10.213.42." not in in_ns(netns, "ip", "-o", "addr", "show")
        await driver.settle()
        links = in_ns(netns, "ip", "-o", "link", "show")
        assert "pyb-" not in links
        assert "pyv" not in links
        assert "PYBRIDGE" not in in_ns(netns, tool(backend, 4, "save"))
        assert "10.213.42." not in in_ns(netns, "ip", "-o", "addr", "show")
    finally:
        store.close()
        for ns in [*containers, outside]:
            run(["ip", "netns", "del", ns], check=False)


async def test_fast_link_dump_agrees_with_pyroute2(nl: Netlink, netns: str) -> None:
    """The hand-parsed dump used at start-up in pybridge's own namespace reads the same links
    as pyroute2 does."""
    await nl.ensure_bridge("pyb-test", "02:00:00:00:00:aa", 1400)
    await nl.set_link("pyb-test", up=True)
    for i in range(20):
        await nl.ensure_veth(f"pyvtest{i}", f"pyctest{i}", f"02:00:00:00:01:{i:02x}", 1400)
        if i % 2:
            await nl.set_link(f"pyvtest{i}", master="pyb-test", up=True)
    script = (
        "import dataclasses, json; from pydriver.netlink import dump_links; "
        "print(json.dumps([dataclasses.asdict(link) for link in dump_links()]))"
    )
    fast = json.loads(in_ns(netns, sys.executable, "-c", script))
    slow = [dataclasses.asdict(link) for link in await nl.links()]
    assert len(slow) == 42  # lo, the bridge, 20 pairs
    assert sorted(fast, key=lambda x: x["index"]) == sorted(slow, key=lambda x: x["index"])


async def test_fast_route_dump_agrees_with_pyroute2(nl: Netlink, netns: str) -> None:
    """The hand-parsed route dump (every new network's overlap check reads the host's routes)
    reads the same main-table unicast routes as pyroute2 does: both families, a default
    route, a multipath route once per next hop; not another table's, nor a blackhole."""
    for name in ("pbt-r0", "pbt-r1"):
        await nl.ensure_bridge(name, "02:00:00:00:00:a" + name[-1], None)
        await nl.set_link(name, up=True)
    batch = "".join(
        [
            "addr add 10.213.70.1/24 dev pbt-r0\n",
            "addr add 10.213.71.1/24 dev pbt-r1\n",
            "addr add fd00:213:70::1/64 dev pbt-r0 nodad\n",
            "route add default via 10.213.70.254\n",
            "route add 10.213.80.0/24 nexthop via 10.213.70.9 nexthop via 10.213.71.9\n",
            "route add 10.213.81.0/24 dev pbt-r1 table 100\n",
            "route add blackhole 10.213.82.0/24\n",
            "route add fd00:213:90::/64 via fd00:213:70::9\n",
            *(f"route add 10.214.{i}.0/24 dev pbt-r1\n" for i in range(50)),
        ]
    )
    run(["ip", "-n", netns, "-batch", "-"], input=batch)
    script = (
        "import asyncio, json; from pydriver.netlink import Netlink\n"
        "async def main():\n"
        "    nl = Netlink(); await nl.open()\n"
        "    print(json.dumps([[str(r.destination), r.device] for r in await nl.routes()]))\n"
        "    await nl.close()\n"
        "asyncio.run(main())\n"
    )
    fast = sorted(tuple(r) for r in json.loads(in_ns(netns, sys.executable, "-c", script)))
    slow = sorted((str(r.destination), r.device) for r in await nl.routes())
    assert fast == slow
    assert ("0.0.0.0/0", "pbt-r0") in fast
    assert ("10.213.80.0/24", "pbt-r0") in fast
    assert ("10.213.80.0/24", "pbt-r1") in fast
    assert ("fd00:213:90::/64", "pbt-r0") in fast
    assert not [r for r in fast if r[0] in ("10.213.81.0/24", "10.213.82.0/24")]


async def test_a_full_bridge_is_reported_as_such(nl: Netlink, netns: str) -> None:
    await nl.ensure_bridge("pyb-test", "02:00:00:00:00:aa", None)
    batch = "".join(
        f"link add pbt-f{i} master pyb-test type veth peer name pbt-g{i}\n"
        for i in range(MAX_BRIDGE_PORTS)
    )
    run(["ip", "-n", netns, "-batch", "-"], input=batch)
    with pytest.raises(BridgeFull, match="at most 1023 interfaces"):
        await nl.ensure_veth("pyvtest", "pyctest", "02:00:00:00:01:01", None, master="pyb-test")
    assert not await nl.exists("pyvtest")
    await nl.delete_link("pbt-f0")
    assert await nl.ensure_veth("pyvtest", "pyctest", "02:00:00:00:01:01", None, "pyb-test")


def _flows(ns: str) -> list[str]:
    """The connection-tracking entries of ``ns`` (both families), one line each (orig and
    reply tuples)."""
    code = (
        "import asyncio, socket, sys\n"
        "from pyroute2.conntrack import AsyncConntrack\n"
        "async def main():\n"
        "    for family in (socket.AF_INET, socket.AF_INET6):\n"
        "        ct = AsyncConntrack(nfgen_family=family, netns=sys.argv[1])\n"
        "        await ct.setup_endpoint()\n"
        "        async for e in await ct.dump_entries():\n"
        "            o, r = e.tuple_orig, e.tuple_reply\n"
        "            print(o.proto, o.saddr, o.daddr, o.dport, r.saddr, r.sport)\n"
        "        ct.close()\n"
        "asyncio.run(main())\n"
    )
    return run([sys.executable, "-c", code, ns]).stdout.splitlines()


@pytest.mark.parametrize(
    ("prefix", "length", "family"),
    [("10.213.77.", 24, 2), ("fd00:213:77::", 64, 10)],
    ids=["ipv4", "ipv6"],
)
async def test_forget_flows_removes_only_the_flows_of_an_address(
    nl: Netlink, netns: str, prefix: str, length: int, family: int
) -> None:
    """Conntrack entries outlive a container: pybridge deletes those of its addresses (all of
    them when an endpoint goes, one NATed UDP port when a publication is revoked). IPv6 too:
    the kernel's IPv6 tuple filter finds nothing, so pybridge matches those itself."""
    host, peer_a, peer_b = (f"{prefix}{n}" for n in (1, 2, 3))
    peer = _netns()
    try:
        in_ns(netns, "ip", "link", "add", "pbt-ct0", "type", "veth", "peer", "name", "pbt-ct1")
        in_ns(netns, "ip", "link", "set", "pbt-ct1", "netns", peer)
        in_ns(netns, "ip", "addr", "add", f"{host}/{length}", "dev", "pbt-ct0", *_NODAD[family])
        in_ns(netns, "ip", "link", "set", "pbt-ct0", "up")
        for address in (peer_a, peer_b):
            in_ns(
                peer, "ip", "addr", "add", f"{address}/{length}", "dev", "pbt-ct1", *_NODAD[family]
            )
        in_ns(peer, "ip", "link", "set", "pbt-ct1", "up")
        # A conntrack match makes the namespace track connections.
        tool = "iptables-nft" if family == 2 else "ip6tables-nft"
        in_ns(netns, tool, "-A", "INPUT", "-m", "conntrack", "--ctstate", "NEW")
        in_ns(peer, "busybox", "ping", "-I", peer_a, "-c", "1", "-W", "2", host)
        for port in (5000, 5001):  # (busybox nc has no UDP mode)
            send = f"import socket; socket.socket({family}, 2).sendto(b'x', ('{host}', {port}))"
            in_ns(peer, sys.executable, "-c", send)
        in_ns(peer, "busybox", "ping", "-I", peer_b, "-c", "1", "-W", "2", host)
        before = _flows(netns)
        assert any(" 5000 " in f for f in before), before
        assert any(" 5001 " in f for f in before), before

        assert await nl.forget_flows(ipaddress.ip_address(host), 17, 5000) == 1
        after = _flows(netns)
        assert not any(" 5000 " in f for f in after)
        assert any(" 5001 " in f for f in after)
        # Flows to a port of any address (set up before a DNAT rule for it existed).
        assert await nl.forget_port_flows(17, 5001, 4 if family == 2 else 6) == 1
        assert not any(" 5001 " in f for f in _flows(netns))

        assert await nl.forget_flows(ipaddress.ip_address(peer_a)) == 1  # the ping
        left = _flows(netns)
        assert not any(f" {peer_a} " in f"{f} " for f in left), left
        assert any(f" {peer_b} " in f"{f} " for f in left), left  # another keeps its flows
        assert await nl.forget_flows(ipaddress.ip_address(peer_a)) == 0
        # Several at once (containers removed together): one dump at a time per socket, or
        # the kernel refuses the second with EBUSY and its flows stay.
        counts = await asyncio.gather(
            *(nl.forget_flows(ipaddress.ip_address(a)) for a in (peer_a, host, peer_b, host))
        )
        assert sum(counts) >= 1
        assert not any(f" {peer_b} " in f"{f} " for f in _flows(netns))

        # pybridge's own namespace (the service): the kernel's filtered flush, two requests
        # per address; on kernels without it, one walk of the table read by hand for all the
        # addresses asked for meanwhile.
        forget = (
            "import asyncio, ipaddress, sys; from pydriver.netlink import Netlink\n"
            "async def main():\n"
            "    nl = Netlink(); await nl.open()\n"
            "    if sys.argv[1] == 'walk':\n"
            "        nl._flows.core._filtered_flush.update({2: False, 10: False})\n"
            "    wanted = [ipaddress.ip_address(a) for a in sys.argv[2:]]\n"
            "    await asyncio.gather(*map(nl.forget_flows, wanted))\n"
            "    await nl.close()\n"
            "asyncio.run(main())\n"
        )
        for how in ("flush", "walk"):
            for address in (peer_a, peer_b):
                in_ns(peer, "busybox", "ping", "-I", address, "-c", "1", "-W", "2", host)
            assert len(_flows(netns)) == 2
            in_ns(netns, sys.executable, "-c", forget, how, peer_a)
            left = _flows(netns)
            assert len(left) == 1, (how, left)
            assert f" {peer_b} " in f"{left[0]} "
            in_ns(peer, "busybox", "ping", "-I", peer_a, "-c", "1", "-W", "2", host)
            in_ns(netns, sys.executable, "-c", forget, how, peer_a, peer_b, host)
            assert _flows(netns) == [], how
            # A flow to it that was not NATed: it is the reply's source.
            in_ns(peer, "busybox", "ping", "-I", peer_a, "-c", "1", "-W", "2", host)
            in_ns(netns, sys.executable, "-c", forget, how, host)
            assert _flows(netns) == [], how
    finally:
        run(["ip", "netns", "del", peer], check=False)


_NODAD = {2: (), 10: ("nodad",)}


async def test_a_sandbox_file_with_a_namespace_mounted_is_not_released(netns: str) -> None:
    """What dockerd's netns files look like: a namespace bind-mounted on a file (here `ip netns
    add`'s own), and once unmounted, the empty file left behind."""
    from pydriver.sandboxes import sandbox_released

    key = f"/run/netns/{netns}"
    assert not await sandbox_released(key)
    run(["umount", key])
    assert await sandbox_released(key)


async def test_retired_pairs_are_deleted_in_one_request_and_nothing_else_is(
    nl: Netlink, netns: str
) -> None:
    await nl.ensure_bridge("pyb-test", "02:00:00:00:00:aa", None)
    pairs = [(f"pyv{i:012d}", f"pyc{i:012d}") for i in range(3)]
    for host, peer in pairs:
        assert await nl.ensure_veth(host, peer, "02:11:22:33:44:55", None, master="pyb-test")
    container = _netns()  # a container's namespace, holding one pair's other end
    in_ns(netns, "ip", "link", "set", "pyc000000000002", "netns", container)
    try:
        await nl.retire(*pairs[0])
        await nl.retire(*pairs[2])
        links = {link.name: link for link in await nl.links()}
        assert links["pyc000000000000"].group == RETIRED_LINK_GROUP
        assert links["pyv000000000002"].group == RETIRED_LINK_GROUP
        await nl.delete_retired()
        names = {link.name for link in await nl.links()}
        assert not {"pyv000000000000", "pyc000000000000", "pyv000000000002"} & names
        assert {"pyv000000000001", "pyc000000000001", "pyb-test"} <= names  # not retired
        assert "pyc000000000002" not in in_ns(container, "ip", "-o", "link", "show")
        await nl.delete_retired()  # none left: nothing to do
        # A group the kernel cannot delete whole (here: loopback in it) is refused, and
        # nothing of it is deleted.
        await nl.retire(*pairs[1])
        in_ns(netns, "ip", "link", "set", "lo", "group", str(RETIRED_LINK_GROUP))
        with pytest.raises(HostError):
            await nl.delete_retired()
        assert "pyv000000000001" in {link.name for link in await nl.links()}
        in_ns(netns, "ip", "link", "set", "lo", "group", "default")
    finally:
        run(["ip", "netns", "del", container], check=False)


async def test_a_retired_pair_carries_nothing_to_the_host(nl: Netlink, netns: str) -> None:
    """A removed container whose end of the pair is still in its namespace (a renamed
    interface Docker could not take back, say) tries to reach the host through it while the
    pair waits for deletion: over the host end's IPv6 link-local address, and over IPv4 to an
    address of the host. Down, the host end has no address and the container's end no
    carrier."""
    await nl.ensure_bridge("pyb-test", "02:00:00:00:00:aa", None)
    await nl.set_link("pyb-test", up=True)
    host, peer = "pyv000000000007", "pyc000000000007"
    assert await nl.ensure_veth(host, peer, "02:11:22:33:44:57", None, master="pyb-test")
    in_ns(netns, "ip", "addr", "add", "10.213.57.1/32", "dev", "lo")
    container = _netns()
    try:
        in_ns(netns, "ip", "link", "set", peer, "netns", container)
        in_ns(container, "ip", "link", "set", peer, "name", "foo0")  # Docker would not find it
        in_ns(container, "ip", "addr", "add", "10.213.57.2/24", "dev", "foo0")
        in_ns(container, "ip", "link", "set", "foo0", "up")
        in_ns(container, "ip", "route", "add", "10.213.57.1/32", "dev", "foo0")
        await nl.retire(host, peer)
        await asyncio.sleep(2.5)  # an up interface would have its link-local address by now
        link = await nl.get_link(host)
        assert link is not None
        mac = link.mac.split(":")
        eui = f"{int(mac[0], 16) ^ 2:02x}{mac[1]}:{mac[2]}ff:fe{mac[3]}:{mac[4]}{mac[5]}"
        six = run(
            ["ip", "netns", "exec", container, "ping", "-6", "-c1", "-W1", f"fe80::{eui}%foo0"],
            check=False,
        )
        four = run(
            ["ip", "netns", "exec", container, "ping", "-c1", "-W1", "10.213.57.1"], check=False
        )
        # Sent and unanswered; an exit status alone would also pass with no ping installed
        # (ip netns exec then exits 1 too).
        assert "1 packets transmitted, 0 received" in six.stdout, six.stdout + six.stderr
        assert "1 packets transmitted, 0 received" in four.stdout, four.stdout + four.stderr
        assert not link.up
        assert in_ns(netns, "ip", "-6", "-o", "addr", "show", "dev", host) == ""
    finally:
        run(["ip", "netns", "del", container], check=False)
