"""Firewall rule rendering (pure): the rules of pybridge's own chains, the jumps to them from
the built-in chains, and the ``iptables-restore`` text that writes them.

*How the rules are laid out* (issue 17: a change must cost the same at 1 and at 1,000
networks). Each network has chains of its own, entered by goto from pybridge's shared chains:
PYBRIDGE-F-<bridge> (filter: what may get in to it), PYBRIDGE-I-<bridge> (mangle: likewise)
and, for internal networks, PYBRIDGE-R-<bridge> (raw). A network whose bridge has pybridge's
own name (pyb- and 11 hex digits) has its few rules in the shared chains in one of 16 buckets,
chosen by the name's first hex digit and entered by name prefix (``-o pyb-3+ -g
PYBRIDGE-FI-3``): PYBRIDGE-FI-/FE- (filter, in/out), PYBRIDGE-II-/IE- (mangle, in/out),
PYBRIDGE-PO- (nat, by output bridge). A bucket's chain exists while a network has rules in it.
Bridges named by the user (bridge.name) have those rules in the shared chain itself. Within a
shared or bucket chain the networks' rules may come in any order (each matches its own
bridge, and no packet matches two with different outcomes): rules.Section says which parts of
a chain are ordered.

So a change writes only what changed (``incremental_restore``): a new network's chains, and its
rules in the shared chains added at their top or end (``-I CHAIN 1``, ``-A``: iptables-nft
reads nothing of a chain for those, where a position inside one makes it read the chain
whole); a removed network's rules deleted by their text from its bucket (a sixteenth of the
networks) and its chains dropped; a changed network's own chain edited. The whole rule set is
written at start-up, when the chains come or go, and to repair drift (``render_restore``):
there ``:CHAIN - [0:0]`` lines reset every chain in one atomic batch per table, and the jumps
from the built-in chains, which are shared with others, are checked against the current
``iptables-save`` output and added or removed one by one (kube-proxy does the same).

The rules below are shown as one network's in one chain; the layout above decides in which.
Three kinds of decisions, in three places, for every pybridge network with bridge B:

*What may reach the host itself* is decided in the raw table, before conntrack and NAT:

    PYBRIDGE-PREROUTING (raw; jumped to from PREROUTING, first)
        -d 127.0.0.0/8 ! -i lo -j DROP                                (IPv6: -d ::1/128)
        -s 127.0.0.0/8 ! -i lo -j DROP                                (IPv6: -s ::1/128)
      internal networks (-i B -g PYBRIDGE-R-B), for each gateway address GW of B:
        -d GW -i B -j RETURN                                          its own gateway
        (IPv6: -d fe80::/10 -i B -p ipv6-icmp -j RETURN               neighbour discovery)
        -i B -m addrtype --dst-type LOCAL -j DROP                     no other host address

  route_localnet on the bridges (so the host's own 127.0.0.1:PORT reaches published ports)
  would otherwise let a container that routes 127.0.0.1 to its gateway reach every service
  the host binds to loopback (CVE-2020-8558), and a DNAT rule for 127.0.0.1 would answer a
  LAN neighbour sending to 127.0.0.1 (moby#45610); it also turns off the kernel's check
  that no packet arriving on the bridge claims a loopback source. Replies to the host's own
  connections arrive addressed to the gateway (their de-masquerade comes after raw), so they
  pass.

*Accepts* live in the filter table, whose FORWARD policy Docker sets to DROP (under nftables an
accept is only final in the table that drops):

    PYBRIDGE-FORWARD   (filter; jumped to from FORWARD right after Docker's DOCKER-USER jump
                        where there is one, else first: 29's nftables backend has none)
      ingress (-o B -g PYBRIDGE-F-B), every network's first, so no accept below can let
      traffic into another network:
        -o B -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT     replies
        -i docker0|br-+|docker_gwbridge -o B -j RETURN                (not internal) Docker's
            networks: Docker's chains decide what of theirs may use B's published ports or
            openings (they drop what comes from Docker's --internal networks); pybridge's own
            bridges named like Docker's get their accepts just before these
        -i B -o B -j ACCEPT                                           ICC (DROP if disabled)
        -o B -j DROP                                                  nothing else gets in
      egress, for each network (-i B):
        -i B -j ACCEPT                                                out to the world
        (internal networks: -i B -j DROP)

*Isolation drops* live in the mangle table's FORWARD chain, which runs before filter, so they
hold whatever Docker puts in filter and in whatever order: dockerd 20.10/26.1 insert their
ACCEPT rules (``-i br-x ! -o br-x -j ACCEPT``) at the top of filter FORWARD whenever any network
is created; 28 and 29 (iptables) put ``-j DOCKER-FORWARD`` (with ``-i br-x -j ACCEPT``) and
``-j DOCKER-USER`` first when dockerd starts, above pybridge's jump until the self-healing check
moves it back; 29's nftables backend accepts in a table of its own (``ip docker-bridges``),
which is not final for pybridge's. A DROP is final wherever it happens.

    PYBRIDGE-ISOLATION (mangle; jumped to from FORWARD, first)
        (the tunnels' drops: see _tunnel_forward_drops)
        -j PYBRIDGE-ISO-INTERNAL, for each internal network B, before anything may pass:
            ! -i B -o B -j DROP ; -i B ! -o B -j DROP    nothing in or out, not even replies
                                                         or published ports
        -g PYBRIDGE-ISO-NETWORKS:
            -o B -g PYBRIDGE-I-B, for each network:
                -i B -o B -j RETURN                      within one network: left to filter,
                                                         even for a bridge named br-x
                (not internal:)
                -m conntrack --ctstate RELATED,ESTABLISHED,DNAT -j RETURN  replies, published
                                                                           ports
                (the openings of its gateway modes, below, -j RETURN)
                ! -i B -o B -j DROP                                 nothing new gets in
            -m conntrack --ctstate RELATED,ESTABLISHED,DNAT -j RETURN
            -i B -o docker0|br-+|docker_gwbridge -j DROP (not internal) not into Docker's
                                                         bridges

NAT:

    PYBRIDGE-DNAT (nat; from PREROUTING and OUTPUT for local destinations): published ports
        -i B -j RETURN                                                (internal networks, first)
        [-d HOST_IP] -p PROTO -m PROTO --dport HOST_PORT -j DNAT --to-destination CIP:CPORT
    PYBRIDGE-POSTROUTING (nat; from POSTROUTING), per network that is not internal:
        -s 127.0.0.0/8 -o B -j MASQUERADE                             127.0.0.1:PORT (IPv4)
        -s SUBNET -o B -m conntrack --ctstate DNAT -j MASQUERADE      hairpin
          (these two in B's bucket, PYBRIDGE-PO-k, entered by jump: only NAT targets here)
        -s SUBNET ! -o B -j MASQUERADE                                egress (unless disabled)
        (host_ipv4/host_ipv6: -j SNAT --to-source HOST_IP instead, for egress only: hairpin and
        127.0.0.1 must come from the bridge's own address, which the container routes back to)

The filter side then also has, per network that is not internal, right after the replies rule:
        -o B -m conntrack --ctstate DNAT -j ACCEPT                    published ports

*Gateway modes* (Docker's gateway_mode_ipv4 / gateway_mode_ipv6) change a network's rules of
that family only; the rules above are mode "nat". Who may open a connection to a container's
own address, in each mode (replies and published host ports aside):

    nat              nobody from outside the network; a host interface named in
                     trusted_host_interfaces (T) reaches the published container ports:
        mangle   -d CIP -i T -o B -p PROTO -m PROTO --dport CPORT -j RETURN
        filter   -d CIP -i T -o B -p PROTO -m PROTO --dport CPORT -j ACCEPT
    nat-unprotected  anyone who routes to the subnet, every port, except other container
                     networks (pybridge's X, Docker's bridges): pybridge keeps them apart in
                     every mode (Docker 28 keeps its own apart too, 29 lets them in):
        mangle   -i X -o B -j DROP ; -i docker0 -o B -j DROP ; -i br-+ -o B -j DROP ;
                 -i docker_gwbridge -o B -j DROP        (instead of ! -i B -o B -j DROP)
        filter   -o B -j ACCEPT                                       (instead of -o B -j DROP)
    routed           anyone who routes to the subnet (other networks too, as Docker lets its
                     own), to the published container ports and to ping; no NAT of the family
                     at all (no masquerade, no DNAT: the host port of -p is ignored, as Docker
                     does, so nothing is published on host addresses); unpublished ports stay
                     closed:
        mangle   -d CIP -o B -p PROTO -m PROTO --dport CPORT -j RETURN
                 -o B -p icmp -m icmp --icmp-type 8 -j RETURN         (IPv6: ipv6-icmp, 128)
        filter   the same two, -j ACCEPT
      Only echo requests are let in, where Docker lets every ICMP type in: errors about a
      connection are RELATED and pass anyway.
    isolated         (internal networks only) no address of the family on the bridge (IPv6:
                     disable_ipv6, not even link-local), so the raw table returns none of the
                     host's addresses and no neighbour discovery to it either. (An internal
                     network with inhibit_ipv4 likewise has no IPv4 gateway to return.)

A packet into a network's bridge B is decided in B's own mangle chain, after the internal
networks' drops (an internal network's container reaches nothing, not even another network's
openings) and before the drops towards Docker's bridges (so whether another network reaches
B's openings does not depend on B's name: a routed network named br-x would otherwise be
caught by them).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .model import Endpoint, Family, GatewayMode, IPAddress, IPNetwork, Network, PortMapping
from .naming import BRIDGE_PREFIX

RAW_CHAIN = "PYBRIDGE-PREROUTING"
FORWARD_CHAIN = "PYBRIDGE-FORWARD"
ISOLATION_CHAIN = "PYBRIDGE-ISOLATION"
# The isolation chain's two parts: internal networks' drops (before anything may pass), then
# one goto per network (its traffic in) and the drops towards Docker's bridges.
ISOLATION_INTERNAL_CHAIN = "PYBRIDGE-ISO-INTERNAL"
ISOLATION_NETWORKS_CHAIN = "PYBRIDGE-ISO-NETWORKS"
POSTROUTING_CHAIN = "PYBRIDGE-POSTROUTING"
DNAT_CHAIN = "PYBRIDGE-DNAT"

# table -> the chains pybridge always has in it (while it has networks); each network adds its
# own (network_chains).
OWN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": (FORWARD_CHAIN,),
    "mangle": (ISOLATION_CHAIN, ISOLATION_INTERNAL_CHAIN, ISOLATION_NETWORKS_CHAIN),
    "nat": (DNAT_CHAIN, POSTROUTING_CHAIN),
    "raw": (RAW_CHAIN,),
}

# A network's own chains, named after its bridge (at most 11 + 15 characters, within
# iptables' 28; bridge names are [A-Za-z0-9_.-]).
FORWARD_NETWORK_PREFIX = "PYBRIDGE-F-"
ISOLATION_NETWORK_PREFIX = "PYBRIDGE-I-"
RAW_NETWORK_PREFIX = "PYBRIDGE-R-"


def forward_chain(bridge: str) -> str:
    return FORWARD_NETWORK_PREFIX + bridge


def isolation_chain(bridge: str) -> str:
    return ISOLATION_NETWORK_PREFIX + bridge


def raw_chain(bridge: str) -> str:
    return RAW_NETWORK_PREFIX + bridge


@dataclass(frozen=True)
class Jump:
    """A rule in a built-in chain that sends traffic to one of pybridge's chains."""

    table: str
    chain: str
    target: str
    # Insert after this target's jump when present (Docker's DOCKER-USER, so an admin's rules
    # there apply first), else at the top. Nothing else depends on it: without DOCKER-USER
    # (Docker 29's nftables backend) the jump is simply first, and one created later is
    # followed at the next check.
    after_target: str | None = None
    # Match options, written as iptables-save prints them.
    match: str = ""

    @property
    def rule(self) -> str:
        """The rule without its "-A CHAIN" (for -D and -I)."""
        return f"{self.match} -j {self.target}".strip()

    @property
    def spec(self) -> str:
        return f"-A {self.chain} {self.rule}"


