"""The node agent: one persistent WebSocket to the router, heartbeats on it, commands back.

A node given several routers (``--router-url`` repeated, or several found by mDNS) runs one
agent per router (:class:`herd.node.service.Node`), each with its own session and heartbeats;
a command is done once for the node: ``drain`` from any router drains it towards all of them
(``on_drain``), a second ``drain`` changes nothing, and ``heartbeat`` only wakes that agent.

Theory of operation
-------------------
:meth:`NodeAgent.run` loops forever: open a session, and when it ends (it only ends by failing),
wait a backoff delay and open the next. A session is trio-websocket's heartbeat recipe: inside
the connection's nursery run three loops,

- heartbeats: probe the backend, build a :class:`NodeReport`, send it, then wait
  ``heartbeat_interval`` — or less, when :meth:`NodeAgent.drain` or the router's ``heartbeat``
  command sets the wake-up event. A failed probe is reported ``healthy=False`` with the last
  good probe's model lists, marked ``models_stale`` (none if the backend never answered); the
  backend going down and coming back are logged once each;
- pings: ``fail_after(ping_timeout): await ws.ping()`` then sleep ``heartbeat_interval``, so a
  router that stopped answering tears the session down instead of leaving the node talking to
  nobody;
- receive: the router's messages, below.

Any of them failing takes the others down with it. Backoff: ``backoff_initial`` doubling up to
``backoff_max``, each wait stretched by up to ``backoff_jitter`` (drawn from the agent's own
``random.Random``) so a fleet doesn't reconnect in lockstep after a router restart. The delay
goes back to ``backoff_initial`` after a session in which the router acknowledged us (a router
that accepts the socket and drops it at once is still backed off). Losing the router never
touches the backend: local inference goes on. A router that can't be reached at all (refused,
unknown host, no answer) is one warning saying so when it starts, not one line per attempt (the
attempts after it are DEBUG) until the router answers again or the reason changes.

Protocol (JSON text messages on ``/fleet/ws``; ``Authorization: Bearer <token>`` on the
handshake when a fleet token is set)::

    node → router  {"type": "heartbeat", "node": <NodeReport>}
    router → node  {"type": "ack", "node_id": ..., "heartbeat_interval": ...}   after the first
                   {"type": "command", "command": "drain"}       start draining
                   {"type": "command", "command": "heartbeat"}   send a heartbeat now
                   {"type": "drained"}      (draining) nothing of ours is in flight any more
                   {"type": "error", "message": ...}              logged
Anything else is logged and ignored, so a newer router can talk to an older node.

trio-websocket notes: the agent opens (and always closes) the TCP stream itself and hands it to
``wrap_client_stream``, because a rejected handshake leaves the library's own stream open; and
the handshake runs under our own deadline, because a peer that closes the TCP connection
before answering the handshake leaves ``wrap_client_stream`` waiting forever.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import random
import socket
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from importlib import metadata
from typing import Any, Protocol

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from herd.core.models import (
    AvailableModel,
    Capabilities,
    Capacity,
    CpuInfo,
    DiskInfo,
    GpuInfo,
    MemoryInfo,
    NodeReport,
)
from herd.core.wire import report_to_json
from herd.node.accelerators import with_loaded
from herd.node.backend import BackendState, OllamaBackend, carry_over
from herd.node.media import MediaCapabilities, whisper_model_path
from herd.node.media import detect as media_capabilities
from herd.node.metrics import read_system
from herd.node.upstream import backend_client

log = logging.getLogger("herd.node")

SystemReader = Callable[[], tuple[CpuInfo, MemoryInfo, DiskInfo]]
# The machine's accelerators (herd.node.accelerators.AcceleratorReader.read): read off the
# event loop and cached there, so a heartbeat never waits on a device.
AcceleratorSource = Callable[[], Awaitable[tuple[GpuInfo, ...]]]


class Probe(Protocol):
    """A backend the agent can read: Ollama, or an OpenAI-compatible server."""

    async def probe(self) -> BackendState: ...


EMBED_FAMILIES = ("bert", "nomic-bert", "xlm-roberta")
FLEET_PATH = "/fleet/ws"
ERROR_MAX_CHARS = 300
# What ends a session and is answered by reconnecting. Anything else is a bug and propagates.
SESSION_ERRORS: tuple[type[Exception], ...] = (
    ConnectionClosed,  # the router closed the socket, or the TCP connection broke
    HandshakeError,  # the router refused the WebSocket handshake (e.g. wrong fleet token)
    OSError,  # refused, unreachable, DNS; our own timeouts are raised as TimeoutError
    trio.BrokenResourceError,  # TLS failures surface as this
    trio.TooSlowError,
)


def _version() -> str:
    try:
        return metadata.version("herd")
    except metadata.PackageNotFoundError:
        return "0.1.0"


@attrs.frozen
class RouterEndpoint:
    """Where the fleet socket is, parsed once from ``router_url``."""

    host: str
    port: int
    tls: bool
    resource: str  # the path, e.g. "/fleet/ws"

    @classmethod
    def from_url(cls, url: str) -> RouterEndpoint:
        """Parse ``http(s)://host[:port][/prefix]`` (or ``ws(s)://``). Raises ValueError."""
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https", "ws", "wss"):
            raise ValueError(f"router URL must start with http:// or https://, got {url!r}")
        if not parts.hostname:
            raise ValueError(f"router URL has no host: {url!r}")
        tls = parts.scheme in ("https", "wss")
        try:
            port = parts.port or (443 if tls else 80)
        except ValueError:
            raise ValueError(f"router URL has a bad port: {url!r}") from None
        return cls(parts.hostname, port, tls, parts.path.rstrip("/") + FLEET_PATH)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.tls else 80) else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self.host_header}{self.resource}"


