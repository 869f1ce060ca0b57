"""Image generation and speech-to-text endpoints: the clients' shapes in and out.

The jobs themselves run through :mod:`herd.transport.media` (scored, queued, retried, traced,
like text).

Endpoints: ``POST /api/generate-image``, ``POST /v1/images/generations``,
``GET /api/image-models``, ``POST /api/transcribe``, ``POST /v1/audio/transcriptions``.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
from quart import Blueprint, Response, request

from herd.core.api.media import ImageRequest
from herd.core.api.shaping import parse_tags
from herd.core.errors import ApiFlavor, BadRequest, HerdError, ModelNotFound, parse_json_body
from herd.core.models import KIND_IMAGE, KIND_STT, NodeSnapshot
from herd.core.policy.models import closest_names
from herd.transport.bodies import error_text
from herd.transport.link import Link
from herd.transport.media import MediaAnswer, dispatch_media, image_models, missing_capability

DEFAULT_STT_MODEL = "whisper"


def _error_response(error: HerdError, flavor: ApiFlavor) -> Response:
    return Response(
        error.render(flavor),
        status=error.status_for(flavor),
        headers=error.headers(),
        content_type="application/json",
    )


def create_media_blueprint(link: Link) -> Blueprint:
    state = link.state
    bp = Blueprint("media", __name__)

    async def body_json() -> dict[str, Any]:
        data = await request.get_data(as_text=False)
        return parse_json_body(data if isinstance(data, bytes) else data.encode())

    async def run_image(body: dict[str, Any], flavor: ApiFlavor) -> tuple[bytes, str]:
        job = ImageRequest.from_body(body)
        models = image_models(state)
        if job.model not in models:
            # No node generates images at all: say so (503) rather than "not found".
            missing = missing_capability(state, KIND_IMAGE, job.model) if not models else None
            if missing is not None:
                raise missing
            raise ModelNotFound(job.model, suggestions=closest_names(job.model, models))
        payload = {k: v for k, v in body.items() if k not in ("metadata", "fallback_models")}

        def call(node: NodeSnapshot, headers: dict[str, str]) -> httpx.Request:
            return link.client.build_request(
                "POST", node.report.agent_url + "/node/image", json=payload, headers=headers
            )

        tags = parse_tags(body, request.headers.get("X-Herd-Tags"))
        response, node_id = await dispatch_media(link, KIND_IMAGE, job.model, call, flavor, tags)
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
            return link.client.build_request(
                "POST",
                node.report.agent_url + "/node/transcribe",
                data=fields,
                files={"file": (filename, audio, upload.mimetype or "application/octet-stream")},
                headers=headers,
            )

        tags = parse_tags({}, request.headers.get("X-Herd-Tags"))
        response, node_id = await dispatch_media(
            link, KIND_STT, DEFAULT_STT_MODEL, call, flavor, tags
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
