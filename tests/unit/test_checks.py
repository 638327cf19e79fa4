"""`pydriver doctor`'s checks, each over facts made up here: no root, no kernel, no iptables."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace
from pathlib import Path

import pytest

from pydriver import checks
from pydriver.checks import Facts, Finding, Probe, Rules
from pydriver.model import Endpoint, HostRoute, Network, Subnet
from pydriver.naming import bridge_name, container_veth_name, host_veth_name
from pydriver.rules import NetworkRules, render_restore
from pydriver.store import SCHEMA_VERSION, SetAside, StateHealth

from .fakes import hexid

DB = Path("/var/lib/pydriver/state.db")
NET = hexid("checks-net")
EP = hexid("checks-ep")
BRIDGE = bridge_name(NET)


def network(
    network_id: str = NET, *, v6: bool = False, state: str = "ready", bridge: str = ""
) -> Network:
    return Network(
        id=network_id,
        bridge=bridge or bridge_name(network_id),
        bridge_owned=True,
        subnets_v4=(
            Subnet(
                ipaddress.ip_network("10.213.80.0/24"), ipaddress.ip_interface("10.213.80.1/24")
            ),
        ),
        subnets_v6=(
            (Subnet(ipaddress.ip_network("fd00:80::/64"), ipaddress.ip_interface("fd00:80::1/64")),)
            if v6
            else ()
        ),
        state=state,  # type: ignore[arg-type]
    )


def endpoint(endpoint_id: str = EP, network_id: str = NET, joined: bool = True) -> Endpoint:
    return Endpoint(
        id=endpoint_id,
        network_id=network_id,
        host_veth=host_veth_name(endpoint_id),
        container_veth=container_veth_name(endpoint_id),
        mac_address="02:50:0a:d5:50:02",
        mac_generated=True,
        address=ipaddress.IPv4Interface("10.213.80.2/24"),
        sandbox_key="/run/netns/x" if joined else None,
    )


def saved(views: list[NetworkRules], family: int) -> str:
    """What iptables-save prints once pybridge's rules for ``views`` are in place (behind
    Docker's FORWARD DROP policy)."""
    text = render_restore(views, 4 if family == 4 else 6, "")
    text = re.sub(r"^-I (\S+) \d+ ", r"-A \1 ", text, flags=re.MULTILINE)
    return text.replace("*filter\n", "*filter\n:FORWARD DROP [0:0]\n")


VIEWS = [NetworkRules(BRIDGE, subnets_v4=(ipaddress.ip_network("10.213.80.0/24"),))]


def kinds(findings: list[Finding]) -> list[str]:
    return [f.kind for f in findings]


def problems(findings: list[Finding]) -> list[Finding]:
    found = [f for f in findings if not f.ok]
    assert all(f.fix for f in found), found  # every problem says how to fix it
    return found


# -- the state database -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("health", "kind", "what"),
    [
        (StateHealth(DB, found=False), "state-missing", f"no state database at {DB}"),
        (
            StateHealth(DB, error="file is not a database"),
            "state-unreadable",
            f"the state database {DB} cannot be read: file is not a database",
        ),
        (
            StateHealth(DB, integrity="*** in database main ***", schema_version=SCHEMA_VERSION),
            "state-damaged",
            f"the state database {DB} is damaged: *** in database main ***",
        ),
        (StateHealth(DB), "state-schema", f"the state database {DB} has an unknown schema"),
        (
            StateHealth(DB, schema_version=SCHEMA_VERSION + 1),
            "state-schema",
            f"the state database {DB} has an unknown schema",
        ),
    ],
)
def test_database_that_cannot_be_used(health: StateHealth, kind: str, what: str) -> None:
    [finding] = problems(checks.check_database(health))
    assert (finding.kind, finding.what) == (kind, what)
    assert not checks.state_usable(health)


