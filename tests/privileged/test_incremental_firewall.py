"""Incremental firewall writes (issue 17), on the real kernel, both iptables backends: a random
sequence of changes (networks of every kind come and go, ports are published and revoked)
written change by change leaves the rules a whole write would (per chain; the unordered
sections in any order); damage someone else did is seen by drift() and repaired by a forced
write, and a change the kernel refuses falls back to a whole write; and a change is a
transaction of its own size."""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import secrets
from collections import Counter
from collections.abc import Iterator, Sequence

import pytest

from pydriver.firewall import Backend, IptablesFirewall, tool
from pydriver.model import Family, PortMapping
from pydriver.rules import CHAIN_PREFIX, FORWARD_CHAIN, NetworkRules, parse_save, render_layout
from tests.hostenv import require_root, run
from tests.privileged.test_kernel import in_ns

pytestmark = pytest.mark.privileged


@pytest.fixture
def netns() -> Iterator[str]:
    require_root()
    name = "pbt-" + secrets.token_hex(4)
    run(["ip", "netns", "add", name])
    try:
        yield name
    finally:
        run(["ip", "netns", "del", name], check=False)


def _network(i: int, rng: random.Random) -> NetworkRules:
    v4 = ipaddress.ip_network(f"10.213.{100 + i}.0/24")
    v6 = ipaddress.ip_network(f"fd00:213:{100 + i}::/64")
    internal = rng.random() < 0.2
    mode = "nat" if internal else rng.choice(["nat", "nat", "nat-unprotected", "routed"])
    return NetworkRules(
        rng.choice([f"pyb-{i:011x}", f"br-pbt{i}", f"pbtuser{i}"]),
        (v4,),
        (v6,) if rng.random() < 0.5 else (),
        internal=internal,
        icc=rng.random() < 0.8,
        gateways=(v4[1],),
        mode_v4=mode,  # type: ignore[arg-type]
        trusted=("pbt-lan0",) if rng.random() < 0.2 else (),
    )


def _mapping(net: NetworkRules, port: int) -> PortMapping:
    subnet = net.subnets_v4[0]
    routed = net.mode_v4 == "routed"
    return PortMapping(
        "tcp" if port % 2 else "udp",
        None,
        0 if routed else port,
        subnet[2 + port % 50],
        port if routed else 80,
    )


def _changes(rng: random.Random, steps: int) -> Iterator[list[NetworkRules]]:
    networks: dict[int, NetworkRules] = {}
    port = 20000
    for _ in range(steps):
        roll = rng.random()
        if roll < 0.3 or not networks:
            free = [i for i in range(40) if i not in networks]
            i = rng.choice(free)
            networks[i] = _network(i, rng)
        elif roll < 0.45:
            del networks[rng.choice(list(networks))]
        elif roll < 0.8:
            i = rng.choice(list(networks))
            port += 1
            net = networks[i]
            networks[i] = dataclasses.replace(net, mappings=(*net.mappings, _mapping(net, port)))
        else:
            i = rng.choice(list(networks))
            net = networks[i]
            if net.mappings:
                dropped = rng.randrange(len(net.mappings))
                kept = net.mappings[:dropped] + net.mappings[dropped + 1 :]
                networks[i] = dataclasses.replace(net, mappings=kept)
        yield list(networks.values())


def _ours(netns: str, backend: Backend, family: Family) -> dict[str, dict[str, list[str]]]:
    """table -> pybridge's chains in the kernel -> their rules (as iptables-save lists them)."""
    found: dict[str, dict[str, list[str]]] = {}
    save = in_ns(netns, tool(backend, family, "save"))
    for table, (chains, rules) in parse_save(save).items():
        ours: dict[str, list[str]] = {c: [] for c in chains if c.startswith(CHAIN_PREFIX)}
        for rule in rules:
            if rule.split()[1] in ours:
                ours[rule.split()[1]].append(rule)
        if ours:
            found[table] = ours
    return found


def _check_as_a_whole_write(
    netns: str, backend: Backend, networks: Sequence[NetworkRules], family: Family, step: int
) -> None:
    """The kernel holds exactly the chains render_layout wants, each with its sections' rules:
    the ordered ones in order, the unordered ones in any order."""
    have = _ours(netns, backend, family)
    layout = render_layout(networks, family) if networks else {}
    assert {t: set(c) for t, c in have.items()} == {t: set(c) for t, c in layout.items() if c}, (
        f"step {step}, IPv{family}: chains"
    )
    for table, chains in layout.items():
        for name, sections in chains.items():
            rules = have[table][name]
            assert len(rules) == sum(len(s.rules) for s in sections), (step, family, name)
            at = 0
            for section in sections:
                part, at = rules[at : at + len(section.rules)], at + len(section.rules)
                if section.ordered:
                    assert part == list(section.rules), (step, family, name)
                else:
                    assert Counter(part) == Counter(section.rules), (step, family, name)