JUMPS: tuple[Jump, ...] = (
    Jump("filter", "FORWARD", FORWARD_CHAIN, after_target="DOCKER-USER"),
    Jump("mangle", "FORWARD", ISOLATION_CHAIN),
    Jump("nat", "PREROUTING", DNAT_CHAIN, match="-m addrtype --dst-type LOCAL"),
    Jump("nat", "OUTPUT", DNAT_CHAIN, match="-m addrtype --dst-type LOCAL"),
    Jump("nat", "POSTROUTING", POSTROUTING_CHAIN),
    Jump("raw", "PREROUTING", RAW_CHAIN),
)

# Docker's own bridges: docker0 and br-<12 hex> for user-defined bridge networks.
DOCKER_BRIDGE_PATTERNS = ("docker0", "br-+")
# ... and the one Docker connects containers to when their networks give them no gateway: what
# a nat-unprotected network keeps out besides pybridge's own bridges.
CONTAINER_BRIDGE_PATTERNS = (*DOCKER_BRIDGE_PATTERNS, "docker_gwbridge")
LOOPBACK: dict[Family, str] = {4: "127.0.0.0/8", 6: "::1/128"}
# Echo requests, which routed networks let in (as iptables-save writes them).
ECHO_REQUEST: dict[Family, str] = {
    4: "-p icmp -m icmp --icmp-type 8",
    6: "-p ipv6-icmp -m icmp6 --icmpv6-type 128",
}


