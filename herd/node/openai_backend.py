"""Any OpenAI-compatible server as a node's backend (``--backend openai``): llama.cpp's
``llama-server``, vLLM, LM Studio.

The router speaks Ollama's native API to every backend. For an OpenAI-compatible one, the node
puts an Ollama face on it, served on the node's own port under ``/backend`` (always advertised):
``/api/chat`` → ``/v1/chat/completions``, ``/api/generate`` → ``/v1/completions``,
``/api/embed`` and ``/api/embeddings`` → ``/v1/embeddings``, and ``/api/tags``, ``/api/ps``,
``/api/show``, ``/api/version`` answered from what the server reports (``/v1/models``; and
``/props`` where it exists, as on llama-server, for the context size and parallel slots).
Streams are translated chunk by chunk (SSE in, NDJSON out) with real token counts
(:class:`StreamTranslator`, pure). A backend that fails before answering is answered with
herd's JSON errors (:mod:`herd.node.upstream`); a stream it breaks, or ends before it is done
(no ``finish_reason``, no ``[DONE]``), or fails in-band (an ``error`` event), ends with an
Ollama error line: never a short answer that looks whole.

What is carried both ways:

- Thinking: ``reasoning_content`` (llama-server, DeepSeek) or ``reasoning`` (vLLM) in a message
  or a stream delta is Ollama's ``message.thinking``. Ollama's ``think`` goes out as the
  servers document it: true/false as ``chat_template_kwargs: {"enable_thinking": ...}``
  (llama-server and vLLM; a chat template that knows no such switch ignores it), a level
  (``low``, ``medium``, ``high``) as ``reasoning_effort`` too.
- Tool calls: Ollama's ``tools`` go as they are (the same shape); an assistant message's
  ``tool_calls`` get ids and JSON-string arguments, and a ``tool`` message the
  ``tool_call_id`` of the call it answers (by ``tool_name``, else in order). Back, the
  server's calls (streamed as fragments by index, or whole) become ``message.tool_calls``
  with object arguments and the server's ids, in a chunk of their own before the last.

Every read of the server is bounded (:mod:`herd.node.upstream`, limits in
:mod:`herd.core.bodies`): one SSE line by ``LINE_LIMIT``, the tool calls of one answer by it
too (they go out on one line), a whole answer by ``ANSWER_LIMIT``, embeddings by
``EMBED_LIMIT``, the model list and properties by ``PROBE_LIMIT``, an error body's message by
its first 64 KiB.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import attrs
import httpx
import trio

from herd.core.bodies import (
    ANSWER_LIMIT,
    EMBED_LIMIT,
    LINE_LIMIT,
    PROBE_LIMIT,
    error_text,
    over_limit,
)
from herd.core.errors import BadRequest, HerdError, NodeBadStatus
from herd.core.models import AvailableModel, BackendInfo, LoadedModel, normalize_model_name
from herd.node.backend import BackendState
from herd.node.upstream import (
    SOURCE,
    backend_error,
    close_shielded,
    close_when_done,
    error_detail,
    fetch,
    read_body,
    read_lines,
)

__all__ = ["OpenAIBackend", "normalize_model_name"]

log = logging.getLogger("herd.node")

PROBE_TIMEOUT = 3.0
OPTION_MAP = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "num_predict": "max_tokens",
    "stop": "stop",
}
THINK_LEVELS = ("low", "medium", "high")
THINKING_FIELDS = ("reasoning_content", "reasoning")  # llama-server/DeepSeek, vLLM
MAX_TOOL_CALLS = 1024  # in one answer
CALL_OVERHEAD = 64  # bytes a tool call is counted for, besides its name, id and arguments


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise NodeBadStatus(f"{SOURCE}'s {what} is not JSON: {raw[:200]!r}") from exc
    if not isinstance(data, dict):
        raise NodeBadStatus(f"{SOURCE}'s {what} is not a JSON object: {raw[:200]!r}")
    return data


@attrs.define(eq=False)
class OpenAIBackend:
    url: str
    client: httpx.AsyncClient
    # Ollama-style name (what the fleet sees) → the server's own model id.
    ids: dict[str, str] = attrs.field(factory=dict)
    context_length: int = 0
    slots: int = 0
    last: BackendState | None = None

    async def probe(self) -> BackendState:
        """Read the server's models (and llama-server's /props). Never raises but Cancelled."""
        try:
            with trio.fail_after(PROBE_TIMEOUT):
                status, raw = await self._get("/v1/models")
                if status != 200:
                    raise NodeBadStatus(f"/v1/models answered {status}: {raw.decode()}")
                data = _json_object(raw, "model list").get("data", [])
                ids = {normalize_model_name(m["id"]): m["id"] for m in data if "id" in m}
                status, raw = await self._get("/props")
                with_props = _json_object(raw, "/props") if status == 200 else None
                if with_props is not None:
                    settings = with_props.get("default_generation_settings", {})
                    context = int(settings.get("n_ctx") or with_props.get("n_ctx") or 0)
                    slots = int(with_props.get("total_slots") or 0)
        except (
            httpx.HTTPError,
            HerdError,
            ValueError,
            AttributeError,
            TypeError,
            KeyError,
            trio.TooSlowError,
        ) as exc:
            # Answers of the wrong shape included: a probe that raises would end the
            # heartbeat loop.
            state = BackendState(
                info=BackendInfo(
                    kind="openai",
                    url=self.url,
                    healthy=False,
                    error=f"{self.url}: {type(exc).__name__}: {exc}"[:300],
                )
            )
            self.last = state
            return state
        if with_props is not None:
            self.context_length, self.slots = context, slots
        self.ids = ids
        available = tuple(
            AvailableModel(name=name, capabilities=("completion",)) for name in self.ids
        )
        # An OpenAI-compatible server keeps what it serves loaded.
        loaded = tuple(
            LoadedModel(name=name, context_length=self.context_length) for name in self.ids
        )
        state = BackendState(
            info=BackendInfo(kind="openai", url=self.url, version="openai", healthy=True),
            loaded=loaded,
            available=available,
            slots=self.slots,
        )
        self.last = state
        return state

    async def _get(self, path: str) -> tuple[int, bytes]:
        return await fetch(
            self.client,
            "GET",
            self.url + path,
            limit=PROBE_LIMIT,
            what=f"a {path} answer",
            timeout=PROBE_TIMEOUT,
        )

    def upstream_id(self, model: str) -> str:
        return self.ids.get(normalize_model_name(model), model)


def options_to_openai(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    options = body.get("options") if isinstance(body.get("options"), dict) else {}
    assert isinstance(options, dict)
    for source, target in OPTION_MAP.items():
        if source in options:
            out[target] = options[source]
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": fmt},
        }
    return out


def think_to_openai(think: Any) -> dict[str, Any]:
    """Ollama's ``think`` as the request fields llama-server and vLLM document: a switch for
    the chat template (``enable_thinking``), and ``reasoning_effort`` for a level. Raises
    :class:`BadRequest` for anything else."""
    if think is None:
        return {}
    if isinstance(think, bool):
        return {"chat_template_kwargs": {"enable_thinking": think}}
    if think in THINK_LEVELS:
        return {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": think}
    raise BadRequest(
        f"field 'think' must be true, false, 'low', 'medium' or 'high', got {think!r}",
        param="think",
    )


def _arguments_text(arguments: Any) -> str:
    """Ollama's tool call arguments (an object) as OpenAI's JSON string."""
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments if arguments is not None else {})


def messages_to_openai(messages: Any) -> list[dict[str, Any]]:
    """Ollama's ``messages`` as OpenAI's. Raises :class:`BadRequest` for a malformed one."""
    if not isinstance(messages, list):
        raise BadRequest("field 'messages' must be a list", param="messages")
    out = []
    unanswered: list[tuple[str, str]] = []  # (id, name) of the last assistant's calls
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{index}] must be an object", param="messages")
        role = message.get("role", "user")
        converted: dict[str, Any] = {"role": role}
        text = message.get("content")
        text = text if isinstance(text, str) else ""
        images = message.get("images") or []
        if images:
            converted["content"] = [{"type": "text", "text": text}] + [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}
                for image in images
            ]
        else:
            converted["content"] = text
        calls = message.get("tool_calls")
        if calls:
            if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise BadRequest(
                    f"messages[{index}].tool_calls must be a list of objects", param="messages"
                )
            converted["tool_calls"] = []
            unanswered = []
            for n, call in enumerate(calls):
                function = call.get("function")
                function = function if isinstance(function, dict) else {}
                given = call.get("id")
                call_id = given if isinstance(given, str) and given else f"call_{index}_{n}"
                name = str(function.get("name", ""))
                converted["tool_calls"].append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": name,
                            "arguments": _arguments_text(function.get("arguments")),
                        },
                    }
                )
                unanswered.append((call_id, name))
        if role == "tool":
            name = message.get("tool_name") or message.get("name") or ""
            answered = next((c for c in unanswered if c[1] == name), None) or next(
                iter(unanswered), None
            )
            given = message.get("tool_call_id")
            if isinstance(given, str) and given:
                converted["tool_call_id"] = given
                answered = next((c for c in unanswered if c[0] == given), answered)
            elif answered is not None:
                converted["tool_call_id"] = answered[0]
            if answered is not None:
                unanswered.remove(answered)
        out.append(converted)
    return out


def openai_request(
    model_id: str, body: Mapping[str, Any], chat: bool
) -> tuple[str, dict[str, Any], bool]:
    """An Ollama /api/chat or /api/generate body → (path, OpenAI body, streamed?)."""
    stream = body.get("stream", True) is not False
    request: dict[str, Any] = {"model": model_id, "stream": stream, **options_to_openai(dict(body))}
    if chat:
        request["messages"] = messages_to_openai(body.get("messages") or [])
        if body.get("tools"):
            request["tools"] = body["tools"]
        request.update(think_to_openai(body.get("think")))
        path = "/v1/chat/completions"
    else:
        request["prompt"] = body.get("prompt", "")
        path = "/v1/completions"
    if stream:
        request["stream_options"] = {"include_usage": True}
    return path, request, stream


def _final(
    model: str, reason: str | None, usage: Any, started: float, chat: bool
) -> dict[str, Any]:
    usage = usage if isinstance(usage, dict) else {}
    out: dict[str, Any] = {
        "model": model,
        "created_at": _now(),
        "done": True,
        "done_reason": "length" if reason == "length" else "stop",
        "total_duration": int((time.monotonic() - started) * 1e9),
        "prompt_eval_count": int(usage.get("prompt_tokens") or 0),
        "eval_count": int(usage.get("completion_tokens") or 0),
    }
    if chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    return out


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"


def _thinking(message: Mapping[str, Any]) -> str:
    """A message's or delta's thinking, under either name (a server that sends both sends the
    same text twice: the first is taken)."""
    for field in THINKING_FIELDS:
        value = message.get(field)
        if isinstance(value, str) and value:
            return value
    return ""


def _arguments(text: str) -> Any:
    """OpenAI's JSON-string arguments as Ollama's object: ``{}`` for none; text that is not a
    JSON object is kept as it is (the router keeps it as ``_raw``), never dropped."""
    if not text.strip():
        return {}
    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    return parsed if isinstance(parsed, dict) else text


def _ollama_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    out: dict[str, Any] = {"function": {"name": name, "arguments": _arguments(arguments)}}
    if call_id:
        out["id"] = call_id
    return out


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    """A whole answer's ``message.tool_calls`` as Ollama's."""
    out = []
    for call in calls if isinstance(calls, list) else []:
        if not isinstance(call, dict):
            continue
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        arguments = function.get("arguments")
        out.append(
            _ollama_call(
                str(call.get("id") or ""),
                str(function.get("name") or ""),
                arguments if isinstance(arguments, str) else json.dumps(arguments or {}),
            )
        )
    return out


@attrs.define
class _Call:
    id: str = ""
    name: str = ""
    arguments: list[str] = attrs.field(factory=list)


@attrs.define
class StreamTranslator:
    """One answer's SSE lines (OpenAI's stream) → Ollama's NDJSON lines. Pure but for the
    timestamps. :meth:`line` takes each line (without its ``\\n``) and returns what goes out;
    once :attr:`finished` (``[DONE]``), nothing more is read; :meth:`end` returns the last
    lines. Both raise :class:`NodeBadStatus` for what must not pass as an answer: an error
    event, a line that is not JSON, tool calls over the limit, a stream that ended before it
    was done."""

    model: str
    chat: bool
    started: float
    reason: str | None = None
    usage: dict[str, Any] = attrs.field(factory=dict)
    finished: bool = False
    calls: dict[int, _Call] = attrs.field(factory=dict)
    calls_size: int = 0
    _event: bytes = b""  # the current SSE event's type (``event: error``)

    def line(self, raw: bytes) -> list[bytes]:
        line = raw.rstrip(b"\r")
        if not line:
            self._event = b""
            return []
        if line.startswith(b"event:"):
            self._event = line[6:].strip()
            return []
        if line.startswith(b"error:"):  # llama-server's in-band error
            raise self._failed(line[6:].strip())
        if not line.startswith(b"data:"):
            return []  # a comment (": ping"), an id, a retry
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.finished = True
            return []
        try:
            event = json.loads(payload)
        except ValueError as exc:
            raise NodeBadStatus(
                f"{SOURCE} sent a stream event that is not JSON: {payload[:100]!r}"
            ) from exc
        if not isinstance(event, dict):
            raise NodeBadStatus(f"{SOURCE} sent a stream event that is not an object")
        if self._event == b"error" or event.get("error") or event.get("object") == "error":
            raise self._failed(payload)
        return self.event(event)

    def _failed(self, payload: bytes) -> NodeBadStatus:
        return NodeBadStatus(f"{SOURCE} failed mid-stream: {error_text(payload)}")

    def event(self, event: Mapping[str, Any]) -> list[bytes]:
        out = []
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        choices = event.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict):
                continue
            self.reason = choice.get("finish_reason") or self.reason
            if self.chat:
                delta = choice.get("delta")
                delta = delta if isinstance(delta, dict) else {}
                self._add_calls(delta.get("tool_calls"))
                text = delta.get("content")
                text = text if isinstance(text, str) else ""
                thinking = _thinking(delta)
                if text or thinking:
                    message = {"role": "assistant", "content": text}
                    if thinking:
                        message["thinking"] = thinking
                    out.append(self._chunk({"message": message}))
            elif isinstance(choice.get("text"), str) and choice["text"]:
                out.append(self._chunk({"response": choice["text"]}))
        return out

    def _chunk(self, fields: dict[str, Any]) -> bytes:
        return _line({"model": self.model, "created_at": _now(), **fields, "done": False})

    def _add_calls(self, calls: Any) -> None:
        """Fragments of tool calls, by index: the id and name come once (a name sent again
        whole is not doubled), the arguments in pieces."""
        for call in calls if isinstance(calls, list) else []:
            if not isinstance(call, dict):
                raise NodeBadStatus(f"{SOURCE} sent a tool call that is not an object")
            index = call.get("index", 0)
            index = index if isinstance(index, int) else 0
            slot = self.calls.get(index)
            if slot is None:
                if len(self.calls) >= MAX_TOOL_CALLS:
                    raise NodeBadStatus(
                        f"{SOURCE} sent over {MAX_TOOL_CALLS} tool calls in one answer"
                    )
                slot = self.calls[index] = _Call()
                self.calls_size += CALL_OVERHEAD
            given = call.get("id")
            if isinstance(given, str) and given and not slot.id:
                slot.id = given
                self.calls_size += len(given)
            function = call.get("function")
            function = function if isinstance(function, dict) else {}
            name = function.get("name")
            if isinstance(name, str) and name and name != slot.name:
                slot.name += name
                self.calls_size += len(name)
            arguments = function.get("arguments")
            if isinstance(arguments, dict):  # whole, not a JSON string
                arguments = json.dumps(arguments)
            if isinstance(arguments, str) and arguments:
                slot.arguments.append(arguments)
                self.calls_size += len(arguments)
            if self.calls_size > LINE_LIMIT:
                raise over_limit(SOURCE, "tool calls", LINE_LIMIT)

    def end(self) -> list[bytes]:
        """The lines after the last event: the tool calls, if any, then Ollama's ``done``."""
        if not self.finished and self.reason is None:
            raise NodeBadStatus(
                f"{SOURCE} ended the stream before it was done (no finish_reason, no [DONE])"
            )
        out = []
        if self.calls:
            calls = [
                _ollama_call(c.id, c.name, "".join(c.arguments))
                for _, c in sorted(self.calls.items())
            ]
            out.append(
                self._chunk({"message": {"role": "assistant", "content": "", "tool_calls": calls}})
            )
        out.append(_line(_final(self.model, self.reason, self.usage, self.started, self.chat)))
        return out