@attrs.frozen
class AgentConfig:
    router_url: str  # http://host:port of the router; the socket is ws://host:port/fleet/ws
    ollama_url: str = "http://localhost:11434"
    node_id: str = attrs.field(factory=socket.gethostname)
    advertise_url: str | None = None  # backend URL the router should use; default ollama_url
    advertise_proxied: bool = False  # advertise_url is our LAN proxy
    heartbeat_interval: float = 5.0
    ping_timeout: float = 10.0
    connect_timeout: float = 10.0  # TCP connect + WebSocket handshake
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    backoff_jitter: float = 0.1  # up to this share is added to each delay, so nodes spread out
    parallel_slots: int = 4  # advertised concurrency limit
    # Per-model limits within it (--model-slots), advertised as they are.
    model_slots: dict[str, int] = attrs.field(factory=dict)
    auth_token: str | None = None  # sent as "Authorization: Bearer <token>" on the handshake
    agent_version: str = attrs.field(factory=_version)
    # The node's own HTTP app (image generation, speech-to-text), if it serves one; media
    # capabilities are only advertised when it does.
    agent_url: str = ""
    whisper_model: str | None = None
    asr_url: str | None = None

    def __attrs_post_init__(self) -> None:
        RouterEndpoint.from_url(self.router_url)  # fail at construction, naming the bad URL

    @property
    def endpoint(self) -> RouterEndpoint:
        return RouterEndpoint.from_url(self.router_url)

    @property
    def ws_url(self) -> str:
        return self.endpoint.url


@attrs.frozen
class AgentStatistics:
    connected: bool
    heartbeats_sent: int
    reconnects: int
    last_error: str | None
    draining: bool


def is_embedding_model(model: AvailableModel) -> bool:
    return model.family in EMBED_FAMILIES or "embed" in model.name


def describe_error(exc: BaseException) -> str:
    """One line for ``last_error`` and the log. Never includes our request headers."""
    if isinstance(exc, ConnectionRejected) and exc.status_code == 401:
        text = "router refused the fleet token (401): check --auth-token here and on the router"
    elif isinstance(exc, ConnectionRejected):
        text = f"router refused the connection: HTTP {exc.status_code}"
    elif isinstance(exc, ConnectionClosed):
        reason = exc.reason
        text = "router connection closed"
        if reason is not None:
            text += f" (code {reason.code}" + (f": {reason.reason})" if reason.reason else ")")
    else:
        detail = str(exc).splitlines()[0] if str(exc) else ""
        text = type(exc).__name__ + (f": {detail}" if detail else "")
    return text[:ERROR_MAX_CHARS]


