"""Scoring: which node should serve this request?

Rules
-----
- Pure. This module imports no I/O library (no trio, httpx, quart, asyncio, time) and reads no
  clock: the caller passes the fleet snapshot, the history, ``now`` and a seeded ``random.Random``
  for tie-breaking. Same inputs, same decision. ``tests/test_scoring.py`` checks the imports.
- Every candidate gets a per-signal breakdown whose values sum to its score, so a trace can say
  *why* a node won.

Theory of operation
-------------------
A decision has three stages.

1. **Eliminate** nodes that cannot serve at all: offline, draining, backend down, capacity
   paused, already failed this request, model absent, a cold load that doesn't fit in free
   memory (capped by the node's capacity ceiling), a cold load under critical memory pressure.
   Each elimination keeps a reason that names the value that failed.
2. **Score** the survivors on seven signals (points; positive is better):

   ============  ===========  =====================================================
   signal        range        meaning
   ============  ===========  =====================================================
   thermal       0 .. +50     loaded +50; unloaded recently +30; only on disk +10
   memory_fit    0 .. +20     headroom left after serving (cold loads use memory)
   queue_depth   -30 .. 0     requests queued or running per slot, eased by speed
   wait_time     -25 .. 0     p75 latency of this node:model from history
   role_affinity 0 .. +15     big models to big machines, small models to small ones
   availability  -10 .. +10   learned availability; degraded heartbeat costs points
   context_fit   -15 .. +15   loaded context window vs the tokens the request needs
   ============  ===========  =====================================================

   Thermal dominates on purpose: a cold load of a large model costs seconds to minutes, far
   more than any queue. The queue penalty is capped so a hot node that is busy still loses to an
   idle warm one only when it is really saturated, and no node is starved for ever.
3. **Rank** by total score; exact ties are broken by the caller's ``rng``; the decision keeps the
   winner, the runners-up and every elimination.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

import attrs

from herd.models import (
    KIND_IMAGE,
    KIND_STT,
    FleetSnapshot,
    MemoryPressure,
    NodeSnapshot,
    NodeStatus,
)

GiB = 2**30

SIGNALS = (
    "thermal",
    "memory_fit",
    "queue_depth",
    "wait_time",
    "role_affinity",
    "availability",
    "context_fit",
)


@attrs.frozen
class RouteRequest:
    model: str
    kind: str = "text"
    estimated_prompt_tokens: int = 0
    requested_context: int | None = None
    excluded_nodes: frozenset[str] = frozenset()


@attrs.frozen
class History:
    latency_p75_ms: Mapping[tuple[str, str], float] = attrs.field(factory=dict)
    node_speed: Mapping[str, float] = attrs.field(factory=dict)


@attrs.frozen
class ScoringSettings:
    # Thermal: a hot model answers at once; a warm one was just in memory (OS page cache still
    # holds much of it); a disk-only model pays a full load.
    thermal_loaded: float = 50.0
    thermal_warm: float = 30.0
    thermal_on_disk: float = 10.0
    warm_window_s: float = 1800.0  # "recently unloaded" means within 30 minutes
    # Memory: full points when at least this share of total memory stays free after serving.
    memory_fit_max: float = 20.0
    memory_comfort_share: float = 0.5
    # Queue: points lost per request waiting or running per parallel slot, capped.
    queue_penalty_max: float = 30.0
    queue_penalty_per_slot_load: float = 10.0
    # Wait: the p75 latency that costs the full penalty (longer is no worse: capped).
    wait_penalty_max: float = 25.0
    wait_full_penalty_ms: float = 30_000.0
    # Role affinity: models at least this big are "large" and prefer nodes with a lot of memory.
    role_affinity_max: float = 15.0
    large_model_bytes: int = 20 * GiB
    big_node_bytes: int = 64 * GiB
    # Availability: ±10 around 0.5 learned availability; a degraded node loses this much more.
    availability_max: float = 10.0
    degraded_penalty: float = 10.0
    # Context: a loaded window with at least this much spare is a comfortable fit.
    context_fit_max: float = 15.0
    context_comfort_ratio: float = 1.5
    # Image jobs need the GPU's memory: on a node whose free memory is below this and that has
    # models loaded, the job would push them out. Costs points (thermal) so another node wins.
    image_memory_need: int = 12 * GiB
    image_eviction_penalty: float = 30.0


@attrs.frozen
class Candidate:
    node_id: str
    model: str
    score: float
    breakdown: Mapping[str, float]
    hot: bool


@attrs.frozen
class Elimination:
    node_id: str
    reason: str


@attrs.frozen
class RouteDecision:
    request: RouteRequest
    winner: Candidate | None
    ranked: tuple[Candidate, ...]
    eliminated: tuple[Elimination, ...]

    @property
    def runners_up(self) -> tuple[Candidate, ...]:
        return self.ranked[1:]


def _gib(value: float) -> str:
    return f"{value / GiB:.1f} GiB"


def free_memory(node: NodeSnapshot) -> int:
    """Memory a cold load may use: available memory, capped by the capacity ceiling."""
    free = node.report.memory.available_bytes
    ceiling = node.report.capacity.ceiling_bytes
    if ceiling is not None:
        used = node.report.memory.total_bytes - node.report.memory.available_bytes
        free = min(free, max(0, ceiling - used))
    return free


def model_size(node: NodeSnapshot, model: str) -> int:
    loaded = node.loaded(model)
    if loaded is not None and loaded.size_bytes:
        return loaded.size_bytes
    available = node.available(model)
    return available.size_bytes if available is not None else 0


def eliminate(request: RouteRequest, node: NodeSnapshot) -> str | None:
    """Why ``node`` can't serve ``request`` at all, or None if it can."""
    report = node.report
    if node.status is NodeStatus.OFFLINE:
        return "offline"
    if node.node_id in request.excluded_nodes:
        return "failed earlier in this request"
    if report.draining:
        return "draining"
    if not report.backend.healthy:
        return f"backend down: {report.backend.error or 'no answer'}"
    if report.capacity.paused:
        return "capacity paused"
    if request.kind == KIND_IMAGE:
        if not report.capabilities.image_backends:
            return "no image backend"
        if request.model not in report.capabilities.image_models:
            return "image model not on node"
        return None
    if request.kind == KIND_STT:
        return None if report.capabilities.stt_backends else "no speech-to-text backend"
    if node.loaded(request.model) is not None:
        return None
    if node.available(request.model) is None:
        return "model not on node"
    if report.memory.pressure is MemoryPressure.CRITICAL:
        return "critical memory pressure (cold load refused)"
    need = model_size(node, request.model)
    free = free_memory(node)
    if need > free:
        return f"needs {_gib(need)} free, has {_gib(free)}"
    return None


