"""Replay a request trace against a virtual fleet under one placement policy, on virtual time.

The router's side is herd's own code: the :class:`~herd.state.registry.NodeRegistry` fed by
heartbeats every ``heartbeat`` seconds (so, as in production, the router sees loads and
evictions late), the :class:`~herd.state.queues.QueueBook` that counts and limits requests per
node, the :class:`~herd.state.history.LatencyHistory`, the conversation
:class:`~herd.state.affinity.AffinityTable` and the pure scorer. Only HTTP is left out. The
baselines (:mod:`herd.core.scoring.baselines`) get the same registry and queues, so the policies
differ only in where they send each request.

A trace is a tuple of :class:`Session`: one client's requests, in order, each sent ``think``
seconds after the previous one finished (a single request is a session of one turn). Sessions
start at fixed times; turns follow the answers, as people do.

Run :func:`run` from synchronous code (it owns a ``trio.run`` on a ``MockClock``); a trace of
hours takes seconds. :func:`run_detailed` also returns every request's :class:`Outcome` (the
what-if planner, :mod:`herd.plan.planner`, reads those).

Options the planner uses, each off by default (the bench runs without them):

- ``keep_alive``: how long an idle model stays resident on a virtual node (None: each node's
  own ``SimConfig.keep_alive``). herd asks Ollama to
  keep every model it routes loaded (``keep_alive: -1``), so the planner passes ``math.inf``:
  models then leave memory only when a load needs the room.
- ``substitution``: the router's ``vram_fallback`` setting, under the ``herd`` policy. When the
  chosen node would cold-load the model and a model of its category is loaded somewhere, the
  best node holding one of those serves instead, as :mod:`herd.transport.dispatch` does.
- ``abandon``: called before each request; when it returns True the replay stops and raises
  :class:`ReplayAbandoned` (a time budget, a client that went away).

A request for a model no virtual node has fails at once (the router answers 404), without
waiting for the queue timeout.
"""

from __future__ import annotations

import collections
import math
import random
import statistics
from collections.abc import Callable, Sequence

import attrs
import trio
import trio.testing

from herd.core.memory import SPILL_SHARE
from herd.core.models import KIND_TEXT, FleetSnapshot, NodeReport
from herd.core.policy.conversation import continuation_keys, prefix_keys
from herd.core.policy.substitutes import loaded_alternatives
from herd.core.scoring import RouteDecision, RouteRequest, ScoringSettings, score
from herd.core.scoring.baselines import RoundRobin, least_connections, uniform
from herd.sim.server import SimConfig
from herd.sim.virtual import VirtualNode, percentile
from herd.state.affinity import AffinityTable
from herd.state.history import LatencyHistory
from herd.state.queues import QueueBook
from herd.state.registry import NodeRegistry

POLICIES = ("herd", "least-connections", "round-robin", "random")

Picker = Callable[[RouteRequest, FleetSnapshot, float], str | None]
# (request, fleet, now) -> (node, model) of a loaded stand-in, or None
StandIn = Callable[[RouteRequest, FleetSnapshot, float], tuple[str, str] | None]


class ReplayAbandoned(Exception):
    """The caller's ``abandon`` callback asked the replay to stop."""


@attrs.frozen
class Turn:
    model: str
    prompt_tokens: int
    output_tokens: int
    kind: str = KIND_TEXT
    messages: tuple[dict[str, str], ...] = ()  # the chat so far (keys the prompt cache)
    think: float = 0.0  # seconds after the previous turn's answer (first turn: after start)


@attrs.frozen
class Session:
    start: float
    turns: tuple[Turn, ...]


@attrs.frozen
class Outcome:
    node_id: str | None
    model: str
    kind: str
    latency: float  # seconds, arrival to last token (or to the error)
    ttft: float  # seconds, arrival to first token
    cold: bool
    cached_tokens: int
    error: str | None = None
    offload: float = 0.0  # share of the serving copy outside its node's accelerator
    served_model: str | None = None  # the model that served, when another stood in for it


