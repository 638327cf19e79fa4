"""Incremental firewall writes (issue 17): what incremental_restore writes, applied by a strict
model of iptables-restore (tests/unit/restore_sim.py) to what the last write left, gives rules
that drift() accepts, whatever the sequence of changes; the packets they decide, as a whole
write would; and its size follows the change, not the rule set."""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pydriver.model import Family, PortMapping
from pydriver.rules import (
    ISOLATION_CHAIN,
    RAW_CHAIN,
    NetworkRules,
    RuleSet,
    TunnelRules,
    drift,
    forward_chain,
    incremental_restore,
    isolation_chain,
    raw_chain,
    render_layout,
    render_restore,
    rule_set,
)

from .iptables_eval import evaluate
from .restore_sim import Refused, Tables, apply_restore, empty_tables, save_text
from .test_rule_semantics import ENTRIES, layout_chains, packets


def write(
    tables: Tables, before: RuleSet | None, networks: Sequence[NetworkRules], family: Family
) -> tuple[Tables, RuleSet, str | None]:
    """What IptablesFirewall.apply does (without its fallback): the change alone when
    incremental_restore can say it, else a whole write over what is there."""
    after = rule_set(networks, family)
    text = incremental_restore(before, after) if before is not None else None
    if text is None:
        whole = render_restore(networks, family, save_text(tables))
        return apply_restore(tables, whole), after, None
    return apply_restore(tables, text), after, text


# ---------------------------------------------------------------------------------------------
# The simulator refuses what iptables-restore refuses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "*filter\n-I FORWARD 2 -j ACCEPT\nCOMMIT\n",  # past the end of an empty chain
        "*filter\n-D FORWARD 1\nCOMMIT\n",
        "*filter\n-D FORWARD -i x -j ACCEPT\nCOMMIT\n",  # not there
        "*filter\n-A PYBRIDGE-X -j ACCEPT\nCOMMIT\n",  # no such chain
        "*filter\n-A FORWARD -g PYBRIDGE-X\nCOMMIT\n",  # no such target
        "*filter\n:C - [0:0]\n-A C -j ACCEPT\n-X C\nCOMMIT\n",  # not empty
        "*filter\n:C - [0:0]\n-A FORWARD -j C\n-X C\nCOMMIT\n",  # still jumped to
        "*filter\n-X FORWARD\nCOMMIT\n",  # built in
        "*filter\n:C - [0:0]\n",  # no COMMIT
    ],
)
def test_the_simulator_refuses_what_iptables_refuses(text: str) -> None:
    with pytest.raises(Refused):
        apply_restore(empty_tables(), text)


def test_the_simulator_applies_each_command() -> None:
    text = (
        "*filter\n:C - [0:0]\n:D - [0:0]\n-A C -j ACCEPT\n-I C 1 -j DROP\n-A C -g D\n"
        "-A C -j ACCEPT\n-D C -j ACCEPT\n-D C 1\n-A FORWARD -j C\nCOMMIT\n"
    )
    tables = apply_restore(empty_tables(), text)
    assert tables["filter"]["C"] == ["-A C -g D", "-A C -j ACCEPT"]
    assert tables["filter"]["FORWARD"] == ["-A FORWARD -j C"]
    flushed = apply_restore(tables, "*filter\n-D FORWARD -j C\n:C - [0:0]\n-X C\nCOMMIT\n")
    assert "C" not in flushed["filter"]
    assert tables["filter"]["C"]  # the input is not changed


# ---------------------------------------------------------------------------------------------
# Random sequences of changes
# ---------------------------------------------------------------------------------------------

NAMES = ("br-x", "br-0123456789ab", "docker0", "pbtuser", "pbtuser2")


def _network(i: int, bridge: str, rng: random.Random) -> NetworkRules:
    v4 = ipaddress.ip_network(f"10.216.{i}.0/24")
    v6 = ipaddress.ip_network(f"fd00:216:{i}::/64")
    internal = rng.random() < 0.25
    return NetworkRules(
        bridge,
        (v4,),
        (v6,) if rng.random() < 0.5 else (),
        internal=internal,
        icc=rng.random() < 0.8,
        gateways=(v4[1],),
        mode_v4="nat" if internal else rng.choice(["nat", "nat", "nat-unprotected", "routed"]),
        trusted=("eth1",) if rng.random() < 0.2 else (),
        tunnel=TunnelRules(4789, (ipaddress.ip_address("203.0.113.2"),))
        if rng.random() < 0.1
        else None,
    )