@dataclass(frozen=True)
class TunnelRules:
    """A network that spans hosts: its tunnel's UDP port, and the other hosts of its segment,
    the only ones whose VXLAN traffic this host accepts on that port."""

    port: int
    members: tuple[IPAddress, ...] = ()


@dataclass(frozen=True)
class NetworkRules:
    """What the firewall needs to know about one network."""

    bridge: str
    subnets_v4: tuple[IPNetwork, ...] = ()
    subnets_v6: tuple[IPNetwork, ...] = ()
    internal: bool = False
    icc: bool = True
    masquerade: bool = True
    mappings: tuple[PortMapping, ...] = ()
    # The gateway addresses on the bridge (both families): all an internal network may reach
    # of the host.
    gateways: tuple[IPAddress, ...] = ()
    mode_v4: GatewayMode = "nat"
    mode_v6: GatewayMode = "nat"
    # Host interfaces that reach published container ports directly (mode nat).
    trusted: tuple[str, ...] = ()
    # The source address of egress (SNAT), per family; None: MASQUERADE.
    snat_v4: ipaddress.IPv4Address | None = None
    snat_v6: ipaddress.IPv6Address | None = None
    tunnel: TunnelRules | None = None

    def __hash__(self) -> int:
        # The render cache's key, hashed for every network at every firewall change: computed
        # once (the fields are immutable).
        cached: int | None = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self) -> dict[str, object]:
        # (Not the cached hash: string hashes differ from one process to another.)
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    def subnets(self, family: Family) -> tuple[IPNetwork, ...]:
        return self.subnets_v4 if family == 4 else self.subnets_v6

    def mode(self, family: Family) -> GatewayMode:
        return self.mode_v4 if family == 4 else self.mode_v6

    def snat(self, family: Family) -> IPAddress | None:
        return self.snat_v4 if family == 4 else self.snat_v6


def firewall_view(
    network: Network, mappings: Sequence[PortMapping] = (), tunnel: TunnelRules | None = None
) -> NetworkRules:
    """What the firewall needs to know about ``network``, whose endpoints publish ``mappings``
    (and whose tunnel to other hosts is ``tunnel``, for a network that spans hosts)."""
    return NetworkRules(
        bridge=network.bridge,
        subnets_v4=tuple(s.pool for s in network.subnets_v4),
        subnets_v6=tuple(s.pool for s in network.subnets_v6),
        internal=network.internal,
        icc=network.options.enable_icc,
        masquerade=network.options.enable_ip_masquerade,
        mappings=tuple(mappings),
        gateways=tuple(a.ip for a in network.bridge_addresses),
        mode_v4=network.options.gateway_mode_v4,
        mode_v6=network.options.gateway_mode_v6,
        trusted=network.options.trusted_host_interfaces,
        snat_v4=network.options.host_ipv4,
        snat_v6=network.options.host_ipv6,
        tunnel=tunnel,
    )


def firewall_views(
    networks: Iterable[Network],
    endpoints: Iterable[Endpoint],
    tunnels: Mapping[str, TunnelRules] | None = None,
) -> list[NetworkRules]:
    """The firewall's view of a state: every network but those being deleted (their rules go
    first), each with the ports its endpoints publish. The one way the service, its checks and
    the tools see which rules pybridge wants."""
    mappings: dict[str, list[PortMapping]] = {}
    for endpoint in endpoints:
        mappings.setdefault(endpoint.network_id, []).extend(endpoint.mappings)
    return [
        firewall_view(network, mappings.get(network.id, ()), (tunnels or {}).get(network.id))
        for network in networks
        if network.state != "deleting"
    ]


@dataclass(frozen=True)
class Section:
    """Consecutive rules of one chain. An ordered section holds exactly its rules, in order.
    An unordered one holds its rules in any order: each is another network's, and no packet
    matches two of them with different outcomes. So a network's rule there is added at the
    chain's top or end (``-I CHAIN 1``, ``-A``: iptables-nft reads nothing of the chain for
    those, where a position inside it costs a read of the whole chain) and deleted by its text.
    """

    rules: tuple[str, ...]
    ordered: bool = True


# table -> chain -> its sections: the rules pybridge wants, and where order matters.
Layout = dict[str, dict[str, tuple[Section, ...]]]


# Where a network's rules in the shared chains go: table, chain, and at its top or end.
_Place = tuple[str, str, str]

# A network whose bridge has pybridge's own name (pyb- and 11 hex digits of its id; or any
# name starting with pyb- and a hex digit) has its rules in the shared chains in one of 16
# buckets, by that digit, entered by name prefix (-o pyb-3+): deleting a rule makes
# iptables-nft read the chain that holds it, and a bucket holds a sixteenth of the networks
# (at 500 networks, a delete in a chain holding every network's rules cost 5 ms more per
# table). Other bridges named by the user (bridge.name) have theirs in the shared chain.
BUCKETS = "0123456789abcdef"
FORWARD_IN_BUCKET = "PYBRIDGE-FI-"  # -o B -g its chain
FORWARD_OUT_BUCKET = "PYBRIDGE-FE-"  # -i B: out to the world
ISOLATION_IN_BUCKET = "PYBRIDGE-II-"  # -o B -g its chain
ISOLATION_OUT_BUCKET = "PYBRIDGE-IE-"  # -i B: not into Docker's bridges
POSTROUTING_BUCKET = "PYBRIDGE-PO-"  # -o B: 127.0.0.1 and hairpin


def _bucket(bridge: str) -> str | None:
    """The bucket of every bridge its entry's prefix matches (pyb-3+: a name chosen by the
    user too, pyb-3x: a network its bucket's entry sends there must have its rules there)."""
    if bridge.startswith(BRIDGE_PREFIX) and len(bridge) > len(BRIDGE_PREFIX):
        key = bridge[len(BRIDGE_PREFIX)]
        if key in BUCKETS:
            return key
    return None


ISOLATION_REPLIES = (
    f"-A {ISOLATION_NETWORKS_CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED,DNAT -j RETURN"
)


