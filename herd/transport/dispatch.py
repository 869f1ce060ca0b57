"""Routing one inference request: placement, attempts, retries, fallbacks, auto-pull.

Theory of operation. Where each attempt goes is the pure placement policy's decision
(:mod:`herd.core.policy.placement`: named models in order, context protection, opt-in
substitution), made on one :class:`~herd.core.policy.placement.Situation` captured from the
router's state; this module counts and logs what the decision reports, and runs the attempts
through the one attempt loop (:mod:`herd.transport.attempts`: exclusion and retry on node
failures, waiting for the fleet to change when nothing is eligible, up to ``queue_timeout``).
Every substitution is flagged (``X-Herd-Fallback``, the response's ``model`` field, the trace).

An attempt takes a slot on its node (a :class:`~herd.state.queues.Lease`, waiting in the
node's queue if it is full), sends the request, and waits for the first byte under a cancel
scope (the first-byte budget of :mod:`herd.core.policy.deadlines`, at most
``first_byte_timeout``). Text is always streamed from the backend, so the first byte is the
first token, not the whole answer. An attempt that fails before its first byte (connect error,
timeout, 5xx, a redirect, broken connection, the node saying it lacks the model) closes its
upstream request (the backend stops working on it) and releases its lease before the next
attempt. The attempt that produces a first byte is *opened*: its lease and its upstream
response move into the request's exit stack, owned by the request's nursery until the last byte
or the client's departure.

A model no node has is a 404 at once, naming the closest names the fleet has, unless the
operator turned on ``auto_pull``: then the router's pull service (:mod:`herd.transport.pulls`)
pulls it and the request waits for the pull within its ``queue_timeout`` (503 with
``Retry-After`` while the pull goes on).

With a shared state store (several routers, ``--state``), conversation affinity is the
fleet's: before placement the router asks the store which node took the request's earlier
prompts (within :data:`SHARED_AFFINITY_WAIT`; a slow or absent store leaves the router's own
memory to decide) and after it shares the node it chose.

Errors raised: :class:`ModelNotFound` (no node has any of the models), :class:`NoEligibleNode`
(nothing could take it in time), :class:`Forbidden` (an auto-pull from a registry host the
operator has not allowed), the last :class:`NodeError` when retries are exhausted.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator
from typing import Protocol, cast

import attrs
import httpx
import trio

from herd.core.api import chat
from herd.core.api.shaping import InferenceRequest
from herd.core.errors import (
    HerdError,
    ModelNotFound,
    NodeBadStatus,
    NodeTimeout,
    NodeUnreachable,
    NoEligibleNode,
)
from herd.core.models import NodeStatus
from herd.core.policy import placement, virtual
from herd.core.policy.deadlines import first_byte_budget
from herd.core.policy.models import closest_names
from herd.core.policy.placement import Choice, Placement, Situation
from herd.core.scoring import RouteDecision
from herd.state.queues import Lease
from herd.state.state import RouterState
from herd.transport.attempts import Attempts, Target, run_attempts
from herd.transport.bodies import check_encoding, error_detail
from herd.transport.errors import map_node_errors
from herd.transport.link import Link
from herd.transport.model_admin import pull_target
from herd.transport.pulls import DONE, check_pull_name

__all__ = ["Attempts", "Opened", "model_bytes", "models_known", "open_upstream"]

log = logging.getLogger("herd.proxy")

CLOSE_TIMEOUT = 0.1  # seconds allowed to close an upstream connection after cancellation
SHARED_AFFINITY_WAIT = 0.05  # seconds placement waits for the shared store's affinity


@attrs.define(eq=False)
class Opened:
    """An attempt that produced its first byte; the request's relay takes it from here."""

    node_id: str
    model: str
    retries: int
    fallback: bool
    substitution: str | None  # None, "fallback_models", "vram", "context" or "alias"
    context_action: str | None
    decision: RouteDecision
    excluded: tuple[str, ...]
    response: httpx.Response
    first_chunk: bytes
    chunks: AsyncGenerator[bytes, None]
    lease: Lease
    first_byte_at: float  # router clock


