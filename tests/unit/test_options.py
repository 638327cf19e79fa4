"""`docker network create -o KEY=VALUE` validation."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from pydriver import options as o
from pydriver.errors import InvalidRequest, Unsupported
from pydriver.model import NetworkOptions
from pydriver.protocol import parse_create_network

CORPUS_DIR = Path(__file__).resolve().parent.parent / "data" / "corpus"

TRUE_SPELLINGS = ["1", "t", "T", "TRUE", "true", "True"]
FALSE_SPELLINGS = ["0", "f", "F", "FALSE", "false", "False"]


def test_defaults() -> None:
    opts = o.parse_network_options({})
    assert opts == NetworkOptions()
    assert opts.bridge_name is None
    assert opts.enable_ip_masquerade is True
    assert opts.enable_icc is True
    assert opts.host_binding_ipv4 is None
    assert opts.mtu is None
    assert opts.container_iface_prefix == "eth"


def test_empty_values_mean_defaults() -> None:
    opts = o.parse_network_options(
        {
            o.BRIDGE_NAME: "",
            o.ENABLE_ICC: "",
            o.ENABLE_IP_MASQUERADE: "",
            o.HOST_BINDING_IPV4: "",
            o.MTU: "",
            o.CONTAINER_IFACE_PREFIX: "",
        }
    )
    assert opts == NetworkOptions()


def test_every_supported_key() -> None:
    opts = o.parse_network_options(
        {
            o.BRIDGE_NAME: "br-lab.10",
            o.ENABLE_IP_MASQUERADE: "false",
            o.ENABLE_ICC: "0",
            o.HOST_BINDING_IPV4: "127.0.0.1",
            o.MTU: "9000",
            o.CONTAINER_IFACE_PREFIX: "lan",
        }
    )
    assert opts == NetworkOptions(
        bridge_name="br-lab.10",
        enable_ip_masquerade=False,
        enable_icc=False,
        host_binding_ipv4=ipaddress.ip_address("127.0.0.1"),
        mtu=9000,
        container_iface_prefix="lan",
    )


@pytest.mark.parametrize(
    ("key", "value", "attr", "expected"),
    [
        (o.BRIDGE_NAME, "recbr", "bridge_name", "recbr"),
        (o.BRIDGE_NAME, "a" * 15, "bridge_name", "a" * 15),
        (o.BRIDGE_NAME, "_x", "bridge_name", "_x"),
        (o.ENABLE_IP_MASQUERADE, "false", "enable_ip_masquerade", False),
        (o.ENABLE_ICC, "false", "enable_icc", False),
        (o.HOST_BINDING_IPV4, "192.0.2.7", "host_binding_ipv4", ipaddress.ip_address("192.0.2.7")),
        (o.MTU, "1400", "mtu", 1400),
        (o.MTU, "68", "mtu", 68),
        (o.MTU, "65535", "mtu", 65535),
        (o.CONTAINER_IFACE_PREFIX, "net", "container_iface_prefix", "net"),
        (o.CONTAINER_IFACE_PREFIX, "a123456789", "container_iface_prefix", "a123456789"),
    ],
)
def test_each_supported_key(key: str, value: str, attr: str, expected: object) -> None:
    assert getattr(o.parse_network_options({key: value}), attr) == expected


def test_mtu_alias() -> None:
    assert o.parse_network_options({o.MTU_SHORT: "1400"}).mtu == 1400
    # both spellings, agreeing
    assert o.parse_network_options({o.MTU_SHORT: "1400", o.MTU: "1400"}).mtu == 1400


def test_mtu_alias_disagreeing() -> None:
    with pytest.raises(InvalidRequest) as info:
        o.parse_network_options({o.MTU_SHORT: "1400", o.MTU: "1500"})
    assert o.MTU in str(info.value)
    assert "mtu" in str(info.value)


def test_corpus_generic_options_are_accepted() -> None:
    for name in ("dockerd-20.10.24.jsonl", "dockerd-26.1.5.jsonl"):
        for line in (CORPUS_DIR / name).read_text().splitlines():
            record = json.loads(line)
            if record.get("path") == "/NetworkDriver.CreateNetwork":
                req = parse_create_network(record["body"])
                opts = o.parse_network_options(req.generic_options)
                if req.generic_options:
                    assert opts.bridge_name == "recbr"
                    assert opts.mtu == 1400


@pytest.mark.parametrize("key", [o.ENABLE_IP_MASQUERADE, o.ENABLE_ICC])
@pytest.mark.parametrize("spelling", TRUE_SPELLINGS)
def test_parse_bool_true(key: str, spelling: str) -> None:
    opts = o.parse_network_options({key: spelling})
    assert getattr(opts, key.rsplit(".", 1)[1]) is True


@pytest.mark.parametrize("key", [o.ENABLE_IP_MASQUERADE, o.ENABLE_ICC])
@pytest.mark.parametrize("spelling", FALSE_SPELLINGS)
def test_parse_bool_false(key: str, spelling: str) -> None:
    opts = o.parse_network_options({key: spelling})
    assert getattr(opts, key.rsplit(".", 1)[1]) is False


@pytest.mark.parametrize("key", [o.ENABLE_IP_MASQUERADE, o.ENABLE_ICC])
@pytest.mark.parametrize("spelling", ["yes", "no", "on", "tRUE", "2", " true", "true ", "-1"])
def test_invalid_booleans(key: str, spelling: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        o.parse_network_options({key: spelling})
    assert key in str(info.value)
    assert "true or false" in str(info.value)


@pytest.mark.parametrize("key", [o.MTU, o.MTU_SHORT])
@pytest.mark.parametrize("value", ["abc", "0", "67", "65536", "-1500", "1400.5", "1e3"])
def test_invalid_mtu(key: str, value: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        o.parse_network_options({key: value})
    assert o.MTU in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    "name",
    [
        "a" * 16,
        "br 0",
        "br/0",
        "br:0",
        "-br",
        ".",
        "..",
        ".hidden",
        "br;reboot",
        "br$(id)",
        "bré",
        "br\t",
    ],
)
def test_invalid_bridge_names(name: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        o.parse_network_options({o.BRIDGE_NAME: name})
    assert o.BRIDGE_NAME in str(info.value)


@pytest.mark.parametrize("name", ["all", "default"])
def test_bridge_names_that_are_proc_sys_directories_are_refused(name: str) -> None:
    # A bridge named "all" would have pybridge set route_localnet on every interface.
    with pytest.raises(InvalidRequest) as info:
        o.parse_network_options({o.BRIDGE_NAME: name})
    assert str(info.value) == (
        f"{o.BRIDGE_NAME} {name!r} is not allowed: /proc/sys/net uses that name for the settings "
        "of every interface; choose another name"
    )


def test_bridge_name_with_trailing_newline_is_refused() -> None:
    # BUG (options.py _IFNAME_RE): `$` matches before a final "\n", so "br0\n" (and even a
    # 16-character "aaaaaaaaaaaaaaa\n") passes valid_interface_name and would be written into
    # iptables-restore input, where the newline splits a rule line in two.
    for name in ("br0\n", "a" * 15 + "\n"):
        assert not o.valid_interface_name(name)
        with pytest.raises(InvalidRequest, match=o.BRIDGE_NAME):
            o.parse_network_options({o.BRIDGE_NAME: name})


@pytest.mark.parametrize("prefix", ["1eth", "e-th", "eth0.", "abcdefghijk", "_eth", "e th"])
def test_invalid_prefix(prefix: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        o.parse_network_options({o.CONTAINER_IFACE_PREFIX: prefix})
    assert o.CONTAINER_IFACE_PREFIX in str(info.value)


def test_prefix_with_trailing_newline_is_refused() -> None:
    # BUG (options.py _PREFIX_RE): same `$` problem; "eth\n" would be sent to Docker as DstPrefix.
    with pytest.raises(InvalidRequest, match=o.CONTAINER_IFACE_PREFIX):
        o.parse_network_options({o.CONTAINER_IFACE_PREFIX: "eth\n"})


@pytest.mark.parametrize("value", ["localhost", "1.2.3", "256.0.0.1", "10.0.0.0/8"])
def test_invalid_host_binding(value: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        o.parse_network_options({o.HOST_BINDING_IPV4: value})
    assert o.HOST_BINDING_IPV4 in str(info.value)


def test_unknown_option() -> None:
    with pytest.raises(Unsupported) as info:
        o.parse_network_options({"com.docker.network.bridge.gateway_mode": "routed"})
    message = str(info.value)
    assert "option com.docker.network.bridge.gateway_mode;" in message
    for supported in o.SUPPORTED:
        assert supported in message


def test_unknown_options_are_all_listed_sorted() -> None:
    with pytest.raises(Unsupported) as info:
        o.parse_network_options({"zeta": "1", "alpha": "2", o.MTU: "1400"})
    message = str(info.value)
    assert "options alpha, zeta;" in message
    assert "supported options are " + ", ".join(o.SUPPORTED) in message


def test_unknown_options_win_over_invalid_values() -> None:
    # Unknown names are reported first, so the user learns about them even with other mistakes.
    with pytest.raises(Unsupported):
        o.parse_network_options({"x": "1", o.MTU: "nope"})


def test_valid_interface_name() -> None:
    assert o.valid_interface_name("docker0")
    assert o.valid_interface_name("br-0123456789ab")
    assert not o.valid_interface_name("")
    assert not o.valid_interface_name("a" * 16)


# Docker 28+ takes --ipv4/--ipv6 as `-o com.docker.network.enable_ipv4=...` too (or from
# daemon.json's default-network-opts) and leaves the option in what it passes on, next to the
# booleans it derived from it (moby v28.5.2 daemon/network.go:314-338).
@pytest.mark.parametrize(
    ("generic", "v4", "v6"),
    [
        ({o.ENABLE_IPV4: "false"}, False, True),
        ({o.ENABLE_IPV6: "true"}, True, True),
        ({o.ENABLE_IPV4: "0", o.ENABLE_IPV6: "1"}, False, True),
        ({o.ENABLE_IPV6: ""}, True, False),
    ],
)
def test_dockers_own_ip_family_options_are_accepted(
    generic: dict[str, str], v4: bool, v6: bool
) -> None:
    assert o.parse_network_options(generic, enable_ipv4=v4, enable_ipv6=v6) == NetworkOptions()


def test_ip_family_options_an_older_daemon_did_not_apply_are_refused() -> None:
    # dockerd 20.10 and 26.1 pass `-o com.docker.network.enable_ipv6=true` on but create the
    # network without IPv6: say so rather than give a network without what was asked.
    with pytest.raises(InvalidRequest) as info:
        o.parse_network_options({o.ENABLE_IPV6: "true"}, enable_ipv4=True, enable_ipv6=False)
    assert str(info.value) == (
        "option com.docker.network.enable_ipv6=true was not applied by this Docker daemon "
        "(dockerd 28 and later apply it); use --ipv6=true"
    )
    with pytest.raises(InvalidRequest, match="must be true or false"):
        o.parse_network_options({o.ENABLE_IPV4: "maybe"})


# -- Docker 28's options ----------------------------------------------------------------------


def test_every_key_of_dockers_bridge_driver_is_accepted() -> None:
    """Each key some Docker version's bridge driver reads (moby v28.5.2
    libnetwork/drivers/bridge/labels.go, netlabel/labels.go) is accepted with a valid value;
    before, pybridge refused the Docker 28 ones by name."""
    opts = o.parse_network_options(
        {
            o.GATEWAY_MODE_IPV4: "nat-unprotected",
            o.GATEWAY_MODE_IPV6: "routed",
            o.INHIBIT_IPV4: "true",
            o.TRUSTED_HOST_INTERFACES: "eth1:flannel.1",
            o.HOST_IPV4: "192.0.2.5",
            o.HOST_IPV6: "2001:db8::5",
            o.DEFAULT_BRIDGE: "false",
            o.ADVERTISE_ADDR_NMSGS: "2",
            o.ADVERTISE_ADDR_MS: "500",
            o.HOST_BINDING_IPV4: "2001:db8::7",
        },
        enable_ipv6=True,
    )
    assert opts == NetworkOptions(
        gateway_mode_v4="nat-unprotected",
        gateway_mode_v6="routed",
        inhibit_ipv4=True,
        trusted_host_interfaces=("eth1", "flannel.1"),
        host_ipv4=ipaddress.IPv4Address("192.0.2.5"),
        host_ipv6=ipaddress.IPv6Address("2001:db8::5"),
        host_binding_ipv4=ipaddress.ip_address("2001:db8::7"),
    )
    assert NetworkOptions.from_dict(opts.to_dict()) == opts
    assert opts.gateway_mode(4) == "nat-unprotected"
    assert opts.gateway_mode(6) == "routed"
    assert opts.host_address(6) == ipaddress.IPv6Address("2001:db8::5")


def test_records_of_an_older_pybridge_have_the_defaults() -> None:
    old = NetworkOptions().to_dict()
    for key in ("gateway_mode_v4", "gateway_mode_v6", "inhibit_ipv4", "host_ipv4"):
        del old[key]
    assert NetworkOptions.from_dict(old) == NetworkOptions()


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", ["nat", "nat-unprotected", "routed"])
def test_gateway_modes(family: int, mode: str) -> None:
    opts = o.parse_network_options({o.GATEWAY_MODE_KEYS[family]: mode})  # type: ignore[index]
    assert opts.gateway_mode(family) == mode  # type: ignore[arg-type]
    assert opts.gateway_mode(10 - family) == "nat"  # type: ignore[arg-type]


@pytest.mark.parametrize("key", [o.GATEWAY_MODE_IPV4, o.GATEWAY_MODE_IPV6])
def test_isolated_only_on_internal_networks(key: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        o.parse_network_options({key: "isolated"})
    assert str(info.value) == (
        f"{key}=isolated can only be used for an internal network; add --internal"
    )
    opts = o.parse_network_options({key: "isolated"}, internal=True)
    assert "isolated" in (opts.gateway_mode_v4, opts.gateway_mode_v6)


@pytest.mark.parametrize("value", ["NAT", "bridge", "nat ", "routed,nat", "unprotected"])
def test_unknown_gateway_modes(value: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        o.parse_network_options({o.GATEWAY_MODE_IPV4: value})
    assert str(info.value) == (
        f"{o.GATEWAY_MODE_IPV4} {value!r} is not valid; use nat, nat-unprotected, routed or "
        "isolated"
    )


def test_gateway_skips() -> None:
    """GwAllocCheck's answer, as Docker's own bridge driver gives it (GetSkipGwAlloc)."""

    def skips(generic: dict[str, str], internal: bool) -> tuple[bool, bool]:
        options = o.parse_network_options(generic, internal=internal)
        return o.gateway_skips(options, internal=internal)

    assert skips({}, False) == (False, False)
    assert skips({}, True) == (False, False)
    assert skips({o.GATEWAY_MODE_IPV4: "isolated"}, True) == (True, False)
    assert skips({o.GATEWAY_MODE_IPV6: "isolated"}, True) == (False, True)
    assert skips({o.GATEWAY_MODE_IPV4: "routed"}, False) == (False, False)
    assert skips({o.INHIBIT_IPV4: "true"}, False) == (False, False)
    assert skips({o.INHIBIT_IPV4: "true"}, True) == (True, False)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("eth1", ("eth1",)),
        ("eth1:eth2", ("eth1", "eth2")),
        (":eth1::eth2:", ("eth1", "eth2")),
        ("eth1:eth1", ("eth1",)),
        (":", ()),
    ],
)
def test_trusted_host_interfaces(raw: str, expected: tuple[str, ...]) -> None:
    opts = o.parse_network_options({o.TRUSTED_HOST_INTERFACES: raw})
    assert opts.trusted_host_interfaces == expected


@pytest.mark.parametrize("name", ["eth+", "a" * 16, "eth 1", "eth1\n", "eth/1", "*"])
def test_invalid_trusted_host_interfaces(name: str) -> None:
    # "eth+" would be an iptables wildcard: every interface whose name starts with eth.
    with pytest.raises(InvalidRequest) as info:
        o.parse_network_options({o.TRUSTED_HOST_INTERFACES: f"eth0:{name}"})
    assert str(info.value).startswith(f"{o.TRUSTED_HOST_INTERFACES}: {name!r} is not a valid")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (o.HOST_IPV4, "2001:db8::1", "is not an IPv4 address"),
        (o.HOST_IPV4, "nope", "is not an IPv4 address"),
        (o.HOST_IPV4, "192.0.2.0/24", "is not an IPv4 address"),
        (o.HOST_IPV4, "0.0.0.0", "is not valid; give the address to use as source"),
        (o.HOST_IPV6, "192.0.2.1", "is not an IPv6 address"),
        (o.HOST_IPV6, "::ffff:192.0.2.1", "is not an IPv6 address"),
        (o.HOST_IPV6, "fe80::1%eth0", "is not an IPv6 address"),
        (o.HOST_IPV6, "::", "is not valid; give the address to use as source"),
        (o.HOST_BINDING_IPV4, "fe80::1%eth0", "is not an IP address"),
    ],
)
def test_invalid_addresses(key: str, value: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        o.parse_network_options({key: value})
    assert str(info.value).startswith(f"{key} {value!r} ")
    assert message in str(info.value)


def test_ipv4_mapped_addresses_are_their_ipv4_address() -> None:
    opts = o.parse_network_options(
        {o.HOST_IPV4: "::ffff:192.0.2.5", o.HOST_BINDING_IPV4: "::ffff:127.0.0.1"}
    )
    assert opts.host_ipv4 == ipaddress.IPv4Address("192.0.2.5")
    assert opts.host_binding_ipv4 == ipaddress.IPv4Address("127.0.0.1")


@pytest.mark.parametrize(
    ("key", "value", "limits"),
    [
        (o.ADVERTISE_ADDR_NMSGS, "4", "from 0 to 3"),
        (o.ADVERTISE_ADDR_NMSGS, "-1", "from 0 to 3"),
        (o.ADVERTISE_ADDR_NMSGS, "two", "from 0 to 3"),
        (o.ADVERTISE_ADDR_MS, "99", "from 100 to 2000 milliseconds"),
        (o.ADVERTISE_ADDR_MS, "2001", "from 100 to 2000 milliseconds"),
        (o.ADVERTISE_ADDR_MS, "1s", "from 100 to 2000 milliseconds"),
    ],
)
def test_advertise_addr_values_are_checked_as_docker_does(
    key: str, value: str, limits: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        o.parse_network_options({key: value})
    assert str(info.value) == f"{key} {value!r} is not valid; it must be a whole number {limits}"
    assert o.parse_network_options({key: "3" if "nmsgs" in key else "2000"}) == NetworkOptions()


@pytest.mark.parametrize("key", [o.INHIBIT_IPV4, o.DEFAULT_BRIDGE])
def test_more_booleans(key: str) -> None:
    with pytest.raises(InvalidRequest, match="must be true or false"):
        o.parse_network_options({key: "yes"})


def test_default_bridge_is_dockers_alone() -> None:
    with pytest.raises(InvalidRequest) as info:
        o.parse_network_options({o.DEFAULT_BRIDGE: "true"})
    assert "cannot be that network" in str(info.value)


def test_endpoint_options() -> None:
    o.check_endpoint_options({})
    o.check_endpoint_options({o.ENDPOINT_SYSCTLS: "net.ipv4.conf.IFNAME.log_martians=1"})
    o.check_endpoint_options({"com.example.anything": "x"})  # as Docker's bridge: ignored
    with pytest.raises(InvalidRequest) as info:
        o.check_endpoint_options({o.ENDPOINT_IFNAME: "lan7"})
    assert str(info.value) == (
        f"driver option {o.ENDPOINT_IFNAME}=lan7 cannot be honoured by a network plugin: "
        "Docker does not pass the interface name on to it; leave it out (the network's "
        f"{o.CONTAINER_IFACE_PREFIX} sets the name's prefix)"
    )


@pytest.mark.parametrize("name", ["docker0", "docker_gwbridge", "br-lan", "br-0123456789ab"])
def test_trusted_interfaces_named_like_dockers_bridges_are_refused(name: str) -> None:
    """pybridge hands traffic from such interfaces to Docker's rules: trusting one would do
    nothing, so it says so instead."""
    with pytest.raises(InvalidRequest, match="named like one of Docker's container bridges"):
        o.parse_network_options(
            {"com.docker.network.bridge.trusted_host_interfaces": f"eth1:{name}"}
        )
