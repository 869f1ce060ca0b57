"""OpenAI ⇄ Ollama translation. Pure: no I/O, no clock; ids and timestamps are passed in.

The router always speaks Ollama's native API to backends. OpenAI requests are translated here
field by field (nothing a backend can use is dropped), and Ollama's answers are translated back:
whole responses as one object, streams chunk by chunk into SSE events that the OpenAI SDK
parses (a first role chunk, content deltas, tool-call deltas, a final chunk with the real
``finish_reason``, an optional usage chunk, then ``data: [DONE]``).

Raises :class:`herd.core.errors.BadRequest` naming the field for anything a client got wrong.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Mapping
from typing import Any

from herd.core.api import chat
from herd.core.api.templates import Template, hole
from herd.core.errors import BadRequest, require_str

_DUMP = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

# OpenAI sampling fields that map one to one onto Ollama options.
_OPTION_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


def _options(body: Mapping[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    extra = body.get("options")
    if isinstance(extra, dict):
        options.update(extra)
    for source, target in _OPTION_FIELDS.items():
        value = body.get(source)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise BadRequest(f"field '{source}' must be a number, got {value!r}", param=source)
            options[target] = value
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise BadRequest(
                f"field 'max_tokens' must be a non-negative integer, got {limit!r}",
                param="max_tokens",
            )
        options["num_predict"] = limit
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            options["stop"] = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            options["stop"] = stop
        else:
            raise BadRequest("field 'stop' must be a string or a list of strings", param="stop")
    return options


def _format(body: Mapping[str, Any]) -> str | dict[str, Any] | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise BadRequest("field 'response_format' must be an object", param="response_format")
    kind = fmt.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        schema = fmt.get("json_schema", {})
        if not isinstance(schema, dict) or not isinstance(schema.get("schema"), dict):
            raise BadRequest(
                "response_format.json_schema.schema must be an object", param="response_format"
            )
        return dict(schema["schema"])
    if kind not in (None, "text"):
        raise BadRequest(f"unsupported response_format type {kind!r}", param="response_format")
    return None


def _think(body: Mapping[str, Any]) -> bool | str | None:
    """``think`` (Ollama's own field, passed as is) or ``reasoning_effort`` (OpenAI's)."""
    if "think" in body:
        think = body["think"]
        if think is None or isinstance(think, bool) or think in chat.THINK_LEVELS:
            return think  # type: ignore[no-any-return]
        raise BadRequest(
            f"field 'think' must be true, false, low, medium or high, got {think!r}", param="think"
        )
    return chat.effort_to_think(body.get("reasoning_effort"), "reasoning_effort")


def _common(body: Mapping[str, Any], upstream: dict[str, Any]) -> dict[str, Any]:
    options = _options(body)
    if options:
        upstream["options"] = options
    if "keep_alive" in body:
        upstream["keep_alive"] = body["keep_alive"]
    think = _think(body)
    if think is not None:
        upstream["think"] = think
    fmt = _format(body)
    if fmt is not None:
        upstream["format"] = fmt
    return upstream


def _content(content: Any, index: int) -> tuple[str, list[str]]:
    """OpenAI message content (string or parts) → (text, base64 images)."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise BadRequest(
            f"messages[{index}].content must be a string or a list of parts", param="messages"
        )
    texts: list[str] = []
    images: list[str] = []
    for part in content:
        if not isinstance(part, dict):
            raise BadRequest(f"messages[{index}].content parts must be objects", param="messages")
        kind = part.get("type")
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            try:
                images.append(chat.data_url_image(url, f"messages[{index}]"))
            except BadRequest as exc:
                raise BadRequest(exc.message, param="messages") from exc
        else:
            raise BadRequest(
                f"messages[{index}]: unsupported content part type {kind!r}", param="messages"
            )
    return "\n".join(texts), images


