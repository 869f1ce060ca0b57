"""Choosing a node and opening the upstream stream: scoring, attempts, retries, fallbacks.

Theory of operation. A request names its models in order (the primary, then each
``fallback_models`` entry). :func:`next_choice` picks the next attempt: the first named model the
scorer finds a node for (a hot node if any; else a cold load), with context protection applied.
Substitution (another model than the ones named) is opt-in: only when the operator turned on
``vram_fallback`` and the request did not refuse it (``allow_substitution``), and only when no
named model is loaded anywhere it could run, does a loaded model of the primary's category take
the request instead of a cold load. Every substitution is flagged (``X-Herd-Fallback``, the
response's ``model`` field, the trace).

The chosen attempt takes a slot on that node (a :class:`~herd.state.queues.Lease`, waiting in
the node's queue if it is full), sends the request, and waits for the first byte under a cancel
scope (``first_byte_timeout``). Text is always streamed from the backend, so the first byte is
the first token, not the whole answer. An attempt that fails before its first byte (connect
error, timeout, 5xx, broken connection, the node saying it lacks the model) closes its upstream
request (the backend stops working on it), releases its lease, adds its node to the request's
exclusions, and the request is re-scored, up to ``max_retries`` retries. The attempt that
produces a first byte is *opened*: its lease and its upstream response move into the request's
exit stack, owned by the request's nursery until the last byte or the client's departure. When
no node is eligible for any model yet some node has one of them (perhaps its backend is down,
its last model lists kept), the request waits for the fleet to change (a heartbeat, a node
joining, a slot freeing), up to ``queue_timeout``, then fails with 503.

A model no node has is a 404 at once, naming the closest names the fleet has, unless the
operator turned on ``auto_pull``: then the router's pull service (:mod:`herd.transport.pulls`)
pulls it and the request waits for the pull within its ``queue_timeout`` (503 with
``Retry-After`` while the pull goes on).

Errors raised: :class:`ModelNotFound` (no node has any of the models), :class:`NoEligibleNode`
(nothing could take it in time), :class:`Forbidden` (an auto-pull from a registry host the
operator has not allowed), the last :class:`NodeError` when retries are exhausted.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any, Protocol, cast

import attrs
import httpx
import trio

from herd.core.api import chat
from herd.core.api.shaping import InferenceRequest
from herd.core.errors import (
    HerdError,
    ModelNotFound,
    NodeBadStatus,
    NodeError,
    NodeTimeout,
    NodeUnreachable,
    NoEligibleNode,
)
from herd.core.models import FleetSnapshot
from herd.core.policy import context, virtual
from herd.core.policy.deadlines import first_byte_budget
from herd.core.policy.substitutes import loaded_alternatives
from herd.core.scoring import RouteDecision, RouteRequest, score
from herd.state.queues import Lease
from herd.state.state import RouterState
from herd.transport.bodies import check_encoding, error_detail
from herd.transport.client import backend_headers
from herd.transport.errors import map_node_errors
from herd.transport.model_admin import pull_target
from herd.transport.pulls import DONE, check_pull_name

log = logging.getLogger("herd.proxy")

CLOSE_TIMEOUT = 0.1  # seconds allowed to close an upstream connection after cancellation
SUGGESTIONS = 3  # closest model names named in a 404


@attrs.define(eq=False)
class Opened:
    """An attempt that produced its first byte; the request's relay takes it from here."""

    node_id: str
    model: str
    retries: int
    fallback: bool
    substitution: str | None  # None, "fallback_models", "vram" or "context"
    context_action: str | None
    decision: RouteDecision
    excluded: tuple[str, ...]
    response: httpx.Response
    first_chunk: bytes
    chunks: AsyncGenerator[bytes, None]
    lease: Lease
    first_byte_at: float  # router clock


@attrs.define(eq=False)
class Attempts:
    """What the request has tried so far (for traces and errors)."""

    tries: int = 0  # attempts made (the first one and every retry)
    retries: int = 0
    last_node: str | None = None
    excluded: list[str] = attrs.field(factory=list)
    last_error: HerdError | None = None
    last_decision: RouteDecision | None = None
    virtual_rule: str | None = None  # the rule a virtual model name resolved by


