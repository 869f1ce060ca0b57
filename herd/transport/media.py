"""Media jobs on nodes: image generation and speech-to-text, through the one attempt loop.

Same discipline as text (:mod:`herd.transport.attempts`): the scorer picks the node (eliminating
nodes without the backend or the image model), the job takes a slot in its own queue class
(``[IMAGE]``: one at a time per node, ``[STT]``: two), a node that fails before answering is
excluded and the job retried elsewhere, and every job is traced. The node does the work on its
own app (``agent_url``): ``POST /node/image`` (JSON, answers a PNG) and ``POST /node/transcribe``
(multipart). The node's answer is read whole, within :data:`~herd.transport.bodies.ANSWER_LIMIT`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import httpx
import trio

from herd.core import traces
from herd.core.errors import (
    ApiFlavor,
    HerdError,
    NodeBadStatus,
    NodeTimeout,
    NoEligibleNode,
)
from herd.core.models import KIND_IMAGE, NodeSnapshot, NodeStatus
from herd.core.scoring import Candidate, RouteDecision, RouteRequest, score
from herd.core.traces import TraceRecord
from herd.state.state import RouterState
from herd.transport.attempts import Attempts, Target, run_attempts
from herd.transport.bodies import ANSWER_LIMIT, ERROR_BODY_LIMIT, error_text, read_limited
from herd.transport.errors import map_node_errors
from herd.transport.link import Link

MEDIA_TIMEOUT = 900.0  # seconds for one job on a node, generous: images can be slow

# Builds the request to one node (the dispatcher sends it, reads the answer with a limit).
NodeCall = Callable[[NodeSnapshot, dict[str, str]], httpx.Request]


@attrs.frozen
class MediaAnswer:
    """A node's answer to a media job, read whole (within :data:`ANSWER_LIMIT`)."""

    status_code: int
    content: bytes
    content_type: str

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


def capable(node: NodeSnapshot, kind: str, model: str) -> bool:
    """Could ``node`` run this job at all (busy or not)?"""
    capabilities = node.report.capabilities
    if kind == KIND_IMAGE:
        return model in capabilities.image_models
    return bool(capabilities.stt_backends)


def missing_capability(state: RouterState, kind: str, model: str) -> NoEligibleNode | None:
    """The error to answer at once when no node that is not offline has the capability (no
    point waiting for a busy node to free up: there is none)."""
    nodes = [n for n in state.snapshot().nodes if n.status is not NodeStatus.OFFLINE]
    if any(capable(n, kind, model) for n in nodes):
        return None
    if kind == KIND_IMAGE:
        what = f"generates images with {model}"
        fix = "run herd-node where mflux, DiffusionKit or an Ollama image model is installed"
    else:
        what = "transcribes speech"
        fix = "start a node with --whisper-model (faster-whisper) or --asr-url"
    return NoEligibleNode(f"no node in the fleet {what}: {fix}", retry_after=30)


async def _send(link: Link, request: httpx.Request, node_id: str) -> MediaAnswer:
    with map_node_errors(node_id, "on a media job"):
        response = await link.client.send(request, stream=True)
        try:
            limit = ERROR_BODY_LIMIT if response.status_code >= 400 else ANSWER_LIMIT
            content = await read_limited(response, limit, node_id, "an answer")
        finally:
            await response.aclose()
    return MediaAnswer(
        response.status_code, content, response.headers.get("content-type", "application/json")
    )


def switched_off(state: RouterState, kind: str) -> NoEligibleNode | None:
    setting = "image_generation" if kind == KIND_IMAGE else "transcription"
    if getattr(state.settings, setting):
        return None
    what = "Image generation" if kind == KIND_IMAGE else "Speech-to-text"
    return NoEligibleNode(
        f"{what} routing is switched off (setting '{setting}'); turn it "
        "on in the dashboard's Settings or POST /dashboard/api/settings"
    )


