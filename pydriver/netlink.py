"""The kernel adapter: the only module that imports pyroute2.

Every ``ensure_*`` is idempotent (EEXIST is success) and every ``remove_*`` treats "already
gone" as success, so any operation can be replayed after a crash.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import os
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import AsyncIPRoute
from pyroute2.conntrack import AsyncConntrack, NFCTAttrTuple
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netns import create_socket

from .errors import BridgeFull, Conflict, HostError
from .interfaces import MAX_BRIDGE_PORTS
from .model import Family, HostRoute, IPAddress, IPInterface, IPNetwork, Link
from .naming import RETIRED_LINK_GROUP
from .tunnel import FLOOD_MAC, Step, TunnelEntries

log = logging.getLogger(__name__)
T = TypeVar("T")


def _address_family(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


IFA_F_NODAD = 0x02
MAIN_TABLE = 254
_RT_UNICAST = 1


def _kind(msg: Any) -> str | None:
    info = msg.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def _link(msg: Any) -> Link:
    return Link(
        index=msg["index"],
        name=msg.get_attr("IFLA_IFNAME"),
        kind=_kind(msg),
        master=msg.get_attr("IFLA_MASTER"),
        mtu=msg.get_attr("IFLA_MTU") or 0,
        up=bool(msg["flags"] & 1),
        mac=msg.get_attr("IFLA_ADDRESS") or "",
        group=msg.get_attr("IFLA_GROUP") or 0,
    )


# A link dump parsed by hand: pyroute2 decodes every attribute of every message (about a
# millisecond per link), which made start-up with a few thousand interfaces take seconds.
# Only the header and the handful of attributes a Link needs are read here.
_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_RTA = struct.Struct("=HH")  # length, type
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_RTM_NEWLINK, _RTM_GETLINK = 16, 18
_NLM_F_REQUEST, _NLM_F_DUMP, _NLM_F_DUMP_INTR = 0x1, 0x300, 0x10
_IFLA_ADDRESS, _IFLA_IFNAME, _IFLA_MTU, _IFLA_MASTER = 1, 3, 4, 10
_IFLA_LINKINFO, _IFLA_INFO_KIND, _IFLA_GROUP, _IFLA_EXT_MASK = 18, 1, 27, 29
_RTEXT_FILTER_SKIP_STATS = 1 << 3
_NTF_SELF = 0x02
_NUD_NOARP, _NUD_PERMANENT = 0x40, 0x80


def _attributes(data: bytes, start: int, end: int) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    while start + 4 <= end:
        length, kind = _RTA.unpack_from(data, start)
        if length < 4:
            break
        found[kind & 0x3FFF] = data[start + 4 : start + length]  # without NLA_F_NESTED etc.
        start += (length + 3) & ~3
    return found


def _parse_link(data: bytes, start: int, end: int) -> Link:
    _, _, index, flags, _ = _IFINFO.unpack_from(data, start)
    attrs = _attributes(data, start + _IFINFO.size, end)
    info = attrs.get(_IFLA_LINKINFO)
    kind_raw = _attributes(info, 0, len(info)).get(_IFLA_INFO_KIND) if info else None
    master = attrs.get(_IFLA_MASTER)
    mtu = attrs.get(_IFLA_MTU)
    group = attrs.get(_IFLA_GROUP)
    return Link(
        index=index,
        name=attrs.get(_IFLA_IFNAME, b"").split(b"\0", 1)[0].decode(errors="surrogateescape"),
        kind=kind_raw.split(b"\0", 1)[0].decode() if kind_raw else None,
        master=(struct.unpack("=I", master)[0] or None) if master else None,
        mtu=struct.unpack("=I", mtu)[0] if mtu else 0,
        up=bool(flags & 1),
        mac=":".join(f"{b:02x}" for b in attrs.get(_IFLA_ADDRESS, b"")),
        group=struct.unpack("=I", group)[0] if group else 0,
    )


def dump_links() -> list[Link]:
    """Every interface of this process's network namespace (blocking; a few ms per thousand).

    A dump that interfaces came or went during is marked by the kernel and taken again: an
    interface missing from it would look deleted."""
    ext_mask = _RTA.pack(8, _IFLA_EXT_MASK) + struct.pack("=I", _RTEXT_FILTER_SKIP_STATS)
    request = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + ext_mask
    return _dump("interfaces", _RTM_GETLINK, request, _RTM_NEWLINK, _parse_link)


# Routes, likewise by hand (pyroute2 takes 40-60 microseconds a route: 500 networks' routes,
# read for every new network's overlap check, cost 20-30 ms).
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope,
# type, flags
_RTNH = struct.Struct("=HBBi")  # length, flags, hops, ifindex
_RTM_NEWROUTE, _RTM_GETROUTE = 24, 26
_RTA_DST, _RTA_OIF, _RTA_MULTIPATH, _RTA_TABLE = 1, 4, 9, 15


def _parse_route(data: bytes, start: int, end: int) -> list[tuple[IPNetwork, int, int, int]]:
    """(destination, output interface index, table, type) per next hop of one route."""
    family, dst_len, _, _, table, _, _, kind, _ = _RTMSG.unpack_from(data, start)
    attrs = _attributes(data, start + _RTMSG.size, end)
    if _RTA_TABLE in attrs:
        table = struct.unpack("=I", attrs[_RTA_TABLE])[0]
    raw_dst = attrs.get(_RTA_DST)
    size = 4 if family == socket.AF_INET else 16
    address = ipaddress.ip_address(raw_dst if raw_dst else bytes(size))
    destination = ipaddress.ip_network(f"{address}/{dst_len}", strict=False)
    oifs: list[int] = []
    multipath = attrs.get(_RTA_MULTIPATH)
    if multipath:
        offset = 0
        while offset + _RTNH.size <= len(multipath):
            length, _, _, ifindex = _RTNH.unpack_from(multipath, offset)
            if length < _RTNH.size:
                break
            oifs.append(ifindex)
            offset += (length + 3) & ~3
    if not oifs:
        oif = attrs.get(_RTA_OIF)
        oifs = [struct.unpack("=i", oif)[0] if oif else 0]
    return [(destination, oif, table, kind) for oif in oifs]


def dump_routes(
    overlapping: Sequence[IPNetwork] | None = None,
) -> list[tuple[IPNetwork, int, int, int]]:
    """Every route of this process's network namespace, both families: (destination, output
    interface index, table, type) per next hop (blocking; about a millisecond per thousand).
    With ``overlapping``, only the routes that overlap one of those networks, and the default
    routes: the others are passed over before their destinations are decoded (at 1,000
    networks, decoding every one took 12 ms)."""
    parse = _parse_route
    if overlapping is not None:
        targets = [(n.version, int(n.network_address), n.prefixlen) for n in overlapping]

        def parse(data: bytes, start: int, end: int) -> list[tuple[IPNetwork, int, int, int]]:
            # rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type: the main
            # table (254) fits in the header, the local table's routes (one or two per
            # address) are not wanted.
            family, dst_len, table, kind = (
                data[start],
                data[start + 1],
                data[start + 4],
                data[start + 7],
            )
            if table != MAIN_TABLE or kind != _RT_UNICAST:
                return []
            if dst_len and not _overlaps_any(
                _destination(data, start, end), family, dst_len, targets
            ):
                return []
            return _parse_route(data, start, end)

    found: list[tuple[IPNetwork, int, int, int]] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        request = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        for hops in _dump("routes", _RTM_GETROUTE, request, _RTM_NEWROUTE, parse):
            found += hops
    return found


def _destination(data: bytes, start: int, end: int) -> bytes:
    """A route message's RTA_DST, found without decoding its other attributes."""
    start += _RTMSG.size
    while start + 4 <= end:
        length, kind = _RTA.unpack_from(data, start)
        if length < 4:
            break
        if kind & 0x3FFF == _RTA_DST:
            return data[start + 4 : start + length]
        start += (length + 3) & ~3
    return b""