class Closable(Protocol):
    async def aclose(self) -> None: ...


async def aclose_shielded(resource: Closable) -> None:
    """Close an upstream response (or its iterator) even while the request is being
    cancelled, within :data:`CLOSE_TIMEOUT`."""
    # One scope, shielded with its own deadline: the same as a move_on_after inside a shield,
    # at half the cost (this runs twice per request).
    with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT) as scope:
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
    return closest_names(model, names)


def not_found(state: RouterState, request: InferenceRequest) -> ModelNotFound:
    """404 for a model no node lists, naming the closest names and, when a node's backend is
    down and has never listed its models, that node: the model may be there."""
    unknown = [
        record.report
        for record in state.registry.records()
        if record.status is not NodeStatus.OFFLINE
        and not record.report.backend.healthy
        and not record.report.available_models
        and not record.report.loaded_models
    ]
    detail = None
    if unknown:
        shown = unknown[:3]
        names = ", ".join(
            f"{r.node_id}'s backend is down: {r.backend.error or 'no answer'}" for r in shown
        )
        more = f" and {len(unknown) - len(shown)} more" if len(unknown) > len(shown) else ""
        detail = f"{names}{more}; its models are not known yet"
    return ModelNotFound(
        request.model, detail=detail, suggestions=closest_models(state, request.model)
    )


def substitution_allowed(state: RouterState, request: InferenceRequest) -> bool:
    """Opt-in twice over: the operator's setting, and the request not refusing it."""
    return state.settings.vram_fallback and request.allow_substitution


def situation(state: RouterState, request: InferenceRequest) -> Situation:
    """What a placement decision for ``request`` reads, captured from the state now."""

    def affinity(model: str) -> tuple[str, int] | None:
        served = state.affinity.find(request.earlier_keys, model)
        return (served.node_id, served.tokens) if served is not None else None

    return Situation(
        fleet=state.snapshot(),
        history=state.history.view(),
        now=trio.current_time(),
        scoring=state.scoring,
        rng=state.rng,
        context_protection=state.settings.context_protection,
        affinity=affinity,
    )


def decide(state: RouterState, request: InferenceRequest, attempts: Attempts) -> Choice | None:
    """The next attempt's target (see :func:`herd.core.policy.placement.next_choice`), with
    the decision's counters added and its notes logged."""
    made: Placement = placement.next_choice(
        request,
        attempts.excluded_nodes(),
        situation(state, request),
        substitute=substitution_allowed(state, request),
    )
    for event in made.events:
        state.events[event] += 1
    for note in made.notes:
        log.info("%s", note)
    if made.decision is not None:
        attempts.last_decision = made.decision
    return made.choice


def remember_conversation(state: RouterState, request: InferenceRequest, opened: Opened) -> None:
    """The node that took this prompt now holds it in its cache: the next turn prefers it."""
    if request.prompt_key is not None:
        tokens = request.estimated_prompt_tokens
        state.affinity.remember(request.prompt_key, opened.node_id, opened.model, tokens)
        if state.shared is not None:
            state.shared.remember_affinity(request.prompt_key, opened.node_id, opened.model, tokens)


async def recall_shared_conversation(state: RouterState, request: InferenceRequest) -> None:
    """Learn from the shared store which nodes took this conversation's earlier prompts
    (through another router, perhaps), into the router's own table, which placement reads.
    Bounded by :data:`SHARED_AFFINITY_WAIT`; a store that is away or slow changes nothing."""
    shared = state.shared
    if shared is None or not shared.available or not request.earlier_keys:
        return
    found: dict[str, tuple[str, str, int]] = {}
    with trio.move_on_after(SHARED_AFFINITY_WAIT):
        try:
            found = await shared.find_affinity(request.earlier_keys)
        except trio.Cancelled:
            raise
        except Exception as exc:  # the store's failure is its health watch's to report
            log.debug("shared affinity lookup failed: %s", exc)
    for key, (node_id, model, tokens) in found.items():  # the store's word is the latest
        state.affinity.remember(key, node_id, model, tokens)


