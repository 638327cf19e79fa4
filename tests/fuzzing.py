"""Hostile request bodies for every route (hypothesis strategies) and a plain HTTP client on a
Unix socket, shared by the unit and the end-to-end fuzz tests."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

ROUTES = [
    "Plugin.Activate",
    "NetworkDriver.GetCapabilities",
    "NetworkDriver.CreateNetwork",
    "NetworkDriver.DeleteNetwork",
    "NetworkDriver.AllocateNetwork",
    "NetworkDriver.FreeNetwork",
    "NetworkDriver.CreateEndpoint",
    "NetworkDriver.EndpointOperInfo",
    "NetworkDriver.DeleteEndpoint",
    "NetworkDriver.Join",
    "NetworkDriver.Leave",
    "NetworkDriver.DiscoverNew",
    "NetworkDriver.DiscoverDelete",
    "NetworkDriver.ProgramExternalConnectivity",
    "NetworkDriver.RevokeExternalConnectivity",
    "IpamDriver.GetCapabilities",
    "IpamDriver.GetDefaultAddressSpaces",
    "IpamDriver.RequestPool",
    "IpamDriver.ReleasePool",
    "IpamDriver.RequestAddress",
    "IpamDriver.ReleaseAddress",
]

FIELDS = [
    "NetworkID",
    "EndpointID",
    "Options",
    "IPv4Data",
    "IPv6Data",
    "Interface",
    "Address",
    "AddressIPv6",
    "MacAddress",
    "SandboxKey",
    "PoolID",
    "Pool",
    "SubPool",
    "V6",
    "AddressSpace",
    "Gateway",
    "AuxAddresses",
    "com.docker.network.generic",
    "com.docker.network.portmap",
    "com.docker.network.endpoint.exposedports",
    "Proto",
    "Port",
    "HostIP",
    "HostPort",
    "HostPortEnd",
    "RequestAddressType",
]

HEX64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
NASTY_TEXT = st.sampled_from(
    [
        "",
        " ",
        "-",
        "--",
        "x" * 5000,
        "a; rm -rf /",
        "$(reboot)",
        "`id`",
        "pyb-x\n-A FORWARD -j ACCEPT",
        "' OR 1=1 --",
        "\x00",
        "é",
        "10.0.0.0/33",
        "300.1.1.1",
        "::::",
        "fd00::/129",
        "10.0.0.1/24",
        "0.0.0.0/0",
        "::/0",
        "1e9",
        "null",
        "{}",
        "[]",
        "ab" * 32 + "\n",
        "AB" * 32,
    ]
)

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=80),
    NASTY_TEXT,
    HEX64,
)

JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(
            st.one_of(st.sampled_from(FIELDS), st.text(max_size=12)), children, max_size=6
        ),
    ),
    max_leaves=30,
)

# Objects that look like Docker's, with any field possibly wrong: reaches deeper checks.
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=8)

RAW_BODIES = st.one_of(
    BODIES.map(lambda b: json.dumps(b).encode()),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.sampled_from(
        [
            b"",
            b"{",
            b"[" * 5000 + b"]" * 5000,
            b'{"a":' * 3000,
            b"\xff\xfe",
            b"{}" * 1000,
            b'"' + b"x" * 200_000 + b'"',
        ]
    ),
)


def check_reply(status: int, reply: Any) -> None:
    """Every reply is JSON; every failure is one plain sentence in Err."""
    assert status in (200, 404, 500), status
    assert isinstance(reply, dict)
    if status != 200:
        assert set(reply) == {"Err"}, reply
        message = reply["Err"]
        assert isinstance(message, str)
        assert message
        assert "Traceback" not in message, message
        assert "\n" not in message, message
        assert len(message) < 1000, len(message)
