"""The planner's inputs as values: the requests the trace store recorded and the nodes' last
reports, read by :mod:`herd.plan.sources` and used by :mod:`herd.plan.planner`. The errors of
the planner live here too, so every module of the package can raise them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from herd.core.models import KIND_TEXT, NodeReport


class PlanError(ValueError):
    """A plan can't be made as asked; the message names the offending value."""


class PlanAbandoned(Exception):
    """The plan was stopped before it finished (its time budget, or its client went away)."""


@attrs.frozen
class RecordedRequest:
    """One request as the trace store recorded it (the fields the planner reads)."""

    arrival: float  # wall clock, epoch seconds
    model: str  # what served (what was asked, when nothing served)
    kind: str = KIND_TEXT
    status: str = "completed"
    node_id: str | None = None
    latency: float = 0.0  # seconds, arrival to the last byte
    ttft: float | None = None  # seconds, arrival to the first byte
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    original_model: str = ""
    tags: tuple[str, ...] = ()
    thermal: float | None = None  # the winner's thermal points; None: no winner
    affinity: float = 0.0  # the winner's conversation-affinity points
    substitution: str | None = None

    @classmethod
    def from_trace(cls, row: Mapping[str, Any]) -> RecordedRequest:
        """From a ``request_traces`` row (``scores_breakdown`` and ``tags`` decoded)."""
        breakdown = row.get("scores_breakdown") or {}
        ttft = row.get("time_to_first_token_ms")
        thermal = breakdown.get("thermal")
        return cls(
            arrival=float(row["timestamp"]),
            model=str(row["model"]),
            kind=str(row.get("kind") or KIND_TEXT),
            status=str(row.get("status") or "completed"),
            node_id=row.get("node_id"),
            latency=max(0.0, float(row.get("latency_ms") or 0.0) / 1000),
            ttft=max(0.0, float(ttft) / 1000) if ttft is not None else None,
            prompt_tokens=row.get("prompt_tokens"),
            completion_tokens=row.get("completion_tokens"),
            original_model=str(row.get("original_model") or ""),
            tags=tuple(str(t) for t in row.get("tags") or ()),
            thermal=float(thermal) if isinstance(thermal, int | float) else None,
            affinity=float(breakdown.get("affinity") or 0.0),
            substitution=row.get("substitution"),
        )

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def failed(self) -> bool:
        return self.status in ("failed", "incomplete")


@attrs.frozen
class ModelFacts:
    """A model on a node, as its report lists it."""

    name: str
    size_bytes: int
    embedding: bool = False
    context_length: int = 0  # loaded window; 0 = not loaded, unknown
    family: str = ""
    parameter_size: str = ""


@attrs.frozen
class NodeFacts:
    """What the planner needs of one node's last report."""

    node_id: str
    memory_bytes: int
    slots: int
    models: tuple[ModelFacts, ...]
    loaded: tuple[str, ...] = ()
    online: bool = True

    @classmethod
    def from_report(cls, report: NodeReport, online: bool = True) -> NodeFacts:
        embed = set(report.capabilities.embed_models)
        contexts = {m.name: m.context_length for m in report.loaded_models}
        models: dict[str, ModelFacts] = {}
        for available in report.available_models:
            models[available.name] = ModelFacts(
                name=available.name,
                size_bytes=available.size_bytes,
                embedding=available.name in embed or _embedding_caps(available.capabilities),
                context_length=contexts.get(available.name, 0),
                family=available.family,
                parameter_size=available.parameter_size,
            )
        for loaded in report.loaded_models:
            models.setdefault(
                loaded.name,
                ModelFacts(
                    loaded.name, loaded.size_bytes, loaded.name in embed, loaded.context_length
                ),
            )
        return cls(
            node_id=report.node_id,
            memory_bytes=report.memory.total_bytes,
            slots=max(1, report.parallel_slots),
            models=tuple(models.values()),
            loaded=tuple(m.name for m in report.loaded_models),
            online=online,
        )

    @classmethod
    def from_status(cls, node: Mapping[str, Any]) -> NodeFacts:
        """From one node of ``/fleet/status`` (:func:`herd.core.views.node_view`). Raises
        PlanError naming what is missing."""
        try:
            embed = set(node.get("capabilities", {}).get("embed_models") or ())
            contexts = {m["name"]: int(m.get("context_length") or 0) for m in node["models_loaded"]}
            models: dict[str, ModelFacts] = {}
            for available in node["models_available"]:
                name = str(available["name"])
                models[name] = ModelFacts(
                    name=name,
                    size_bytes=int(available.get("size_bytes") or 0),
                    embedding=name in embed or _embedding_caps(available.get("capabilities")),
                    context_length=contexts.get(name, 0),
                    family=str(available.get("family") or ""),
                    parameter_size=str(available.get("parameter_size") or ""),
                )
            for loaded in node["models_loaded"]:
                name = str(loaded["name"])
                models.setdefault(
                    name,
                    ModelFacts(name, int(loaded.get("size_bytes") or 0), name in embed),
                )
            return cls(
                node_id=str(node["node_id"]),
                memory_bytes=int(node["memory"]["total_bytes"]),
                slots=max(1, int(node.get("parallel_slots") or 1)),
                models=tuple(models.values()),
                loaded=tuple(str(m["name"]) for m in node["models_loaded"]),
                online=node.get("status") != "offline",
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"a node in the fleet status is missing {exc}: {node!r:.200}") from exc


def _embedding_caps(capabilities: object) -> bool:
    caps = tuple(capabilities) if isinstance(capabilities, list | tuple) else ()
    return "embedding" in caps and "completion" not in caps
