"""The firewall adapter: the only module that runs iptables.

Rules are written with the iptables flavour Docker itself uses on this host (nf_tables or
legacy). Rules in the other flavour would live in tables the host's FORWARD DROP never
consults (an nftables accept is not final across base chains). Detection, in order:

1. an explicit setting (``--firewall-backend nft|legacy``);
2. the flavour whose ruleset already holds Docker's chains (DOCKER / DOCKER-USER);
3. the flavour of ``iptables`` on PATH, which is the one Docker will use when it starts.

Each apply is one ``*-save`` plus one ``*-restore --noflush`` per address family.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Sequence
from typing import Literal

from .errors import HostError
from .model import Family
from .process import CommandResult, run
from .rules import (
    NetworkRules,
    RuleSet,
    drift,
    incremental_restore,
    render_restore,
    rule_set,
)

log = logging.getLogger(__name__)

Backend = Literal["nft", "legacy"]
BACKENDS: tuple[Backend, ...] = ("nft", "legacy")
LEGACY_TABLE_NAMES = "/proc/net/ip_tables_names"


def tool(backend: Backend, family: Family, action: str = "") -> str:
    """e.g. tool("nft", 6, "restore") -> "ip6tables-nft-restore"."""
    base = "iptables" if family == 4 else "ip6tables"
    return f"{base}-{backend}" + (f"-{action}" if action else "")


def available_backends() -> list[Backend]:
    return [b for b in BACKENDS if shutil.which(tool(b, 4, "restore"))]


async def detect_backend(setting: str = "auto") -> Backend:
    if setting == "nft":
        return "nft"
    if setting == "legacy":
        return "legacy"
    if setting != "auto":
        raise HostError(f"firewall backend {setting!r} is not valid; use auto, nft or legacy")
    candidates = available_backends()
    if not candidates:
        raise HostError(
            "no iptables tools found (iptables-nft-restore or iptables-legacy-restore); "
            "install the iptables package"
        )
    with_docker = await docker_backends()
    if len(with_docker) == 1:
        return with_docker[0]
    default = await _path_iptables_backend()
    if with_docker and default not in with_docker:
        return with_docker[0]
    if default in candidates:
        return default
    return candidates[0]


async def readable_backends() -> list[Backend]:
    """The installed flavours whose rules can be read without side effects: reading legacy
    tables that do not exist would create them (empty) on the host."""
    return [
        b
        for b in available_backends()
        if b != "legacy" or await asyncio.to_thread(_legacy_filter_exists)
    ]


async def docker_backends() -> list[Backend]:
    """The flavours whose filter table holds Docker's chains (DOCKER or DOCKER-USER)."""
    found = []
    for backend in await readable_backends():
        result = await run([tool(backend, 4, "save"), "-t", "filter"])
        if result.returncode == 0 and (
            ":DOCKER-USER" in result.stdout or ":DOCKER " in result.stdout
        ):
            found.append(backend)
    return found


def _legacy_filter_exists() -> bool:
    try:
        with open(LEGACY_TABLE_NAMES) as names:
            return "filter" in names.read().split()
    except OSError:
        return False


async def _path_iptables_backend() -> Backend | None:
    if not shutil.which("iptables"):
        return None
    result = await run(["iptables", "-V"])
    text = result.stdout + result.stderr
    if "nf_tables" in text:
        return "nft"
    if "legacy" in text:
        return "legacy"
    return None


def _plan(
    networks: Sequence[NetworkRules], family: Family, before: RuleSet | None
) -> tuple[RuleSet, str | None]:
    """The rules wanted, and the lines that turn ``before`` (what the last write left) into
    them, change by change; None: write everything."""
    wanted = rule_set(networks, family, before)
    return wanted, incremental_restore(before, wanted) if before is not None else None


class IptablesFirewall:
    """Applies the rendered rule set; serialises applies so batches never interleave."""

    def __init__(self, backend: Backend, *, ipv6: bool = True, netns: str | None = None) -> None:
        # What was last written per family: an apply that would write the same again is
        # skipped (a container without ports changes nothing). Damage done meanwhile by
        # others is the self-healing check's job, which forces the write.
        self._applied: dict[Family, RuleSet] = {}
        self.backend = backend
        # Tests run the firewall inside a throwaway network namespace.
        self._prefix = ["ip", "netns", "exec", netns] if netns else []
        self.families: tuple[Family, ...] = (
            (4, 6) if ipv6 and shutil.which(tool(backend, 6, "restore")) else (4,)
        )
        self._lock = asyncio.Lock()
        # What iptables-restore was last given, per family (tests, diagnostics).
        self.last_written: dict[Family, str] = {}

    async def save(self, family: Family) -> str:
        result = await run([*self._prefix, tool(self.backend, family, "save")])
        if result.returncode != 0:
            detail = result.stderr.strip() or f"exit status {result.returncode}"
            raise HostError(f"{tool(self.backend, family, 'save')} failed: {detail}")
        return result.stdout

    async def apply(self, networks: Sequence[NetworkRules], *, force: bool = False) -> None:
        """Write the rules of both families (at the same time: they are independent)."""
        async with self._lock:
            await asyncio.gather(*(self._apply(networks, f, force) for f in self.families))

    async def _apply(self, networks: Sequence[NetworkRules], family: Family, force: bool) -> None:
        before = None if force else self._applied.get(family)
        # Rendering and comparing grow with the rule set: off the event loop.
        wanted, changes = await asyncio.to_thread(_plan, networks, family, before)
        restore = tool(self.backend, family, "restore")
        argv = [*self._prefix, restore, "-w", "5", "--noflush"]
        self._applied.pop(family, None)  # unknown until a write succeeds
        if changes is not None:
            result = await self._restore(argv, family, changes) if changes else None
            if result is None or result.returncode == 0:
                self._applied[family] = wanted
                return
            # Someone changed pybridge's chains since the last write: write them whole.
            log.warning(
                "%s refused a change to pybridge's rules (%s); writing them whole",
                restore,
                result.stderr.strip(),
            )
        # A whole write: at start-up, when forced (healing), after a failed write, when the
        # chains come or go. It reads what is there first (the jumps are shared with others).
        current = await self.save(family)
        text = render_restore(networks, family, current)
        if text:
            result = await self._restore(argv, family, text)
            if result.returncode != 0:
                log.error("%s failed on input:\n%s", restore, text)
                raise HostError(f"{restore} refused pybridge's rules: {result.stderr.strip()}")
        self._applied[family] = wanted

    async def _restore(self, argv: list[str], family: Family, text: str) -> CommandResult:
        self.last_written[family] = text
        return await run(argv, stdin=text)

    async def drop_forwarded_by_default(self, family: Family) -> None:
        """Set the FORWARD policy of the filter table to DROP (see the driver's forwarding)."""
        if family not in self.families:
            return
        command = tool(self.backend, family)
        async with self._lock:
            result = await run([*self._prefix, command, "-w", "5", "-P", "FORWARD", "DROP"])
        if result.returncode != 0:
            raise HostError(
                f"{command} could not set the FORWARD policy to DROP: {result.stderr.strip()}"
            )
        log.info("%s: FORWARD policy set to DROP before turning on forwarding", command)

    async def drift(self, networks: Sequence[NetworkRules]) -> list[str]:
        """What differs from the wanted rules, per family ([] when all is in place)."""
        problems: list[str] = []
        async with self._lock:
            for family in self.families:
                current = await self.save(family)
                problems += [f"IPv{family} {p}" for p in drift(networks, family, current)]
        return problems
