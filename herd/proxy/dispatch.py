"""Choosing a node and opening the upstream stream: scoring, attempts, retries, fallbacks.

Theory of operation. A request tries its models in order (the primary, then each
``fallback_models`` entry). For a model, the scorer ranks the fleet; the winner gets an *attempt*:
take a slot on that node (a :class:`~herd.router.queues.Lease`, waiting in the node's queue if it
is full), send the request, and wait for the first byte under a cancel scope
(``first_byte_timeout``). An attempt that fails before its first byte (connect error, timeout,
5xx, broken connection, the node saying it lacks the model) releases its lease at once, adds
its node to the request's exclusions, and the request is re-scored, up to ``max_retries``
retries. The attempt that produces a first byte is *opened*: its lease and its upstream response
move into the request's exit stack, owned by the request's nursery until the last byte or the
client's departure. When no node is eligible for any model yet some node has one of them, the
request waits for the fleet to change (a heartbeat, a node joining, a slot freeing), up to
``queue_timeout``, then fails with 503.

Errors raised: :class:`ModelNotFound` (no node has any of the models), :class:`NoEligibleNode`
(nothing could take it in time), the last :class:`NodeError` when retries are exhausted.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any, Protocol, cast

import attrs
import httpx
import trio

from herd.errors import (
    HerdError,
    ModelNotFound,
    NodeBadStatus,
    NodeError,
    NodeTimeout,
    NodeUnreachable,
    NoEligibleNode,
)
from herd.models import FleetSnapshot
from herd.policy import context
from herd.policy.substitutes import loaded_alternatives
from herd.proxy.shaping import InferenceRequest
from herd.router import model_admin
from herd.router.queues import Lease
from herd.router.state import RouterState
from herd.scoring import RouteDecision, RouteRequest, score

log = logging.getLogger("herd.proxy")

CLOSE_TIMEOUT = 0.1  # seconds allowed to close an upstream connection after cancellation


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
    """Does any node (in any state) have one of ``models``? Reads the registry directly."""
    wanted = set(models)
    for record in state.registry.records():
        report = record.report
        if any(m.name in wanted for m in report.loaded_models) or any(
            m.name in wanted for m in report.available_models
        ):
            return True
    return False


@attrs.frozen
class Choice:
    """Where one attempt goes, and with which body: the scorer's pick after the policies."""

    node_id: str
    model: str
    body: dict[str, Any]
    decision: RouteDecision
    substitution: str | None  # None, "vram" or "context": a model other than the one asked
    context_action: str | None  # None, "stripped", "upgraded" or "passthrough"


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
) -> tuple[str, str, RouteDecision] | None:
    """The best (node, model) where a stand-in for ``model`` is already loaded."""
    for name in loaded_alternatives(
        fleet, model, min_context=min_context, include_self=include_self
    ):
        decision = _score(state, fleet, _route_request(state, request, name, attempts))
        for candidate in decision.ranked:
            node = fleet.node(candidate.node_id)
            loaded = node.loaded(name) if node is not None else None
            if loaded is not None and loaded.context_length >= min_context:
                return candidate.node_id, name, decision
    return None


def choose(
    state: RouterState, request: InferenceRequest, model: str, attempts: Attempts
) -> Choice | None:
    """Score the fleet for ``model`` and apply context protection and VRAM-aware fallback.
    Synchronous: decides only; the attempt does the I/O."""
    fleet = state.snapshot()
    decision = _score(state, fleet, _route_request(state, request, model, attempts))
    attempts.last_decision = decision
    winner = decision.winner
    if winner is None:
        return None
    settings = state.settings
    choice = Choice(winner.node_id, model, request.upstream_body, decision, None, None)
    wanted = request.requested_context
    if settings.context_protection and wanted:
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
                state, fleet, request, model, attempts, min_context=wanted, include_self=True
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
            )
    if settings.vram_fallback and not winner.hot:
        found = _best_loaded(
            state, fleet, request, model, attempts, min_context=0, include_self=False
        )
        if found is not None:
            node_id, served, better = found
            state.events["vram_fallbacks"] += 1
            log.info(
                "vram fallback: %s is loaded on %s; not cold-loading %s", served, node_id, model
            )
            return Choice(node_id, served, choice.body, better, "vram", None)
    return choice


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
        await auto_pull(state, request.model)
    while True:
        for model in request.models:
            while attempts.tries <= config.max_retries:
                choice = choose(state, request, model, attempts)
                if choice is None:
                    break  # next model
                if attempts.tries:
                    attempts.retries += 1
                    state.retries_total += 1
                    log.info(
                        "retrying %s on %s after: %s",
                        model,
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
            raise ModelNotFound(request.model)


async def auto_pull(state: RouterState, model: str) -> None:
    """Pull ``model`` (on no node yet) to the best node, once for all concurrent requests.
    Raises :class:`ModelNotFound` when auto-pull is off or the pull fails."""
    if not state.settings.auto_pull:
        raise ModelNotFound(model)
    try:
        await model_admin.pull_once(state, model)
    except HerdError as exc:
        raise ModelNotFound(model, detail=f"auto-pull failed: {exc.message}") from exc
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
    body = json.dumps({"model": model, **choice.body}).encode()
    async with contextlib.AsyncExitStack() as attempt_stack:
        lease = await attempt_stack.enter_async_context(
            state.queues.lease(node_id, model, request.route.kind)
        )
        try:
            with trio.fail_after(state.config.first_byte_timeout):
                upstream = state.client.build_request(
                    "POST", url, content=body, headers={"content-type": "application/json"}
                )
                response = await state.client.send(upstream, stream=True)
                attempt_stack.push_async_callback(aclose_shielded, response)
                if response.status_code >= 500 or response.status_code == 404:
                    detail = (await response.aread())[:300].decode("utf-8", "replace")
                    raise NodeBadStatus(
                        f"node {node_id} answered {response.status_code}: {detail}",
                        node_id=node_id,
                        upstream_status=response.status_code,
                    )
                # aiter_raw is an async generator (typed as an iterator): close it explicitly.
                chunks = cast(AsyncGenerator[bytes, None], response.aiter_raw())
                attempt_stack.push_async_callback(aclose_shielded, chunks)
                first = b""
                with contextlib.suppress(StopAsyncIteration):
                    first = await chunks.__anext__()
        except trio.TooSlowError as exc:
            raise NodeTimeout(
                f"node {node_id} sent no first byte within {state.config.first_byte_timeout:g} s",
                node_id=node_id,
            ) from exc
        except httpx.TransportError as exc:
            raise NodeUnreachable(
                f"node {node_id} failed before the first byte: {type(exc).__name__}: {exc}",
                node_id=node_id,
            ) from exc
        # Success: the request's stack now owns the lease and the response.
        stack.push_async_exit(attempt_stack.pop_all())
    return Opened(
        node_id=node_id,
        model=model,
        retries=attempts.retries,
        fallback=model != request.model,
        substitution=choice.substitution or ("fallback_models" if model != request.model else None),
        context_action=choice.context_action,
        decision=choice.decision,
        excluded=tuple(attempts.excluded),
        response=response,
        first_chunk=first,
        chunks=chunks,
        lease=lease,
        first_byte_at=trio.current_time(),
    )
