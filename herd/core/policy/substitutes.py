"""Which loaded models could stand in for a requested one (VRAM-aware fallback, context
upgrades): same category only, closest in size first."""

from __future__ import annotations

from herd.core.models import FleetSnapshot, NodeStatus
from herd.core.policy.models import can_serve, capabilities, category, parameter_billions


def loaded_alternatives(
    fleet: FleetSnapshot,
    model: str,
    *,
    min_context: int = 0,
    include_self: bool = False,
    needs: frozenset[str] = frozenset(),
    prefer_tools: bool = False,
) -> list[str]:
    """Models loaded on some reachable node, of ``model``'s category, able to do what the
    request ``needs`` (images need vision), with at least ``min_context`` tokens of loaded
    context; tool-capable ones first if ``prefer_tools``, then the closest in parameter count
    first."""
    knower = next((n for n in fleet.nodes if n.has_model(model)), None)
    if knower is None:
        return []
    wanted = category(knower, model)
    size = parameter_billions(knower, model)
    found: dict[str, tuple[bool, float]] = {}
    for node in fleet.nodes:
        if node.status is NodeStatus.OFFLINE or node.report.draining:
            continue
        for loaded in node.report.loaded_models:
            if loaded.name == model and not include_self:
                continue
            if loaded.context_length < min_context or category(node, loaded.name) != wanted:
                continue
            if not can_serve(node, loaded.name, needs):
                continue
            lacks_tools = prefer_tools and "tools" not in capabilities(node, loaded.name)
            distance = abs(parameter_billions(node, loaded.name) - size)
            found.setdefault(loaded.name, (lacks_tools, distance))
    return sorted(found, key=lambda name: (found[name], name))
