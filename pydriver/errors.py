"""Error kinds. Every message is one plain sentence that Docker shows to the user verbatim."""

from __future__ import annotations


class DriverError(Exception):
    """A request could not be served; ``str(err)`` is the sentence the user sees."""

    kind = "error"


class InvalidRequest(DriverError):
    """The request is malformed or asks for something that is not allowed."""

    kind = "invalid"


class NotFound(DriverError):
    """The request names a network, endpoint, pool or address pybridge does not know."""

    kind = "not-found"


class Conflict(DriverError):
    """The request clashes with something that already exists."""

    kind = "conflict"


class PortInUse(Conflict):
    """A host port pybridge was asked to publish is held by something else."""


class Exhausted(DriverError):
    """A pool has no free addresses (or no free subnet is left)."""

    kind = "exhausted"


class Unsupported(DriverError):
    """A feature or option pybridge does not implement."""

    kind = "unsupported"


class HostError(DriverError):
    """The kernel or the firewall refused an operation."""

    kind = "host"


class BridgeFull(HostError):
    """The bridge has no free port: Linux bridges hold at most 1023 interfaces."""
