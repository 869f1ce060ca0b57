"""The inference endpoints, served as plain ASGI in front of the Quart app.

Each request runs in its own nursery: the handler task, and a watcher that waits for the
client's ``http.disconnect`` and cancels the nursery. Everything the request started upstream
(the node's slot, the backend connection) lives in the request's exit stack inside that nursery,
so a client that goes away cancels its upstream request, the backend connection is closed, the
slot is released, and the trace says ``client_disconnected``.

Serving these paths below Quart keeps the per-request cost to what the job needs: no request
object, no response wrapper, bytes straight from the backend to the client's socket.

When a request ends, :meth:`ProxyASGI.record` writes its trace and one access line (logger
``herd.access``, INFO): request id, model asked and served, node, outcome, HTTP status,
milliseconds and tokens per second, also as structured fields for the JSONL log. Nothing is
logged per streamed chunk.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import attrs
import trio

from herd import logs
from herd.core import traces
from herd.core.api.shaping import ROUTES, InferenceRequest, Route, shape
from herd.core.errors import (
    HerdError,
    PayloadTooLarge,
    RequestTimeout,
    TooManyRequests,
    parse_json_body,
)
from herd.core.policy.deadlines import stall_budget
from herd.core.responses_store import StoredResponse
from herd.core.traces import TraceRecord
from herd.http import relay as relays
from herd.http.security import key_owner
from herd.state.cancellation import is_cancellation
from herd.transport import fanout
from herd.transport.dispatch import Attempts, Opened, model_bytes, models_known, open_upstream
from herd.transport.link import Link

log = logging.getLogger("herd.proxy")
access = logging.getLogger(logs.ACCESS_LOGGER)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Any  # the Quart app (its ASGI types are narrower than ours)


class ClientGone(Exception):
    """The client disconnected while we were still reading its request."""


@attrs.define
class RequestContext:
    request_id: str
    route: Route
    started: float  # router clock
    wall: float
    disconnected: bool = False
    headers_sent: bool = False
    # The last byte went out: a disconnect from now on is the normal end of the exchange.
    finished: bool = False
    response_started: bool = False
    status_code: int | None = None  # the HTTP status sent to the client, once sent


async def read_body(receive: Receive, limit: int) -> bytes:
    """Read the whole request body. Raises :class:`PayloadTooLarge` past ``limit`` bytes,
    :class:`ClientGone` on a disconnect. The caller puts it under the body deadline."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the {limit} byte limit")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


# Requests one client address may have in progress at once; beyond it, 429 with Retry-After.
PER_CLIENT_LIMIT = 512