def test_intact_database() -> None:
    health = StateHealth(DB, schema_version=SCHEMA_VERSION)
    assert checks.check_database(health) == [
        Finding(True, f"state database {DB} is intact", "", "state-intact")
    ]
    assert checks.state_usable(health)
    assert checks.state_usable(StateHealth(DB, schema_version=1))  # older: pybridge migrates it


def test_rows_set_aside_and_rows_waiting_to_be() -> None:
    rows = [SetAside("networks", NET, "ValueError: x", time=1.0)] * 7 + [
        SetAside("pools", "10.1.0.0/24", "KeyError: 'subnet'\x1b[31m")
    ]
    health = StateHealth(DB, schema_version=SCHEMA_VERSION, set_aside=tuple(rows))
    found = checks.check_database(health)
    assert kinds(found) == ["state-intact", "rows-set-aside", "rows-unreadable"]
    kept, waiting = problems(found)
    assert kept.what.startswith("7 row(s) of pybridge's state could not be read and were set")
    assert kept.what.endswith("; and 2 more")
    assert f"network {NET[:40]}" in kept.what
    assert f"sqlite3 {DB} 'DELETE FROM quarantine'" in kept.fix
    assert waiting.what.startswith("1 row(s) of pybridge's state cannot be read: pool 10.1.0.0")
    assert "\x1b" not in waiting.what  # a damaged row's text never reaches the terminal raw
    assert waiting.fix == "restart pybridge: it sets them aside and serves the rest"


# -- the socket ---------------------------------------------------------------------------------


def test_socket() -> None:
    sock = "/run/docker/plugins/pybridge.sock"
    assert kinds(checks.check_socket(sock, Probe(pybridge=True))) == ["socket-ok"]
    [silent] = problems(checks.check_socket(sock, Probe(error="No such file or directory")))
    assert silent.what == f"pybridge does not answer on {sock} (No such file or directory)"
    [foreign] = problems(checks.check_socket(sock, Probe()))
    assert foreign.what == f"something answers on {sock}, but not as pybridge"


# -- forwarding ---------------------------------------------------------------------------------


def test_forwarding_matters_only_with_networks() -> None:
    assert checks.check_forwarding([], {4: "0", 6: "0"}) == []
    assert kinds(checks.check_forwarding([network()], {4: "1", 6: "0"})) == ["forwarding-on"]
    found = checks.check_forwarding([network(v6=True)], {4: "0", 6: "0"})
    assert [f.what for f in problems(found)] == [
        "IPv4 forwarding is off: containers cannot reach anything outside",
        "IPv6 forwarding is off: IPv6 containers cannot reach outside",
    ]
    found = checks.check_forwarding([network(v6=True)], {4: "1", 6: "1"})
    assert [f.what for f in found] == ["IPv4 forwarding is on", "IPv6 forwarding is on"]
    # A setting that cannot be read (None) is not on.
    assert kinds(checks.check_forwarding([network()], {4: None})) == ["forwarding-off"]


# -- iptables -----------------------------------------------------------------------------------


def test_backend_unknown() -> None:
    assert checks.check_backend_known(None) == []
    [found] = checks.check_backend_known("no iptables tools found")
    assert (found.ok, found.kind, found.fix) == (False, "backend-unknown", "install iptables")


def test_backends() -> None:
    [mismatch] = checks.check_backends("legacy", "nft", {})
    assert mismatch.kind == "backend-mismatch"
    assert mismatch.what.startswith(
        "Docker's rules are in iptables-nft but pybridge's are in iptables-legacy"
    )
    assert "--firewall-backend=nft" in mismatch.fix
    assert [f.what for f in checks.check_backends("nft", "nft", {})] == [
        "Docker and pybridge both use iptables-nft"
    ]
    assert [f.what for f in checks.check_backends("nft", None, {})] == [
        "Docker's chains were not found; pybridge uses iptables-nft"
    ]