@dataclass(frozen=True)
class RuleSet:
    """pybridge's rules of one family, as they are made: each network's part, and the rules
    that are nobody's (the loopback drops, the tunnels' rules, the isolation chain's jumps),
    which open their chains."""

    parts: Mapping[str, _NetworkPart]  # by bridge
    leading: Mapping[tuple[str, str], tuple[str, ...]]  # (table, chain) -> its first rules
    # What they were made from: the views, and what a network's part depends on besides its
    # own view (see _network_part).
    views: tuple[NetworkRules, ...] = ()
    docker_named: tuple[str, ...] = ()
    others: tuple[str, ...] = ()


def rule_set(
    networks: Sequence[NetworkRules], family: Family, previous: RuleSet | None = None
) -> RuleSet:
    """What pybridge's chains must hold for ``networks``. Each network's part is rendered once
    per change to it (cached), so this costs a lookup per network; given the rules made for
    the same networks before (``previous``), when only some networks' views changed in ways
    that concern no other network (ports published or revoked), only theirs are looked up."""
    views = tuple(networks)
    if previous is not None:
        patched = _patched(previous, views, family)
        if patched is not None:
            return patched
    docker_named = tuple(sorted(n.bridge for n in views if named_like_docker(n.bridge)))
    others: tuple[str, ...] = ()
    if any(not n.internal and n.mode(family) == "nat-unprotected" for n in views):
        # pybridge's own bridge names are kept out by their prefix (_isolation_rules): only
        # the bridges a user named are listed, so no other network's coming or going changes
        # a nat-unprotected network's chain.
        others = tuple(
            sorted(n.bridge for n in views if not n.internal and not _own_name(n.bridge))
        )
    parts = {net.bridge: _part_of(net, family, docker_named, others) for net in views}
    # The buckets' chains in use (keyed apart from bridges: no interface name has a +).
    for chain in sorted({c for part in parts.values() for c in part.buckets}):
        parts["+" + chain] = _bucket_part(chain)
    tunnels = [n for n in views if n.tunnel is not None]
    leading = {
        ("mangle", ISOLATION_CHAIN): (
            *_tunnel_forward_drops(tunnels, family),
            f"-A {ISOLATION_CHAIN} -j {ISOLATION_INTERNAL_CHAIN}",
            f"-A {ISOLATION_CHAIN} -g {ISOLATION_NETWORKS_CHAIN}",
        ),
        ("raw", RAW_CHAIN): (
            f"-A {RAW_CHAIN} -d {LOOPBACK[family]} ! -i lo -j DROP",
            f"-A {RAW_CHAIN} -s {LOOPBACK[family]} ! -i lo -j DROP",
            *_tunnel_rules(tunnels, family),
        ),
    }
    return RuleSet(parts, leading, views, docker_named, others)


def _own_name(bridge: str) -> bool:
    """Whether ``bridge`` is named like pybridge's own bridges (caught by BRIDGE_PREFIX+)."""
    return bridge.startswith(BRIDGE_PREFIX)


def _part_of(
    net: NetworkRules, family: Family, docker_named: tuple[str, ...], others: tuple[str, ...]
) -> _NetworkPart:
    unprotected = not net.internal and net.mode(family) == "nat-unprotected"
    return _network_part(
        net, family, () if net.internal else docker_named, others if unprotected else ()
    )


def _patched(previous: RuleSet, views: tuple[NetworkRules, ...], family: Family) -> RuleSet | None:
    """``previous`` with the parts of the networks whose views changed made again, when the
    networks are the same ones and nothing the others' parts depend on changed; else None."""
    if len(views) != len(previous.views):
        return None
    changed = [(old, new) for old, new in zip(previous.views, views, strict=True) if old is not new]
    if not changed:
        return previous
    if len(changed) > 8:
        return None  # (many: as cheap to make all again)
    parts = dict(previous.parts)
    for old, new in changed:
        if (
            old.bridge != new.bridge
            or old.internal != new.internal
            or old.mode(family) != new.mode(family)
            or old.tunnel != new.tunnel
        ):
            return None
        part = _part_of(new, family, previous.docker_named, previous.others)
        if part.buckets != parts[old.bridge].buckets:
            return None
        parts[new.bridge] = part
    return RuleSet(parts, previous.leading, views, previous.docker_named, previous.others)


def render_layout(networks: Sequence[NetworkRules], family: Family) -> Layout:
    """pybridge's chains and their rules, per table (see the module's docstring), in the order
    a whole write gives them: each network's in the order of the bridges' names."""
    return layout_of(rule_set(networks, family))


def layout_of(rules: RuleSet) -> Layout:
    parts = [rules.parts[key] for key in sorted(rules.parts)]
    placed: dict[tuple[str, str], dict[str, list[str]]] = {}
    for part in parts:
        for (table, chain, where), rule in part.shared:
            placed.setdefault((table, chain), {}).setdefault(where, []).append(rule)

    def at(table: str, chain: str, *where: str) -> Section:
        found = placed.get((table, chain), {})
        return Section(tuple(r for w in where for r in found.get(w, ())), ordered=False)

    layout: Layout = {table: {} for table in OWN_CHAINS}
    layout["filter"][FORWARD_CHAIN] = (
        at("filter", FORWARD_CHAIN, "top"),
        at("filter", FORWARD_CHAIN, "end"),
    )
    layout["mangle"][ISOLATION_CHAIN] = (Section(rules.leading[("mangle", ISOLATION_CHAIN)]),)
    layout["mangle"][ISOLATION_INTERNAL_CHAIN] = (at("mangle", ISOLATION_INTERNAL_CHAIN, "end"),)
    layout["mangle"][ISOLATION_NETWORKS_CHAIN] = (
        at("mangle", ISOLATION_NETWORKS_CHAIN, "top"),
        Section((ISOLATION_REPLIES,)),
        at("mangle", ISOLATION_NETWORKS_CHAIN, "end"),
    )
    layout["nat"][DNAT_CHAIN] = (at("nat", DNAT_CHAIN, "top"), at("nat", DNAT_CHAIN, "end"))
    layout["nat"][POSTROUTING_CHAIN] = (at("nat", POSTROUTING_CHAIN, "end"),)
    layout["raw"][RAW_CHAIN] = (
        Section(rules.leading[("raw", RAW_CHAIN)]),
        at("raw", RAW_CHAIN, "end"),
    )
    for part in parts:
        for table, chain, chain_rules in part.chains:
            # A bucket's chain holds its networks' rules (in any order); a network's, its own.
            bucket = not chain_rules and (table, chain) in placed
            section = at(table, chain, "top", "end") if bucket else Section(chain_rules)
            layout[table][chain] = (section,)
    return layout


