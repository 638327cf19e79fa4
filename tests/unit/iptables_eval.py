"""A small iptables evaluator for tests: what one table's rules (as iptables-save lines) do
with one packet, read the way the kernel reads them.

Only what pybridge's rules use is understood; any other option raises UnknownRule, so a rule
the evaluator cannot read fails the test instead of silently matching (or not). Targets:
ACCEPT, DROP, RETURN, MASQUERADE, SNAT, DNAT (with their --to-* argument, part of the
verdict), ``-j CHAIN`` (a call: the chain's end or a RETURN comes back after the rule) and
``-g CHAIN`` (a goto: its end or a RETURN returns to where the chain that went there was
called from). Falling off the entry chain, or a RETURN in it, is CONTINUE: the packet goes on
in the built-in chain that jumped there.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pydriver.model import IPAddress

CONTINUE = "CONTINUE"
VERDICTS = ("ACCEPT", "DROP", "MASQUERADE", "SNAT", "DNAT")
PORT_PROTOS = ("tcp", "udp", "sctp")
ICMP_PROTOS = ("icmp", "ipv6-icmp")
MODULES = (*PORT_PROTOS, "icmp", "icmp6", "conntrack", "addrtype", "rpfilter")
CTSTATES = ("NEW", "ESTABLISHED", "RELATED", "INVALID", "DNAT", "SNAT")


class UnknownRule(AssertionError):
    """A rule the evaluator does not understand, or an invalid walk (a missing chain, a loop)."""


@dataclass(frozen=True)
class Packet:
    """A forwarded (or incoming) packet as the matches see it."""

    iif: str
    oif: str
    src: IPAddress
    dst: IPAddress
    proto: str = "tcp"
    dport: int | None = None
    icmp_type: int | None = None
    # conntrack's state and status bits together: NEW, ESTABLISHED, RELATED (one of them),
    # plus DNAT when the connection's destination was translated.
    ctstate: frozenset[str] = frozenset({"NEW"})
    dst_local: bool = False  # -m addrtype --dst-type LOCAL
    rpfilter: bool = True  # -m rpfilter: the source's route leads back where it came in

    def __str__(self) -> str:
        parts = [f"iif={self.iif}", f"oif={self.oif}", f"src={self.src}", f"dst={self.dst}"]
        parts.append(f"proto={self.proto}")
        if self.dport is not None:
            parts.append(f"dport={self.dport}")
        if self.icmp_type is not None:
            parts.append(f"icmp_type={self.icmp_type}")
        parts.append("ctstate=" + ",".join(sorted(self.ctstate)))
        parts.append(f"dst_local={self.dst_local}")
        parts.append(f"rpfilter={self.rpfilter}")
        return " ".join(parts)


Match = Callable[[Packet], bool]


@dataclass(frozen=True)
class Rule:
    chain: str
    matches: tuple[Match, ...]
    kind: str  # "-j" or "-g"
    target: str
    target_args: tuple[str, ...]
    line: str

    def hits(self, packet: Packet) -> bool:
        return all(m(packet) for m in self.matches)

    @property
    def verdict(self) -> str:
        return " ".join((self.target, *self.target_args))


@dataclass
class _Parse:
    tokens: list[str]
    line: str
    pos: int = 0
    negate: bool = False
    modules: set[str] = field(default_factory=set)
    proto: str | None = None
    matches: list[Match] = field(default_factory=list)

    def fail(self, why: str) -> UnknownRule:
        return UnknownRule(f"{why} in rule {self.line!r}")

    def value(self) -> str:
        if self.pos + 1 >= len(self.tokens):
            raise self.fail(f"{self.tokens[self.pos]} without a value")
        return self.tokens[self.pos + 1]

    def add(self, match: Match) -> None:
        negate = self.negate
        self.matches.append((lambda p: not match(p)) if negate else match)

    def need_module(self, module: str | tuple[str, ...]) -> None:
        wanted = (module,) if isinstance(module, str) else module
        if not self.modules & set(wanted):
            raise self.fail(f"{self.tokens[self.pos]} without -m {'/'.join(wanted)}")


def _iface_match(pattern: str, attr: str) -> Match:
    if pattern.endswith("+"):
        prefix = pattern[:-1]
        return lambda p: getattr(p, attr).startswith(prefix)
    return lambda p: getattr(p, attr) == pattern


def _address_match(text: str, attr: str, state: _Parse) -> Match:
    try:
        network = ipaddress.ip_network(text)
    except ValueError:
        raise state.fail(f"bad address {text!r}") from None

    def match(p: Packet) -> bool:
        address: IPAddress = getattr(p, attr)
        if address.version != network.version:
            raise UnknownRule(f"IPv{address.version} packet against {state.line!r}")
        return address in network

    return match


def _opt_interface(state: _Parse, flag: str) -> None:
    state.add(_iface_match(state.value(), "iif" if flag == "-i" else "oif"))


def _opt_address(state: _Parse, flag: str) -> None:
    state.add(_address_match(state.value(), "src" if flag == "-s" else "dst", state))


def _opt_proto(state: _Parse, flag: str) -> None:
    proto = state.value()
    if proto not in (*PORT_PROTOS, *ICMP_PROTOS):
        raise state.fail(f"protocol {proto!r}")
    state.proto = proto
    state.add(lambda p: p.proto == proto)


def _opt_module(state: _Parse, flag: str) -> None:
    module = state.value()
    if module not in MODULES or state.negate:
        raise state.fail(f"match module {module!r}")
    if module in PORT_PROTOS and module != state.proto:
        raise state.fail(f"-m {module} after -p {state.proto}")
    state.modules.add(module)
    if module == "rpfilter":
        state.add(lambda p: p.rpfilter)


def _opt_dport(state: _Parse, flag: str) -> None:
    state.need_module(PORT_PROTOS)
    port = int(state.value())
    state.add(lambda p: p.dport == port)


def _opt_ctstate(state: _Parse, flag: str) -> None:
    state.need_module("conntrack")
    wanted = frozenset(state.value().split(","))
    if not wanted <= set(CTSTATES):
        raise state.fail(f"ctstate {state.value()!r}")
    state.add(lambda p: bool(p.ctstate & wanted))


def _opt_icmp_type(state: _Parse, flag: str) -> None:
    state.need_module("icmp" if flag == "--icmp-type" else "icmp6")
    kind = int(state.value())
    state.add(lambda p: p.icmp_type == kind)


def _opt_dst_type(state: _Parse, flag: str) -> None:
    state.need_module("addrtype")
    if state.value() != "LOCAL":
        raise state.fail(f"--dst-type {state.value()}")
    state.add(lambda p: p.dst_local)


_OPTIONS: dict[str, Callable[[_Parse, str], None]] = {
    "-i": _opt_interface,
    "-o": _opt_interface,
    "-s": _opt_address,
    "-d": _opt_address,
    "-p": _opt_proto,
    "-m": _opt_module,
    "--dport": _opt_dport,
    "--ctstate": _opt_ctstate,
    "--icmp-type": _opt_icmp_type,
    "--icmpv6-type": _opt_icmp_type,
    "--dst-type": _opt_dst_type,
}
_TARGET_OPTIONS = {"SNAT": "--to-source", "DNAT": "--to-destination"}


def _target(state: _Parse, chain: str) -> Rule:
    kind, target = state.tokens[state.pos], state.value()
    args = tuple(state.tokens[state.pos + 2 :])
    option = _TARGET_OPTIONS.get(target)
    if option is not None:
        if len(args) != 2 or args[0] != option:
            raise state.fail(f"{target} without {option} ADDRESS")
    elif args:
        raise state.fail(f"options after the target: {' '.join(args)}")
    if kind == "-g" and (target in VERDICTS or target == "RETURN"):
        raise state.fail(f"-g {target}")
    if state.negate:
        raise state.fail("! before the target")
    return Rule(chain, tuple(state.matches), kind, target, args, state.line)


@functools.lru_cache(maxsize=100_000)
def parse_rule(line: str) -> Rule:
    """One ``-A CHAIN ...`` line, understood (or UnknownRule)."""
    tokens = line.split()
    if len(tokens) < 4 or tokens[0] != "-A":
        raise UnknownRule(f"not a rule line: {line!r}")
    state = _Parse(tokens, line, pos=2)
    while state.pos < len(tokens):
        token = tokens[state.pos]
        if token == "!":
            if state.negate:
                raise state.fail("! !")
            state.negate = True
            state.pos += 1
            continue
        if token in ("-j", "-g"):
            return _target(state, tokens[1])
        handler = _OPTIONS.get(token)
        if handler is None:
            raise state.fail(f"unknown option {token!r}")
        if state.negate and token not in ("-i", "-o", "-s", "-d"):
            raise state.fail(f"! before {token}")
        handler(state, token)
        state.negate = False
        state.pos += 2
    raise state.fail("no target")


@dataclass(frozen=True)
class Outcome:
    verdict: str  # ACCEPT, DROP, CONTINUE, "DNAT --to-destination X", "MASQUERADE", ...
    trace: tuple[str, ...]  # the rules that matched on the way, in order

    def __str__(self) -> str:
        return "\n".join([self.verdict, *(f"    {line}" for line in self.trace)])


Chains = Mapping[str, Sequence[str]]


def chains_of(lines: Iterable[str]) -> dict[str, list[str]]:
    """Rule lines grouped by their chain, in order."""
    chains: dict[str, list[str]] = {}
    for line in lines:
        chains.setdefault(line.split()[1], []).append(line)
    return chains


def check_chains(chains: Chains) -> None:
    """Every rule parses, sits in the chain it names, and jumps only to chains that exist."""
    for chain, lines in chains.items():
        for line in lines:
            rule = parse_rule(line)
            if rule.chain != chain:
                raise UnknownRule(f"{line!r} listed in chain {chain}")
            if rule.target not in (*VERDICTS, "RETURN") and rule.target not in chains:
                raise UnknownRule(f"{line!r} jumps to a chain that does not exist")


def evaluate(chains: Chains, entry: str, packet: Packet, *, limit: int = 10_000) -> Outcome:
    """What the table does with ``packet`` entering at ``entry``."""
    if entry not in chains:
        raise UnknownRule(f"entry chain {entry} does not exist")
    stack: list[tuple[str, int]] = []  # where each -j came from
    chain, index = entry, 0
    trace: list[str] = []
    for _ in range(limit):
        rules = chains[chain]
        if index >= len(rules):
            if not stack:
                return Outcome(CONTINUE, tuple(trace))
            chain, index = stack.pop()
            continue
        rule = parse_rule(rules[index])
        index += 1
        if not rule.hits(packet):
            continue
        trace.append(rule.line)
        if rule.target == "RETURN":
            index = len(rules)  # as if the chain ended here
        elif rule.target in VERDICTS:
            return Outcome(rule.verdict, tuple(trace))
        elif rule.target not in chains:
            raise UnknownRule(f"{rule.line!r} jumps to a chain that does not exist")
        else:
            if rule.kind == "-j":
                stack.append((chain, index))
            chain, index = rule.target, 0
    raise UnknownRule(f"no verdict after {limit} rules (a loop?) entering {entry}")
