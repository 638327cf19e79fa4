"""Incremental firewall writes (issue 17): the lines incremental_restore writes turn the rules
last written into the rules wanted, whatever the change, and their number follows the change,
not the rule set."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from pydriver.model import PortMapping
from pydriver.rules import OWN_CHAINS, NetworkRules, incremental_restore, render_chain_rules

CHAINS = [(table, chain) for table, chains in OWN_CHAINS.items() for chain in chains]


def apply_edits(before: dict[str, list[str]], text: str) -> dict[str, list[str]]:
    """What iptables-restore does with the lines: -D CHAIN N and -I CHAIN N RULE, per table."""
    chains: dict[str, list[str]] = {}
    for rules in before.values():
        for rule in rules:
            chains.setdefault(rule.split()[1], []).append(rule.split(" ", 2)[2])
    for line in text.splitlines():
        if line.startswith(("*", "COMMIT")):
            continue
        op, chain, position, *rest = line.split(" ", 3)
        rules = chains.setdefault(chain, [])
        index = int(position) - 1
        assert 0 <= index <= len(rules) - (op == "-D"), line
        if op == "-D":
            del rules[index]
        else:
            assert op == "-I", line
            rules.insert(index, rest[0])
    return {
        table: [f"-A {c} {r}" for c in OWN_CHAINS[table] for r in chains.get(c, [])]
        for table in before
    }


rule_lists = st.lists(st.sampled_from([f"r{i}" for i in range(12)]), max_size=15)


@st.composite
def rule_sets(draw: st.DrawFn) -> dict[str, list[str]]:
    return {
        table: [f"-A {chain} {rule}" for chain in chains for rule in draw(rule_lists)]
        for table, chains in OWN_CHAINS.items()
    }


@settings(max_examples=400, deadline=None)
@given(rule_sets(), rule_sets())
def test_the_edits_turn_any_rules_into_any_other(
    before: dict[str, list[str]], after: dict[str, list[str]]
) -> None:
    text = incremental_restore(before, after)
    if not any(before.values()) or not any(after.values()):
        assert text is None  # the chains come or go: a whole write
        return
    assert text is not None
    assert apply_edits(before, text) == after
    if before == after:
        assert text == ""


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["r0", "r1", "r2"]), min_size=1, max_size=300),
    st.integers(0, 300),
    st.lists(st.sampled_from(["r0", "r1", "r3"]), max_size=5),
    st.integers(0, 5),
)
def test_the_edits_of_a_long_chain_changed_in_one_place(
    rules: list[str], at: int, inserted: list[str], removed: int
) -> None:
    """Long chains with a change somewhere: what the common start and end are skipped for
    (compared 64 rules at a time)."""
    at = min(at, len(rules))
    changed = rules[:at] + inserted + rules[at + removed :]
    if not changed:
        changed = ["r1"]
    before = {"filter": [f"-A PYBRIDGE-FORWARD {r}" for r in rules]}
    after = {"filter": [f"-A PYBRIDGE-FORWARD {r}" for r in changed]}
    text = incremental_restore(before, after)
    assert text is not None
    assert apply_edits(before, text) == after


def _networks(count: int, ports_of_first: int = 0) -> list[NetworkRules]:
    views = []
    for i in range(count):
        subnet = ipaddress.ip_network(f"10.{100 + i // 250}.{i % 250}.0/24")
        mappings = tuple(
            PortMapping("tcp", None, 20000 + p, subnet[2], 80)
            for p in range(ports_of_first if i == 0 else 0)
        )
        views.append(
            NetworkRules(
                f"pyb-{i:011x}", subnets_v4=(subnet,), gateways=(subnet[1],), mappings=mappings
            )
        )
    return views


def _size(text: str | None) -> int:
    assert text is not None
    return sum(1 for line in text.splitlines() if line.startswith(("-I", "-D")))


def test_one_network_more_costs_the_same_at_1_and_at_1000() -> None:
    few, many = _networks(2), _networks(1001)
    small = incremental_restore(render_chain_rules(few[:1], 4), render_chain_rules(few, 4))
    large = incremental_restore(render_chain_rules(many[:1000], 4), render_chain_rules(many, 4))
    assert _size(small) == _size(large) > 0
    # And one less.
    assert _size(
        incremental_restore(render_chain_rules(many, 4), render_chain_rules(many[:1000], 4))
    ) == _size(small)


def test_one_port_mapping_more_is_one_rule_whatever_is_published() -> None:
    for already in (0, 999):
        before = render_chain_rules(_networks(3, already), 4)
        after = render_chain_rules(_networks(3, already + 1), 4)
        assert _size(incremental_restore(before, after)) == 1
