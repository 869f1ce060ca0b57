"""Scoring: which node should serve this request?

Rules
-----
- Pure. This module imports no I/O library (no trio, httpx, quart, asyncio, time) and reads no
  clock: the caller passes the fleet snapshot, the history, ``now`` and a seeded ``random.Random``
  for tie-breaking. Same inputs, same decision. ``tests/test_scoring.py`` checks the imports.
- Every candidate gets a per-signal breakdown whose values sum to its score, so a trace can say
  *why* a node won.
- No module-level mutable state. Settings are validated when built (``ScoringSettings`` raises
  ``ValueError``); after that nothing here raises: a node's odd numbers (NaN availability, a
  negative latency) are read as "no information", never as an exception mid-request.

Theory of operation
-------------------
A decision has three stages.

1. **Eliminate** nodes that cannot serve at all: offline, draining, backend down, capacity
   paused, already failed this request, not the node the request named (``only_node``),
   model absent, a cold load under critical memory
   pressure, a cold load that doesn't fit where models run on that node (RAM, VRAM, or the
   unified working set; see :mod:`herd.core.memory`), even once the loaded models are
   unloaded (a partial offload fits if the part outside VRAM fits in RAM; RAM is capped by the
   node's capacity ceiling). Each elimination keeps a reason that names the value that failed.
2. **Score** the survivors on ten signals (points; positive is better). "log" marks a
   penalty whose full scale is not a cap: past it, it grows as ``1 + ln x`` (``_saturate``):

   =============  ===============  ==================================================
   signal         range            meaning
   =============  ===============  ==================================================
   thermal        -30 .. +50       loaded +50; a cold load loses with its size (the
                                   whole gap at 32 GiB): unloaded recently 30 .. 50,
                                   only on disk 10 .. 50; image jobs -30 where they
                                   would push hot models out of a crowded node
   memory_fit     0 .. +6          headroom left after serving, where models run
   queue_depth    -40 .. 0, log    requests running or queued per slot, over speed
   wait_time      -60 .. 0, log    expected time to an answer (service x queue) in
                                   units of the model's typical time
   role_affinity  0 .. +4          big models to big nodes, small to small (x 0.4)
   availability   -20 .. +10       learned availability +-10; a degraded node -10
   context_fit    -15 .. +15       loaded context window vs the tokens needed; a
                                   cold load +15 (it loads with the window asked)
   affinity       0 .. +10         this conversation's earlier turn ran here and
                                   the model is still loaded (its prompt cache)
   eviction       -40 .. 0         the loaded models a cold load would push out,
                                   each by how much it is still wanted
   spill          -45 .. 0, log    the share of the copy outside the accelerator
                                   (loaded, or a cold partial offload): that part
                                   runs ~8x slower
   =============  ===============  ==================================================

   Thermal dominates on purpose: a cold load of a large model costs seconds to minutes. A
   queue alone costs a hot node 17 points per full round of its slots, so a second copy gets
   loaded once about one round is queued; a queue that has made the node *slow* costs more,
   through ``wait_time``. No penalty is capped: a busy node stays in the ranking (nothing
   starves) but keeps losing ground as it gets busier. A spilled copy loses more than a cold
   load's whole thermal gap once it runs about 3x slower, so, other things equal, a copy fully
   in VRAM elsewhere wins, hot or cold.
3. **Rank** by total score; exact ties are put in random order by the caller's ``rng`` (drawn
   from only when something ties); the decision keeps the winner, the runners-up and every
   elimination.

Choices worth knowing
---------------------
- Critical memory pressure refuses only *cold* loads. A model already loaded needs no new
  memory, and refusing it would turn a busy node into an outage; its memory fit is ~0 anyway,
  so any comfortable peer wins.
- ``now`` and ``recently_unloaded`` are on the router's clock; "warm" means unloaded strictly
  less than ``warm_window_s`` ago.
- Image jobs need the backend *and* the model listed in ``image_models``; speech-to-text needs
  only a backend (the node picks its model). Text needs ``capabilities.text``; embeddings use
  the ordinary model list. Any other kind is eliminated as "kind not supported".
- Totals are rounded to 3 decimals (half up) so float noise doesn't hide a tie from the
  tie-breaker; breakdowns are rounded when read.
- What a node's report alone says of a model (its eliminations, facts, the memory fit, role
  affinity and spill points, thermal but for the warm window, the learned availability, and
  whether a cold load would evict) is worked out once per report and kept with it
  (``NodeReport.derived``; a report is frozen and lives for a heartbeat): a decision works
  out only what depends on the request, the node's queues and status, the history and the
  clock, in one loop over the candidates (``_rank``) with no helper calls where a line
  will do. The same inputs give the same decision whether or not a report was read before
  (``tests/test_scoring.py`` checks it).
"""

from __future__ import annotations

import math
import operator
import random
from collections import Counter
from collections.abc import Mapping
from typing import NamedTuple

import attrs

import herd.core.memory as memory
from herd.core.models import (
    KIND_EMBED,
    KIND_IMAGE,
    KIND_STT,
    KIND_TEXT,
    FleetSnapshot,
    LoadedModel,
    MemoryPressure,
    NodeReport,
    NodeSnapshot,
    NodeStatus,
)

GiB = 2**30
_MODEL_KINDS = (KIND_TEXT, KIND_EMBED)  # kinds served from the node's model lists
# Enum members as plain names: looking them up on the class costs more than the comparison.
_OFFLINE, _DEGRADED = NodeStatus.OFFLINE, NodeStatus.DEGRADED
_CRITICAL = MemoryPressure.CRITICAL

