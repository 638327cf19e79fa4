"""The hand-built rtnetlink requests for veth pairs (netlink.py), decoded here by a reader
written from the kernel's message layout (include/uapi/linux/rtnetlink.h, if_link.h,
veth.h); the privileged tests send them to a real kernel."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from pydriver.naming import RETIRED_LINK_GROUP
from pydriver.netlink import attach_requests, peer_requests, retire_requests, veth_requests

RTM_NEWLINK, RTM_GETLINK = 16, 18
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
IFF_UP = 1
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER = 1, 3, 4, 10
IFLA_OPERSTATE, IFLA_LINKINFO, IFLA_GROUP, IFLA_EXT_MASK = 16, 18, 27, 29
IF_OPER_DORMANT = 5
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA = 1, 2, 4, 5
VETH_INFO_PEER, IFLA_BRPORT_MODE = 1, 4


def attrs(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        assert length >= 4
        assert kind & 0x3FFF not in found, "an attribute given twice"
        found[kind & 0x3FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    assert offset == len(data), "attributes not padded to 4 bytes"
    return found


def ifinfo(body: bytes) -> tuple[dict[str, Any], dict[int, bytes]]:
    family, _, index, flags, change = struct.unpack_from("=BxHiII", body)
    header = {"family": family, "index": index, "flags": flags, "change": change}
    return header, attrs(body[16:])


def u32(raw: bytes) -> int:
    return int(struct.unpack("=I", raw)[0])


def pyroute2_view(request: tuple[int, int, bytes]) -> ifinfmsg:
    """The same bytes as pyroute2's own parser reads them (an independent reading)."""
    kind, flags, body = request
    message = ifinfmsg(struct.pack("=IHHII", 16 + len(body), kind, flags | 5, 1, 0) + body)
    message.decode()
    return message


def test_a_new_pair_is_created_down_on_no_bridge_its_host_end_dormant_then_read_back() -> None:
    create, *read_back = veth_requests(
        "pyv0123456789ab", "pyc0123456789ab", "02:50:ac:18:00:02", 1400
    )
    kind, flags, body = create
    assert kind == RTM_NEWLINK
    assert flags == NLM_F_CREATE | NLM_F_EXCL  # never takes over an existing interface
    header, top = ifinfo(body)
    assert header == {"family": 0, "index": 0, "flags": 0, "change": 0}  # down, no bridge
    assert top[IFLA_IFNAME] == b"pyv0123456789ab\0"
    assert u32(top[IFLA_MTU]) == 1400
    assert top[IFLA_OPERSTATE] == bytes([IF_OPER_DORMANT])  # not "unknown" (= up to a bridge)
    assert IFLA_MASTER not in top
    info = attrs(top[IFLA_LINKINFO])
    assert info[IFLA_INFO_KIND] == b"veth\0"
    peer_header, peer = ifinfo(attrs(info[IFLA_INFO_DATA])[VETH_INFO_PEER])
    assert peer_header["flags"] == 0
    assert peer[IFLA_IFNAME] == b"pyc0123456789ab\0"
    assert peer[IFLA_ADDRESS] == bytes.fromhex("0250ac180002")
    assert u32(peer[IFLA_MTU]) == 1400
    seen = pyroute2_view(create)
    assert (seen.get_attr("IFLA_IFNAME"), seen.get_attr("IFLA_MTU")) == ("pyv0123456789ab", 1400)
    assert seen.get_attr("IFLA_OPERSTATE") == "DORMANT"
    info_seen = seen.get_attr("IFLA_LINKINFO")
    assert info_seen.get_attr("IFLA_INFO_KIND") == "veth"
    peer_seen = info_seen.get_attr("IFLA_INFO_DATA").get_attr("VETH_INFO_PEER")
    assert peer_seen.get_attr("IFLA_IFNAME") == "pyc0123456789ab"
    assert peer_seen.get_attr("IFLA_ADDRESS") == "02:50:ac:18:00:02"
    # Then both ends are read back (which settles their state on Linux 6.8 and newer).
    for (kind, flags, body), name in zip(read_back, (b"pyv", b"pyc"), strict=True):
        assert (kind, flags) == (RTM_GETLINK, 0)  # one interface, not a dump
        header, read = ifinfo(body)
        assert header["index"] == 0
        assert read[IFLA_IFNAME] == name + b"0123456789ab\0"
        assert IFLA_EXT_MASK in read


