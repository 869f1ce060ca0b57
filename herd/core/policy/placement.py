"""Placement: which node and which model an inference attempt goes to, and with which body. Pure.

Theory of operation. A request names its models in order (the primary, then each
``fallback_models`` entry). :func:`next_choice` picks the next attempt: the first named model the
scorer finds a node for (a hot node if any; else a cold load), with context protection applied
(:func:`choose`). Substitution (another model than the ones named) is opt-in: the caller passes
``substitute`` only when the operator turned on ``vram_fallback`` and the request did not refuse
it (``allow_substitution``); then, and only when no named model is loaded anywhere it could run,
a loaded model of the primary's category takes the request instead of a cold load
(:func:`stand_in`). A virtual model name (an alias) is tried group by group, in order: the first
group with any candidate that can run takes the request, on a hot candidate of that group if
one is loaded, else on the group's first cold one.

Context protection: a request asking for more context (``num_ctx``) than the loaded copy's
window either has ``num_ctx`` stripped (the window is big enough anyway), moves to a loaded copy
whose window fits (the same model elsewhere, or, with ``substitute``, another model of the
category), or passes through (a reload with the bigger window, the last resort).

Everything a decision reads is in one :class:`Situation` (the fleet snapshot, the learned
history, the time, the scorer's settings and random source, the affinity lookup), captured
once per decision by the caller. A decision returns a :class:`Placement`: the choice (None:
nothing is eligible now), the ranking it was made from, the counters to add and the lines to
log. Nothing here counts, logs or reads a clock.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import attrs

from herd.core.api.shaping import InferenceRequest
from herd.core.models import FleetSnapshot
from herd.core.policy import context
from herd.core.policy.substitutes import loaded_alternatives
from herd.core.scoring import History, RouteDecision, RouteRequest, ScoringSettings, score

# (node_id, prompt tokens) of the longest earlier prompt of this request served with a model.
AffinityLookup = Callable[[str], "tuple[str, int] | None"]


def no_affinity(model: str) -> tuple[str, int] | None:
    return None


@attrs.frozen
class Situation:
    """What one placement decision reads, captured once."""

    fleet: FleetSnapshot
    history: History
    now: float
    scoring: ScoringSettings
    rng: random.Random
    context_protection: bool = True
    affinity: AffinityLookup = no_affinity


@attrs.frozen
class Choice:
    """Where one attempt goes, and with which body: the scorer's pick after the policies."""

    node_id: str
    model: str
    body: dict[str, Any]
    decision: RouteDecision
    substitution: str | None  # None, "vram" or "context": a model other than the ones named
    context_action: str | None  # None, "stripped", "upgraded" or "passthrough"
    hot: bool  # the model is loaded on that node


@attrs.frozen
class Placement:
    """A decision: the choice (None: nothing eligible now), the last ranking made (its
    eliminations say why nothing was), the event counters to add and the lines to log."""

    choice: Choice | None
    decision: RouteDecision | None = None
    events: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def then(self, other: Placement) -> Placement:
        """``other``'s choice and ranking, with both decisions' events and notes."""
        return Placement(
            other.choice,
            other.decision if other.decision is not None else self.decision,
            self.events + other.events,
            self.notes + other.notes,
        )


def route_request(
    request: InferenceRequest, model: str, excluded: frozenset[str], situation: Situation
) -> RouteRequest:
    earlier = situation.affinity(model) if request.earlier_keys else None
    return RouteRequest(
        model=model,
        kind=request.route.kind,
        estimated_prompt_tokens=request.estimated_prompt_tokens,
        requested_context=request.requested_context,
        excluded_nodes=excluded,
        affinity_node=earlier[0] if earlier is not None else None,
        affinity_tokens=earlier[1] if earlier is not None else 0,
        only_node=request.node,  # metadata.node: the one node the request allows
    )


def rank(route: RouteRequest, situation: Situation) -> RouteDecision:
    return score(
        route, situation.fleet, situation.history, situation.now, situation.scoring, situation.rng
    )


