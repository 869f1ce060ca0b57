"""The node as a service: the heartbeat agent plus the node's own small HTTP app.

The app serves what the router asks of the node itself: its status, image generation and
speech-to-text, and (under ``/backend``) the LAN proxy to a loopback-only Ollama or the Ollama
face of an OpenAI-compatible server. Its address is advertised in every heartbeat
(``agent_url``); when a fleet token is set, these endpoints require it. ``/node/pause`` and
``/node/resume`` (``herd node pause|resume``) set the node's paused flag, reported in every
heartbeat's ``capacity.paused`` (the router sends a paused node no new work); with
``--learn-capacity`` the capacity learner keeps the flag, across restarts, otherwise it lasts
until the node stops.

The node puts no deadline of its own on an answer from its backend (see
:mod:`herd.node.upstream`): the router judges time and gives up by closing the connection, which
cancels the node's handler and closes its backend request. Every error the app answers is JSON
in Ollama's shape (``{"error": "..."}``) with the status of herd's error tree, whatever raised
it: a :class:`~herd.core.errors.HerdError`, an httpx failure talking to the backend, a Werkzeug HTTP
error (unknown path, wrong method, body too large) or a bug.

Embeddable like the router::

    async with trio.open_nursery() as nursery:
        await nursery.start(Node(NodeConfig(router_url=url, port=0)).run)
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import logging
import os
import socket
import sys
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import psutil
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from herd.config import NodeConfig
from herd.core.api.media import ImageRequest
from herd.core.bodies import ANSWER_LIMIT
from herd.core.errors import (
    BadRequest,
    HerdError,
    NodeBadStatus,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    parse_json_body,
)
from herd.core.models import Capacity, CpuInfo, MemoryInfo
from herd.core.policy.node_urls import is_loopback_host
from herd.core.wire import unstructure
from herd.discovery import SERVICE_TYPE, discover, discover_all
from herd.node import openai_backend as oa
from herd.node.accelerators import AcceleratorReader
from herd.node.agent import AgentConfig, NodeAgent
from herd.node.capacity import CapacityLearner, in_meeting
from herd.node.media import Transcriber, generate_image, whisper_model_path
from herd.node.openai_backend import OpenAIBackend
from herd.node.upstream import (
    IDENTITY,
    backend_client,
    backend_error,
    close_shielded,
    close_when_done,
    closing_backend_responses,
    describe,
    fetch,
)
from herd.server import FinishResponses, serve_app

log = logging.getLogger("herd.node")

PROXY_PREFIX = "/backend"
NDJSON = "application/x-ndjson"
DISCOVERY_TIMEOUT = 5.0
HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "host",
        "content-length",
        "authorization",
        "x-api-key",  # a router key as Anthropic clients send it: never the backend's business
    }
)


class NodeConfigError(ValueError):
    """The node can't start with this configuration; the message says what to change."""


def is_loopback(host: str | None) -> bool:
    """This machine only (no host given: the caller's own)? See
    :func:`herd.core.policy.node_urls.is_loopback_host`."""
    return not host or is_loopback_host(host)


def needs_lan_proxy(config: NodeConfig) -> bool:
    """Serve the backend through this node? ``auto``: when it listens on loopback only and the
    router is on another machine (which could not reach it)."""
    if config.lan_proxy not in ("auto", "always", "never"):
        raise NodeConfigError(
            f"--lan-proxy must be auto, always or never, got {config.lan_proxy!r}"
        )
    if config.lan_proxy != "auto":
        return config.lan_proxy == "always"
    backend = urllib.parse.urlsplit(config.ollama_url).hostname
    router = urllib.parse.urlsplit(config.router_url or "").hostname
    return is_loopback(backend) and not is_loopback(router)


def via_node(config: NodeConfig) -> bool:
    """Does the router reach the backend through this node's port? Always for an
    OpenAI-compatible backend (the node gives it an Ollama face), else per the LAN proxy rule."""
    return config.backend == "openai" or needs_lan_proxy(config)