def _overlaps_any(
    destination: bytes, family: int, dst_len: int, targets: Sequence[tuple[int, int, int]]
) -> bool:
    """Whether a route's destination overlaps one of ``targets`` (version, address, prefix
    length): the shorter of the two prefixes names the same addresses in both."""
    version, bits = (4, 32) if family == socket.AF_INET else (6, 128)
    value = int.from_bytes(destination, "big") if destination else 0
    for target_version, address, length in targets:
        shift = bits - min(dst_len, length)
        if target_version == version and value >> shift == address >> shift:
            return True
    return False


def _dump(
    what: str,
    request_type: int,
    request: bytes,
    answer_type: int,
    parse: Callable[[bytes, int, int], T],
    protocol: int = socket.NETLINK_ROUTE,
) -> list[T]:
    try:
        for _ in range(4):
            items, interrupted = _dump_once(
                what, request_type, request, answer_type, parse, protocol
            )
            if not interrupted:
                return items
    except (OSError, ValueError, struct.error) as err:  # ValueError: UnicodeDecodeError too
        raise HostError(f"could not list {what}: {err}") from None
    raise HostError(f"could not list {what}: they kept changing during four attempts")


def _dump_once(
    what: str,
    request_type: int,
    request: bytes,
    answer_type: int,
    parse: Callable[[bytes, int, int], T],
    protocol: int,
) -> tuple[list[T], bool]:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol) as sock:
        sock.settimeout(10)
        sock.bind((0, 0))
        header = _NLMSG.pack(
            _NLMSG.size + len(request), request_type, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
        )
        sock.send(header + request)
        items: list[T] = []
        interrupted = False
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, flags, _, _ = _NLMSG.unpack_from(data, offset)
                if length < _NLMSG.size or offset + length > len(data):
                    raise HostError(f"could not list {what}: malformed netlink answer")
                interrupted = interrupted or bool(flags & _NLM_F_DUMP_INTR)
                if kind in (_NLMSG_DONE, _NLMSG_ERROR):
                    # Both carry an error code (0 or minus errno); a failed dump ends with one.
                    code = 0
                    if length >= _NLMSG.size + 4:
                        code = -struct.unpack_from("=i", data, offset + _NLMSG.size)[0]
                    if code:
                        raise HostError(f"could not list {what}: {os.strerror(code)}")
                    if kind == _NLMSG_DONE:
                        return items, interrupted
                if kind == answer_type:
                    items.append(parse(data, offset + _NLMSG.size, offset + length))
                offset += (length + 3) & ~3


# Connection tracking, likewise by hand: pyroute2 takes about 50 microseconds an entry, and
# the whole table is read to find a removed endpoint's flows (a kernel-side filter matches one
# address per walk of the whole hash table, ~10 ms however few entries there are).
_NETLINK_NETFILTER = 12
_NFGEN = struct.Struct("=BBH")  # family, version, resource id
_CT_NEW, _CT_GET, _CT_DELETE = 0x100, 0x101, 0x102  # NFNL_SUBSYS_CTNETLINK << 8 | message
_NLM_F_ACK = 0x4
_CTA_TUPLE_ORIG, _CTA_TUPLE_REPLY, _CTA_ID, _CTA_ZONE = 1, 2, 12, 18
_CTA_TUPLE_IP = 1
_CTA_IP_SRC: dict[int, int] = {socket.AF_INET: 1, socket.AF_INET6: 3}


@dataclass(frozen=True)
class Flow:
    """A conntrack entry as far as forgetting it goes: the source addresses of its two
    directions, and the attributes that name it in a delete request (its original tuple, zone
    and id, as the kernel gave them)."""

    original_source: bytes
    reply_source: bytes
    key: bytes


def _tuple_source(body: bytes, family: int) -> bytes:
    ip = _attributes(body, 0, len(body)).get(_CTA_TUPLE_IP)
    return _attributes(ip, 0, len(ip)).get(_CTA_IP_SRC.get(family, 0), b"") if ip else b""


def _starts_with_original_tuple(key: bytes) -> bool:
    if len(key) < _RTA.size:
        return False
    length, kind = _RTA.unpack_from(key, 0)
    return bool(kind & 0x3FFF == _CTA_TUPLE_ORIG and length > _RTA.size)


def parse_flow(data: bytes, start: int, end: int) -> Flow:
    family = data[start]
    original = reply = key = b""
    offset = start + _NFGEN.size
    while offset + 4 <= end:
        length, kind = _RTA.unpack_from(data, offset)
        if length < 4 or offset + length > end:
            break
        kind &= 0x3FFF
        if kind == _CTA_TUPLE_ORIG:
            original = _tuple_source(data[offset + 4 : offset + length], family)
        elif kind == _CTA_TUPLE_REPLY:
            reply = _tuple_source(data[offset + 4 : offset + length], family)
        if kind in (_CTA_TUPLE_ORIG, _CTA_ID, _CTA_ZONE):
            key += data[offset : offset + length] + bytes(-length % 4)
        offset += (length + 3) & ~3
    return Flow(original, reply, key)


def dump_flows(family: int) -> list[Flow]:
    """Every conntrack entry of ``family`` in this process's network namespace (blocking;
    about 10 ms for the walk of the kernel's hash table, a few microseconds an entry). The
    kernel walks it with softirqs held off on its CPU, which delays that CPU's disk and network
    completions meanwhile: only for kernels without the filtered flush (flush_flows)."""
    request = _NFGEN.pack(family, 0, 0)
    return _dump(
        "connection-tracking entries",
        _CT_GET,
        request,
        _CT_NEW,
        parse_flow,
        _NETLINK_NETFILTER,
    )


_CTA_FILTER, _CTA_FILTER_ORIG_FLAGS, _CTA_FILTER_REPLY_FLAGS = 25, 1, 2
_CTA_FILTER_FLAG_IP_SRC = 1
_NLA_F_NESTED = 0x8000


def _nla(kind: int, payload: bytes) -> bytes:
    length = _RTA.size + len(payload)
    return _RTA.pack(length, kind) + payload + bytes(-length % 4)


