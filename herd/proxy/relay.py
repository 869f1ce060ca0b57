"""Relays: copy an opened upstream response to the client in the client's API format.

- Ollama clients get the backend's bytes as they arrive, unparsed. Only the stream's last line is
  parsed, once, for token counts; a stream that breaks or ends without its ``done`` line gets a
  final ``{"error": ...}`` line so the client never waits on a dead stream.
- OpenAI clients get the backend's NDJSON translated chunk by chunk into SSE (or one JSON object
  when not streaming); a broken stream ends with an SSE error event and ``data: [DONE]``.

Every relay returns a :class:`RelayResult` for the trace; none of them raises on a backend
failure after the first byte (that is an *incomplete* stream, reported in-band).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import attrs
import httpx

from herd.errors import ApiFlavor, HerdError
from herd.models import KIND_EMBED
from herd.proxy import openai_compat
from herd.proxy.dispatch import Opened
from herd.proxy.shaping import InferenceRequest

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

TAIL_LIMIT = 256 * 1024  # bytes of the stream's end kept to find the final line


@attrs.define
class RelayResult:
    complete: bool
    status_code: int = 200
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    eval_seconds: float | None = None
    total_seconds: float | None = None  # the backend's total_duration (load included)
    load_seconds: float | None = None
    error: str | None = None

    @property
    def tokens_per_second(self) -> float | None:
        """Generation speed; for an embedding (nothing generated), the speed it read the
        input at. The router's per-node speed learning compares like with like (per model)."""
        if self.completion_tokens and self.eval_seconds:
            return self.completion_tokens / self.eval_seconds
        if not self.completion_tokens and self.prompt_tokens and self.total_seconds:
            working = self.total_seconds - (self.load_seconds or 0.0)
            return self.prompt_tokens / working if working > 0 else None
        return None