def whole_answer(raw: bytes, model: str, started: float, chat: bool) -> bytes:
    """A whole (not streamed) OpenAI answer as Ollama's one JSON object."""
    data = _json_object(raw, "answer")
    choices = data.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    choice = choice if isinstance(choice, dict) else {}
    final = _final(model, choice.get("finish_reason"), data.get("usage"), started, chat)
    if chat:
        message = choice.get("message")
        message = message if isinstance(message, dict) else {}
        content = message.get("content")
        final["message"] = {
            "role": "assistant",
            "content": content if isinstance(content, str) else "",
        }
        if thinking := _thinking(message):
            final["message"]["thinking"] = thinking
        if calls := _tool_calls(message.get("tool_calls")):
            final["message"]["tool_calls"] = calls
    else:
        text = choice.get("text")
        final["response"] = text if isinstance(text, str) else ""
    return _line(final)


async def chat_or_generate(
    backend: OpenAIBackend, body: dict[str, Any], chat: bool
) -> tuple[int, str, AsyncIterator[bytes]]:
    """Serve an Ollama /api/chat or /api/generate request. Returns (status, content type,
    body chunks).

    No deadline of our own: the router judges the first byte and leaves by closing the
    connection, which cancels this and closes the backend request. Raises a
    :class:`~herd.core.errors.NodeError` when the backend fails before the answer starts
    (a whole answer over its limit included); a stream that fails later ends with an Ollama
    error line."""
    model = body.get("model")
    if not isinstance(model, str):
        raise BadRequest("missing required field 'model'", param="model")
    path, request, stream = openai_request(backend.upstream_id(model), body, chat)
    started = time.monotonic()
    upstream = backend.client.build_request("POST", backend.url + path, json=request)
    try:
        response = await backend.client.send(upstream, stream=True)
    except httpx.HTTPError as exc:
        raise backend_error(exc) from exc
    close_when_done(response)
    if response.status_code >= 400 or not stream:
        # Read it here, so that a failure still has its own status.
        try:
            if response.status_code >= 400:
                detail = await error_detail(response)
            else:
                raw = await read_body(response, ANSWER_LIMIT, "an answer")
        except httpx.HTTPError as exc:
            raise backend_error(exc) from exc
        finally:
            await close_shielded(response)
        if response.status_code >= 400:
            return (
                response.status_code,
                "application/json",
                _one(_line({"error": f"backend answered {response.status_code}: {detail}"})),
            )
        return 200, "application/json", _one(whole_answer(raw, model, started, chat))

    async def streamed() -> AsyncIterator[bytes]:
        translator = StreamTranslator(model, chat, started)
        try:
            async with contextlib.aclosing(read_lines(response, LINE_LIMIT)) as lines:
                async for raw in lines:
                    for out in translator.line(raw):
                        yield out
                    if translator.finished:
                        break
            tail = translator.end()
        except httpx.HTTPError as exc:
            error = backend_error(exc, mid_stream=True)
            log.warning("%s: %s", response.request.url, error.message)
            yield error.render("ollama") + b"\n"
            return
        except HerdError as error:
            log.warning("%s: %s", response.request.url, error.message)
            yield error.render("ollama") + b"\n"
            return
        finally:
            await close_shielded(response)
        for out in tail:
            yield out

    return 200, "application/x-ndjson", streamed()