def render_chain_rules(networks: Sequence[NetworkRules], family: Family) -> dict[str, list[str]]:
    """The rules of pybridge's chains, per table, as iptables-save lines (without the header):
    the shared chains first, then each network's, in the order of their bridges' names."""
    return _flat(render_layout(networks, family))


def _flat(layout: Layout) -> dict[str, list[str]]:
    return {
        table: [rule for sections in chains.values() for s in sections for rule in s.rules]
        for table, chains in layout.items()
    }


@dataclass(frozen=True)
class _NetworkPart:
    """One network's rules of one family: its own chains, and its rules in the shared ones."""

    chains: tuple[tuple[str, str, tuple[str, ...]], ...]  # (table, chain, rules)
    shared: tuple[tuple[_Place, str], ...]  # (where, rule)

    @property
    def buckets(self) -> set[str]:
        """The buckets' chains its rules are in."""
        return {chain for (_, chain, _), _ in self.shared if chain[:-1] in _BUCKET_CHAINS}


# A bucket's chain: table, the shared chain that enters it, where, by which interface, how.
_BUCKET_CHAINS: dict[str, tuple[str, str, str, str, str]] = {
    FORWARD_IN_BUCKET: ("filter", FORWARD_CHAIN, "top", "-o", "-g"),
    FORWARD_OUT_BUCKET: ("filter", FORWARD_CHAIN, "end", "-i", "-g"),
    ISOLATION_IN_BUCKET: ("mangle", ISOLATION_NETWORKS_CHAIN, "top", "-o", "-g"),
    ISOLATION_OUT_BUCKET: ("mangle", ISOLATION_NETWORKS_CHAIN, "end", "-i", "-g"),
    POSTROUTING_BUCKET: ("nat", POSTROUTING_CHAIN, "end", "-o", "-j"),
}


@functools.lru_cache(maxsize=128)
def _bucket_part(chain: str) -> _NetworkPart:
    """A bucket's chain (its networks' rules fill it) and the rule that enters it, there while
    a network has rules in it. Entered by goto where it decides (what it does not decide, no
    later rule of the shared chain would), by jump in the nat table (only NAT targets there:
    the rules after it still apply)."""
    prefix, key = chain[:-1], chain[-1]
    table, parent, where, flag, how = _BUCKET_CHAINS[prefix]
    entry = f"-A {parent} {flag} {BRIDGE_PREFIX}{key}+ {how} {chain}"
    return _NetworkPart(((table, chain, ()),), (((table, parent, where), entry),))


@functools.lru_cache(maxsize=8192)
def _network_part(
    net: NetworkRules, family: Family, docker_named: tuple[str, ...], others: tuple[str, ...]
) -> _NetworkPart:
    """Rendered once per network and change (cached): a change to one network at 1,000 costs
    what it costs at 1. ``docker_named``: pybridge's bridges named like Docker's (for networks
    that are not internal); ``others``: the bridges a user named (not pyb-...) of networks that
    are not internal (for a network in mode nat-unprotected, which keeps them out)."""
    b = net.bridge
    f, i = forward_chain(b), isolation_chain(b)
    openings = _openings(net, family)
    chains = [
        ("filter", f, tuple(_forward_rules(f, net, family, docker_named, openings))),
        ("mangle", i, tuple(_isolation_rules(i, net, family, others, openings))),
    ]
    raw_in = ""
    if net.internal:
        r = raw_chain(b)
        chains.append(("raw", r, tuple(_raw_rules(r, net, family))))
        raw_in = f"-A {RAW_CHAIN} -i {b} -g {r}"
    dnat_first: tuple[str, ...] = ()
    dnat: tuple[str, ...] = ()
    if net.internal:
        # No published port is reachable from an internal network, not even through its
        # gateway.
        dnat_first = (f"-A {DNAT_CHAIN} -i {b} -j RETURN",)
    else:
        mappings = sorted(
            (m for m in net.mappings if m.family == family and not m.direct),
            key=lambda m: (m.proto, m.host_port, str(m.host_ip or "")),
        )
        dnat = tuple(_dnat_rule(m) for m in mappings)
    key = _bucket(b)
    fwd_in = ("filter", FORWARD_IN_BUCKET + key if key else FORWARD_CHAIN, "top")
    fwd_out = ("filter", FORWARD_OUT_BUCKET + key if key else FORWARD_CHAIN, "end")
    iso_in = ("mangle", ISOLATION_IN_BUCKET + key if key else ISOLATION_NETWORKS_CHAIN, "top")
    iso_out = ("mangle", ISOLATION_OUT_BUCKET + key if key else ISOLATION_NETWORKS_CHAIN, "end")
    post_out = ("nat", POSTROUTING_BUCKET + key if key else POSTROUTING_CHAIN, "end")
    post = ("nat", POSTROUTING_CHAIN, "end")
    shared: list[tuple[_Place, str]] = [
        (fwd_in, f"-A {fwd_in[1]} -o {b} -g {f}"),
        (fwd_out, f"-A {fwd_out[1]} -i {b} -j {'DROP' if net.internal else 'ACCEPT'}"),
        (iso_in, f"-A {iso_in[1]} -o {b} -g {i}"),
    ]
    if net.internal:
        internal = ("mangle", ISOLATION_INTERNAL_CHAIN, "end")
        shared += [
            (internal, f"-A {ISOLATION_INTERNAL_CHAIN} ! -i {b} -o {b} -j DROP"),
            (internal, f"-A {ISOLATION_INTERNAL_CHAIN} -i {b} ! -o {b} -j DROP"),
        ]
    else:
        shared += [
            (iso_out, f"-A {iso_out[1]} -i {b} -o {p} -j DROP") for p in CONTAINER_BRIDGE_PATTERNS
        ]
    shared += [(("nat", DNAT_CHAIN, "top"), rule) for rule in dnat_first]
    shared += [(("nat", DNAT_CHAIN, "end"), rule) for rule in dnat]
    for rule in _postrouting_rules(net, family):
        if " ! -o " in rule:  # egress: not by its bridge
            shared.append((post, rule))
        else:
            shared.append((post_out, rule.replace(POSTROUTING_CHAIN, post_out[1], 1)))
    if raw_in:
        shared.append((("raw", RAW_CHAIN, "end"), raw_in))
    return _NetworkPart(tuple(chains), tuple(shared))


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


