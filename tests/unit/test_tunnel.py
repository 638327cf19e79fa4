"""A segment's VXLAN entries: what is wanted from the cluster's view, and the steps that make
the device hold exactly that, whatever it held before."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from pydriver.model import IPAddress
from pydriver.tunnel import RemoteEndpoint, Step, TunnelEntries, mtu_for, plan, wanted

ip = ipaddress.ip_address
H1, H2, H3 = ip("203.0.113.1"), ip("203.0.113.2"), ip("203.0.113.3")


def apply(have: TunnelEntries, steps: list[Step]) -> TunnelEntries:
    """What the kernel does with the steps."""
    flood, fdb, neigh = set(have.flood), dict(have.forwarding), dict(have.neighbours)
    for step in steps:
        if step.action == "flood-add":
            assert step.vtep is not None
            flood.add(step.vtep)
        elif step.action == "flood-remove":
            flood.discard(step.vtep)
        elif step.action == "fdb-replace":
            assert step.vtep is not None
            fdb[step.mac] = step.vtep
        elif step.action == "fdb-remove":
            del fdb[step.mac]
        elif step.action == "neigh-replace":
            assert step.address is not None
            neigh[step.address] = step.mac
        else:
            assert step.address is not None
            del neigh[step.address]
    return TunnelEntries(frozenset(flood), fdb, neigh)


def test_only_other_hosts_and_their_containers() -> None:
    endpoints = [
        RemoteEndpoint("02:00:00:00:00:01", H1, (ip("10.70.1.10"),)),  # ours
        RemoteEndpoint("02:00:00:00:00:02", H2, (ip("10.70.2.10"), ip("fd70::2:10"))),
    ]
    entries = wanted([H1, H2, H3], endpoints, own_vtep=H1)
    assert entries.flood == {H2, H3}
    assert entries.forwarding == {"02:00:00:00:00:02": H2}
    assert entries.neighbours == {
        ip("10.70.2.10"): "02:00:00:00:00:02",
        ip("fd70::2:10"): "02:00:00:00:00:02",
    }


def test_a_container_that_moved_and_a_host_that_left() -> None:
    have = TunnelEntries(
        frozenset({H2, H3}),
        {"02:00:00:00:00:02": H2, "02:00:00:00:00:03": H3},
        {ip("10.70.2.10"): "02:00:00:00:00:02", ip("10.70.3.10"): "02:00:00:00:00:03"},
    )
    want = wanted(
        [H1, H2], [RemoteEndpoint("02:00:00:00:00:03", H2, (ip("10.70.3.10"),))], own_vtep=H1
    )
    steps = plan(want, have)
    assert steps == [
        Step("fdb-replace", mac="02:00:00:00:00:03", vtep=H2),
        Step("neigh-remove", address=ip("10.70.2.10")),
        Step("fdb-remove", mac="02:00:00:00:00:02", vtep=H2),
        Step("flood-remove", vtep=H3),
    ]
    assert apply(have, steps) == want
    assert plan(want, want) == []


def test_mtu_over_the_underlay() -> None:
    assert mtu_for(1500, 4) == 1450
    assert mtu_for(1500, 6) == 1430


macs = st.sampled_from([f"02:00:00:00:00:{i:02x}" for i in range(6)])
vteps = st.sampled_from([H1, H2, H3])
addresses = st.sampled_from([ip(f"10.70.0.{i}") for i in range(8)])


@st.composite
def entries(draw: st.DrawFn) -> TunnelEntries:
    neighbours: dict[IPAddress, str] = draw(st.dictionaries(addresses, macs))
    return TunnelEntries(
        frozenset(draw(st.sets(vteps))), draw(st.dictionaries(macs, vteps)), neighbours
    )


@settings(max_examples=300, deadline=None)
@given(entries(), entries())
def test_the_steps_lead_from_any_entries_to_any_others(
    want: TunnelEntries, have: TunnelEntries
) -> None:
    assert apply(have, plan(want, have)) == want
