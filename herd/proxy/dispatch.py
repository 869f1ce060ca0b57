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
from typing import Protocol, cast

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
from herd.models import NodeSnapshot
from herd.proxy.shaping import InferenceRequest
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

    retries: int = 0
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


async def open_upstream(
    state: RouterState, request: InferenceRequest, stack: contextlib.AsyncExitStack
) -> Opened:
    """Route ``request`` and open its upstream response; see the module docstring."""
    attempts = Attempts()
    config = state.config
    deadline = trio.current_time() + config.queue_timeout
    if not models_known(state, request.models):
        raise ModelNotFound(request.model)
    while True:
        for index, model in enumerate(request.models):
            while attempts.retries <= config.max_retries:
                fleet = state.snapshot()
                decision = score(
                    RouteRequest(
                        model=model,
                        kind=request.route.kind,
                        estimated_prompt_tokens=request.estimated_prompt_tokens,
                        requested_context=request.requested_context,
                        excluded_nodes=frozenset(attempts.excluded),
                    ),
                    fleet,
                    state.history.view(),
                    trio.current_time(),
                    state.scoring,
                    state.rng,
                )
                attempts.last_decision = decision
                if decision.winner is None:
                    break  # next model
                node = fleet.node(decision.winner.node_id)
                assert node is not None
                try:
                    opened = await _attempt(state, request, node, model, decision, attempts, stack)
                except NodeError as exc:
                    attempts.last_error = exc
                    attempts.excluded.append(node.node_id)
                    if attempts.retries >= config.max_retries:
                        raise
                    attempts.retries += 1
                    state.retries_total += 1
                    log.info("retrying %s elsewhere after %s", model, exc.message)
                    continue
                if index > 0:
                    state.fallbacks_total += 1
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


def _no_node_message(request: InferenceRequest, attempts: Attempts) -> str:
    reasons = ""
    if attempts.last_decision is not None and attempts.last_decision.eliminated:
        reasons = "; ".join(f"{e.node_id}: {e.reason}" for e in attempts.last_decision.eliminated)
    names = ", ".join(request.models)
    return f"no node can serve {names} right now" + (f" ({reasons})" if reasons else "")


async def _attempt(
    state: RouterState,
    request: InferenceRequest,
    node: NodeSnapshot,
    model: str,
    decision: RouteDecision,
    attempts: Attempts,
    stack: contextlib.AsyncExitStack,
) -> Opened:
    node_id = node.node_id
    url = node.report.backend.url.rstrip("/") + request.route.upstream_path
    body = json.dumps({"model": model, **request.upstream_body}).encode()
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
        decision=decision,
        excluded=tuple(attempts.excluded),
        response=response,
        first_chunk=first,
        chunks=chunks,
        lease=lease,
        first_byte_at=trio.current_time(),
    )
