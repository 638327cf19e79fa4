"""pybridge serves its socket within dockerd's start-up window (dockerd gives a managed plugin
about 9 s) even with many networks and endpoints in its state."""

from __future__ import annotations

import json
import secrets
import time

from tests.e2e.conftest import Plugin, plugin_socket
from tests.harness import wait_for
from tests.hostenv import link_names, post_raw

NETWORKS = 100
ENDPOINTS_PER_NETWORK = 3
LIMIT_SECONDS = 5.0


SOCKETS: list[str] = []


def call(method: str, body: dict[str, object]) -> None:
    if not SOCKETS:
        SOCKETS.append(plugin_socket())
    status, reply = post_raw(SOCKETS[-1], method, json.dumps(body).encode(), timeout=60)
    assert status == 200, (method, reply)


def test_restart_with_many_networks_is_quick(plugin: Plugin) -> None:
    SOCKETS[:] = [plugin_socket()]
    networks = [secrets.token_hex(32) for _ in range(NETWORKS)]
    endpoints: list[tuple[str, str]] = []
    try:
        for i, network_id in enumerate(networks):
            call(
                "NetworkDriver.CreateNetwork",
                {
                    "NetworkID": network_id,
                    "Options": {"com.docker.network.generic": {}},
                    "IPv4Data": [{"Pool": f"10.214.{i}.0/24", "Gateway": f"10.214.{i}.1/24"}],
                },
            )
            for j in range(ENDPOINTS_PER_NETWORK):
                endpoint_id = secrets.token_hex(32)
                call(
                    "NetworkDriver.CreateEndpoint",
                    {
                        "NetworkID": network_id,
                        "EndpointID": endpoint_id,
                        "Interface": {"Address": f"10.214.{i}.{j + 2}/24"},
                    },
                )
                endpoints.append((network_id, endpoint_id))
        plugin.stop()
        started = time.monotonic()
        plugin.start()
        assert wait_for(
            lambda: post_raw(plugin_socket(), "Plugin.Activate", b"")[0] == 200, timeout=30
        )
        elapsed = time.monotonic() - started
        assert elapsed < LIMIT_SECONDS, f"socket served after {elapsed:.1f} s"
        names = link_names()
        assert all("pyb-" + n[:11] in names for n in networks)
    finally:
        for network_id, endpoint_id in endpoints:
            call(
                "NetworkDriver.DeleteEndpoint", {"NetworkID": network_id, "EndpointID": endpoint_id}
            )
        for network_id in networks:
            call("NetworkDriver.DeleteNetwork", {"NetworkID": network_id})
    # The bridges go just after each DeleteNetwork answer (in the background).
    assert wait_for(
        lambda: (
            not any(
                n.startswith("pyb-") and n[4:] in {x[:11] for x in networks} for n in link_names()
            )
        ),
        timeout=30,
    )
