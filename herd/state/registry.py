"""The router's record of every node: the last heartbeat, when it came, and the state it implies.

Sans-IO: methods are synchronous, take ``now`` (router clock), and return what changed; the
WebSocket endpoint and the monitor loop in :mod:`herd.http.service` do the I/O and the waiting.

States:
    online    a heartbeat arrived within ``heartbeat_timeout``
    degraded  none for ``heartbeat_timeout`` (still routable, scored down)
    offline   none for ``heartbeat_offline``, or its WebSocket closed (not routable)
A heartbeat brings a node back online at once. A node offline for ``forget_after`` is
forgotten (:meth:`NodeRegistry.forget`): containers that come back under new host names don't
pile up. At most :data:`MAX_NODES` nodes are known at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable

import attrs

from herd.core.models import FleetSnapshot, ModelLoad, NodeReport, NodeSnapshot, NodeStatus

# How long a model that left memory stays "warm" in our books, for the scorer's thermal signal.
WARM_MEMORY_S = 3600.0


@attrs.frozen
class StateChange:
    node_id: str
    old: NodeStatus | None  # None: a node we had never seen
    new: NodeStatus


@attrs.define
class NodeRecord:
    report: NodeReport
    last_seen: float
    status: NodeStatus = NodeStatus.ONLINE
    connected: bool = True
    session: object | None = None  # the WebSocket session the heartbeats come on
    recently_unloaded: dict[str, float] = attrs.field(factory=dict)


@attrs.frozen
class _Kept:
    """A node's last snapshot and what it was built from (see :meth:`NodeRegistry.snapshot`)."""

    report: NodeReport
    status: NodeStatus
    last_seen: float
    key: Hashable
    snapshot: NodeSnapshot


@attrs.frozen
class Admission:
    """Whether a WebSocket session may speak for a node id (see :meth:`NodeRegistry.admit`)."""

    allowed: bool
    # An older session of the same node that is still open but has gone silent (offline):
    # the newcomer replaces it, and the caller should end it.
    stale: object | None = None


@attrs.frozen
class RegistryStatistics:
    nodes_total: int
    nodes_online: int
    nodes_degraded: int
    nodes_offline: int
    heartbeats: int


UNLOAD_MEMORY = 2000
MAX_NODES = 1000