def flush_flows(family: int, source: bytes) -> bool:
    """Delete every IPv4 conntrack entry with ``source`` as the source of either direction, by
    the kernel's filtered flush (blocking; Linux 6.12 and newer): it visits the table bucket by
    bucket, without the dump's long stretch with softirqs held off on one CPU (which made
    the host's disk and network wait about 10 ms per walk). False if the kernel does not know
    the filtered flush: it then reads the request as one exact entry and refuses it. Not for
    IPv6: there the kernel's filter (6.18 still) matches the addresses that differ."""
    if family != socket.AF_INET:
        raise ValueError("the kernel's filtered flush is only right for IPv4")
    ip = _nla(_CTA_TUPLE_IP | _NLA_F_NESTED, _nla(_CTA_IP_SRC[family], source))
    requests = b""
    for sequence, (tuple_kind, flags_kind) in enumerate(
        ((_CTA_TUPLE_ORIG, _CTA_FILTER_ORIG_FLAGS), (_CTA_TUPLE_REPLY, _CTA_FILTER_REPLY_FLAGS)),
        start=1,
    ):
        flags = _nla(flags_kind, struct.pack("=I", _CTA_FILTER_FLAG_IP_SRC))
        body = (
            # Version 1: the kernel keeps the family for the filter (with version 0 and a
            # partial backport, a filter without its family would match every entry).
            _NFGEN.pack(family, 1, 0)
            + _nla(tuple_kind | _NLA_F_NESTED, ip)
            + _nla(_CTA_FILTER | _NLA_F_NESTED, flags)
        )
        requests += _NLMSG.pack(
            _NLMSG.size + len(body), _CT_DELETE, _NLM_F_REQUEST | _NLM_F_ACK, sequence, 0
        )
        requests += body
    try:
        codes = _requests(requests, 2)
    except OSError as err:
        raise HostError(str(err)) from None
    if codes[0] in (errno.EINVAL, errno.EOPNOTSUPP):
        return False
    for code in codes:
        if code not in (0, errno.ENOENT):
            raise HostError(os.strerror(code))
    return True


def _acknowledgements(sock: socket.socket, first: int, last: int) -> list[int]:
    """The error codes (0: done) the kernel answers requests ``first``..``last`` (sequence
    numbers) with, in order; other answers (replies to a read, late ones) are passed over."""
    codes: dict[int, int] = {}
    while len(codes) < last - first + 1:
        data = sock.recv(1 << 16)
        offset = 0
        while offset + _NLMSG.size <= len(data):
            length, kind, _, sequence, _ = _NLMSG.unpack_from(data, offset)
            if length < _NLMSG.size or offset + length > len(data):
                raise OSError("malformed netlink answer")
            if kind == _NLMSG_ERROR and first <= sequence <= last:
                codes[sequence] = -struct.unpack_from("=i", data, offset + _NLMSG.size)[0]
            offset += (length + 3) & ~3
    return [codes[n] for n in sorted(codes)]


