"""The router's event log: what happened to the fleet and when (the dashboard's timeline).

Theory of operation. :meth:`EventLog.record` is synchronous and never blocks: the event goes
into a ring in memory (the last :data:`RING` events, for the live views) and onto a bounded
channel (:data:`QUEUE`); when the channel is full the event stays in the ring only, and is
counted as ``dropped``. One task hands what has queued up, in batches, to the router's
:class:`EventStore` (the trace database's ``fleet_events`` table, written in a worker thread
through its own connection: :class:`herd.store.events.StoreEvents`, which keeps at most
:data:`herd.store.db.MAX_EVENTS` rows), and prunes what is older than ``retention_days``
hourly. A write that fails loses that batch (counted as ``failed``, logged once a minute): no
request ever waits on it.

A second task looks at the registry after each fleet change (at most twice every
:data:`WATCH_GAP` seconds) and records what :func:`herd.core.timeline.diff` finds: nodes
degrading, models loading and leaving, drains, pauses, backends going down. Everything else
is recorded where it happens (the fleet socket, the pull service, the dashboard's settings and
benchmarks).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import attrs
import trio

from herd.core.timeline import FleetEvent, NodeFacts, diff
from herd.state.registry import NodeRecord

if TYPE_CHECKING:
    from herd.state.state import RouterState

log = logging.getLogger("herd.store")


class EventStore(Protocol):
    """Where the events go beyond memory. Each call may fail with any exception (the batch is
    then lost, counted and logged)."""

    async def write(self, batch: Sequence[FleetEvent]) -> None: ...

    async def prune(self, before: float) -> None:
        """Drop the events older than ``before`` (wall clock)."""


RING = 1000
QUEUE = 1000
BATCH_MAX = 200
WATCH_GAP = 0.5
PRUNE_EVERY = 3600.0
FLUSH_TIMEOUT = 2.0
SHUTDOWN_TIMEOUT = 2.0
LOG_EVERY = 60.0


def node_facts(record: NodeRecord) -> NodeFacts:
    report = record.report
    return NodeFacts(
        status=record.status.value,
        connected=record.connected,
        draining=report.draining,
        paused=report.capacity.paused,
        backend_healthy=report.backend.healthy,
        backend_error=report.backend.error or "",
        loaded=frozenset(m.name for m in report.loaded_models),
    )


@attrs.frozen
class EventLogStatistics:
    recorded: int
    written: int
    dropped: int  # the queue was full: kept in memory only
    failed: int  # the write failed
    last_error: str | None


@attrs.define(eq=False)
class EventLog:
    retention_days: float = 30.0
    ring: deque[FleetEvent] = attrs.field(factory=lambda: deque(maxlen=RING))
    recorded: int = 0
    written: int = 0
    dropped: int = 0
    failed: int = 0
    last_error: str | None = None
    _send: trio.MemorySendChannel[FleetEvent] | None = None
    _progress: trio.Event = attrs.field(factory=trio.Event)
    _logged_at: float = -1e18
    # Each node's facts when its socket joined, until the watcher next looks: later changes
    # are compared with these (a node that loads a model a moment after joining shows it).
    _joined: dict[str, NodeFacts] = attrs.field(factory=dict)

    def record(
        self, kind: str, node_id: str | None = None, model: str | None = None, detail: str = ""
    ) -> FleetEvent:
        """Record an event now (wall clock). Never blocks."""
        event = FleetEvent(time.time(), kind, node_id, model, detail[:500])
        self._add(event)
        return event

    def add(self, event: FleetEvent) -> None:
        """Record an event that carries its own time (an import, a test's history)."""
        self._add(event)

    def _add(self, event: FleetEvent) -> None:
        self.ring.append(event)
        self.recorded += 1
        if self._send is None:
            return
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.dropped += 1

    def joined(self, record: NodeRecord) -> None:
        """A node's socket joined with this first report (the fleet socket calls this)."""
        if len(self._joined) < 10_000:  # bounded, whatever happens to the watcher
            self._joined[record.report.node_id] = node_facts(record)

    def recent(self, since: float = 0.0) -> list[FleetEvent]:
        """The events in memory at or after ``since`` (wall clock), oldest first."""
        return [e for e in self.ring if e.timestamp >= since]

    def statistics(self) -> EventLogStatistics:
        return EventLogStatistics(
            self.recorded, self.written, self.dropped, self.failed, self.last_error
        )

    async def flush(self) -> None:
        """Wait (at most :data:`FLUSH_TIMEOUT`) until what was recorded so far is written or
        has failed."""
        target = self.recorded - self.dropped
        with trio.move_on_after(FLUSH_TIMEOUT):
            while self.written + self.failed < target and self._send is not None:
                await self._progress.wait()

    async def run(
        self,
        state: RouterState,
        store: EventStore,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Hand events to ``store`` and watch the fleet until cancelled (the router's nursery
        runs this)."""
        # What was recorded before the writer started is in the ring: write it too (what no
        # longer is, counted as dropped).
        early = list(self.ring)
        self.dropped += self.recorded - self.dropped - self.written - self.failed - len(early)
        send, receive = trio.open_memory_channel[FleetEvent](QUEUE)
        self._send = send
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, state)
                nursery.start_soon(self._prune_loop, store)
                task_status.started()
                if early:
                    await self._write(store, early)
                await self._write_loop(store, receive)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_TIMEOUT):
                rest = []
                while True:
                    try:
                        rest.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                if rest:
                    await self._write(store, rest)
            self._send = None
            self._wake()

    def _wake(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _write_loop(
        self, store: EventStore, receive: trio.MemoryReceiveChannel[FleetEvent]
    ) -> None:
        async for first in receive:
            batch = [first]
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            await self._write(store, batch)

    async def _write(self, store: EventStore, batch: list[FleetEvent]) -> None:
        try:
            await store.write(batch)
        except Exception as exc:  # any failure loses this batch, never the router
            self.failed += len(batch)
            self._failure(f"could not write {len(batch)} fleet events: {exc}")
        else:
            self.written += len(batch)
            self.last_error = None
        self._wake()

    def _failure(self, message: str) -> None:
        self.last_error = message
        now = trio.current_time()
        if now - self._logged_at >= LOG_EVERY:
            log.error("%s; routing goes on, the timeline misses them", message)
            self._logged_at = now

    async def _prune_loop(self, store: EventStore) -> None:
        while True:
            try:
                await store.prune(time.time() - self.retention_days * 86400)
            except Exception as exc:  # tried again in an hour
                self._failure(f"could not prune old fleet events: {exc}")
            await trio.sleep(PRUNE_EVERY)

    async def _watch(self, state: RouterState) -> None:
        """Record what changed in the registry: at once after a fleet change, then once more
        :data:`WATCH_GAP` later for what changed meanwhile (a busy fleet changes many times a
        second: this looks twice per gap at most)."""
        before = {r.report.node_id: node_facts(r) for r in state.registry.records()}

        def look() -> None:
            nonlocal before
            after = {r.report.node_id: node_facts(r) for r in state.registry.records()}
            before.update(self._joined)
            self._joined.clear()
            for event in diff(before, after, time.time()):
                self._add(event)
            before = after

        while True:
            await state.wait_fleet_changed()
            look()
            await trio.sleep(WATCH_GAP)
            look()