@attrs.frozen
class Summary:
    policy: str
    requests: int
    errors: int
    mean: float
    p95: float
    ttft_mean: float
    ttft_p95: float
    cold_loads: int
    evictions: int
    cached_share: float  # share of prompt tokens the prompt caches saved
    share: dict[str, float]  # node -> share of the requests it served
    conversation_share: float  # worst node's share of continuing conversation turns
    spilled: int = 0  # requests served by a copy partly outside its node's accelerator

    @property
    def worst_share(self) -> float:
        return max(self.share.values(), default=0.0)


@attrs.frozen
class Replayed:
    """A replay in full: the summary, every request's outcome (in the order they finished)
    and per node the cold loads and evictions."""

    summary: Summary
    outcomes: tuple[Outcome, ...]
    cold_loads: dict[str, int]
    evictions: dict[str, int]


@attrs.define(eq=False)
class _Harness:
    nodes: dict[str, VirtualNode]
    pick: Picker
    affinity: AffinityTable | None
    heartbeat: float
    queue_timeout: float
    client_timeout: float
    registry: NodeRegistry = attrs.field(factory=NodeRegistry)
    queues: QueueBook = attrs.field(factory=QueueBook)
    history: LatencyHistory = attrs.field(factory=LatencyHistory)
    outcomes: list[Outcome] = attrs.field(factory=list)
    continuing: collections.Counter[str] = attrs.field(factory=collections.Counter)
    prompt_tokens: int = 0
    ram_only: bool = False  # hide the accelerators from the router (see as_ram_only())
    stand_in: StandIn | None = None
    abandon: Callable[[], bool] | None = None
    abandoned: bool = False
    stop: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def beat(self) -> None:
        now = trio.current_time()
        for name, node in self.nodes.items():
            report = node.report(now)
            if self.ram_only:
                report = as_ram_only(report)
            self.registry.apply_report(report, now)
            self.history.observe(report)
            self.queues.set_limit(name, report.parallel_slots)
        self.changed()

    async def heartbeats(self) -> None:
        while True:
            self.beat()
            await trio.sleep(self.heartbeat)

    async def session(self, session: Session) -> None:
        await trio.sleep_until(session.start)
        for turn in session.turns:
            await trio.sleep(turn.think)
            await self.request(turn)

    async def request(self, turn: Turn) -> None:
        arrival = trio.current_time()
        if self.abandon is not None and self.abandon():
            self.abandoned = True
            self.stop.cancel()
            return
        if not any(node.has(turn.model) for node in self.nodes.values()):
            self.outcomes.append(self._failed(turn, None, arrival, f"no node has {turn.model}"))
            return
        keys = prefix_keys(turn.messages)
        earlier = continuation_keys(turn.messages, keys)
        served_before = self.affinity.find(earlier, turn.model) if self.affinity else None
        route = RouteRequest(
            model=turn.model,
            kind=turn.kind,
            estimated_prompt_tokens=turn.prompt_tokens,
            affinity_node=served_before.node_id if served_before else None,
            affinity_tokens=served_before.tokens if served_before else 0,
        )
        self.prompt_tokens += turn.prompt_tokens
        node_id: str | None = None
        outcome: Outcome | None = None
        with trio.move_on_after(self.client_timeout):
            placed = await self._place(route, arrival)
            if placed is None:
                outcome = self._failed(turn, None, arrival, "no node could take it in time")
            else:
                node_id, model = placed
                if self.affinity is not None and keys:
                    self.affinity.remember(keys[-1], node_id, model, turn.prompt_tokens)
                if len(turn.messages) > 2:
                    self.continuing[node_id] += 1
                async with self.queues.lease(node_id, model, turn.kind) as lease:
                    queued = trio.current_time() - arrival
                    served = await self.nodes[node_id].serve(
                        model, turn.prompt_tokens, earlier, turn.output_tokens
                    )
                    lease.succeeded()
                latency = trio.current_time() - arrival
                # As the router does: service time, from the slot to the last token.
                self.history.record(
                    node_id,
                    model,
                    (latency - queued) * 1000,
                    served.tokens_per_second or None,
                )
                outcome = Outcome(
                    node_id,
                    turn.model,
                    turn.kind,
                    latency,
                    queued + served.ttft,
                    served.cold,
                    served.cached_tokens,
                    offload=served.offload,
                    served_model=model if model != turn.model else None,
                )
        self.outcomes.append(outcome or self._failed(turn, node_id, arrival, "client timeout"))

    def _failed(self, turn: Turn, node_id: str | None, arrival: float, why: str) -> Outcome:
        waited = trio.current_time() - arrival
        return Outcome(node_id, turn.model, turn.kind, waited, waited, False, 0, why)

    async def _place(self, route: RouteRequest, arrival: float) -> tuple[str, str] | None:
        """The policy's node and the model it serves (the one asked for unless a stand-in
        takes a cold load's place), waiting for the fleet to change while none is eligible."""
        while True:
            fleet = self.registry.snapshot(self.queues.load_for)
            now = trio.current_time()
            node_id = self.pick(route, fleet, now)
            if node_id is not None:
                node = fleet.node(node_id)
                if self.stand_in is not None and node is not None and not node.loaded(route.model):
                    return self.stand_in(route, fleet, now) or (node_id, route.model)
                return node_id, route.model
            remaining = arrival + self.queue_timeout - trio.current_time()
            if remaining <= 0:
                return None
            with trio.move_on_after(remaining):
                await self._changed.wait()


