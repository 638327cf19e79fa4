"""The crash test's list of points is read from pydriver's source (tests/crashpoints.py)."""

from __future__ import annotations

import textwrap

import pytest

from tests.crashpoints import Unfollowable, crash_points, points_in


def test_the_package_has_its_points_each_once_in_order() -> None:
    points = crash_points()
    assert points == sorted(set(points))
    # Named by hand in tests/privileged (test_crash.py, test_serve.py): they must exist.
    assert {"ipam.address.sent", "ipam.address.recorded", "network.create.bridge"} <= set(points)
    # Every operation that persists before acting has its points.
    prefixes = {p.rsplit(".", 1)[0] for p in points}
    assert {"network.create", "network.delete", "endpoint.create", "ipam.pool"} <= prefixes


def test_every_way_the_package_calls_a_point_is_read() -> None:
    source = textwrap.dedent(
        """
        import functools
        import pydriver.faults
        from . import faults
        from . import faults as f
        from .faults import point
        from pydriver.faults import point as crash_here

        async def work(ok):
            await faults.point("a.direct")
            await f.point("b.alias")
            await point("c.imported")
            await crash_here("d.renamed")
            await pydriver.faults.point("e.dotted")
            await faults.point("f.yes" if ok else "f.no")
            step = functools.partial(faults.point, "g.partial")
            await step()
            await other.point("not.ours")
        """
    )
    assert points_in(source, "pydriver.driver") == {
        "a.direct",
        "b.alias",
        "c.imported",
        "d.renamed",
        "e.dotted",
        "f.yes",
        "f.no",
        "g.partial",
    }


def test_a_relative_import_from_a_subpackage_is_resolved() -> None:
    source = "from .. import faults\nasync def go():\n    await faults.point('x.sub')\n"
    assert points_in(source, "pydriver.cluster.gossip") == {"x.sub"}
    # The same import in pydriver/ itself would name pydriver's parent, not pydriver.faults.
    assert points_in(source, "pydriver.driver") == set()


@pytest.mark.parametrize(
    "body",
    [
        "await faults.point(name)",
        "await faults.point(f'network.{verb}')",
        "await faults.point()",
        "step = faults.point",
        "await functools.partial(faults.point, name)()",
    ],
)
def test_a_name_that_is_not_written_out_is_refused(body: str) -> None:
    source = f"from pydriver import faults\nasync def go(name, verb):\n    {body}\n"
    with pytest.raises(Unfollowable, match=r"^x\.py:3: "):
        points_in(source, "pydriver.x", "x.py")