def _tool_calls(calls: Any, index: int) -> tuple[chat.ToolCall, ...]:
    if not isinstance(calls, list):
        raise BadRequest(f"messages[{index}].tool_calls must be a list", param="messages")
    out = []
    for position, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(
                f"messages[{index}].tool_calls entries need function.name", param="messages"
            )
        name = function["name"]
        try:
            arguments = chat.parse_arguments(
                function.get("arguments", "{}"), f"messages[{index}].tool_calls: {name!r}"
            )
        except BadRequest as exc:
            raise BadRequest(exc.message, param="messages") from exc
        call_id = call.get("id")
        out.append(
            chat.ToolCall(
                call_id if isinstance(call_id, str) else f"call_{index}_{position}",
                name,
                arguments,
            )
        )
    return tuple(out)


def _messages(body: Mapping[str, Any]) -> tuple[chat.Message, ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("field 'messages' must be a non-empty list", param="messages")
    call_names: dict[str, str] = {}
    out: list[chat.Message] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{index}] must be an object with a 'role'", param="messages")
        role = message["role"]
        if role == "developer":
            role = "system"
        text, images = _content(message.get("content"), index)
        calls = _tool_calls(message["tool_calls"], index) if message.get("tool_calls") else ()
        for call in calls:
            call_names[call.id] = call.name
        reasoning = message.get("reasoning")
        out.append(
            chat.Message(
                role=role,
                content=text,
                images=tuple(images),
                thinking=reasoning if isinstance(reasoning, str) else "",
                tool_calls=calls,
                tool_name=call_names.get(str(message.get("tool_call_id")), "")
                if role == "tool"
                else "",
            )
        )
    return tuple(out)


def _tools(body: Mapping[str, Any]) -> tuple[chat.Tool, ...]:
    tools = body.get("tools")
    if tools is None or body.get("tool_choice") == "none":
        return ()
    if not isinstance(tools, list):
        raise BadRequest("field 'tools' must be a list", param="tools")
    out = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(f"tools[{index}] needs function.name", param="tools")
        parameters = function.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise BadRequest(f"tools[{index}].function.parameters must be an object", param="tools")
        out.append(chat.Tool(function["name"], str(function.get("description") or ""), parameters))
    return tuple(out)


def chat_request_to_ollama(body: Mapping[str, Any]) -> dict[str, Any]:
    """``/v1/chat/completions`` body → ``/api/chat`` body, through :class:`chat.ChatTurn`."""
    require_str(body, "model")
    turn = chat.ChatTurn(
        messages=_messages(body),
        tools=_tools(body),
        options=_options(body),
        think=_think(body),
        format=_format(body),
        extra={"keep_alive": body["keep_alive"]} if "keep_alive" in body else {},
    )
    return turn.to_ollama()


