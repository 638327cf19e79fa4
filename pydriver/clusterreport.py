"""What `pydriver status` and `doctor` say about the cluster (a tool: reads the state database,
the cluster store and the kernel's tunnels, changes nothing).

From the record a running pybridge keeps (clusterhost.META_KEY): where the cluster is, this
host's id and tunnel address, each segment's definition and the blocks this host holds. From
the cluster store (one bounded read): the members and their containers; from the kernel: each
tunnel's entries, compared with what the store says they must be."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .clusterhost import META_KEY, segment_of
from .clustermodel import PREFIX, host_key, parse_cluster
from .clusterview import ClusterView
from .errors import Conflict, DriverError
from .interfaces import ClusterStore
from .model import Network
from .naming import short, vxlan_name
from .store import read_meta
from .tunnel import Step, TunnelEntries, plan, wanted


@dataclass(frozen=True)
class SegmentReport:
    name: str
    network: str  # this host's network id of the segment
    vni: int
    port: int
    mtu: int
    subnets: tuple[str, ...]
    blocks: tuple[str, ...]  # held by this host
    members: dict[str, str]  # host id -> tunnel address (from the store)
    device: bool  # the tunnel device exists
    disagreements: tuple[str, ...]  # steps that would make the tunnel match the store


@dataclass(frozen=True)
class ClusterReport:
    cluster: str
    host: str
    vtep: str
    store_error: str | None  # why the store could not be read (then nothing is compared)
    hosts: dict[str, str] = field(default_factory=dict)  # every live host -> its address
    segments: tuple[SegmentReport, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "host": self.host,
            "vtep": self.vtep,
            "store_error": self.store_error,
            "hosts": self.hosts,
            "segments": [s.__dict__ for s in self.segments],
        }


def describe(step: Step) -> str:
    """One disagreement, as the kernel entry that is missing, wrong or stale."""
    return {
        "flood-add": f"no flood entry for member {step.vtep}",
        "flood-remove": f"flood entry for {step.vtep}, which is no member",
        "fdb-replace": f"{step.mac} not (or wrongly) forwarded to {step.vtep}",
        "fdb-remove": f"stale forwarding entry {step.mac} -> {step.vtep}",
        "neigh-replace": f"no neighbour entry {step.address} -> {step.mac}",
        "neigh-remove": f"stale neighbour entry {step.address}",
    }[step.action]


def compare(
    record: dict[str, Any],
    networks: Sequence[Network],
    view: ClusterView | None,
    entries: dict[str, TunnelEntries | None],
    store_error: str | None,
) -> ClusterReport:
    """The report (pure): ``entries`` by device name (None: the device does not exist)."""
    vtep = ipaddress.ip_address(record.get("vtep", "0.0.0.0"))  # noqa: S104 (not a bind)
    segments = []
    for network in networks:
        name = segment_of(network)
        if name is None:
            continue
        definition = json.loads(record.get("segments", {}).get(name, "{}"))
        device = vxlan_name(network.id)
        have = entries.get(device)
        members: dict[str, str] = {}
        found: list[str] = []
        if view is not None:
            seg = view.segment(name)
            members = {h: str(a) for h, a in sorted(seg.members.items())}
            want = wanted(seg.members.values(), seg.remote_endpoints(), vtep)
            steps = plan(want, have or TunnelEntries(frozenset(), {}, {}))
            found = [describe(s) for s in steps]
        segments.append(
            SegmentReport(
                name=name,
                network=network.id,
                vni=int(definition.get("vni", 0)),
                port=int(definition.get("vxlan_port", record.get("vxlan_port", 0))),
                mtu=int(definition.get("mtu", 0)),
                subnets=tuple(definition.get("subnets", ())),
                blocks=tuple(record.get("blocks", {}).get(name, ())),
                members=members,
                device=have is not None,
                disagreements=tuple(found),
            )
        )
    return ClusterReport(
        cluster=str(record.get("cluster", "")),
        host=str(record.get("host", "")),
        vtep=str(vtep),
        store_error=store_error,
        hosts={h: str(a) for h, a in sorted(view.hosts.items())} if view else {},
        segments=tuple(segments),
    )


def format_cluster(report: ClusterReport) -> list[str]:
    lines = [
        f"Cluster {report.cluster}: this host {report.host}, tunnels from {report.vtep}",
    ]
    if report.store_error:
        lines.append(f"  the cluster store could not be read: {report.store_error}")
    else:
        lines.append(
            f"  {len(report.hosts)} host(s) up: "
            + ", ".join(f"{h} ({a})" for h, a in report.hosts.items())
        )
    for seg in report.segments:
        lines.append(
            f"  segment {seg.name}: network {short(seg.network)}, VNI {seg.vni}, UDP port "
            f"{seg.port}, MTU {seg.mtu}, subnets {', '.join(seg.subnets) or '-'}"
        )
        lines.append(f"    blocks held here: {', '.join(seg.blocks) or 'none'}")
        if not seg.device:
            lines.append(f"    PROBLEM: the tunnel device {vxlan_name(seg.network)} is missing")
        if not report.store_error:
            lines.append(
                "    members: " + (", ".join(f"{h} ({a})" for h, a in seg.members.items()) or "-")
            )
            if seg.disagreements:
                lines.append(f"    PROBLEM: {len(seg.disagreements)} tunnel entries disagree:")
                lines += [f"      {d}" for d in seg.disagreements]
            else:
                lines.append("    tunnel entries: as the cluster store says")
    return lines


def read_record(state_dir: Path) -> dict[str, Any] | None:
    raw = read_meta(state_dir, META_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("cluster") else None


async def gather_cluster(state_dir: Path, networks: Sequence[Network]) -> ClusterReport | None:
    """The report for the pybridge whose state is in ``state_dir`` (None: not in a cluster)."""
    record = read_record(state_dir)
    if record is None:
        return None
    view: ClusterView | None = None
    error: str | None = None
    try:
        from .etcdstore import EtcdStore  # gRPC only when there is a cluster to ask

        store = EtcdStore(parse_cluster(str(record["cluster"])))
        try:
            revision, found = await store.read_prefix(PREFIX)
        finally:
            await store.close()
        view = ClusterView.read(revision, ((e.key, e.value) for e in found))
    except ImportError:
        error = "the etcd client is not installed (pip install 'pydriver[cluster]')"
    except DriverError as err:
        error = str(err)
    from .netlink import Netlink

    netlink = Netlink()
    await netlink.open()
    entries: dict[str, TunnelEntries | None] = {}
    try:
        for network in networks:
            if segment_of(network) is None:
                continue
            device = vxlan_name(network.id)
            entries[device] = (
                await netlink.tunnel_entries(device) if await netlink.exists(device) else None
            )
    finally:
        await netlink.close()
    return compare(record, networks, view, entries, error)


async def forget_host(store: ClusterStore, host: str) -> list[str]:
    """Free what a host that is gone for good still holds in the cluster: its address blocks
    (never freed by themselves: its containers might come back on them), and any member or
    container record left. Refused while the host is up (its lease keeps hosts/HOST). The
    keys removed."""
    if await store.get(host_key(host)) is not None:
        raise Conflict(
            f"host {host} is up (it holds a lease in the cluster): stop its pybridge, wait for "
            "its lease to end (10 s), and try again"
        )
    _, entries = await store.read_prefix(PREFIX)
    removed = []
    for entry in entries:
        kind = entry.key[len(PREFIX) :].split("/")[0]
        try:
            record = json.loads(entry.value)
        except ValueError:
            continue
        owner = record.get("host") if isinstance(record, dict) else None
        is_member = kind == "members" and entry.key.rsplit("/", 1)[-1] == host
        ours = (kind in ("blocks", "endpoints") and owner == host) or is_member
        # Only while it still says so: never a block another host claimed meanwhile.
        if ours and await store.delete_if(entry.key, entry.value):
            removed.append(entry.key)
    return removed
