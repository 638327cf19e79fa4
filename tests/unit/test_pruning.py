"""`pydriver prune`'s decisions, from plain facts: which daemon endpoint is acceptable, whether
that daemon is the one using this pybridge, what is stale, and whether to ask."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from pydriver.model import Endpoint, Network, Subnet
from pydriver.protocol import Caller
from pydriver.pruning import (
    POOL_GRACE_SECONDS,
    DaemonFacts,
    DockerNetwork,
    PluginFacts,
    Refused,
    check_same_daemon,
    confirmed,
    daemon_socket,
    how_to_go,
    managed_plugin_id,
    stale,
)
from pydriver.store import PoolRecord

from .fakes import hexid

PLUGIN_ID = hexid("plugin")
MANAGED = f"/run/docker/plugins/{PLUGIN_ID}/pybridge.sock"
HOST_SOCKET = "/run/docker/plugins/pybridge.sock"
DOCKERD = 700
KEPT = hexid("kept")
GONE = hexid("gone")


def caller(pid: int, last_seen: float = 10.0) -> Caller:
    return Caller(pid=pid, uid=0, first_seen=1.0, last_seen=last_seen, requests=3)


def host_service(*callers: Caller, running: dict[int, str] | None = None) -> PluginFacts:
    """pybridge in prune's pid namespace: it says pid 50, prune sees 50."""
    return PluginFacts(
        HOST_SOCKET,
        own_pid=50,
        pid_here=50,
        callers=tuple(callers),
        running={c.pid: "dockerd" for c in callers} if running is None else running,
    )


def managed(*callers: Caller) -> PluginFacts:
    """pybridge in its own pid namespace: pid 1 there, 9000 here; callers' pids are 0."""
    return PluginFacts(MANAGED, own_pid=1, pid_here=9000, callers=tuple(callers), running={})


def daemon(
    pids: frozenset[int] = frozenset({DOCKERD}),
    plugins: frozenset[str] = frozenset(),
    networks: tuple[str, ...] = (KEPT,),
) -> DaemonFacts:
    return DaemonFacts(
        "unix:///var/run/docker.sock", pids, plugins, tuple(DockerNetwork(n) for n in networks)
    )


# -- the endpoint -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "tcp://10.0.0.5:2375",
        "ssh://user@remote",
        "npipe:////./pipe/docker_engine",
        "unix://relative.sock",
        "unix://",
        "",
        "/var/run/docker.sock",
    ],
)
def test_only_a_local_unix_socket_is_accepted(host: str) -> None:
    with pytest.raises(Refused, match="not to a Unix socket on this host"):
        daemon_socket(host)


def test_unix_socket_path() -> None:
    assert daemon_socket("unix:///var/run/docker.sock") == "/var/run/docker.sock"
    assert daemon_socket("unix:///run/user/1000/docker.sock") == "/run/user/1000/docker.sock"


def test_managed_plugin_id() -> None:
    assert managed_plugin_id(MANAGED) == PLUGIN_ID
    assert managed_plugin_id(f"/var/run/docker/plugins/{PLUGIN_ID}/x.sock") == PLUGIN_ID
    assert managed_plugin_id(HOST_SOCKET) is None
    assert managed_plugin_id(f"/run/docker/plugins/{PLUGIN_ID[:12]}/pybridge.sock") is None
    assert managed_plugin_id(f"/tmp/{PLUGIN_ID}/pybridge.sock") is None


# -- the same daemon: a host service ------------------------------------------------------------


def test_the_daemon_calling_pybridge_passes() -> None:
    check_same_daemon(host_service(caller(DOCKERD)), daemon(), [KEPT, GONE], yes=False)


def test_the_daemon_among_other_callers_that_are_not_daemons_passes() -> None:
    plugin = host_service(
        caller(DOCKERD, 5.0), caller(4242, 9.0), running={DOCKERD: "dockerd", 4242: "python3"}
    )
    check_same_daemon(plugin, daemon(), [KEPT], yes=False)


