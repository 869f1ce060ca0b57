"""The node agent: one persistent WebSocket to the router, heartbeats on it, commands back.

Session (trio-websocket's heartbeat recipe): inside the connection's nursery run three loops,
- heartbeats: probe the backend, build a :class:`NodeReport`, send it, sleep ``interval`` (woken
  early by :meth:`NodeAgent.drain`);
- pings: ``fail_after(ping_timeout): await ws.ping()`` then sleep, so a dead router tears the
  session down instead of leaving the node talking to nobody;
- receive: the router's messages (``ack``; ``command`` with ``drain``; others ignored).
When any loop fails the session ends; the agent reconnects after a capped exponential backoff
(``backoff_initial`` doubling to ``backoff_max``, with jitter; reset after a session that
delivered a heartbeat). Losing the router never touches the backend: local inference goes on.

Protocol (JSON text messages):
    node → router  {"type": "heartbeat", "node": <NodeReport>}
    router → node  {"type": "ack", "node_id": ..., "heartbeat_interval": ...}
                   {"type": "command", "command": "drain"}       start draining
                   {"type": "command", "command": "heartbeat"}   send a heartbeat now
                   {"type": "drained"}      (draining) nothing of ours is in flight any more
                   {"type": "error", "message": ...}
"""

from __future__ import annotations

import json
import logging
import random
import socket
import time
import urllib.parse
from collections.abc import Callable
from importlib import metadata

import attrs
import httpx
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from herd.models import (
    AvailableModel,
    Capabilities,
    Capacity,
    CpuInfo,
    DiskInfo,
    MemoryInfo,
    NodeReport,
)
from herd.node.backend import BackendState, OllamaBackend
from herd.node.metrics import read_system
from herd.wire import report_to_json

log = logging.getLogger("herd.node")

SystemReader = Callable[[], tuple[CpuInfo, MemoryInfo, DiskInfo]]
EMBED_FAMILIES = ("bert", "nomic-bert", "xlm-roberta")


def _version() -> str:
    try:
        return metadata.version("herd")
    except metadata.PackageNotFoundError:
        return "0.1.0"


@attrs.frozen
class AgentConfig:
    router_url: str
    ollama_url: str = "http://localhost:11434"
    node_id: str = attrs.field(factory=socket.gethostname)
    advertise_url: str | None = None
    heartbeat_interval: float = 5.0
    ping_timeout: float = 10.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    backoff_jitter: float = 0.1  # up to this share is added to each delay, so nodes spread out
    parallel_slots: int = 4
    auth_token: str | None = None
    agent_version: str = attrs.field(factory=_version)

    @property
    def ws_url(self) -> str:
        base = self.router_url.rstrip("/")
        if base.startswith("https://"):
            return "wss://" + base[len("https://") :] + "/fleet/ws"
        return "ws://" + base.removeprefix("http://") + "/fleet/ws"


@attrs.frozen
class AgentStatistics:
    connected: bool
    heartbeats_sent: int
    reconnects: int
    last_error: str | None


def is_embedding_model(model: AvailableModel) -> bool:
    return model.family in EMBED_FAMILIES or "embed" in model.name