def agent_config(config: NodeConfig, agent_url: str = "") -> AgentConfig:
    if not config.router_url:
        raise NodeConfigError(
            "no router URL: pass --router-url http://ROUTER-HOST:11435 "
            "(or set FLEET_NODE_ROUTER_URL), or let the node find the router by mDNS"
        )
    if config.backend not in ("ollama", "openai"):
        raise NodeConfigError(f"--backend must be ollama or openai, got {config.backend!r}")
    try:
        return AgentConfig(
            router_url=config.router_url.rstrip("/"),
            ollama_url=config.ollama_url.rstrip("/"),
            node_id=config.node_id or socket.gethostname(),
            heartbeat_interval=config.heartbeat_interval,
            # Reconnect at least once per heartbeat interval: after a router restart the fleet
            # is whole again within two intervals.
            backoff_max=config.heartbeat_interval,
            parallel_slots=config.parallel_slots or 4,
            model_slots=dict(config.model_slots),
            auth_token=config.auth_token,
            agent_url=agent_url,
            advertise_url=agent_url + PROXY_PREFIX if agent_url and via_node(config) else None,
            advertise_proxied=bool(agent_url) and via_node(config),
            whisper_model=config.whisper_model,
            asr_url=config.asr_url,
        )
    except ValueError as exc:
        raise NodeConfigError(str(exc)) from exc


def advertised_url(bound: str, config: NodeConfig) -> str:
    """The URL the router should use for this node's app: the configured host, else the bound
    one, else (bound to every interface) the address this machine uses to reach the router."""
    port = bound.rsplit(":", 1)[1]
    host = config.advertise_host
    if not host and config.host not in ("0.0.0.0", "::", ""):
        host = config.host
    if not host:
        target = urllib.parse.urlsplit(config.router_url or "http://127.0.0.1")
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((target.hostname or "127.0.0.1", target.port or 80))  # no packet
                host = probe.getsockname()[0]
        except OSError:
            host = "127.0.0.1"
    return f"http://{host}:{port}"


def error_response(error: HerdError, headers: dict[str, str] | None = None) -> Response:
    return Response(
        error.render("ollama"),
        status=error.status,
        headers={**error.headers(), **(headers or {})},
        content_type="application/json",
    )


def http_error(error: HTTPException) -> HerdError:
    """A Werkzeug HTTP error (raised by Quart itself) as a :class:`HerdError`, same status."""
    where = f"{request.method} {request.path}"
    if error.code == 404:
        return NotFound(f"no such endpoint: {where}")
    if error.code == 413:
        return PayloadTooLarge(f"request body too large: {where}")
    if error.code == 408:
        return RequestTimeout(f"the request body did not arrive in time: {where}")
    herd_error = HerdError(f"{error.name}: {where}")
    herd_error.status = error.code or 500  # type: ignore[misc]
    return herd_error