async def _one(chunk: bytes) -> AsyncIterator[bytes]:
    yield chunk


async def embed(backend: OpenAIBackend, body: dict[str, Any], legacy: bool) -> dict[str, Any]:
    """Serve Ollama's /api/embed (or the legacy /api/embeddings). Raises :class:`BadRequest`
    for the server's 4xx, :class:`NodeBadStatus` for its 5xx or an answer of the wrong shape
    or over :data:`EMBED_LIMIT`, a :class:`NodeError` when it can't be reached."""
    model = body.get("model")
    if not isinstance(model, str):
        raise BadRequest("missing required field 'model'", param="model")
    inputs = body.get("prompt") if legacy else body.get("input")
    try:
        status, raw = await fetch(
            backend.client,
            "POST",
            backend.url + "/v1/embeddings",
            limit=EMBED_LIMIT,
            what="embeddings",
            json={"model": backend.upstream_id(model), "input": inputs},
        )
    except httpx.HTTPError as exc:
        raise backend_error(exc) from exc
    if status >= 500:
        raise NodeBadStatus(f"backend answered {status}: {raw.decode()}", upstream_status=status)
    if status >= 400:
        raise BadRequest(f"backend answered {status}: {raw.decode()}")
    data = _json_object(raw, "embeddings answer")
    items = data.get("data")
    items = [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []
    if any(not isinstance(i.get("embedding"), list) for i in items):
        raise NodeBadStatus(f"{SOURCE} sent an embedding that is not a list of numbers")
    index = [i.get("index") if isinstance(i.get("index"), int) else 0 for i in items]
    vectors = [item["embedding"] for _, item in sorted(zip(index, items, strict=True), key=_first)]
    if legacy:
        return {"embedding": vectors[0] if vectors else []}
    usage = data.get("usage")
    return {
        "model": model,
        "embeddings": vectors,
        "prompt_eval_count": int(
            (usage if isinstance(usage, dict) else {}).get("prompt_tokens") or 0
        ),
    }


def _first(pair: tuple[int, Any]) -> int:
    return pair[0]


def tags(backend: OpenAIBackend) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": name,
                "model": name,
                "size": 0,
                "digest": "",
                "modified_at": _now(),
                "details": {"format": "gguf", "family": ""},
            }
            for name in backend.ids
        ]
    }


def ps(backend: OpenAIBackend) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": name,
                "model": name,
                "size": 0,
                "size_vram": 0,
                "context_length": backend.context_length,
                "expires_at": None,
            }
            for name in backend.ids
        ]
    }