def as_ram_only(report: NodeReport) -> NodeReport:
    """``report`` as a router that judges memory by RAM alone would read it (herd before it
    read accelerators): no devices, and every loaded model taken to be wholly where it runs."""
    return attrs.evolve(
        report,
        gpus=(),
        loaded_models=tuple(attrs.evolve(m, vram_bytes=m.size_bytes) for m in report.loaded_models),
    )


def picker(policy: str, history: LatencyHistory, settings: ScoringSettings, seed: int) -> Picker:
    """The placement function for ``policy`` (one of :data:`POLICIES`)."""
    rng = random.Random(seed)
    if policy == "herd":
        return lambda r, f, now: _winner(score(r, f, history.view(), now, settings, rng))
    if policy == "least-connections":
        return lambda r, f, now: least_connections(r, f, rng)
    if policy == "round-robin":
        rr = RoundRobin()
        return lambda r, f, now: rr.pick(r, f, rng)
    if policy == "random":
        return lambda r, f, now: uniform(r, f, rng)
    raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")


def _winner(decision: RouteDecision) -> str | None:
    return decision.winner.node_id if decision.winner is not None else None


def stand_in(history: LatencyHistory, settings: ScoringSettings, seed: int) -> StandIn:
    """VRAM-aware substitution as the router does it: the models of the request's category
    loaded somewhere, closest in size first; the best-scored node holding the first of them."""
    rng = random.Random(seed)

    def find(route: RouteRequest, fleet: FleetSnapshot, now: float) -> tuple[str, str] | None:
        for model in loaded_alternatives(fleet, route.model):
            asked = attrs.evolve(route, model=model, affinity_node=None, affinity_tokens=0)
            decision = score(asked, fleet, history.view(), now, settings, rng)
            for candidate in decision.ranked:
                node = fleet.node(candidate.node_id)
                if node is not None and node.loaded(model) is not None:
                    return candidate.node_id, model
        return None

    return find


async def replay(
    fleet: Sequence[SimConfig],
    trace: Sequence[Session],
    policy: str,
    *,
    seed: int = 1,
    settings: ScoringSettings | None = None,
    heartbeat: float = 5.0,
    queue_timeout: float = 30.0,
    client_timeout: float = 300.0,
    ram_only: bool = False,
    keep_alive: float | None = None,
    substitution: bool = False,
    abandon: Callable[[], bool] | None = None,
) -> Summary:
    """Replay ``trace`` on a fresh virtual ``fleet`` under ``policy``; see the module doc.
    ``ram_only``: the router is not told of the nodes' accelerators (:func:`as_ram_only`)."""
    replayed = await replay_detailed(
        fleet,
        trace,
        policy,
        seed=seed,
        settings=settings,
        heartbeat=heartbeat,
        queue_timeout=queue_timeout,
        client_timeout=client_timeout,
        ram_only=ram_only,
        keep_alive=keep_alive,
        substitution=substitution,
        abandon=abandon,
    )
    return replayed.summary