def _requests(requests: bytes, count: int) -> list[int]:
    """Send netlink requests (sequence numbers 1..count) that each want an acknowledgement;
    their error codes, in order."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER) as sock:
        sock.settimeout(10)
        sock.bind((0, 0))
        sock.send(requests)
        return _acknowledgements(sock, 1, count)


def delete_flows(family: int, flows: Sequence[Flow]) -> int:
    """Delete ``flows`` (blocking); returns how many were still there."""
    # A delete request without the entry's original tuple is a flush of the whole table.
    flows = [f for f in flows if _starts_with_original_tuple(f.key)]
    deleted = 0
    for first in range(0, len(flows), 64):  # a batch of requests per send
        batch = flows[first : first + 64]
        requests = b"".join(
            _NLMSG.pack(
                _NLMSG.size + _NFGEN.size + len(flow.key),
                _CT_DELETE,
                _NLM_F_REQUEST | _NLM_F_ACK,
                n,
                0,
            )
            + _NFGEN.pack(family, 0, 0)
            + flow.key
            for n, flow in enumerate(batch, start=1)
        )
        try:
            codes = _requests(requests, len(batch))
        except OSError as err:
            raise HostError(str(err)) from None
        for code in codes:
            if code not in (0, errno.ENOENT):  # ENOENT: gone meanwhile, fine
                raise HostError(os.strerror(code))
        deleted += codes.count(0)
    return deleted


# Veth pairs, likewise by hand, each step in one send: pyroute2 sends requests one by one,
# each encoded, awaited and its answer decoded in Python (about a millisecond of a
# CreateEndpoint for three). The kernel handles the messages of one send in order, each under
# its own rtnl lock, and acknowledges each.
_NLM_F_ACK_REQUEST = _NLM_F_REQUEST | _NLM_F_ACK
_NLM_F_EXCL, _NLM_F_CREATE = 0x200, 0x400
_IFF_UP = 0x1
_IFLA_INFO_DATA, _IFLA_INFO_SLAVE_KIND, _IFLA_INFO_SLAVE_DATA = 2, 4, 5
_VETH_INFO_PEER, _IFLA_BRPORT_MODE = 1, 4
_IFLA_OPERSTATE, _IF_OPER_DORMANT = 16, 5

Request = tuple[int, int, bytes]  # message type, flags besides request and ack, body


def _u32(kind: int, value: int) -> bytes:
    return _nla(kind, struct.pack("=I", value))


def _ifname(name: str) -> bytes:
    return _nla(_IFLA_IFNAME, name.encode() + b"\0")


def _mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"{mac!r} is not a MAC address")
    return raw


def _ifinfo(index: int, *attributes: bytes, up: bool | None = None) -> bytes:
    """An interface message; ``up``: bring it up (True) or down (False)."""
    flags, change = (0, 0) if up is None else (_IFF_UP if up else 0, _IFF_UP)
    return _IFINFO.pack(socket.AF_UNSPEC, 0, index, flags, change) + b"".join(attributes)


def veth_requests(host: str, peer: str, peer_mac: str | None, mtu: int | None) -> list[Request]:
    """Create a veth pair, both ends down and on no bridge, the host end "dormant".

    A new veth's operational state is "unknown" until the kernel's link watcher, up to a
    second later, sees its carrier is off; and a bridge takes "unknown" for "up". A pair put on
    a bridge meanwhile forwarded without a carrier, and the watcher took it out again later
    under the rtnl lock, walking every port of the bridge for each such port (10-45 ms with
    1,000 ports, every interface change on the host waiting behind it). "Dormant" is not up
    for the bridge; the watcher replaces it with the real state (up once the container's end
    is), as it does "unknown". Every kernel takes it at creation (rtnl_create_link)."""
    mtu_attr = _u32(_IFLA_MTU, mtu) if mtu else b""
    mac_attr = _nla(_IFLA_ADDRESS, _mac_bytes(peer_mac)) if peer_mac else b""
    peer_info = _ifinfo(0, _ifname(peer), mac_attr, mtu_attr)
    info = _nla(_IFLA_INFO_KIND, b"veth\0") + _nla(
        _IFLA_INFO_DATA | _NLA_F_NESTED, _nla(_VETH_INFO_PEER, peer_info)
    )
    dormant = _nla(_IFLA_OPERSTATE, bytes([_IF_OPER_DORMANT]))
    linkinfo = _nla(_IFLA_LINKINFO | _NLA_F_NESTED, info)
    create = _ifinfo(0, _ifname(host), mtu_attr, dormant, linkinfo)
    # Read back (Linux 6.8 and newer: rtnl_getlink settles the state, then and there): the
    # watcher has nothing left to do for the pair later, when the host end is up on a bridge
    # and each of its changes costs an RCU grace period under the rtnl lock.
    skip_stats = _u32(_IFLA_EXT_MASK, _RTEXT_FILTER_SKIP_STATS)
    return [
        (_RTM_NEWLINK, _NLM_F_CREATE | _NLM_F_EXCL, create),
        (_RTM_GETLINK, 0, _ifinfo(0, _ifname(host), skip_stats)),
        (_RTM_GETLINK, 0, _ifinfo(0, _ifname(peer), skip_stats)),
    ]


def _changing(index: int) -> int:
    # A change request without an index (0) and without a name would apply to every
    # interface of the group it names (rtnl_group_changelink).
    if index <= 0:
        raise ValueError(f"interface index {index} names no interface")
    return index


def peer_requests(peer_index: int, peer_mac: str, mtu: int | None) -> list[Request]:
    """Give a spare's container end the MAC and MTU a new pair is made with, out of any
    interface group (RETIRED_LINK_GROUP). Sent on its own: in one send with the host end's,
    a refused MAC (the kernel's EADDRNOTAVAIL) would still let the host end join the bridge."""
    mtu_attr = _u32(_IFLA_MTU, mtu) if mtu else b""
    settings = _ifinfo(
        _changing(peer_index),
        _nla(_IFLA_ADDRESS, _mac_bytes(peer_mac)),
        mtu_attr,
        _u32(_IFLA_GROUP, 0),
    )
    return [(_RTM_NEWLINK, 0, settings)]


def attach_requests(
    host_index: int, master_index: int, mtu: int | None, *, hairpin: bool
) -> list[Request]:
    """Put a pair's host end (its MTU, out of any interface group) on the bridge and up;
    then, a port of that bridge by now, in hairpin mode."""
    mtu_attr = _u32(_IFLA_MTU, mtu) if mtu else b""
    host = _ifinfo(
        _changing(host_index),
        _u32(_IFLA_MASTER, _changing(master_index)),
        mtu_attr,
        _u32(_IFLA_GROUP, 0),
        up=True,
    )
    requests: list[Request] = [(_RTM_NEWLINK, 0, host)]
    if hairpin:
        # As `ip link set HOST type bridge_slave hairpin on` (and pyroute2's brport) ask it.
        port = _nla(_IFLA_BRPORT_MODE, b"\x01")
        info = _nla(_IFLA_INFO_SLAVE_KIND, b"bridge\0") + _nla(
            _IFLA_INFO_SLAVE_DATA | _NLA_F_NESTED, port
        )
        requests.append(
            (_RTM_NEWLINK, 0, _ifinfo(host_index, _nla(_IFLA_LINKINFO | _NLA_F_NESTED, info)))
        )
    return requests


def retire_requests(host_index: int | None, peer_index: int | None) -> list[Request]:
    """Take a pair's host end off its bridge, and both ends down and into RETIRED_LINK_GROUP
    (an end that is not there, None, is left out)."""
    group = _u32(_IFLA_GROUP, RETIRED_LINK_GROUP)
    requests: list[Request] = []
    if host_index is not None:
        requests.append(
            (
                _RTM_NEWLINK,
                0,
                _ifinfo(_changing(host_index), _u32(_IFLA_MASTER, 0), group, up=False),
            )
        )
    if peer_index is not None:
        requests.append((_RTM_NEWLINK, 0, _ifinfo(_changing(peer_index), group, up=False)))
    return requests


class _RouteSocket:
    """A plain rtnetlink socket (blocking) for batches of requests that want acknowledgements,
    kept open in the namespace it was made in."""

    def __init__(self, netns: str | None) -> None:
        if netns is None:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        else:  # made by a child process that enters the namespace (pyroute2)
            self._sock = create_socket(
                netns, socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE, flags=0
            )
        self._sock.settimeout(10)
        self._sock.bind((0, 0))
        self._sequence = 0

    def close(self) -> None:
        self._sock.close()

    def requests(self, requests: Sequence[Request]) -> list[int]:
        """Send the requests at once; their error codes (0: done), in order. Answers to
        an earlier batch (one that timed out) are told apart by their sequence numbers."""
        if self._sequence + len(requests) > 0xFFFFFFFF:
            self._sequence = 0
        first = self._sequence + 1
        self._sequence += len(requests)
        self._sock.send(
            b"".join(
                _NLMSG.pack(_NLMSG.size + len(body), kind, _NLM_F_ACK_REQUEST | flags, first + n, 0)
                + body
                for n, (kind, flags, body) in enumerate(requests)
            )
        )
        return _acknowledgements(self._sock, first, self._sequence)


def _follow(follower: asyncio.Future[int], leader: asyncio.Future[int]) -> None:
    """Give ``follower`` the outcome of ``leader`` (asked for the same address)."""
    if follower.done():
        return
    if leader.cancelled():
        follower.cancel()
    elif leader.exception() is not None:
        follower.set_exception(leader.exception())  # type: ignore[arg-type]
    else:
        follower.set_result(leader.result())


def _observed(future: asyncio.Future[int]) -> None:
    """A failure nobody awaited any more (a caller that was cancelled) is not logged as
    "never retrieved": its waiters got it."""
    if not future.cancelled():
        future.exception()


def _describe(err: NetlinkError) -> str:
    try:
        return os.strerror(err.code)
    except (TypeError, ValueError):
        return str(err)


class _NetlinkCore:
    """The netlink socket and every call on it. Runs on the netlink thread's own event loop
    (see Netlink): calls are serialised (they are short)."""

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns
        self._ipr: AsyncIPRoute | None = None
        # One conntrack socket per family: the family is fixed per socket (pyroute2's
        # nfgen_family), and the kernel refuses an IPv6 filter on an IPv4 one (EINVAL).
        self._conntrack: dict[int, AsyncConntrack] = {}
        # One dump at a time per netlink socket (one socket per family): the kernel answers a
        # second one with EBUSY (and opening a socket is not to be raced either).
        self._conntrack_locks: dict[int, asyncio.Lock] = {
            socket.AF_INET: asyncio.Lock(),
            socket.AF_INET6: asyncio.Lock(),
        }
        # Per family: False once the kernel turned down a filtered conntrack flush.
        self._filtered_flush: dict[int, bool] = {}
        # Addresses whose flows are to go, per family, each with what its caller waits for.
        self._flows_wanted: dict[int, dict[IPAddress, asyncio.Future[int]]] = {}
        self._lock = asyncio.Lock()
        self._route: _RouteSocket | None = None

    async def open(self) -> None:
        if self._ipr is None:
            # groups=0: no multicast subscriptions. Otherwise every link and address change on
            # the host (Docker moving interfaces around) is received and parsed for nothing.
            kwargs: dict[str, Any] = {"groups": 0}
            if self._netns:
                kwargs["netns"] = self._netns
            self._ipr = AsyncIPRoute(**kwargs)
            await self._ipr.setup_endpoint()

    async def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._route is not None:
            self._route.close()
            self._route = None
        for conntrack in self._conntrack.values():
            conntrack.close()
        self._conntrack.clear()

    @property
    def ipr(self) -> AsyncIPRoute:
        if self._ipr is None:
            raise RuntimeError("Netlink.open() was not called")
        return self._ipr

    # -- queries -------------------------------------------------------------------------------
    # Parsing a full link message costs about a millisecond of event-loop time, so where only
    # an interface's index is needed it comes from if_nametoindex (in our own namespace).

    async def index(self, name: str) -> int | None:
        """The interface's index, or None if there is no such interface."""
        if self._netns is None:
            try:
                return socket.if_nametoindex(name)
            except OSError:
                return None
        link = await self.get_link(name)
        return link.index if link else None

    async def exists(self, name: str) -> bool:
        return await self.index(name) is not None

    async def _name_of(self, index: int, names: dict[int, str] | None) -> str:
        if names is not None:
            return names.get(index, "")
        try:
            return socket.if_indextoname(index)
        except OSError:
            return ""

    async def get_link(self, name: str) -> Link | None:
        async with self._lock:
            try:
                msgs = await self.ipr.link("get", ifname=name)
            except NetlinkError as err:
                if err.code == errno.ENODEV:
                    return None
                raise HostError(f"could not look up interface {name}: {_describe(err)}") from None
        return _link(msgs[0])

    async def links(self) -> list[Link]:
        if self._netns is None:  # our own namespace: the fast dump (blocks this thread only)
            return dump_links()
        async with self._lock:
            return [_link(msg) async for msg in await self.ipr.link("dump")]

    async def routes(self, overlapping: Sequence[IPNetwork] | None = None) -> list[HostRoute]:
        """Unicast routes of the main table, both families, with their device names: default
        routes (0.0.0.0/0, ::/0) included, a multipath route once per next hop. With
        ``overlapping``, only those that overlap one of those networks, and the default ones."""
        if self._netns is None:  # our own namespace: the fast dump (blocks this thread only)
            return [
                HostRoute(net, await self._name_of(oif, None))
                for net, oif, table, kind in dump_routes(overlapping)
                if table == MAIN_TABLE and kind == _RT_UNICAST
            ]
        names = {link.index: link.name for link in await self.links()}
        raw: list[tuple[IPNetwork, int]] = []
        async with self._lock:
            for family in (2, 10):
                async for msg in await self.ipr.route("dump", family=family):
                    if msg.get("table") != MAIN_TABLE or msg["type"] != _RT_UNICAST:
                        continue
                    dst = msg.get("dst") or ("0.0.0.0" if family == 2 else "::")  # noqa: S104
                    net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
                    if (
                        overlapping is not None
                        and net.prefixlen
                        and not any(
                            net.version == o.version and net.overlaps(o) for o in overlapping
                        )
                    ):
                        continue
                    hops = [h.get("oif") or 0 for h in msg.get("multipath") or ()]
                    raw += [(net, oif) for oif in hops or [msg.get("oif") or 0]]
        return [HostRoute(net, await self._name_of(oif, names)) for net, oif in raw]

    async def link_addresses(self, name: str) -> list[IPInterface]:
        index = await self.index(name)
        if index is None:
            return []
        async with self._lock:
            return [
                ipaddress.ip_interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
                async for msg in await self.ipr.addr("dump", index=index)
            ]

    # -- bridges -------------------------------------------------------------------------------

    async def ensure_bridge(self, name: str, mac: str, mtu: int | None) -> bool:
        """Create the bridge if missing. Returns True if it was created now."""
        existing = await self.get_link(name)
        if existing is not None:
            if existing.kind != "bridge":
                raise Conflict(f"interface {name} already exists and is not a bridge")
            return False
        kwargs: dict[str, Any] = {"ifname": name, "kind": "bridge", "address": mac}
        if mtu:
            kwargs["mtu"] = mtu
        async with self._lock:
            try:
                await self.ipr.link("add", **kwargs)
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    raise HostError(f"could not create bridge {name}: {_describe(err)}") from None
                return False
        return True

    async def set_link(
        self,
        name: str,
        *,
        up: bool | None = None,
        mtu: int | None = None,
        master: str | None = None,
    ) -> None:
        """Set state, MTU and bridge (idempotent: setting what is already set is fine)."""
        index = await self.index(name)
        if index is None:
            raise HostError(f"interface {name} does not exist")
        kwargs: dict[str, Any] = {}
        if up is not None:
            kwargs["state"] = "up" if up else "down"
        if mtu:
            kwargs["mtu"] = mtu
        if master is not None:
            master_index = await self.index(master)
            if master_index is None:
                raise HostError(f"bridge {master} does not exist")
            kwargs["master"] = master_index
        if not kwargs:
            return
        async with self._lock:
            try:
                await self.ipr.link("set", index=index, **kwargs)
            except NetlinkError as err:
                raise HostError(f"could not configure interface {name}: {_describe(err)}") from None

    async def ensure_address(self, name: str, address: IPInterface) -> None:
        index = await self.index(name)
        if index is None:
            raise HostError(f"interface {name} does not exist")
        kwargs: dict[str, Any] = {
            "index": index,
            "address": str(address.ip),
            "prefixlen": address.network.prefixlen,
        }
        if address.version == 6:
            kwargs["flags"] = IFA_F_NODAD  # the gateway must answer at once, as Docker does
        async with self._lock:
            try:
                await self.ipr.addr("add", **kwargs)
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    raise HostError(
                        f"could not add address {address} to {name}: {_describe(err)}"
                    ) from None

    async def remove_address(self, name: str, address: IPInterface) -> None:
        index = await self.index(name)
        if index is None:
            return
        async with self._lock:
            try:
                await self.ipr.addr(
                    "del",
                    index=index,
                    address=str(address.ip),
                    prefixlen=address.network.prefixlen,
                )
            except NetlinkError as err:
                if err.code not in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT):
                    raise HostError(
                        f"could not remove address {address} from {name}: {_describe(err)}"
                    ) from None

    async def set_hairpin(self, name: str) -> None:
        """Let the bridge send a frame back out the port it came in on: a container reaching
        its own published port through a host address comes back on its own port."""
        index = await self.index(name)
        if index is None:
            raise HostError(f"interface {name} does not exist")
        async with self._lock:
            try:
                await self.ipr.brport("set", index=index, mode=1)
            except NetlinkError as err:
                raise HostError(f"could not set hairpin mode on {name}: {_describe(err)}") from None

    # -- veths ---------------------------------------------------------------------------------

    async def _requests(self, requests: Sequence[Request], what: str) -> list[int]:
        """Send a batch on this thread's rtnetlink socket (blocking this thread only, for the
        kernel's part); the error codes."""
        async with self._lock:
            try:
                if self._route is None:
                    self._route = _RouteSocket(self._netns)
                return self._route.requests(requests)
            except OSError as err:
                if self._route is not None:  # the next batch starts on a fresh socket
                    self._route.close()
                    self._route = None
                raise HostError(f"could not {what}: {err}") from None

    async def _create_veth(
        self, host: str, peer: str, peer_mac: str | None, mtu: int | None
    ) -> bool:
        """A new pair (veth_requests); False if a link of either name exists already."""
        created, *_ = await self._requests(
            veth_requests(host, peer, peer_mac, mtu), f"create veth pair {host}/{peer}"
        )
        if created == errno.EEXIST:
            return False
        if created:
            raise HostError(f"could not create veth pair {host}/{peer}: {os.strerror(created)}")
        return True

    async def _attach(
        self, host: str, master_index: int, master: str, mtu: int | None, hairpin: bool
    ) -> bool:
        """attach_requests; False if the host end is not there (any more)."""
        host_index = await self.index(host)
        if host_index is None:
            return False
        what = f"put veth {host} on bridge {master}"
        codes = await self._requests(
            attach_requests(host_index, master_index, mtu, hairpin=hairpin), what
        )
        if codes[0] == errno.EXFULL:
            raise BridgeFull(
                f"bridge {master} has no free port: a Linux bridge holds at most "
                f"{MAX_BRIDGE_PORTS} interfaces"
            )
        if codes[0] in (errno.ENODEV, errno.ENOENT):
            return False
        if codes[0]:
            raise HostError(f"could not {what}: {os.strerror(codes[0])}")
        if hairpin and codes[1]:
            raise HostError(f"could not set hairpin mode on {host}: {os.strerror(codes[1])}")
        return True

    async def _bridge_index(self, master: str) -> int:
        index = await self.index(master)
        if index is None:
            raise HostError(f"bridge {master} does not exist")
        return index

    async def ensure_veth(
        self,
        host: str,
        peer: str,
        peer_mac: str,
        mtu: int | None,
        master: str | None = None,
        *,
        hairpin: bool = False,
    ) -> bool:
        """Create a veth pair unless the host end exists (with ``master``: then the host end
        on that bridge and up; with ``hairpin``, in hairpin mode). Returns True if created
        now."""
        master_index = await self._bridge_index(master) if master is not None else None
        if await self.exists(host):
            return False
        if not await self._create_veth(host, peer, peer_mac, mtu):
            return False
        if master is None or master_index is None:
            return True
        try:
            attached = await self._attach(host, master_index, master, mtu, hairpin)
        except BridgeFull:
            await self.delete_link(host)  # made again once a port is free
            raise
        if not attached:
            raise HostError(f"veth pair {host}/{peer} disappeared while it was being set up")
        return True

    async def create_spare_veth(self, host: str, peer: str) -> bool:
        """Create a veth pair, both ends down and on no bridge (spares.py); False if a link
        of either name exists already."""
        return await self._create_veth(host, peer, None, None)

    async def attach_veth(
        self,
        host: str,
        peer: str,
        peer_mac: str,
        mtu: int | None,
        master: str,
        *,
        hairpin: bool = False,
    ) -> bool:
        """Give an existing pair (a spare) what ensure_veth gives a new one: the peer's MAC and
        both MTUs, the host end on ``master`` and up (then in hairpin mode). False if the pair
        is not there (any more). The host end is left alone if the peer's settings fail."""
        master_index = await self._bridge_index(master)
        peer_index = await self.index(peer)
        if peer_index is None:
            return False
        what = f"set up veth pair {host}/{peer}"
        (code,) = await self._requests(peer_requests(peer_index, peer_mac, mtu), what)
        if code in (errno.ENODEV, errno.ENOENT):
            return False
        if code:
            raise HostError(f"could not {what}: {os.strerror(code)}")
        return await self._attach(host, master_index, master, mtu, hairpin)

    async def retire(self, host: str, peer: str) -> None:
        """Take a veth pair's host end off its bridge, and both ends (the peer if it is in
        this namespace) down and into RETIRED_LINK_GROUP, for the next delete_retired; nothing
        for an end that is gone."""
        host_index, peer_index = await self.index(host), await self.index(peer)
        present = [name for name, index in ((host, host_index), (peer, peer_index)) if index]
        if not present:
            return
        codes = await self._requests(
            retire_requests(host_index, peer_index),
            f"take the removed container's veth {host} down",
        )
        for name, code in zip(present, codes, strict=True):
            if code not in (0, errno.ENODEV, errno.ENOENT):
                raise HostError(
                    f"could not take the removed container's veth {name} down: {os.strerror(code)}"
                )

    async def delete_retired(self) -> None:
        """Delete every interface in RETIRED_LINK_GROUP in one request: the kernel waits for
        one RCU grace period for all of them, not one each. It refuses (and deletes nothing)
        if one of them cannot be deleted that way, such as a physical interface."""
        async with self._lock:
            try:
                await self.ipr.link("del", group=RETIRED_LINK_GROUP)
            except NetlinkError as err:
                if err.code in (errno.ENODEV, errno.ENOENT):
                    return  # none left
                raise HostError(
                    f"could not delete the interfaces of group {RETIRED_LINK_GROUP}: "
                    f"{_describe(err)}"
                ) from None

    async def delete_link(self, name: str) -> bool:
        """Delete an interface; returns False if it did not exist."""
        index = await self.index(name)
        if index is None:
            return False
        async with self._lock:
            try:
                await self.ipr.link("del", index=index)
            except NetlinkError as err:
                if err.code in (errno.ENODEV, errno.ENOENT):
                    return False
                raise HostError(f"could not delete interface {name}: {_describe(err)}") from None
        return True

    # -- connection tracking -------------------------------------------------------------------

    async def _ct(self, family: int) -> AsyncConntrack:
        conntrack = self._conntrack.get(family)
        if conntrack is None:
            kwargs: dict[str, Any] = {"netns": self._netns} if self._netns else {}
            conntrack = AsyncConntrack(nfgen_family=family, **kwargs)
            await conntrack.setup_endpoint()
            self._conntrack[family] = conntrack
        return conntrack

    async def forget_flows(
        self, address: IPAddress, proto: int | None = None, port: int | None = None
    ) -> int:
        """Delete the connection-tracking entries of ``address``: every flow from it, to it,
        or NATed to it (``proto``/``port``: only flows NATed to that port of it). Returns how
        many went (for the whole batch, see below). Entries outlive the container: left in
        place, a reply-state entry lets a later container that gets the address receive,
        through the replies rule, traffic nobody allowed, and a UDP flow keeps going to a port
        no longer published.

        Every flow from it (original source) and every flow it answers (reply source: flows
        to it, NATed to it or not); a flow to it that was not NATed away has it as reply
        source too. Addresses asked for while a walk of the table runs are forgotten together
        by the next one: one walk for them all, however many containers went meanwhile."""
        family = _address_family(address.version)
        ip = str(address)
        if proto is not None:
            filters = [("reply", NFCTAttrTuple(family=family, saddr=ip, proto=proto, sport=port))]
            return await self._forget(ip, filters)
        waiting = self._flows_wanted.setdefault(family, {})
        done = waiting.get(address)
        if done is None:
            done = waiting[address] = asyncio.get_running_loop().create_future()
            done.add_done_callback(_observed)
        while not done.done():
            async with self._conntrack_locks[family]:
                if not done.done():
                    await self._forget_batch(family)
        # Shielded: a caller that gives up must not cancel what the others wait for.
        return await asyncio.shield(done)

    async def _forget_batch(self, family: int) -> None:
        """Forget the flows of every address waiting (under the family's lock)."""
        batch = self._flows_wanted.pop(family, {})
        try:
            count = await self._forget_addresses(family, list(batch))
        except Exception as err:  # every waiter gets it
            for future in batch.values():
                if not future.done():
                    future.set_exception(err)
        except BaseException:
            # Cancelled: the addresses are waited for still, by the next holder of the lock.
            waiting = self._flows_wanted.setdefault(family, {})
            for address, future in batch.items():
                newer = waiting.setdefault(address, future)
                if newer is not future:
                    newer.add_done_callback(functools.partial(_follow, future))
            raise
        else:
            for future in batch.values():
                if not future.done():
                    future.set_result(count)

    async def _forget_addresses(self, family: int, addresses: list[IPAddress]) -> int:
        if self._netns is None:  # our own namespace: by hand
            wanted = {a.packed for a in addresses}
            try:
                # (Never IPv6: the kernel's IPv6 filter compares the other way round, so a
                # filtered flush deletes every entry but the address's.)
                if family == socket.AF_INET and self._filtered_flush.get(family, True):
                    flushed = [await asyncio.to_thread(flush_flows, family, a) for a in wanted]
                    if all(flushed):
                        return 0  # (a flush does not say how many went)
                    log.info("this kernel has no filtered conntrack flush: reading the table")
                    self._filtered_flush[family] = False
                # One walk for them all.
                flows = await asyncio.to_thread(dump_flows, family)
                doomed = [
                    f for f in flows if f.original_source in wanted or f.reply_source in wanted
                ]
                return await asyncio.to_thread(delete_flows, family, doomed)
            except HostError as err:
                what = ", ".join(str(a) for a in addresses)
                raise HostError(
                    f"could not remove the connection-tracking entries of {what}: {err}"
                ) from None
        count = 0  # another namespace (tests): pyroute2, address by address
        for address in addresses:
            ip = str(address)
            count += await self._forget_now(
                ip,
                [
                    ("orig", NFCTAttrTuple(family=family, saddr=ip)),
                    ("reply", NFCTAttrTuple(family=family, saddr=ip)),
                ],
            )
        return count

    async def forget_port_flows(self, proto: int, port: int, family: Family) -> int:
        """Delete the connection-tracking entries of flows to ``port`` (``proto``) of any
        address of ``family``: flows to a host port set up before its DNAT rule existed. (Only
        the publication's own family: reading IPv6 entries means reading them all.)"""
        af = _address_family(family)
        filters = [("orig", NFCTAttrTuple(family=af, proto=proto, dport=port))]
        return await self._forget(f"port {port}", filters)

    async def _forget(self, what: str, filters: list[tuple[str, NFCTAttrTuple]]) -> int:
        # Each call reads one family (its filters are of one family).
        async with self._conntrack_locks[filters[0][1].family]:
            return await self._forget_now(what, filters)

    async def _forget_now(self, what: str, filters: list[tuple[str, NFCTAttrTuple]]) -> int:
        doomed: dict[Any, tuple[AsyncConntrack, NFCTAttrTuple]] = {}
        try:
            for direction, match in filters:
                conntrack = await self._ct(match.family)
                async for key, original in self._matching(conntrack, direction, match):
                    doomed[key] = (conntrack, original)
            for conntrack, original in doomed.values():
                try:
                    await conntrack.delete(original)
                except NetlinkError as err:
                    if err.code != errno.ENOENT:  # gone meanwhile: fine
                        raise
        except NetlinkError as err:
            raise HostError(
                f"could not remove the connection-tracking entries of {what}: {_describe(err)}"
            ) from None
        return len(doomed)

    @staticmethod
    async def _matching(
        conntrack: AsyncConntrack, direction: str, match: NFCTAttrTuple
    ) -> AsyncIterator[tuple[tuple[int, object], NFCTAttrTuple]]:
        """(a key, the original tuple) of each entry whose ``direction`` tuple matches.
        IPv4: the kernel filters (5.8 and newer; pyroute2 checks again). IPv6: the kernel's
        tuple filter is not to be trusted (on 6.x it returns nothing for an address that is
        there), so the family's table is read whole and matched here, as pyroute2 would."""
        attr = "CTA_TUPLE_ORIG" if direction == "orig" else "CTA_TUPLE_REPLY"
        if match.family == socket.AF_INET:
            key = "tuple_orig" if direction == "orig" else "tuple_reply"
            async for entry in await conntrack.dump_entries(**{key: match}):
                yield (match.family, entry.id or repr(entry.tuple_orig)), entry.tuple_orig
            return
        async for message in await conntrack.dump():
            family = message["nfgen_family"]
            if family != match.family or not match.nla_eq(family, message.get_attr(attr)):
                continue
            original = NFCTAttrTuple.from_netlink(family, message.get_attr("CTA_TUPLE_ORIG"))
            # The entry's id, else its original tuple (unique in the table; an object's id()
            # is not, once the object is gone).
            yield (family, message.get_attr("CTA_ID") or repr(original)), original

    # -- tunnels (networks that span hosts) -------------------------------------------------

    async def ensure_vxlan(
        self,
        name: str,
        vni: int,
        port: int,
        local: IPAddress,
        underlay: str,
        master: str,
    ) -> bool:
        """A VXLAN device without learning (every entry is written by pybridge) and with the
        proxy flag (ARP and neighbour solicitations answered here from those entries, never
        sent across), on ``master``, up; its MTU is the underlay's less the encapsulation (the
        kernel's choice). True if created now."""
        existing = await self.get_link(name)
        if existing is None:
            underlay_index = await self.index(underlay)
            if underlay_index is None:
                raise HostError(f"the underlay interface {underlay} does not exist")
            async with self._lock:
                try:
                    await self.ipr.link(
                        "add",
                        ifname=name,
                        kind="vxlan",
                        vxlan_id=vni,
                        vxlan_port=port,
                        vxlan_local=str(local),
                        vxlan_link=underlay_index,
                        vxlan_learning=0,
                        vxlan_proxy=1,
                    )
                except NetlinkError as err:
                    if err.code != errno.EEXIST:
                        raise HostError(
                            f"could not create the VXLAN device {name} (VNI {vni}, port "
                            f"{port}): {_describe(err)}"
                        ) from None
        elif existing.kind != "vxlan":
            raise Conflict(f"interface {name} already exists and is not a VXLAN device")
        await self.set_link(name, master=master, up=True)
        return existing is None

    async def tunnel_entries(self, name: str) -> TunnelEntries:
        """What the VXLAN device ``name`` holds: its flood destinations, MAC -> VTEP and
        address -> MAC entries (those pybridge writes: the device's own, permanent)."""
        index = await self.index(name)
        if index is None:
            return TunnelEntries(frozenset(), {}, {})
        flood: set[IPAddress] = set()
        forwarding: dict[str, IPAddress] = {}
        neighbours: dict[IPAddress, str] = {}
        async with self._lock:
            async for msg in await self.ipr.fdb("dump", ifindex=index):
                dst = msg.get("NDA_DST")
                if not dst or not msg["flags"] & _NTF_SELF:
                    continue  # the bridge's own entries for this port
                mac = str(msg.get("NDA_LLADDR") or "")
                if mac == FLOOD_MAC:
                    flood.add(ipaddress.ip_address(dst))
                else:
                    forwarding[mac] = ipaddress.ip_address(dst)
            for family in (socket.AF_INET, socket.AF_INET6):
                async for msg in await self.ipr.neigh("dump", ifindex=index, family=family):
                    if msg["state"] & _NUD_PERMANENT and msg.get("NDA_LLADDR"):
                        address = ipaddress.ip_address(msg.get("NDA_DST"))
                        neighbours[address] = str(msg.get("NDA_LLADDR"))
        return TunnelEntries(frozenset(flood), forwarding, neighbours)

    async def apply_tunnel(self, name: str, steps: Sequence[Step]) -> None:
        """Carry out ``steps`` (tunnel.plan's) on the VXLAN device ``name``: idempotent (an
        entry already there or already gone is fine)."""
        index = await self.index(name)
        if index is None:
            raise HostError(f"the VXLAN device {name} does not exist")
        async with self._lock:
            for step in steps:
                try:
                    await self._tunnel_step(index, step)
                except NetlinkError as err:
                    if err.code in (errno.EEXIST, errno.ENOENT):
                        continue
                    raise HostError(
                        f"could not update the VXLAN device {name} ({step.action}): "
                        f"{_describe(err)}"
                    ) from None

    async def _tunnel_step(self, index: int, step: Step) -> None:
        vtep = str(step.vtep) if step.vtep is not None else None
        if step.action == "flood-add":
            await self.ipr.fdb("append", ifindex=index, lladdr=FLOOD_MAC, dst=vtep)
        elif step.action == "flood-remove":
            await self.ipr.fdb("del", ifindex=index, lladdr=FLOOD_MAC, dst=vtep)
        elif step.action == "fdb-replace":
            # pyroute2 fills in the flags for add/append/del, not for replace.
            await self.ipr.fdb(
                "replace",
                ifindex=index,
                lladdr=step.mac,
                dst=vtep,
                state=_NUD_PERMANENT | _NUD_NOARP,
                flags=_NTF_SELF,
            )
        elif step.action == "fdb-remove":
            await self.ipr.fdb("del", ifindex=index, lladdr=step.mac, dst=vtep)
        elif step.action == "neigh-replace":
            await self.ipr.neigh(
                "replace",
                ifindex=index,
                dst=str(step.address),
                lladdr=step.mac,
                state=_NUD_PERMANENT,
            )
        else:
            await self.ipr.neigh("del", ifindex=index, dst=str(step.address))


