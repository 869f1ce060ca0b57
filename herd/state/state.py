"""The router's live state, shared by the HTTP handlers, the fleet socket and the monitor.

One object, owned by :class:`herd.http.service.Router`: the node registry, the queue book, the
latency history, the affinity table, the runtime settings, recent traces (bounded), the
counters, and the fleet-change event that wakes requests waiting for a node. It holds no
client and no configuration: how to reach nodes is :class:`herd.transport.link.Link`'s, and
where traces go beyond memory is the ``trace_sink`` the router plugs in (its trace writer).

With a shared state store (``--state``), ``shared`` is the router's handle on it
(:class:`herd.state.sharing.SharedFleet`) and ``remote_load`` the other routers' counts, as
the store's load task last read them (about every 0.5 s, never on a request's path): the
scorer's view of a node:model is this router's own counts plus theirs.
"""

from __future__ import annotations

import collections
import random
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import trio

from herd.core import views
from herd.core.models import FleetSnapshot, ModelLoad
from herd.core.responses_store import ResponseStore
from herd.core.scoring import ScoringSettings
from herd.core.traces import TraceRecord
from herd.state.affinity import AffinityTable
from herd.state.events import EventLog
from herd.state.history import LatencyHistory
from herd.state.metrics import Metrics
from herd.state.queues import QueueBook
from herd.state.registry import NodeRegistry, StateChange
from herd.state.settings import RuntimeSettings
from herd.state.sharing import RemoteLoad, SharedFleet

TRACE_MEMORY = 1000


@attrs.frozen
class RequestStatistics:
    requests_total: int
    retries_total: int
    fallbacks_total: int
    client_disconnects: int
    incomplete: int
    failed: int
    events: dict[str, int]


