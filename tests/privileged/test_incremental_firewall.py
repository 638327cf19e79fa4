"""Incremental firewall writes (issue 17), on the real kernel, both iptables backends: a random
sequence of changes (networks of every kind come and go, ports are published and revoked)
written change by change leaves exactly the rules a whole write would; a change someone else
made to pybridge's chains makes the next write a whole one; and a change is a transaction of
its own size."""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import secrets
from collections.abc import Iterator

import pytest

from pydriver.firewall import Backend, IptablesFirewall, tool
from pydriver.model import PortMapping
from pydriver.rules import NetworkRules, pybridge_rules_in, render_chain_rules
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


def _ours(netns: str, backend: Backend, family: int) -> dict[str, list[str]]:
    return pybridge_rules_in(in_ns(netns, tool(backend, family, "save")))  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["nft", "legacy"])
async def test_changes_written_one_by_one_equal_a_whole_write(netns: str, backend: Backend) -> None:
    firewall = IptablesFirewall(backend, netns=netns)
    rng = random.Random(17)
    incremental = 0
    for step, networks in enumerate(_changes(rng, 60)):
        firewall.last_written.clear()
        await firewall.apply(networks)
        written = firewall.last_written.get(4, "")
        if written and not any(line.startswith(":") for line in written.splitlines()):
            incremental += 1
        assert await firewall.drift(networks) == [], f"step {step}"
        for family in firewall.families:
            wanted = render_chain_rules(networks, family) if networks else {}
            assert _ours(netns, backend, family) == {
                t: wanted.get(t, []) for t in ("filter", "mangle", "nat", "raw")
            }, f"step {step}, IPv{family}"
    assert incremental >= 40  # the rest: when the chains come or go, or nothing changed
    await firewall.apply([])
    for family in firewall.families:
        assert "PYBRIDGE" not in in_ns(netns, tool(backend, family, "save"))


@pytest.mark.parametrize("backend", ["nft", "legacy"])
async def test_a_chain_changed_by_someone_else_is_written_whole(
    netns: str, backend: Backend
) -> None:
    firewall = IptablesFirewall(backend, netns=netns)
    rng = random.Random(3)
    nets = [_network(i, rng) for i in range(3)]
    await firewall.apply(nets)
    # Someone flushes pybridge's chain: the next change cannot be made rule by rule (its
    # positions are gone), so pybridge writes everything again instead of failing.
    in_ns(netns, tool(backend, 4), "-F", "PYBRIDGE-FORWARD")
    more = [*nets, _network(5, rng)]
    await firewall.apply(more)
    assert await firewall.drift(more) == []


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