class NodeAgent:
    def __init__(
        self,
        config: AgentConfig,
        backend: OllamaBackend | None = None,
        system: SystemReader | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.system: SystemReader = system or read_system
        self.draining = False
        self.last_report: NodeReport | None = None
        self.connected = False
        self.heartbeats_sent = 0
        self.reconnects = 0
        self.last_error: str | None = None
        self._wake = trio.Event()
        self._rng = random.Random()
        # Set when the router says this draining node has no requests left in flight.
        self.drained = trio.Event()

    def statistics(self) -> AgentStatistics:
        return AgentStatistics(
            connected=self.connected,
            heartbeats_sent=self.heartbeats_sent,
            reconnects=self.reconnects,
            last_error=self.last_error,
        )

    def build_report(self, state: BackendState, now_wall: float) -> NodeReport:
        cpu, memory, disk = self.system()
        backend = state.info
        if self.config.advertise_url:
            backend = attrs.evolve(backend, url=self.config.advertise_url)
        return NodeReport(
            node_id=self.config.node_id,
            host=socket.gethostname(),
            agent_version=self.config.agent_version,
            backend=backend,
            cpu=cpu,
            memory=memory,
            disk=disk,
            loaded_models=state.loaded,
            available_models=state.available,
            in_flight=0,
            parallel_slots=self.config.parallel_slots,
            capabilities=Capabilities(
                text=True,
                embed_models=tuple(m.name for m in state.available if is_embedding_model(m)),
            ),
            capacity=Capacity(),
            draining=self.draining,
            sent_at=now_wall,
        )

    async def drain(self) -> None:
        """Announce draining now (and in every heartbeat after)."""
        self.draining = True
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, heartbeat, reconnect — until cancelled. Started at once: the agent keeps
        trying whether or not the router is there yet."""
        task_status.started()
        delay = self.config.backoff_initial
        async with httpx.AsyncClient(trust_env=False) as client:
            backend = self.backend or OllamaBackend(self.config.ollama_url.rstrip("/"), client)
            while True:
                before = self.heartbeats_sent
                try:
                    await self._session(backend)
                except* (
                    ConnectionClosed,
                    HandshakeError,
                    OSError,
                    trio.TooSlowError,
                    trio.BrokenResourceError,
                    ValueError,
                ) as group:
                    first = group.exceptions[0]
                    self.last_error = f"{type(first).__name__}: {first}"[:300]
                finally:
                    self.connected = False
                if self.heartbeats_sent > before:
                    delay = self.config.backoff_initial
                log.info("router connection lost (%s); retrying in %.1f s", self.last_error, delay)
                await trio.sleep(delay * (1 + self.config.backoff_jitter * self._rng.random()))
                delay = min(self.config.backoff_max, delay * 2)
                self.reconnects += 1

    async def _session(self, backend: OllamaBackend) -> None:
        headers: list[tuple[bytes, bytes]] = []
        if self.config.auth_token:
            headers.append((b"authorization", f"Bearer {self.config.auth_token}".encode()))
        target = urllib.parse.urlsplit(self.config.router_url)
        host, port = target.hostname or "127.0.0.1", target.port or 80
        # We own the TCP stream (rather than open_websocket_url) so that it is closed on every
        # path: trio-websocket leaves it open when the router rejects the handshake.
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(host, port)
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(10):
                    ws = await wrap_client_stream(
                        nursery, stream, f"{host}:{port}", "/fleet/ws", extra_headers=headers
                    )
                self.connected = True
                log.info(
                    "connected to router %s as %s", self.config.router_url, self.config.node_id
                )
                # The loops end only by failing (or cancellation), which takes the reader
                # task down too; closing the stream below is the goodbye the router sees.
                nursery.start_soon(self._heartbeats, ws, backend)
                nursery.start_soon(self._pings, ws)
                nursery.start_soon(self._receive, ws)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _heartbeats(self, ws: WebSocketConnection, backend: OllamaBackend) -> None:
        while True:
            state = await backend.probe()
            report = self.build_report(state, time.time())
            self.last_report = report
            await ws.send_message(report_to_json(report))
            self.heartbeats_sent += 1
            with trio.move_on_after(self.config.heartbeat_interval):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _pings(self, ws: WebSocketConnection) -> None:
        while True:
            with trio.fail_after(self.config.ping_timeout):
                await ws.ping()
            await trio.sleep(self.config.heartbeat_interval)

    async def _receive(self, ws: WebSocketConnection) -> None:
        while True:
            raw = await ws.get_message()
            try:
                message = json.loads(raw)
            except ValueError:
                log.warning("router sent a message that is not JSON")
                continue
            kind = message.get("type") if isinstance(message, dict) else None
            command = message.get("command") if kind == "command" else None
            if command == "drain":
                await self.drain()
            elif command == "heartbeat":
                self._wake.set()  # the router wants fresh news (after a pull, a delete)
            elif kind == "drained":
                self.drained.set()
            elif kind == "error":
                log.warning("router: %s", message.get("message"))
            elif kind != "ack":
                log.debug("ignoring router message of type %r", kind)
