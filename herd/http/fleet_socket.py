"""The router's end of a node's WebSocket (``/fleet/ws``).

One session per connected node, three tasks in the session's nursery:
- receive: heartbeats in (validated through the cattrs converter; a bad message gets an
  ``error`` reply naming the problem and the session goes on);
- send: everything out — the ack, errors, commands other parts of the router queue for this
  node (``RouterState.command``) — through one bounded channel, so only one task writes;
- drain watch: when the node is draining and nothing of its is pending or in flight, tell it
  ``drained`` so it can exit.
A closed socket marks the node offline at once (unless it has already reconnected). The router
logs a node's backend going down and coming back (as its heartbeats say), one line each. Joins,
leaves and drains go to the event log (:mod:`herd.state.events`, the dashboard's timeline).

Who may connect: with a fleet token, the handshake must carry it or it is refused with HTTP 401
before the socket is accepted. Whoever connects, one node id has one live session: a socket
whose first heartbeat claims the id of a node that is connected and not offline is closed
(1008, naming the id) and the first session goes on serving; a node that left, or went silent
past ``heartbeat_offline``, rejoins at once (its stale session, if still open, is ended).
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

import trio
from quart import Response, websocket

from herd.config import RouterConfig
from herd.core.models import NodeReport, NodeSnapshot
from herd.core.policy import node_urls
from herd.core.policy.models import model_limits
from herd.core.wire import WireError, report_from_data
from herd.state.registry import MAX_NODES, NodeRecord
from herd.state.state import RouterState

log = logging.getLogger("herd.router")

MAX_MESSAGE_BYTES = 4 * 2**20
OUTGOING_BUFFER = 32


def token_ok(expected: str | None, presented: str | None) -> bool:
    """Constant-time check of ``Authorization: Bearer <token>`` (any value if none is set)."""
    if not expected:
        return True
    if not presented or not presented.startswith("Bearer "):
        return False
    return hmac.compare_digest(presented[7:].encode(), expected.encode())


def log_backend_change(before: NodeRecord | None, report: NodeReport) -> None:
    """One line when a heartbeat says the node's backend went down (or joins down), one when
    it is back; nothing while it stays as it was."""
    was_healthy = before.report.backend.healthy if before is not None else True
    healthy = report.backend.healthy
    if was_healthy and not healthy:
        log.warning("node %s: backend down: %s", report.node_id, report.backend.error or "?")
    elif healthy and not was_healthy:
        log.info("node %s: backend is back", report.node_id)


RESOLVE_TIMEOUT = 2.0


async def resolve_name(name: str) -> frozenset[str]:
    """The addresses ``name`` resolves to (empty if it doesn't, within RESOLVE_TIMEOUT)."""
    with trio.move_on_after(RESOLVE_TIMEOUT):
        try:
            found = await trio.socket.getaddrinfo(name, None)
        except OSError:
            return frozenset()
        return frozenset(str(entry[4][0]) for entry in found)
    return frozenset()


class FleetSession:
    def __init__(self, state: RouterState, config: RouterConfig) -> None:
        self.state = state
        self.config = config
        self.node_id: str | None = None
        self.joined = trio.Event()
        # Set by serve_fleet_socket: cancelling it ends the session (see retire()).
        self.scope: trio.CancelScope | None = None
        self.outgoing, self._outgoing_receive = trio.open_memory_channel[dict[str, Any]](
            OUTGOING_BUFFER
        )
        self._checked_urls: tuple[str, bool, str] | None = None

    def reply(self, message: dict[str, Any]) -> None:
        try:
            self.outgoing.send_nowait(message)
        except trio.WouldBlock:
            log.warning(
                "node %s is not reading its socket; dropped a %s message",
                self.node_id,
                message.get("type"),
            )

    async def check_urls(self, report: NodeReport) -> str | None:
        """Are the addresses this report names the node's own (see
        :mod:`herd.core.policy.node_urls`)? Checked when they change, not every heartbeat."""
        urls = (report.backend.url, report.backend.proxied, report.agent_url)
        if urls == self._checked_urls:
            return None
        peer = str(websocket.remote_addr or "")
        resolved: dict[str, frozenset[str]] = {}
        for name in node_urls.hosts_to_resolve(report):
            resolved[name] = await resolve_name(name)
        problem = node_urls.check_report(report, peer, resolved, self.config.allow_backend_hosts)
        if problem is None:
            self._checked_urls = urls
        return problem

    async def send_loop(self) -> None:
        async for message in self._outgoing_receive:
            await websocket.send(json.dumps(message))

    async def receive_loop(self) -> str:
        """Take heartbeats until the socket closes. Returns only to refuse the node: the
        reason to close the socket with."""
        state = self.state
        while True:
            raw = await websocket.receive()
            if isinstance(raw, bytes | bytearray):
                raw = raw.decode("utf-8", "replace")
            if len(raw) > MAX_MESSAGE_BYTES:
                self.reply({"type": "error", "message": "message too large"})
                continue
            try:
                message = json.loads(raw)
                if not isinstance(message, dict):
                    raise WireError("message must be a JSON object")
                if message.get("type") != "heartbeat":
                    raise WireError(f"unknown message type {message.get('type')!r}")
                report = report_from_data(message.get("node"))
            except (ValueError, WireError, RecursionError) as exc:
                self.reply({"type": "error", "message": str(exc)[:500]})
                continue
            first = self.node_id is None
            problem = await self.check_urls(report)
            if problem is not None:
                log.warning(
                    "refused node %s from %s: %s", report.node_id, websocket.remote_addr, problem
                )
                return f"refused: {problem}"[:120]
            if self.node_id is None:
                if state.registry.full(report.node_id):
                    log.warning("refused node %s: the fleet is at its node limit", report.node_id)
                    return f"the router knows {MAX_NODES} nodes already (its limit)"
                admission = state.registry.admit(report.node_id, self)
                if not admission.allowed:
                    log.warning(
                        "refused a second connection for node %s from %s: "
                        "that node is connected and still heartbeating",
                        report.node_id,
                        websocket.remote_addr,
                    )
                    return f"node id {report.node_id!r} is already connected from another session"
                if isinstance(admission.stale, FleetSession):
                    admission.stale.retire()
                self.node_id = report.node_id
                log.info("node %s joined (%s)", self.node_id, report.backend.url)
                state.timeline.record("node_joined", self.node_id, detail=report.backend.url)
                state.node_commands[self.node_id] = self.outgoing
                self.reply(
                    {
                        "type": "ack",
                        "node_id": self.node_id,
                        "heartbeat_interval": self.config.heartbeat_interval,
                    }
                )
                self.joined.set()
            elif report.node_id != self.node_id:
                self.reply(
                    {
                        "type": "error",
                        "message": f"this socket belongs to node "
                        f"{self.node_id!r}, not {report.node_id!r}",
                    }
                )
                continue
            log_backend_change(state.registry.get(self.node_id), report)
            state.registry.apply_report(report, trio.current_time(), self)
            state.history.observe(report)  # spilled copies: their slowness is theirs
            state.queues.set_limit(self.node_id, report.parallel_slots)
            record = state.registry.get(self.node_id)
            if record is not None and first:
                state.timeline.joined(record)  # what later changes are compared with
            if record is not None:
                snapshot = NodeSnapshot(record.report, record.status, record.last_seen)
                state.queues.set_model_limits(self.node_id, model_limits(snapshot))
            state.fleet_changed()

    async def drain_watch(self) -> None:
        await self.joined.wait()
        assert self.node_id is not None
        state = self.state
        while True:
            record = state.registry.get(self.node_id)
            if (
                record is not None
                and record.session is self
                and record.report.draining
                and not state.queues.busy(self.node_id)
            ):
                log.info("node %s drained", self.node_id)
                state.timeline.record("node_drained", self.node_id)
                self.reply({"type": "drained"})
                return
            await state.wait_fleet_changed()

    def retire(self) -> None:
        """A newer session took this node over (this one had gone silent): end this one."""
        log.info("node %s reconnected; closing its silent old session", self.node_id)
        if self.scope is not None:
            self.scope.cancel()

    def close(self) -> None:
        if self.node_id is None:
            return
        state = self.state
        if state.node_commands.get(self.node_id) is self.outgoing:
            del state.node_commands[self.node_id]
        if state.registry.disconnected(self.node_id, trio.current_time(), self):
            log.info("node %s left", self.node_id)
            state.timeline.record("node_left", self.node_id, detail="its socket closed")
        state.fleet_changed()


async def serve_fleet_socket(state: RouterState, config: RouterConfig) -> Response | None:
    """Serve one node's socket until it closes. Returns the HTTP response refusing the
    handshake (Quart sends it instead of accepting) when the fleet token is missing or wrong."""
    if not token_ok(config.auth_token, websocket.headers.get("Authorization")):
        log.warning("refused a node from %s: missing or wrong fleet token", websocket.remote_addr)
        return Response("fleet token required\n", status=401, content_type="text/plain")
    session = FleetSession(state, config)
    refusal: str | None = None
    try:
        async with trio.open_nursery() as nursery:
            session.scope = nursery.cancel_scope
            nursery.start_soon(session.send_loop)
            nursery.start_soon(session.drain_watch)
            refusal = await session.receive_loop()
            nursery.cancel_scope.cancel()
    finally:
        session.close()
    if refusal is not None:
        await websocket.close(1008, refusal)
    return None