def unreachable_reason(exc: BaseException) -> str:
    """Why a TCP connection to the router could not be made, in a few words: trio reports
    "all attempts to connect to H:P failed" with the attempts' errors as its cause."""
    while isinstance(exc.__cause__, BaseExceptionGroup) and exc.__cause__.exceptions:
        exc = exc.__cause__.exceptions[0]
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, OSError) and exc.errno and not isinstance(exc, TimeoutError):
        return os.strerror(exc.errno).lower()
    return describe_error(exc)


def is_refusal(exc: BaseException) -> bool:
    """The router turned us away (handshake refused, or closed with 1008 "policy violation",
    e.g. another session already holds our node id), rather than the connection failing."""
    if isinstance(exc, ConnectionRejected):
        return True
    return isinstance(exc, ConnectionClosed) and exc.reason is not None and exc.reason.code == 1008


@attrs.define(eq=False)
class NodeAgent:
    """Heartbeats for one backend to one router, until cancelled. See the module docstring."""

    config: AgentConfig
    backend: Probe | None = None  # default: Ollama at config.ollama_url, own client
    system: SystemReader = read_system
    # Backoff jitter. Never the global ``random``: that belongs to whoever embeds us.
    rng: random.Random = attrs.field(factory=random.Random)
    # How to find the router again after losing it (mDNS), when it wasn't given by URL.
    locate: Callable[[], Awaitable[str | None]] | None = None
    # Adaptive capacity (--learn-capacity): what the fleet may use of this machine now.
    capacity: Callable[[CpuInfo, MemoryInfo], Capacity] | None = None
    # The accelerators to report; None: report none (the router then judges memory by RAM).
    accelerators: AcceleratorSource | None = None
    # A router asked this node to drain: with several routers, the node's owner drains it
    # towards all of them, once (None: this agent drains alone).
    on_drain: Callable[[], None] | None = None

    draining: bool = attrs.field(default=False, init=False)
    last_report: NodeReport | None = attrs.field(default=None, init=False)
    # True from the first heartbeat sent on a socket until that socket is gone.
    connected: bool = attrs.field(default=False, init=False)
    heartbeats_sent: int = attrs.field(default=0, init=False)
    reconnects: int = attrs.field(default=0, init=False)
    pings_sent: int = attrs.field(default=0, init=False)
    # Ping payloads: a count, unique per socket, that draws from no random generator (not
    # ``rng``, whose draws a seeded caller expects to be its jitter alone).
    _ping_ids: Iterator[int] = attrs.field(factory=itertools.count, init=False)
    last_error: str | None = attrs.field(default=None, init=False)
    # Set when the router says this draining node has no requests left in flight.
    drained: trio.Event = attrs.field(factory=trio.Event, init=False)
    _wake: trio.Event = attrs.field(factory=trio.Event, init=False)
    _up: trio.Event = attrs.field(factory=trio.Event, init=False)
    _acked: bool = attrs.field(default=False, init=False)
    # What this machine can do beyond text, as of the last heartbeat.
    media: MediaCapabilities = attrs.field(factory=MediaCapabilities, init=False)
    # The last good probe: its lists stand in, stale, while the backend doesn't answer.
    _known: BackendState | None = attrs.field(default=None, init=False)
    # Did the last probe succeed? None before the first.
    _backend_up: bool | None = attrs.field(default=None, init=False)
    # Did this session's TCP connection to the router open? And the reason last logged as a
    # warning that the router can't be reached (None: reached since).
    _reached: bool = attrs.field(default=False, init=False)
    _unreachable: str | None = attrs.field(default=None, init=False)

    def statistics(self) -> AgentStatistics:
        return AgentStatistics(
            connected=self.connected,
            heartbeats_sent=self.heartbeats_sent,
            reconnects=self.reconnects,
            last_error=self.last_error,
            draining=self.draining,
        )

    async def wait_connected(self) -> None:
        """Return once the agent has a socket and has sent a heartbeat on it."""
        while not self.connected:
            await self._up.wait()

    def build_report(
        self, state: BackendState, now_wall: float, gpus: tuple[GpuInfo, ...] = ()
    ) -> NodeReport:
        """Assemble one heartbeat: this machine's metrics and accelerators (``gpus``), the
        backend's state, our flags. ``now_wall`` is wall-clock epoch seconds (it crosses
        machines). A unified-memory device's use is what the loaded models hold of it."""
        cpu, memory, disk = self.system()
        media = (
            media_capabilities(
                state.available, whisper_model_path(self.config.whisper_model), self.config.asr_url
            )
            if self.config.agent_url
            else MediaCapabilities()
        )
        self.media = media
        backend = state.info
        if self.config.advertise_url:
            backend = attrs.evolve(
                backend, url=self.config.advertise_url, proxied=self.config.advertise_proxied
            )
        return NodeReport(
            node_id=self.config.node_id,
            host=socket.gethostname(),
            agent_version=self.config.agent_version,
            agent_url=self.config.agent_url,
            backend=backend,
            cpu=cpu,
            memory=memory,
            disk=disk,
            gpus=with_loaded(gpus, state.loaded),
            loaded_models=state.loaded,
            available_models=state.available,
            in_flight=0,
            parallel_slots=state.slots or self.config.parallel_slots,
            model_slots=dict(self.config.model_slots),
            capabilities=Capabilities(
                text=True,
                embed_models=tuple(m.name for m in state.available if is_embedding_model(m)),
                image_backends=media.image_backends,
                image_models=media.image_models,
                stt_backends=media.stt_backends,
                stt_models=media.stt_models,
            ),
            capacity=self.capacity(cpu, memory) if self.capacity is not None else Capacity(),
            draining=self.draining,
            sent_at=now_wall,
        )

    def backend_state(self, probed: BackendState) -> BackendState:
        """What to report of one probe: a failed one with the last known lists, marked stale
        (:func:`~herd.node.backend.carry_over`). Logs the backend going down and coming back,
        once each, not once per heartbeat."""
        info = probed.info
        if info.healthy:
            if self._backend_up is False:
                log.info("backend %s is back", info.url)
            self._known = probed
        elif self._backend_up is not False:
            known = (
                "reporting its last known models as stale"
                if self._known is not None
                else "no models known yet"
            )
            log.warning("backend down: %s; %s", info.error, known)
        self._backend_up = info.healthy
        return carry_over(probed, self._known)

    async def drain(self) -> None:
        """Announce draining: at once if connected (the heartbeat loop wakes up), and in
        every heartbeat after, across reconnects."""
        self._start_draining()

    def _start_draining(self) -> None:
        self.draining = True
        self._wake.set()

    def wake(self) -> None:
        """Send a heartbeat now (something in the report changed, e.g. a manual pause)."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, heartbeat, reconnect — until cancelled.

        Reports started at once, before any connection: the agent keeps trying whether or
        not the router is up yet. Use :meth:`wait_connected` to wait for the router.
        """
        task_status.started()
        async with contextlib.AsyncExitStack() as stack:
            backend: Probe | None = self.backend
            if backend is None:
                client = await stack.enter_async_context(backend_client())
                backend = OllamaBackend(self.config.ollama_url, client)
            delay = self.config.backoff_initial
            while True:
                self._acked = False
                self._reached = False
                refused = False
                unreachable: str | None = None
                try:
                    await self._session(backend)
                except* SESSION_ERRORS as group:
                    self.last_error = describe_error(group.exceptions[0])
                    refused = is_refusal(group.exceptions[0])
                    if not self._reached:
                        unreachable = unreachable_reason(group.exceptions[0])
                finally:
                    self._disconnected()
                if self._acked:
                    delay = self.config.backoff_initial
                wait = delay * (1 + self.config.backoff_jitter * self.rng.random())
                if self._reached:
                    self._unreachable = None
                if refused:  # a setup problem (token, duplicate node id): say so louder
                    log.warning("%s; retrying in %.1f s", self.last_error, wait)
                elif unreachable is not None and unreachable != self._unreachable:
                    self._unreachable = unreachable
                    log.warning(
                        "cannot reach the router at %s (%s): is it running, and is "
                        "--router-url right? Retrying every %g s or sooner until it answers",
                        self.config.router_url,
                        unreachable,
                        self.config.backoff_max,
                    )
                elif unreachable is not None:
                    log.debug(
                        "router still unreachable (%s); retrying in %.1f s", unreachable, wait
                    )
                else:
                    log.info(
                        "router connection lost (%s); retrying in %.1f s", self.last_error, wait
                    )
                await trio.sleep(wait)
                delay = min(self.config.backoff_max, delay * 2)
                self.reconnects += 1
                if self.locate is not None:
                    # Found by mDNS: look again, in case the router moved.
                    url = await self.locate()
                    if url and url != self.config.router_url:
                        log.info("router found at %s", url)
                        self.config = attrs.evolve(self.config, router_url=url)

    def _disconnected(self) -> None:
        if self.connected:
            self.connected = False
            self._up = trio.Event()

    async def _open_stream(
        self, endpoint: RouterEndpoint
    ) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
        if endpoint.tls:
            return await trio.open_ssl_over_tcp_stream(
                endpoint.host,
                endpoint.port,
                ssl_context=ssl.create_default_context(),
                https_compatible=True,
            )
        return await trio.open_tcp_stream(endpoint.host, endpoint.port)

    async def _session(self, backend: Probe) -> None:
        endpoint = self.config.endpoint
        headers: list[tuple[bytes, bytes]] = []
        if self.config.auth_token:
            headers.append((b"authorization", f"Bearer {self.config.auth_token}".encode()))
        too_slow = f"no handshake from {endpoint.url} within {self.config.connect_timeout:g} s"
        deadline = trio.current_time() + self.config.connect_timeout
        try:
            with trio.fail_at(deadline):
                stream = await self._open_stream(endpoint)
        except trio.TooSlowError:
            raise TimeoutError(too_slow) from None
        self._reached = True
        try:
            async with trio.open_nursery() as nursery:
                try:
                    with trio.fail_at(deadline):
                        ws = await wrap_client_stream(
                            nursery,
                            stream,
                            endpoint.host_header,
                            endpoint.resource,
                            extra_headers=headers,
                        )
                except trio.TooSlowError:
                    raise TimeoutError(too_slow) from None
                log.info("connected to router %s as %s", endpoint.url, self.config.node_id)
                # The loops end only by failing (or cancellation), which takes the reader
                # task down too; closing the stream below is the goodbye the router sees.
                nursery.start_soon(self._heartbeats, ws, backend)
                nursery.start_soon(self._pings, ws)
                nursery.start_soon(self._receive, ws)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    async def _heartbeats(self, ws: WebSocketConnection, backend: Probe) -> None:
        while True:
            # A wake-up asked for before this point is answered by the report we now build.
            self._wake = trio.Event()
            state = self.backend_state(await backend.probe())
            gpus = await self.accelerators() if self.accelerators is not None else ()
            report = self.build_report(state, time.time(), gpus)
            self.last_report = report
            await ws.send_message(report_to_json(report))
            self.heartbeats_sent += 1
            if not self.connected:
                self.connected = True
                self._up.set()
            with trio.move_on_after(self.config.heartbeat_interval):
                await self._wake.wait()

    async def _pings(self, ws: WebSocketConnection) -> None:
        while True:
            try:
                with trio.fail_after(self.config.ping_timeout):
                    # Our own payload: trio-websocket's default draws from the global
                    # ``random``, which the program embedding us (or a test runner such as
                    # Hypothesis) may own.
                    await ws.ping(next(self._ping_ids).to_bytes(8, "big"))
                self.pings_sent += 1
            except trio.TooSlowError:
                raise TimeoutError(
                    f"router did not answer a ping within {self.config.ping_timeout:g} s"
                ) from None
            await trio.sleep(self.config.heartbeat_interval)

    async def _receive(self, ws: WebSocketConnection) -> None:
        while True:
            self._handle(await ws.get_message())

    def _handle(self, raw: str | bytes) -> None:
        try:
            message: Any = json.loads(raw)
        except ValueError:
            log.warning("router sent a message that is not JSON; ignored")
            return
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "ack":
            self._acked = True
        elif kind == "command":
            command = message.get("command")
            if command == "drain":
                if not self.draining:
                    log.info("router asked this node to drain")
                if self.on_drain is not None:
                    self.on_drain()
                else:
                    self._start_draining()
            elif command == "heartbeat":
                self._wake.set()  # the router wants fresh news (after a pull, a delete)
            else:
                log.warning("ignoring unknown router command %r", command)
        elif kind == "drained":
            self.drained.set()
        elif kind == "error":
            log.warning("router: %s", message.get("message"))
        else:
            log.debug("ignoring router message of type %r", kind)
