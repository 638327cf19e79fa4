"""The firewall's layout of issue 17 (per-network chains entered by goto, buckets by bridge
name prefix, unordered sections) decides every packet the way the flat layout before it did
(tests/unit/flat_rules.py, the reference), table by table and family by family.

Both rule sets are read by tests/unit/iptables_eval.py, for random sets of networks of every
kind and random packets between every pair of interfaces that matter. The new layout is read
as a whole write leaves it, and with its unordered sections shuffled (as writes of single
changes leave them: added at a chain's top or end).
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pydriver.model import Family, GatewayMode, IPAddress, PortMapping, Protocol
from pydriver.rules import (
    DNAT_CHAIN,
    FORWARD_CHAIN,
    ISOLATION_CHAIN,
    POSTROUTING_CHAIN,
    RAW_CHAIN,
    Layout,
    NetworkRules,
    TunnelRules,
    render_layout,
)

from . import flat_rules
from .iptables_eval import (
    Chains,
    Outcome,
    Packet,
    UnknownRule,
    chains_of,
    check_chains,
    evaluate,
)

# table -> the chains pybridge's jumps enter it at
ENTRIES: dict[str, tuple[str, ...]] = {
    "mangle": (ISOLATION_CHAIN,),
    "filter": (FORWARD_CHAIN,),
    "nat": (POSTROUTING_CHAIN, DNAT_CHAIN),
    "raw": (RAW_CHAIN,),
}

HEX = "0123456789abcdef"
# Bridges named by the user (bridge.name): Docker-like names, and names in no bucket.
USER_NAMES: tuple[str, ...] = (
    "br-x",
    "br-0123456789ab",
    "br-pbtrouted",
    "docker0",
    "docker_gwbridge",
    "pbtuser",
    "pbtuser2",
)
# Interfaces that are no pybridge network's bridge.
OTHER_IFACES: tuple[str, ...] = ("docker0", "br-abc", "docker_gwbridge", "eth0", "lo", "eth1")
# Names a bucket's entry (-i/-o pyb-K+) catches although the bucket holds no such network: a
# user's bridge.name that starts like pybridge's own names, and the bridge of a network that
# is not in the rule set (being deleted, or another pybridge's). See KNOWN DIFFERENCE below.
PREFIX_NAMES: tuple[str, ...] = ("pyb-0", "pyb-3x", "pyb-fabcdefabcde")
STRAY_IFACES: tuple[str, ...] = ("pyb-f00000000ff", "pyb-3000000000a")
TRUSTED = ("eth1", "flannel.1")
TUNNEL_MEMBERS: tuple[IPAddress, ...] = (
    ipaddress.ip_address("203.0.113.2"),
    ipaddress.ip_address("203.0.113.3"),
    ipaddress.ip_address("2001:db8:1::2"),
)
HOST_IPS: dict[Family, tuple[IPAddress | None, ...]] = {
    4: (None, None, ipaddress.ip_address("192.0.2.2"), ipaddress.ip_address("127.0.0.1")),
    6: (None, None, ipaddress.ip_address("2001:db8::1")),
}
OUTSIDE: dict[Family, tuple[IPAddress, ...]] = {
    4: tuple(
        ipaddress.ip_address(a)
        for a in ("192.0.2.99", "192.0.2.2", "127.0.0.1", "203.0.113.2", "203.0.113.3")
    ),
    6: tuple(
        ipaddress.ip_address(a)
        for a in ("2001:db8::99", "2001:db8::1", "::1", "fe80::1", "2001:db8:1::2")
    ),
}


@st.composite
def bridge_names(draw: st.DrawFn, user_names: Sequence[str] = USER_NAMES) -> str:
    if draw(st.booleans()):
        # Few buckets, so that several networks share one.
        first = draw(st.sampled_from("03f"))
        rest = draw(st.text(HEX, min_size=10, max_size=10))
        return f"pyb-{first}{rest}"
    return draw(st.sampled_from(user_names))


@st.composite
def network_sets(
    draw: st.DrawFn, names: st.SearchStrategy[str] | None = None
) -> list[NetworkRules]:
    bridges = draw(
        st.lists(
            names if names is not None else bridge_names(), min_size=1, max_size=6, unique=True
        )
    )
    port = iter(range(20000, 30000))  # host ports: each published once on the host
    return [_network(draw, i, bridge, port) for i, bridge in enumerate(bridges)]


def _mode(draw: st.DrawFn, internal: bool) -> GatewayMode:
    if internal:
        return draw(st.sampled_from(["nat", "isolated"]))
    return draw(st.sampled_from(["nat", "nat", "nat-unprotected", "routed"]))


def _network(draw: st.DrawFn, i: int, bridge: str, port: Iterator[int]) -> NetworkRules:
    v4 = ipaddress.ip_network(f"10.216.{i}.0/24")
    v6 = ipaddress.ip_network(f"fd00:216:{i}::/64")
    has_v6 = draw(st.booleans())
    internal = draw(st.booleans()) and draw(st.booleans())
    mode_v4, mode_v6 = _mode(draw, internal), _mode(draw, internal)
    gateways: list[IPAddress] = []
    if mode_v4 != "isolated":
        gateways.append(v4[1])
    if has_v6 and mode_v6 != "isolated":
        gateways.append(v6[1])
    mappings: list[PortMapping] = []
    for family, subnet, mode in ((4, v4, mode_v4), (6, v6, mode_v6)):
        if family == 6 and not has_v6:
            continue
        for _ in range(draw(st.integers(0, 3))):
            proto: Protocol = draw(st.sampled_from(["tcp", "tcp", "udp", "sctp"]))
            cip = subnet[draw(st.sampled_from([2, 3]))]
            cport = draw(st.sampled_from([80, 53, 443]))
            if mode == "routed":
                mappings.append(PortMapping(proto, None, 0, cip, cport))
            else:
                host_ip = draw(st.sampled_from(HOST_IPS[family]))  # type: ignore[index]
                mappings.append(PortMapping(proto, host_ip, next(port), cip, cport))
    tunnel = None
    if draw(st.integers(0, 3)) == 0:
        members = draw(st.lists(st.sampled_from(TUNNEL_MEMBERS), unique=True, max_size=3))
        tunnel = TunnelRules(draw(st.sampled_from([4789, 4790])), tuple(members))
    return NetworkRules(
        bridge=bridge,
        subnets_v4=(v4,),
        subnets_v6=(v6,) if has_v6 else (),
        internal=internal,
        icc=draw(st.booleans()) or draw(st.booleans()),
        masquerade=draw(st.booleans()) or draw(st.booleans()),
        mappings=tuple(mappings),
        gateways=tuple(gateways),
        mode_v4=mode_v4,
        mode_v6=mode_v6,
        trusted=draw(st.sampled_from([(), (), ("eth1",), TRUSTED])),
        snat_v4=draw(st.sampled_from([None, None, ipaddress.IPv4Address("192.0.2.5")])),
        snat_v6=draw(st.sampled_from([None, None, ipaddress.IPv6Address("2001:db8::5")])),
        tunnel=tunnel,
    )


def interfaces(networks: Sequence[NetworkRules], others: Sequence[str] = OTHER_IFACES) -> list[str]:
    return sorted({n.bridge for n in networks} | set(others))


def addresses(networks: Sequence[NetworkRules], family: Family) -> list[IPAddress]:
    found: set[IPAddress] = set(OUTSIDE[family])
    for net in networks:
        for subnet in net.subnets(family):
            found |= {subnet[1], subnet[2], subnet[3]}
        found |= {m.container_ip for m in net.mappings if m.family == family}
    return sorted(found, key=lambda a: (a.version, int(a)))


def ports(networks: Sequence[NetworkRules]) -> list[int]:
    found = {1234, 4789, 4790}
    for net in networks:
        for m in net.mappings:
            found |= {m.host_port, m.container_port}
    return sorted(found)


CTSTATES = (
    frozenset({"NEW"}),
    frozenset({"NEW"}),
    frozenset({"NEW", "DNAT"}),
    frozenset({"ESTABLISHED"}),
    frozenset({"ESTABLISHED", "DNAT"}),
    frozenset({"RELATED"}),
)


def random_packet(
    rng: random.Random,
    iif: str,
    oif: str,
    addrs: Sequence[IPAddress],
    port_list: Sequence[int],
    family: Family,
) -> Packet:
    proto = rng.choice(["tcp", "tcp", "udp", "sctp", "icmp"])
    if proto == "icmp" and family == 6:
        proto = "ipv6-icmp"
    icmp_types = [8, 0, 3] if family == 4 else [128, 129, 1]
    return Packet(
        iif=iif,
        oif=oif,
        src=rng.choice(addrs),
        dst=rng.choice(addrs),
        proto=proto,
        dport=rng.choice(port_list) if proto in ("tcp", "udp", "sctp") else None,
        icmp_type=rng.choice(icmp_types) if "icmp" in proto else None,
        ctstate=rng.choice(CTSTATES),
        dst_local=rng.random() < 0.4,
        rpfilter=rng.random() < 0.8,
    )


def packets(
    networks: Sequence[NetworkRules],
    family: Family,
    rng: random.Random,
    others: Sequence[str] = OTHER_IFACES,
) -> list[Packet]:
    """A packet between every pair of interfaces (and out of/into itself), then some more."""
    ifaces = interfaces(networks, others)
    addrs, port_list = addresses(networks, family), ports(networks)
    found = [
        random_packet(rng, iif, oif, addrs, port_list, family) for iif in ifaces for oif in ifaces
    ]
    found += [
        random_packet(rng, rng.choice(ifaces), rng.choice(ifaces), addrs, port_list, family)
        for _ in range(100)
    ]
    return found


def layout_chains(layout: Layout, table: str, rng: random.Random | None = None) -> Chains:
    """A table of the new layout as chain -> rules; with ``rng``, each unordered section in
    a random order (any order must do)."""
    chains: dict[str, list[str]] = {}
    for chain, sections in layout[table].items():
        rules: list[str] = []
        for section in sections:
            part = list(section.rules)
            if rng is not None and not section.ordered:
                rng.shuffle(part)
            rules += part
        chains[chain] = rules
    return chains


def flat_chains(networks: Sequence[NetworkRules], family: Family, table: str) -> Chains:
    flat = chains_of(flat_rules.render_chain_rules(networks, family)[table])
    for chain in flat_rules.FLAT_CHAINS[table]:
        flat.setdefault(chain, [])
    return flat


@dataclass(frozen=True)
class Difference:
    table: str
    entry: str
    packet: Packet
    flat: Outcome
    new: Outcome

    def __str__(self) -> str:
        return (
            f"{self.table} (entered at {self.entry}): {self.packet}\n"
            f"  flat: {self.flat}\n  new:  {self.new}"
        )


def differences(
    networks: Sequence[NetworkRules],
    family: Family,
    seed: int,
    shuffled: bool,
    others: Sequence[str] = OTHER_IFACES,
) -> list[Difference]:
    """Every packet of a random sample the two layouts decide differently."""
    rng = random.Random(seed)
    layout = render_layout(networks, family)
    found: list[Difference] = []
    sample = packets(networks, family, rng, others)
    for table, entries in ENTRIES.items():
        old = flat_chains(networks, family, table)
        new = layout_chains(layout, table, rng if shuffled else None)
        check_chains(old)
        check_chains(new)
        for entry in entries:
            for packet in sample:
                a, b = evaluate(old, entry, packet), evaluate(new, entry, packet)
                if a.verdict != b.verdict:
                    found.append(Difference(table, entry, packet, a, b))
    return found


def describe(networks: Sequence[NetworkRules], found: list[Difference]) -> str:
    nets = "\n".join(f"  {n}" for n in networks)
    return f"{len(found)} packet(s) decided differently; networks:\n{nets}\nfirst:\n{found[0]}"


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(network_sets(), st.integers(0, 2**32), st.sampled_from([4, 6]))
def test_the_layout_decides_every_packet_as_the_flat_rules_did(
    networks: list[NetworkRules], seed: int, family: Family
) -> None:
    found = differences(networks, family, seed, shuffled=False)
    assert not found, describe(networks, found)


@SETTINGS
@given(network_sets(), st.integers(0, 2**32), st.sampled_from([4, 6]))
def test_any_order_of_the_unordered_sections_decides_the_same(
    networks: list[NetworkRules], seed: int, family: Family
) -> None:
    """What writes of single changes leave (a network's rules added at a shared chain's top or
    end) decides as a whole write does."""
    found = differences(networks, family, seed, shuffled=True)
    assert not found, describe(networks, found)


# ---------------------------------------------------------------------------------------------
# The evaluator itself
# ---------------------------------------------------------------------------------------------

A, B = ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2")


def test_the_evaluator_follows_jumps_gotos_and_returns() -> None:
    chains = {
        "TOP": ["-A TOP -i a+ -j SUB", "-A TOP -o x -g GONE", "-A TOP -j ACCEPT"],
        "SUB": ["-A SUB ! -o y -j RETURN", "-A SUB -j DROP"],
        "GONE": ["-A GONE -s 10.0.0.2/32 -j DROP"],
    }
    check_chains(chains)
    # -j: SUB's RETURN comes back to TOP's next rule; -g: GONE's end leaves TOP too.
    assert evaluate(chains, "TOP", Packet("a1", "z", A, B)).verdict == "ACCEPT"
    assert evaluate(chains, "TOP", Packet("a1", "y", A, B)).verdict == "DROP"
    assert evaluate(chains, "TOP", Packet("b", "x", A, B)).verdict == "CONTINUE"
    assert evaluate(chains, "TOP", Packet("b", "x", B, A)).verdict == "DROP"
    nat = {"N": ["-A N -d 10.0.0.2/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 1.2.3.4:8"]}
    assert evaluate(nat, "N", Packet("a", "b", A, B, dport=80)).verdict == (
        "DNAT --to-destination 1.2.3.4:8"
    )
    assert evaluate(nat, "N", Packet("a", "b", A, B, proto="udp", dport=80)).verdict == "CONTINUE"


@pytest.mark.parametrize(
    "rule",
    [
        "-A C -m comment --comment x -j ACCEPT",  # an unknown module
        "-A C --sport 80 -j ACCEPT",  # an unknown option
        "-A C --dport 80 -j ACCEPT",  # a port without its protocol
        "-A C -p tcp -m udp --dport 80 -j ACCEPT",
        "-A C ! -p tcp -j ACCEPT",  # a negation it does not read
        "-A C -m conntrack --ctstate NEW,UNTRACKED -j ACCEPT",
        "-A C -j ACCEPT --log-prefix x",
        "-A C -g DROP",
        "-A C -j MISSING",  # a chain that does not exist
    ],
)
def test_the_evaluator_refuses_what_it_does_not_understand(rule: str) -> None:
    with pytest.raises(UnknownRule):
        check_chains({"C": [rule]})


# ---------------------------------------------------------------------------------------------
# THE FIRST DIFFERENCE, stricter and deliberate: a bucket's entry matches by name prefix
# (-o pyb-3+ -g PYBRIDGE-FI-3), and a goto whose chain ends without a verdict returns to the
# built-in chain. Every bridge the prefix matches is in that bucket (a user's pyb-3x too), so
# only an interface that is no network's bridge in the rule set (pyb-<hex>...: a network being
# deleted, another pybridge's) goes there for nothing; what the flat rules did with it after
# (the egress accept of the network the packet comes from) is left to FORWARD (Docker's rules,
# its DROP policy) instead.
# ---------------------------------------------------------------------------------------------

# A SECOND ONE, stricter and deliberate too: a nat-unprotected network keeps out pybridge's
# bridges by their names' prefix (-i pyb-+ -o B -j DROP), so what comes from an interface the
# prefix catches but that is no network's bridge (a network being deleted, another
# pybridge's) is dropped on its way in, where the flat rules let it pass.
_PREFIX_DROP = re.compile(r"^-A PYBRIDGE-I-\S+ -i pyb-\+ -o \S+ -j DROP$")


def _kept_out_by_prefix(networks: Sequence[NetworkRules], d: Difference) -> bool:
    """Whether ``d`` is the second known difference."""
    if d.new.verdict != "DROP" or not d.new.trace or not _PREFIX_DROP.match(d.new.trace[-1]):
        return False
    return not any(n.bridge == d.packet.iif for n in networks)


_BUCKET_ENTRY = re.compile(
    r"^-A PYBRIDGE-\S+ (-[io]) (pyb-[0-9a-f])\+ -g (PYBRIDGE-(FI|FE|II|IE)-.)$"
)


def _skipped_by_a_bucket(networks: Sequence[NetworkRules], d: Difference) -> bool:
    """Whether ``d`` is the known difference: the new layout went to a bucket by prefix for an
    interface the bucket holds no rule for, and fell off it."""
    if d.new.verdict != "CONTINUE" or not d.new.trace:
        return False
    entry = _BUCKET_ENTRY.match(d.new.trace[-1])
    if entry is None:
        return False
    iface = d.packet.iif if entry.group(1) == "-i" else d.packet.oif
    of_a_network = any(n.bridge == iface for n in networks)
    stricter = d.flat.verdict in ("ACCEPT", "CONTINUE")  # CONTINUE: FORWARD decides
    # (An internal network's traffic out of its bridge: mangle drops it before filter, in
    # both layouts.)
    internal_source = any(n.bridge == d.packet.iif and n.internal for n in networks)
    return not of_a_network and (stricter or internal_source)


@SETTINGS
@given(
    network_sets(bridge_names([*USER_NAMES, *PREFIX_NAMES])),
    st.integers(0, 2**32),
    st.sampled_from([4, 6]),
)
def test_bridge_names_in_a_buckets_prefix_differ_only_by_the_known_difference(
    networks: list[NetworkRules], seed: int, family: Family
) -> None:
    """With user names and foreign interfaces that a bucket's prefix catches, every packet
    decided differently is one the known difference explains: nothing else goes wrong."""
    for shuffled in (False, True):
        found = differences(networks, family, seed, shuffled, [*OTHER_IFACES, *STRAY_IFACES])
        unexplained = [
            d
            for d in found
            if not _skipped_by_a_bucket(networks, d) and not _kept_out_by_prefix(networks, d)
        ]
        assert not unexplained, describe(networks, unexplained)


def decide(
    networks: Sequence[NetworkRules], family: Family, table: str, packet: Packet
) -> tuple[str, str]:
    """(flat verdict, new verdict) of ``packet`` in ``table``, entered at its first entry."""
    entry = ENTRIES[table][0]
    old = flat_chains(networks, family, table)
    new = layout_chains(render_layout(networks, family), table)
    return evaluate(old, entry, packet).verdict, evaluate(new, entry, packet).verdict


V4 = ipaddress.ip_network("10.216.0.0/24")
OUTSIDE_HOST = ipaddress.ip_address("192.0.2.99")


@pytest.mark.parametrize("name", PREFIX_NAMES)
def test_a_user_named_bridge_in_a_buckets_prefix_keeps_its_egress_rules(name: str) -> None:
    networks = [NetworkRules(name, subnets_v4=(V4,), gateways=(V4[1],))]
    out = Packet(iif=name, oif="eth0", src=V4[2], dst=OUTSIDE_HOST, dport=443)
    to_docker = Packet(iif=name, oif="docker0", src=V4[2], dst=ipaddress.ip_address("172.17.0.2"))
    flat_out, new_out = decide(networks, 4, "filter", out)
    flat_docker, new_docker = decide(networks, 4, "mangle", to_docker)
    assert (flat_out, flat_docker) == ("ACCEPT", "DROP")  # the reference
    assert (new_out, new_docker) == ("ACCEPT", "DROP")  # it is in the bucket the prefix names


def test_traffic_to_a_bridge_of_no_network_is_left_to_forward() -> None:
    """The one difference: into an interface a bucket's prefix catches but that is no
    network's bridge, a network's traffic is no longer accepted as its egress: FORWARD (Docker's
    rules, its DROP policy) decides. With no network in that bucket, nothing catches it."""
    networks = [
        NetworkRules("pyb-0123456789a", subnets_v4=(V4,), gateways=(V4[1],)),
        NetworkRules("pyb-3123456789a", subnets_v4=(ipaddress.ip_network("10.216.1.0/24"),)),
    ]
    packet = Packet(
        iif="pyb-0123456789a",
        oif="pyb-3000000000a",
        src=V4[2],
        dst=ipaddress.ip_address("10.216.9.2"),
    )
    assert decide(networks, 4, "filter", packet) == ("ACCEPT", "CONTINUE")
    assert decide(networks[:1], 4, "filter", packet) == ("ACCEPT", "ACCEPT")


def test_a_nat_unprotected_network_keeps_out_a_pybridge_named_interface_of_no_network() -> None:
    """The second difference: from an interface named like pybridge's bridges that is no
    network's, nothing gets into a nat-unprotected network; from outside, it all does."""
    networks = [
        NetworkRules(
            "pyb-0123456789a", subnets_v4=(V4,), gateways=(V4[1],), mode_v4="nat-unprotected"
        ),
    ]
    stray = Packet(iif="pyb-3000000000a", oif="pyb-0123456789a", src=OUTSIDE_HOST, dst=V4[2])
    outside = Packet(iif="eth1", oif="pyb-0123456789a", src=OUTSIDE_HOST, dst=V4[2])
    assert decide(networks, 4, "mangle", stray) == ("CONTINUE", "DROP")
    assert decide(networks, 4, "mangle", outside) == ("CONTINUE", "CONTINUE")
    assert decide(networks, 4, "filter", outside) == ("ACCEPT", "ACCEPT")
