"""The hand-written parser of link dumps (netlink.py), on messages built here."""

from __future__ import annotations

import socket
import struct

from pydriver.model import Link
from pydriver.netlink import Flow, _parse_link, parse_flow


def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def link_message(index: int, flags: int, *attrs: bytes) -> bytes:
    return struct.pack("=BxHiII", socket.AF_UNSPEC, 1, index, flags, 0) + b"".join(attrs)


def test_a_veth_on_a_bridge() -> None:
    body = link_message(
        7,
        1,  # IFF_UP
        attr(3, b"pyv0123456789ab\0"),
        attr(4, struct.pack("=I", 1400)),
        attr(1, bytes.fromhex("0250ac180002")),
        attr(10, struct.pack("=I", 5)),
        attr(18 | 0x8000, attr(1, b"veth\0")),  # IFLA_LINKINFO, flagged nested
    )
    assert _parse_link(body, 0, len(body)) == Link(
        index=7,
        name="pyv0123456789ab",
        kind="veth",
        master=5,
        mtu=1400,
        up=True,
        mac="02:50:ac:18:00:02",
    )


def test_missing_attributes_and_odd_names() -> None:
    body = link_message(1, 0, attr(3, b"caf\xe9\0"))
    link = _parse_link(body, 0, len(body))
    assert (link.kind, link.master, link.mtu, link.up, link.mac) == (None, None, 0, False, "")
    assert link.name == "caf\udce9"  # not UTF-8: kept, never a crash


# -- connection-tracking entries --------------------------------------------------------------

NESTED = 0x8000


def ct_tuple(source: bytes, destination: bytes, v6: bool = False) -> bytes:
    ip = attr(3 if v6 else 1, source) + attr(4 if v6 else 2, destination)
    proto = attr(1, bytes([17])) + attr(2, struct.pack("!H", 5000)) + attr(3, b"\x13\x88")
    return attr(1 | NESTED, ip) + attr(2 | NESTED, proto)


def test_a_flow_gives_its_sources_and_the_attributes_that_name_it() -> None:
    original = attr(1 | NESTED, ct_tuple(bytes([10, 0, 0, 2]), bytes([192, 0, 2, 9])))
    reply = attr(2 | NESTED, ct_tuple(bytes([192, 0, 2, 9]), bytes([192, 0, 2, 1])))
    status = attr(3, struct.pack("!I", 0x18E))
    flow_id = attr(12, struct.pack("!I", 0xDEADBEEF))
    zone = attr(18, struct.pack("!H", 7))
    body = struct.pack("=BBH", socket.AF_INET, 0, 0) + original + reply + status + flow_id + zone
    flow = parse_flow(body, 0, len(body))
    assert flow == Flow(bytes([10, 0, 0, 2]), bytes([192, 0, 2, 9]), original + flow_id + zone)


def test_an_ipv6_flow() -> None:
    a, b = (
        socket.inet_pton(socket.AF_INET6, "fd00::2"),
        socket.inet_pton(socket.AF_INET6, "fd00::9"),
    )
    original = attr(1 | NESTED, ct_tuple(a, b, v6=True))
    reply = attr(2 | NESTED, ct_tuple(b, a, v6=True))
    body = struct.pack("=BBH", socket.AF_INET6, 0, 0) + original + reply
    assert parse_flow(body, 0, len(body)) == Flow(a, b, original)


def test_a_truncated_flow_keeps_what_is_whole() -> None:
    original = attr(1 | NESTED, ct_tuple(bytes([10, 0, 0, 2]), bytes([192, 0, 2, 9])))
    body = struct.pack("=BBH", socket.AF_INET, 0, 0) + original + attr(2 | NESTED, b"x" * 40)
    flow = parse_flow(body, 0, len(body) - 8)
    assert flow == Flow(bytes([10, 0, 0, 2]), b"", original)