def completion_request_to_ollama(body: Mapping[str, Any]) -> dict[str, Any]:
    """``/v1/completions`` body → ``/api/generate`` body."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest(
            "field 'prompt' must be a string (or a list of one string)", param="prompt"
        )
    upstream: dict[str, Any] = {"model": require_str(body, "model"), "prompt": prompt}
    suffix = body.get("suffix")
    if isinstance(suffix, str):
        upstream["suffix"] = suffix
    return _common(body, upstream)


def embeddings_request_to_ollama(body: Mapping[str, Any]) -> dict[str, Any]:
    """``/v1/embeddings`` body → ``/api/embed`` body."""
    value = body.get("input")
    if isinstance(value, str):
        inputs: str | list[str] = value
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        inputs = value
    elif isinstance(value, list) and value:
        raise BadRequest(
            "field 'input' must be text; token id arrays are not supported", param="input"
        )
    else:
        raise BadRequest(
            "field 'input' must be a string or a non-empty list of strings", param="input"
        )
    upstream: dict[str, Any] = {"model": require_str(body, "model"), "input": inputs}
    embedding_format(body)  # refused here, before routing, if it is not one we can give
    dimensions = body.get("dimensions")
    if dimensions is not None:
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions <= 0:
            raise BadRequest("field 'dimensions' must be a positive integer", param="dimensions")
        upstream["dimensions"] = dimensions
    if "keep_alive" in body:
        upstream["keep_alive"] = body["keep_alive"]
    return upstream


# --- responses ----------------------------------------------------------------------------


def _finish_reason(resp: Mapping[str, Any], tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if resp.get("done_reason") == "length" else "stop"


def _openai_call(call: chat.ToolCall) -> dict[str, Any]:
    arguments = call.arguments.get("_raw") if set(call.arguments) == {"_raw"} else None
    return {
        "id": call.id,
        "type": "function",
        "function": {
            "name": call.name,
            "arguments": arguments if isinstance(arguments, str) else _DUMP(dict(call.arguments)),
        },
    }


def _usage_of(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _usage(resp: Mapping[str, Any]) -> dict[str, int]:
    return _usage_of(int(resp.get("prompt_eval_count") or 0), int(resp.get("eval_count") or 0))


def _finish(reason: str) -> str:
    if reason == "tool_calls":
        return "tool_calls"
    return "length" if reason == "length" else "stop"


def chat_response_to_openai(
    resp: Mapping[str, Any], *, request_id: str, created: int, model: str
) -> dict[str, Any]:
    result = chat.ChatResult.from_ollama(resp, request_id)
    out_message: dict[str, Any] = {"role": "assistant", "content": result.text}
    if result.thinking:
        out_message["reasoning"] = result.thinking  # as Ollama's own /v1 names it
    if result.tool_calls:
        out_message["tool_calls"] = [_openai_call(c) for c in result.tool_calls]
        out_message["content"] = result.text or None
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": out_message,
                "finish_reason": _finish(result.reason),
                "logprobs": None,
            }
        ],
        "usage": _usage_of(result.prompt_tokens, result.completion_tokens),
    }


def completion_response_to_openai(
    resp: Mapping[str, Any], *, request_id: str, created: int, model: str
) -> dict[str, Any]:
    return {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": resp.get("response", ""),
                "finish_reason": _finish(str(resp.get("done_reason") or "stop")),
                "logprobs": None,
            }
        ],
        "usage": _usage(resp),
    }


EMBEDDING_FORMATS = ("float", "base64")


def embedding_format(body: Mapping[str, Any]) -> str:
    """``encoding_format`` of a ``/v1/embeddings`` body: ``float`` (the default) or ``base64``
    (the vector's little-endian float32 bytes, what the Node.js SDK asks for by default).
    Raises BadRequest for anything else."""
    value = body.get("encoding_format")
    if value is None:
        return "float"
    if value not in EMBEDDING_FORMATS:
        raise BadRequest(
            f"field 'encoding_format' must be 'float' or 'base64', got {json.dumps(value)[:40]}",
            param="encoding_format",
        )
    return str(value)


def _base64_vector(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def embed_response_to_openai(
    resp: Mapping[str, Any],
    *,
    model: str,
    encoding_format: str = "float",
    dimensions: int | None = None,
) -> dict[str, Any]:
    """``/api/embed`` answer → ``/v1/embeddings`` answer. Raises BadRequest when the model
    answered with another number of ``dimensions`` than asked (it can't shorten its vectors)."""
    vectors = resp.get("embeddings") or []
    if not isinstance(vectors, list) or not all(
        isinstance(v, list) and all(isinstance(x, int | float) for x in v) for v in vectors
    ):
        raise ValueError("the backend's embeddings are not lists of numbers")
    if dimensions is not None:
        for vector in vectors:
            if len(vector) != dimensions:
                raise BadRequest(
                    f"model {model} answered with {len(vector)} dimensions, not the "
                    f"{dimensions} asked for: it (or its backend) can't shorten its vectors",
                    param="dimensions",
                )
    prompt = int(resp.get("prompt_eval_count") or 0)
    encode = _base64_vector if encoding_format == "base64" else None
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(v) if encode else v}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }


def _event(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + _DUMP(payload).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def stream_error(message: str) -> bytes:
    """The end of an SSE stream that failed: an error event, then ``[DONE]``."""
    payload = {
        "error": {
            "message": message,
            "type": "server_error",
            "param": None,
            "code": "stream_interrupted",
        }
    }
    return _event(payload) + DONE


class _StreamTranslator:
    object_name = ""
    id_prefix = ""

    def __init__(self, *, request_id: str, created: int, model: str, include_usage: bool) -> None:
        self.id = f"{self.id_prefix}{request_id}"
        self.request_id = request_id
        self.created = created
        self.model = model
        self.include_usage = include_usage
        self.finished = False
        self.stopped = False  # OpenAI streams end only with the backend's
        self.outcome: Any = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._started = False

    def _chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": [choice] if choice is not None else [],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _usage_event(self) -> bytes:
        chunk = self._chunk(None)
        chunk["usage"] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        return _event(chunk)

    def _final(self, chunk: Mapping[str, Any]) -> None:
        self.finished = True
        self.prompt_tokens = int(chunk.get("prompt_eval_count") or 0)
        self.completion_tokens = int(chunk.get("eval_count") or 0)

    def done(self) -> bytes:
        return DONE

    def error(self, message: str) -> bytes:
        return stream_error(message)


class ChatStreamTranslator(_StreamTranslator):
    """Ollama ``/api/chat`` NDJSON chunks → OpenAI ``chat.completion.chunk`` SSE events, through
    :class:`chat.ChatReader`. Thinking goes out as ``delta.reasoning``, as Ollama's /v1 does."""

    object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, *, request_id: str, created: int, model: str, include_usage: bool) -> None:
        super().__init__(
            request_id=request_id, created=created, model=model, include_usage=include_usage
        )
        self._reader = chat.ChatReader(request_id)
        self._texts: dict[str, Template] = {}  # a text delta's event, per delta field

    def _delta(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _event(
            self._chunk({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None})
        )

    def _text(self, field: str, text: str) -> bytes:
        """``_delta({field: text})``, from a template made on first use."""
        template = self._texts.get(field)
        if template is None:
            choice = {
                "index": 0,
                "delta": {field: hole(0)},
                "finish_reason": None,
                "logprobs": None,
            }
            template = self._texts[field] = Template.of(
                self._chunk(choice), _DUMP, 1, head=b"data: ", tail=b"\n\n"
            )
        return template.render(text)

    def feed(self, chunk: Mapping[str, Any]) -> bytes:
        out = b""
        if not self._started:
            self._started = True
            out += self._delta({"role": "assistant", "content": ""})
        for event in self._reader.feed(chunk):
            if isinstance(event, chat.TextDelta):
                out += self._text("content", event.text)
            elif isinstance(event, chat.ThinkingDelta):
                out += self._text("reasoning", event.text)
            elif isinstance(event, chat.ToolCallDelta):
                out += self._delta(
                    {"tool_calls": [{"index": event.index, **_openai_call(event.call)}]}
                )
            else:
                self.finished = True
                self.prompt_tokens = event.prompt_tokens
                self.completion_tokens = event.completion_tokens
                out += self._delta({}, _finish(event.reason))
                if self.include_usage:
                    out += self._usage_event()
        return out


class CompletionStreamTranslator(_StreamTranslator):
    """Ollama ``/api/generate`` NDJSON chunks → OpenAI ``text_completion`` SSE events."""

    object_name = "text_completion"
    id_prefix = "cmpl-"

    def _text(self, text: str, finish: str | None = None) -> bytes:
        return _event(
            self._chunk({"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        )

    def feed(self, chunk: Mapping[str, Any]) -> bytes:
        self._started = True
        out = b""
        text = chunk.get("response")
        if text:
            out += self._text(text)
        if chunk.get("done") is True:
            self._final(chunk)
            out += self._text("", _finish(str(chunk.get("done_reason") or "stop")))
            if self.include_usage:
                out += self._usage_event()
        return out


def ollama_tags_to_openai_models(models: list[dict[str, Any]], *, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": m.get("name", ""), "object": "model", "created": created, "owned_by": "herd"}
            for m in models
        ],
    }


def _text_size(value: Any, depth: int = 0) -> int:
    if depth > 6:
        return 0
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_size(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return sum(_text_size(value.get(k), depth + 1) for k in ("content", "text"))
    return 0


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """A cheap prompt-size estimate (about four characters a token) for the scorer."""
    chars = 0
    for field in ("messages", "prompt", "input", "system", "suffix"):
        chars += _text_size(body.get(field))
    return chars // 4
