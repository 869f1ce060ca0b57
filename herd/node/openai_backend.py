"""Any OpenAI-compatible server as a node's backend (``--backend openai``): llama.cpp's
``llama-server``, vLLM, LM Studio.

The router speaks Ollama's native API to every backend. For an OpenAI-compatible one, the node
puts an Ollama face on it, served on the node's own port under ``/backend`` (always advertised):
``/api/chat`` → ``/v1/chat/completions``, ``/api/generate`` → ``/v1/completions``,
``/api/embed`` and ``/api/embeddings`` → ``/v1/embeddings``, and ``/api/tags``, ``/api/ps``,
``/api/show``, ``/api/version`` answered from what the server reports (``/v1/models``; and
``/props`` where it exists, as on llama-server, for the context size and parallel slots).
Streams are translated chunk by chunk (SSE in, NDJSON out) with real token counts. A backend
that fails before answering is answered with herd's JSON errors (:mod:`herd.node.upstream`);
a stream it breaks ends with an Ollama error line.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import httpx
import trio

from herd.core.errors import BadRequest, NodeBadStatus
from herd.core.models import AvailableModel, BackendInfo, LoadedModel, normalize_model_name
from herd.node.backend import BackendState
from herd.node.upstream import backend_error, close_shielded, close_when_done

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


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


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
                models = await self.client.get(self.url + "/v1/models", timeout=PROBE_TIMEOUT)
                models.raise_for_status()
                data = models.json().get("data", [])
                ids = {normalize_model_name(m["id"]): m["id"] for m in data if "id" in m}
                props = await self.client.get(self.url + "/props", timeout=PROBE_TIMEOUT)
                with_props = props.json() if props.status_code == 200 else None
                if with_props is not None:
                    settings = with_props.get("default_generation_settings", {})
                    context = int(settings.get("n_ctx") or with_props.get("n_ctx") or 0)
                    slots = int(with_props.get("total_slots") or 0)
        except (
            httpx.HTTPError,
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


def messages_to_openai(messages: list[Any]) -> list[dict[str, Any]]:
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{index}] must be an object", param="messages")
        converted: dict[str, Any] = {"role": message.get("role", "user")}
        images = message.get("images") or []
        if images:
            converted["content"] = [{"type": "text", "text": message.get("content", "")}] + [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}
                for image in images
            ]
        else:
            converted["content"] = message.get("content", "")
        calls = message.get("tool_calls")
        if calls:
            converted["tool_calls"] = [
                {
                    "id": f"call_{index}_{n}",
                    "type": "function",
                    "function": {
                        "name": c.get("function", {}).get("name", ""),
                        "arguments": json.dumps(c.get("function", {}).get("arguments", {})),
                    },
                }
                for n, c in enumerate(calls)
            ]
        out.append(converted)
    return out


def _final(
    model: str, reason: str | None, usage: dict[str, Any], started: float, chat: bool
) -> dict[str, Any]:
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


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            event = json.loads(payload)
        except ValueError:
            continue
        if isinstance(event, dict):
            yield event


async def chat_or_generate(
    backend: OpenAIBackend, body: dict[str, Any], chat: bool
) -> tuple[int, str, AsyncIterator[bytes]]:
    """Serve an Ollama /api/chat or /api/generate request. Returns (status, content type,
    body chunks).

    No deadline of our own: the router judges the first byte and leaves by closing the
    connection, which cancels this and closes the backend request. Raises a
    :class:`~herd.core.errors.NodeError` when the backend fails before the answer starts; a stream
    it breaks later ends with an Ollama error line."""
    model = body.get("model")
    if not isinstance(model, str):
        raise BadRequest("missing required field 'model'", param="model")
    stream = body.get("stream", True) is not False
    request: dict[str, Any] = {
        "model": backend.upstream_id(model),
        "stream": stream,
        **options_to_openai(body),
    }
    if chat:
        request["messages"] = messages_to_openai(body.get("messages") or [])
        if body.get("tools"):
            request["tools"] = body["tools"]
        path = "/v1/chat/completions"
    else:
        request["prompt"] = body.get("prompt", "")
        path = "/v1/completions"
    if stream:
        request["stream_options"] = {"include_usage": True}
    started = time.monotonic()
    upstream = backend.client.build_request("POST", backend.url + path, json=request)
    try:
        response = await backend.client.send(upstream, stream=True)
    except httpx.HTTPError as exc:
        raise backend_error(exc) from exc
    close_when_done(response)
    if response.status_code >= 400 or not stream:
        # Read it all here, so that a failure still has its own status.
        try:
            raw = await response.aread()
        except httpx.HTTPError as exc:
            raise backend_error(exc) from exc
        finally:
            await close_shielded(response)
        if response.status_code >= 400:
            text = raw.decode("utf-8", "replace")[:300]
            return (
                response.status_code,
                "application/json",
                _one(_line({"error": f"backend answered {response.status_code}: {text}"})),
            )
        return 200, "application/json", _one(_whole(raw, model, started, chat))

    async def streamed() -> AsyncIterator[bytes]:
        reason: str | None = None
        usage: dict[str, Any] = {}
        calls: dict[int, dict[str, Any]] = {}
        try:
            async for event in sse_events(response):
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    reason = choice.get("finish_reason") or reason
                    if chat:
                        delta = choice.get("delta") or {}
                        for call in delta.get("tool_calls") or []:
                            slot = calls.setdefault(
                                call.get("index", 0), {"name": "", "arguments": ""}
                            )
                            function = call.get("function") or {}
                            slot["name"] += function.get("name") or ""
                            slot["arguments"] += function.get("arguments") or ""
                        text = delta.get("content")
                        piece = {"role": "assistant", "content": text} if text else None
                        if piece:
                            yield _line(
                                {
                                    "model": model,
                                    "created_at": _now(),
                                    "message": piece,
                                    "done": False,
                                }
                            )
                    elif choice.get("text"):
                        yield _line(
                            {
                                "model": model,
                                "created_at": _now(),
                                "response": choice["text"],
                                "done": False,
                            }
                        )
        except httpx.HTTPError as exc:
            error = backend_error(exc, mid_stream=True)
            log.warning("%s: %s", response.request.url, error.message)
            yield error.render("ollama") + b"\n"
            return
        finally:
            await close_shielded(response)
        final = _final(model, reason, usage, started, chat)
        if calls:
            final["message"]["tool_calls"] = [
                {"function": {"name": c["name"], "arguments": _json_or_empty(c["arguments"])}}
                for _, c in sorted(calls.items())
            ]
        yield _line(final)

    return 200, "application/x-ndjson", streamed()


def _whole(raw: bytes, model: str, started: float, chat: bool) -> bytes:
    """A whole (not streamed) OpenAI answer as Ollama's one JSON object."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise NodeBadStatus(f"backend answer is not JSON: {raw[:200]!r}") from exc
    if not isinstance(data, dict):
        raise NodeBadStatus(f"backend answer is not a JSON object: {raw[:200]!r}")
    choice = (data.get("choices") or [{}])[0]
    final = _final(model, choice.get("finish_reason"), data.get("usage") or {}, started, chat)
    if chat:
        message = choice.get("message") or {}
        final["message"] = {"role": "assistant", "content": message.get("content") or ""}
        calls = _tool_calls(message.get("tool_calls"))
        if calls:
            final["message"]["tool_calls"] = calls
    else:
        final["response"] = choice.get("text", "")
    return _line(final)


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    out = []
    for call in calls or []:
        function = call.get("function") or {}
        out.append(
            {
                "function": {
                    "name": function.get("name", ""),
                    "arguments": _json_or_empty(function.get("arguments")),
                }
            }
        )
    return out