def test_a_daemon_behind_socket_activation_is_any_of_its_serving_processes() -> None:
    check_same_daemon(
        host_service(caller(DOCKERD)), daemon(pids=frozenset({1, DOCKERD})), [KEPT], yes=False
    )


def test_another_daemon_is_refused_naming_both_pids() -> None:
    """DOCKER_HOST points at another daemon (or a fake): pybridge's caller is not it."""
    with pytest.raises(Refused) as err:
        check_same_daemon(
            host_service(caller(DOCKERD)), daemon(pids=frozenset({8123})), [KEPT], yes=True
        )
    message = str(err.value)
    assert f"was last called by pid {DOCKERD} (dockerd)" in message
    assert "(pid 8123)" in message
    assert HOST_SOCKET in message
    assert "unix:///var/run/docker.sock" in message
    assert "removes nothing" in message


def test_last_caller_gone_gives_the_way_out() -> None:
    with pytest.raises(Refused, match=r"pid 700 \(no longer running\).*let it call pybridge once"):
        check_same_daemon(
            host_service(caller(DOCKERD), running={}),
            daemon(pids=frozenset({701})),
            [KEPT],
            yes=True,
        )


def test_two_daemons_sharing_pybridge_are_refused() -> None:
    plugin = host_service(caller(DOCKERD, 5.0), caller(800, 4.0))
    with pytest.raises(Refused, match=r"also used by another Docker daemon \(pid 800\)"):
        check_same_daemon(plugin, daemon(), [KEPT], yes=True)


def test_no_caller_needs_yes() -> None:
    with pytest.raises(Refused, match=r"has not been called by any Docker daemon.*pass --yes"):
        check_same_daemon(host_service(), daemon(), [KEPT], yes=False)


def test_no_caller_with_yes_passes_when_the_daemon_knows_a_pybridge_network() -> None:
    check_same_daemon(host_service(), daemon(networks=(KEPT,)), [KEPT, GONE], yes=True)


def test_no_caller_with_yes_is_refused_when_the_daemon_knows_none() -> None:
    """What a daemon that does not use pybridge looks like, e.g. an empty fake one."""
    with pytest.raises(Refused, match="knows none of pybridge's networks"):
        check_same_daemon(host_service(), daemon(networks=()), [KEPT, GONE], yes=True)
    with pytest.raises(Refused, match="knows none of pybridge's networks"):
        check_same_daemon(host_service(), daemon(networks=(KEPT,)), [], yes=True)


def test_a_daemon_outside_prunes_pid_namespace_is_refused() -> None:
    with pytest.raises(Refused, match="cannot see which process serves"):
        check_same_daemon(host_service(caller(DOCKERD)), daemon(pids=frozenset()), [KEPT], yes=True)


# -- the same daemon: a managed plugin ---------------------------------------------------------


def test_managed_plugin_of_that_daemon_passes_whatever_its_callers() -> None:
    for plugin in (managed(), managed(caller(0))):
        check_same_daemon(
            plugin, daemon(plugins=frozenset({PLUGIN_ID}), networks=()), [GONE], yes=False
        )


def test_managed_plugin_the_daemon_does_not_have_is_refused() -> None:
    with pytest.raises(Refused, match=f"managed plugin {PLUGIN_ID[:12]}, which the Docker"):
        check_same_daemon(
            managed(caller(0)), daemon(plugins=frozenset({hexid("other")})), [KEPT], yes=True
        )


def test_other_pid_namespace_without_a_managed_socket_is_refused() -> None:
    plugin = replace(managed(), socket=HOST_SOCKET)
    with pytest.raises(Refused, match="runs in another pid namespace"):
        check_same_daemon(plugin, daemon(plugins=frozenset({PLUGIN_ID})), [KEPT], yes=True)
    unknown = replace(host_service(caller(DOCKERD)), pid_here=0)  # prune cannot see it
    with pytest.raises(Refused, match="runs in another pid namespace"):
        check_same_daemon(unknown, daemon(), [KEPT], yes=True)


# -- what is stale ------------------------------------------------------------------------------


