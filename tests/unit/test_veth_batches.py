"""How the netlink adapter reads the kernel's answers to its veth batches (netlink.py): which
batches go out, in what order, and what each error code becomes. The kernel side is replaced
by scripted answers; the privileged tests send the same batches to a real kernel."""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence

import pytest

from pydriver.errors import BridgeFull, HostError
from pydriver.netlink import Request, _NetlinkCore, _RouteSocket

RTM_NEWLINK, NLMSG_ERROR = 16, 2
INDEXES = {"pyb-net": 3, "pys0123456789ab": 7, "pyt0123456789ab": 8}


class ScriptedRoute:
    """Stands in for _RouteSocket: records each batch, answers with the next codes."""

    def __init__(self, *answers: list[int] | OSError) -> None:
        self.answers = list(answers)
        self.batches: list[Sequence[Request]] = []
        self.closed = False

    def requests(self, requests: Sequence[Request]) -> list[int]:
        self.batches.append(requests)
        answer = self.answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        assert len(answer) == len(requests)
        return answer

    def close(self) -> None:
        self.closed = True


def core_with(route: ScriptedRoute, indexes: dict[str, int] | None = None) -> _NetlinkCore:
    core = _NetlinkCore(None)
    core._route = route  # type: ignore[assignment]
    known = INDEXES if indexes is None else indexes

    async def index(name: str) -> int | None:
        return known.get(name)

    core.index = index  # type: ignore[method-assign]
    return core


def host_index_of(batch: Sequence[Request]) -> int:
    return int(struct.unpack_from("=i", batch[0][2], 4)[0])


async def attach(core: _NetlinkCore, hairpin: bool = True) -> bool:
    return await core.attach_veth(
        "pys0123456789ab", "pyt0123456789ab", "02:11:22:33:44:55", None, "pyb-net", hairpin=hairpin
    )


async def test_a_spare_is_attached_in_two_sends_its_peer_first() -> None:
    route = ScriptedRoute([0], [0, 0])
    assert await attach(core_with(route))
    peer, host = route.batches
    assert [host_index_of(peer), len(peer)] == [8, 1]
    assert [host_index_of(host), len(host)] == [7, 2]  # on the bridge, then hairpin


async def test_a_refused_peer_leaves_the_host_end_off_the_bridge() -> None:
    route = ScriptedRoute([errno.EADDRNOTAVAIL])
    with pytest.raises(HostError, match="pys0123456789ab/pyt0123456789ab: Cannot assign"):
        await attach(core_with(route))
    assert len(route.batches) == 1  # nothing was sent for the host end


async def test_a_spare_that_is_gone_is_reported_not_made() -> None:
    route = ScriptedRoute([errno.ENODEV])
    assert not await attach(core_with(route))
    assert len(route.batches) == 1
    gone = ScriptedRoute()
    assert not await attach(core_with(gone, {"pyb-net": 3, "pys0123456789ab": 7}))
    assert gone.batches == []
    host_gone = ScriptedRoute([0], [errno.ENODEV, errno.ENODEV])
    assert not await attach(core_with(host_gone))


async def test_a_full_bridge_and_a_refused_hairpin_are_told_apart() -> None:
    with pytest.raises(BridgeFull, match="bridge pyb-net has no free port"):
        await attach(core_with(ScriptedRoute([0], [errno.EXFULL, errno.EOPNOTSUPP])))
    with pytest.raises(HostError, match="hairpin mode on pys0123456789ab"):
        await attach(core_with(ScriptedRoute([0], [0, errno.EOPNOTSUPP])))
    # An internal network's pair has no hairpin request and no hairpin answer to read.
    internal = ScriptedRoute([0], [0])
    assert await attach(core_with(internal), hairpin=False)
    assert len(internal.batches[1]) == 1


async def test_a_new_pair_needs_its_bridge_before_anything_is_made() -> None:
    route = ScriptedRoute()
    with pytest.raises(HostError, match="bridge pyb-gone does not exist"):
        await core_with(route).ensure_veth(
            "pyv0123456789ab", "pyc0123456789ab", "02:11:22:33:44:55", None, "pyb-gone"
        )
    assert route.batches == []


async def test_a_new_pair_whose_name_is_taken_is_not_attached() -> None:
    route = ScriptedRoute([errno.EEXIST, 0, 0])
    made = await core_with(route).ensure_veth(
        "pyv0123456789ab", "pyc0123456789ab", "02:11:22:33:44:55", None, "pyb-net"
    )
    assert not made
    assert len(route.batches) == 1  # the creation only


async def test_a_new_pair_for_a_full_bridge_is_deleted_to_be_made_again_later() -> None:
    route = ScriptedRoute([0, 0, 0], [errno.EXFULL])
    core = core_with(route, {**INDEXES, "pyv0123456789ab": 9})
    core.exists = lambda name: _false()  # type: ignore[method-assign]
    deleted: list[str] = []

    async def delete_link(name: str) -> bool:
        deleted.append(name)
        return True

    core.delete_link = delete_link  # type: ignore[method-assign]
    with pytest.raises(BridgeFull):
        await core.ensure_veth(
            "pyv0123456789ab", "pyc0123456789ab", "02:11:22:33:44:55", None, "pyb-net"
        )
    assert deleted == ["pyv0123456789ab"]


async def _false() -> bool:
    return False


async def test_a_failed_send_is_a_host_error_and_the_next_batch_gets_a_new_socket() -> None:
    route = ScriptedRoute(OSError(errno.ENOBUFS, "No buffer space available"))
    core = core_with(route)
    with pytest.raises(HostError, match="No buffer space available"):
        await attach(core)
    assert route.closed
    assert core._route is None


class FakeSocket:
    def __init__(self, *datagrams: bytes) -> None:
        self.datagrams = list(datagrams)
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.datagrams.pop(0)


def answer(kind: int, sequence: int, code: int = 0, extra: bytes = b"") -> bytes:
    body = struct.pack("=i", -code) + extra if kind == NLMSG_ERROR else extra
    return struct.pack("=IHHII", 16 + len(body), kind, 0, sequence, 0) + body


def test_answers_are_matched_by_sequence_and_late_ones_ignored() -> None:
    route = object.__new__(_RouteSocket)
    route._sequence = 4  # batches 1-4 went before; the last one timed out
    route._sock = FakeSocket(  # type: ignore[assignment]
        answer(NLMSG_ERROR, 4, errno.EBUSY)  # that batch's late answer
        + answer(RTM_NEWLINK, 5, extra=b"\0" * 16)  # not an acknowledgement
        + answer(NLMSG_ERROR, 6, errno.EXFULL),
        answer(NLMSG_ERROR, 5),
    )
    requests: list[Request] = [(RTM_NEWLINK, 0, b"\0" * 16), (RTM_NEWLINK, 0, b"\0" * 16)]
    assert route.requests(requests) == [0, errno.EXFULL]
    sent = route._sock.sent[0]  # type: ignore[attr-defined]
    assert [struct.unpack_from("=IHHII", sent, n * 32)[3] for n in range(2)] == [5, 6]


def test_a_truncated_answer_is_an_error_not_a_crash() -> None:
    route = object.__new__(_RouteSocket)
    route._sequence = 0
    route._sock = FakeSocket(answer(NLMSG_ERROR, 1)[:18])  # type: ignore[assignment]
    with pytest.raises(OSError, match="malformed"):
        route.requests([(RTM_NEWLINK, 0, b"\0" * 16)])
