"""Image generation and speech-to-text through the fleet.

Same discipline as chat: the scorer picks the node (eliminating nodes without the backend or the
image model), the request takes a slot in its own queue class (``[IMAGE]``: one at a time per
node, ``[STT]``: two), a node that fails before answering is excluded and the job retried
elsewhere, and every job is traced. The node does the work on its own port (``agent_url``):
``POST /node/image`` (JSON, answers a PNG) and ``POST /node/transcribe`` (multipart).

Endpoints: ``POST /api/generate-image``, ``POST /v1/images/generations``,
``GET /api/image-models``, ``POST /api/transcribe``, ``POST /v1/audio/transcriptions``.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import httpx
import trio
from quart import Blueprint, Response, request

from herd.core import traces
from herd.core.api.shaping import parse_tags
from herd.core.errors import (
    ApiFlavor,
    BadRequest,
    HerdError,
    ModelNotFound,
    NodeBadStatus,
    NodeError,
    NodeTimeout,
    NoEligibleNode,
    parse_json_body,
)
from herd.core.models import KIND_IMAGE, KIND_STT, NodeSnapshot, NodeStatus
from herd.core.scoring import Candidate, RouteDecision, RouteRequest, score
from herd.core.traces import TraceRecord
from herd.node.media import ImageRequest
from herd.state.state import RouterState
from herd.transport.bodies import ANSWER_LIMIT, ERROR_BODY_LIMIT, error_text, read_limited
from herd.transport.client import agent_headers
from herd.transport.errors import map_node_errors

MEDIA_TIMEOUT = 900.0  # seconds for one job on a node, generous: images can be slow
DEFAULT_STT_MODEL = "whisper"

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


async def _send(state: RouterState, request: httpx.Request, node_id: str) -> MediaAnswer:
    with map_node_errors(node_id, "on a media job"):
        response = await state.client.send(request, stream=True)
        try:
            limit = ERROR_BODY_LIMIT if response.status_code >= 400 else ANSWER_LIMIT
            content = await read_limited(response, limit, node_id, "an answer")
        finally:
            await response.aclose()
    return MediaAnswer(
        response.status_code, content, response.headers.get("content-type", "application/json")
    )


async def dispatch_media(
    state: RouterState,
    kind: str,
    model: str,
    call: NodeCall,
    flavor: ApiFlavor,
    tags: tuple[str, ...],
) -> tuple[MediaAnswer, str]:
    """Run one image/STT job on the best node, retrying elsewhere on node failures. Returns
    the node's response (2xx or a 4xx to pass on) and the node id. Raises HerdError."""
    setting = "image_generation" if kind == KIND_IMAGE else "transcription"
    if not getattr(state.settings, setting):
        what = "Image generation" if kind == KIND_IMAGE else "Speech-to-text"
        raise NoEligibleNode(
            f"{what} routing is switched off (setting '{setting}'); turn it "
            "on in the dashboard's Settings or POST /dashboard/api/settings"
        )
    started, wall = trio.current_time(), time.time()
    request_id = uuid.uuid4().hex[:20]
    excluded: list[str] = []
    retries = 0
    node_id: str | None = None
    status, error = traces.FAILED, None
    response: MediaAnswer | None = None
    winner: Candidate | None = None
    decision: RouteDecision | None = None
    deadline = started + state.config.queue_timeout
    try:
        missing = missing_capability(state, kind, model)
        if missing is not None:
            raise missing
        while True:
            decision = score(
                RouteRequest(model=model, kind=kind, excluded_nodes=frozenset(excluded)),
                state.snapshot(),
                state.history.view(),
                trio.current_time(),
                state.scoring,
                state.rng,
            )
            if decision.winner is None:
                if excluded and error is not None:
                    raise NodeBadStatus(error)
                remaining = deadline - trio.current_time()
                if remaining <= 0:
                    reasons = "; ".join(f"{e.node_id}: {e.reason}" for e in decision.eliminated)
                    raise NoEligibleNode(f"no node can run {model} now ({reasons or 'no nodes'})")
                with trio.move_on_after(remaining):
                    await state.wait_fleet_changed()
                continue
            winner = decision.winner
            node = state.snapshot().node(winner.node_id)
            assert node is not None
            node_id = node.node_id
            try:
                async with state.queues.lease(node_id, model, kind) as lease:
                    try:
                        with trio.fail_after(MEDIA_TIMEOUT):
                            response = await _send(
                                state, call(node, agent_headers(state.config.auth_token)), node_id
                            )
                    except trio.TooSlowError as exc:
                        raise NodeTimeout(
                            f"node {node_id} took over {MEDIA_TIMEOUT:g} s", node_id=node_id
                        ) from exc
                    if response.status_code >= 500:
                        raise NodeBadStatus(
                            f"node {node_id} answered {response.status_code}: "
                            f"{error_text(response.content)}",
                            node_id=node_id,
                        )
                    if response.status_code < 400:
                        lease.succeeded()
            except NodeError as exc:
                error = exc.message
                excluded.append(node_id)
                if retries >= state.config.max_retries:
                    raise
                retries += 1
                state.retries_total += 1
                continue
            status = traces.COMPLETED if response.status_code < 400 else traces.FAILED
            if status == traces.FAILED:
                error = error_text(response.content)
            return response, node_id
    except HerdError as exc:
        error = exc.message
        raise
    finally:
        state.record_trace(
            TraceRecord(
                request_id=request_id,
                model=model,
                original_model=model,
                node_id=node_id,
                score=winner.score if winner is not None else None,
                scores_breakdown=winner.breakdown if winner is not None else {},
                runners_up=(
                    tuple((c.node_id, c.score) for c in decision.runners_up)
                    if decision is not None and winner is not None
                    else ()
                ),
                status=status,
                latency_ms=(trio.current_time() - started) * 1000,
                time_to_first_token_ms=None,
                prompt_tokens=None,
                completion_tokens=None,
                retry_count=retries,
                fallback_used=False,
                excluded_nodes=tuple(excluded),
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


def _error_response(error: HerdError, flavor: ApiFlavor) -> Response:
    return Response(
        error.render(flavor),
        status=error.status_for(flavor),
        headers=error.headers(),
        content_type="application/json",
    )


def create_media_blueprint(state: RouterState) -> Blueprint:
    bp = Blueprint("media", __name__)

    async def body_json() -> dict[str, Any]:
        data = await request.get_data(as_text=False)
        return parse_json_body(data if isinstance(data, bytes) else data.encode())

    async def run_image(body: dict[str, Any], flavor: ApiFlavor) -> tuple[bytes, str]:
        job = ImageRequest.from_body(body)
        if job.model not in image_models(state):
            raise ModelNotFound(job.model)
        payload = {k: v for k, v in body.items() if k not in ("metadata", "fallback_models")}

        def call(node: NodeSnapshot, headers: dict[str, str]) -> httpx.Request:
            return state.client.build_request(
                "POST", node.report.agent_url + "/node/image", json=payload, headers=headers
            )

        tags = parse_tags(body, request.headers.get("X-Herd-Tags"))
        response, node_id = await dispatch_media(state, KIND_IMAGE, job.model, call, flavor, tags)
        if response.status_code >= 400:
            raise _as_error(response)
        return response.content, node_id

    @bp.post("/api/generate-image")
    async def generate_image() -> Response:
        try:
            image, node_id = await run_image(await body_json(), "ollama")
        except HerdError as exc:
            return _error_response(exc, "ollama")
        return Response(image, content_type="image/png", headers={"X-Herd-Node": node_id})

    @bp.post("/v1/images/generations")
    async def openai_images() -> Response:
        try:
            body = await body_json()
            size = body.get("size", "1024x1024")
            try:
                width, height = (int(v) for v in str(size).lower().split("x"))
            except ValueError as exc:
                raise BadRequest(
                    f"field 'size' must look like 1024x1024, got {size!r}", param="size"
                ) from exc
            if body.get("n", 1) != 1:
                raise BadRequest("only n=1 is supported", param="n")
            fmt = body.get("response_format", "b64_json")
            if fmt not in ("b64_json", "url"):
                raise BadRequest("response_format must be b64_json or url", param="response_format")
            job = {k: v for k, v in body.items() if k not in ("size", "n", "response_format")}
            job.update(width=width, height=height)
            image, node_id = await run_image(job, "openai")
        except HerdError as exc:
            return _error_response(exc, "openai")
        encoded = base64.b64encode(image).decode()
        item = (
            {"b64_json": encoded}
            if fmt == "b64_json"
            else {"url": "data:image/png;base64," + encoded}
        )
        return Response(
            json.dumps({"created": int(time.time()), "data": [item]}),
            content_type="application/json",
            headers={"X-Herd-Node": node_id},
        )

    @bp.get("/api/image-models")
    async def list_image_models() -> Response:
        models = [
            {"name": name, "nodes": nodes} for name, nodes in sorted(image_models(state).items())
        ]
        return Response(json.dumps({"models": models}), content_type="application/json")

    async def run_transcription(flavor: ApiFlavor) -> tuple[dict[str, Any], str]:
        form = await request.form
        files = await request.files
        upload = files.get("file") or files.get("audio")
        if upload is None:
            raise BadRequest(
                "multipart field 'file' (or 'audio') with the audio is required", param="file"
            )
        audio = upload.read()
        if not audio:
            raise BadRequest("the uploaded audio is empty", param="file")
        model = form.get("model") or DEFAULT_STT_MODEL
        language = form.get("language")
        fields = {"model": model} | ({"language": language} if language else {})
        filename = upload.filename or "audio"

        def call(node: NodeSnapshot, headers: dict[str, str]) -> httpx.Request:
            return state.client.build_request(
                "POST",
                node.report.agent_url + "/node/transcribe",
                data=fields,
                files={"file": (filename, audio, upload.mimetype or "application/octet-stream")},
                headers=headers,
            )

        tags = parse_tags({}, request.headers.get("X-Herd-Tags"))
        response, node_id = await dispatch_media(
            state, KIND_STT, DEFAULT_STT_MODEL, call, flavor, tags
        )
        if response.status_code >= 400:
            raise _as_error(response)
        result: dict[str, Any] = response.json()
        return result, node_id

    @bp.post("/api/transcribe")
    async def transcribe() -> Response:
        try:
            result, node_id = await run_transcription("ollama")
        except HerdError as exc:
            return _error_response(exc, "ollama")
        return Response(
            json.dumps(result), content_type="application/json", headers={"X-Herd-Node": node_id}
        )

    @bp.post("/v1/audio/transcriptions")
    async def openai_transcriptions() -> Response:
        try:
            form = await request.form
            fmt = form.get("response_format", "json")
            if fmt not in ("json", "text", "verbose_json"):
                raise BadRequest(
                    "response_format must be json, text or verbose_json", param="response_format"
                )
            result, node_id = await run_transcription("openai")
        except HerdError as exc:
            return _error_response(exc, "openai")
        headers = {"X-Herd-Node": node_id}
        if fmt == "text":
            return Response(result["text"], content_type="text/plain", headers=headers)
        body = result if fmt == "verbose_json" else {"text": result["text"]}
        return Response(json.dumps(body), content_type="application/json", headers=headers)

    return bp


def _as_error(response: MediaAnswer) -> HerdError:
    error = BadRequest(error_text(response.content))
    error.status = response.status_code  # type: ignore[misc]
    return error