def _mapping(net: NetworkRules, port: int, rng: random.Random) -> PortMapping:
    family = 6 if net.subnets_v6 and rng.random() < 0.3 else 4
    subnet = net.subnets(family)[0]  # type: ignore[arg-type]
    routed = net.mode(family) == "routed"  # type: ignore[arg-type]
    return PortMapping(
        rng.choice(["tcp", "udp"]),
        None,
        0 if routed else port,
        subnet[2 + port % 50],
        port if routed else 80,
    )


def _changed(net: NetworkRules, rng: random.Random, port: int) -> NetworkRules:
    """One change to a network: a port more or less, another mode, ICC, internal."""
    roll = rng.random()
    if roll < 0.4:
        return dataclasses.replace(net, mappings=(*net.mappings, _mapping(net, port, rng)))
    if roll < 0.6 and net.mappings:
        dropped = rng.randrange(len(net.mappings))
        return dataclasses.replace(
            net, mappings=net.mappings[:dropped] + net.mappings[dropped + 1 :]
        )
    if roll < 0.8 and not net.internal:
        mode = rng.choice(["nat", "nat-unprotected", "routed"])
        field = rng.choice(["mode_v4", "mode_v6"])
        # A mode's mappings are of its kind (host ports or direct): start over.
        return dataclasses.replace(net, **{field: mode}, mappings=())  # type: ignore[arg-type]
    if roll < 0.9:
        return dataclasses.replace(net, icc=not net.icc)
    internal = not net.internal
    return dataclasses.replace(net, internal=internal, mode_v4="nat", mode_v6="nat", mappings=())


def changes(rng: random.Random, steps: int) -> Iterator[list[NetworkRules]]:
    networks: dict[int, NetworkRules] = {}
    port = 20000
    for _ in range(steps):
        roll = rng.random()
        port += 1
        if roll < 0.3 or not networks:
            i = rng.choice([i for i in range(60) if i not in networks])
            used = {n.bridge for n in networks.values()}
            names = [n for n in NAMES if n not in used]
            bucket = f"pyb-{rng.choice('03f')}{rng.getrandbits(40):010x}"
            bridge = rng.choice(names) if names and rng.random() < 0.35 else bucket
            networks[i] = _network(i, bridge, rng)
        elif roll < 0.45:
            del networks[rng.choice(list(networks))]
        elif roll < 0.47:
            networks.clear()  # every network gone at once
        else:
            i = rng.choice(list(networks))
            networks[i] = _changed(networks[i], rng, port)
        yield list(networks.values())


def _positional_only_where_small(text: str) -> None:
    """Rules are only addressed by position (which makes iptables-nft read the chain) in a
    network's own chains and at the top of the leading chains; the shared chains, which hold
    every network's rules, get -I 1, -A and deletes by text."""
    small = (forward_chain(""), isolation_chain(""), raw_chain(""), ISOLATION_CHAIN, RAW_CHAIN)
    for line in text.splitlines():
        words = line.split()
        if (words[0] == "-D" and len(words) == 3) or (words[0] == "-I" and words[2] != "1"):
            assert words[1].startswith(small), line


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.sampled_from([4, 6]))
def test_changes_written_one_by_one_leave_what_drift_accepts(seed: int, family: Family) -> None:
    rng = random.Random(seed)
    tables, before = empty_tables(), None
    incremental = 0
    for step, networks in enumerate(changes(rng, 25)):
        tables, before, text = write(tables, before, networks, family)
        problems = drift(networks, family, save_text(tables))
        assert problems == [], (step, networks, text, problems)
        if text is not None:
            incremental += 1
            _positional_only_where_small(text)
        if not networks:
            assert "PYBRIDGE" not in save_text(tables), step
    assert incremental >= 5


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.sampled_from([4, 6]))
def test_changes_written_one_by_one_decide_as_a_whole_write(seed: int, family: Family) -> None:
    """Stronger than drift: the chains that single changes leave decide packets (between
    every pair of interfaces) as a whole write's do."""
    rng = random.Random(seed)
    tables, before = empty_tables(), None
    for step, networks in enumerate(changes(rng, 12)):
        tables, before, _ = write(tables, before, networks, family)
        if not networks:
            continue
        layout = render_layout(networks, family)
        for table, entries in ENTRIES.items():
            whole = layout_chains(layout, table)
            have = tables[table]
            for packet in packets(networks, family, rng)[::3]:
                for entry in entries:
                    a, b = evaluate(whole, entry, packet), evaluate(have, entry, packet)
                    assert a.verdict == b.verdict, f"step {step} {table} {packet}\n{a}\n{b}"


