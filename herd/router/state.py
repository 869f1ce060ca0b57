"""The router's live state, shared by the HTTP handlers, the fleet socket and the monitor.

One object, owned by :class:`herd.router.service.Router`: the node registry, the queue book, the
latency history, recent traces (bounded), the upstream HTTP client and the fleet-change event
that wakes requests waiting for a node.
"""

from __future__ import annotations

import random
from collections import deque

import attrs
import httpx
import trio

from herd.config import RouterConfig
from herd.models import FleetSnapshot
from herd.router.history import LatencyHistory
from herd.router.queues import QueueBook
from herd.router.registry import NodeRegistry, StateChange
from herd.router.traces import TraceRecord
from herd.scoring import ScoringSettings

TRACE_MEMORY = 1000


@attrs.frozen
class RequestStatistics:
    requests_total: int
    retries_total: int
    fallbacks_total: int
    client_disconnects: int
    incomplete: int
    failed: int


@attrs.define(eq=False)
class RouterState:
    config: RouterConfig
    client: httpx.AsyncClient
    registry: NodeRegistry
    queues: QueueBook = attrs.field(factory=QueueBook)
    history: LatencyHistory = attrs.field(factory=LatencyHistory)
    scoring: ScoringSettings = attrs.field(factory=ScoringSettings)
    rng: random.Random = attrs.field(factory=random.Random)
    traces: deque[TraceRecord] = attrs.field(factory=lambda: deque(maxlen=TRACE_MEMORY))
    requests_total: int = 0
    retries_total: int = 0
    fallbacks_total: int = 0
    _fleet_changed: trio.Event = attrs.field(factory=trio.Event)

    @classmethod
    def create(cls, config: RouterConfig, client: httpx.AsyncClient) -> RouterState:
        return cls(
            config=config,
            client=client,
            registry=NodeRegistry(
                heartbeat_timeout=config.heartbeat_timeout,
                heartbeat_offline=config.heartbeat_offline,
            ),
        )

    def snapshot(self) -> FleetSnapshot:
        return self.registry.snapshot(self.queues.load_for)

    def fleet_changed(self, changes: list[StateChange] | None = None) -> None:
        """Wake everything waiting for the fleet to change (a node joined, left, reported)."""
        self._fleet_changed.set()
        self._fleet_changed = trio.Event()

    async def wait_fleet_changed(self) -> None:
        await self._fleet_changed.wait()

    def record_trace(self, trace: TraceRecord) -> None:
        self.traces.append(trace)

    def statistics(self) -> RequestStatistics:
        statuses = [t.status for t in self.traces]
        return RequestStatistics(
            requests_total=self.requests_total,
            retries_total=self.retries_total,
            fallbacks_total=self.fallbacks_total,
            client_disconnects=statuses.count("client_disconnected"),
            incomplete=statuses.count("incomplete"),
            failed=statuses.count("failed"),
        )