def thermal(request: RouteRequest, node: NodeSnapshot, now: float, s: ScoringSettings) -> float:
    if request.kind == KIND_IMAGE:
        # No "hot" image models to find; what matters is not evicting the LLMs that are hot.
        crowded = free_memory(node) < s.image_memory_need and node.report.loaded_models
        return -s.image_eviction_penalty if crowded else 0.0
    if node.loaded(request.model) is not None:
        return s.thermal_loaded
    unloaded_at = node.recently_unloaded.get(request.model)
    if unloaded_at is not None and now - unloaded_at <= s.warm_window_s:
        return s.thermal_warm
    return s.thermal_on_disk


def memory_fit(request: RouteRequest, node: NodeSnapshot, s: ScoringSettings) -> float:
    total = node.report.memory.total_bytes
    if total <= 0:
        return 0.0
    free = free_memory(node)
    if node.loaded(request.model) is None:
        free -= model_size(node, request.model)
    share = max(0.0, free / total)
    return round(s.memory_fit_max * min(1.0, share / s.memory_comfort_share), 3)


def queue_depth(node: NodeSnapshot, history: History, s: ScoringSettings) -> float:
    waiting = node.in_flight + node.pending
    if waiting <= 0:
        return 0.0
    slots = max(1, node.report.parallel_slots)
    speed = max(0.25, history.node_speed.get(node.node_id, 1.0))
    penalty = s.queue_penalty_per_slot_load * (waiting / slots) / speed
    return -round(min(s.queue_penalty_max, penalty), 3)