@attrs.define(eq=False)
class RouterState:
    registry: NodeRegistry = attrs.field(factory=NodeRegistry)
    queues: QueueBook = attrs.field(factory=QueueBook)
    history: LatencyHistory = attrs.field(factory=LatencyHistory)
    affinity: AffinityTable = attrs.field(factory=AffinityTable)
    scoring: ScoringSettings = attrs.field(factory=ScoringSettings)
    rng: random.Random = attrs.field(factory=random.Random)
    traces: deque[TraceRecord] = attrs.field(factory=lambda: deque(maxlen=TRACE_MEMORY))
    settings: RuntimeSettings = attrs.field(factory=RuntimeSettings)
    requests_total: int = 0
    retries_total: int = 0
    fallbacks_total: int = 0
    # Named counters of resilience events: context_stripped, context_upgraded,
    # context_passthrough, vram_fallbacks, auto_pulls, reaped, prewarms, ...
    events: collections.Counter[str] = attrs.field(factory=collections.Counter)
    # Command channels to connected nodes (their WebSocket sessions), bounded.
    node_commands: dict[str, trio.MemorySendChannel[dict[str, object]]] = attrs.field(factory=dict)
    # Blob digest -> the node it was uploaded to (POST /api/blobs), so the /api/create that
    # uses it goes there; bounded, oldest first out.
    blob_nodes: collections.OrderedDict[str, str] = attrs.field(factory=collections.OrderedDict)
    # Where each finished request's trace goes besides memory and metrics (the trace writer's
    # submit: it must not block).
    trace_sink: Callable[[TraceRecord], None] | None = None
    metrics: Metrics = attrs.field(factory=Metrics)
    # What an operator must not miss (a router open to the LAN without a token or keys).
    warnings: list[str] = attrs.field(factory=list)
    # Inference requests in progress per client address (the per-client cap), only non-zero.
    in_progress_by_client: dict[str, int] = attrs.field(factory=dict)
    # Stored OpenAI Responses (previous_response_id, GET /v1/responses/{id}), bounded.
    responses: ResponseStore = attrs.field(factory=ResponseStore)
    # The fleet's events for the dashboard's timeline; written to the store while the router
    # runs (see herd.state.events).
    timeline: EventLog = attrs.field(factory=EventLog)
    # The shared state store (--state), and the other routers' load as last read from it.
    shared: SharedFleet | None = None
    _remote_load: dict[str, dict[str, tuple[int, int]]] = attrs.field(factory=dict)
    _remote_version: int = 0  # changes with _remote_load (node snapshots built on it go stale)
    _fleet_changed: trio.Event = attrs.field(factory=trio.Event)
    _settings_changed: trio.Event = attrs.field(factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        # A freed slot is a fleet change: requests waiting for capacity re-score.
        self.queues.on_release = self.fleet_changed

    def snapshot(self) -> FleetSnapshot:
        # A node's snapshot is rebuilt only when its record, its queues or the other routers'
        # load changed (see NodeRegistry.snapshot).
        if not self._remote_load:
            return self.registry.snapshot(self.queues.load_for, self.queues.versions.get)
        return self.registry.snapshot(self._load_with_others, self._load_key)

    def _load_key(self, node_id: str) -> tuple[int, int]:
        return self.queues.version(node_id), self._remote_version

    def _load_with_others(self, node_id: str) -> dict[str, ModelLoad]:
        """This router's counts on ``node_id`` plus the other routers' (see the docstring)."""
        loads = self.queues.load_for(node_id)
        for model, (in_flight, pending) in self._remote_load.get(node_id, {}).items():
            own = loads.get(model)
            if own is None:
                loads[model] = ModelLoad(pending=pending, in_flight=in_flight)
            else:
                loads[model] = attrs.evolve(
                    own, pending=own.pending + pending, in_flight=own.in_flight + in_flight
                )
        return loads

    def set_remote_load(self, load: RemoteLoad) -> None:
        """The other routers' counts, as just read from the store (empty: none, or the store
        is away and this router goes on its own counts)."""
        by_node: dict[str, dict[str, tuple[int, int]]] = {}
        for (node_id, model), counts in load.items():
            by_node.setdefault(node_id, {})[model] = counts
        if by_node != self._remote_load:
            self._remote_load = by_node
            self._remote_version += 1
            self.fleet_changed()  # capacity moved elsewhere: waiting requests re-score

    def remote_load(self) -> RemoteLoad:
        return {
            (node_id, model): counts
            for node_id, models in self._remote_load.items()
            for model, counts in models.items()
        }

    def fleet_changed(self, changes: list[StateChange] | None = None) -> None:
        """Wake everything waiting for the fleet to change (a node joined, left, reported)."""
        self._fleet_changed.set()
        self._fleet_changed = trio.Event()

    async def wait_fleet_changed(self) -> None:
        await self._fleet_changed.wait()

    def change_settings(self, settings: RuntimeSettings) -> None:
        """Apply new runtime settings (already checked) and wake whoever depends on them (the
        reaper's sampling interval, waiting requests). With a shared store, the other routers
        get them too."""
        self.adopt_settings(settings)
        if self.shared is not None:
            self.shared.settings_changed(settings)

    def adopt_settings(self, settings: RuntimeSettings) -> None:
        """Apply settings (already checked) without sharing them: another router's change."""
        self.settings = settings
        self._settings_changed.set()
        self._settings_changed = trio.Event()
        self.fleet_changed()

    async def wait_settings_changed(self) -> None:
        await self._settings_changed.wait()

    def command(self, node_id: str, message: dict[str, object]) -> bool:
        """Queue a command for a node's socket; False if it isn't connected or is backed up."""
        channel = self.node_commands.get(node_id)
        if channel is None:
            return False
        try:
            channel.send_nowait(message)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def record_trace(self, trace: TraceRecord) -> None:
        self.traces.append(trace)
        self.metrics.observe(trace, self.model_known)
        if self.trace_sink is not None:
            self.trace_sink(trace)

    def status_view(self, pulls: list[dict[str, Any]]) -> dict[str, Any]:
        """``/fleet/status``: the fleet, its queues, the event counters and ``pulls`` (the
        pull service's views)."""
        status = views.fleet_status(
            self.snapshot(), self.queues.statistics(), trio.current_time(), self.all_events(), pulls
        )
        status["warnings"] = list(self.warnings)
        status["state"] = (
            self.shared.view() if self.shared is not None else {"mode": "this router only"}
        )
        return status

    def model_known(self, model: str) -> bool:
        """Does any node (in any state) list ``model``?"""
        return any(
            model in r.report.loaded_index or model in r.report.available_index
            for r in self.registry.records()
        )

    def forget_nodes(self, now: float) -> list[str]:
        """Forget nodes offline past ``forget_after``, everywhere the router keeps them."""
        gone = self.registry.forget(now)
        for node_id in gone:
            self.queues.forget(node_id)
            self.history.forget(node_id)
            self.affinity.forget(node_id)
            self.metrics.forget(node_id)
        return gone

    def all_events(self) -> dict[str, int]:
        events = dict(self.events)
        events["retries"] = self.retries_total
        events["fallbacks"] = self.fallbacks_total
        return events

    def statistics(self) -> RequestStatistics:
        statuses = [t.status for t in self.traces]
        return RequestStatistics(
            requests_total=self.requests_total,
            retries_total=self.retries_total,
            fallbacks_total=self.fallbacks_total,
            client_disconnects=statuses.count("client_disconnected"),
            incomplete=statuses.count("incomplete"),
            failed=statuses.count("failed"),
            events=dict(self.events),
        )
