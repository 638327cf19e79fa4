"""Kernel names and MAC addresses derived from Docker's ids."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from pydriver import naming as n
from pydriver.options import valid_interface_name

from .fakes import hexid

IDS = [hexid(f"id-{i}") for i in range(50)] + ["0" * 64, "f" * 64]
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@pytest.mark.parametrize("fn", [n.bridge_name, n.host_veth_name, n.container_veth_name])
def test_names_fit_linux_and_are_deterministic(fn: Callable[[str], str]) -> None:
    for identifier in IDS:
        name = fn(identifier)
        assert len(name) <= 15
        assert valid_interface_name(name)
        assert fn(identifier) == name


def test_names_use_the_id_prefix() -> None:
    identifier = hexid("x")
    assert n.bridge_name(identifier) == "pyb-" + identifier[:11]
    assert n.host_veth_name(identifier) == "pyv" + identifier[:12]
    assert n.container_veth_name(identifier) == "pyc" + identifier[:12]
    assert len(n.bridge_name(identifier)) == 15
    assert len(n.host_veth_name(identifier)) == 15
    assert len(n.container_veth_name(identifier)) == 15


def test_host_and_container_ends_differ() -> None:
    for identifier in IDS:
        assert n.host_veth_name(identifier) != n.container_veth_name(identifier)
    assert len({n.host_veth_name(i) for i in IDS}) == len(IDS)


def test_prefixes_are_recognised() -> None:
    identifier = hexid("y")
    assert n.is_pybridge_bridge(n.bridge_name(identifier))
    assert n.is_pybridge_veth(n.host_veth_name(identifier))
    assert n.is_pybridge_veth(n.container_veth_name(identifier))
    assert not n.is_pybridge_veth(n.bridge_name(identifier))
    for foreign in ("docker0", "br-0123456789ab", "veth1a2b3c4", "eth0", "recbr", "lo"):
        assert not n.is_pybridge_bridge(foreign)
        assert not n.is_pybridge_veth(foreign)
    # a veth prefix alone is not enough: ours are always 15 characters
    assert not n.is_pybridge_veth("pyv0")
    assert not n.is_pybridge_veth("pycnic")


def test_macs_are_locally_administered_unicast_and_deterministic() -> None:
    macs = set()
    for identifier in IDS:
        for fn in (n.endpoint_mac, n.bridge_mac):
            mac = fn(identifier)
            assert MAC_RE.match(mac), mac
            first = int(mac.split(":")[0], 16)
            assert first & 0x02, "locally administered bit must be set"
            assert not first & 0x01, "must be unicast"
            assert fn(identifier) == mac
            macs.add(mac)
    # endpoint and bridge MACs of the same id differ, and ids do not collide
    assert len(macs) == 2 * len(IDS)


def test_mac_is_not_all_zero_or_broadcast() -> None:
    for identifier in IDS:
        assert n.endpoint_mac(identifier) not in ("00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff")


def test_endpoint_mac_follows_the_address() -> None:
    import ipaddress

    assert n.endpoint_mac("ab" * 32, ipaddress.ip_address("172.18.0.2")) == "02:50:ac:12:00:02"
    assert n.endpoint_mac("cd" * 32, ipaddress.ip_address("172.18.0.2")) == "02:50:ac:12:00:02"
    # IPv6: a hash of the whole address, the same for any endpoint id
    v6 = n.endpoint_mac("ab" * 32, ipaddress.ip_address("fd00::1:2"))
    assert v6 == n.endpoint_mac("cd" * 32, ipaddress.ip_address("fd00::1:2"))
    assert MAC_RE.match(v6)
    assert v6.startswith("02:")


def test_ipv6_macs_use_the_whole_address() -> None:
    import ipaddress

    # Addresses that differ only above their low 32 bits (another /64, or the upper half of
    # the interface id, as SLAAC-like or --ip6 addresses do) must not share a MAC.
    addresses = [
        ipaddress.ip_address(a)
        for a in ("fd00:1::1:2", "fd00:2::1:2", "fd00:1::1:0:1:2", "fd00:1:0:0:8000::1:2")
    ]
    macs = [n.endpoint_mac("ab" * 32, a) for a in addresses]
    assert len(set(macs)) == len(macs)
    assert all(MAC_RE.match(m) and int(m[:2], 16) & 0x02 and not int(m[:2], 16) & 1 for m in macs)


def test_mac_attempts_give_a_fixed_sequence_of_other_macs() -> None:
    import ipaddress

    for text in ("172.18.0.2", "fd00::1:2"):
        address = ipaddress.ip_address(text)
        sequence = [n.endpoint_mac("ab" * 32, address, attempt) for attempt in range(10)]
        assert len(set(sequence)) == 10
        assert sequence == [n.endpoint_mac("cd" * 32, address, a) for a in range(10)]
    assert n.endpoint_mac("ab" * 32, None, 1) != n.endpoint_mac("ab" * 32, None)