def wait_time(
    request: RouteRequest, node: NodeSnapshot, history: History, s: ScoringSettings
) -> float:
    p75 = history.latency_p75_ms.get((node.node_id, request.model))
    if p75 is None or p75 <= 0:
        return 0.0
    # Logarithmic: the difference between 100 ms and 1 s matters as much as 1 s and 10 s.
    fraction = math.log1p(p75 / 100.0) / math.log1p(s.wait_full_penalty_ms / 100.0)
    return -round(s.wait_penalty_max * min(1.0, fraction), 3)


def role_affinity(request: RouteRequest, node: NodeSnapshot, s: ScoringSettings) -> float:
    total = node.report.memory.total_bytes
    size = model_size(node, request.model)
    if total <= 0 or size <= 0:
        return 0.0
    node_bigness = min(1.0, total / s.big_node_bytes)
    if size >= s.large_model_bytes:
        return round(s.role_affinity_max * node_bigness, 3)
    # Small models: prefer small nodes, keeping big machines free for big models.
    return round(s.role_affinity_max * (1.0 - node_bigness) * 0.5, 3)


def availability(node: NodeSnapshot, s: ScoringSettings) -> float:
    level = min(1.0, max(0.0, node.report.capacity.availability))
    points = s.availability_max * (2 * level - 1)
    if node.status is NodeStatus.DEGRADED:
        points -= s.degraded_penalty
    return round(max(-s.availability_max - s.degraded_penalty, points), 3)


def context_fit(request: RouteRequest, node: NodeSnapshot, s: ScoringSettings) -> float:
    loaded = node.loaded(request.model)
    if loaded is None or loaded.context_length <= 0:
        return 0.0
    need = max(request.estimated_prompt_tokens, request.requested_context or 0)
    if need <= 0:
        return s.context_fit_max
    ratio = loaded.context_length / need
    if ratio >= s.context_comfort_ratio:
        return s.context_fit_max
    if ratio >= 1.0:
        return round(s.context_fit_max * (ratio - 1.0) / (s.context_comfort_ratio - 1.0), 3)
    return -s.context_fit_max


def breakdown(
    request: RouteRequest, node: NodeSnapshot, history: History, now: float, s: ScoringSettings
) -> dict[str, float]:
    return {
        "thermal": thermal(request, node, now, s),
        "memory_fit": memory_fit(request, node, s),
        "queue_depth": queue_depth(node, history, s),
        "wait_time": wait_time(request, node, history, s),
        "role_affinity": role_affinity(request, node, s),
        "availability": availability(node, s),
        "context_fit": context_fit(request, node, s),
    }


def score(
    request: RouteRequest,
    fleet: FleetSnapshot,
    history: History,
    now: float,
    settings: ScoringSettings,
    rng: random.Random,
) -> RouteDecision:
    """Rank every node for ``request``. Never raises; an empty ``ranked`` means no node can."""
    candidates: list[Candidate] = []
    eliminated: list[Elimination] = []
    for node in fleet.nodes:
        reason = eliminate(request, node)
        if reason is not None:
            eliminated.append(Elimination(node.node_id, reason))
            continue
        points = breakdown(request, node, history, now, settings)
        candidates.append(
            Candidate(
                node_id=node.node_id,
                model=request.model,
                score=round(sum(points.values()), 3),
                breakdown=points,
                hot=node.loaded(request.model) is not None,
            )
        )
    # Shuffle first, then a stable sort: equal scores end up in random (seeded) order.
    rng.shuffle(candidates)
    candidates.sort(key=lambda c: c.score, reverse=True)
    ranked = tuple(candidates)
    return RouteDecision(
        request=request,
        winner=ranked[0] if ranked else None,
        ranked=ranked,
        eliminated=tuple(eliminated),
    )


def explain(decision: RouteDecision) -> str:
    """One line per candidate and elimination, for logs."""
    lines = [f"route {decision.request.model} ({decision.request.kind}):"]
    for candidate in decision.ranked:
        parts = " ".join(f"{k}={v:+g}" for k, v in candidate.breakdown.items())
        mark = "*" if candidate is decision.winner else " "
        lines.append(f" {mark} {candidate.node_id} {candidate.score:+.1f} [{parts}]")
    for out in decision.eliminated:
        lines.append(f"   {out.node_id} eliminated: {out.reason}")
    return "\n".join(lines)