def network(network_id: str, subnet: str) -> Network:
    pool = ipaddress.ip_network(subnet)
    return Network(
        id=network_id,
        bridge="pyb-" + network_id[:11],
        bridge_owned=True,
        subnets_v4=(Subnet(pool, ipaddress.ip_interface(f"{pool[1]}/{pool.prefixlen}")),),
        subnets_v6=(),
    )


def endpoint(endpoint_id: str, network_id: str) -> Endpoint:
    return Endpoint(
        endpoint_id, network_id, "pyv" + endpoint_id[:12], "pyc", "02:00:00:00:00:01", True
    )


NOW = 100_000.0
OLD = NOW - POOL_GRACE_SECONDS


def test_stale_networks_and_pools() -> None:
    networks = [network(KEPT, "10.1.0.0/24"), network(GONE, "10.2.0.0/24")]
    endpoints = [endpoint(hexid("e1"), KEPT), endpoint(hexid("e2"), GONE)]
    pools = [
        PoolRecord("p-kept", ipaddress.ip_network("10.1.0.0/24"), OLD),
        PoolRecord("p-gone", ipaddress.ip_network("10.2.0.0/24"), OLD),
        PoolRecord("p-v6", ipaddress.ip_network("fd00:1::/64"), None),  # schema 2: long ago
        PoolRecord("p-v6-used", ipaddress.ip_network("fd00:2::/64"), None),
        PoolRecord("p-new", ipaddress.ip_network("10.3.0.0/24"), NOW - 5),
    ]
    docker = [
        DockerNetwork(KEPT, ("10.1.0.0/24",)),
        # Another driver's network on a pybridge pool, spelled unnormalised: still in use.
        DockerNetwork(hexid("macvlan"), ("fd00:2:0:0::/64",)),
    ]
    plan = stale(networks, endpoints, pools, docker, NOW)
    assert [(s.network.id, s.endpoint_ids) for s in plan.networks] == [(GONE, (hexid("e2"),))]
    assert [p.id for p in plan.pools] == ["p-gone", "p-v6"]
    assert plan.recent_pools == 1
    assert plan.lines() == [
        f"network {GONE[:12]} (bridge pyb-{GONE[:11]}, 10.2.0.0/24)",
        "IPAM pool 10.2.0.0/24 (p-gone)",
        "IPAM pool fd00:1::/64 (p-v6)",
    ]
    assert plan.question() == "remove 1 network(s) and 2 IPAM pool(s)? [y/N] "


def test_nothing_stale() -> None:
    plan = stale([network(KEPT, "10.1.0.0/24")], [], [], [DockerNetwork(KEPT, ())], NOW)
    assert plan.empty
    assert plan.lines() == []


def test_a_second_look_drops_what_docker_now_knows() -> None:
    """A network Docker was still creating at the first look is known at the second."""
    plan = stale(
        [network(KEPT, "10.1.0.0/24"), network(GONE, "10.2.0.0/24")],
        [],
        [PoolRecord("p-gone", ipaddress.ip_network("10.2.0.0/24"), OLD)],
        [],
        NOW,
    )
    assert len(plan.networks) == 2
    assert len(plan.pools) == 1
    later = plan.still_unknown(
        [DockerNetwork(KEPT, ("10.1.0.0/24",)), DockerNetwork("x", ("10.2.0.0/24",))]
    )
    assert [s.network.id for s in later.networks] == [GONE]
    assert later.pools == ()


# -- asking -------------------------------------------------------------------------------------


def test_how_to_go() -> None:
    assert how_to_go(dry_run=True, yes=False, terminal=False) == "list"
    assert how_to_go(dry_run=True, yes=True, terminal=True) == "list"
    assert how_to_go(dry_run=False, yes=True, terminal=False) == "remove"
    assert how_to_go(dry_run=False, yes=True, terminal=True) == "remove"
    assert how_to_go(dry_run=False, yes=False, terminal=True) == "ask"
    with pytest.raises(Refused, match="no terminal to ask on: pass --yes"):
        how_to_go(dry_run=False, yes=False, terminal=False)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("y", True), ("YES\n", True), ("", False), ("n", False), ("yep", False)],
)
def test_confirmed(answer: str, expected: bool) -> None:
    assert confirmed(answer) is expected
