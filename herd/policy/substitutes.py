"""Which loaded models could stand in for a requested one (VRAM-aware fallback, context
upgrades): same category only, closest in size first."""

from __future__ import annotations

from herd.models import FleetSnapshot, NodeStatus
from herd.policy.models import category, parameter_billions


def loaded_alternatives(
    fleet: FleetSnapshot, model: str, *, min_context: int = 0, include_self: bool = False
) -> list[str]:
    """Models loaded on some reachable node, of ``model``'s category, with at least
    ``min_context`` tokens of loaded context; the closest in parameter count first."""
    knower = next((n for n in fleet.nodes if n.has_model(model)), None)
    if knower is None:
        return []
    wanted = category(knower, model)
    size = parameter_billions(knower, model)
    found: dict[str, float] = {}
    for node in fleet.nodes:
        if node.status is NodeStatus.OFFLINE or node.report.draining:
            continue
        for loaded in node.report.loaded_models:
            if loaded.name == model and not include_self:
                continue
            if loaded.context_length < min_context or category(node, loaded.name) != wanted:
                continue
            found.setdefault(loaded.name, abs(parameter_billions(node, loaded.name) - size))
    return sorted(found, key=lambda name: (found[name], name))