class Closable(Protocol):
    async def aclose(self) -> None: ...


async def aclose_shielded(resource: Closable) -> None:
    """Close an upstream response (or its iterator) even while the request is being
    cancelled, within :data:`CLOSE_TIMEOUT`."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT) as scope:
        await resource.aclose()
    if scope.cancelled_caught:
        log.debug("closing upstream response took over %.0f ms", CLOSE_TIMEOUT * 1000)


def models_known(state: RouterState, models: tuple[str, ...]) -> bool:
    """Does any node (in any state) have one of ``models``? Reads the registry directly. A node
    whose backend can't be read now still counts, by its last known lists."""
    wanted = set(models)
    for record in state.registry.records():
        report = record.report
        if not wanted.isdisjoint(report.loaded_index) or not wanted.isdisjoint(
            report.available_index
        ):
            return True
    return False


def model_bytes(state: RouterState, node_id: str, model: str) -> int:
    """The size of ``model`` on ``node_id`` as the node reports it (0 = unknown)."""
    record = state.registry.get(node_id)
    if record is None:
        return 0
    report = record.report
    loaded = report.loaded_index.get(model)
    if loaded is not None and loaded.size_bytes:
        return loaded.size_bytes
    available = report.available_index.get(model)
    return available.size_bytes if available is not None else 0


def closest_models(state: RouterState, model: str) -> tuple[str, ...]:
    """The fleet's model names closest to ``model`` (for "did you mean ...?")."""
    names: set[str] = set()
    for record in state.registry.records():
        names.update(record.report.loaded_index)
        names.update(record.report.available_index)
    bare = {name.removesuffix(":latest"): name for name in names}
    found = difflib.get_close_matches(model.removesuffix(":latest"), bare, SUGGESTIONS, 0.6)
    return tuple(bare[name] for name in found)


def not_found(state: RouterState, request: InferenceRequest) -> ModelNotFound:
    return ModelNotFound(request.model, suggestions=closest_models(state, request.model))


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


def substitution_allowed(state: RouterState, request: InferenceRequest) -> bool:
    """Opt-in twice over: the operator's setting, and the request not refusing it."""
    return state.settings.vram_fallback and request.allow_substitution


def _route_request(
    state: RouterState, request: InferenceRequest, model: str, attempts: Attempts
) -> RouteRequest:
    earlier = state.affinity.find(request.earlier_keys, model) if request.earlier_keys else None
    return RouteRequest(
        model=model,
        kind=request.route.kind,
        estimated_prompt_tokens=request.estimated_prompt_tokens,
        requested_context=request.requested_context,
        excluded_nodes=frozenset(attempts.excluded),
        affinity_node=earlier.node_id if earlier is not None else None,
        affinity_tokens=earlier.tokens if earlier is not None else 0,
        only_node=request.node,  # #19: metadata.node (benchmarks)
    )


def _score(state: RouterState, fleet: FleetSnapshot, route: RouteRequest) -> RouteDecision:
    return score(route, fleet, state.history.view(), trio.current_time(), state.scoring, state.rng)


def remember_conversation(state: RouterState, request: InferenceRequest, opened: Opened) -> None:
    """The node that took this prompt now holds it in its cache: the next turn prefers it."""
    if request.prompt_key is not None:
        state.affinity.remember(
            request.prompt_key, opened.node_id, opened.model, request.estimated_prompt_tokens
        )


def _best_loaded(
    state: RouterState,
    fleet: FleetSnapshot,
    request: InferenceRequest,
    model: str,
    attempts: Attempts,
    *,
    min_context: int,
    include_self: bool,
    others: bool,
) -> tuple[str, str, RouteDecision] | None:
    """The best (node, model) where a stand-in for ``model`` is already loaded: ``model``
    itself elsewhere (``include_self``) and, with ``others``, other models of its category."""
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
        decision = _score(state, fleet, _route_request(state, request, name, attempts))
        for candidate in decision.ranked:
            node = fleet.node(candidate.node_id)
            loaded = node.loaded(name) if node is not None else None
            if loaded is not None and loaded.context_length >= min_context:
                return candidate.node_id, name, decision
    return None


