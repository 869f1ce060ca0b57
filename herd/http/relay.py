"""Relays: copy an opened upstream response to the client in the client's API format.

- Ollama clients that stream get the backend's bytes as they arrive, unparsed. Only the stream's
  last line is parsed, once, for token counts (lines are counted as they pass, so a stream cut
  short still reports the tokens that reached the client); a stream that breaks or ends without
  its ``done`` line gets a final ``{"error": ...}`` line so the client never waits on a dead
  stream.
- Ollama clients that don't stream get the one object Ollama would have sent: the router
  streams from the backend anyway (see :mod:`herd.core.api.shaping`) and folds the stream with
  :class:`~herd.core.api.assemble.StreamAssembler`.
- OpenAI clients get the backend's NDJSON translated chunk by chunk into SSE (or one JSON object
  when not streaming); a broken stream ends with an SSE error event and ``data: [DONE]``.

Everything read from a node is bounded: one NDJSON line by :data:`LINE_LIMIT`, an assembled
answer by :data:`ANSWER_LIMIT`, embeddings by :data:`EMBED_LIMIT`, an error body by
:data:`ERROR_BODY_LIMIT` (limits and the line splitter in :mod:`herd.core.bodies`).

Every relay returns a :class:`RelayResult` for the trace; none of them raises on a backend
failure after the first byte (that is an *incomplete* stream, reported in-band).
"""

from __future__ import annotations

import contextlib
import json
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, MutableMapping
from typing import Any

import attrs
import httpx

from herd.core.api import anthropic, chat, openai_compat, responses
from herd.core.api.assemble import StreamAssembler
from herd.core.api.shaping import InferenceRequest
from herd.core.bodies import LineSplitter
from herd.core.errors import ApiFlavor, BadRequest, ClientError, HerdError, NodeBadStatus
from herd.core.models import KIND_EMBED
from herd.transport.bodies import ANSWER_LIMIT, EMBED_LIMIT, LINE_LIMIT, error_text
from herd.transport.dispatch import Attempts, Opened
from herd.transport.errors import describe

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
    prefill_seconds: float | None = None  # the backend's prompt_eval_duration
    error: str | None = None
    outcome: Any = None  # what the API module keeps of a complete answer (chat.StreamTranslator)

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


def attempt_headers(attempts: Attempts | None) -> list[tuple[bytes, bytes]]:
    """What an error response can say of the attempts made before it."""
    if attempts is None:
        return [(b"x-herd-retries", b"0")]
    headers = [(b"x-herd-retries", str(attempts.retries).encode())]
    if attempts.last_node is not None:
        headers.append((b"x-herd-node", attempts.last_node.encode()))
    return headers