def test_a_whole_write_is_needed_only_when_the_chains_come_or_go() -> None:
    one = [NetworkRules("pyb-0123456789a")]
    assert incremental_restore(rule_set([], 4), rule_set(one, 4)) is None
    assert incremental_restore(rule_set(one, 4), rule_set([], 4)) is None
    assert incremental_restore(rule_set(one, 4), rule_set(one, 4)) == ""


def test_a_removed_networks_chains_are_flushed_and_removed_after_what_enters_them() -> None:
    a, b = NetworkRules("pyb-0123456789a"), NetworkRules("br-x", internal=True)
    tables, before, _ = write(empty_tables(), None, [a, b], 4)
    tables, _, text = write(tables, before, [a], 4)
    assert text is not None
    lines = text.splitlines()
    for chain in (forward_chain("br-x"), isolation_chain("br-x"), raw_chain("br-x")):
        assert f"-X {chain}" in lines
        assert chain not in save_text(tables)
    assert drift([a], 4, save_text(tables)) == []


# ---------------------------------------------------------------------------------------------
# Sizes: a change costs the same at 1 and at 1,000 networks
# ---------------------------------------------------------------------------------------------


def _networks(count: int, ports_of_first: int = 0) -> list[NetworkRules]:
    views = []
    for i in range(count):
        subnet = ipaddress.ip_network(f"10.{100 + i // 250}.{i % 250}.0/24")
        mappings = tuple(
            PortMapping("tcp", None, 20000 + p, subnet[2], 80)
            for p in range(ports_of_first if i == 0 else 0)
        )
        # Names spread over the buckets, as network ids are.
        bridge = f"pyb-{(i * 2654435761 + 12345) % 16**11:011x}"
        views.append(
            NetworkRules(bridge, subnets_v4=(subnet,), gateways=(subnet[1],), mappings=mappings)
        )
    return views


def _size(text: str | None) -> int:
    """The lines that change something (the table headers and COMMITs aside)."""
    assert text is not None
    return sum(1 for line in text.splitlines() if not line.startswith(("*", "COMMIT")))


def test_one_network_more_costs_the_same_at_1_and_at_1000() -> None:
    few, many = _networks(2), _networks(1001)
    small = incremental_restore(rule_set(few[:1], 4), rule_set(few, 4))
    large = incremental_restore(rule_set(many[:1000], 4), rule_set(many, 4))
    assert _size(small) == _size(large) > 0
    # And one less.
    assert _size(incremental_restore(rule_set(many, 4), rule_set(many[:1000], 4))) == _size(
        incremental_restore(rule_set(few, 4), rule_set(few[:1], 4))
    )


def test_one_port_mapping_more_is_one_rule_whatever_is_published() -> None:
    for count in (1, 1000):
        for already in (0, 999):
            before = rule_set(_networks(count, already), 4)
            after = rule_set(_networks(count, already + 1), 4)
            text = incremental_restore(before, after)
            assert _size(text) == 1, (count, already, text)


def test_a_nat_unprotected_network_is_not_rewritten_when_another_network_comes_or_goes() -> None:
    """It keeps pybridge's other bridges out by their names' prefix, not by listing them."""
    unprotected = dataclasses.replace(_networks(1)[0], mode_v4="nat-unprotected")
    few, many = [unprotected, *_networks(2)[1:]], [unprotected, *_networks(1001)[1:]]
    for networks in (few, many):
        text = incremental_restore(rule_set(networks[:-1], 4), rule_set(networks, 4))
        assert text is not None
        assert isolation_chain(unprotected.bridge) not in text
        assert forward_chain(unprotected.bridge) not in text
    grown = incremental_restore(rule_set(few[:-1], 4), rule_set(few, 4))
    assert _size(grown) == _size(incremental_restore(rule_set(many[:-1], 4), rule_set(many, 4)))
