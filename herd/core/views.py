"""JSON views of the fleet: ``/fleet/status``, ``/api/tags``, ``/api/ps``, ``/v1/models``.

Pure functions of a :class:`FleetSnapshot` and queue statistics, so they are tested without a
server and the dashboard (later) shows exactly what the API shows.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from herd.core import memory
from herd.core.models import (
    AvailableModel,
    FleetSnapshot,
    LoadedModel,
    NodeReport,
    NodeSnapshot,
    NodeStatus,
    QueueStatistics,
)
from herd.core.wire import unstructure


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat().replace("+00:00", "Z")


def node_view(node: NodeSnapshot, now: float) -> dict[str, Any]:
    """One node as ``/fleet/status`` lists it. ``accelerator`` is the memory models run in
    there (:mod:`herd.core.memory`: ``ram``, ``vram`` or ``unified``), ``gpus`` its devices
    as read, and each loaded model's ``offload`` the share of it outside the accelerator
    (``spilled`` from 1%)."""
    report = node.report
    where = report.memory_where
    data: dict[str, Any] = {
        "node_id": node.node_id,
        "status": node.status.value,
        "last_seen_seconds_ago": round(max(0.0, now - node.last_seen), 3),
        "host": report.host,
        "agent_version": report.agent_version,
        "draining": report.draining,
        "backend": unstructure(report.backend),
        "cpu": unstructure(report.cpu),
        "memory": unstructure(report.memory),
        "disk": unstructure(report.disk),
        "gpus": unstructure(report.gpus[: memory.MAX_DEVICES]),
        "accelerator": {
            "kind": where.kind,
            "total_bytes": where.total,
            "free_bytes": where.free,
            "models_bytes": where.held,
        },
        "models_loaded": [_loaded_view(report, m) for m in report.loaded_models],
        "models_available": [unstructure(m) for m in report.available_models],
        "capabilities": unstructure(report.capabilities),
        "capacity": unstructure(report.capacity),
        "parallel_slots": report.parallel_slots,
        "requests_in_flight": node.in_flight,
        "requests_pending": node.pending,
    }
    return data


def _loaded_view(report: NodeReport, model: LoadedModel) -> dict[str, Any]:
    share = memory.offload(report, model)
    return {
        "name": model.name,
        "size_bytes": model.size_bytes,
        "vram_bytes": model.vram_bytes,
        "offload": round(share, 4),
        "spilled": share >= memory.SPILL_SHARE,
        "context_length": model.context_length,
        "expires_at": _iso(model.expires_at),
    }


def fleet_status(
    snapshot: FleetSnapshot,
    queues: QueueStatistics,
    now: float,
    events: dict[str, int] | None = None,
    pulls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    online = [n for n in snapshot.nodes if n.status is not NodeStatus.OFFLINE]
    return {
        "fleet": {
            "nodes_total": len(snapshot.nodes),
            "nodes_online": sum(1 for n in snapshot.nodes if n.status is NodeStatus.ONLINE),
            "nodes_degraded": sum(1 for n in snapshot.nodes if n.status is NodeStatus.DEGRADED),
            "models_loaded": sum(len(n.report.loaded_models) for n in online),
            "models_spilled": sum(len(memory.spilled(n.report)) for n in online),
            "requests_active": queues.pending + queues.in_flight,
            "requests_pending": queues.pending,
            "requests_in_flight": queues.in_flight,
        },
        "nodes": [node_view(n, now) for n in snapshot.nodes],
        "queues": queues.queues,
        # What resilience has done since the router started (retries, fallbacks, context
        # protection, auto-pulls, reaped requests, pre-warms, ...).
        "events": dict(sorted((events or {}).items())),
        # The router's own pulls (auto-pull), running then recently finished, with progress.
        "pulls": pulls or [],
    }


# What /api/ps says for a model kept loaded for ever (Ollama prints a date ~290 years out).
FOREVER = "2318-01-01T00:00:00Z"


def _details(
    family: str, parameter_size: str, quantization: str, parent_model: str = ""
) -> dict[str, Any]:
    return {
        "parent_model": parent_model,
        "format": "gguf",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": parameter_size,
        "quantization_level": quantization,
    }


def _model_details(model: AvailableModel | None) -> dict[str, Any]:
    if model is None:
        return _details("", "", "")
    return _details(model.family, model.parameter_size, model.quantization, model.parent_model)


def routable(snapshot: FleetSnapshot) -> list[NodeSnapshot]:
    return [n for n in snapshot.nodes if n.status is not NodeStatus.OFFLINE]


Virtual = list[tuple[str, tuple[str, ...]]]  # (name or pattern, candidates), policy.virtual


def tags(snapshot: FleetSnapshot, virtual: Virtual | None = None) -> dict[str, Any]:
    """Union of every routable node's models; each entry lists the nodes that have it and the
    capabilities any of them reports (an older Ollama reports none). Then the virtual names
    (``virtual: true``, ``candidates``), after the real ones."""
    entries: dict[str, dict[str, Any]] = {}
    for node in routable(snapshot):
        for model in node.report.available_models:
            entry = entries.get(model.name)
            if entry is None:
                entry = entries[model.name] = {
                    "name": model.name,
                    "model": model.name,
                    "modified_at": model.modified_at or None,
                    "size": model.size_bytes,
                    "digest": model.digest,
                    "details": _model_details(model),
                    "capabilities": [],
                    "nodes": [],
                }
            entry["nodes"].append(node.node_id)
            shown = entry["capabilities"]  # every node's, as /v1/models, in the order first seen
            shown.extend(c for c in model.capabilities if c not in shown)
    models = sorted(entries.values(), key=lambda e: str(e["name"]))
    for name, candidates in virtual or []:
        if name not in entries:
            models.append(
                {
                    "name": name,
                    "model": name,
                    "modified_at": None,
                    "size": 0,
                    "digest": "",
                    "details": _details("virtual", "", ""),
                    "nodes": [],
                    "virtual": True,
                    "candidates": list(candidates),
                }
            )
    return {"models": models}


def ps(snapshot: FleetSnapshot) -> dict[str, Any]:
    """Every model loaded on a routable node, one entry per model as Ollama lists it. A model
    loaded on several nodes is one entry: its fields are those of the copy that stays loaded
    longest (``node`` names it), and ``nodes`` lists every node's copy with its own size, VRAM,
    context and expiry. ``expires_at`` is always a time (:data:`FOREVER` for "never")."""
    entries: dict[str, dict[str, Any]] = {}
    for node in routable(snapshot):
        for loaded in node.report.loaded_models:
            available = node.available(loaded.name)
            expires = _iso(loaded.expires_at) or FOREVER
            copy = {
                "node": node.node_id,
                "size": loaded.size_bytes,
                "size_vram": loaded.vram_bytes,
                "context_length": loaded.context_length,
                "expires_at": expires,
            }
            entry = entries.get(loaded.name)
            if entry is None:
                entries[loaded.name] = {
                    "name": loaded.name,
                    "model": loaded.name,
                    **copy,
                    "digest": available.digest if available else "",
                    "details": _model_details(available),
                    "nodes": [copy],
                }
                continue
            entry["nodes"].append(copy)
            if expires > entry["expires_at"]:  # ISO 8601 in UTC sorts as text
                entry.update(copy)
    return {"models": sorted(entries.values(), key=lambda e: str(e["name"]))}


def model_names(snapshot: FleetSnapshot) -> list[str]:
    names = {m.name for n in routable(snapshot) for m in n.report.available_models}
    names |= {m.name for n in routable(snapshot) for m in n.report.loaded_models}
    return sorted(names)


def openai_model(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "herd"}


def openai_models(
    snapshot: FleetSnapshot, created: int, virtual: Virtual | None = None
) -> dict[str, Any]:
    names = model_names(snapshot)
    capabilities: dict[str, set[str]] = {}
    for node in routable(snapshot):
        for model in node.report.available_models:
            capabilities.setdefault(model.name, set()).update(model.capabilities)
    data = [
        {**openai_model(n, created), "capabilities": sorted(capabilities.get(n, ()))} for n in names
    ]
    data += [
        {**openai_model(name, created), "virtual": True, "candidates": list(candidates)}
        for name, candidates in virtual or []
        if name not in names
    ]
    return {"object": "list", "data": data}
