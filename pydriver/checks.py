"""`pydriver doctor`'s checks (pure): each takes facts already gathered (doctor.py reads them
through the service's own adapters) and returns findings. Nothing here does I/O, so each check
is tested without root. Every finding carries a ``kind`` saying which check found what, for
decisions and tests; its text is only ever shown."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .clusterreport import ClusterReport
from .logs import escape
from .model import Endpoint, Family, HostRoute, Network
from .naming import VXLAN_PREFIX, is_pybridge_bridge, is_pybridge_veth, vxlan_name
from .pruning import managed_plugin_id
from .rules import CHAIN_PREFIX, NetworkRules, drift, parse_save
from .store import ROW_KIND, SCHEMA_VERSION, SetAside, StateHealth

RESTART = "restart pybridge"


@dataclass(frozen=True)
class Finding:
    ok: bool
    what: str
    fix: str = ""
    kind: str = ""  # e.g. "bridge-missing": what was found, never parsed out of ``what``


def ok(kind: str, what: str) -> Finding:
    return Finding(True, what, "", kind)


def problem(kind: str, what: str, fix: str) -> Finding:
    return Finding(False, what, fix, kind)


# -- the state database -------------------------------------------------------------------------


def check_database(health: StateHealth) -> list[Finding]:
    path = health.path
    if not health.found:
        return [
            problem(
                "state-missing",
                f"no state database at {path}",
                "start pybridge (scripts/install.sh), or pass the right --state-dir",
            )
        ]
    if health.error is not None:
        return [
            problem(
                "state-unreadable",
                f"the state database {path} cannot be read: {health.error}",
                "restore it from a backup; without it pybridge has forgotten its networks",
            )
        ]
    if health.integrity != "ok":
        return [
            problem(
                "state-damaged",
                f"the state database {path} is damaged: {health.integrity}",
                "restore it from a backup",
            )
        ]
    if health.schema_version is None or health.schema_version > SCHEMA_VERSION:
        return [
            problem(
                "state-schema",
                f"the state database {path} has an unknown schema",
                "use the pybridge version that wrote it",
            )
        ]
    return [ok("state-intact", f"state database {path} is intact"), *_set_aside(health)]


def state_usable(health: StateHealth) -> bool:
    """Whether the database is one whose networks can be read (check_database says so)."""
    return any(f.kind == "state-intact" for f in check_database(health))


def _listed(found: Sequence[SetAside]) -> str:
    text = "; ".join(
        f"{ROW_KIND.get(r.source, r.source)} {r.key[:40]} ({r.error[:120]})" for r in found[:5]
    )
    # Keys and errors come from damaged rows: nothing in them may reach the terminal raw.
    return escape(text) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")


def _set_aside(health: StateHealth) -> list[Finding]:
    """Rows pybridge could not decode: set aside (the quarantine table), or still in place."""
    kept = [r for r in health.set_aside if r.time is not None]
    waiting = [r for r in health.set_aside if r.time is None]
    clear = f"sqlite3 {health.path} 'DELETE FROM quarantine'"  # noqa: S608 (a hint, not a query)
    found = []
    if kept:
        found.append(
            problem(
                "rows-set-aside",
                f"{len(kept)} row(s) of pybridge's state could not be read and were set aside "
                f"(pybridge serves without them): {_listed(kept)}",
                "a network set aside is unknown to pybridge: remove it in Docker (docker network "
                "rm) and create it again, likewise a network using a pool set aside; the rows "
                f"are in table quarantine of {health.path}; once dealt with, clear it: {clear}",
            )
        )
    if waiting:
        found.append(
            problem(
                "rows-unreadable",
                f"{len(waiting)} row(s) of pybridge's state cannot be read: {_listed(waiting)}",
                f"{RESTART}: it sets them aside and serves the rest",
            )
        )
    return found


# -- the socket ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """What answered Plugin.Activate on pybridge's socket."""

    error: str | None = None  # why nothing answered
    pybridge: bool = False  # the answer was pybridge's (HTTP 200, implements NetworkDriver)


def check_socket(path: str, probe: Probe) -> list[Finding]:
    if probe.error is not None:
        return [
            problem(
                "socket-silent",
                f"pybridge does not answer on {path} ({probe.error})",
                "start it: scripts/pybridge-service.sh start (or check its log)",
            )
        ]
    if not probe.pybridge:
        return [
            problem(
                "socket-foreign",
                f"something answers on {path}, but not as pybridge",
                "check what serves that socket",
            )
        ]
    return [ok("socket-ok", f"pybridge answers on {path}")]


# -- forwarding ---------------------------------------------------------------------------------


