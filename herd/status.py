"""``herd status``: a terminal summary of ``/fleet/status``.

Each node's line carries its state in brackets, with the words ``draining`` (it is stopping and
takes no new work) and ``paused`` (its owner ran ``herd node pause``) when they apply.
"""

from __future__ import annotations

from typing import Any

GiB = 2**30


def _gib(value: Any) -> str:
    return f"{(value or 0) / GiB:.1f}"


def render_status(data: dict[str, Any]) -> str:
    fleet = data.get("fleet", {})
    lines = [
        f"fleet: {fleet.get('nodes_online', 0)}/{fleet.get('nodes_total', 0)} nodes online, "
        f"{fleet.get('models_loaded', 0)} models loaded, "
        f"{fleet.get('requests_active', 0)} requests active",
        "",
    ]
    nodes = data.get("nodes", [])
    if not nodes:
        lines.append(
            "no nodes yet: run `herd-node --router-url http://THIS-HOST:11435` "
            "on each machine with Ollama"
        )
    for node in nodes:
        memory = node.get("memory", {})
        backend = node.get("backend", {})
        flags = " draining" if node.get("draining") else ""
        if (node.get("capacity") or {}).get("paused"):
            flags += " paused"
        health = "ok" if backend.get("healthy") else f"DOWN ({backend.get('error', '')})"
        lines.append(
            f"{node.get('node_id')}  [{node.get('status')}{flags}]  "
            f"cpu {node.get('cpu', {}).get('percent', 0):.0f}%  "
            f"mem {_gib(memory.get('available_bytes'))}/{_gib(memory.get('total_bytes'))} GiB free"
            f"  backend {backend.get('kind', '?')} {backend.get('version', '')} {health}"
        )
        loaded = {m["name"]: m for m in node.get("models_loaded", [])}
        for name, model in loaded.items():
            lines.append(
                f"    hot   {name}  ctx {model.get('context_length', 0)}  "
                f"{_gib(model.get('size_bytes'))} GiB"
            )
        for model in node.get("models_available", []):
            if model["name"] not in loaded:
                lines.append(f"    cold  {model['name']}")
    queues = data.get("queues", {})
    if queues:
        lines += ["", "queues (node:model  pending/in-flight/done/failed):"]
        for key, q in sorted(queues.items()):
            lines.append(
                f"    [{str(q.get('kind', 'text')).upper()}] {key}  {q.get('pending', 0)}/"
                f"{q.get('in_flight', 0)}/{q.get('done', 0)}/{q.get('failed', 0)}"
            )
    events = {k: v for k, v in data.get("events", {}).items() if v}
    if events:
        lines += ["", "events: " + ", ".join(f"{k} {v}" for k, v in events.items())]
    return "\n".join(lines)