@attrs.define
class Tail:
    """The last few chunks of a stream, bounded, to find its final line cheaply."""

    chunks: deque[bytes] = attrs.field(factory=deque)
    size: int = 0

    def add(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        while self.size - len(self.chunks[0]) >= TAIL_LIMIT:
            self.size -= len(self.chunks.popleft())

    def last_line(self) -> bytes:
        data = b"".join(self.chunks).rstrip()
        return data.rsplit(b"\n", 1)[-1]


def herd_headers(opened: Opened, request_id: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-herd-node", opened.node_id.encode()),
        (b"x-herd-model", opened.model.encode()),
        (b"x-herd-retries", str(opened.retries).encode()),
        (b"x-herd-fallback", b"true" if opened.fallback else b"false"),
        (b"x-herd-request-id", request_id.encode()),
    ]


async def send_json(
    send: Send,
    status: int,
    payload: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", b"application/json"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


async def send_error(send: Send, error: HerdError, flavor: ApiFlavor, request_id: str) -> None:
    extra = [(b"x-herd-request-id", request_id.encode())]
    extra += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    await send_json(send, error.status, error.render(flavor), extra)


def _final_stats(result: RelayResult, final: dict[str, Any]) -> None:
    prompt = final.get("prompt_eval_count")
    completion = final.get("eval_count")
    duration = final.get("eval_duration")
    result.prompt_tokens = prompt if isinstance(prompt, int) else result.prompt_tokens
    result.completion_tokens = completion if isinstance(completion, int) else None
    if isinstance(duration, int | float) and duration > 0:
        result.eval_seconds = duration / 1e9
    total, load = final.get("total_duration"), final.get("load_duration")
    if isinstance(total, int | float) and total > 0:
        result.total_seconds = total / 1e9
    if isinstance(load, int | float) and load > 0:
        result.load_seconds = load / 1e9


def _parse_line(line: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


async def relay_ollama(
    send: Send, opened: Opened, request: InferenceRequest, request_id: str
) -> RelayResult:
    """Pass the backend's bytes through; check only the last line."""
    response = opened.response
    content_type = response.headers.get("content-type", "application/json").encode()
    headers = [(b"content-type", content_type), *herd_headers(opened, request_id)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    lease = opened.lease
    tail = Tail()
    if opened.first_chunk:
        tail.add(opened.first_chunk)
        await send({"type": "http.response.body", "body": opened.first_chunk, "more_body": True})
    error: str | None = None
    try:
        async for chunk in opened.chunks:
            lease.chunks += 1
            tail.add(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except httpx.TransportError as exc:
        error = f"node {opened.node_id} broke the stream: {type(exc).__name__}"
    result = RelayResult(complete=False)
    if request.route.kind == KIND_EMBED:
        result.complete = error is None and tail.size > 0
        if result.complete and request.route.name == "ollama.embed":
            final = _parse_line(tail.last_line()) if tail.size < TAIL_LIMIT else None
            if final is not None and isinstance(final.get("prompt_eval_count"), int):
                result.prompt_tokens = final["prompt_eval_count"]
    else:
        final = _parse_line(tail.last_line())
        if final is not None and final.get("done") is True:
            result.complete = error is None
            _final_stats(result, final)
        elif final is not None and "error" in final:
            error = str(final["error"])
    if not result.complete:
        result.error = error or f"node {opened.node_id} ended the stream before it was done"
        if request.stream:
            line = json.dumps({"error": result.error}).encode() + b"\n"
            await send({"type": "http.response.body", "body": line, "more_body": False})
            return result
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return result


async def relay_openai_stream(
    send: Send, opened: Opened, request: InferenceRequest, request_id: str, created: int
) -> RelayResult:
    """Translate the backend's NDJSON into OpenAI SSE chunks as they arrive."""
    translator: openai_compat.ChatStreamTranslator | openai_compat.CompletionStreamTranslator
    if request.route.name == "openai.chat":
        translator = openai_compat.ChatStreamTranslator(
            request_id=request_id,
            created=created,
            model=opened.model,
            include_usage=request.include_usage,
        )
    else:
        translator = openai_compat.CompletionStreamTranslator(
            request_id=request_id,
            created=created,
            model=opened.model,
            include_usage=request.include_usage,
        )
    headers = [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-cache"),
        *herd_headers(opened, request_id),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    result = RelayResult(complete=False)
    buffer = b""
    error: str | None = None

    async def feed(data: bytes) -> None:
        nonlocal buffer, error
        buffer += data
        if b"\n" not in buffer:
            return
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if not line.strip() or error is not None:
                continue
            chunk = _parse_line(line)
            if chunk is None:
                error = f"node {opened.node_id} sent a malformed stream line"
            elif "error" in chunk:
                error = str(chunk["error"])
            else:
                out = translator.feed(chunk)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                if chunk.get("done") is True:
                    _final_stats(result, chunk)

    try:
        await feed(opened.first_chunk)
        async for data in opened.chunks:
            opened.lease.chunks += 1
            await feed(data)
        await feed(b"\n")
    except httpx.TransportError as exc:
        error = f"node {opened.node_id} broke the stream: {type(exc).__name__}"
    if error is None and translator.finished:
        result.complete = True
        tail = translator.done()
    else:
        result.error = error or f"node {opened.node_id} ended the stream before it was done"
        tail = translator.error(result.error)
    await send({"type": "http.response.body", "body": tail, "more_body": False})
    return result


async def read_rest(opened: Opened) -> bytes:
    parts = [opened.first_chunk]
    async for chunk in opened.chunks:
        opened.lease.chunks += 1
        parts.append(chunk)
    return b"".join(parts)


async def relay_openai_whole(
    send: Send, opened: Opened, request: InferenceRequest, request_id: str, created: int
) -> RelayResult:
    """Read the backend's whole answer, translate it, send one JSON object."""
    result = RelayResult(complete=False)
    try:
        raw = await read_rest(opened)
    except httpx.TransportError as exc:
        raw = b""
        result.error = f"node {opened.node_id} broke the response: {type(exc).__name__}"
    data = _parse_line(raw) if raw else None
    if data is None or "error" in data:
        message = result.error or (
            str(data["error"]) if data else f"node {opened.node_id} sent an unreadable answer"
        )
        result.error = message
        body = {
            "error": {
                "message": message,
                "type": "server_error",
                "param": None,
                "code": "node_error",
            }
        }
        await send_json(send, 502, json.dumps(body).encode(), herd_headers(opened, request_id))
        result.status_code = 502
        return result
    name = request.route.name
    if name == "openai.chat":
        payload = openai_compat.chat_response_to_openai(
            data, request_id=request_id, created=created, model=opened.model
        )
    elif name == "openai.completions":
        payload = openai_compat.completion_response_to_openai(
            data, request_id=request_id, created=created, model=opened.model
        )
    else:
        payload = openai_compat.embed_response_to_openai(data, model=opened.model)
    _final_stats(result, data)
    result.complete = True
    await send_json(send, 200, json.dumps(payload).encode(), herd_headers(opened, request_id))
    return result


async def end_interrupted(send: Send, request: InferenceRequest, message: str) -> None:
    """Finish a response cut short by the router itself, in the caller's format."""
    if request.route.flavor == "openai" and request.stream:
        body = openai_compat.stream_error(message)
    else:
        body = json.dumps({"error": message}).encode() + b"\n"
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def relay_client_error(
    send: Send, opened: Opened, request: InferenceRequest, request_id: str
) -> RelayResult:
    """The backend refused the request itself (4xx): pass it on in the caller's shape."""
    status = opened.response.status_code
    raw = await read_rest(opened)
    data = _parse_line(raw)
    message = (
        str(data.get("error")) if data and "error" in data else raw[:300].decode("utf-8", "replace")
    )
    if request.route.flavor == "openai":
        body = json.dumps(
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }
        ).encode()
    else:
        body = json.dumps({"error": message}).encode()
    await send_json(send, status, body, herd_headers(opened, request_id))
    return RelayResult(complete=False, status_code=status, error=message)