def test_pybridge_chains_in_the_other_backend() -> None:
    ours = render_restore([NetworkRules(BRIDGE)], 4, "")
    found = checks.check_backends("nft", "nft", {"legacy": ours})
    assert kinds(found) == ["backend-same", "chains-elsewhere"]
    assert found[1].what == (
        "pybridge chains are also in iptables-legacy, which pybridge does not use"
    )
    # Only chains count: a rule that merely mentions the name (a comment) is not pybridge's.
    other = '*filter\n:FORWARD ACCEPT [0:0]\n-A FORWARD -m comment --comment "PYBRIDGE-X"\nCOMMIT\n'
    assert kinds(checks.check_backends("nft", "nft", {"legacy": other})) == ["backend-same"]


def test_firewall_in_place_drifted_or_unreadable() -> None:
    good = saved(VIEWS, 4)
    assert [f.what for f in checks.check_firewall(Rules(4, good), VIEWS, True)] == [
        "IPv4 firewall: pybridge's chains and jumps are all in place"
    ]
    assert checks.check_firewall(Rules(4, ""), [], False) == []  # nothing wanted, nothing there
    found = checks.check_firewall(Rules(6, ""), VIEWS, True)
    assert kinds(found) == ["firewall-drift"] * len(found)
    missing = [f.what for f in found if f.what.startswith("IPv6 firewall: filter: chain(s)")]
    # the shared chain, its bucket's two, the network's own
    assert len(missing) == 1
    assert missing[0].startswith("IPv6 firewall: filter: chain(s) PYBRIDGE-FORWARD, PYBRIDGE-FE-")
    assert missing[0].endswith(" missing")
    # Leftovers with no network left are a problem too.
    found = checks.check_firewall(Rules(4, good), [], False)
    assert (
        f"IPv4 firewall: filter: leftover chain(s) PYBRIDGE-F-{BRIDGE}, PYBRIDGE-FE-9, "
        "PYBRIDGE-FI-9, PYBRIDGE-FORWARD"
    ) in [f.what for f in found]
    assert kinds(found) == ["firewall-drift"] * 4  # one per table
    [unreadable] = checks.check_firewall(Rules(4, error="iptables-nft-save failed: x"), VIEWS, True)
    assert unreadable.kind == "firewall-unreadable"
    assert not unreadable.ok


def test_drift_names_each_kind_of_difference() -> None:
    """rules.drift, which doctor and the self-healing check share, difference by difference."""
    good = saved(VIEWS, 4)
    lines = good.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("-A PYBRIDGE-FORWARD"))
    fwd = lines[first]
    swapped = [*lines[:first], lines[first + 1], fwd, *lines[first + 2 :]]
    cases = {
        good.replace("-A FORWARD -j PYBRIDGE-FORWARD\n", ""): (
            "filter: jump '-A FORWARD -j PYBRIDGE-FORWARD' missing, duplicated or out of place"
        ),
        good.replace(fwd, fwd + "\n-A PYBRIDGE-FORWARD -s 203.0.113.7/32 -j ACCEPT"): (
            "filter: pybridge rules differ (0 missing, 1 unexpected)"
        ),
        good.replace(fwd + "\n", ""): "filter: pybridge rules differ (1 missing, 0 unexpected)",
        "\n".join(swapped): "filter: pybridge rules differ (out of order)",
        good.replace(":PYBRIDGE-FORWARD - [0:0]\n", ""): (
            "filter: chain(s) PYBRIDGE-FORWARD missing"
        ),
        good + "*filter\n:PYBRIDGE-OLD - [0:0]\nCOMMIT\n": (
            "filter: leftover chain(s) PYBRIDGE-OLD"
        ),
    }
    for save, expected in cases.items():
        found = [f.what for f in checks.check_firewall(Rules(4, save), VIEWS, True)]
        assert found == [f"IPv4 firewall: {expected}"], (expected, found)