def check_forwarding(
    networks: Sequence[Network], forwarding: Mapping[Family, str | None]
) -> list[Finding]:
    """``forwarding``: the values of net.ipv4.ip_forward (4) and net.ipv6.conf.all.forwarding
    (6). Only a host with networks needs it, and IPv6 only for networks with IPv6 subnets."""
    if not networks:
        return []
    found = [
        ok("forwarding-on", "IPv4 forwarding is on")
        if forwarding.get(4) == "1"
        else problem(
            "forwarding-off",
            "IPv4 forwarding is off: containers cannot reach anything outside",
            "sysctl -w net.ipv4.ip_forward=1 (pybridge sets it when it starts)",
        )
    ]
    if any(n.subnets_v6 for n in networks):
        found.append(
            ok("forwarding-on", "IPv6 forwarding is on")
            if forwarding.get(6) == "1"
            else problem(
                "forwarding-off",
                "IPv6 forwarding is off: IPv6 containers cannot reach outside",
                "sysctl -w net.ipv6.conf.all.forwarding=1",
            )
        )
    return found


# -- iptables -----------------------------------------------------------------------------------


def check_backend_known(error: str | None) -> list[Finding]:
    """pybridge's backend could not be determined (``error``): nothing of the firewall can be
    checked."""
    return [] if error is None else [problem("backend-unknown", error, "install iptables")]


def check_backends(ours: str, docker: str | None, others: Mapping[str, str]) -> list[Finding]:
    """``docker``: the flavour holding Docker's chains; ``others``: the IPv4 rules of each
    other flavour that can be read, by flavour."""
    if docker is not None and ours != docker:
        found = [
            problem(
                "backend-mismatch",
                f"Docker's rules are in iptables-{docker} but pybridge's are in iptables-{ours}: "
                "packets never see pybridge's accepts",
                f"run pybridge with --firewall-backend={docker} (or auto) and restart it",
            )
        ]
    elif docker is not None:
        found = [ok("backend-same", f"Docker and pybridge both use iptables-{docker}")]
    else:
        found = [
            ok(
                "backend-no-docker",
                f"Docker's chains were not found; pybridge uses iptables-{ours}",
            )
        ]
    for backend, save in others.items():
        if backend != ours and _has_pybridge_chains(save):
            found.append(
                problem(
                    "chains-elsewhere",
                    f"pybridge chains are also in iptables-{backend}, which pybridge does not use",
                    f"remove them: iptables-{backend}-save | grep PYBRIDGE, then -F and -X each "
                    "chain (or restart pybridge once with that backend and remove its networks)",
                )
            )
    return found


def _has_pybridge_chains(save: str) -> bool:
    return any(
        name.startswith(CHAIN_PREFIX) for names, _ in parse_save(save).values() for name in names
    )


@dataclass(frozen=True)
class Rules:
    """pybridge's backend's rules of one family (iptables-save), or why they cannot be read."""

    family: Family
    save: str = ""
    error: str | None = None


def check_firewall(rules: Rules, views: Sequence[NetworkRules], networks: bool) -> list[Finding]:
    """pybridge's chains and jumps against what its networks (``views``) need; ``networks``:
    whether there are any (with none, only leftovers are a problem)."""
    label = f"IPv{rules.family} firewall"
    if rules.error is not None:
        return [
            problem(
                "firewall-unreadable",
                f"{label}: the rules cannot be read: {rules.error}",
                "check that iptables works on this host",
            )
        ]
    differences = drift(views, rules.family, rules.save)
    if differences:
        return [
            problem(
                "firewall-drift",
                f"{label}: {d}",
                "pybridge restores its rules within seconds while it runs; if this stays, "
                "restart it (scripts/pybridge-service.sh restart)",
            )
            for d in differences
        ]
    if networks:
        return [ok("firewall-ok", f"{label}: pybridge's chains and jumps are all in place")]
    return []


def chain_policy(save: str, table: str, chain: str) -> str | None:
    """The policy of a built-in chain in iptables-save output (None if it is not there)."""
    current = None
    for line in save.splitlines():
        if line.startswith("*"):
            current = line[1:].strip()
        elif current == table and line.startswith(f":{chain} "):
            parts = line.split()
            return parts[1] if len(parts) > 1 else None
    return None


def check_forward_policy(save_v4: str, bridge_nf_call: str | None) -> list[Finding]:
    """Not a problem either way: says what a DROP policy (Docker's) means for pybridge."""
    if chain_policy(save_v4, "filter", "FORWARD") != "DROP":
        return []
    detail = (
        "br_netfilter is on, so even traffic within one bridge"
        if bridge_nf_call == "1"
        else "traffic between networks"
    )
    return [
        ok("forward-policy", f"FORWARD policy is DROP ({detail} needs pybridge's accept rules)")
    ]


