"""The reference semantics of pybridge's firewall: the flat layout of commit ec2ce20, before
issue 17's per-network chains and buckets, copied verbatim (renderer only).

Every network's rules lived in a few shared chains (PYBRIDGE-FORWARD, PYBRIDGE-ISOLATION,
PYBRIDGE-DNAT, PYBRIDGE-POSTROUTING, PYBRIDGE-PREROUTING), read top to bottom. That layout was
reviewed and tested against real traffic; the new one must decide every packet the same way
(tests/unit/test_rule_semantics.py evaluates both). Do not "fix" anything here: a change to
what pybridge lets through changes this reference on purpose, with its own review.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydriver.model import Family, IPAddress, PortMapping
from pydriver.rules import (
    CONTAINER_BRIDGE_PATTERNS,
    DNAT_CHAIN,
    ECHO_REQUEST,
    FORWARD_CHAIN,
    ISOLATION_CHAIN,
    LOOPBACK,
    POSTROUTING_CHAIN,
    RAW_CHAIN,
    NetworkRules,
)

# table -> the one chain that held all of pybridge's rules of it (nat: two)
FLAT_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": (FORWARD_CHAIN,),
    "mangle": (ISOLATION_CHAIN,),
    "nat": (DNAT_CHAIN, POSTROUTING_CHAIN),
    "raw": (RAW_CHAIN,),
}


def render_chain_rules(networks: Sequence[NetworkRules], family: Family) -> dict[str, list[str]]:
    """The rules of pybridge's chains, per table, as iptables-save lines (without the header)."""
    networks = sorted(networks, key=lambda n: n.bridge)
    return {
        "filter": _forward_rules(networks, family),
        "mangle": _isolation_rules(networks, family),
        "nat": _nat_rules(networks, family),
        "raw": _raw_rules(networks, family),
    }


def _host(address: IPAddress) -> str:
    return f"{address}/{address.max_prefixlen}"


def _openings(net: NetworkRules, family: Family) -> list[str]:
    """The matches (without chain and target) of what a network of ``family``'s mode lets in
    to its containers' own addresses from beyond its bridge, besides replies and published
    host ports: routed networks' published container ports and echo requests, and in mode
    nat the published container ports from its trusted host interfaces."""
    if net.internal:
        return []
    b = net.bridge
    mode = net.mode(family)
    mappings = [m for m in net.mappings if m.family == family]
    if mode == "routed":
        ports = sorted({(m.container_ip, m.proto, m.container_port) for m in mappings if m.direct})
        opened = [f"-d {_host(ip)} -o {b} -p {pr} -m {pr} --dport {port}" for ip, pr, port in ports]
        return [*opened, f"-o {b} {ECHO_REQUEST[family]}"]
    if mode == "nat" and net.trusted:
        ports = sorted(
            {(m.container_ip, m.proto, m.container_port) for m in mappings if not m.direct}
        )
        return [
            f"-d {_host(ip)} -i {t} -o {b} -p {pr} -m {pr} --dport {port}"
            for t in net.trusted
            for ip, pr, port in ports
        ]
    return []


def named_like_docker(bridge: str) -> bool:
    """Whether an interface pattern of Docker's container bridges matches ``bridge``."""
    return any(
        bridge.startswith(p[:-1]) if p.endswith("+") else bridge == p
        for p in CONTAINER_BRIDGE_PATTERNS
    )


def _from_own_bridge(a: str, net: NetworkRules, family: Family) -> list[str]:
    """What the filter accepts from pybridge's bridge ``a`` into ``net``'s bridge (non-internal)
    ahead of the RETURNs for Docker's bridge names: the same as the rules below the RETURNs
    accept from it (published ports; within one network, ICC; the routed openings)."""
    b = net.bridge
    rules = [f"-A {FORWARD_CHAIN} -i {a} -o {b} -m conntrack --ctstate DNAT -j ACCEPT"]
    if a == b:
        rules.append(f"-A {FORWARD_CHAIN} -i {b} -o {b} -j {'ACCEPT' if net.icc else 'DROP'}")
        return rules
    for match in _openings(net, family):
        if " -i " in f" {match}":
            continue  # a trusted host interface, not a bridge
        # Where iptables-save writes -i: after -s/-d, before -o.
        rules.append(
            f"-A {FORWARD_CHAIN} {match.replace(f'-o {b}', f'-i {a} -o {b}', 1)} -j ACCEPT"
        )
    return rules


