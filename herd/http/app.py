"""The router's Quart-Trio app: fleet views, model listings, and the nodes' WebSocket.

Inference paths never reach this app: :class:`herd.http.handler.ProxyASGI` serves them in
front of it. Everything here is read-mostly and cheap.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from herd import __version__
from herd.core import views
from herd.core.api import anthropic
from herd.core.api.shaping import flavor_for_path
from herd.core.errors import BadRequest, HerdError, ModelNotFound, NotFound, parse_json_body
from herd.core.models import NodeSnapshot, NodeStatus, normalize_model_name
from herd.core.policy import virtual
from herd.http.dashboard.api import create_blueprint
from herd.http.dashboard.bench import BenchmarkRunner
from herd.http.dashboard.pages import create_pages
from herd.http.dashboard.plan_api import create_plan_blueprint
from herd.http.fleet_socket import serve_fleet_socket
from herd.http.media import create_media_blueprint
from herd.http.security import key_owner
from herd.store.writer import TraceWriter
from herd.transport import model_admin
from herd.transport.bodies import SHOW_LIMIT, error_detail, read_limited
from herd.transport.errors import map_node_errors
from herd.transport.link import Link

log = logging.getLogger("herd.router")

SHOW_TIMEOUT = 30.0  # seconds for a node to describe a model
MAX_BLOBS = 1000  # blob digests remembered with the node they were uploaded to


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(data), status=status, headers=headers, content_type="application/json"
    )


def error_response(error: HerdError, path: str) -> Response:
    flavor = flavor_for_path(path)
    return Response(
        error.render(flavor),
        status=error.status_for(flavor),
        headers=error.headers(),
        content_type="application/json",
    )


async def request_bytes() -> bytes:
    data = await request.get_data(as_text=False)
    return data if isinstance(data, bytes) else data.encode()


def create_app(
    link: Link, store: TraceWriter | None = None, benchmarks: BenchmarkRunner | None = None
) -> QuartTrio:
    """The router's Quart app over ``link`` (its state, client and configuration) and
    ``store`` (the trace writer, when traces are persisted)."""
    state, config = link.state, link.config
    app = QuartTrio("herd")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.config["BODY_TIMEOUT"] = config.body_timeout  # 408 for a slow client, as below

    @app.errorhandler(HerdError)
    async def on_herd_error(error: HerdError) -> Response:
        return error_response(error, request.path)

    @app.errorhandler(HTTPException)
    async def on_http_error(error: HTTPException) -> Response:
        herd_error = HerdError(f"{error.name}: {request.method} {request.path}")
        herd_error.status = error.code or 500  # type: ignore[misc]
        if error.code == 404:
            herd_error = NotFound(f"no such endpoint: {request.method} {request.path}")
        return error_response(herd_error, request.path)

    app.register_blueprint(create_blueprint(link, store, benchmarks))
    app.register_blueprint(create_pages())
    app.register_blueprint(create_media_blueprint(link))
    app.register_blueprint(create_plan_blueprint(link, store))  # the what-if planner

    def virtual_names() -> views.Virtual:
        settings = state.settings
        return virtual.listed(virtual.aliases_from(settings.model_aliases), settings.agent_defaults)

    @app.get("/")
    async def root() -> Response:
        return Response("herd is running", content_type="text/plain")

    @app.get("/api/version")
    async def version() -> Response:
        versions = sorted(
            {
                n.report.backend.version
                for n in views.routable(state.snapshot())
                if n.report.backend.version
            }
        )
        return json_response(
            {"version": versions[0] if versions else "0.0.0", "herd_version": __version__}
        )

    @app.get("/api/tags")
    async def tags() -> Response:
        return json_response(views.tags(state.snapshot(), virtual_names()))

    @app.get("/api/ps")
    async def ps() -> Response:
        return json_response(views.ps(state.snapshot()))

    @app.post("/api/show")
    async def show() -> Response:
        body = parse_json_body(await request_bytes())
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise BadRequest("missing required field 'model'", param="model")
        model = normalize_model_name(name)
        nodes = [
            n
            for n in views.routable(state.snapshot())
            if n.has_model(model) and n.report.backend.healthy
        ]
        if not nodes:
            raise ModelNotFound(model)
        nodes.sort(key=lambda n: (n.status is not NodeStatus.ONLINE, n.loaded(model) is None))
        node = nodes[0]
        node_id = node.node_id
        with trio.fail_after(SHOW_TIMEOUT), map_node_errors(node_id, "answering /api/show"):
            async with link.client.stream(
                "POST",
                node.report.backend.url.rstrip("/") + "/api/show",
                json={**body, "model": model},
                headers=link.backend_headers(node.report),
            ) as upstream:
                if upstream.status_code >= 400:
                    error = await error_detail(upstream, node_id)
                    return json_response(
                        {"error": error}, upstream.status_code, {"X-Herd-Node": node_id}
                    )
                content = await read_limited(upstream, SHOW_LIMIT, node_id, "a model description")
        return Response(
            content,
            status=upstream.status_code,
            content_type="application/json",
            headers={"X-Herd-Node": node_id},
        )

    @app.post("/api/pull")
    async def pull() -> Response:
        body = parse_json_body(await request_bytes())
        model = model_admin.requested_model(body)
        node_id = model_admin.requested_node(body)
        node = model_admin.pull_checked(link, model, node_id)
        if body.get("stream") is False:
            await model_admin.pull_and_wait(link, node, model, "api")
            return json_response({"status": "success", "node": node.node_id})
        return Response(
            model_admin.pull_progress(link, node, model),
            content_type="application/x-ndjson",
            headers={"X-Herd-Node": node.node_id},
        )

    @app.post("/api/copy")
    async def copy() -> Response:
        body = parse_json_body(await request_bytes())
        names = {}
        for field in ("source", "destination"):
            value = body.get(field)
            if not isinstance(value, str) or not value.strip():
                raise BadRequest(f"missing required field '{field}'", param=field)
            names[field] = normalize_model_name(value)
        result = await model_admin.copy(
            link, names["source"], names["destination"], model_admin.requested_node(body)
        )
        return json_response(result, status=200 if result["copied"] else 502)

    @app.post("/api/create")
    async def create() -> Response:
        body = parse_json_body(await request_bytes())
        model = model_admin.requested_model(body)
        node = model_admin.create_target(state, body, state.blob_nodes)
        upstream = {k: v for k, v in body.items() if k != "node_id"} | {"model": model}
        return await progress_response(node, "/api/create", upstream)

    @app.post("/api/push")
    async def push() -> Response:
        body = parse_json_body(await request_bytes())
        model = model_admin.requested_model(body)
        (node, *_) = model_admin.nodes_with(state, model, model_admin.requested_node(body))
        upstream = {k: v for k, v in body.items() if k != "node_id"} | {"model": model}
        return await progress_response(node, "/api/push", upstream)

    async def progress_response(node: NodeSnapshot, path: str, body: dict[str, Any]) -> Response:
        """Stream a backend's NDJSON progress; ``stream: false``: its last line as JSON."""
        lines = model_admin.progress(link, node, path, {**body, "stream": True})
        if body.get("stream") is not False:
            return Response(
                lines,
                content_type="application/x-ndjson",
                headers={"X-Herd-Node": node.node_id},
            )
        last: dict[str, Any] = {}
        async for line in lines:
            last = json.loads(line)
        status = 502 if "error" in last else 200
        return json_response(last, status=status, headers={"X-Herd-Node": node.node_id})

    @app.route("/api/blobs/<digest>", methods=["HEAD", "POST"])
    async def blob(digest: str) -> Response:
        """Blob uploads for /api/create: to the node named (``?node_id=``), else the one this
        digest went to before, else the node with the most free disk. Streamed through, of
        any size (a model's weights), with no body deadline."""
        node_id = request.args.get("node_id") or state.blob_nodes.get(digest)
        node = model_admin.pull_target(state.snapshot(), node_id)
        url = node.report.backend.url.rstrip("/") + "/api/blobs/" + digest
        headers = link.backend_headers(node.report)
        with map_node_errors(node.node_id, "with a blob"):
            upload: Any = None
            if request.method == "POST":
                request.max_content_length = None  # weights are gigabytes
                request.body_timeout = None

                async def chunks() -> AsyncIterator[bytes]:
                    async for chunk in request.body:
                        yield chunk

                upload = chunks()
            async with link.client.stream(
                request.method, url, content=upload, headers=headers
            ) as answer:
                status = answer.status_code
                error = await error_detail(answer, node.node_id) if status >= 400 else None
        if request.method == "POST" and status < 300:
            state.blob_nodes[digest] = node.node_id
            state.blob_nodes.move_to_end(digest)
            while len(state.blob_nodes) > MAX_BLOBS:
                state.blob_nodes.popitem(last=False)
        if error is not None and request.method != "HEAD":
            return json_response({"error": error}, status, {"X-Herd-Node": node.node_id})
        return Response(b"", status=status, headers={"X-Herd-Node": node.node_id})

    @app.delete("/api/delete")
    async def delete() -> Response:
        body = parse_json_body(await request_bytes())
        node_id = model_admin.requested_node(body)
        result = await model_admin.delete(link, model_admin.requested_model(body), node_id)
        return json_response(result, status=200 if result["deleted"] else 502)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens() -> Response:
        return json_response(anthropic.count_tokens(parse_json_body(await request_bytes())))

    @app.get("/v1/models")
    async def openai_models() -> Response:
        return json_response(
            views.openai_models(state.snapshot(), int(time.time()), virtual_names())
        )

    @app.get("/v1/models/<path:model_id>")
    async def openai_model(model_id: str) -> Response:
        names = views.model_names(state.snapshot())
        for candidate in (model_id, normalize_model_name(model_id)):
            if candidate in names:
                return json_response(views.openai_model(candidate, int(time.time())))
        settings = state.settings
        resolution = virtual.resolve(
            model_id,
            state.snapshot(),
            virtual.aliases_from(settings.model_aliases),
            settings.agent_defaults,
        )
        if resolution is not None:
            body = views.openai_model(model_id, int(time.time()))
            return json_response({**body, "virtual": True, "candidates": resolution.candidates})
        raise ModelNotFound(model_id)

    @app.get("/v1/responses/<response_id>")
    async def stored_response(response_id: str) -> Response:
        stored = state.responses.get(response_id, key_owner(request.scope, link.config.api_keys))
        if stored is None:
            raise NotFound(
                f"response '{response_id}' is not stored on this router (herd keeps the last "
                "responses made with store: true in memory only)"
            )
        return json_response(stored.response)

    @app.get("/fleet/status")
    async def fleet_status() -> Response:
        return json_response(link.status_view())

    @app.get("/metrics")
    async def metrics() -> Response:
        written = store.statistics() if store is not None else None
        traces = (
            {"written": written.written, "dropped": written.dropped, "failed": written.failed}
            if written is not None
            else None
        )
        text = state.metrics.render(
            state.snapshot(), state.queues.statistics(), state.all_events(), traces
        )
        return Response(text, content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/fleet/queue")
    async def fleet_queue() -> Response:
        stats = state.queues.statistics()
        return json_response(
            {
                "pending": stats.pending,
                "in_flight": stats.in_flight,
                "done": stats.done,
                "failed": stats.failed,
                "queues": stats.queues,
            }
        )

    @app.websocket("/fleet/ws")
    async def fleet_ws() -> Response | None:
        return await serve_fleet_socket(state, config)  # a Response refuses the handshake

    return app
