"""The router as a service: :class:`Router` owns the state, the HTTP server, the node monitor
and (with ``--local-node``) a node agent for this machine, all in one nursery.

Embeddable::

    async with Router(RouterConfig(host="127.0.0.1", port=0)) as router:
        await router.wait_nodes(1)
        ...  # router.url, router.fleet
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import attrs
import httpx
import trio

from herd.config import NodeConfig, RouterConfig
from herd.core.models import FleetSnapshot, NodeStatus
from herd.core.policy import virtual
from herd.core.policy.deadlines import STALL_FLOOR
from herd.discovery import advertise
from herd.http.app import create_app
from herd.http.dashboard.bench import BenchmarkRunner
from herd.http.handler import ProxyASGI
from herd.http.security import ApiKeyGate, FrontGuard, Origins
from herd.server import ConnectionLimits, FinishResponses, serve_app
from herd.state.settings import RuntimeSettings, load_settings, updated
from herd.state.state import RouterState
from herd.store.db import DB_NAME, recent_latencies
from herd.store.writer import TraceWriter
from herd.transport.bodies import error_detail
from herd.transport.client import backend_headers, upstream_client
from herd.transport.errors import describe
from herd.transport.pulls import PullService

log = logging.getLogger("herd.router")

PREWARM_BUFFER = 64


def exposure_warnings(config: RouterConfig) -> list[str]:
    """What an operator must not miss about who can reach this router (console at start,
    the dashboard's banner, the Health tab)."""
    if config.host in ("127.0.0.1", "localhost", "::1"):
        return []
    warnings = []
    if not config.auth_token:
        warnings.append(
            f"The router listens on {config.host} with no fleet token: any machine that can "
            "reach it can join as a node and receive your prompts. Set FLEET_AUTH_TOKEN on the "
            "router and on every node."
        )
    if not config.api_keys:
        warnings.append(
            f"The router listens on {config.host} with no API key: anyone who can reach it can "
            "use it and change its settings (pulls, deletes, routing). Set FLEET_API_KEYS to "
            "require a key."
        )
    return warnings


@attrs.define(eq=False)
class Router:
    config: RouterConfig = attrs.field(factory=RouterConfig)
    local_node: NodeConfig | None = None
    # Initial runtime settings (the defaults unless an embedding program says otherwise).
    settings: RuntimeSettings = attrs.field(factory=RuntimeSettings)
    _state: RouterState | None = None
    _url: str | None = None
    _stack: contextlib.AsyncExitStack | None = None
    _nursery: trio.Nursery | None = None

    # --- library API -------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the router is not running")
        return self._url

    @property
    def state(self) -> RouterState:
        if self._state is None:
            raise RuntimeError("the router is not running")
        return self._state

    @property
    def fleet(self) -> FleetSnapshot:
        return self.state.snapshot()

    async def wait_nodes(self, count: int) -> None:
        """Wait until at least ``count`` nodes are online."""
        while sum(1 for n in self.fleet.nodes if n.status is NodeStatus.ONLINE) < count:
            await self.state.wait_fleet_changed()

    async def __aenter__(self) -> Router:
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            nursery = await stack.enter_async_context(trio.open_nursery())
            await nursery.start(self._run_services)
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        self._nursery = nursery
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._stack is not None and self._nursery is not None
        self._nursery.cancel_scope.cancel()
        return await self._stack.__aexit__(exc_type, exc, tb)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (the CLI's entry point)."""
        await self._run_services(task_status=task_status)

    # --- services ------------------------------------------------------------------------
    async def _run_services(
        self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with self._open_state() as state, trio.open_nursery() as nursery:
            state.settings = self._start_settings()
            state.pulls = PullService(state)
            await nursery.start(state.pulls.run)
            state.store = TraceWriter(self.config.data_path / DB_NAME)
            await nursery.start(state.store.run)
            await nursery.start(state.timeline.run, state, state.store.path)  # #19: events
            for node_id, model, latency, rate in await trio.to_thread.run_sync(
                recent_latencies, state.store.path
            ):
                state.history.record(node_id, model, latency, rate)
            app = FrontGuard(
                ApiKeyGate(
                    self.config.api_keys, ProxyASGI(state, FinishResponses(create_app(state)))
                ),
                Origins(self.config.origins),
            )
            state.warnings = exposure_warnings(self.config)
            for warning in state.warnings:
                log.warning("!" * 78 + "\n  %s\n" + "!" * 78, warning)
            limits = ConnectionLimits(
                max_per_client=self.config.max_connections_per_client,
                idle_timeout=self.config.idle_timeout,
            )
            self._url = await nursery.start(
                serve_app, app, self.config.host, self.config.port, limits
            )
            state.benchmarks = BenchmarkRunner(state, self._url)  # #19: dashboard benchmarks
            await nursery.start(state.benchmarks.run)
            if self.config.mdns:
                port = int(self._url.rsplit(":", 1)[1])
                await nursery.start(advertise, self.config.host, port)
            nursery.start_soon(self._monitor, state)
            nursery.start_soon(self._reaper, state)
            send, receive = trio.open_memory_channel[tuple[str, str]](PREWARM_BUFFER)
            state.prewarm_send = send
            nursery.start_soon(self._prewarmer, state, receive)
            if self.local_node is not None:
                await nursery.start(self._run_local_node, self.local_node)
            log.info("router listening on %s", self._url)
            log.info("dashboard: %s/dashboard", self._url)
            task_status.started(self._url)

    def _start_settings(self) -> RuntimeSettings:
        """The embedding program's settings, then the settings file, then the flags that set
        a runtime setting (they beat the file: an operator who starts with ``--auto-pull``
        means it)."""
        settings = load_settings(self.config.data_path, self.settings)
        flags: dict[str, Any] = {
            name: getattr(self.config, name)
            for name in ("auto_pull", "vram_fallback", "agent_defaults")
            if getattr(self.config, name) is not None
        }
        if self.config.model_aliases:
            parsed = [virtual.parse_alias(text) for text in self.config.model_aliases]
            flags["model_aliases"] = {a.pattern: list(a.candidates) for a in parsed}
        for name, value in flags.items():
            if getattr(settings, name) != value:
                log.info("%s is %s (from the command line or environment)", name, value)
        return updated(settings, flags)

    @contextlib.asynccontextmanager
    async def _open_state(self) -> AsyncIterator[RouterState]:
        async with upstream_client() as client:
            self._state = RouterState.create(self.config, client)
            yield self._state

    async def _monitor(self, state: RouterState) -> None:
        """Age nodes: wake at the next possible transition or when the fleet changes."""
        while True:
            deadline = state.registry.next_deadline()
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await state.wait_fleet_changed()
            now = trio.current_time()
            changes = state.registry.tick(now)
            for node_id in state.forget_nodes(now):
                log.info("forgot node %s (offline for %.0f s)", node_id, self.config.forget_after)
            for change in changes:
                log.info(
                    "node %s is %s (was %s)",
                    change.node_id,
                    change.new.value,
                    change.old.value if change.old else "new",
                )
            if changes:
                state.fleet_changed(changes)

    async def _reaper(self, state: RouterState) -> None:
        """Reap in-flight requests whose stream stopped moving for ``stale_timeout``."""
        while True:
            timeout = state.settings.stale_timeout
            # Sample every quarter of the shortest limit a stream can have (a stream's own
            # limit follows its model's token rate, never below STALL_FLOOR); a settings
            # change takes effect at once.
            with trio.move_on_after(min(timeout, STALL_FLOOR) / 4):
                await state.wait_settings_changed()
                continue
            for lease in state.queues.stale(trio.current_time(), timeout):
                limit = lease.limit(timeout)
                log.warning(
                    "reaping a request on %s:%s: no progress for %.0f s",
                    lease.node_id,
                    lease.model,
                    limit,
                )
                lease.reap(f"reaped by the router: no progress for {limit:g} s")
                state.events["reaped"] += 1

    async def _prewarmer(
        self, state: RouterState, jobs: trio.MemoryReceiveChannel[tuple[str, str]]
    ) -> None:
        """Load a model on a runner-up node when the winner's queue for it runs deep."""
        warmed: dict[tuple[str, str], float] = {}
        async for node_id, model in jobs:
            now = trio.current_time()
            if now - warmed.get((node_id, model), -math.inf) < state.settings.prewarm_cooldown:
                continue
            record = state.registry.get(node_id)
            if record is None or not record.report.backend.healthy:
                continue
            warmed[(node_id, model)] = now
            state.events["prewarms"] += 1
            log.info("pre-warming %s on %s (deep queue elsewhere)", model, node_id)
            url = record.report.backend.url.rstrip("/") + "/api/generate"
            headers = backend_headers(record.report, state.config.auth_token)
            try:
                with trio.move_on_after(state.config.first_byte_timeout):
                    # An empty prompt loads the model and answers one short object.
                    async with state.client.stream(
                        "POST", url, json={"model": model, "keep_alive": -1}, headers=headers
                    ) as response:
                        await error_detail(response, node_id)  # bounded; the answer is small
            except httpx.HTTPError as exc:
                log.warning("pre-warm of %s on %s failed: %s", model, node_id, describe(exc))
            state.command(node_id, {"type": "command", "command": "heartbeat"})

    async def _run_local_node(
        self,
        node_config: NodeConfig,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        from herd.node.service import Node

        config = attrs.evolve(node_config, router_url=self.url)
        await Node(config, serve_http=False).run(task_status=task_status)
