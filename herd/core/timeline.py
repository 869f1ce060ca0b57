"""The fleet's events, as the dashboard's timeline shows them: what happened to nodes, models,
pulls, settings and benchmarks, and when.

Pure: values and one comparison. :class:`herd.state.events.EventLog` records them (a bounded
ring in memory, a bounded table on disk) and feeds :func:`diff` what the registry holds.

Where each kind comes from:

- ``node_joined`` / ``node_left``: the node's socket opened (its first heartbeat was admitted)
  or closed — recorded by the fleet socket at that moment, so a quick reconnect shows as both.
- ``node_degraded`` / ``node_offline`` / ``node_recovered``: the registry's ageing (silence
  past ``heartbeat_timeout`` / ``heartbeat_offline``, a heartbeat again), and
  ``node_forgotten``; ``backend_down`` / ``backend_up``; ``model_loaded`` /
  ``model_evicted`` (a model entering or leaving a node's memory); ``drain_started`` /
  ``drain_stopped``; ``node_paused`` / ``node_resumed`` (adaptive capacity): found by
  :func:`diff` between two looks at the registry, so they have heartbeat resolution — a model
  loaded and evicted between two heartbeats is never seen, by the router either.
- ``node_drained`` (nothing of a draining node left in flight), ``pull_*``,
  ``model_deleted``, ``settings_changed``, ``benchmark_*``: recorded where they happen.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

CATEGORIES: Mapping[str, str] = {
    "node_joined": "node",
    "node_left": "node",
    "node_degraded": "node",
    "node_offline": "node",
    "node_recovered": "node",
    "node_forgotten": "node",
    "backend_down": "node",
    "backend_up": "node",
    "model_loaded": "model",
    "model_evicted": "model",
    "model_deleted": "model",
    "drain_started": "drain",
    "drain_stopped": "drain",
    "node_drained": "drain",
    "node_paused": "drain",
    "node_resumed": "drain",
    "pull_started": "pull",
    "pull_done": "pull",
    "pull_failed": "pull",
    "pull_cancelled": "pull",
    "settings_changed": "settings",
    "benchmark_started": "benchmark",
    "benchmark_finished": "benchmark",
}
MAX_DETAIL = 500


@attrs.frozen
class FleetEvent:
    timestamp: float  # wall clock, epoch seconds
    kind: str  # a key of CATEGORIES
    node_id: str | None = None
    model: str | None = None
    detail: str = ""

    @property
    def category(self) -> str:
        return CATEGORIES.get(self.kind, "other")

    def as_dict(self) -> dict[str, Any]:
        return {
            "timestamp": self.timestamp,
            "kind": self.kind,
            "category": self.category,
            "node_id": self.node_id,
            "model": self.model,
            "detail": self.detail,
        }


@attrs.frozen
class NodeFacts:
    """What :func:`diff` compares of one node."""

    status: str  # "online" | "degraded" | "offline"
    connected: bool  # its socket is open
    draining: bool = False
    paused: bool = False
    backend_healthy: bool = True
    backend_error: str = ""
    loaded: frozenset[str] = frozenset()


def diff(
    before: Mapping[str, NodeFacts], after: Mapping[str, NodeFacts], now: float
) -> list[FleetEvent]:
    """The events between two looks at the fleet, at wall time ``now``. A node new in
    ``after``, or back after its socket closed, is the fleet socket's ``node_joined`` (not
    repeated here); one whose socket closed is its ``node_left``. Raises nothing."""
    events: list[FleetEvent] = []

    def add(kind: str, node_id: str, model: str | None = None, detail: str = "") -> None:
        events.append(FleetEvent(now, kind, node_id, model, detail[:MAX_DETAIL]))

    for node_id, new in after.items():
        old = before.get(node_id)
        if old is None:
            continue  # joined: recorded by the socket
        rejoined = not old.connected and new.connected
        if new.status != old.status and new.connected and not rejoined:
            if new.status == "degraded":
                add("node_degraded", node_id, detail="no heartbeat for heartbeat_timeout")
            elif new.status == "offline":
                add("node_offline", node_id, detail="no heartbeat for heartbeat_offline")
            elif new.status == "online":
                add("node_recovered", node_id, detail=f"heartbeating again (was {old.status})")
        if old.backend_healthy and not new.backend_healthy:
            add("backend_down", node_id, detail=new.backend_error)
        elif new.backend_healthy and not old.backend_healthy:
            add("backend_up", node_id)
        for model in sorted(new.loaded - old.loaded):
            add("model_loaded", node_id, model)
        for model in sorted(old.loaded - new.loaded):
            add("model_evicted", node_id, model)
        if new.draining != old.draining:
            add("drain_started" if new.draining else "drain_stopped", node_id)
        if new.paused != old.paused:
            add("node_paused" if new.paused else "node_resumed", node_id)
    for node_id in before.keys() - after.keys():
        add("node_forgotten", node_id, detail="offline past forget_after")
    return events


def settings_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """``name: old → new`` for each setting that changed, joined; "" if none did."""
    changed = [
        f"{k}: {json.dumps(old.get(k))} → {json.dumps(v)}"
        for k, v in new.items()
        if old.get(k) != v
    ]
    return "; ".join(changed)[:MAX_DETAIL]