SIGNALS = (
    "thermal",
    "memory_fit",
    "queue_depth",
    "wait_time",
    "role_affinity",
    "availability",
    "context_fit",
    "affinity",
    "eviction",
    "spill",
)


@attrs.frozen
class RouteRequest:
    """What the scorer needs to know of one request."""

    model: str  # normalized, e.g. "llama3.2:3b"
    kind: str = KIND_TEXT  # herd.core.models.KIND_*
    estimated_prompt_tokens: int = 0  # the router's estimate of the prompt
    requested_context: int | None = None  # num_ctx the client asked for, if any
    excluded_nodes: frozenset[str] = frozenset()  # nodes that already failed this request
    # Conversation affinity: the node that served this conversation's earlier turn (its prompt
    # cache holds the prefix) and how many tokens that prefix is. None = a new conversation.
    affinity_node: str | None = None
    affinity_tokens: int = 0
    # The one node allowed to serve (the request's ``metadata.node``); None = any.
    only_node: str | None = None


@attrs.frozen
class History:
    """What the router has learned from completed requests."""

    # (node_id, model) -> p75 latency of completed requests, ms. Missing = no penalty.
    latency_p75_ms: Mapping[tuple[str, str], float] = attrs.field(factory=dict)
    # node_id -> relative speed (1.0 = fleet median, 2.0 = twice as fast). Missing = 1.0.
    node_speed: Mapping[str, float] = attrs.field(factory=dict)
    # model -> p75 latency, ms, on a node of relative speed 1.0. Missing = unknown.
    model_p75_ms: Mapping[str, float] = attrs.field(factory=dict)
    # latency_p75_ms again, by model, then node: what the scorer reads (a decision looks up
    # one model on every node, and a string key costs a quarter of a pair's). Worked out from
    # latency_p75_ms when not given; herd.state.history.LatencyHistory keeps one beside it and
    # passes it. The two must agree.
    latency_by_model: Mapping[str, Mapping[str, float]] = attrs.field(
        default=attrs.Factory(lambda self: by_model(self.latency_p75_ms), takes_self=True)
    )


def by_model(pairs: Mapping[tuple[str, str], float]) -> dict[str, dict[str, float]]:
    """``pairs`` ((node, model) -> value) as model -> node -> value."""
    table: dict[str, dict[str, float]] = {}
    for (node_id, model), value in pairs.items():
        table.setdefault(model, {})[node_id] = value
    return table