def _json_or_empty(text: Any) -> Any:
    if not isinstance(text, str):
        return text or {}
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        return {}


async def _one(chunk: bytes) -> AsyncIterator[bytes]:
    yield chunk


async def embed(backend: OpenAIBackend, body: dict[str, Any], legacy: bool) -> dict[str, Any]:
    model = body.get("model")
    if not isinstance(model, str):
        raise BadRequest("missing required field 'model'", param="model")
    inputs = body.get("prompt") if legacy else body.get("input")
    try:
        response = await backend.client.post(
            backend.url + "/v1/embeddings",
            json={"model": backend.upstream_id(model), "input": inputs},
        )
    except httpx.HTTPError as exc:
        raise backend_error(exc) from exc
    if response.status_code >= 500:
        raise NodeBadStatus(
            f"backend answered {response.status_code}: {response.text[:200]}",
            upstream_status=response.status_code,
        )
    if response.status_code >= 400:
        raise BadRequest(f"backend answered {response.status_code}: {response.text[:200]}")
    try:
        data = response.json()
    except ValueError as exc:
        raise NodeBadStatus(f"backend answer is not JSON: {response.text[:200]!r}") from exc
    vectors = [
        item["embedding"] for item in sorted(data.get("data", []), key=lambda d: d.get("index", 0))
    ]
    if legacy:
        return {"embedding": vectors[0] if vectors else []}
    return {
        "model": model,
        "embeddings": vectors,
        "prompt_eval_count": int((data.get("usage") or {}).get("prompt_tokens") or 0),
    }


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
