"""Model mix recommendations per node, from the curated table in ``herd/data/models.json``.

Pure: given the fleet, the table (read by the caller, see
:func:`herd.http.dashboard.api.catalog`) and how much each model family was used, pick for each
node the best size of each family that fits its memory budget, ranked by use in this fleet
first, then by the table's order (roughly: most useful first). Every node also gets an
embedding model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from herd.core.models import FleetSnapshot, NodeStatus

GiB = 2**30
MEMORY_SHARE = 0.75  # of a node's total memory, the rest is for the OS and the KV cache
PER_NODE = 6


def family_of(model: str) -> str:
    return model.split(":", 1)[0]


def recommend(
    fleet: FleetSnapshot, usage: Mapping[str, int], catalog: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """``usage``: requests per model name over the recent window; ``catalog``: the table's
    ``models`` entries, most useful first."""
    family_use: dict[str, int] = {}
    for model, count in usage.items():
        family_use[family_of(model)] = family_use.get(family_of(model), 0) + count
    out = []
    for node in fleet.nodes:
        if node.status is NodeStatus.OFFLINE:
            continue
        total = node.report.memory.total_bytes
        budget_gb = total * MEMORY_SHARE / GiB
        installed = {m.name for m in node.report.available_models}
        picks: list[dict[str, Any]] = []
        for order, entry in enumerate(catalog):
            fitting = [s for s in entry["sizes"] if s["memory_gb"] <= budget_gb]
            if not fitting:
                continue
            size = max(fitting, key=lambda s: s["params_b"])
            name = f"{entry['family']}:{size['tag']}"
            used = family_use.get(entry["family"], 0)
            reason = (
                f"used {used}x in this fleet recently"
                if used
                else f"the largest {entry['family']} that fits {budget_gb:.0f} GiB"
            )
            picks.append(
                {
                    "model": name,
                    "family": entry["family"],
                    "category": entry["category"],
                    "memory_gb": size["memory_gb"],
                    "strengths": entry["strengths"],
                    "installed": name in installed,
                    "reason": reason,
                    "_rank": (-used, order),
                }
            )
        picks.sort(key=lambda p: p["_rank"])
        chosen = [p for p in picks if p["category"] != "embedding"][: PER_NODE - 1]
        embedding = next((p for p in picks if p["category"] == "embedding"), None)
        if embedding is not None:
            chosen.append(embedding)
        for pick in chosen:
            del pick["_rank"]
        out.append(
            {
                "node_id": node.node_id,
                "memory_gb": round(total / GiB, 1),
                "budget_gb": round(budget_gb, 1),
                "recommended": chosen,
            }
        )
    return out
