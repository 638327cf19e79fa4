"""Firewall rule rendering (pure): the desired rules for pybridge's own chains as
``iptables-restore`` text, plus the jumps from the built-in chains.

The whole content of pybridge's chains is rendered and applied in one
``iptables-restore --noflush`` batch per address family: a ``:CHAIN - [0:0]`` line resets a
chain atomically, so the kernel never sees a half-applied rule set. Only the jump rules in the
built-in chains (FORWARD, POSTROUTING) are shared with others, so they are checked against the
current ``iptables-save`` output and added or removed one by one (kube-proxy does the same).

Filter layout, for every pybridge network with bridge B:

    PYBRIDGE-FORWARD   (jumped to from FORWARD, right after Docker's DOCKER-USER jump)
      ingress, for each network first, so no accept below can let traffic into another network:
        -o B -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT     replies
        -i B -o B -j ACCEPT                                           ICC (DROP if disabled)
        -o B -j DROP                                                  nothing else gets in
      egress, for each network:
        -i B -j PYBRIDGE-ISOLATION                                    not into Docker's bridges
        -i B -j ACCEPT                                                out to the world
        (internal networks: -i B -j DROP instead of both)
    PYBRIDGE-ISOLATION
        -m conntrack --ctstate DNAT -j RETURN                         published ports are fine
        -o docker0 -j DROP ; -o br-+ -j DROP                          Docker's bridges

NAT: PYBRIDGE-POSTROUTING (from POSTROUTING): -s SUBNET ! -o B -j MASQUERADE.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from .model import IPNetwork

Family = Literal[4, 6]

FORWARD_CHAIN = "PYBRIDGE-FORWARD"
ISOLATION_CHAIN = "PYBRIDGE-ISOLATION"
POSTROUTING_CHAIN = "PYBRIDGE-POSTROUTING"

# table -> chains pybridge owns in it
OWN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": (FORWARD_CHAIN, ISOLATION_CHAIN),
    "nat": (POSTROUTING_CHAIN,),
}


@dataclass(frozen=True)
class Jump:
    """A rule in a built-in chain that sends traffic to one of pybridge's chains."""

    table: str
    chain: str
    target: str
    # Insert after this target's jump when present (Docker's DOCKER-USER), else at the top.
    after_target: str | None = None

    @property
    def spec(self) -> str:
        return f"-A {self.chain} -j {self.target}"


JUMPS: tuple[Jump, ...] = (
    Jump("filter", "FORWARD", FORWARD_CHAIN, after_target="DOCKER-USER"),
    Jump("nat", "POSTROUTING", POSTROUTING_CHAIN),
)

# Docker's own bridges: docker0 and br-<12 hex> for user-defined bridge networks.
DOCKER_BRIDGE_PATTERNS = ("docker0", "br-+")


@dataclass(frozen=True)
class NetworkRules:
    """What the firewall needs to know about one network."""

    bridge: str
    subnets_v4: tuple[IPNetwork, ...] = ()
    subnets_v6: tuple[IPNetwork, ...] = ()
    internal: bool = False
    icc: bool = True
    masquerade: bool = True

    def subnets(self, family: Family) -> tuple[IPNetwork, ...]:
        return self.subnets_v4 if family == 4 else self.subnets_v6


def render_chain_rules(networks: Sequence[NetworkRules], family: Family) -> dict[str, list[str]]:
    """The rules of pybridge's chains, per table, as iptables-save lines (without the header)."""
    networks = sorted(networks, key=lambda n: n.bridge)
    fwd: list[str] = []
    for net in networks:
        b = net.bridge
        fwd.append(
            f"-A {FORWARD_CHAIN} -o {b} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        )
        fwd.append(f"-A {FORWARD_CHAIN} -i {b} -o {b} -j {'ACCEPT' if net.icc else 'DROP'}")
        fwd.append(f"-A {FORWARD_CHAIN} -o {b} -j DROP")
    for net in networks:
        b = net.bridge
        if net.internal:
            fwd.append(f"-A {FORWARD_CHAIN} -i {b} -j DROP")
        else:
            fwd.append(f"-A {FORWARD_CHAIN} -i {b} -j {ISOLATION_CHAIN}")
            fwd.append(f"-A {FORWARD_CHAIN} -i {b} -j ACCEPT")
    iso = [f"-A {ISOLATION_CHAIN} -m conntrack --ctstate DNAT -j RETURN"]
    iso += [f"-A {ISOLATION_CHAIN} -o {pattern} -j DROP" for pattern in DOCKER_BRIDGE_PATTERNS]

    post: list[str] = []
    for net in networks:
        if net.internal or not net.masquerade:
            continue
        for subnet in net.subnets(family):
            post.append(f"-A {POSTROUTING_CHAIN} -s {subnet} ! -o {net.bridge} -j MASQUERADE")
    return {"filter": fwd + iso, "nat": post}


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
    lines = [f"-D {jump.chain} -j {jump.target}" for _ in ours]
    lines.append(f"-I {jump.chain} {position} -j {jump.target}")
    return lines


def render_restore(networks: Sequence[NetworkRules], family: Family, current_save: str) -> str:
    """The complete ``iptables-restore --noflush`` input that makes the host match ``networks``.

    With no networks left, pybridge's jumps and chains are removed entirely. Returns "" when
    nothing needs doing (no networks and nothing of ours present).
    """
    current = parse_save(current_save)
    out: list[str] = []
    if networks:
        chain_rules = render_chain_rules(networks, family)
        for table, chains in OWN_CHAINS.items():
            out.append(f"*{table}")
            out += [f":{chain} - [0:0]" for chain in chains]
            out += chain_rules[table]
            rules = current.get(table, (set(), []))[1]
            for jump in JUMPS:
                if jump.table == table:
                    out += _jump_fixes(jump, rules)
            out.append("COMMIT")
    else:
        for table, chains in OWN_CHAINS.items():
            names, rules = current.get(table, (set(), []))
            present = [c for c in chains if c in names]
            jumps = [
                f"-D {j.chain} -j {j.target}"
                for j in JUMPS
                if j.table == table
                for r in rules
                if r == j.spec
            ]
            # Rules elsewhere that still point at our chains would make -X fail; find them too.
            refs = [
                "-D " + r[3:]
                for r in rules
                if any(r.endswith(f"-j {c}") for c in chains)
                and r.split()[1] not in chains
                and r not in {j.spec for j in JUMPS}
            ]
            if not present and not jumps and not refs:
                continue
            out.append(f"*{table}")
            out += jumps + refs
            out += [f":{chain} - [0:0]" for chain in present]
            out += [f"-X {chain}" for chain in present]
            out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def pybridge_rules_in(save_text: str) -> dict[str, list[str]]:
    """The rules currently in pybridge's chains (for diagnostics and tests)."""
    current = parse_save(save_text)
    result: dict[str, list[str]] = {}
    for table, chains in OWN_CHAINS.items():
        rules = current.get(table, (set(), []))[1]
        result[table] = [r for r in rules if r.split()[1] in chains]
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