def choose(
    state: RouterState,
    request: InferenceRequest,
    model: str,
    attempts: Attempts,
    *,
    substitute: bool = False,
) -> Choice | None:
    """Score the fleet for ``model`` and apply context protection (moving to another model
    only when ``substitute``). Synchronous: decides only; the attempt does the I/O."""
    fleet = state.snapshot()
    decision = _score(state, fleet, _route_request(state, request, model, attempts))
    attempts.last_decision = decision
    winner = decision.winner
    if winner is None:
        return None
    choice = Choice(winner.node_id, model, request.upstream_body, decision, None, None, winner.hot)
    wanted = request.requested_context
    if state.settings.context_protection and wanted:
        node = fleet.node(winner.node_id)
        assert node is not None
        verdict = context.verdict(wanted, node, model)
        if verdict == "strip":
            state.events["context_stripped"] += 1
            return attrs.evolve(
                choice, body=context.without_num_ctx(choice.body), context_action="stripped"
            )
        if verdict == "too_small":
            found = _best_loaded(
                state,
                fleet,
                request,
                model,
                attempts,
                min_context=wanted,
                include_self=True,
                others=substitute,
            )
            if found is None:
                state.events["context_passthrough"] += 1
                log.info(
                    "%s needs %d tokens of context; no loaded model has them: "
                    "passing num_ctx through (a reload)",
                    model,
                    wanted,
                )
                return attrs.evolve(choice, context_action="passthrough")
            node_id, served, better = found
            state.events["context_upgraded"] += 1
            return Choice(
                node_id,
                served,
                context.without_num_ctx(choice.body),
                better,
                None if served == model else "context",
                "upgraded",
                True,
            )
    return choice


def stand_in(state: RouterState, request: InferenceRequest, attempts: Attempts) -> Choice | None:
    """VRAM-aware substitution: the best node where a model of the primary's category is
    loaded (never one the request named: those were not loaded anywhere they could run)."""
    fleet = state.snapshot()
    found = _best_loaded(
        state,
        fleet,
        request,
        request.model,
        attempts,
        min_context=request.requested_context or 0,
        include_self=False,
        others=True,
    )
    if found is None or found[1] in request.models:
        return None
    node_id, served, decision = found
    log.info(
        "substitution: %s is loaded on %s; not cold-loading %s", served, node_id, request.model
    )
    body = request.upstream_body
    if request.requested_context:
        body = context.without_num_ctx(body)  # the stand-in's loaded window holds it
    return Choice(node_id, served, body, decision, "vram", None, True)


def next_choice(state: RouterState, request: InferenceRequest, attempts: Attempts) -> Choice | None:
    """The next attempt's target; see the module docstring. None: nothing is eligible now."""
    if request.groups:  # a virtual name: the first group with a hot candidate, else cold
        for group in request.groups:
            cold_candidate: Choice | None = None
            for model in group:
                choice = choose(state, request, model, attempts)
                if choice is not None and choice.hot:
                    return choice
                cold_candidate = cold_candidate or choice
            if cold_candidate is not None:
                return cold_candidate
        return None
    substitute = substitution_allowed(state, request)
    cold: Choice | None = None
    for model in request.models:
        choice = choose(state, request, model, attempts, substitute=substitute)
        if choice is None:
            continue
        if not substitute or choice.hot:
            return choice
        cold = cold or choice  # a cold load of a named model: the last resort
    if cold is None:
        return None
    return stand_in(state, request, attempts) or cold


def maybe_prewarm(state: RouterState, choice: Choice) -> None:
    """A deep queue on the chosen node warms the model on the runner-up (if it is cold there)."""
    if state.prewarm_send is None:
        return
    depth = state.queues.counters(choice.node_id, choice.model).pending
    if depth < state.settings.prewarm_queue_depth:
        return
    for candidate in choice.decision.ranked:
        if candidate.node_id != choice.node_id and not candidate.hot:
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                state.prewarm_send.send_nowait((candidate.node_id, choice.model))
            return