_DOCKER_NAMES = frozenset(p for p in CONTAINER_BRIDGE_PATTERNS if not p.endswith("+"))
_DOCKER_PREFIXES = tuple(p[:-1] for p in CONTAINER_BRIDGE_PATTERNS if p.endswith("+"))


def named_like_docker(bridge: str) -> bool:
    """Whether an interface pattern of Docker's container bridges matches ``bridge``."""
    return bridge in _DOCKER_NAMES or bridge.startswith(_DOCKER_PREFIXES)


def _from_own_bridge(chain: str, a: str, net: NetworkRules, family: Family) -> list[str]:
    """What the filter accepts from pybridge's bridge ``a`` into ``net``'s bridge (non-internal)
    ahead of the RETURNs for Docker's bridge names: the same as the rules below the RETURNs
    accept from it (published ports; within one network, ICC; the routed openings)."""
    b = net.bridge
    rules = [f"-A {chain} -i {a} -o {b} -m conntrack --ctstate DNAT -j ACCEPT"]
    if a == b:
        rules.append(f"-A {chain} -i {b} -o {b} -j {'ACCEPT' if net.icc else 'DROP'}")
        return rules
    for match in _openings(net, family):
        if " -i " in f" {match}":
            continue  # a trusted host interface, not a bridge
        # Where iptables-save writes -i: after -s/-d, before -o.
        rules.append(f"-A {chain} {match.replace(f'-o {b}', f'-i {a} -o {b}', 1)} -j ACCEPT")
    return rules


def _forward_rules(
    chain: str,
    net: NetworkRules,
    family: Family,
    docker_named: Sequence[str],
    openings: Sequence[str],
) -> list[str]:
    """A network's filter chain: what may get in to its bridge (entered for ``-o B``; every
    packet ends in a verdict here, or a RETURN to FORWARD for Docker's networks)."""
    b = net.bridge
    fwd = [f"-A {chain} -o {b} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"]
    if not net.internal:
        # New traffic from Docker's own networks (what mangle let in: published ports, routed
        # openings) is Docker's to accept or not: it drops what comes from its --internal
        # networks further down FORWARD, and accepts the rest. Accepting it here would let a
        # container of a Docker internal network out through a port pybridge publishes.
        # pybridge's own bridges named like Docker's (with bridge.name) go on below.
        for a in docker_named:
            fwd += _from_own_bridge(chain, a, net, family)
        fwd += [f"-A {chain} -i {p} -o {b} -j RETURN" for p in CONTAINER_BRIDGE_PATTERNS]
        # Published ports (pybridge's DNAT), from anywhere, hairpin included.
        fwd.append(f"-A {chain} -o {b} -m conntrack --ctstate DNAT -j ACCEPT")
    fwd.append(f"-A {chain} -i {b} -o {b} -j {'ACCEPT' if net.icc else 'DROP'}")
    fwd += [f"-A {chain} {match} -j ACCEPT" for match in openings]
    # nat-unprotected: whatever mangle let in from outside the network, every port.
    unprotected = not net.internal and net.mode(family) == "nat-unprotected"
    fwd.append(f"-A {chain} -o {b} -j {'ACCEPT' if unprotected else 'DROP'}")
    return fwd


def _isolation_rules(
    chain: str, net: NetworkRules, family: Family, others: Sequence[str], openings: Sequence[str]
) -> list[str]:
    """A network's mangle chain: what may get in to its bridge from elsewhere (entered for
    ``-o B``, after the internal networks' drops; a RETURN or the chain's end lets it pass)."""
    b = net.bridge
    # Traffic within one network is left to filter (ICC), so no drop below can match a bridge
    # that happens to be named like Docker's (br-x, docker0). Written in iptables-save's own
    # order (-i before -o), so saved rules compare equal.
    iso = [f"-A {chain} -i {b} -o {b} -j RETURN"]
    if net.internal:
        return iso  # the rest was dropped before (ISOLATION_INTERNAL_CHAIN)
    iso.append(f"-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED,DNAT -j RETURN")
    # What the gateway mode opens, before the drops.
    iso += [f"-A {chain} {match} -j RETURN" for match in openings]
    if net.mode(family) == "nat-unprotected":
        # Open to the outside, not to the other container networks: pybridge's by their
        # names' prefix (this bridge's own traffic returned above), those a user named one by
        # one, and Docker's.
        iso.append(f"-A {chain} -i {BRIDGE_PREFIX}+ -o {b} -j DROP")
        iso += [f"-A {chain} -i {x} -o {b} -j DROP" for x in others if x != b]
        iso += [f"-A {chain} -i {p} -o {b} -j DROP" for p in CONTAINER_BRIDGE_PATTERNS]
    else:
        iso.append(f"-A {chain} ! -i {b} -o {b} -j DROP")
    return iso


def _raw_rules(chain: str, net: NetworkRules, family: Family) -> list[str]:
    """An internal network's raw chain (entered for ``-i B``): only its own gateway addresses
    (and ICMPv6 to the bridge's link-local address, which neighbour discovery needs) of all
    the host's addresses. Both families whatever the network's subnets: a container can
    address the host over IPv6 link-local alone."""
    b = net.bridge
    raw = [
        f"-A {chain} -d {gw}/{gw.max_prefixlen} -i {b} -j RETURN"
        for gw in net.gateways
        if gw.version == family
    ]
    if family == 6 and net.mode_v6 != "isolated":  # (isolated: no link-local address)
        raw.append(f"-A {chain} -d fe80::/10 -i {b} -p ipv6-icmp -j RETURN")
    raw.append(f"-A {chain} -i {b} -m addrtype --dst-type LOCAL -j DROP")
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


def _postrouting_rules(net: NetworkRules, family: Family) -> list[str]:
    if net.internal or net.mode(family) == "routed":
        return []  # routed: no NAT of this family at all, containers keep their own addresses
    b = net.bridge
    post: list[str] = []
    if family == 4:
        # 127.0.0.1:PORT from the host: DNAT'd in OUTPUT, routed out the bridge
        # (route_localnet), and given the bridge's address so the container can answer.
        post.append(f"-A {POSTROUTING_CHAIN} -s 127.0.0.0/8 -o {b} -j MASQUERADE")
    for subnet in net.subnets(family):
        # Hairpin: a container reaching a published port of its own network through a host
        # address must see the reply come from that address, not from its neighbour.
        post.append(
            f"-A {POSTROUTING_CHAIN} -s {subnet} -o {b} -m conntrack --ctstate DNAT -j MASQUERADE"
        )
        if net.masquerade:
            source = net.snat(family)
            target = f"SNAT --to-source {source}" if source else "MASQUERADE"
            post.append(f"-A {POSTROUTING_CHAIN} -s {subnet} ! -o {b} -j {target}")
    return post