def maybe_prewarm(link: Link, choice: Choice) -> None:
    """A deep queue on the chosen node warms the model on the runner-up (if it is cold there)."""
    state = link.state
    depth = state.queues.counters(choice.node_id, choice.model).pending
    if depth < state.settings.prewarm_queue_depth:
        return
    for candidate in choice.decision.ranked:
        if candidate.node_id != choice.node_id and not candidate.hot:
            link.prewarm(candidate.node_id, choice.model)
            return


async def open_upstream(
    link: Link,
    request: InferenceRequest,
    stack: contextlib.AsyncExitStack,
    attempts: Attempts | None = None,
) -> Opened:
    """Route ``request`` and open its upstream response; see the module docstring.
    ``attempts`` (optional) is filled in as it goes, so a caller can trace a failure."""
    state = link.state
    attempts = attempts if attempts is not None else Attempts()
    deadline = trio.current_time() + link.config.queue_timeout
    if not models_known(state, request.models):
        resolution = resolve_virtual(state, request)
        if resolution is None:
            await auto_pull(link, request, deadline)
        else:
            attempts.virtual_rule = resolution.rule
            request = attrs.evolve(request, groups=resolution.groups)
    routed = request
    await recall_shared_conversation(state, routed)

    def choose(attempts: Attempts) -> Target[Choice] | None:
        choice = decide(state, routed, attempts)
        return None if choice is None else Target(choice.node_id, choice.model, choice)

    async def attempt(choice: Choice) -> tuple[Choice, Opened]:
        return choice, await _attempt(link, routed, choice, attempts, stack)

    def gone() -> HerdError | None:
        return None if models_known(state, routed.models) else not_found(state, routed)

    choice, opened = await run_attempts(
        state,
        attempts,
        max_retries=link.config.max_retries,
        deadline=deadline,
        choose=choose,
        attempt=attempt,
        no_node=lambda attempts: NoEligibleNode(_no_node_message(routed, attempts)),
        gone=gone,
    )
    if opened.fallback:
        state.fallbacks_total += 1
    if opened.substitution == "vram":
        state.events["vram_fallbacks"] += 1
    remember_conversation(state, routed, opened)
    maybe_prewarm(link, choice)
    return opened


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


async def auto_pull(link: Link, request: InferenceRequest, deadline: float) -> None:
    """No node has any of the request's models: 404 at once, or (auto-pull on) have the
    router's pull service pull the primary and wait for it until ``deadline``.

    Raises :class:`ModelNotFound` (off, or the pull failed), :class:`NoEligibleNode` with
    ``Retry-After`` (the pull is still going at the deadline), :class:`Forbidden` (a registry
    host the operator has not allowed)."""
    state, pulls = link.state, link.pulls
    model = request.model
    if not state.settings.auto_pull or pulls is None:
        raise not_found(state, request)
    check_pull_name(model, link.config.pull_hosts)
    failed = pulls.recent_failure(model, trio.current_time())
    if failed is not None:
        raise ModelNotFound(model, detail=f"auto-pull failed: {failed.error}")
    job = pulls.start(model, pull_target(state.snapshot()), "auto-pull")
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
    link: Link,
    request: InferenceRequest,
    choice: Choice,
    attempts: Attempts,
    stack: contextlib.AsyncExitStack,
) -> Opened:
    state, config = link.state, link.config
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
    headers.update(link.backend_headers(node.report))
    budget = first_byte_budget(
        maximum=config.first_byte_timeout,
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
                upstream = link.client.build_request("POST", url, content=body, headers=headers)
                response = await link.client.send(upstream, stream=True)
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
                "" if budget >= config.first_byte_timeout else " (what this node usually needs)"
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