@pytest.mark.parametrize(
    ("save", "nf_call", "expected"),
    [
        (
            "*filter\n:FORWARD DROP [0:0]\nCOMMIT\n",
            "1",
            "FORWARD policy is DROP (br_netfilter is on, so even traffic within one bridge needs "
            "pybridge's accept rules)",
        ),
        (
            "*filter\n:FORWARD DROP [0:0]\nCOMMIT\n",
            None,
            "FORWARD policy is DROP (traffic between networks needs pybridge's accept rules)",
        ),
        ("*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n", "1", None),
        ("", "1", None),
        # The filter table's policy, whichever table iptables-save prints last (mangle has a
        # FORWARD chain too, whose policy is ACCEPT).
        (
            "*filter\n:FORWARD DROP [0:0]\nCOMMIT\n*mangle\n:FORWARD ACCEPT [0:0]\nCOMMIT\n",
            None,
            "FORWARD policy is DROP (traffic between networks needs pybridge's accept rules)",
        ),
        ("*mangle\n:FORWARD DROP [0:0]\nCOMMIT\n*filter\n:FORWARD ACCEPT [0:0]\n", None, None),
    ],
)
def test_forward_policy(save: str, nf_call: str | None, expected: str | None) -> None:
    found = checks.check_forward_policy(save, nf_call)
    assert [f.what for f in found] == ([expected] if expected else [])
    assert all(f.ok for f in found)  # it explains; it is never a problem by itself


# -- kernel objects -----------------------------------------------------------------------------


def test_networks_half_made_or_without_bridge() -> None:
    links = {BRIDGE: "bridge"}
    assert checks.check_networks([network()], links) == []
    found = checks.check_networks([network(state="creating")], {})
    assert [(f.kind, f.what) for f in problems(found)] == [
        ("network-half", f"network {NET[:12]} is half creating"),
        ("bridge-missing", f"network {NET[:12]} has no bridge {BRIDGE}"),
    ]


def test_veths() -> None:
    veth = host_veth_name(EP)
    links = {BRIDGE: "bridge", veth: "veth"}
    assert checks.check_veths([endpoint()], links) == []
    assert checks.check_veths([endpoint(joined=False)], {}) == []  # no container yet: no veth
    [lost] = problems(checks.check_veths([endpoint()], {}))
    assert lost.what == f"endpoint {EP[:12]} has lost its veth {veth} (its container is gone)"


def test_stray_links() -> None:
    ours = {BRIDGE: "bridge", host_veth_name(EP): "veth", container_veth_name(EP): "veth"}
    assert checks.check_stray_links([network()], [endpoint()], ours) == []
    stray_bridge = bridge_name(hexid("gone"))
    stray_veth = host_veth_name(hexid("gone-ep"))
    links = {
        **ours,
        stray_veth: "veth",
        stray_bridge: "bridge",
        "docker0": "bridge",  # not pybridge's
        bridge_name(hexid("x")): "dummy",  # named like a bridge, but it is not one
    }
    found = checks.check_stray_links([network()], [endpoint()], links)
    assert [f.what for f in problems(found)] == [
        f"{name} looks like pybridge's but no state refers to it"
        for name in sorted([stray_bridge, stray_veth])
    ]


def test_spare_pairs_are_no_strays_but_a_removed_endpoints_spare_named_pair_is() -> None:
    ours = {BRIDGE: "bridge", host_veth_name(EP): "veth", container_veth_name(EP): "veth"}
    spare = {"pys0123456789ab", "pyt0123456789ab"}  # down, on no bridge: as pybridge keeps them
    left = "pysba9876543210"  # an endpoint took it, then the endpoint's record went
    links = {**ours, **dict.fromkeys(spare, "veth"), left: "veth", "pytba9876543210": "veth"}
    found = checks.check_stray_links([network()], [endpoint()], links, spare)
    assert [f.what for f in problems(found)] == [
        f"{name} looks like pybridge's but no state refers to it"
        for name in (left, "pytba9876543210")
    ]


def test_networks_docker_does_not_know() -> None:
    assert checks.check_docker_knows([network()], None) == []  # Docker not asked
    assert checks.check_docker_knows([network()], {NET}) == []
    [unknown] = problems(checks.check_docker_knows([network()], set()))
    assert unknown.what.startswith(f"network {NET[:12]} (bridge {BRIDGE}) is in pybridge's")
    assert unknown.fix == "pydriver prune (removes such networks from pybridge)"