def _dnat_rule(m: PortMapping) -> str:
    dest = ""
    if m.host_ip is not None:
        dest = f"-d {m.host_ip}/{32 if m.family == 4 else 128} "
    return (
        f"-A {DNAT_CHAIN} {dest}-p {m.proto} -m {m.proto} --dport {m.host_port} "
        f"-j DNAT --to-destination {m.container_text()}"
    )


def parse_save(save_text: str) -> dict[str, tuple[set[str], list[str]]]:
    """Split iptables-save output into table -> (chain names, rule lines)."""
    tables: dict[str, tuple[set[str], list[str]]] = {}
    current: tuple[set[str], list[str]] | None = None
    for raw in save_text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            current = tables.setdefault(line[1:], (set(), []))
        elif current is None or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            current[0].add(line[1:].split()[0])
        elif line.startswith("-A "):
            current[1].append(line)
    return tables


def _jump_fixes(jump: Jump, rules: list[str]) -> list[str]:
    """Lines that make exactly one copy of ``jump`` exist, in its place: right after the
    ``after_target`` jump when there is one, else first. Anything inserted above it since (a
    dockerd started after pybridge puts its ACCEPT rules first) gets it moved back up."""
    chain_rules = [r for r in rules if r.split()[1] == jump.chain]
    ours = [i for i, r in enumerate(chain_rules) if r == jump.spec]
    position = 1  # 1-based, counted without our own jump
    if jump.after_target:
        remaining = [r for r in chain_rules if r != jump.spec]
        for i, rule in enumerate(remaining):
            if rule == f"-A {jump.chain} -j {jump.after_target}":
                position = i + 2
                break
    if ours == [position - 1]:
        return []
    # Deleting by spec removes the first match each time, so one delete per copy.
    lines = [f"-D {jump.chain} {jump.rule}" for _ in ours]
    lines.append(f"-I {jump.chain} {position} {jump.rule}")
    return lines


CHAIN_PREFIX = "PYBRIDGE-"


def _removal(chains: Sequence[str], rules: list[str]) -> list[str]:
    """Lines that remove ``chains``: every rule elsewhere that jumps to them (our jumps from
    the built-in chains included), then a flush and -X of each."""
    targets = set(chains)
    refs = [
        "-D " + rule[3:]
        for rule in rules
        if rule.split()[-1] in targets
        and rule.split()[-2] == "-j"
        and rule.split()[1] not in targets
    ]
    return refs + [f":{c} - [0:0]" for c in chains] + [f"-X {c}" for c in chains]


@dataclass(frozen=True)
class _Table:
    """One table as render_restore and drift see it: what is there, and what pybridge wants."""

    name: str
    chains: set[str]  # chain names present
    rules: list[str]  # rule lines present
    layout: dict[str, tuple[Section, ...]]  # pybridge's chains it should have (none: no networks)
    stale: list[str]  # PYBRIDGE-* chains present that it should not have

    @property
    def own(self) -> tuple[str, ...]:
        return tuple(self.layout)

    @property
    def wanted(self) -> list[str]:
        """The rules pybridge's chains should hold, in the order a whole write gives them."""
        return [rule for sections in self.layout.values() for s in sections for rule in s.rules]

    @property
    def jumps(self) -> list[Jump]:
        """The jumps into pybridge's chains this table should have."""
        return [j for j in JUMPS if j.table == self.name and j.target in self.layout]


def _tables(networks: Sequence[NetworkRules], family: Family, current_save: str) -> list[_Table]:
    """Every table pybridge has (or had) chains in, or that the current rules show."""
    current = parse_save(current_save)
    layout = render_layout(networks, family) if networks else {}
    tables = []
    for table in sorted(set(OWN_CHAINS) | set(current)):
        names, rules = current.get(table, (set(), []))
        chains = layout.get(table, {})
        stale = sorted(c for c in names if c.startswith(CHAIN_PREFIX) and c not in chains)
        tables.append(_Table(table, names, rules, chains, stale))
    return tables


def render_restore(networks: Sequence[NetworkRules], family: Family, current_save: str) -> str:
    """The complete ``iptables-restore --noflush`` input that makes the host match ``networks``.

    With no networks left, pybridge's jumps and chains are removed entirely. Chains named
    PYBRIDGE-* that are not wanted (a removed network's, or an older version's) are removed
    too. Returns "" when nothing needs doing (no networks and nothing of ours present).
    """
    out: list[str] = []
    for t in _tables(networks, family, current_save):
        if not t.own and not t.stale:
            continue
        out.append(f"*{t.name}")
        out += [f":{chain} - [0:0]" for chain in t.own]
        out += t.wanted
        for jump in t.jumps:
            out += _jump_fixes(jump, t.rules)
        # References from our own chains were just reset; only foreign ones remain.
        own = set(t.own)
        out += _removal(t.stale, [r for r in t.rules if r.split()[1] not in own])
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def _by_chain(rules: Iterable[str]) -> dict[str, list[str]]:
    chains: dict[str, list[str]] = {}
    for rule in rules:
        chains.setdefault(rule.split()[1], []).append(rule)
    return chains


def _edits(chain: str, before: list[str], after: list[str], offset: int = 0) -> list[str]:
    """``iptables-restore`` lines that turn ``before`` into ``after``, the rules of ``chain``
    from position ``offset`` on, rule by rule: ``-D CHAIN N`` and ``-I CHAIN N RULE``. Worked
    from the end back, so the positions of the part not yet done are still those of
    ``before``. (Each needs iptables-nft to read the chain: for small chains.)"""
    lines: list[str] = []
    start = _common_start(before, after)
    end = _common_start(before[start:][::-1], after[start:][::-1])
    old, new = before[start : len(before) - end], after[start : len(after) - end]
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    base = offset + start + 1
    for tag, i1, i2, j1, j2 in reversed(matcher.get_opcodes()):
        if tag == "equal":
            continue
        lines += [f"-D {chain} {base + i1}"] * (i2 - i1)  # each delete moves the next up
        lines += [f"-I {chain} {base + i1 + k} {_spec(rule)}" for k, rule in enumerate(new[j1:j2])]
    return lines


def _spec(rule: str) -> str:
    """A rule line without its "-A CHAIN"."""
    return rule.split(" ", 2)[2]


def _common_start(a: Sequence[str], b: Sequence[str]) -> int:
    """How many leading items ``a`` and ``b`` share (compared 64 at a time, then one by one)."""
    n, most = 0, min(len(a), len(b))
    while n + 64 <= most and a[n : n + 64] == b[n : n + 64]:
        n += 64
    while n < most and a[n] == b[n]:
        n += 1
    return n