class NodeApp(QuartTrio):
    """The node's app: each request closes the backend responses it opened when it ends
    (:func:`~herd.node.upstream.closing_backend_responses`)."""

    async def asgi_app(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        async with closing_backend_responses():
            await super().asgi_app(scope, receive, send)


def create_node_app(node: Node, client: httpx.AsyncClient) -> QuartTrio:
    app = NodeApp("herd-node")
    config = node.config
    app.config["MAX_CONTENT_LENGTH"] = 64 * 2**20
    # Quart's default cuts every response at 60 s; a long generation streams for longer.
    app.config["RESPONSE_TIMEOUT"] = None

    @app.errorhandler(HerdError)
    async def on_error(error: HerdError) -> Response:
        return error_response(error)

    @app.errorhandler(httpx.HTTPError)
    async def on_backend_error(error: httpx.HTTPError) -> Response:
        return error_response(backend_error(error))

    @app.errorhandler(HTTPException)
    async def on_http_error(error: HTTPException) -> Response:
        # Werkzeug's own headers but its HTML content type (e.g. Allow, for a 405).
        kept = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
        return error_response(http_error(error), kept)

    @app.errorhandler(Exception)
    async def on_bug(error: Exception) -> Response:
        log.error("%s %s failed", request.method, request.path, exc_info=error)
        return error_response(HerdError(f"internal error in herd-node: {describe(error)}"))

    def check_token() -> None:
        if not config.auth_token:
            return
        presented = request.headers.get("Authorization", "")
        expected = f"Bearer {config.auth_token}"
        if not hmac.compare_digest(presented.encode(), expected.encode()):
            raise Unauthorized("this node's endpoints need the fleet token")

    def check_local_or_token() -> None:
        if config.auth_token:
            check_token()
        elif not is_loopback(request.remote_addr):
            raise Unauthorized("pause and resume are for this machine only (or need the token)")

    @app.get("/")
    async def root() -> Response:
        return Response("herd node is running", content_type="text/plain")

    @app.get("/node/status")
    async def status() -> Response:
        agent = node.agent
        assert agent is not None
        report = agent.last_report
        stats = agent.statistics()
        body = {
            "report": unstructure(report) if report is not None else None,
            "paused": node.paused,
            "connected": stats.connected,
            "heartbeats_sent": stats.heartbeats_sent,
            "reconnects": stats.reconnects,
            "last_error": stats.last_error,
        }
        return Response(json.dumps(body), content_type="application/json")

    @app.route(PROXY_PREFIX + "/<path:path>", methods=["GET", "POST", "DELETE", "HEAD"])
    async def lan_proxy(path: str) -> Response:
        """The LAN proxy: the router reaches a loopback-only backend through this node (for an
        OpenAI-compatible backend: through the Ollama face the node puts on it)."""
        check_token()
        body = await request.get_data(as_text=False)
        if node.openai is not None:
            raw = body if isinstance(body, bytes) else body.encode()
            return await openai_facade(node.openai, request.method, path, raw)
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in HOP_HEADERS and k.lower() != "accept-encoding"
        }
        headers.update(IDENTITY)  # the bytes pass through as they come: ask for them plain
        upstream = client.build_request(
            request.method,
            config.ollama_url.rstrip("/") + "/" + path,
            params=request.args.to_dict(),
            content=body,
            headers=headers,
        )
        try:
            response = await client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            raise backend_error(exc) from exc
        close_when_done(response)
        kept = {k: v for k, v in response.headers.items() if k.lower() not in HOP_HEADERS}
        ndjson = response.headers.get("content-type", "").startswith(NDJSON)
        return Response(relay(response, ndjson), status=response.status_code, headers=kept)

    @app.post("/node/pause")
    @app.post("/node/resume")
    async def pause_resume() -> Response:
        """The owner's manual override: no new fleet work while paused."""
        check_local_or_token()
        paused = request.path.endswith("/pause")
        await node.set_paused(paused)
        return Response(json.dumps({"paused": paused}), content_type="application/json")

    @app.post("/node/image")
    async def image() -> Response:
        check_token()
        data = await request.get_data(as_text=False)
        job = ImageRequest.from_body(
            parse_json_body(data if isinstance(data, bytes) else data.encode())
        )
        assert node.agent is not None
        png = await generate_image(
            job, node.agent.media, config.ollama_url.rstrip("/"), client, config.image_timeout
        )
        return Response(png, content_type="image/png")

    @app.post("/node/transcribe")
    async def transcribe() -> Response:
        check_token()
        form = await request.form
        files = await request.files
        upload = files.get("file") or files.get("audio")
        if upload is None:
            raise BadRequest("multipart field 'file' is required", param="file")
        audio = upload.read()
        language = form.get("language") or None
        if form.get("model") == "qwen3-asr" and config.asr_url:
            result = await forward_asr(client, config.asr_url, audio, upload.filename, language)
        else:
            transcriber = node.transcriber()
            if transcriber is None:
                raise BadRequest("no speech-to-text model on this node (--whisper-model)")
            result = await transcriber.transcribe(audio, language)
        return Response(json.dumps(result), content_type="application/json")

    return app


async def relay(response: httpx.Response, ndjson: bool) -> AsyncIterator[bytes]:
    """The backend's bytes as they come. Cancelled (the client left), it closes the backend
    response, so the backend stops too. If the backend breaks the stream, an NDJSON stream
    ends with an Ollama error line; anything else is cut off (the error propagates), so the
    client sees a broken answer rather than a short one."""
    at_line_end = True
    try:
        async for chunk in response.aiter_raw():
            at_line_end = chunk.endswith(b"\n")
            yield chunk
    except httpx.HTTPError as exc:
        error = backend_error(exc, mid_stream=True)
        log.warning("%s: %s", response.request.url, error.message)
        if not ndjson:
            raise error from exc
        yield (b"" if at_line_end else b"\n") + error.render("ollama") + b"\n"
    finally:
        await close_shielded(response)


