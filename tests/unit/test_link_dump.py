"""The hand-written parser of link dumps (netlink.py), on messages built here."""

from __future__ import annotations

import socket
import struct

from pydriver.model import Link
from pydriver.netlink import _parse_link


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