async def send_json(
    send: Send,
    status: int,
    payload: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    # With its length, the answer needs no chunked framing: one send fewer per response.
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


async def send_error(
    send: Send,
    error: HerdError,
    flavor: ApiFlavor,
    request_id: str,
    attempts: Attempts | None = None,
) -> None:
    extra = [(b"x-herd-request-id", request_id.encode()), *attempt_headers(attempts)]
    extra += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    await send_json(send, error.status_for(flavor), error.render(flavor), extra)


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
    prefill = final.get("prompt_eval_duration")
    if isinstance(prefill, int | float) and prefill > 0:
        result.prefill_seconds = prefill / 1e9


def _parse_line(line: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


class BackendRefused(ClientError):
    """A backend's own 4xx, passed on in the caller's shape with its status."""

    code = None

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status  # type: ignore[misc]


class StreamBroken(Exception):
    """The backend's stream can't be read on (malformed, oversized, or the connection broke).
    Only raised and caught inside this module."""


@attrs.define
class LineReader:
    """The backend's NDJSON lines, parsed, each at most :data:`LINE_LIMIT` bytes; an
    ``{"error": ...}`` line is yielded like any other. :meth:`lines` raises
    :class:`StreamBroken`; use it under ``contextlib.aclosing``. ``size`` is the bytes read."""

    opened: Opened
    size: int = 0
    _splitter: LineSplitter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._splitter = LineSplitter(LINE_LIMIT, f"node {self.opened.node_id}")

    def _split(self, data: bytes) -> list[bytes]:
        self.size += len(data)
        try:
            return self._splitter.feed(data)
        except NodeBadStatus as exc:
            raise StreamBroken(exc.message) from exc

    def _parse(self, lines: list[bytes]) -> list[dict[str, Any]]:
        parsed = []
        for line in lines:
            if line.strip():
                chunk = _parse_line(line)
                if chunk is None:
                    raise StreamBroken(f"node {self.opened.node_id} sent a malformed stream line")
                parsed.append(chunk)
        return parsed

    async def lines(self) -> AsyncGenerator[dict[str, Any], None]:
        opened = self.opened
        for chunk in self._parse(self._split(opened.first_chunk)):
            yield chunk
        try:
            async for data in opened.chunks:
                opened.lease.chunks += 1
                for chunk in self._parse(self._split(data)):
                    yield chunk
        except httpx.TransportError as exc:
            raise StreamBroken(f"node {opened.node_id} broke the stream: {describe(exc)}") from exc
        for chunk in self._parse([self._splitter.rest()]):
            yield chunk


async def relay_ollama(
    send: Send, opened: Opened, request: InferenceRequest, request_id: str
) -> RelayResult:
    """Pass the backend's bytes through; check only the last line."""
    if request.route.kind != KIND_EMBED and not request.stream:
        return await relay_ollama_whole(send, opened, request, request_id)
    response = opened.response
    content_type = response.headers.get("content-type", "application/json").encode()
    headers = [(b"content-type", content_type), *herd_headers(opened, request_id)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    lease = opened.lease
    tail = Tail()
    lines = 0
    if opened.first_chunk:
        tail.add(opened.first_chunk)
        lines += opened.first_chunk.count(b"\n")
        await send({"type": "http.response.body", "body": opened.first_chunk, "more_body": True})
    error: str | None = None
    try:
        async for chunk in opened.chunks:
            lease.chunks += 1
            tail.add(chunk)
            lines += chunk.count(b"\n")
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except httpx.TransportError as exc:
        error = f"node {opened.node_id} broke the stream: {describe(exc)}"
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
        if request.route.kind != KIND_EMBED:
            result.completion_tokens = result.completion_tokens or lines  # tokens relayed
            line = json.dumps({"error": result.error}).encode() + b"\n"
            await send({"type": "http.response.body", "body": line, "more_body": False})
            return result
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return result


async def assemble(opened: Opened, chat: bool) -> tuple[dict[str, Any] | None, str | None, int]:
    """Read the backend's stream to its end and fold it. Returns (the object, None, chunks)
    or (None, the error, chunks that carried tokens)."""
    assembler = StreamAssembler(chat=chat)
    reader = LineReader(opened)
    try:
        async with contextlib.aclosing(reader.lines()) as lines:
            async for chunk in lines:
                if "error" in chunk:
                    return None, str(chunk["error"]), assembler.chunks
                assembler.feed(chunk)
                if reader.size > ANSWER_LIMIT:
                    return None, f"node {opened.node_id} sent an answer over the limit", 0
    except StreamBroken as exc:
        return None, str(exc), assembler.chunks
    if not assembler.done:
        return None, f"node {opened.node_id} ended the stream before it was done", assembler.chunks
    return assembler.result(), None, assembler.chunks


def _broken_answer(result: RelayResult, message: str, flavor: ApiFlavor) -> bytes:
    result.error = message
    result.status_code = 502
    return NodeBadStatus(message).render(flavor)


async def relay_ollama_whole(
    send: Send, opened: Opened, request: InferenceRequest, request_id: str
) -> RelayResult:
    """A non-streaming Ollama client: fold the backend's stream into one object."""
    result = RelayResult(complete=False)
    data, error, chunks = await assemble(opened, chat=request.route.name == "ollama.chat")
    headers = herd_headers(opened, request_id)
    if data is None:
        result.completion_tokens = chunks or None
        await send_json(send, 502, _broken_answer(result, error or "", "ollama"), headers)
        return result
    _final_stats(result, data)
    result.complete = True
    await send_json(send, 200, json.dumps(data).encode(), headers)
    return result


def stream_translator(
    request: InferenceRequest, request_id: str, created: int, model: str
) -> chat.StreamTranslator:
    name = request.route.name
    if name == "anthropic.messages":
        return anthropic.stream_translator(request, request_id, created, model)
    if name == "openai.responses":
        return responses.stream_translator(request, request_id, created, model)
    kind = (
        openai_compat.ChatStreamTranslator
        if name == "openai.chat"
        else openai_compat.CompletionStreamTranslator
    )
    return kind(
        request_id=request_id, created=created, model=model, include_usage=request.include_usage
    )


def whole_answer(
    request: InferenceRequest, data: dict[str, Any], request_id: str, created: int, model: str
) -> tuple[dict[str, Any], Any]:
    """The client's one object for a folded answer (text routes), and what the API module
    keeps of it (see :attr:`chat.StreamTranslator.outcome`)."""
    name = request.route.name
    if name == "anthropic.messages":
        return anthropic.whole_answer(request, data, request_id, created, model)
    if name == "openai.responses":
        return responses.whole_answer(request, data, request_id, created, model)
    if name == "openai.chat":
        answer = openai_compat.chat_response_to_openai(
            data, request_id=request_id, created=created, model=model
        )
    else:
        answer = openai_compat.completion_response_to_openai(
            data, request_id=request_id, created=created, model=model
        )
    return answer, None


async def relay_openai_stream(
    send: Send, opened: Opened, request: InferenceRequest, request_id: str, created: int
) -> RelayResult:
    """Translate the backend's NDJSON into the client's SSE events as they arrive."""
    translator = stream_translator(request, request_id, created, opened.model)
    headers = [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-cache"),
        *herd_headers(opened, request_id),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    result = RelayResult(complete=False)
    error: str | None = None
    tokens = 0
    try:
        async with contextlib.aclosing(LineReader(opened).lines()) as lines:
            async for chunk in lines:
                if "error" in chunk:
                    error = str(chunk["error"])
                    break
                out = translator.feed(chunk)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                if chunk.get("done") is True:
                    _final_stats(result, chunk)
                else:
                    tokens += 1  # one token per line of Ollama's stream
                if translator.stopped:
                    result.completion_tokens = tokens
                    break
    except StreamBroken as exc:
        error = str(exc)
    if error is None and (translator.finished or translator.stopped):
        result.complete = True
        result.outcome = translator.outcome
        tail = translator.done()
    else:
        result.error = error or f"node {opened.node_id} ended the stream before it was done"
        result.completion_tokens = result.completion_tokens or tokens or None
        tail = translator.error(result.error)
    await send({"type": "http.response.body", "body": tail, "more_body": False})
    return result


async def read_rest(opened: Opened, limit: int) -> bytes:
    """The rest of a (non-streamed) answer, at most ``limit`` bytes. Raises StreamBroken."""
    parts = [opened.first_chunk]
    size = len(opened.first_chunk)
    try:
        async for chunk in opened.chunks:
            opened.lease.chunks += 1
            size += len(chunk)
            if size > limit:
                raise StreamBroken(f"node {opened.node_id} sent an answer over {limit} bytes")
            parts.append(chunk)
    except httpx.TransportError as exc:
        raise StreamBroken(f"node {opened.node_id} broke the response: {describe(exc)}") from exc
    return b"".join(parts)


async def relay_openai_whole(
    send: Send, opened: Opened, request: InferenceRequest, request_id: str, created: int
) -> RelayResult:
    """Read the backend's whole answer, translate it, send one JSON object."""
    result = RelayResult(complete=False)
    headers = herd_headers(opened, request_id)
    name = request.route.name
    data: dict[str, Any] | None
    error: str | None
    if name == "openai.embeddings":
        try:
            data = _parse_line(await read_rest(opened, EMBED_LIMIT))
            error = None if data is not None else f"node {opened.node_id} sent an unreadable answer"
        except StreamBroken as exc:
            data, error = None, str(exc)
        if data is not None and "error" in data:
            error = str(data["error"])
            data = None
    else:
        data, error, chunks = await assemble(
            opened, chat=request.route.upstream_path == "/api/chat"
        )
        result.completion_tokens = chunks or None
    if data is None:
        flavor = request.route.flavor
        status = NodeBadStatus("").status_for(flavor)  # 502, or Anthropic's 500
        await send_json(send, status, _broken_answer(result, error or "", flavor), headers)
        return result
    if name != "openai.embeddings":
        payload, result.outcome = whole_answer(request, data, request_id, created, opened.model)
    else:
        try:
            payload = openai_compat.embed_response_to_openai(
                data,
                model=opened.model,
                encoding_format=request.embedding_format,
                dimensions=request.dimensions,
            )
        except BadRequest as exc:
            result.error, result.status_code = exc.message, exc.status
            await send_json(send, exc.status, exc.render("openai"), headers)
            return result
        except ValueError as exc:
            await send_json(send, 502, _broken_answer(result, str(exc), "openai"), headers)
            return result
    _final_stats(result, data)
    result.complete = True
    await send_json(send, 200, json.dumps(payload).encode(), headers)
    return result


async def end_interrupted(send: Send, request: InferenceRequest, message: str) -> None:
    """Finish a response cut short by the router itself, in the caller's format."""
    name = request.route.name
    if request.stream and name == "anthropic.messages":
        body = anthropic.stream_error(message)
    elif request.stream and name == "openai.responses":
        body = responses.stream_error(message)
    elif request.route.flavor == "openai" and request.stream:
        body = openai_compat.stream_error(message)
    else:
        body = json.dumps({"error": message}).encode() + b"\n"
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def relay_client_error(
    send: Send, opened: Opened, request: InferenceRequest, request_id: str
) -> RelayResult:
    """The backend refused the request itself (4xx): pass it on in the caller's shape. Only
    the error's message is read (a bounded prefix of the body)."""
    status = opened.response.status_code
    try:
        raw = await read_rest(opened, 64 * 1024)
    except StreamBroken:
        raw = opened.first_chunk[: 64 * 1024]
    message = error_text(raw) or f"HTTP {status}"
    error = BackendRefused(message, status)
    flavor = request.route.flavor
    await send_json(
        send, error.status_for(flavor), error.render(flavor), herd_headers(opened, request_id)
    )
    return RelayResult(complete=False, status_code=status, error=message)