def _whole(written: str) -> bool:
    """Whether a write was a whole one (only those declare the shared chains)."""
    return f":{FORWARD_CHAIN} " in written


@pytest.mark.parametrize("backend", ["nft", "legacy"])
async def test_changes_written_one_by_one_equal_a_whole_write(netns: str, backend: Backend) -> None:
    firewall = IptablesFirewall(backend, netns=netns)
    rng = random.Random(17)
    incremental = 0
    for step, networks in enumerate(_changes(rng, 60)):
        firewall.last_written.clear()
        await firewall.apply(networks)
        written = firewall.last_written.get(4, "")
        if written and not _whole(written):
            incremental += 1
        assert await firewall.drift(networks) == [], f"step {step}"
        for family in firewall.families:
            _check_as_a_whole_write(netns, backend, networks, family, step)
    assert incremental >= 40  # the rest: when the chains come or go, or nothing changed
    await firewall.apply([])
    for family in firewall.families:
        assert "PYBRIDGE" not in in_ns(netns, tool(backend, family, "save"))


@pytest.mark.parametrize("backend", ["nft", "legacy"])
async def test_damage_by_someone_else_is_seen_and_repaired(netns: str, backend: Backend) -> None:
    """Someone flushes a shared chain. Additions are written at a chain's top or end, so the
    next change may well succeed without noticing: drift() reports the damage (the
    self-healing check's job), and a forced write repairs it."""
    firewall = IptablesFirewall(backend, netns=netns)
    rng = random.Random(3)
    nets = [_network(i, rng) for i in range(3)]
    await firewall.apply(nets)
    in_ns(netns, tool(backend, 4), "-F", FORWARD_CHAIN)
    more = [*nets, _network(5, rng)]
    firewall.last_written.clear()
    await firewall.apply(more)
    assert not _whole(firewall.last_written[4])  # written as a change: the flush went unseen
    problems = await firewall.drift(more)
    assert problems
    assert all(p.startswith("IPv4 filter: pybridge rules differ") for p in problems), problems
    await firewall.apply(more, force=True)
    assert _whole(firewall.last_written[4])
    assert await firewall.drift(more) == []
    for family in firewall.families:
        _check_as_a_whole_write(netns, backend, more, family, 0)
    await firewall.apply([])


@pytest.mark.parametrize("backend", ["nft", "legacy"])
async def test_a_change_the_kernel_refuses_is_written_whole(netns: str, backend: Backend) -> None:
    """Someone deleted a rule of a network's that the next change deletes by its text: the
    kernel refuses the change, and pybridge writes everything again instead of failing."""
    firewall = IptablesFirewall(backend, netns=netns)
    nets = [
        NetworkRules(f"pyb-{i}{i:010x}", (ipaddress.ip_network(f"10.213.{100 + i}.0/24"),))
        for i in range(3)
    ]
    await firewall.apply(nets)
    gone = nets[1].bridge
    in_ns(netns, tool(backend, 4), "-D", "PYBRIDGE-FE-1", "-i", gone, "-j", "ACCEPT")
    firewall.last_written.clear()
    await firewall.apply([nets[0], nets[2]])
    assert _whole(firewall.last_written[4])  # the change was refused; then a whole write
    assert await firewall.drift([nets[0], nets[2]]) == []
    for family in firewall.families:
        _check_as_a_whole_write(netns, backend, [nets[0], nets[2]], family, 0)
    await firewall.apply([])


async def test_a_change_is_a_transaction_of_its_own_size(netns: str) -> None:
    """What iptables-restore is given for one more port mapping: the same few lines with 1
    and with 300 networks present (a whole write grows with them)."""
    firewall = IptablesFirewall("nft", netns=netns, ipv6=False)
    sizes = []
    for count in (1, 300):
        rng = random.Random(count)
        nets = [
            dataclasses.replace(_network(i % 40, rng), bridge=f"pyb-{i:011x}", internal=False)
            for i in range(count)
        ]
        await firewall.apply(nets)
        first = nets[0]
        nets[0] = dataclasses.replace(first, mappings=(_mapping(first, 30001),))
        await firewall.apply(nets)
        sizes.append(len(firewall.last_written[4].splitlines()))
        assert await firewall.drift(nets) == []
        await firewall.apply([])
    assert sizes[0] == sizes[1] <= 5, sizes