def best_loaded(
    request: InferenceRequest,
    model: str,
    excluded: frozenset[str],
    situation: Situation,
    *,
    min_context: int,
    include_self: bool,
    others: bool,
) -> tuple[str, str, RouteDecision] | None:
    """The best (node, model) where a stand-in for ``model`` is already loaded: ``model``
    itself elsewhere (``include_self``) and, with ``others``, other models of its category."""
    fleet = situation.fleet
    for name in loaded_alternatives(
        fleet,
        model,
        min_context=min_context,
        include_self=include_self,
        needs=request.needs,
        prefer_tools=request.uses_tools,
    ):
        if name != model and not others:
            continue
        decision = rank(route_request(request, name, excluded, situation), situation)
        for candidate in decision.ranked:
            node = fleet.node(candidate.node_id)
            loaded = node.loaded(name) if node is not None else None
            if loaded is not None and loaded.context_length >= min_context:
                return candidate.node_id, name, decision
    return None


def choose(
    request: InferenceRequest,
    model: str,
    excluded: frozenset[str],
    situation: Situation,
    *,
    substitute: bool = False,
) -> Placement:
    """Score the fleet for ``model`` and apply context protection (moving to another model
    only when ``substitute``)."""
    decision = rank(route_request(request, model, excluded, situation), situation)
    winner = decision.winner
    if winner is None:
        return Placement(None, decision)
    choice = Choice(winner.node_id, model, request.upstream_body, decision, None, None, winner.hot)
    wanted = request.requested_context
    if not (situation.context_protection and wanted):
        return Placement(choice, decision)
    node = situation.fleet.node(winner.node_id)
    assert node is not None
    verdict = context.verdict(wanted, node, model)
    if verdict == "strip":
        stripped = attrs.evolve(
            choice, body=context.without_num_ctx(choice.body), context_action="stripped"
        )
        return Placement(stripped, decision, ("context_stripped",))
    if verdict != "too_small":
        return Placement(choice, decision)
    found = best_loaded(
        request,
        model,
        excluded,
        situation,
        min_context=wanted,
        include_self=True,
        others=substitute,
    )
    if found is None:
        note = (
            f"{model} needs {wanted} tokens of context; no loaded model has them: "
            "passing num_ctx through (a reload)"
        )
        passthrough = attrs.evolve(choice, context_action="passthrough")
        return Placement(passthrough, decision, ("context_passthrough",), (note,))
    node_id, served, better = found
    upgraded = Choice(
        node_id,
        served,
        context.without_num_ctx(choice.body),
        better,
        None if served == model else "context",
        "upgraded",
        True,
    )
    return Placement(upgraded, decision, ("context_upgraded",))


def stand_in(
    request: InferenceRequest, excluded: frozenset[str], situation: Situation
) -> Placement:
    """VRAM-aware substitution: the best node where a model of the primary's category is
    loaded (never one the request named: those were not loaded anywhere they could run)."""
    found = best_loaded(
        request,
        request.model,
        excluded,
        situation,
        min_context=request.requested_context or 0,
        include_self=False,
        others=True,
    )
    if found is None or found[1] in request.models:
        return Placement(None)
    node_id, served, decision = found
    note = f"substitution: {served} is loaded on {node_id}; not cold-loading {request.model}"
    body = request.upstream_body
    if request.requested_context:
        body = context.without_num_ctx(body)  # the stand-in's loaded window holds it
    return Placement(Choice(node_id, served, body, decision, "vram", None, True), None, (), (note,))


def next_choice(
    request: InferenceRequest,
    excluded: frozenset[str],
    situation: Situation,
    *,
    substitute: bool,
) -> Placement:
    """The next attempt's target; see the module docstring."""
    made = Placement(None)
    if request.groups:  # a virtual name: the first group that can run it, hot before cold
        for group in request.groups:
            cold_candidate: Placement | None = None
            for model in group:
                made = made.then(choose(request, model, excluded, situation))
                if made.choice is not None and made.choice.hot:
                    return made
                if cold_candidate is None and made.choice is not None:
                    cold_candidate = made
            if cold_candidate is not None:
                return attrs.evolve(made, choice=cold_candidate.choice)
        return attrs.evolve(made, choice=None)
    cold: Choice | None = None
    for model in request.models:
        made = made.then(choose(request, model, excluded, situation, substitute=substitute))
        if made.choice is None:
            continue
        if not substitute or made.choice.hot:
            return made
        cold = cold or made.choice  # a cold load of a named model: the last resort
    if cold is None:
        return attrs.evolve(made, choice=None)
    substituted = stand_in(request, excluded, situation)
    if substituted.choice is not None:
        return attrs.evolve(made.then(substituted), decision=made.decision)
    return attrs.evolve(made.then(substituted), choice=cold, decision=made.decision)