# -- kernel objects -----------------------------------------------------------------------------


def check_networks(networks: Sequence[Network], links: Mapping[str, str | None]) -> list[Finding]:
    """Networks half made or half removed, and networks whose bridge is gone. ``links``: the
    host's interfaces, name -> kind ("bridge", "veth", ...)."""
    found = []
    for n in networks:
        if n.state != "ready":
            found.append(
                problem(
                    "network-half",
                    f"network {n.id[:12]} is half {n.state}",
                    f"{RESTART}: it finishes or undoes it",
                )
            )
        if n.bridge not in links:
            found.append(
                problem(
                    "bridge-missing",
                    f"network {n.id[:12]} has no bridge {n.bridge}",
                    f"{RESTART}: it recreates it",
                )
            )
    return found


def check_veths(endpoints: Sequence[Endpoint], links: Mapping[str, str | None]) -> list[Finding]:
    """Endpoints of containers that are gone (a joined endpoint whose veth disappeared)."""
    return [
        problem(
            "veth-lost",
            f"endpoint {e.id[:12]} has lost its veth {e.host_veth} (its container is gone)",
            "pybridge removes it by itself within a minute while it runs",
        )
        for e in endpoints
        if e.sandbox_key and e.host_veth not in links
    ]


def check_stray_links(
    networks: Sequence[Network],
    endpoints: Sequence[Endpoint],
    links: Mapping[str, str | None],
    spares: Collection[str] = (),
) -> list[Finding]:
    """Bridges, veths and tunnel devices named like pybridge's that no state refers to, but
    ``spares``: spare veth pairs as pybridge keeps them (down, on no bridge; spares.py)."""
    bridges = {n.bridge for n in networks}
    veths = {e.host_veth for e in endpoints} | {e.container_veth for e in endpoints}
    tunnels = {vxlan_name(n.id) for n in networks}
    return [
        problem(
            "link-stray",
            f"{name} looks like pybridge's but no state refers to it",
            f"ip link del {name} (pybridge removes it when it starts)",
        )
        for name, kind in sorted(links.items())
        if (kind == "bridge" and is_pybridge_bridge(name) and name not in bridges)
        or (kind == "veth" and is_pybridge_veth(name) and name not in veths | set(spares))
        or (kind == "vxlan" and name.startswith(VXLAN_PREFIX) and name not in tunnels)
    ]


def check_docker_knows(networks: Sequence[Network], known: Iterable[str] | None) -> list[Finding]:
    """Networks Docker no longer knows (``known``: its network ids; None: it was not asked)."""
    if known is None:
        return []
    ids = set(known)
    return [
        problem(
            "network-unknown-to-docker",
            f"network {n.id[:12]} (bridge {n.bridge}) is in pybridge's state but Docker does "
            "not know it (removed while pybridge was not there)",
            "pydriver prune (removes such networks from pybridge)",
        )
        for n in networks
        if n.id not in ids
    ]


# The names dockerd reads `-d pybridge` as, for a managed plugin (its reference, normalised).
_PYBRIDGE_PLUGIN_NAMES = ("pybridge", "pybridge:latest")


def check_plugin_name(socket: str, plugins: Sequence[tuple[str, bool]] | None) -> list[Finding]:
    """A managed plugin named pybridge beside the host service (``socket`` is the host
    service's): dockerd resolves `-d pybridge` to the managed plugin first, so once dockerd
    restarts, `docker network create -d pybridge` fails with "could not resolve driver
    pybridge in registry" (dockerd 20.10), whether the plugin is enabled or not; and two
    pybridges on one host share /var/lib/pydriver."""
    if plugins is None or managed_plugin_id(socket) is not None:
        return []
    return [
        problem(
            "managed-plugin-beside-the-host-service",
            f"the managed plugin {name} ({'enabled' if enabled else 'disabled'}) is installed "
            "beside the pybridge host service: dockerd resolves -d pybridge to it, so after "
            'dockerd restarts, networks with -d pybridge fail ("could not resolve driver '
            'pybridge in registry"); run one pybridge per host',
            f"docker plugin disable -f {name}; docker plugin rm {name} (or stop the host "
            f"service and use -d {name})",
        )
        for name, enabled in plugins
        if name in _PYBRIDGE_PLUGIN_NAMES
    ]


def check_kernel_match(
    networks: Sequence[Network], endpoints: Sequence[Endpoint], links: Mapping[str, str | None]
) -> list[Finding]:
    """The summary: every network has its bridge (what else differs is reported on its own)."""
    if not networks or any(n.bridge not in links for n in networks):
        return []
    return [
        ok(
            "kernel-match",
            f"{len(networks)} network(s) and {len(endpoints)} endpoint(s) match the kernel",
        )
    ]


