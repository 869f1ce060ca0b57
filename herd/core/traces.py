"""One record per routed request: what was asked, where it went, how it ended, and why."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

# Final status of a request, as SPEC §7 names them.
COMPLETED = "completed"
FAILED = "failed"
CLIENT_DISCONNECTED = "client_disconnected"
INCOMPLETE = "incomplete"


@attrs.frozen
class TraceRecord:
    request_id: str
    model: str  # what served
    original_model: str  # what the client asked for
    node_id: str | None
    score: float | None
    scores_breakdown: Mapping[str, float]
    status: str
    latency_ms: float
    time_to_first_token_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    retry_count: int
    fallback_used: bool
    excluded_nodes: tuple[str, ...]
    original_format: str  # "ollama" | "openai"
    kind: str
    error_message: str | None
    timestamp: float  # wall clock, epoch seconds
    tags: tuple[str, ...]
    runners_up: tuple[tuple[str, float], ...] = ()
    # What resilience did: None, "fallback_models", "vram" or "context" (another model served);
    # context protection: None, "stripped", "upgraded" or "passthrough".
    substitution: str | None = None
    context_action: str | None = None
    # Share of the served copy outside the node's accelerator, as the scorer judged it when it
    # chose the node (Candidate.offload: Ollama's size_vram for a loaded copy, the prediction
    # for a cold load): 0.0 = all in VRAM (or a node without one), above 0 = spilled, running
    # partly on the CPU; None = not routed by the scorer.
    offload: float | None = None

    def as_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["scores_breakdown"] = dict(self.scores_breakdown)
        data["excluded_nodes"] = list(self.excluded_nodes)
        data["tags"] = list(self.tags)
        data["runners_up"] = [{"node_id": n, "score": s} for n, s in self.runners_up]
        return data