async def replay_detailed(
    fleet: Sequence[SimConfig],
    trace: Sequence[Session],
    policy: str,
    *,
    seed: int = 1,
    settings: ScoringSettings | None = None,
    heartbeat: float = 5.0,
    queue_timeout: float = 30.0,
    client_timeout: float = 300.0,
    ram_only: bool = False,
    keep_alive: float | None = None,
    substitution: bool = False,
    abandon: Callable[[], bool] | None = None,
) -> Replayed:
    """:func:`replay`, returning every outcome too. Raises :class:`ReplayAbandoned` when
    ``abandon`` returned True."""
    if keep_alive is not None:
        fleet = [attrs.evolve(config, keep_alive=keep_alive) for config in fleet]
    nodes = {config.name: VirtualNode(config) for config in fleet}
    history = LatencyHistory()
    scoring = settings or ScoringSettings()
    harness = _Harness(
        nodes=nodes,
        pick=picker(policy, history, scoring, seed),
        affinity=AffinityTable() if policy == "herd" else None,
        heartbeat=heartbeat,
        queue_timeout=queue_timeout,
        client_timeout=client_timeout,
        history=history,
        ram_only=ram_only,
        stand_in=stand_in(history, scoring, seed) if substitution and policy == "herd" else None,
        abandon=abandon,
    )
    harness.queues.on_release = harness.changed
    with harness.stop:
        async with trio.open_nursery() as nursery:
            harness.beat()
            nursery.start_soon(harness.heartbeats)
            async with trio.open_nursery() as clients:
                for session in trace:
                    clients.start_soon(harness.session, session)
            nursery.cancel_scope.cancel()
    if harness.abandoned:
        raise ReplayAbandoned(f"replay stopped after {len(harness.outcomes)} requests")
    return Replayed(
        summary=summarize(policy, harness),
        outcomes=tuple(harness.outcomes),
        cold_loads={name: node.cold_loads for name, node in nodes.items()},
        evictions={name: node.evictions for name, node in nodes.items()},
    )


def summarize(policy: str, harness: _Harness) -> Summary:
    done = [o for o in harness.outcomes if o.error is None]
    latencies = [o.latency for o in done]
    ttfts = [o.ttft for o in done]
    served = collections.Counter(o.node_id for o in done if o.node_id is not None)
    total = max(1, len(done))
    turns = sum(harness.continuing.values())
    return Summary(
        policy=policy,
        requests=len(harness.outcomes),
        errors=len(harness.outcomes) - len(done),
        mean=statistics.fmean(latencies) if latencies else math.nan,
        p95=percentile(latencies, 0.95),
        ttft_mean=statistics.fmean(ttfts) if ttfts else math.nan,
        ttft_p95=percentile(ttfts, 0.95),
        cold_loads=sum(n.cold_loads for n in harness.nodes.values()),
        evictions=sum(n.evictions for n in harness.nodes.values()),
        cached_share=sum(o.cached_tokens for o in done) / max(1, harness.prompt_tokens),
        share={name: served[name] / total for name in harness.nodes},
        conversation_share=max(harness.continuing.values(), default=0) / max(1, turns),
        spilled=sum(1 for o in done if o.offload >= SPILL_SHARE),
    )


def run(
    fleet: Sequence[SimConfig],
    trace: Sequence[Session],
    policy: str,
    **options: float | int | bool | ScoringSettings | None,
) -> Summary:
    """:func:`replay` from synchronous code, on a virtual clock that jumps when all is idle."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    summary: Summary = trio.run(
        lambda: replay(fleet, trace, policy, **options),  # type: ignore[arg-type]
        clock=clock,
    )
    return summary


def run_detailed(
    fleet: Sequence[SimConfig],
    trace: Sequence[Session],
    policy: str,
    **options: float | int | bool | ScoringSettings | Callable[[], bool] | None,
) -> Replayed:
    """:func:`replay_detailed` from synchronous code, on a virtual clock (see :func:`run`).
    Raises :class:`ReplayAbandoned` when the ``abandon`` option returned True."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    replayed: Replayed = trio.run(
        lambda: replay_detailed(fleet, trace, policy, **options),  # type: ignore[arg-type]
        clock=clock,
    )
    return replayed