def _part_edits(
    old: _NetworkPart | None, new: _NetworkPart | None, out: dict[str, list[list[str]]]
) -> None:
    """The lines that turn one network's rules from ``old`` into ``new`` (None: it has none),
    into ``out``: table -> [chains to declare, edits, chains to drop]. Its rules in the shared
    chains are deleted by text and added at the chain's top or end; its own chains are
    created, edited rule by rule (they are small) or dropped."""
    old_shared = set(old.shared) if old is not None else set()
    new_shared = set(new.shared) if new is not None else set()
    for (table, chain, _), rule in old.shared if old is not None else ():
        if ((table, chain, _), rule) not in new_shared:
            out[table][1].append(f"-D {chain} {_spec(rule)}")
    added = [item for item in (new.shared if new is not None else ()) if item not in old_shared]
    for (table, chain, where), rule in reversed(added):
        if where == "top":
            out[table][1].append(f"-I {chain} 1 {_spec(rule)}")
    for (table, _, where), rule in added:
        if where == "end":
            out[table][1].append(rule)
    old_chains = {chain: (table, rules) for table, chain, rules in old.chains} if old else {}
    for table, chain, rules in new.chains if new is not None else ():
        before = old_chains.pop(chain, None)
        if before is None:
            out[table][0].append(f":{chain} - [0:0]")
            out[table][1] += rules
        elif before[1] != rules:
            out[table][1] += _edits(chain, list(before[1]), list(rules))
    for chain, (table, _) in old_chains.items():  # once the rules that enter them are gone
        out[table][2] += [f":{chain} - [0:0]", f"-X {chain}"]


def incremental_restore(before: RuleSet, after: RuleSet) -> str | None:
    """The ``iptables-restore --noflush`` input that turns pybridge's chains from ``before``
    (what the last write left) into ``after``, writing only what differs: a new network's
    chains and its rules in the shared chains (added at their top or end), a removed network's
    rules deleted by text and its chains dropped, a changed network's chain edited. A
    transaction the size of the change, planned at the cost of a look at each network's part,
    and nothing in it makes iptables-nft read a chain that holds every network's rules but
    the deletes (which do: a few milliseconds at 1,000 networks).

    It relies on the chains holding exactly ``before`` (the self-healing check finds and
    rewrites chains that someone else changed). None when a whole write is needed instead:
    no networks before or after (the chains and jumps come or go). "" when nothing differs."""
    if not before.parts or not after.parts:
        return None
    out: dict[str, list[list[str]]] = {table: [[], [], []] for table in OWN_CHAINS}
    for (table, chain), rules in after.leading.items():
        old = before.leading.get((table, chain), ())
        if old != rules:  # the chain's first rules: positions from its top
            out[table][1] += _edits(chain, list(old), list(rules))
    for bridge, part in after.parts.items():
        old_part = before.parts.get(bridge)
        if old_part is not part:
            _part_edits(old_part, part, out)
    for bridge, old_part in before.parts.items():
        if bridge not in after.parts:
            _part_edits(old_part, None, out)
    text: list[str] = []
    for table in sorted(out):
        declared, lines, dropped = out[table]
        if declared or lines or dropped:
            flushes = [line for line in dropped if line.startswith(":")]
            removals = [line for line in dropped if line.startswith("-X")]
            text += [f"*{table}", *declared, *lines, *flushes, *removals, "COMMIT"]
    return "\n".join(text) + "\n" if text else ""


def _holds(rules: list[str], sections: tuple[Section, ...]) -> bool:
    """Whether a chain's ``rules`` are what ``sections`` want (unordered ones in any order)."""
    if len(rules) != sum(len(s.rules) for s in sections):
        return False
    offset = 0
    for s in sections:
        part = rules[offset : offset + len(s.rules)]
        offset += len(s.rules)
        if part != list(s.rules) and (s.ordered or Counter(part) != Counter(s.rules)):
            return False
    return True


def drift(networks: Sequence[NetworkRules], family: Family, current_save: str) -> list[str]:
    """How the host's rules differ from what pybridge wants, one line per problem; [] when
    they match. Used to repair the firewall when someone else flushed or reloaded it."""
    problems: list[str] = []
    for t in _tables(networks, family, current_save):
        if t.stale:
            problems.append(f"{t.name}: leftover chain(s) {_some(t.stale)}")
        if not t.own:
            continue
        missing_chains = [c for c in t.own if c not in t.chains]
        if missing_chains:
            problems.append(f"{t.name}: chain(s) {_some(missing_chains)} missing")
        have = _by_chain(r for r in t.rules if r.split()[1] in t.layout)
        if not all(_holds(have.get(c, []), sections) for c, sections in t.layout.items()):
            flat_have = [r for rules in have.values() for r in rules]
            missing = sum((Counter(t.wanted) - Counter(flat_have)).values())
            extra = sum((Counter(flat_have) - Counter(t.wanted)).values())
            detail = (
                f"{missing} missing, {extra} unexpected" if missing or extra else "out of order"
            )
            problems.append(f"{t.name}: pybridge rules differ ({detail})")
        for jump in t.jumps:
            if _jump_fixes(jump, t.rules):
                problems.append(f"{t.name}: jump '{jump.spec}' missing, duplicated or out of place")
    return problems


def _some(names: Sequence[str], most: int = 4) -> str:
    """Names for a message: the first few, and how many more."""
    if len(names) <= most:
        return ", ".join(names)
    return f"{', '.join(names[:most])} and {len(names) - most} more"


def pybridge_rules_in(save_text: str) -> dict[str, list[str]]:
    """The rules currently in pybridge's chains (for diagnostics and tests)."""
    current = parse_save(save_text)
    result: dict[str, list[str]] = {}
    for table in OWN_CHAINS:
        rules = current.get(table, (set(), []))[1]
        result[table] = [r for r in rules if r.split()[1].startswith(CHAIN_PREFIX)]
    return result


def jumps_present(save_text: str) -> list[str]:
    current = parse_save(save_text)
    found = []
    for jump in JUMPS:
        rules = current.get(jump.table, (set(), []))[1]
        found += [r for r in rules if r == jump.spec]
    return found


def mentions(save_text: str, names: Iterable[str]) -> list[str]:
    """Rule lines that mention any of ``names`` as a whole word (bridge names, subnets)."""
    wanted = set(names)
    lines = []
    for line in save_text.splitlines():
        if set(line.split()) & wanted:
            lines.append(line)
    return lines