def _forward_rules(networks: Sequence[NetworkRules], family: Family) -> list[str]:
    fwd: list[str] = []
    # pybridge's own bridges that Docker's patterns below would catch (named with
    # bridge.name): what mangle let through from them is theirs to accept, not Docker's.
    docker_named = [n.bridge for n in networks if named_like_docker(n.bridge)]
    for net in networks:
        b = net.bridge
        fwd.append(
            f"-A {FORWARD_CHAIN} -o {b} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        )
        if not net.internal:
            # New traffic from Docker's own networks (what mangle let in: published ports,
            # routed openings) is Docker's to accept or not: it drops what comes from its
            # --internal networks further down FORWARD, and accepts the rest. Accepting it
            # here would let a container of a Docker internal network out through a port
            # pybridge publishes. pybridge's own bridges named like Docker's go on below.
            for a in docker_named:
                fwd += _from_own_bridge(a, net, family)
            fwd += [
                f"-A {FORWARD_CHAIN} -i {p} -o {b} -j RETURN" for p in CONTAINER_BRIDGE_PATTERNS
            ]
            # Published ports (pybridge's DNAT), from anywhere, hairpin included.
            fwd.append(f"-A {FORWARD_CHAIN} -o {b} -m conntrack --ctstate DNAT -j ACCEPT")
        fwd.append(f"-A {FORWARD_CHAIN} -i {b} -o {b} -j {'ACCEPT' if net.icc else 'DROP'}")
        fwd += [f"-A {FORWARD_CHAIN} {match} -j ACCEPT" for match in _openings(net, family)]
        # nat-unprotected: whatever mangle let in from outside the network, every port.
        unprotected = not net.internal and net.mode(family) == "nat-unprotected"
        fwd.append(f"-A {FORWARD_CHAIN} -o {b} -j {'ACCEPT' if unprotected else 'DROP'}")
    for net in networks:
        fwd.append(f"-A {FORWARD_CHAIN} -i {net.bridge} -j {'DROP' if net.internal else 'ACCEPT'}")
    return fwd


def _isolation_rules(networks: Sequence[NetworkRules], family: Family) -> list[str]:
    # Traffic within one network is left to filter (ICC), so no drop below can match a
    # bridge that happens to be named like Docker's (br-x, docker0).
    iso = _tunnel_forward_drops(networks, family)
    iso += [f"-A {ISOLATION_CHAIN} -i {n.bridge} -o {n.bridge} -j RETURN" for n in networks]
    # Internal networks: nothing in or out, checked before replies and published ports are
    # let through (an internal container must not reach another network through a DNAT).
    # Written in iptables-save's own order (-i before -o), so saved rules compare equal.
    for net in networks:
        if net.internal:
            b = net.bridge
            iso += [
                f"-A {ISOLATION_CHAIN} ! -i {b} -o {b} -j DROP",
                f"-A {ISOLATION_CHAIN} -i {b} ! -o {b} -j DROP",
            ]
    iso.append(f"-A {ISOLATION_CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED,DNAT -j RETURN")
    # What the gateway modes open, for every network before any network's drops.
    for net in networks:
        iso += [f"-A {ISOLATION_CHAIN} {match} -j RETURN" for match in _openings(net, family)]
    others = [n.bridge for n in networks if not n.internal]
    for net in networks:
        if net.internal:
            continue
        b = net.bridge
        if net.mode(family) == "nat-unprotected":
            # Open to the outside, not to the other container networks.
            iso += [f"-A {ISOLATION_CHAIN} -i {x} -o {b} -j DROP" for x in others if x != b]
            iso += [
                f"-A {ISOLATION_CHAIN} -i {p} -o {b} -j DROP" for p in CONTAINER_BRIDGE_PATTERNS
            ]
        else:
            iso.append(f"-A {ISOLATION_CHAIN} ! -i {b} -o {b} -j DROP")
        iso += [f"-A {ISOLATION_CHAIN} -i {b} -o {p} -j DROP" for p in CONTAINER_BRIDGE_PATTERNS]
    return iso


def _raw_rules(networks: Sequence[NetworkRules], family: Family) -> list[str]:
    # Nothing addressed to loopback, or claiming to come from it, comes from anywhere but the
    # host itself (route_localnet on a bridge also lifts the kernel's check of the source).
    raw = [
        f"-A {RAW_CHAIN} -d {LOOPBACK[family]} ! -i lo -j DROP",
        f"-A {RAW_CHAIN} -s {LOOPBACK[family]} ! -i lo -j DROP",
        *_tunnel_rules(networks, family),
    ]
    for net in networks:
        if not net.internal:
            continue
        b = net.bridge
        # Only its own gateway addresses (and ICMPv6 to the bridge's link-local address, which
        # neighbour discovery needs) of all the host's addresses. Both families whatever the
        # network's subnets: a container can address the host over IPv6 link-local alone.
        raw += [
            f"-A {RAW_CHAIN} -d {gw}/{gw.max_prefixlen} -i {b} -j RETURN"
            for gw in net.gateways
            if gw.version == family
        ]
        if family == 6 and net.mode_v6 != "isolated":  # (isolated: no link-local address)
            raw.append(f"-A {RAW_CHAIN} -d fe80::/10 -i {b} -p ipv6-icmp -j RETURN")
        raw.append(f"-A {RAW_CHAIN} -i {b} -m addrtype --dst-type LOCAL -j DROP")
    return raw


def _tunnel_rules(networks: Sequence[NetworkRules], family: Family) -> list[str]:
    """VXLAN to this host only from the other hosts of its segments: anyone else could write
    frames onto a segment's bridge (any source, any destination) by sending UDP to the port."""
    ports = sorted({n.tunnel.port for n in networks if n.tunnel is not None})
    rules = []
    for port in ports:
        members = {
            m
            for n in networks
            if n.tunnel is not None and n.tunnel.port == port
            for m in n.tunnel.members
            if m.version == family
        }
        to_us = f"-p udp -m udp --dport {port} -m addrtype --dst-type LOCAL"
        # rpfilter (strict): a member's address arriving where its route does not lead (a
        # container of this host claiming to be another host) is no member.
        rules += [
            f"-A {RAW_CHAIN} -s {m}/{m.max_prefixlen} {to_us} -m rpfilter -j RETURN"
            for m in sorted(members, key=int)
        ]
        rules.append(f"-A {RAW_CHAIN} {to_us} -j DROP")
    return rules


def _tunnel_forward_drops(networks: Sequence[NetworkRules], family: Family) -> list[str]:
    """Nothing forwarded by this host (a container's traffic, whichever network it is on)
    goes to a member's tunnel port: masqueraded to this host's address, it would pass the
    member's check above as this host's own VXLAN."""
    found = {
        (m, n.tunnel.port)
        for n in networks
        if n.tunnel is not None
        for m in n.tunnel.members
        if m.version == family
    }
    return [
        f"-A {ISOLATION_CHAIN} -d {m}/{m.max_prefixlen} -p udp -m udp --dport {port} -j DROP"
        for m, port in sorted(found, key=lambda f: (int(f[0]), f[1]))
    ]


def _nat_rules(networks: Sequence[NetworkRules], family: Family) -> list[str]:
    # No published port is reachable from an internal network, not even through its gateway.
    dnat = [f"-A {DNAT_CHAIN} -i {n.bridge} -j RETURN" for n in networks if n.internal]
    post: list[str] = []
    for net in networks:
        if net.internal:
            continue
        b = net.bridge
        mappings = sorted(
            (m for m in net.mappings if m.family == family and not m.direct),
            key=lambda m: (m.proto, m.host_port, str(m.host_ip or "")),
        )
        dnat += [_dnat_rule(m) for m in mappings]
        if net.mode(family) == "routed":
            continue  # no NAT of this family at all: containers keep their own addresses
        if family == 4:
            # 127.0.0.1:PORT from the host: DNAT'd in OUTPUT, routed out the bridge
            # (route_localnet), and given the bridge's address so the container can answer.
            post.append(f"-A {POSTROUTING_CHAIN} -s 127.0.0.0/8 -o {b} -j MASQUERADE")
        for subnet in net.subnets(family):
            # Hairpin: a container reaching a published port of its own network through a
            # host address must see the reply come from that address, not from its neighbour.
            post.append(
                f"-A {POSTROUTING_CHAIN} -s {subnet} -o {b} -m conntrack --ctstate DNAT "
                "-j MASQUERADE"
            )
            if net.masquerade:
                source = net.snat(family)
                target = f"SNAT --to-source {source}" if source else "MASQUERADE"
                post.append(f"-A {POSTROUTING_CHAIN} -s {subnet} ! -o {b} -j {target}")
    return dnat + post


def _dnat_rule(m: PortMapping) -> str:
    dest = ""
    if m.host_ip is not None:
        dest = f"-d {m.host_ip}/{32 if m.family == 4 else 128} "
    return (
        f"-A {DNAT_CHAIN} {dest}-p {m.proto} -m {m.proto} --dport {m.host_port} "
        f"-j DNAT --to-destination {m.container_text()}"
    )