async def open_upstream(
    state: RouterState,
    request: InferenceRequest,
    stack: contextlib.AsyncExitStack,
    attempts: Attempts | None = None,
) -> Opened:
    """Route ``request`` and open its upstream response; see the module docstring.
    ``attempts`` (optional) is filled in as it goes, so a caller can trace a failure."""
    attempts = attempts if attempts is not None else Attempts()
    config = state.config
    deadline = trio.current_time() + config.queue_timeout
    if not models_known(state, request.models):
        resolution = resolve_virtual(state, request)
        if resolution is None:
            await auto_pull(state, request, deadline)
        else:
            attempts.virtual_rule = resolution.rule
            request = attrs.evolve(request, groups=resolution.groups)
    while True:
        while attempts.tries <= config.max_retries:
            choice = next_choice(state, request, attempts)
            if choice is None:
                break
            if attempts.tries:
                attempts.retries += 1
                state.retries_total += 1
                log.info(
                    "retrying %s on %s after: %s",
                    choice.model,
                    choice.node_id,
                    attempts.last_error.message if attempts.last_error else "",
                )
            attempts.tries += 1
            attempts.last_node = choice.node_id
            try:
                opened = await _attempt(state, request, choice, attempts, stack)
            except NodeError as exc:
                attempts.last_error = exc
                attempts.excluded.append(choice.node_id)
                continue
            if opened.fallback:
                state.fallbacks_total += 1
            if opened.substitution == "vram":
                state.events["vram_fallbacks"] += 1
            remember_conversation(state, request, opened)
            maybe_prewarm(state, choice)
            return opened
        if attempts.last_error is not None:
            # Every node that could serve has failed this request: say why, don't wait.
            raise attempts.last_error
        # Nothing eligible now: wait for the fleet to change, then re-score everything.
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            raise NoEligibleNode(_no_node_message(request, attempts))
        with trio.move_on_after(remaining):
            await state.wait_fleet_changed()
        if not models_known(state, request.models):
            raise not_found(state, request)


def resolve_virtual(state: RouterState, request: InferenceRequest) -> virtual.Resolution | None:
    """The candidates of a virtual model name (an operator alias or an agent default)."""
    settings = state.settings
    resolution = virtual.resolve(
        request.model,
        state.snapshot(),
        virtual.aliases_from(settings.model_aliases),
        settings.agent_defaults,
        needs=request.needs,
        prefer_tools=request.uses_tools,
    )
    if resolution is not None and not models_known(state, resolution.candidates):
        return None  # an alias to models no node has: as unknown as the name itself
    return resolution


async def auto_pull(state: RouterState, request: InferenceRequest, deadline: float) -> None:
    """No node has any of the request's models: 404 at once, or (auto-pull on) have the
    router's pull service pull the primary and wait for it until ``deadline``.

    Raises :class:`ModelNotFound` (off, or the pull failed), :class:`NoEligibleNode` with
    ``Retry-After`` (the pull is still going at the deadline), :class:`Forbidden` (a registry
    host the operator has not allowed)."""
    model = request.model
    if not state.settings.auto_pull or state.pulls is None:
        raise not_found(state, request)
    check_pull_name(model, state.config.pull_hosts)
    failed = state.pulls.recent_failure(model, trio.current_time())
    if failed is not None:
        raise ModelNotFound(model, detail=f"auto-pull failed: {failed.error}")
    job = state.pulls.start(model, pull_target(state.snapshot()), "auto-pull")
    with trio.move_on_at(deadline):
        await job.done.wait()
    if not job.done.is_set():
        shown = f", {job.view()['percent']}% done" if job.total else ""
        raise NoEligibleNode(
            f"{model} is being pulled onto {job.node_id}{shown}; try again shortly",
            retry_after=10,
        )
    if job.status != DONE:
        raise ModelNotFound(model, detail=f"auto-pull failed: {job.error}")
    state.events["auto_pulls"] += 1


