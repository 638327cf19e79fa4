"""HTTP glue: one route per protocol verb, every route the same shape (decode, call, encode),
and one place that turns errors into ``{"Err": ...}``. The app never knows its socket."""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from . import protocol as p
from .driver import NetworkDriver
from .errors import DriverError
from .ipamdriver import IpamDriver
from .metrics import Metrics
from .peers import Peer, peer_credentials

log = logging.getLogger("pydriver.requests")


@dataclass(frozen=True)
class Reply:
    """A reply with work to do once it has been written to Docker's connection."""

    body: dict[str, Any]
    on_sent: Callable[[], Awaitable[None]]


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | Reply]]


# How a log line names what a request is about (protocol.request_ids): label, characters kept.
_ID_LABELS = {
    "network": ("net", 12),
    "endpoint": ("ep", 12),
    "pool": ("pool", 12),
    "address": ("addr", 45),
}


def _ids_text(ids: Mapping[str, str]) -> str:
    return " ".join(
        f"{label}={ids[name][:keep]}" for name, (label, keep) in _ID_LABELS.items() if name in ids
    )


class Callers:
    """Who calls pybridge: normally one dockerd. The peer credentials of each connection
    (SO_PEERCRED), read once per connection; a few callers are kept, the least recently seen
    go first. `pydriver prune` asks (Pybridge.Status) to check that the daemon it asks which
    networks exist is the one using this pybridge."""

    LIMIT = 16

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._seen: dict[tuple[int, int], p.Caller] = {}
        # Per connection: its peer (None: could not be read). Keyed weakly by the transport,
        # so a closed connection is forgotten with it.
        self._peers: weakref.WeakKeyDictionary[object, Peer | None] = weakref.WeakKeyDictionary()

    def saw(self, transport: Any) -> None:
        """Count one request arriving on ``transport`` (an asyncio transport, or None)."""
        if transport is None:
            return
        if transport in self._peers:
            peer = self._peers[transport]
        else:
            sock = transport.get_extra_info("socket")
            try:
                peer = peer_credentials(sock) if sock is not None else None
            except OSError:  # not a Unix socket (a test's TCP site): nobody to record
                peer = None
            self._peers[transport] = peer
        if peer is None:
            return
        now = self._clock()
        key = (peer.pid, peer.uid)
        known = self._seen.pop(key, None)  # re-inserted last: the dict stays in seen order
        if known is None:
            known = p.Caller(peer.pid, peer.uid, now, now, 0)
        self._seen[key] = replace(known, last_seen=now, requests=known.requests + 1)
        while len(self._seen) > self.LIMIT:
            del self._seen[next(iter(self._seen))]

    def callers(self) -> tuple[p.Caller, ...]:
        return tuple(self._seen.values())