class _NetlinkThread:
    """One netlink socket (a _NetlinkCore) on its own thread and event loop."""

    def __init__(self, netns: str | None, name: str) -> None:
        self.core = _NetlinkCore(netns)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return await asyncio.wrap_future(future)

    async def open(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()
        await self.call(self.core.open())

    async def close(self) -> None:
        if not self._thread.is_alive():
            return
        await self.call(self.core.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join, 5)
        self._loop.close()


class Netlink:
    """The kernel adapter used by the driver.

    The kernel does the work of a netlink request (creating a veth, moving a link) inside the
    sendmsg() call, under the kernel's rtnl lock, so a request can block for a long time while
    dockerd, runc or anyone else holds that lock; pyroute2's async socket only makes the
    *answer* asynchronous. So the AsyncIPRoute socket lives on a dedicated thread with its own
    event loop, and pybridge's event loop only awaits the results: it never waits for the
    kernel.

    Deleting an interface is slow (15-40 ms: the kernel waits for RCU grace periods, mostly
    outside the rtnl lock), so deletions have a second socket and thread of their own: a veth
    being removed in the background never delays the next container's CreateEndpoint. Spare
    veth pairs (spares.py) and conntrack walks (StaleFlows) have a third and a fourth."""

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns
        self._main = _NetlinkThread(netns, "pydriver-netlink")
        self._removals = _NetlinkThread(netns, "pydriver-netlink-del")
        # Spare veth pairs are made on a third: queued behind removals, they would not be
        # ready for the next container.
        self._spares = _NetlinkThread(netns, "pydriver-netlink-spare")
        # And conntrack walks a fourth: behind removals (a deletion holds its thread for
        # 15-40 ms), they fall behind containers removed back to back.
        self._flows = _NetlinkThread(netns, "pydriver-conntrack")
        self._core = self._main.core

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return await self._main.call(coro)

    async def open(self) -> None:
        await self._main.open()
        await self._removals.open()
        await self._spares.open()
        await self._flows.open()

    async def close(self) -> None:
        await self._flows.close()
        await self._spares.close()
        await self._removals.close()
        await self._main.close()

    async def index(self, name: str) -> int | None:
        if self._netns is None:  # a libc call: no need to leave this thread
            try:
                return socket.if_nametoindex(name)
            except OSError:
                return None
        return await self._call(self._core.index(name))

    async def exists(self, name: str) -> bool:
        return await self.index(name) is not None

    async def get_link(self, name: str) -> Link | None:
        return await self._call(self._core.get_link(name))

    async def links(self) -> list[Link]:
        return await self._call(self._core.links())

    async def routes(self, overlapping: Sequence[IPNetwork] | None = None) -> list[HostRoute]:
        return await self._call(self._core.routes(overlapping))

    async def link_addresses(self, name: str) -> list[IPInterface]:
        return await self._call(self._core.link_addresses(name))

    async def ensure_bridge(self, name: str, mac: str, mtu: int | None) -> bool:
        return await self._call(self._core.ensure_bridge(name, mac, mtu))

    async def set_link(
        self,
        name: str,
        *,
        up: bool | None = None,
        mtu: int | None = None,
        master: str | None = None,
    ) -> None:
        await self._call(self._core.set_link(name, up=up, mtu=mtu, master=master))

    async def ensure_address(self, name: str, address: IPInterface) -> None:
        await self._call(self._core.ensure_address(name, address))

    async def remove_address(self, name: str, address: IPInterface) -> None:
        await self._call(self._core.remove_address(name, address))

    async def set_hairpin(self, name: str) -> None:
        await self._call(self._core.set_hairpin(name))

    async def ensure_veth(
        self,
        host: str,
        peer: str,
        peer_mac: str,
        mtu: int | None,
        master: str | None = None,
        *,
        hairpin: bool = False,
    ) -> bool:
        return await self._call(
            self._core.ensure_veth(host, peer, peer_mac, mtu, master, hairpin=hairpin)
        )

    async def ensure_vxlan(
        self, name: str, vni: int, port: int, local: IPAddress, underlay: str, master: str
    ) -> bool:
        return await self._call(self._core.ensure_vxlan(name, vni, port, local, underlay, master))

    async def tunnel_entries(self, name: str) -> TunnelEntries:
        return await self._call(self._core.tunnel_entries(name))

    async def apply_tunnel(self, name: str, steps: Sequence[Step]) -> None:
        await self._call(self._core.apply_tunnel(name, steps))

    async def attach_veth(
        self,
        host: str,
        peer: str,
        peer_mac: str,
        mtu: int | None,
        master: str,
        *,
        hairpin: bool = False,
    ) -> bool:
        return await self._call(
            self._core.attach_veth(host, peer, peer_mac, mtu, master, hairpin=hairpin)
        )

    async def create_spare_veth(self, host: str, peer: str) -> bool:
        # Off the main socket: creating an interface can wait tens of milliseconds for the
        # kernel (nf_tables commits, conntrack walks), which a CreateEndpoint must not.
        return await self._spares.call(self._spares.core.create_spare_veth(host, peer))

    async def retire(self, host: str, peer: str) -> None:
        # Off the main socket (the kernel waits for an RCU grace period, 1-2 ms), on the
        # spares' (short link changes in the background; not behind a deletion).
        await self._spares.call(self._spares.core.retire(host, peer))

    async def delete_retired(self) -> None:
        await self._removals.call(self._removals.core.delete_retired())

    async def delete_link(self, name: str) -> bool:
        return await self._removals.call(self._removals.core.delete_link(name))

    async def forget_flows(
        self, address: IPAddress, proto: int | None = None, port: int | None = None
    ) -> int:
        return await self._flows.call(self._flows.core.forget_flows(address, proto, port))

    async def forget_port_flows(self, proto: int, port: int, family: Family) -> int:
        return await self._flows.call(self._flows.core.forget_port_flows(proto, port, family))