@attrs.define(eq=False)
class NodeRegistry:
    heartbeat_timeout: float = 15.0
    heartbeat_offline: float = 30.0
    forget_after: float = 86400.0
    _nodes: dict[str, NodeRecord] = attrs.field(factory=dict)
    _heartbeats: int = 0
    # (router time, node, model) of each model seen leaving a node's memory, bounded.
    unloads: deque[tuple[float, str, str]] = attrs.field(
        factory=lambda: deque(maxlen=UNLOAD_MEMORY)
    )
    # Each node's last snapshot, kept while nothing it was built from changes.
    _kept: dict[str, _Kept] = attrs.field(factory=dict)

    def apply_report(
        self, report: NodeReport, now: float, session: object | None = None
    ) -> list[StateChange]:
        """Record a heartbeat. Returns the state change it caused, if any."""
        self._heartbeats += 1
        record = self._nodes.get(report.node_id)
        if record is None:
            self._nodes[report.node_id] = NodeRecord(report=report, last_seen=now, session=session)
            return [StateChange(report.node_id, None, NodeStatus.ONLINE)]
        record.session = session
        before = {m.name for m in record.report.loaded_models}
        after = {m.name for m in report.loaded_models}
        for gone in before - after:
            record.recently_unloaded[gone] = now
            self.unloads.append((now, report.node_id, gone))
        for back in after:
            record.recently_unloaded.pop(back, None)
        for name, when in list(record.recently_unloaded.items()):
            if now - when > WARM_MEMORY_S:
                del record.recently_unloaded[name]
        record.report = report
        record.last_seen = now
        record.connected = True
        old = record.status
        record.status = NodeStatus.ONLINE
        return [] if old is NodeStatus.ONLINE else [StateChange(report.node_id, old, record.status)]

    def full(self, node_id: str) -> bool:
        """Would a heartbeat from ``node_id`` exceed :data:`MAX_NODES`?"""
        return node_id not in self._nodes and len(self._nodes) >= MAX_NODES

    def forget(self, now: float) -> list[str]:
        """Drop nodes offline for ``forget_after`` or longer. Returns their ids (the caller
        drops what else it keeps of them)."""
        gone = [
            node_id
            for node_id, record in self._nodes.items()
            if record.status is NodeStatus.OFFLINE and now - record.last_seen >= self.forget_after
        ]
        for node_id in gone:
            del self._nodes[node_id]
        if gone:
            kept = set(self._nodes)
            self.unloads = deque(
                (entry for entry in self.unloads if entry[1] in kept), maxlen=UNLOAD_MEMORY
            )
        return gone

    def admit(self, node_id: str, session: object) -> Admission:
        """May ``session`` register as ``node_id``?

        Not while another session of that id is connected and not offline: a second socket
        can't take over a live node (by mistake, two machines with one name; or on purpose, a
        LAN peer after its traffic). A node whose socket closed, or that has been silent past
        ``heartbeat_offline`` (a half-open socket after a crash or a network cut), may rejoin
        at once: its old session, if still open, is returned as ``stale``."""
        record = self._nodes.get(node_id)
        if record is None or record.session is None or record.session is session:
            return Admission(allowed=True)
        if not record.connected:
            return Admission(allowed=True)
        if record.status is not NodeStatus.OFFLINE:
            return Admission(allowed=False)
        return Admission(allowed=True, stale=record.session)

    def disconnected(
        self, node_id: str, now: float, session: object | None = None
    ) -> list[StateChange]:
        """The node's WebSocket closed: it can't send heartbeats, so it is offline now.

        A close of an older session (the node has already reconnected) changes nothing."""
        record = self._nodes.get(node_id)
        if record is None or record.status is NodeStatus.OFFLINE or record.session is not session:
            return []
        record.connected = False
        old = record.status
        record.status = NodeStatus.OFFLINE
        return [StateChange(node_id, old, NodeStatus.OFFLINE)]

    def tick(self, now: float) -> list[StateChange]:
        """Age every node by its last heartbeat. Returns the transitions made."""
        changes = []
        for node_id, record in self._nodes.items():
            silent = now - record.last_seen
            if silent >= self.heartbeat_offline or not record.connected:
                new = NodeStatus.OFFLINE
            elif silent >= self.heartbeat_timeout:
                new = NodeStatus.DEGRADED
            else:
                new = NodeStatus.ONLINE
            if new is not record.status:
                changes.append(StateChange(node_id, record.status, new))
                record.status = new
        return changes

    def unload_counts(self, since: float) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for when, node_id, model in self.unloads:
            if when >= since:
                counts[(node_id, model)] = counts.get((node_id, model), 0) + 1
        return counts

    def next_deadline(self) -> float | None:
        """Router-clock time of the next possible state transition (for the monitor loop)."""
        deadlines = []
        for record in self._nodes.values():
            if record.status is NodeStatus.ONLINE:
                deadlines.append(record.last_seen + self.heartbeat_timeout)
            elif record.status is NodeStatus.DEGRADED:
                deadlines.append(record.last_seen + self.heartbeat_offline)
            else:
                deadlines.append(record.last_seen + self.forget_after)
        return min(deadlines) if deadlines else None

    def get(self, node_id: str) -> NodeRecord | None:
        return self._nodes.get(node_id)

    def records(self) -> list[NodeRecord]:
        return list(self._nodes.values())

    def snapshot(
        self,
        load_for: Callable[[str], dict[str, ModelLoad]],
        load_key: Callable[[str], Hashable] | None = None,
    ) -> FleetSnapshot:
        """The fleet as it is now, with each node's load from ``load_for``.

        With ``load_key`` (a value that changes whenever ``load_for(node)`` would answer
        differently: the queue book's version), a node's snapshot is kept and handed out again
        until its record (report, status, last heartbeat) or that key changes: a decision then
        rebuilds only the nodes that changed since the last one (a request changes one), not
        the whole fleet. Snapshots are frozen and shared; nobody may change their dicts."""
        if load_key is None:
            return FleetSnapshot(
                nodes=tuple(self._node_snapshot(r, load_for(i)) for i, r in self._nodes.items())
            )
        kept = self._kept
        nodes = []
        for node_id, record in self._nodes.items():
            key = load_key(node_id)
            entry = kept.get(node_id)
            if (
                entry is None
                or entry.report is not record.report
                or entry.status is not record.status
                or entry.last_seen != record.last_seen
                or entry.key != key
            ):
                entry = kept[node_id] = _Kept(
                    record.report,
                    record.status,
                    record.last_seen,
                    key,
                    self._node_snapshot(record, load_for(node_id)),
                )
            nodes.append(entry.snapshot)
        if len(kept) > len(self._nodes):
            for gone in [n for n in kept if n not in self._nodes]:
                del kept[gone]
        return FleetSnapshot(nodes=tuple(nodes))

    @staticmethod
    def _node_snapshot(record: NodeRecord, load: dict[str, ModelLoad]) -> NodeSnapshot:
        return NodeSnapshot(
            report=record.report,
            status=record.status,
            last_seen=record.last_seen,
            load=load,
            recently_unloaded=dict(record.recently_unloaded),
        )

    def statistics(self) -> RegistryStatistics:
        statuses = [r.status for r in self._nodes.values()]
        return RegistryStatistics(
            nodes_total=len(statuses),
            nodes_online=statuses.count(NodeStatus.ONLINE),
            nodes_degraded=statuses.count(NodeStatus.DEGRADED),
            nodes_offline=statuses.count(NodeStatus.OFFLINE),
            heartbeats=self._heartbeats,
        )
