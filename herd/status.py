"""``herd status``: a terminal summary of ``/fleet/status``.

Each node's line carries its state in brackets, with the words ``draining`` (it is stopping and
takes no new work) and ``paused`` (its owner ran ``herd node pause``) when they apply. A node
with an accelerator gets a line per device (memory free, utilisation, temperature), and a loaded
model partly outside it says ``SPILLED``, with its share on the CPU.
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
        for gpu in node.get("gpus", []):
            total, used = gpu.get("memory_total_bytes") or 0, gpu.get("memory_used_bytes") or 0
            extra = ""
            if gpu.get("utilization_percent") is not None:
                extra += f"  util {gpu['utilization_percent']:.0f}%"
            if gpu.get("temperature_c") is not None:
                extra += f"  {gpu['temperature_c']:.0f}°C"
            label = "working set" if gpu.get("unified") else "VRAM"
            lines.append(
                f"    gpu{gpu.get('index', 0)} {gpu.get('name', '?')}  {label} "
                f"{_gib(total - used)}/{_gib(total)} GiB free{extra}"
            )
        loaded = {m["name"]: m for m in node.get("models_loaded", [])}
        for name, model in loaded.items():
            spill = ""
            if model.get("spilled"):
                spill = f"  SPILLED: {model.get('offload', 0):.0%} on the CPU"
            lines.append(
                f"    hot   {name}  ctx {model.get('context_length', 0)}  "
                f"{_gib(model.get('size_bytes'))} GiB{spill}"
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
