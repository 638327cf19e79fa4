"""Fixtures of the multi-host tests: an underlay, etcd and three Docker hosts on this machine
(tests/multihost/harness.py). PBMH_DOCKERD picks the daemons (comma-separated: 20.10, 28;
default both: Docker 28's own rules are part of what is tested); each version gets its own
cluster."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from tests.hostenv import require_root
from tests.multihost.harness import Cluster, DockerHost, daemon, leftovers

VERSIONS = [v.strip() for v in os.environ.get("PBMH_DOCKERD", "20.10,28").split(",") if v.strip()]


@pytest.fixture(scope="session", params=VERSIONS)
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    require_root()
    version = str(request.param)
    why_not = daemon(version).available()
    if why_not:  # a failure, never a skip: scripts/test.sh fetches every daemon first
        pytest.fail(
            f"{why_not}: run DOCKERD_VERSION={version} scripts/dockerd-service.sh fetch, or "
            "choose the daemons with PBMH_DOCKERD"
        )
    built = Cluster(3, version)
    try:
        built.up()
        print(f"\n[multihost] dockerd {version}: 3 hosts up in {built.timings['up']:.1f} s",
              file=sys.stderr)  # fmt: skip
        yield built
    finally:
        if request.session.testsfailed:
            _show_logs(built)
        built.down()
        print(f"[multihost] down in {built.timings['down']:.1f} s", file=sys.stderr)
        left = leftovers()
        assert not left, f"the multi-host harness left: {left}"


@pytest.fixture
def cluster_hosts(cluster: Cluster) -> list[DockerHost]:
    """The three hosts (dockerd up, test image loaded, no pybridge running)."""
    return cluster.hosts


def _show_logs(cluster: Cluster) -> None:
    """The ends of the hosts' logs, before down() deletes them with the hosts."""
    for host in cluster.hosts:
        for which in ("dockerd", "pydriver"):
            text = host.log(which, tail=4000)
            if text:
                print(f"\n[multihost] --- {host.name} {which}.log (end)\n{text}", file=sys.stderr)
    print(f"\n[multihost] --- etcd (end)\n{cluster.etcd.log()[-2000:]}", file=sys.stderr)