async def openai_facade(backend: OpenAIBackend, method: str, path: str, raw: bytes) -> Response:
    """Ollama's native API, answered by an OpenAI-compatible server."""
    route = (method, "/" + path)
    if route == ("GET", "/api/tags"):
        return Response(json.dumps(oa.tags(backend)), content_type="application/json")
    if route == ("GET", "/api/ps"):
        return Response(json.dumps(oa.ps(backend)), content_type="application/json")
    if route == ("GET", "/api/version"):
        return Response(
            json.dumps({"version": "openai-compatible"}), content_type="application/json"
        )
    if route in (("GET", "/"), ("HEAD", "/")):
        return Response("Ollama is running", content_type="text/plain")
    body = parse_json_body(raw) if raw else {}
    if route == ("POST", "/api/show"):
        name = body.get("model") or body.get("name") or ""
        if oa.normalize_model_name(str(name)) not in backend.ids:
            raise NotFound(f"model '{name}' not found")
        return Response(
            json.dumps(
                {"details": {"format": "gguf"}, "model_info": {}, "capabilities": ["completion"]}
            ),
            content_type="application/json",
        )
    if route in (("POST", "/api/chat"), ("POST", "/api/generate")):
        status, content_type, chunks = await oa.chat_or_generate(
            backend, body, chat=path == "api/chat"
        )
        return Response(chunks, status=status, content_type=content_type)
    if route in (("POST", "/api/embed"), ("POST", "/api/embeddings")):
        result = await oa.embed(backend, body, legacy=path == "api/embeddings")
        return Response(json.dumps(result), content_type="application/json")
    raise NotFound(f"{method} /{path} is not available on an OpenAI-compatible backend")


async def forward_asr(
    client: httpx.AsyncClient, url: str, audio: bytes, filename: str | None, language: str | None
) -> dict[str, Any]:
    """An OpenAI-compatible transcription server (e.g. Qwen3-ASR behind vLLM)."""
    data = {"model": "qwen3-asr", "response_format": "verbose_json"}
    if language:
        data["language"] = language
    try:
        status, raw = await fetch(
            client,
            "POST",
            url.rstrip("/") + "/v1/audio/transcriptions",
            limit=ANSWER_LIMIT,
            what="a transcript",
            data=data,
            files={"file": (filename or "audio", audio)},
        )
    except httpx.HTTPError as exc:
        raise backend_error(exc) from exc
    if status >= 400:
        raise BadRequest(f"ASR server answered {status}: {raw.decode()}")
    try:
        result = json.loads(raw)
    except ValueError as exc:
        raise NodeBadStatus(f"the ASR server's answer is not JSON: {raw[:200]!r}") from exc
    if not isinstance(result, dict):
        raise NodeBadStatus(f"the ASR server's answer is not a JSON object: {raw[:200]!r}")
    return {
        "text": result.get("text", ""),
        "segments": result.get("segments", []),
        "language": result.get("language", language or ""),
        "duration": result.get("duration"),
    }


def data_path(config: NodeConfig) -> Path:
    return Path(os.path.expanduser(config.data_dir))


async def find_router() -> str | None:
    return await discover(within=DISCOVERY_TIMEOUT)


async def find_routers() -> list[str]:
    return await discover_all(within=DISCOVERY_TIMEOUT)