async def dispatch_media(
    link: Link,
    kind: str,
    model: str,
    call: NodeCall,
    flavor: ApiFlavor,
    tags: tuple[str, ...],
) -> tuple[MediaAnswer, str]:
    """Run one image/STT job on the best node, retrying elsewhere on node failures. Returns
    the node's response (2xx or a 4xx to pass on) and the node id. Raises HerdError."""
    state = link.state
    off = switched_off(state, kind)
    if off is not None:
        raise off
    started, wall = trio.current_time(), time.time()
    request_id = uuid.uuid4().hex[:20]
    attempts = Attempts()
    status, error = traces.FAILED, None
    chosen: Candidate | None = None
    decision: RouteDecision | None = None

    def choose(attempts: Attempts) -> Target[NodeSnapshot] | None:
        nonlocal decision
        fleet = state.snapshot()
        decision = score(
            RouteRequest(model=model, kind=kind, excluded_nodes=attempts.excluded_nodes()),
            fleet,
            state.history.view(),
            trio.current_time(),
            state.scoring,
            state.rng,
        )
        attempts.last_decision = decision
        if decision.winner is None:
            return None
        node = fleet.node(decision.winner.node_id)
        assert node is not None
        return Target(node.node_id, model, node)

    async def attempt(node: NodeSnapshot) -> MediaAnswer:
        nonlocal chosen
        chosen = decision.winner if decision is not None else None
        node_id = node.node_id
        async with state.queues.lease(node_id, model, kind) as lease:
            try:
                with trio.fail_after(MEDIA_TIMEOUT):
                    answer = await _send(link, call(node, link.agent_headers()), node_id)
            except trio.TooSlowError as exc:
                raise NodeTimeout(
                    f"node {node_id} took over {MEDIA_TIMEOUT:g} s", node_id=node_id
                ) from exc
            if answer.status_code >= 500:
                raise NodeBadStatus(
                    f"node {node_id} answered {answer.status_code}: {error_text(answer.content)}",
                    node_id=node_id,
                )
            if answer.status_code < 400:
                lease.succeeded()
        return answer

    def no_node(attempts: Attempts) -> HerdError:
        eliminated = attempts.last_decision.eliminated if attempts.last_decision else ()
        reasons = "; ".join(f"{e.node_id}: {e.reason}" for e in eliminated)
        return NoEligibleNode(f"no node can run {model} now ({reasons or 'no nodes'})")

    try:
        missing = missing_capability(state, kind, model)
        if missing is not None:
            raise missing
        response = await run_attempts(
            state,
            attempts,
            max_retries=link.config.max_retries,
            deadline=started + link.config.queue_timeout,
            choose=choose,
            attempt=attempt,
            no_node=no_node,
        )
        status = traces.COMPLETED if response.status_code < 400 else traces.FAILED
        if status == traces.FAILED:
            error = error_text(response.content)
        assert attempts.last_node is not None
        return response, attempts.last_node
    except HerdError as exc:
        error = exc.message
        raise
    finally:
        state.record_trace(
            TraceRecord(
                request_id=request_id,
                model=model,
                original_model=model,
                node_id=attempts.last_node,
                score=chosen.score if chosen is not None else None,
                scores_breakdown=chosen.breakdown if chosen is not None else {},
                runners_up=(
                    tuple((c.node_id, c.score) for c in decision.runners_up)
                    if decision is not None and chosen is not None
                    else ()
                ),
                status=status,
                latency_ms=(trio.current_time() - started) * 1000,
                time_to_first_token_ms=None,
                prompt_tokens=None,
                completion_tokens=None,
                retry_count=attempts.retries,
                fallback_used=False,
                excluded_nodes=tuple(attempts.excluded),
                original_format=flavor,
                kind=kind,
                error_message=error,
                timestamp=wall,
                tags=tags,
            )
        )


def image_models(state: RouterState) -> dict[str, list[str]]:
    models: dict[str, list[str]] = {}
    for node in state.snapshot().nodes:
        if node.status.value == "offline":
            continue
        for name in node.report.capabilities.image_models:
            models.setdefault(name, []).append(node.node_id)
    return models