def _no_node_message(request: InferenceRequest, attempts: Attempts) -> str:
    reasons = ""
    if attempts.last_decision is not None and attempts.last_decision.eliminated:
        reasons = "; ".join(f"{e.node_id}: {e.reason}" for e in attempts.last_decision.eliminated)
    names = ", ".join(request.models)
    return f"no node can serve {names} right now" + (f" ({reasons})" if reasons else "")


async def _attempt(
    state: RouterState,
    request: InferenceRequest,
    choice: Choice,
    attempts: Attempts,
    stack: contextlib.AsyncExitStack,
) -> Opened:
    node_id, model = choice.node_id, choice.model
    node = state.registry.get(node_id)
    if node is None:
        raise NodeUnreachable(f"node {node_id} left before the request was sent", node_id=node_id)
    url = node.report.backend.url.rstrip("/") + request.route.upstream_path
    payload = {"model": model, **choice.body}
    if isinstance(payload.get("think"), str):
        payload["think"] = chat.think_for_model(payload["think"], model)
    body = json.dumps(payload).encode()
    headers = {"content-type": "application/json"}
    headers.update(backend_headers(node.report, state.config.auth_token))
    budget = first_byte_budget(
        maximum=state.config.first_byte_timeout,
        hot=choice.hot,
        prompt_tokens=request.estimated_prompt_tokens,
        prefill_tokens_per_second=state.history.prefill_rate(node_id, model),
        model_bytes=model_bytes(state, node_id, model),
        load_bytes_per_second=state.history.load_rate(node_id),
    )
    async with contextlib.AsyncExitStack() as attempt_stack:
        lease = await attempt_stack.enter_async_context(
            state.queues.lease(node_id, model, request.route.kind)
        )
        try:
            # The budget runs from the slot: time queued behind the node's other requests is
            # the queue's, not the node's.
            with (
                trio.fail_after(budget),
                map_node_errors(node_id, "before the first byte"),
            ):
                upstream = state.client.build_request("POST", url, content=body, headers=headers)
                response = await state.client.send(upstream, stream=True)
                attempt_stack.push_async_callback(aclose_shielded, response)
                if 300 <= response.status_code < 400:
                    raise NodeBadStatus(
                        f"node {node_id} answered a redirect ({response.status_code} to "
                        f"{response.headers.get('location', '?')[:200]}); herd follows none",
                        node_id=node_id,
                        upstream_status=response.status_code,
                    )
                if response.status_code >= 500 or response.status_code == 404:
                    detail = await error_detail(response, node_id)
                    raise NodeBadStatus(
                        f"node {node_id} answered {response.status_code}: {detail}",
                        node_id=node_id,
                        upstream_status=response.status_code,
                    )
                check_encoding(response, node_id)
                # aiter_raw is an async generator (typed as an iterator): close it explicitly.
                chunks = cast(AsyncGenerator[bytes, None], response.aiter_raw())
                attempt_stack.push_async_callback(aclose_shielded, chunks)
                first = b""
                with contextlib.suppress(StopAsyncIteration):
                    first = await chunks.__anext__()
        except trio.TooSlowError as exc:
            expected = (
                ""
                if budget >= state.config.first_byte_timeout
                else " (what this node usually needs)"
            )
            raise NodeTimeout(
                f"node {node_id} sent no first byte within {budget:.3g} s{expected}",
                node_id=node_id,
            ) from exc
        # Success: the request's stack now owns the lease and the response.
        stack.push_async_exit(attempt_stack.pop_all())
    substitution: str | None
    if request.groups:  # a virtual name: every model is "another"; a fallback past group 1
        fallback, substitution = model not in request.groups[0], choice.substitution or "alias"
    else:
        fallback = model != request.model
        substitution = choice.substitution or ("fallback_models" if fallback else None)
    return Opened(
        node_id=node_id,
        model=model,
        retries=attempts.retries,
        fallback=fallback,
        substitution=substitution,
        context_action=choice.context_action,
        decision=choice.decision,
        excluded=tuple(attempts.excluded),
        response=response,
        first_chunk=first,
        chunks=chunks,
        lease=lease,
        first_byte_at=trio.current_time(),
    )