def test_kernel_match_only_when_every_bridge_is_there() -> None:
    links = {BRIDGE: "bridge"}
    assert checks.check_kernel_match([], [], links) == []
    assert [f.what for f in checks.check_kernel_match([network()], [endpoint()], links)] == [
        "1 network(s) and 1 endpoint(s) match the kernel"
    ]
    assert checks.check_kernel_match([network()], [endpoint()], {}) == []


def test_routes() -> None:
    def route(dest: str, device: str) -> HostRoute:
        return HostRoute(ipaddress.ip_network(dest), device)

    harmless = [
        route("0.0.0.0/0", "eth0"),  # default routes overlap everything
        route("10.213.80.0/24", BRIDGE),  # the network's own
        route("10.213.81.0/24", "eth0"),
        route("fd00:80::/64", "eth0"),  # another family than the subnet's
    ]
    assert checks.check_routes([network()], harmless) == []
    found = checks.check_routes(
        [network()], [route("10.213.80.0/25", "lo"), route("10.0.0.0/8", "")]
    )
    assert [f.what for f in problems(found)] == [
        f"subnet 10.213.80.0/24 of network {NET[:12]} overlaps the host route 10.213.80.0/25 on lo",
        f"subnet 10.213.80.0/24 of network {NET[:12]} overlaps the host route 10.0.0.0/8 on ?",
    ]


# -- all together -------------------------------------------------------------------------------


def healthy_facts() -> Facts:
    return Facts(
        socket="/run/pb.sock",
        state=StateHealth(DB, schema_version=SCHEMA_VERSION),
        probe=Probe(pybridge=True),
        networks=[network()],
        endpoints=[endpoint()],
        forwarding={4: "1", 6: "1"},
        backend="nft",
        docker_backend="nft",
        rules=[Rules(4, saved(VIEWS, 4)), Rules(6, saved(VIEWS, 6))],
        views=VIEWS,
        bridge_nf_call="0",
        links={BRIDGE: "bridge", host_veth_name(EP): "veth"},
        routes=[HostRoute(ipaddress.ip_network("10.213.80.0/24"), BRIDGE)],
        docker_networks=frozenset({NET}),
    )


def test_evaluate_a_healthy_host_in_the_report_order() -> None:
    found = checks.evaluate(healthy_facts())
    assert problems(found) == []
    assert kinds(found) == [
        "state-intact",
        "socket-ok",
        "forwarding-on",
        "backend-same",
        "firewall-ok",
        "firewall-ok",
        "forward-policy",
        "kernel-match",
    ]


def test_evaluate_stops_at_the_firewall_when_the_backend_is_unknown() -> None:
    facts = replace(healthy_facts(), backend=None, backend_error="no iptables tools found")
    assert kinds(checks.evaluate(facts)) == [
        "state-intact",
        "socket-ok",
        "forwarding-on",
        "backend-unknown",
    ]


def test_a_managed_plugin_named_pybridge_beside_the_host_service() -> None:
    host_socket = "/run/docker/plugins/pybridge.sock"
    managed_socket = f"/run/docker/plugins/{'ab' * 32}/pybridge.sock"
    plugins = [("pybridge:latest", False), ("other/plugin:1.0", True)]
    found = checks.check_plugin_name(host_socket, plugins)
    assert [f.kind for f in found] == ["managed-plugin-beside-the-host-service"]
    assert "the managed plugin pybridge:latest (disabled)" in found[0].what
    assert "could not resolve driver pybridge in registry" in found[0].what
    assert found[0].fix.startswith("docker plugin disable -f pybridge:latest")
    # The managed plugin examined itself, Docker not asked, or no such plugin: nothing to say.
    assert checks.check_plugin_name(managed_socket, plugins) == []
    assert checks.check_plugin_name(host_socket, None) == []
    assert checks.check_plugin_name(host_socket, [("myorg/pybridge:2", True)]) == []