@attrs.frozen
class ScoringSettings:
    """Every weight and threshold. Raises ``ValueError`` when built with a value that would make
    scoring meaningless (negative, NaN or infinite; a zero divisor)."""

    # Weights tuned with bench/routing.py (docs/performance.md: the trace, the fleet, the
    # figures) and frozen here. Each comment says why the value is what it is.
    #
    # Thermal: the biggest single signal, because a cold load of a large model costs tens of
    # seconds. The gap from loaded to on disk grows with the model's size: loading 2 GiB costs
    # a second or two, about one queued request; loading 40 GiB costs a minute.
    thermal_loaded: float = 50.0  # in memory: answers at once (the reference's value)
    thermal_warm: float = 30.0  # just unloaded: the OS page cache still holds much of it
    thermal_on_disk: float = 10.0  # a full load from disk; still better than no node
    thermal_full_load_bytes: int = 32 * GiB  # the whole gap at 32 GiB (~70B at Q4 and up);
    # 16 GiB (the old cap) kept mid-size models too sticky to saturated nodes in the bench.
    warm_window_s: float = 1800.0  # page cache rarely survives half an hour of other work
    # Memory fit: headroom after serving; full points when this share of memory stays free.
    memory_fit_max: float = 6.0  # the reference's 20 beat speed: idle big slow machines won
    memory_comfort_share: float = 0.5  # half the machine free leaves room for a second model
    # Queue: points lost per round of the node's slots already taken, divided by its speed.
    queue_penalty_per_slot_load: float = 17.0  # one full round queued = -17: about a cold
    # load of a mid-size model, so a second copy gets loaded when a queue builds up
    queue_penalty_max: float = 40.0  # full scale; beyond it the penalty grows only slowly
    overflow_slope: float = 1.0  # ... as 1 + ln(x): a deeper queue always costs more. A hard
    # cap (0) let saturated hot nodes keep every request in a burst until clients timed out.
    speed_floor: float = 0.1  # a CPU-only box is about a tenth of a GPU; slower is noise
    unknown_node_speed: float = 0.6  # a node not measured yet counts as slowish, not average:
    # at 1.0 a burst piled onto an unmeasured CPU-only node before its first answer came back
    # Wait: expected time to an answer (service x queue), in units of the model's typical time.
    wait_penalty_max: float = 60.0  # more than thermal: a node 3x slower than usual loses
    # its hot lead; the reference's 25 could not move work off a slow hot node
    wait_full_multiple: float = 3.0  # three typical service times is as bad as a cold load
    wait_queue_factor: float = 1.0  # each request ahead per slot adds one service time
    wait_full_penalty_ms: float = 30_000.0  # fallback scale before any typical time is known
    # Role affinity: keep the big machines free for the big models.
    role_affinity_max: float = 4.0  # a tie-breaker; at 15 it sent small models to slow boxes
    large_model_bytes: int = 20 * GiB  # ~30B+ parameters at Q4: only big machines hold these
    big_node_bytes: int = 64 * GiB  # a node this big (or bigger) is fully "big"
    small_model_affinity_share: float = 0.4  # small models care less where they run
    # Availability: learned capacity maps 0..1 to -10..+10; degraded heartbeats cost more.
    availability_max: float = 10.0  # the owner is using this machine: prefer another
    degraded_penalty: float = 10.0  # late heartbeats: the node may be about to drop out
    # Context fit: loaded window vs the tokens the request needs.
    context_fit_max: float = 15.0  # a reload for a bigger window costs about a cold load
    context_comfort_ratio: float = 1.5  # 50% spare leaves room for the answer
    context_fit_cold: float = 15.0  # a cold load sizes its window for the request; 0 here
    # counted the missing window twice (thermal already charges the load)
    # Image jobs need the GPU's memory: on a node with models loaded and less free than this,
    # the job would push them out. Costs points (in thermal) so another node wins.
    image_memory_need: int = 12 * GiB  # a Flux-class model in 8 bits plus activations
    image_eviction_penalty: float = 30.0  # about the thermal gap between hot and on disk
    # Conversation affinity: the node whose prompt cache holds the conversation so far skips
    # its prefill. Worth less than one round of queue (17), so it yields to load.
    affinity_max: float = 10.0
    affinity_full_tokens: int = 2000  # a prefix this long saves seconds of prefill anywhere
    # Eviction: a cold load that pushes loaded models out pays, per model, for how much that
    # model is still wanted; capped at the full thermal gap (what reloading it would cost).
    eviction_idle: float = 3.0  # nobody used it lately: nearly free to drop
    eviction_recent: float = 10.0  # used within eviction_recent_s: it will be wanted again
    eviction_busy: float = 15.0  # serving now: the load waits for it, then its queue reloads
    eviction_recent_s: float = 300.0  # Ollama's default keep-alive: "recent" means still wanted
    eviction_max: float = 40.0
    # Spill: a copy partly outside the accelerator (Ollama's size_vram < size, or a cold load
    # bigger than the accelerator memory it could have) runs from RAM on the CPU for that part;
    # system RAM has a fraction of VRAM's bandwidth, so each token takes about
    # 1 + share x (spill_cpu_slowdown - 1) times as long. herd.sim.residency.CPU_SLOWDOWN is
    # the same figure, so the bench's simulated spills cost what the scorer expects.
    spill_cpu_slowdown: float = 8.0  # the CPU part runs ~8x slower (DDR5 ~80 GB/s, VRAM ~700)
    spill_full_slowdown: float = 3.0  # three times slower is the full penalty (and beyond, log)
    spill_penalty_max: float = 45.0  # more than thermal's whole gap (40): a copy 3x slower,
    # hot, is worth less than a cold full-VRAM load elsewhere, and a cold partial offload
    # ranks below a cold full load, so the pre-warmer warms the copy that will run fast

    def __attrs_post_init__(self) -> None:
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"scoring setting {field.name} must be >= 0, got {value!r}")
        for name in (
            "memory_comfort_share",
            "wait_full_penalty_ms",
            "big_node_bytes",
            "affinity_full_tokens",
            "wait_full_multiple",
            "thermal_full_load_bytes",
            "queue_penalty_max",
            "speed_floor",
            "unknown_node_speed",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"scoring setting {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("spill_cpu_slowdown", "spill_full_slowdown"):
            if getattr(self, name) <= 1.0:
                raise ValueError(f"scoring setting {name} must be > 1, got {getattr(self, name)!r}")
        if self.context_comfort_ratio < 1.0:
            raise ValueError(
                f"scoring setting context_comfort_ratio must be >= 1.0, "
                f"got {self.context_comfort_ratio!r}"
            )


class Candidate(NamedTuple):
    """A node that can serve the request, and why it scored what it did. (A named tuple, not
    an attrs class: a decision builds one per node, and this is the cheapest frozen value.)"""

    node_id: str
    model: str
    score: float  # sum of the points
    points: tuple[float, ...]  # one per signal, in the order of SIGNALS
    hot: bool  # the model is loaded on the node: no cold load
    # Share of the model outside the accelerator there (Ollama's size_vram for a loaded copy,
    # the prediction for a cold load): 0.0 = all on the GPU, or a node without one.
    offload: float = 0.0

    @property
    def breakdown(self) -> dict[str, float]:
        """Signal name (see SIGNALS) -> points, rounded to 3 decimals; a fresh dict each
        time. Built on demand: a decision ranks every node, but only the winner's breakdown is
        usually read."""
        return {name: round(value, 3) for name, value in zip(SIGNALS, self.points, strict=True)}


@attrs.frozen
class Elimination:
    """A node that can't serve the request at all."""

    node_id: str
    reason: str  # short, names the failing value: "needs 40.0 GiB free, has 12.1 GiB"


@attrs.frozen
class RouteDecision:
    """The outcome of :func:`score`: every node appears once, ranked or eliminated."""

    request: RouteRequest
    winner: Candidate | None  # None when every node was eliminated
    ranked: tuple[Candidate, ...]  # best first; the winner first
    eliminated: tuple[Elimination, ...]  # in fleet order

    @property
    def runners_up(self) -> tuple[Candidate, ...]:
        """The candidates after the winner, best first."""
        return self.ranked[1:]


def _gib(value: float) -> str:
    return f"{value / GiB:.1f} GiB"


def _number(value: float | None, default: float) -> float:
    """``value`` if it is a finite number, else ``default``: odd input means "no information"."""
    if value is None or not math.isfinite(value):
        return default
    return value


def _saturate(x: float, s: ScoringSettings) -> float:
    """``x`` up to 1 (a signal's full scale); beyond it, ``1 + overflow_slope * ln(x)``: a
    deeper queue or a longer wait always costs more, so work keeps spreading when every node is
    busy, but slowly, so one signal can't drown the others. ``overflow_slope`` 0 is a hard cap."""
    if x <= 1.0:
        return x if x > 0.0 else 0.0  # (NaN: 0.0, as max(0.0, x))
    return 1.0 + s.overflow_slope * math.log(x)


def model_size(report: NodeReport, model: str) -> int:
    """Bytes ``model`` takes on the node that sent ``report``: its loaded size, else its size on
    disk, else 0 (unknown). Raises nothing."""
    loaded = report.loaded_index.get(model)
    if loaded is not None and loaded.size_bytes > 0:
        return loaded.size_bytes
    available = report.available_index.get(model)
    return max(0, available.size_bytes) if available is not None else 0


def eliminate(request: RouteRequest, node: NodeSnapshot) -> str | None:
    """Why ``node`` can't serve ``request`` at all, or None if it can. Raises nothing."""
    return _reason(request, node, _known((request.model, request.kind), node.report, None))


def _reason(request: RouteRequest, node: NodeSnapshot, known: _Known) -> str | None:
    """The first reason that rules ``node`` out, in this order: the model absent (in a big
    fleet most nodes lack any one model), the node offline, the request's own (failed earlier,
    another node named), then the rest of the report's (see :func:`_report_reason`)."""
    if known.absent:
        return "model not on node"
    if node.status is _OFFLINE:
        return "offline"
    node_id = node.report.node_id
    if node_id in request.excluded_nodes:
        return "failed earlier in this request"
    if request.only_node is not None and node_id != request.only_node:
        return f"not the node the request named ({request.only_node})"
    return known.reason


def _report_reason(model: str, kind: str, report: NodeReport, f: Facts) -> str | None:
    """Why the node that sent ``report`` can't serve ``model`` for a request of ``kind``,
    whatever the request, once it is online and has the model; None if it can. ``f``: the
    model's facts there (a cold load's verdict is in them)."""
    if report.draining:
        return "draining"
    if not report.backend.healthy:
        return f"backend down: {report.backend.error or 'no answer'}"
    if report.capacity.paused:
        return "capacity paused"
    if kind == KIND_IMAGE:
        if not report.capabilities.image_backends:
            return "no image backend"
        if model not in report.capabilities.image_models:
            return "image model not on node"
        return None
    if kind == KIND_STT:
        return None if report.capabilities.stt_backends else "no speech-to-text backend"
    if kind not in (KIND_TEXT, KIND_EMBED):
        return f"kind not supported: {kind!r}"
    if kind == KIND_TEXT and not report.capabilities.text:
        return "kind not supported: node serves no text models"
    if f.load is None:
        return None  # hot: needs no new memory, whatever the pressure
    if report.memory.pressure is _CRITICAL:
        return "critical memory pressure (cold load refused)"
    return f.load.reason


class Facts(NamedTuple):
    """What the signals read of one model on one node from the node's report (its queues come
    from the snapshot, its speed from the history: see :func:`_rank`)."""

    loaded: LoadedModel | None  # the model's entry if it is in the node's memory
    size: int  # bytes the model takes there (0 = unknown)
    free: int  # free memory where models run there (see herd.core.memory.where_models_run)
    total: int  # memory where models run there: RAM, VRAM or the unified working set
    load: memory.ColdLoad | None  # what a cold load would do (None: hot)
    offload: float  # share of the model outside the accelerator, loaded or predicted


def facts(model: str, report: NodeReport) -> Facts | None:
    """Look up, once, what the signals need of ``model`` on the node that sent ``report``;
    None when the model is neither loaded nor on its disk. Raises nothing."""
    loaded = report.loaded_index.get(model)
    where = report.memory_where
    if loaded is not None:
        size = loaded.size_bytes if loaded.size_bytes > 0 else model_size(report, model)
        return _new_facts(
            Facts, (loaded, size, where.free, where.total, None, memory.offload(report, loaded))
        )
    on_disk = report.available_index.get(model)  # (model_size's second half)
    if on_disk is None:
        return None
    size = on_disk.size_bytes if on_disk.size_bytes > 0 else 0
    cold = memory.cold_load(where, size)
    return _new_facts(Facts, (None, size, where.free, where.total, cold, cold.offload))


def _unlisted(report: NodeReport) -> Facts:
    """The facts of a model the node doesn't list, for the kinds that don't need it listed
    (image jobs, speech-to-text): no size known, so a cold load taken to fit."""
    where = report.memory_where
    cold = memory.cold_load(where, 0)
    return _new_facts(Facts, (None, 0, where.free, where.total, cold, cold.offload))


class _Known:
    """What one node's report says of one model for one kind of request, whatever the request
    and whatever the node's queues: whether it rules the node out, its facts, and the points
    that follow from them alone. Worked out once per report and kept with it (see
    :func:`_known`); never changed after. (A class with slots, not a named tuple: every
    decision reads six of these per node, and a slot is read at a third of the cost of a
    named tuple's field.)"""

    __slots__ = (
        "absent",
        "evicts",
        "facts",
        "fit",
        "learned",
        "loaded",
        "offload",
        "open",
        "reason",
        "role",
        "settings",
        "spilled",
        "thermal",
        "warm",
    )

    def __init__(
        self,
        absent: bool,
        reason: str | None,
        facts: Facts | None,
        settings: ScoringSettings | None,
        fixed: tuple[float, float, float],
        thermal: float,
        warm: float | None,
        learned: float,
        evicts: bool,
    ) -> None:
        self.absent = absent  # the model is not on the node (kinds served from its lists)
        self.reason = reason  # see _report_reason
        self.open = facts is not None  # neither: the report doesn't rule the node out
        self.facts = facts  # None when ruled out
        self.settings = settings  # the settings the points were worked out with
        self.fit, self.role, self.spilled = fixed  # memory_fit, role_affinity, spill
        self.thermal = thermal  # hot, an image job, or a cold load from disk (see thermal)
        self.warm = warm  # the same cold load if the model was unloaded lately; None: not cold
        self.learned = learned  # availability's learned part (see learned_availability)
        self.evicts = evicts  # a cold load here pushes loaded models out (see eviction)
        # The facts' own, read by every decision: the loaded copy (None: cold) and the share
        # outside the accelerator.
        self.loaded = facts.loaded if facts is not None else None
        self.offload = facts.offload if facts is not None else 0.0


_NO_POINTS = (0.0, 0.0, 0.0)
_KNOWN_PER_REPORT = 256  # (model, kind) pairs kept per report; more are worked out again


def _known(key: tuple[str, str], report: NodeReport, s: ScoringSettings | None) -> _Known:
    """:class:`_Known` for ``key`` (model, kind) on the node that sent ``report``, from the
    report's memo (:attr:`NodeReport.derived`) when it was worked out before (with ``s``, when
    ``s`` is given). A report is frozen and lives for a heartbeat, so a busy router works this
    out once per model per heartbeat, not once per decision. Raises nothing."""
    memo = report.derived
    known = memo.get(key)
    if isinstance(known, _Known) and (s is None or known.settings is s):
        return known
    if len(memo) >= _KNOWN_PER_REPORT:
        memo.clear()
    model, kind = key
    f = facts(model, report)
    absent = f is None and kind in _MODEL_KINDS
    if f is None and not absent:
        f = _unlisted(report)
    reason = None if f is None else _report_reason(model, kind, report, f)
    if reason is not None:
        f = None
    fixed = _NO_POINTS
    heat = learned = 0.0
    evicts = False
    cold: float | None = None
    if f is not None and s is not None:
        fixed = (memory_fit(f, s), role_affinity(f, s), spill(f, s))
        heat = thermal(kind, report, f, False, s)
        if kind != KIND_IMAGE and f.loaded is None:
            cold = thermal(kind, report, f, True, s)
        learned = learned_availability(report, s)
        evicts = f.load is not None and (f.load.evict > 0 or f.load.evict_ram > 0)
    made = memo[key] = _Known(absent, reason, f, s, fixed, heat, cold, learned, evicts)
    return made


def evictions(request: RouteRequest, node: NodeSnapshot) -> tuple[str, ...]:
    """The loaded models a cold load of ``request.model`` would push out of ``node``, in the
    order the backend would drop them: idle before busy, least recently used first (router
    recency, then the backend's keep-alive expiry), until both the memory models run in and
    RAM have room (see :func:`herd.core.memory.cold_load`). Empty when it fits or is hot.
    Raises nothing."""
    if node.loaded(request.model) is not None:
        return ()
    load = memory.cold_load(node.report.memory_where, model_size(node.report, request.model))
    return tuple(model.name for model in _evicted(node, load))


class _Droppable(NamedTuple):
    """A loaded model as a cold load on its node would see it (see :func:`_drop_order`)."""

    name: str
    freed: int  # bytes it frees where models run (herd.core.memory.held_where)
    freed_ram: int  # RAM bytes it frees (herd.core.memory.held_ram)
    busy: bool  # requests use it now (running or queued)
    last_used: float | None  # router clock of its last use; None: never seen used


_DROP_ORDER = "drop order"  # NodeSnapshot.derived's key for _drop_order


def _drop_order(node: NodeSnapshot) -> tuple[_Droppable, ...]:
    """``node``'s loaded models in the order the backend would drop them: idle before busy,
    least recently used first (router recency, then the backend's keep-alive expiry). Worked
    out once per snapshot (it reads only the report and the queues) and kept in
    :attr:`NodeSnapshot.derived`: every cold load scored there reads it."""
    kept = node.derived.get(_DROP_ORDER)
    if type(kept) is tuple:  # (only this function writes the key)
        return kept
    where = node.report.memory_where.kind
    rows = []
    for model in node.report.loaded_models:
        load = node.load.get(model.name)
        busy = load is not None and (load.in_flight > 0 or load.pending > 0)
        used = load.last_used if load is not None else None
        rank = (busy, -math.inf if used is None else used, _number(model.expires_at, -math.inf))
        droppable = _Droppable(
            model.name, memory.held_where(where, model), memory.held_ram(where, model), busy, used
        )
        rows.append((rank, droppable))
    rows.sort(key=_by_rank)  # stable: equal ranks keep the report's order
    order = node.derived[_DROP_ORDER] = tuple(row[1] for row in rows)
    return order


_by_rank = operator.itemgetter(0)


def _evicted(node: NodeSnapshot, load: memory.ColdLoad) -> list[_Droppable]:
    """The models of :func:`_drop_order` a cold load that needs ``load`` pushes out: in
    order, each that frees some of what is still missing, until nothing is."""
    need, need_ram = load.evict, load.evict_ram
    out: list[_Droppable] = []
    if need <= 0 and need_ram <= 0:
        return out
    for model in _drop_order(node):
        if need <= 0 and need_ram <= 0:
            break
        if (need > 0 and model.freed > 0) or (need_ram > 0 and model.freed_ram > 0):
            out.append(model)
            need -= model.freed
            need_ram -= model.freed_ram
    return out


def thermal(kind: str, report: NodeReport, f: Facts, warm: bool, s: ScoringSettings) -> float:
    """Residency: loaded, warm (``warm``: unloaded strictly less than ``warm_window_s`` ago)
    or on disk; a cold load loses in proportion to its size, the full gap at
    ``thermal_full_load_bytes``. For image jobs, a penalty when the job would push hot models
    out of a crowded node. Raises nothing."""
    if kind == KIND_IMAGE:
        # No "hot" image models to find; what matters is not evicting the LLMs that are hot.
        crowded = f.free < s.image_memory_need and report.loaded_models
        return -s.image_eviction_penalty if crowded else 0.0
    if f.loaded is not None:
        return s.thermal_loaded
    cold = s.thermal_warm if warm else s.thermal_on_disk
    # A cold load costs time in proportion to the bytes read: a small model loses less for it.
    share = f.size / s.thermal_full_load_bytes if f.size > 0 else 1.0
    if share > 1.0:
        share = 1.0
    return s.thermal_loaded - (s.thermal_loaded - cold) * share


def memory_fit(f: Facts, s: ScoringSettings) -> float:
    """Headroom after serving, as a share of the memory models run in there (RAM, VRAM or the
    unified working set): a cold load spends the model's size (a partial offload leaves
    none), a hot model only what is free now. Full points at ``memory_comfort_share``. Raises
    nothing."""
    if f.total <= 0:
        return 0.0
    free = f.free if f.loaded is not None else f.free - f.size
    # (Comparisons, not min() and max(): in CPython 3.11 each of those costs more than the
    # rest of this function. Used this way here and in the other signals worked out often.)
    share = free / f.total / s.memory_comfort_share
    if share <= 0.0:
        return 0.0
    return s.memory_fit_max * (share if share < 1.0 else 1.0)


def queue_depth(ahead: int, slots: int, speed: float, s: ScoringSettings) -> float:
    """Requests running or waiting on the node (all models) per parallel slot, divided by the
    node's relative speed: ``queue_penalty_per_slot_load`` per round of slots, full scale at
    ``queue_penalty_max`` and only slowly beyond (see :func:`_saturate`). Raises nothing."""
    if ahead <= 0:
        return 0.0
    full = s.queue_penalty_max
    x = s.queue_penalty_per_slot_load * (ahead / slots) / speed / full
    return -full * (x if 0.0 <= x <= 1.0 else _saturate(x, s))  # (the common case: no call)


def wait_time(
    ahead: int, slots: int, speed: float, service: float, typical: float, s: ScoringSettings
) -> float:
    """Expected time to an answer on this node, relative to what the model usually takes.

    Service time is this node:model's p75 (``service``, slot to last byte), or, where it hasn't
    run yet (0), the model's typical p75 (``typical``: on a node of relative speed 1.0; 0 =
    unknown) divided by the node's relative ``speed``. The requests ahead of it take
    about as long each, shared among the slots: expected = service x (1 + ahead / slots).
    Measured in units of the model's typical service time (a 70B model's minute and a 3B
    model's second are both "one"), full penalty at ``wait_full_multiple`` of them and only
    slowly beyond. Without a typical time, the absolute p75 counts, log-scaled, full at
    ``wait_full_penalty_ms``. 0 without any history. Raises nothing."""
    if service <= 0:
        service = typical / speed
    if service <= 0:
        return 0.0
    expected = service * (1.0 + s.wait_queue_factor * ahead / slots)
    if typical > 0:
        fraction = expected / (typical * s.wait_full_multiple)
    else:
        # Logarithmic: the difference between 100 ms and 1 s matters as much as 1 s and 10 s.
        fraction = math.log1p(expected / 100.0) / math.log1p(s.wait_full_penalty_ms / 100.0)
    if 0.0 <= fraction <= 1.0:
        return -s.wait_penalty_max * fraction  # (_saturate's common case, without the call)
    return -s.wait_penalty_max * _saturate(fraction, s)


def role_affinity(f: Facts, s: ScoringSettings) -> float:
    """Large models (>= ``large_model_bytes``) score by how big the node is (the memory
    models run in there), up to ``big_node_bytes``; small ones by how small it is, at
    ``small_model_affinity_share`` of the weight. 0 when a size is unknown. Raises nothing."""
    total = f.total
    if total <= 0 or f.size <= 0:
        return 0.0
    node_bigness = total / s.big_node_bytes
    if node_bigness > 1.0:
        node_bigness = 1.0
    if f.size >= s.large_model_bytes:
        return s.role_affinity_max * node_bigness
    # Small models: prefer small nodes, keeping big machines free for big models.
    return s.role_affinity_max * (1.0 - node_bigness) * s.small_model_affinity_share


def learned_availability(report: NodeReport, s: ScoringSettings) -> float:
    """The node's learned availability 0..1 mapped to -max..+max (NaN reads as 0.5, no
    opinion). A degraded node loses ``degraded_penalty`` more (in :func:`_rank`: the
    status is the snapshot's, not the report's). Raises nothing."""
    level = report.capacity.availability
    if not 0.0 <= level <= 1.0:  # NaN fails every comparison: no opinion
        level = 0.5 if math.isnan(level) else min(1.0, max(0.0, level))
    return s.availability_max * (2 * level - 1)


def context_fit(request: RouteRequest, f: Facts, s: ScoringSettings) -> float:
    """Loaded context window vs the tokens needed (max of the prompt estimate and the asked
    ``num_ctx``): +max with ``context_comfort_ratio`` to spare, scaled down to 0 as it gets
    tight, -max when it won't fit (a reload). A cold load gets ``context_fit_cold``: it loads
    with the window asked for. 0 when the window is unknown. Raises nothing."""
    if f.loaded is None:
        return s.context_fit_cold
    if f.loaded.context_length <= 0:
        return 0.0
    need = request.estimated_prompt_tokens
    asked = request.requested_context
    if asked is not None and asked > need:
        need = asked
    if need <= 0:
        return s.context_fit_max
    ratio = f.loaded.context_length / need
    if ratio >= s.context_comfort_ratio:
        return s.context_fit_max
    if ratio >= 1.0:
        return s.context_fit_max * (ratio - 1.0) / (s.context_comfort_ratio - 1.0)
    return -s.context_fit_max


def affinity(request: RouteRequest, node_id: str, f: Facts, s: ScoringSettings) -> float:
    """Points for the node that served this conversation's earlier turn while the model is
    still loaded there (its prompt cache holds the prefix), scaled by the prefix's length up to
    ``affinity_full_tokens``. Raises nothing."""
    if request.affinity_node != node_id or f.loaded is None:
        return 0.0
    share = min(1.0, max(0, request.affinity_tokens) / s.affinity_full_tokens)
    return s.affinity_max * share


def eviction(node: NodeSnapshot, f: Facts, now: float, s: ScoringSettings) -> float:
    """Cost of the models a cold load would push out (see :func:`evictions`): each costs
    ``eviction_busy`` if requests use it now, ``eviction_recent`` if one did within
    ``eviction_recent_s``, else ``eviction_idle``; capped at ``eviction_max``. Raises nothing."""
    load = f.load
    if load is None or (load.evict <= 0 and load.evict_ram <= 0):
        return 0.0  # hot, or it fits: nothing leaves
    cost = 0.0
    for model in _evicted(node, load):
        if model.busy:
            cost += s.eviction_busy
        elif model.last_used is not None and now - model.last_used < s.eviction_recent_s:
            cost += s.eviction_recent
        else:
            cost += s.eviction_idle
    return -min(s.eviction_max, cost)


def spill(f: Facts, s: ScoringSettings) -> float:
    """A copy partly outside the accelerator (``f.offload``: Ollama's size_vram for a loaded
    one, the prediction for a cold partial offload) runs about ``1 + share x
    (spill_cpu_slowdown - 1)`` times slower; the penalty is full at ``spill_full_slowdown``
    and only slowly beyond. 0 for a copy all in VRAM and on nodes without an accelerator.
    Raises nothing."""
    if f.offload <= 0:
        return 0.0
    slowdown = 1.0 + f.offload * (s.spill_cpu_slowdown - 1.0)
    return -s.spill_penalty_max * _saturate((slowdown - 1.0) / (s.spill_full_slowdown - 1.0), s)


def _rank(
    request: RouteRequest,
    eligible: list[tuple[NodeSnapshot, _Known]],
    history: History,
    typical: float,
    now: float,
    s: ScoringSettings,
) -> tuple[list[Candidate], list[float]]:
    """Each node of ``eligible`` (with its model's :class:`_Known`, made with ``s``) as a
    candidate, unsorted: every signal's points, in the order of ``SIGNALS``, the ones that
    depend on the request, the node's queues, the history or the clock worked out now, the
    rest taken from the known; and their scores, in the same order. ``typical``: the model's
    p75 from ``history`` (see :func:`wait_time`), read once per decision."""
    # One loop, inline (no helper calls where a line will do), with what is the same for every
    # node read once, before it: it runs once per node per decision, 100 times for a fleet of
    # 100. (The signals that are more than a line stay functions of their own.)
    model = request.model
    node_speeds = history.node_speed
    service_of = (history.latency_by_model.get(model) or {}).get  # node -> p75
    speed_floor = s.speed_floor
    unknown_speed = s.unknown_node_speed if node_speeds else 1.0
    warm_window = s.warm_window_s
    degraded_penalty = s.degraded_penalty
    window_cold = s.context_fit_cold
    affinity_node = request.affinity_node
    isfinite = math.isfinite
    out: list[Candidate] = []
    scores: list[float] = []
    append, keep_score = out.append, scores.append
    for node, known in eligible:
        report = node.report
        node_id = report.node_id
        # The queue: requests running or waiting on the node (all models) and the slots they
        # share (at least 1); for a model with its own, smaller limit, its own queue and limit
        # when that is the longer wait.
        ahead = node.queued
        slots = report.parallel_slots
        if slots < 1:
            slots = 1
        own = node.load.get(model)
        if own is not None and own.slots > 0:
            mine = own.in_flight + own.pending
            if mine * slots > ahead * own.slots:
                ahead, slots = mine, own.slots
        # The node's relative speed from history, floored at speed_floor (odd values read as
        # 1.0); a node the history doesn't know yet, while it knows others, counts as
        # unknown_node_speed.
        speed = node_speeds.get(node_id)
        if speed is None:
            speed = unknown_speed
        else:
            if not isfinite(speed):
                speed = 1.0
            if speed < speed_floor:
                speed = speed_floor
        # This node:model's p75, ms; 0 (none, or an odd value): wait_time estimates it.
        service = service_of(node_id, 0.0)
        if not isfinite(service):
            service = 0.0
        heat = known.thermal
        if known.warm is not None:
            unloaded_at = node.recently_unloaded.get(model)
            if unloaded_at is not None and now - unloaded_at < warm_window:
                heat = known.warm
        queued = queue_depth(ahead, slots, speed, s) if ahead > 0 else 0.0
        waiting = wait_time(ahead, slots, speed, service, typical, s)
        up = known.learned - degraded_penalty if node.status is _DEGRADED else known.learned
        f = known.facts
        assert f is not None  # only eligible nodes are scored
        loaded = known.loaded
        window = window_cold if loaded is None else context_fit(request, f, s)
        cache = affinity(request, node_id, f, s) if affinity_node == node_id else 0.0
        evicted = eviction(node, f, now, s) if known.evicts else 0.0
        fit, role, spilled = known.fit, known.role, known.spilled
        # The score is the points' sum, rounded to 0.001 (float noise must not hide a tie;
        # half up, as round() is three times the cost).
        total = heat + fit + queued + waiting + role + up + window + cache + evicted + spilled
        values = (heat, fit, queued, waiting, role, up, window, cache, evicted, spilled)
        rounded = _floor(total * 1000.0 + 0.5) / 1000.0
        keep_score(rounded)
        append(
            _new_candidate(
                Candidate, (node_id, model, rounded, values, loaded is not None, known.offload)
            )
        )
    return out, scores


# Candidate(...) and Facts(...) without the named tuples' own __new__ (a Python function over
# this same call): half the cost, and a decision builds one per node.
_new_candidate = _new_facts = tuple.__new__
_floor = math.floor


def _typical(request: RouteRequest, history: History) -> float:
    """The model's p75 on a node of relative speed 1.0, ms; 0 = unknown."""
    return _number(history.model_p75_ms.get(request.model), 0.0)


def score(
    request: RouteRequest,
    fleet: FleetSnapshot,
    history: History,
    now: float,
    settings: ScoringSettings,
    rng: random.Random,
) -> RouteDecision:
    """Rank every node of ``fleet`` for ``request``: each one is either a candidate or an
    elimination. Exact ties are ordered by ``rng`` (the only state used; pass a seeded one for
    reproducible decisions). ``now`` is on the same clock as ``NodeSnapshot.last_seen``.

    Raises nothing: a decision whose ``winner`` is None means no node can serve the request.
    """
    eligible: list[tuple[NodeSnapshot, _Known]] = []
    eliminated: list[Elimination] = []
    typical = _typical(request, history)
    key = (request.model, request.kind)
    # Most requests name no node and have failed nowhere yet: then only the report and the
    # status can rule a node out, and _reason is asked only for the nodes they do.
    plain = request.only_node is None and not request.excluded_nodes
    for node in fleet.nodes:
        known = node.report.derived.get(key)  # _known's memo, read here: once per node
        if type(known) is not _Known or known.settings is not settings:
            known = _known(key, node.report, settings)
        if not (plain and known.open and node.status is not _OFFLINE):
            reason = _reason(request, node, known)
            if reason is not None:
                eliminated.append(Elimination(node.report.node_id, reason))
                continue
        eligible.append((node, known))
    candidates, scores = _rank(request, eligible, history, typical, now, settings)
    candidates.sort(key=_by_score, reverse=True)
    if len(set(scores)) < len(scores):  # (a set of the scores at hand: the common case)
        _shuffle_ties(candidates, rng)
    ranked = tuple(candidates)
    return RouteDecision(
        request=request,
        winner=ranked[0] if ranked else None,
        ranked=ranked,
        eliminated=tuple(eliminated),
    )


_by_score = operator.attrgetter("score")


def _shuffle_ties(ranked: list[Candidate], rng: random.Random) -> None:
    """Put each run of equal scores in ``ranked`` (sorted) in random order, drawn from
    ``rng``, best run first: no node wins a tie for its place in the fleet. ``rng`` is not
    drawn from when nothing ties. (Counted and found in C: a Python loop over every candidate
    cost a tenth of a decision; :func:`score` calls this only when a set of the scores says
    something ties.)"""
    scores = list(map(_by_score, ranked))
    counts = Counter(scores)  # in order of first appearance: best first
    for value in [value for value, count in counts.items() if count > 1]:
        start = scores.index(value)
        end = start + counts[value]
        run = ranked[start:end]
        rng.shuffle(run)
        ranked[start:end] = run


def explain(decision: RouteDecision) -> str:
    """A header, then one line per candidate (winner starred, with its breakdown) and per
    elimination, for logs. Raises nothing."""
    lines = [f"route {decision.request.model} ({decision.request.kind}):"]
    for candidate in decision.ranked:
        parts = " ".join(f"{k}={v:+g}" for k, v in candidate.breakdown.items())
        mark = "*" if candidate is decision.winner else " "
        lines.append(f" {mark} {candidate.node_id} {candidate.score:+.1f} [{parts}]")
    for out in decision.eliminated:
        lines.append(f"   {out.node_id} eliminated: {out.reason}")
    return "\n".join(lines)