@attrs.define(eq=False)
class Node:
    config: NodeConfig
    serve_http: bool = True
    agent: NodeAgent | None = None  # the first router's (every router's: ``agents``)
    # One agent per router (--router-url repeatable, or every router mDNS found).
    agents: list[NodeAgent] = attrs.field(factory=list)
    url: str | None = None
    openai: OpenAIBackend | None = None  # set when --backend openai
    learner: CapacityLearner | None = None  # set when --learn-capacity
    # The owner's pause (herd node pause): no new fleet work. The learner's, when there is one.
    paused: bool = False
    _transcriber: Transcriber | None = None

    async def set_paused(self, paused: bool) -> None:
        """Pause or resume fleet work; the router hears it in a heartbeat sent at once."""
        if self.learner is not None:
            await trio.to_thread.run_sync(self.learner.set_paused, paused)
        if paused != self.paused:
            log.info(
                "paused: the fleet sends this machine no new work (herd node resume to undo)"
                if paused
                else "resumed: this machine takes fleet work again"
            )
        self.paused = paused
        self.wake()

    def wake(self) -> None:
        """A heartbeat now, to every router (something in the report changed)."""
        for agent in self.agents:
            agent.wake()

    def capacity_now(self, cpu: CpuInfo, memory: MemoryInfo) -> Capacity:
        """The capacity for a heartbeat: the learner's, else all of it unless paused."""
        if self.learner is None:
            return Capacity(paused=True) if self.paused else Capacity()
        names = {p.info.get("name") or "" for p in psutil.process_iter(["name"])}
        used = (
            100.0 * (1 - memory.available_bytes / memory.total_bytes) if memory.total_bytes else 0
        )
        return self.learner.current(
            cpu.percent,
            used,
            memory.total_bytes,
            dt.datetime.now(),
            in_meeting(names, sys.platform),
        )

    def transcriber(self) -> Transcriber | None:
        if self._transcriber is None:
            path = whisper_model_path(self.config.whisper_model)
            if path is None:
                return None
            self._transcriber = Transcriber(path)
        return self._transcriber

    async def drain(self) -> bool:
        """Stop taking work: announce draining and wait (up to ``drain_timeout``) until the
        router says none of this node's requests are in flight. Returns True if drained."""
        self._drain_all()
        connected = [agent for agent in self.agents if agent.connected]
        if not connected:
            return True
        with trio.move_on_after(self.config.drain_timeout):
            for agent in connected:  # every router must have let its requests finish
                await agent.drained.wait()
            log.info("drained: no requests left in flight")
            return True
        log.warning("drain timed out after %.0f s; stopping anyway", self.config.drain_timeout)
        return False

    def _drain_all(self) -> None:
        """Drain once, towards every router: whichever router asked, or the node stopping."""
        for agent in self.agents:
            if not agent.draining:
                agent._start_draining()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. Started once the node's HTTP app (if any) is listening and the
        agents are running (one per router; each connects, and reconnects, on its own)."""
        locate = None
        if not self.config.router_url:
            log.info("no --router-url: looking for routers on the LAN (mDNS %s)", SERVICE_TYPE)
            found: list[str] = []
            while not found:
                found = await find_routers()
            log.info("found %s at %s", "the router" if len(found) == 1 else "routers", found)
            # One router found: look again after losing it, in case it moved. Several: each
            # agent keeps its own (another lookup could hand it a router already served).
            locate = find_router if len(found) == 1 else None
            self.config = attrs.evolve(
                self.config, router_url=found[0], more_router_urls=tuple(found[1:])
            )
        agent_config(self.config)  # fail early, naming the problem
        async with backend_client() as client, trio.open_nursery() as nursery:
            agent_url = ""
            if self.serve_http:
                self.url = await nursery.start(
                    serve_app,
                    FinishResponses(create_node_app(self, client)),
                    self.config.host,
                    self.config.port,
                )
                agent_url = advertised_url(self.url, self.config)
                log.info("node listening on %s (advertised as %s)", self.url, agent_url)
            if self.config.backend == "openai":
                if not self.serve_http:
                    raise NodeConfigError("an OpenAI-compatible backend needs the node's port")
                self.openai = OpenAIBackend(self.config.ollama_url.rstrip("/"), client)
            if self.config.learn_capacity:
                self.learner = await trio.to_thread.run_sync(
                    lambda: CapacityLearner.load(data_path(self.config) / "capacity.json")
                )
                self.paused = self.learner.paused
                if self.paused:
                    log.info("paused (since before the restart): herd node resume to undo")
            accelerators = AcceleratorReader()  # one reader (and its cache) for every agent
            for url in self.config.router_urls:
                agent = NodeAgent(
                    agent_config(attrs.evolve(self.config, router_url=url), agent_url),
                    backend=self.openai,
                    locate=locate,
                    capacity=self.capacity_now,
                    accelerators=accelerators.read,
                    on_drain=self._drain_all,
                )
                self.agents.append(agent)
                await nursery.start(agent.run)
            self.agent = self.agents[0]
            task_status.started()