def check_routes(networks: Sequence[Network], routes: Sequence[HostRoute]) -> list[Finding]:
    """Subnets overlapping a host route that is not on one of pybridge's bridges (default
    routes overlap everything and are left out)."""
    bridges = {n.bridge for n in networks}
    return [
        problem(
            "route-overlap",
            f"subnet {s.pool} of network {n.id[:12]} overlaps the host route "
            f"{route.destination} on {route.device or '?'}",
            "traffic for one of them goes the wrong way; move one of them",
        )
        for n in networks
        for s in n.subnets
        for route in routes
        if route.device not in bridges
        and route.destination.prefixlen
        and route.destination.version == s.pool.version
        and route.destination.overlaps(s.pool)
    ]


@dataclass(frozen=True)
class Facts:
    """Everything doctor looks at, gathered by doctor.gather (None: not looked at)."""

    socket: str
    state: StateHealth
    probe: Probe
    networks: Sequence[Network] = ()
    endpoints: Sequence[Endpoint] = ()
    forwarding: Mapping[Family, str | None] = field(default_factory=dict)
    backend: str | None = None  # pybridge's iptables flavour
    backend_error: str | None = None  # why it is not known
    docker_backend: str | None = None
    other_backends: Mapping[str, str] = field(default_factory=dict)  # flavour -> IPv4 rules
    rules: Sequence[Rules] = ()
    views: Sequence[NetworkRules] = ()  # the firewall's view of the networks
    bridge_nf_call: str | None = None
    links: Mapping[str, str | None] = field(default_factory=dict)  # name -> kind
    spare_links: frozenset[str] = frozenset()  # spare veth pairs' ends, down and on no bridge
    routes: Sequence[HostRoute] = ()
    docker_networks: frozenset[str] | None = None
    docker_plugins: Sequence[tuple[str, bool]] | None = None  # managed: (name, enabled)
    cluster: ClusterReport | None = None  # networks that span hosts (None: not in a cluster)


def evaluate(facts: Facts) -> list[Finding]:
    """Every check, in the order the report shows them."""
    found = [
        *check_database(facts.state),
        *check_socket(facts.socket, facts.probe),
        *check_forwarding(facts.networks, facts.forwarding),
        *check_backend_known(facts.backend_error),
    ]
    if facts.backend is None:
        return found
    found += check_backends(facts.backend, facts.docker_backend, facts.other_backends)
    for rules in facts.rules:
        found += check_firewall(rules, facts.views, bool(facts.networks))
    save_v4 = next((r.save for r in facts.rules if r.family == 4), "")
    found += check_forward_policy(save_v4, facts.bridge_nf_call)
    found += check_networks(facts.networks, facts.links)
    found += check_veths(facts.endpoints, facts.links)
    found += check_stray_links(facts.networks, facts.endpoints, facts.links, facts.spare_links)
    found += check_docker_knows(facts.networks, facts.docker_networks)
    found += check_plugin_name(facts.socket, facts.docker_plugins)
    found += check_kernel_match(facts.networks, facts.endpoints, facts.links)
    found += check_routes(facts.networks, facts.routes)
    found += check_cluster(facts.cluster)
    return found


def check_cluster(report: ClusterReport | None) -> list[Finding]:
    """The tunnels of networks that span hosts hold what the cluster store says."""
    if report is None:
        return []
    if report.store_error:
        return [
            problem(
                "cluster-unreachable",
                f"the cluster store ({report.cluster}) cannot be read: {report.store_error}",
                "check that etcd runs and this host reaches it (tunnels keep working meanwhile; "
                "new segments and address blocks wait for it)",
            )
        ]
    found = []
    for seg in report.segments:
        if not seg.device:
            found.append(
                problem(
                    "tunnel-missing",
                    f"the tunnel of segment {seg.name} (network {seg.network[:12]}) is missing",
                    "restart pybridge: it rebuilds tunnels at start-up",
                )
            )
        elif seg.disagreements:
            found.append(
                problem(
                    "tunnel-drift",
                    f"the tunnel of segment {seg.name}: {len(seg.disagreements)} entries disagree "
                    f"with the cluster store (first: {seg.disagreements[0]})",
                    "pybridge repairs them within seconds; if this stays, see its log "
                    "(pydriver status shows every entry)",
                )
            )
        else:
            found.append(
                ok(
                    "tunnel-ok",
                    f"segment {seg.name}: {len(seg.members)} member host(s), tunnel as the "
                    "cluster store says",
                )
            )
    return found
