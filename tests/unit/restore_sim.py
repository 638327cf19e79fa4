"""What ``iptables-restore --noflush`` does with pybridge's input, on a model of the tables: a
strict simulator for tests. It refuses what the kernel (or iptables) would refuse: a rule
position out of range, a delete by text of a rule that is not there, -X of a chain that is
not empty, built in or still jumped to, a jump or goto to a chain that does not exist. An
input it refuses changes nothing (iptables-restore commits all or nothing)."""

from __future__ import annotations

import copy

from .iptables_eval import VERDICTS, parse_rule

BUILTIN: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}

# table -> chain -> rule lines ("-A CHAIN ..."), chains in the order they were made
Tables = dict[str, dict[str, list[str]]]


class Refused(AssertionError):
    """A line iptables-restore would refuse."""


def empty_tables() -> Tables:
    return {table: {chain: [] for chain in chains} for table, chains in BUILTIN.items()}


def load_save(text: str) -> Tables:
    """Tables as ``text`` (iptables-save output) lists them; built-in chains always there."""
    tables = empty_tables()
    table: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = tables.setdefault(line[1:], {})
        elif line.startswith(":"):
            table.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            table[line.split()[1]].append(line)
    return tables


def save_text(tables: Tables) -> str:
    """The tables as iptables-save prints them."""
    out: list[str] = []
    for table, chains in tables.items():
        out.append(f"*{table}")
        builtin = BUILTIN.get(table, ())
        out += [f":{c} {'ACCEPT' if c in builtin else '-'} [0:0]" for c in chains]
        out += [rule for rules in chains.values() for rule in rules]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def apply_restore(tables: Tables, text: str) -> Tables:
    """``tables`` after ``iptables-restore --noflush`` of ``text`` (a new object; Refused)."""
    result = copy.deepcopy(tables)
    table: dict[str, list[str]] | None = None
    name = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            if line.startswith("*"):
                if table is not None:
                    raise Refused("a table starts before the last one's COMMIT")
                name = line[1:]
                table = result.setdefault(name, {})
            elif table is None:
                raise Refused("a line outside any table")
            elif line == "COMMIT":
                table = None
            else:
                _line(name, table, line)
        except (Refused, ValueError, IndexError) as error:
            raise Refused(f"line {number} {line!r}: {error}") from None
    if table is not None:
        raise Refused("no COMMIT at the end")
    return result


def _line(name: str, table: dict[str, list[str]], line: str) -> None:
    words = line.split()
    if line.startswith(":"):
        chain, policy = words[0][1:], words[1]
        if (policy != "-") != (chain in BUILTIN.get(name, ())):
            raise Refused("a policy for a user chain, or none for a built-in one")
        table[chain] = []  # created, or flushed (--noflush flushes only what is named)
        return
    op, chain = words[0], words[1]
    if chain not in table:
        raise Refused(f"chain {chain} does not exist")
    rules = table[chain]
    if op == "-X":
        _delete_chain(name, table, chain)
    elif op == "-A":
        rules.append(_checked(table, line))
    elif op == "-I":
        position = int(words[2])
        if not 1 <= position <= len(rules) + 1:
            raise Refused(f"position {position} in a chain of {len(rules)} rules")
        rules.insert(position - 1, _checked(table, f"-A {chain} {' '.join(words[3:])}"))
    elif op == "-D" and len(words) == 3 and words[2].isdigit():
        position = int(words[2])
        if not 1 <= position <= len(rules):
            raise Refused(f"rule {position} of a chain of {len(rules)} rules")
        del rules[position - 1]
    elif op == "-D":
        rule = f"-A {chain} {' '.join(words[2:])}"
        if rule not in rules:
            raise Refused("no such rule to delete")
        rules.remove(rule)  # the first that matches
    else:
        raise Refused(f"unknown command {op}")


def _checked(table: dict[str, list[str]], rule: str) -> str:
    target = parse_rule(rule).target
    if target not in (*VERDICTS, "RETURN") and target not in table:
        raise Refused(f"target chain {target} does not exist")
    return rule


def _delete_chain(name: str, table: dict[str, list[str]], chain: str) -> None:
    if chain in BUILTIN.get(name, ()):
        raise Refused(f"{chain} is built in")
    if table[chain]:
        raise Refused(f"{chain} is not empty")
    for rules in table.values():
        for rule in rules:
            if parse_rule(rule).target == chain:
                raise Refused(f"{chain} is still referenced by {rule!r}")
    del table[chain]
