"""Incremental writes as the firewall makes them (review of issue 17): ``rule_set`` given the
last write's RuleSet (``_patched`` reuses it when only some networks' own views changed), for
changes the other sequence tests do not make: trusted interfaces, masquerade, SNAT addresses,
gateways, extra subnets, tunnels, a bridge name given to another network in one write, and
the views reordered. Each step must give the layout a fresh rule_set gives, a text the strict
restore model applies, and chains drift() accepts."""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from collections.abc import Iterator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pydriver.model import Family
from pydriver.rules import (
    NetworkRules,
    RuleSet,
    TunnelRules,
    drift,
    incremental_restore,
    layout_of,
    render_layout,
    render_restore,
    rule_set,
)

from .restore_sim import apply_restore, empty_tables, save_text
from .test_incremental_rules import _mapping, _network

NAMES = ("br-x", "docker0", "docker_gwbridge", "pbtuser", "pyb-3", "pyb-3x")
MEMBERS = tuple(ipaddress.ip_address(a) for a in ("203.0.113.2", "203.0.113.3", "2001:db8::2"))


def _changed(net: NetworkRules, rng: random.Random, port: int) -> NetworkRules:
    roll = rng.randrange(9)
    if roll == 0:
        trusted = tuple(rng.sample(["eth1", "pbtuser", "pyb-3abc"], rng.randrange(3)))
        return dataclasses.replace(net, trusted=trusted)
    if roll == 1:
        return dataclasses.replace(net, masquerade=not net.masquerade)
    if roll == 2:
        return dataclasses.replace(
            net,
            snat_v4=rng.choice([None, ipaddress.IPv4Address("192.0.2.5")]),
            snat_v6=rng.choice([None, ipaddress.IPv6Address("2001:db8::5")]),
        )
    if roll == 3:
        more = (net.subnets_v4[0][5],) if rng.random() < 0.5 else ()
        return dataclasses.replace(net, gateways=net.gateways + more)
    if roll == 4:
        members = tuple(rng.sample(MEMBERS, rng.randrange(4)))
        tunnel = rng.choice([None, TunnelRules(4789, members), TunnelRules(4790, MEMBERS[:1])])
        return dataclasses.replace(net, tunnel=tunnel)
    if roll == 5:
        return dataclasses.replace(net, mappings=(*net.mappings, _mapping(net, port, rng)))
    if roll == 6 and not net.internal:
        mode = rng.choice(["nat", "nat-unprotected", "routed"])
        return dataclasses.replace(net, mode_v6=mode, mappings=())  # type: ignore[arg-type]
    if roll == 7:
        return dataclasses.replace(net, icc=not net.icc)
    extra = ipaddress.ip_network(f"10.218.{port % 250}.0/24")
    return dataclasses.replace(net, subnets_v4=(*net.subnets_v4, extra))


def _sequence(rng: random.Random, steps: int) -> Iterator[list[NetworkRules]]:
    """Unchanged networks keep their view objects (as State's cache does)."""
    nets: list[NetworkRules] = []
    port = 20000
    for _ in range(steps):
        port += 1
        roll = rng.random()
        if roll < 0.25 or not nets:
            names = [n for n in NAMES if n not in {x.bridge for x in nets}]
            bridge = (
                rng.choice(names)
                if names and rng.random() < 0.4
                else f"pyb-{rng.choice('03f')}{rng.getrandbits(40):010x}"
            )
            nets.append(_network(len(nets) + 60 * rng.randrange(3), bridge, rng))
        elif roll < 0.35:
            nets.pop(rng.randrange(len(nets)))
        elif roll < 0.42:  # the bridge name goes to another network in the same write
            i = rng.randrange(len(nets))
            nets[i] = _network(i + 120, nets[i].bridge, rng)
        elif roll < 0.47:
            rng.shuffle(nets)
        else:
            for _ in range(rng.randrange(1, 4)):
                i = rng.randrange(len(nets))
                nets[i] = _changed(nets[i], rng, port)
        yield list(nets)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.sampled_from([4, 6]))
def test_changes_through_the_patched_rule_set_leave_what_a_whole_write_would(
    seed: int, family: Family
) -> None:
    rng = random.Random(seed)
    tables, before = empty_tables(), None
    previous: RuleSet | None = None
    for step, networks in enumerate(_sequence(rng, 30)):
        after = rule_set(networks, family, previous)
        assert layout_of(after) == render_layout(networks, family), step
        text = incremental_restore(previous, after) if previous is not None else None
        if text is None:
            text = render_restore(networks, family, save_text(tables))
        tables = apply_restore(tables, text)
        assert drift(networks, family, save_text(tables)) == [], (step, text)
        previous, before = after, tables
    assert before is not None