def test_a_spare_is_created_with_the_kernel_defaults() -> None:
    (_, _, body), *_ = veth_requests("pys0123456789ab", "pyt0123456789ab", None, None)
    _, top = ifinfo(body)
    assert IFLA_MTU not in top
    _, peer = ifinfo(attrs(attrs(top[IFLA_LINKINFO])[IFLA_INFO_DATA])[VETH_INFO_PEER])
    assert set(peer) == {IFLA_IFNAME}


def test_a_spares_peer_gets_its_mac_and_mtu_and_stays_down() -> None:
    ((kind, flags, body),) = peer_requests(8, "02:11:22:33:44:55", 1300)
    assert (kind, flags) == (RTM_NEWLINK, 0)  # a change, never a creation
    header, settings = ifinfo(body)
    assert header == {"family": 0, "index": 8, "flags": 0, "change": 0}
    assert settings[IFLA_ADDRESS] == bytes.fromhex("021122334455")
    assert u32(settings[IFLA_MTU]) == 1300
    assert u32(settings[IFLA_GROUP]) == 0


def test_attaching_puts_the_host_end_on_the_bridge_up_then_in_hairpin_mode() -> None:
    host, hairpin = attach_requests(7, 3, 1300, hairpin=True)
    assert [(kind, flags) for kind, flags, _ in (host, hairpin)] == [(RTM_NEWLINK, 0)] * 2
    host_header, host_attrs = ifinfo(host[2])
    assert host_header == {"family": 0, "index": 7, "flags": IFF_UP, "change": IFF_UP}
    assert u32(host_attrs[IFLA_MASTER]) == 3
    assert u32(host_attrs[IFLA_MTU]) == 1300
    assert u32(host_attrs[IFLA_GROUP]) == 0
    port_header, port = ifinfo(hairpin[2])
    assert port_header == {"family": 0, "index": 7, "flags": 0, "change": 0}
    info = attrs(port[IFLA_LINKINFO])
    assert info[IFLA_INFO_SLAVE_KIND] == b"bridge\0"
    assert attrs(info[IFLA_INFO_SLAVE_DATA]) == {IFLA_BRPORT_MODE: b"\x01"}
    seen = pyroute2_view(hairpin).get_attr("IFLA_LINKINFO")
    assert seen.get_attr("IFLA_INFO_SLAVE_KIND") == "bridge"
    (internal,) = attach_requests(7, 3, None, hairpin=False)  # --internal: no hairpin
    assert set(ifinfo(internal[2])[1]) == {IFLA_MASTER, IFLA_GROUP}


def test_retiring_takes_the_host_end_off_its_bridge_and_both_ends_down_into_the_group() -> None:
    host, peer = retire_requests(7, 8)
    host_header, host_attrs = ifinfo(host[2])
    assert host_header == {"family": 0, "index": 7, "flags": 0, "change": IFF_UP}  # down
    assert u32(host_attrs[IFLA_MASTER]) == 0
    assert u32(host_attrs[IFLA_GROUP]) == RETIRED_LINK_GROUP
    peer_header, peer_attrs = ifinfo(peer[2])
    assert peer_header == {"family": 0, "index": 8, "flags": 0, "change": IFF_UP}
    assert set(peer_attrs) == {IFLA_GROUP}
    assert u32(peer_attrs[IFLA_GROUP]) == RETIRED_LINK_GROUP
    # An end that is gone (the container's, in a namespace being destroyed) is left out.
    assert [ifinfo(body)[0]["index"] for _, _, body in retire_requests(7, None)] == [7]
    assert [ifinfo(body)[0]["index"] for _, _, body in retire_requests(None, 8)] == [8]


@pytest.mark.parametrize(
    "build",
    [
        lambda: peer_requests(0, "02:11:22:33:44:55", None),
        lambda: attach_requests(0, 3, None, hairpin=True),
        lambda: attach_requests(7, 0, None, hairpin=False),
        lambda: retire_requests(0, 8),
        lambda: retire_requests(7, -1),
    ],
)
def test_no_change_is_built_without_an_interface_index(build: Callable[[], object]) -> None:
    """Index 0 with no name would be a change to every interface of the group the message
    names: group 0 is every ordinary interface of the host."""
    with pytest.raises(ValueError, match="names no interface"):
        build()