class Api:
    """Maps every route to the driver call behind it."""

    def __init__(
        self,
        driver: NetworkDriver,
        ipam: IpamDriver,
        callers: Callers | None = None,
        state_path: Path | None = None,
    ) -> None:
        self.driver = driver
        self.ipam = ipam
        self.callers = callers or Callers()
        # The state database, named in Pybridge.Status so `pydriver prune` can tell it reads
        # the state this pybridge serves from (None: not said).
        self.state_path = state_path
        self.started = time.time()
        self.routes: dict[str, Handler] = {
            "/Plugin.Activate": self.activate,
            "/NetworkDriver.GetCapabilities": self.net_capabilities,
            "/NetworkDriver.GwAllocCheck": self.gw_alloc_check,
            "/NetworkDriver.CreateNetwork": self.create_network,
            "/NetworkDriver.DeleteNetwork": self.delete_network,
            "/NetworkDriver.AllocateNetwork": self.allocate_network,
            "/NetworkDriver.FreeNetwork": self.empty,
            "/NetworkDriver.CreateEndpoint": self.create_endpoint,
            "/NetworkDriver.EndpointOperInfo": self.endpoint_oper_info,
            "/NetworkDriver.DeleteEndpoint": self.delete_endpoint,
            "/NetworkDriver.Join": self.join,
            "/NetworkDriver.Leave": self.leave,
            "/NetworkDriver.DiscoverNew": self.empty,
            "/NetworkDriver.DiscoverDelete": self.empty,
            "/NetworkDriver.ProgramExternalConnectivity": self.program_external,
            "/NetworkDriver.RevokeExternalConnectivity": self.revoke_external,
            "/IpamDriver.GetCapabilities": self.ipam_capabilities,
            "/IpamDriver.GetDefaultAddressSpaces": self.address_spaces,
            "/IpamDriver.RequestPool": self.request_pool,
            "/IpamDriver.ReleasePool": self.release_pool,
            "/IpamDriver.RequestAddress": self.request_address,
            "/IpamDriver.ReleaseAddress": self.release_address,
            "/" + p.STATUS_METHOD: self.status,
        }

    async def status(self, body: dict[str, Any]) -> dict[str, Any]:
        state_file = None
        if self.state_path is not None:
            state = os.stat(self.state_path)  # one stat: no need to leave the loop
            state_file = (state.st_dev, state.st_ino)
        return p.status_reply(
            p.Status(os.getpid(), self.started, self.callers.callers(), state_file=state_file)
        )

    async def activate(self, body: dict[str, Any]) -> dict[str, Any]:
        return p.activate_reply()

    async def empty(self, body: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def net_capabilities(self, body: dict[str, Any]) -> dict[str, Any]:
        return p.network_capabilities_reply()

    async def gw_alloc_check(self, body: dict[str, Any]) -> dict[str, Any]:
        return p.gw_alloc_check_reply(*self.driver.gw_alloc_check(p.parse_gw_alloc_check(body)))

    async def allocate_network(self, body: dict[str, Any]) -> dict[str, Any]:
        raise DriverError("pybridge is a local-scope driver and cannot serve swarm networks")

    async def create_network(self, body: dict[str, Any]) -> dict[str, Any]:
        await self.driver.create_network(p.parse_create_network(body))
        return {}

    async def delete_network(self, body: dict[str, Any]) -> dict[str, Any]:
        await self.driver.delete_network(p.parse_network_ref(body))
        return {}

    async def create_endpoint(self, body: dict[str, Any]) -> dict[str, Any]:
        mac = await self.driver.create_endpoint(p.parse_create_endpoint(body))
        return p.create_endpoint_reply(mac)

    async def endpoint_oper_info(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            ref = p.parse_endpoint_ref(body)
        except DriverError:
            return p.oper_info_reply({})
        return p.oper_info_reply(self.driver.endpoint_oper_info(ref))

    async def delete_endpoint(self, body: dict[str, Any]) -> dict[str, Any]:
        await self.driver.delete_endpoint(p.parse_endpoint_ref(body))
        return {}

    async def join(self, body: dict[str, Any]) -> dict[str, Any]:
        result = await self.driver.join(p.parse_join(body))
        return p.join_reply(
            result.src_name,
            result.dst_prefix,
            result.gateway,
            result.gateway_v6,
            disable_gateway_service=result.internal,
        )

    async def leave(self, body: dict[str, Any]) -> dict[str, Any]:
        await self.driver.leave(p.parse_endpoint_ref(body))
        return {}

    async def program_external(self, body: dict[str, Any]) -> dict[str, Any]:
        await self.driver.program_external_connectivity(p.parse_program_external(body))
        return {}

    async def revoke_external(self, body: dict[str, Any]) -> dict[str, Any]:
        await self.driver.revoke_external_connectivity(p.parse_endpoint_ref(body))
        return {}

    async def ipam_capabilities(self, body: dict[str, Any]) -> dict[str, Any]:
        return p.ipam_capabilities_reply()

    async def address_spaces(self, body: dict[str, Any]) -> dict[str, Any]:
        return p.address_spaces_reply(*self.ipam.address_spaces())

    async def request_pool(self, body: dict[str, Any]) -> Reply:
        pool_id, subnet, ack = await self.ipam.request_pool(p.parse_request_pool(body))
        return Reply(p.request_pool_reply(pool_id, subnet), ack)

    async def release_pool(self, body: dict[str, Any]) -> dict[str, Any]:
        await self.ipam.release_pool(p.parse_release_pool(body))
        return {}

    async def request_address(self, body: dict[str, Any]) -> Reply:
        address, ack = await self.ipam.request_address(p.parse_request_address(body))
        return Reply(p.request_address_reply(address), ack)

    async def release_address(self, body: dict[str, Any]) -> dict[str, Any]:
        await self.ipam.release_address(p.parse_release_address(body))
        return {}


def _json_response(reply: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=p.encode_reply(reply), status=status, content_type=p.CONTENT_TYPE)


def make_app(api: Api, metrics: Metrics | None = None) -> web.Application:
    app = web.Application(client_max_size=p.MAX_BODY_BYTES)

    async def dispatch(request: web.Request) -> web.Response:
        started = time.perf_counter()
        method = request.path.lstrip("/")
        handler = api.routes.get(request.path)
        body: dict[str, Any] = {}
        outcome = "ok"
        kind = "ok"
        try:
            if handler is None:
                outcome = kind = "not-implemented"
                return _json_response(
                    p.error_reply(f"pybridge does not implement {method or 'this request'}"), 404
                )
            if request.method != "POST":
                outcome = kind = "bad-method"
                return _json_response(p.error_reply(f"{method} must be called with POST"), 405)
            if method != p.STATUS_METHOD and p.TOOL_HEADER not in request.headers:
                api.callers.saw(request.transport)
            raw = await request.read()
            body = p.decode_body(raw)
            reply = await handler(body)
            if isinstance(reply, Reply):
                response = _json_response(reply.body)
                await response.prepare(request)
                await response.write_eof()
                try:
                    await reply.on_sent()
                except Exception:  # the answer is out; a failed acknowledgment only logs
                    log.exception("could not record that %s was answered", method)
                return response
            return _json_response(reply)
        except DriverError as err:
            kind = err.kind
            outcome = f"error({err.kind}): {err}"
            return _json_response(p.error_reply(str(err)), 500)
        except web.HTTPRequestEntityTooLarge:
            kind = "invalid"
            outcome = "error(invalid): body too large"
            return _json_response(
                p.error_reply(f"request body is larger than the {p.MAX_BODY_BYTES} bytes allowed"),
                500,
            )
        except Exception as err:  # never a traceback to Docker, never a dead server
            log.exception("internal error in %s", method)
            kind = "internal"
            outcome = f"internal error: {type(err).__name__}"
            return _json_response(
                p.error_reply(
                    f"pybridge hit an internal error in {method} ({type(err).__name__}: {err}); "
                    "see the pybridge log"
                ),
                500,
            )
        finally:
            elapsed = time.perf_counter() - started
            ids = p.request_ids(body)
            log.info(
                "%s %s -> %s (%.1f ms)",
                method,
                _ids_text(ids),
                outcome,
                elapsed * 1000,
                extra={
                    "method": method,
                    "outcome": outcome,
                    "duration_ms": round(elapsed * 1000, 2),
                    **ids,
                },
            )
            if metrics is not None and handler is not None:
                metrics.observe_request(method, kind, elapsed)

    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


def make_metrics_app(
    metrics: Metrics, gauges: Callable[[], Mapping[str, float]]
) -> web.Application:
    """GET /metrics in the Prometheus text format."""
    app = web.Application()

    async def serve_metrics(request: web.Request) -> web.Response:
        return web.Response(
            text=metrics.render(gauges()), content_type="text/plain", charset="utf-8"
        )

    app.router.add_get("/metrics", serve_metrics)
    return app


def make_failure_app(reason: str) -> web.Application:
    """What pybridge serves when it could not start (a managed plugin: exiting would leave
    dockerd with a plugin that never answers, and a network driver that fails to enable at
    daemon start has made dockerd crash-loop): it registers as usual and answers every other
    call with the reason, which Docker shows to whoever runs the command."""
    app = web.Application(client_max_size=p.MAX_BODY_BYTES)
    registration: dict[str, dict[str, Any]] = {
        "/Plugin.Activate": p.activate_reply(),
        "/NetworkDriver.GetCapabilities": p.network_capabilities_reply(),
        "/IpamDriver.GetCapabilities": p.ipam_capabilities_reply(),
    }
    message = (
        f"pybridge could not start: {reason}; fix that, then restart pybridge "
        "(a managed plugin: docker plugin disable -f and enable)"
    )

    async def dispatch(request: web.Request) -> web.Response:
        method = request.path.lstrip("/")
        reply = registration.get(request.path)
        if reply is not None:
            return _json_response(reply)
        if request.path.startswith(("/NetworkDriver.", "/IpamDriver.")):
            log.error("%s -> refused: %s", method, message)
            return _json_response(p.error_reply(message), 500)
        return _json_response(
            p.error_reply(f"pybridge does not implement {method or 'this request'}"), 404
        )

    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app