class ProxyASGI:
    """Route the inference paths here; hand everything else to ``app`` (the Quart app)."""

    def __init__(self, link: Link, app: ASGIApp) -> None:
        self.link = link
        self.state = link.state
        self.app = app
        self.per_client = link.state.in_progress_by_client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = ROUTES.get(scope["path"])
            if route is not None:
                client = (scope.get("client") or ("?",))[0]
                if self.per_client.get(client, 0) >= PER_CLIENT_LIMIT:
                    error = TooManyRequests(
                        f"this client already has {PER_CLIENT_LIMIT} "
                        "requests in progress; wait for some to finish"
                    )
                    await relays.send_error(send, error, route.flavor, "-")
                    return
                self.per_client[client] = self.per_client.get(client, 0) + 1
                try:
                    await self.handle(route, scope, receive, send)
                finally:
                    self.per_client[client] -= 1
                    if not self.per_client[client]:
                        del self.per_client[client]
                return
        await self.app(scope, receive, send)

    async def handle(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = RequestContext(
            request_id=uuid.uuid4().hex[:20],
            route=route,
            started=trio.current_time(),
            wall=time.time(),
        )
        config = self.link.config
        raw: bytes | None = None
        try:
            # One deadline for the whole body, not per read, so a client trickling a byte at a
            # time (slowloris) can't hold the connection and its per-client slot. Hypercorn's
            # read_timeout can't do this: it also runs while a client silently reads a long
            # streamed answer, and would cut that.
            with trio.move_on_after(config.body_timeout):
                raw = await read_body(receive, config.max_body_bytes)
            if raw is None:
                raise RequestTimeout(
                    f"request body not received within {config.body_timeout:g} s; "
                    "send it faster or raise --body-timeout"
                )
        except ClientGone:
            return
        except HerdError as exc:
            await relays.send_error(send, exc, route.flavor, ctx.request_id)
            return
        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect" and not ctx.finished:
                        ctx.disconnected = True
                        nursery.cancel_scope.cancel()
                        return

            async def send_marking_end(message: Message) -> None:
                if message["type"] == "http.response.body":
                    if not message.get("more_body"):
                        ctx.finished = True  # before the await: the disconnect may come now
                else:
                    ctx.response_started = True
                    ctx.status_code = message.get("status")
                await send(message)

            nursery.start_soon(watch_disconnect)
            try:
                await self.serve(ctx, scope, raw, send_marking_end)
            finally:
                nursery.cancel_scope.cancel()

    async def serve(self, ctx: RequestContext, scope: Scope, raw: bytes, send: Send) -> None:
        state = self.state
        route = ctx.route
        request: InferenceRequest | None = None
        opened: Opened | None = None
        attempts = Attempts()
        result: relays.RelayResult | None = None
        status = traces.FAILED
        error: str | None = None
        try:
            body = parse_json_body(raw)
            request = shape(
                route,
                body,
                header(scope, b"x-herd-tags"),
                header(scope, b"x-herd-allow-substitution"),
                # The stored response a Responses request continues (None: not stored here).
                state.responses.get(
                    body.get("previous_response_id"), key_owner(scope, self.link.config.api_keys)
                )
                if route.name == "openai.responses"
                else None,
            )
            state.requests_total += 1
            if request.load_action is not None and await self.load_or_unload(
                ctx, request, attempts, send
            ):
                status = traces.COMPLETED
                return
            async with contextlib.AsyncExitStack() as stack:
                opened = await open_upstream(self.link, request, stack, attempts)
                ctx.headers_sent = True
                with trio.CancelScope() as work:
                    opened.lease.scope = work  # the zombie reaper cancels this
                    opened.lease.stall_limit = stall_budget(
                        maximum=state.settings.stale_timeout,
                        tokens_per_second=state.history.decode_rate(opened.node_id, opened.model),
                    )
                    result = await self.relay(ctx, opened, request, send)
                if work.cancelled_caught or result is None:
                    result = relays.RelayResult(complete=False, error=opened.lease.reap_reason)
                    if ctx.response_started and not ctx.finished:
                        await relays.end_interrupted(send, request, result.error or "reaped")
                if result.complete:
                    opened.lease.succeeded()
                    status = traces.COMPLETED
                    if isinstance(result.outcome, StoredResponse):
                        # A Responses answer, store: true; for the key that asked.
                        state.responses.put(
                            result.outcome, key_owner(scope, self.link.config.api_keys)
                        )
                else:
                    status = traces.INCOMPLETE if result.status_code < 400 else traces.FAILED
                    error = result.error
        except HerdError as exc:
            error = exc.message
            if not ctx.headers_sent:
                await relays.send_error(send, exc, route.flavor, ctx.request_id, attempts)
        except BaseException as exc:
            # Cancellation may arrive inside an exception group (httpcore connects through a
            # nursery): a client that left during connect is a disconnect, not a node failure.
            if ctx.disconnected and is_cancellation(exc):
                status = traces.CLIENT_DISCONNECTED
                error = "client disconnected"
            raise
        finally:
            if request is not None:
                self.record(ctx, request, opened, attempts, result, status, error)

    async def load_or_unload(
        self, ctx: RequestContext, request: InferenceRequest, attempts: Attempts, send: Send
    ) -> bool:
        """Ollama's load/unload request, to every node holding the model (see
        :mod:`herd.transport.fanout`). False: not handled here (a load of a model loaded nowhere
        is routed like any request; a model no node has gets its 404 there)."""
        state = self.state
        if not models_known(state, request.models):
            return False
        nodes = fanout.holders(state, request.model)
        if not nodes and request.load_action == "load":
            return False
        headers = [
            (b"x-herd-model", request.model.encode()),
            (b"x-herd-retries", b"0"),
            (b"x-herd-request-id", ctx.request_id.encode()),
        ]
        if nodes:
            result = await fanout.fan_out(self.link, request, nodes)
            attempts.last_node = result.reached[0]
            answer = result.answer
            headers.append((b"x-herd-node", ",".join(result.reached).encode()))
            if result.failed:
                headers.append((b"x-herd-failed", ",".join(result.failed).encode()))
        else:
            answer = fanout.unloaded_answer(request)
        content_type = b"application/x-ndjson" if request.stream else b"application/json"
        ctx.headers_sent = True
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", content_type), *headers],
            }
        )
        body = answer.strip() + b"\n" if request.stream else answer
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return True

    async def relay(
        self, ctx: RequestContext, opened: Opened, request: InferenceRequest, send: Send
    ) -> relays.RelayResult:
        if opened.response.status_code >= 400:
            return await relays.relay_client_error(send, opened, request, ctx.request_id)
        if request.route.flavor == "ollama":
            return await relays.relay_ollama(send, opened, request, ctx.request_id)
        created = int(ctx.wall)
        if request.stream:
            return await relays.relay_openai_stream(send, opened, request, ctx.request_id, created)
        return await relays.relay_openai_whole(send, opened, request, ctx.request_id, created)

    def record(
        self,
        ctx: RequestContext,
        request: InferenceRequest,
        opened: Opened | None,
        attempts: Attempts,
        result: relays.RelayResult | None,
        status: str,
        error: str | None,
    ) -> None:
        now = trio.current_time()
        latency_ms = (now - ctx.started) * 1000
        decision = opened.decision if opened is not None else attempts.last_decision
        winner = decision.winner if decision is not None else None
        if opened is not None and status == traces.COMPLETED:
            # Service time: from the slot to the last byte. The scorer adds the queue itself.
            slot_at = opened.lease.acquired_at or ctx.started
            history = self.state.history
            service_ms = (now - slot_at) * 1000
            rate = result.tokens_per_second if result is not None else None
            history.record(opened.node_id, opened.model, service_ms, rate)
            if self.state.shared is not None:  # the other routers learn from it too
                self.state.shared.publish_sample(opened.node_id, opened.model, service_ms, rate)
            if result is not None:
                history.record_timings(
                    opened.node_id,
                    opened.model,
                    prompt_tokens=result.prompt_tokens,
                    prefill_seconds=result.prefill_seconds,
                    load_seconds=result.load_seconds,
                    model_bytes=model_bytes(self.state, opened.node_id, opened.model),
                )
        self.state.record_trace(
            trace := TraceRecord(
                request_id=ctx.request_id,
                model=opened.model if opened is not None else request.model,
                original_model=request.asked if attempts.virtual_rule else request.model,
                node_id=opened.node_id if opened is not None else attempts.last_node,
                score=winner.score if winner is not None else None,
                scores_breakdown=dict(winner.breakdown) if winner is not None else {},
                offload=winner.offload if winner is not None else None,
                status=status,
                latency_ms=latency_ms,
                time_to_first_token_ms=(
                    (opened.first_byte_at - ctx.started) * 1000 if opened is not None else None
                ),
                prompt_tokens=result.prompt_tokens if result is not None else None,
                completion_tokens=result.completion_tokens if result is not None else None,
                retry_count=attempts.retries,
                fallback_used=opened.fallback if opened is not None else False,
                excluded_nodes=tuple(attempts.excluded),
                original_format=request.route.flavor,
                kind=request.route.kind,
                error_message=error,
                timestamp=ctx.wall,
                tags=request.tags,
                substitution=opened.substitution if opened is not None else None,
                context_action=opened.context_action if opened is not None else None,
                runners_up=tuple((c.node_id, c.score) for c in opened.decision.runners_up)
                if opened is not None
                else (),
            )
        )
        self.log_access(trace, ctx.status_code, result)

    @staticmethod
    def log_access(
        trace: TraceRecord, status_code: int | None, result: relays.RelayResult | None
    ) -> None:
        """The request's one access line (see the module docstring)."""
        if not access.isEnabledFor(logging.INFO):
            return
        rate = result.tokens_per_second if result is not None else None
        access.info(
            "%s %s -> %s on %s: %s %s, %.0f ms, %s tok/s",
            trace.request_id,
            trace.original_model or "-",
            trace.model or "-",
            trace.node_id or "-",
            trace.status,
            status_code if status_code is not None else "-",
            trace.latency_ms,
            f"{rate:.1f}" if rate is not None else "-",
            extra=logs.fields(
                request_id=trace.request_id,
                model_asked=trace.original_model,
                model_served=trace.model,
                node=trace.node_id,
                status=trace.status,
                http_status=status_code,
                ms=round(trace.latency_ms, 1),
                tokens_per_second=round(rate, 1) if rate is not None else None,
                route=trace.original_format,
                kind=trace.kind,
                error=trace.error_message,
            ),
        )
