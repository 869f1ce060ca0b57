"""The router as a service, and the composition root: :class:`Router` builds the state, the link
to the nodes, the trace writer and the HTTP app, and owns in one nursery the server, the pull
service, the state's upkeep (node monitor, zombie reaper), the pre-warmer and (with
``--local-node``) a node agent for this machine. With ``--state``, the shared state store's
tasks too (:mod:`herd.shared.service`): the router is then one of several in front of a fleet.

Embeddable::

    async with Router(RouterConfig(host="127.0.0.1", port=0)) as router:
        await router.wait_nodes(1)
        ...  # router.url, router.fleet
"""

from __future__ import annotations

import contextlib
import logging
from functools import partial
from types import TracebackType
from typing import Any

import attrs
import trio

from herd.config import NodeConfig, RouterConfig
from herd.core.models import FleetSnapshot, NodeStatus
from herd.core.policy import virtual
from herd.core.policy.node_urls import is_loopback_host
from herd.discovery import advertise
from herd.http import saved_settings
from herd.http.app import create_app
from herd.http.dashboard.bench import BenchmarkRunner
from herd.http.handler import ProxyASGI
from herd.http.security import ApiKeyGate, FrontGuard, Origins
from herd.server import ConnectionLimits, Doorkeeper, FinishResponses, serve_app
from herd.shared.service import SharedState
from herd.state import upkeep
from herd.state.registry import NodeRegistry
from herd.state.settings import RuntimeSettings, updated
from herd.state.state import RouterState
from herd.store.db import StoreTarget, recent_latencies
from herd.store.events import open_events
from herd.store.writer import TraceWriter
from herd.transport.client import upstream_client
from herd.transport.link import Link
from herd.transport.prewarm import prewarmer
from herd.transport.pulls import PullService

log = logging.getLogger("herd.router")

PREWARM_BUFFER = 64


def exposure_warnings(config: RouterConfig) -> list[str]:
    """What an operator must not miss about who can reach this router (console at start,
    the dashboard's banner, the Health tab)."""
    if is_loopback_host(config.host):
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
    _link: Link | None = None
    _store: TraceWriter | None = None
    _benchmarks: BenchmarkRunner | None = None
    # The router port's connection counts (herd.server.Doorkeeper), once it listens.
    doors: Doorkeeper | None = None
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
    def link(self) -> Link:
        """The router's link to its nodes (its state, client, configuration, pull service)."""
        if self._link is None:
            raise RuntimeError("the router is not running")
        return self._link

    @property
    def store(self) -> TraceWriter:
        """The trace writer (``latency.db`` in the data dir, or the ``--store`` database)."""
        if self._store is None:
            raise RuntimeError("the router is not running")
        return self._store

    @property
    def benchmarks(self) -> BenchmarkRunner:
        """The runner of the dashboard's benchmarks."""
        if self._benchmarks is None:
            raise RuntimeError("the router is not running")
        return self._benchmarks

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
        config = self.config
        target = StoreTarget.parse(config.store, config.data_path)
        state = RouterState(
            registry=NodeRegistry(
                heartbeat_timeout=config.heartbeat_timeout,
                heartbeat_offline=config.heartbeat_offline,
                forget_after=config.forget_after,
            ),
            settings=await self._start_settings(target),
        )
        async with (
            upstream_client() as client,
            open_events(target) as events,
            contextlib.AsyncExitStack() as resources,
            trio.open_nursery() as nursery,
        ):
            link = Link(state, client, config)
            self._state, self._link = state, link
            link.pulls = PullService(link)
            await nursery.start(link.pulls.run)
            store = self._store = TraceWriter(target)
            await nursery.start(store.run)
            state.trace_sink = store.submit
            await nursery.start(state.timeline.run, state, events)
            benchmarks = self._benchmarks = BenchmarkRunner(link, store)
            await nursery.start(benchmarks.run)
            for node_id, model, latency, rate in await trio.to_thread.run_sync(
                recent_latencies, store.target
            ):
                state.history.record(node_id, model, latency, rate)
            if config.state:
                # Several routers, one fleet: slots, load, affinity, history and settings are
                # shared through the store (its recent samples join the history just read).
                shared = await resources.enter_async_context(
                    SharedState.open(config.state, state, ttl=config.state_lease_ttl)
                )
                await nursery.start(shared.run)
                state.shared = shared
                state.queues.gate = shared
            limits = ConnectionLimits(
                max_per_client=config.max_connections_per_client,
                idle_timeout=config.idle_timeout,
                max_total=config.max_connections,
            )
            doors = self.doors = Doorkeeper.for_limits(limits)
            app = FrontGuard(
                ApiKeyGate(
                    config.api_keys,
                    FinishResponses(ProxyASGI(link, create_app(link, store, benchmarks))),
                ),
                Origins(config.origins),
                in_reserve=doors.in_reserve,
            )
            state.warnings = exposure_warnings(config)
            for warning in state.warnings:
                log.warning("!" * 78 + "\n  %s\n" + "!" * 78, warning)
            # A client that half-closes after its request still reads its answer (an end of
            # file is not a disconnect there; a failed send or a reset is).
            self._url = await nursery.start(
                partial(serve_app, answer_half_closed=True, doors=doors),
                app,
                config.host,
                config.port,
                limits,
            )
            benchmarks.url = self._url  # it measures through the router itself
            if config.mdns:
                port = int(self._url.rsplit(":", 1)[1])
                await nursery.start(advertise, config.host, port)
            nursery.start_soon(upkeep.monitor, state)
            nursery.start_soon(upkeep.reaper, state)
            send, receive = trio.open_memory_channel[tuple[str, str]](PREWARM_BUFFER)
            link.prewarm_send = send
            nursery.start_soon(prewarmer, link, receive)
            if self.local_node is not None:
                await nursery.start(self._run_local_node, self.local_node)
            log.info("router listening on %s", self._url)
            log.info("dashboard: %s/dashboard", self._url)
            task_status.started(self._url)

    async def _start_settings(self, target: StoreTarget) -> RuntimeSettings:
        """The embedding program's settings, then the saved ones (the settings file, or the
        PostgreSQL store's copy: :mod:`herd.http.saved_settings`), then the flags that set a
        runtime setting (they beat what was saved: an operator who starts with
        ``--auto-pull`` means it)."""
        settings = await saved_settings.load(self.config.data_path, target, self.settings)
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

    async def _run_local_node(
        self,
        node_config: NodeConfig,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        from herd.node.service import Node

        config = attrs.evolve(node_config, router_url=self.url)
        await Node(config, serve_http=False).run(task_status=task_status)
