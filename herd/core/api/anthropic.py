"""Anthropic Messages ⇄ Ollama translation (``POST /v1/messages``). Pure: no I/O, no clock.

A Messages body becomes a :class:`chat.ChatTurn` (and from there Ollama's ``/api/chat`` body);
Ollama's answer, read by :class:`chat.ChatReader`, becomes one Message object or Anthropic's
SSE events. Ids are made from the router's request id (``msg_<request id>``); nothing here
reads a clock. Raises :class:`herd.core.errors.BadRequest` naming the field for anything a client
got wrong.

Requests, where Anthropic's API and Ollama's differ:

- ``max_tokens`` (required) is ``options.num_predict``; ``temperature``, ``top_p`` and
  ``top_k`` are the options of the same names. ``metadata`` and unknown top-level fields are
  ignored; ``keep_alive`` (Ollama's own, as the OpenAI routes take it) is passed on.
- ``system`` (a string or text blocks) is the first message, role ``system``. ``cache_control``
  anywhere is ignored: Ollama keeps its own prompt cache.
- Content blocks: ``text`` is joined (one line apart) into the message's content; ``image``
  with a ``base64`` source is one of the message's ``images`` (a ``url`` or ``file`` source is
  refused: the router fetches nothing); ``tool_use`` in an assistant message is a tool call;
  ``tool_result`` in a user message is a message of its own, role ``tool``, named after the
  ``tool_use`` it answers (its text and images, ``Error: `` before the text when
  ``is_error``); ``thinking`` in an assistant message is the message's ``thinking`` and
  ``redacted_thinking`` is dropped (only Anthropic can read it). Every other block type
  (``document``, ``search_result``, server tool blocks, ...) is refused, naming the type.
- ``tools`` are custom tools (``name``, ``description``, ``input_schema``); Anthropic's own tool
  types (``bash_...``, ``web_search_...``) are refused. ``tool_choice``: ``auto`` and ``any``
  offer every tool, ``{"type": "tool", "name"}`` offers that tool alone, ``none`` offers none.
  Ollama can't *force* a call, so ``any`` and ``tool`` make one possible, not certain.
- ``thinking``: ``enabled`` is ``think: true`` (``budget_tokens`` is checked but Ollama has no
  budget); ``disabled``, and no ``thinking`` at all, is ``think: false`` (Anthropic's default is
  no thinking; Ollama's would be to think, for a model that can); ``adaptive`` leaves the
  model's default. Whatever thinking a model still does (gpt-oss can't stop) comes back as
  thinking blocks.
- ``output_config.format`` (``json_schema``) is Ollama's ``format``; ``effort`` is ignored.
- ``stop_sequences`` are *not* sent to Ollama, which strips a matched stop and doesn't say which
  one it was. herd watches the text itself (:class:`StopScanner`): it holds back only the end of
  the text that could still begin a sequence, and on a match stops there, with
  ``stop_reason: "stop_sequence"`` and ``stop_sequence`` set and the text cut before it. A stream
  then ends at once (the translator's ``stopped``: the relay closes the upstream, so the backend
  stops generating); a whole answer is read to its end (the relay folds it first) and cut by the
  same scanner. Tool calls after the match are dropped: the model would have stopped before
  them. At most :data:`MAX_STOP_SEQUENCES`, each at most :data:`MAX_STOP_LENGTH` characters.

Answers: thinking, then text, then tool uses, in the order the model made them (blocks are
indexed in that order in a stream). ``stop_reason`` is ``tool_use`` when the model called a
tool, ``max_tokens`` when Ollama says ``length``, ``stop_sequence`` on a match, else
``end_turn``. Usage is Ollama's own ``prompt_eval_count``/``eval_count`` (for a whole answer cut
at a stop sequence, every token the backend made, the cut ones too). A tool use's ``id`` is
Ollama's own, or one made from the request id (:func:`chat.tool_call`). A thinking block's
``signature`` is empty: there is nothing to sign (a thinking block sent back is taken as plain
thinking, its signature unread).

Streams: ``message_start`` can't know the prompt's real size (Ollama sends it with its last
chunk), so its ``usage.input_tokens`` is :func:`estimate_input_tokens`' estimate and the final
``message_delta`` carries the real ``input_tokens`` with ``output_tokens`` (the SDK takes the
later value). A stream cut at a stop sequence has no final chunk: its ``output_tokens`` are the
stream lines read (one token each, as the relay counts them) and the estimate stands. A
stream that breaks after its first event ends with an ``error`` event (``api_error``); the
SDK raises it.

``count_tokens`` is an estimate, not the model's tokenizer: see :func:`estimate_input_tokens`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from herd.core.api import chat
from herd.core.api.templates import Template, hole
from herd.core.errors import BadRequest, require_str

_DUMP = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

MAX_STOP_SEQUENCES = 64
MAX_STOP_LENGTH = 512
ROLES = ("user", "assistant")
# Sampling fields that are Ollama options of the same name: whether each must be an integer.
_OPTIONS = {"temperature": False, "top_p": False, "top_k": True}


@attrs.frozen
class Native:
    """What the translators need that the Ollama body doesn't say."""

    stop_sequences: tuple[str, ...] = ()
    input_tokens: int = 0  # the estimate, for message_start (see the module docstring)


# --- requests -----------------------------------------------------------------------------


def _where(index: int, block: int | None = None) -> str:
    return f"messages[{index}]" if block is None else f"messages[{index}].content[{block}]"


def _bad(message: str, param: str = "messages") -> BadRequest:
    return BadRequest(message, param=param)


def _max_tokens(body: Mapping[str, Any]) -> int:
    value = body.get("max_tokens")
    if value is None:
        raise _bad("missing required field 'max_tokens'", "max_tokens")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(f"field 'max_tokens' must be a positive integer, got {value!r}", "max_tokens")
    return value


def _options(body: Mapping[str, Any], max_tokens: int | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for field, integer in _OPTIONS.items():
        value = body.get(field)
        if value is None:
            continue
        if integer:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _bad(f"field '{field}' must be a non-negative integer, got {value!r}", field)
        elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise _bad(f"field '{field}' must be a non-negative number, got {value!r}", field)
        options[field] = value
    if max_tokens is not None:
        options["num_predict"] = max_tokens
    return options


def _text_blocks(value: Any, field: str) -> str:
    """A string, or a list of text blocks (``system``), as one text."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(f"field '{field}' must be a string or a list of text blocks", field)
    texts = []
    for index, block in enumerate(value):
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else block
            raise _bad(f"{field}[{index}] must be a text block, got {kind!r}", field)
        text = block.get("text")
        if not isinstance(text, str):
            raise _bad(f"{field}[{index}].text must be a string", field)
        texts.append(text)
    return "\n".join(texts)


def _image(block: Mapping[str, Any], where: str) -> str:
    source = block.get("source")
    if not isinstance(source, dict):
        raise _bad(f"{where}: an image block needs a 'source' object")
    kind = source.get("type")
    if kind != "base64":
        raise _bad(
            f"{where}: image source type {kind!r} is not supported; send the image as "
            "base64 (the router fetches no URLs and has no file store)"
        )
    data = source.get("data")
    if not isinstance(data, str) or not data:
        raise _bad(f"{where}: a base64 image source needs its 'data'")
    if not isinstance(source.get("media_type"), str):
        raise _bad(f"{where}: a base64 image source needs its 'media_type'")
    return data


def _text(block: Mapping[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise _bad(f"{where}: a text block needs a string 'text'")
    return text


def _tool_result(
    block: Mapping[str, Any], where: str, call_names: Mapping[str, str]
) -> chat.Message:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise _bad(f"{where}: a tool_result block needs its 'tool_use_id'")
    if call_id not in call_names:
        raise _bad(f"{where}: tool_result for {call_id!r}, which no earlier tool_use block has")
    content = block.get("content")
    texts: list[str] = []
    images: list[str] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for position, part in enumerate(content):
            inner = f"{where}.content[{position}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(_text(part, inner))
            elif kind == "image":
                images.append(_image(part, inner))
            else:
                raise _bad(f"{inner}: a tool_result may hold text and image blocks, not {kind!r}")
    elif content is not None:
        raise _bad(f"{where}: a tool_result's 'content' must be a string or a list of blocks")
    is_error = block.get("is_error", False)
    if not isinstance(is_error, bool):
        raise _bad(f"{where}: 'is_error' must be true or false")
    text = "\n".join(texts)
    return chat.Message(
        role="tool",
        content=f"Error: {text}" if is_error else text,
        images=tuple(images),
        tool_name=call_names[call_id],
    )


def _tool_use(block: Mapping[str, Any], where: str) -> chat.ToolCall:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not call_id:
        raise _bad(f"{where}: a tool_use block needs its 'id'")
    if not isinstance(name, str) or not name:
        raise _bad(f"{where}: a tool_use block needs its 'name'")
    if not isinstance(arguments, dict):
        raise _bad(f"{where}: a tool_use block's 'input' must be an object")
    return chat.ToolCall(call_id, name, arguments)


def _message(message: Any, index: int, call_names: dict[str, str], out: list[chat.Message]) -> None:
    """One Messages turn onto ``out``: one Ollama message, or (tool results) several."""
    where = _where(index)
    if not isinstance(message, dict):
        raise _bad(f"{where} must be an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise _bad(f"{where}.role must be 'user' or 'assistant', got {role!r}")
    content = message.get("content")
    if isinstance(content, str):
        out.append(chat.Message(role=role, content=content))
        return
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or a list of content blocks")
    texts: list[str] = []
    images: list[str] = []
    thinking: list[str] = []
    calls: list[chat.ToolCall] = []

    def flush() -> None:
        if texts or images:
            out.append(chat.Message(role=role, content="\n".join(texts), images=tuple(images)))
            texts.clear()
            images.clear()

    for position, block in enumerate(content):
        at = _where(index, position)
        kind = block.get("type") if isinstance(block, dict) else None
        if not isinstance(block, dict) or not isinstance(kind, str):
            raise _bad(f"{at} must be a content block object with a 'type'")
        if kind == "text":
            texts.append(_text(block, at))
        elif kind == "image" and role == "user":
            images.append(_image(block, at))
        elif kind == "tool_result" and role == "user":
            flush()  # what came before the result stays before it
            out.append(_tool_result(block, at, call_names))
        elif kind == "tool_use" and role == "assistant":
            call = _tool_use(block, at)
            call_names[call.id] = call.name
            calls.append(call)
        elif kind == "thinking" and role == "assistant":
            text = block.get("thinking")
            if not isinstance(text, str):
                raise _bad(f"{at}: a thinking block needs a string 'thinking'")
            thinking.append(text)
        elif kind == "redacted_thinking" and role == "assistant":
            continue  # encrypted for Anthropic's models; nothing a backend can read
        elif kind in ("image", "tool_result", "tool_use", "thinking", "redacted_thinking"):
            raise _bad(f"{at}: {kind} blocks can't be in {role} messages")
        else:
            raise _bad(f"{at}: content block type {kind!r} is not supported")
    if role == "assistant":
        out.append(
            chat.Message(
                role=role,
                content="\n".join(texts),
                thinking="".join(thinking),
                tool_calls=tuple(calls),
            )
        )
    else:
        flush()
        if not content:
            out.append(chat.Message(role=role))


def _messages(body: Mapping[str, Any]) -> tuple[chat.Message, ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("field 'messages' must be a non-empty list")
    out: list[chat.Message] = []
    if body.get("system") is not None:
        system = _text_blocks(body["system"], "system")
        if system:
            out.append(chat.Message(role="system", content=system))
    call_names: dict[str, str] = {}
    for index, message in enumerate(messages):
        _message(message, index, call_names, out)
    return tuple(out)


def _tool(tool: Any, index: int) -> chat.Tool:
    where = f"tools[{index}]"
    if not isinstance(tool, dict):
        raise _bad(f"{where} must be an object", "tools")
    kind = tool.get("type")
    if kind not in (None, "custom"):
        raise _bad(
            f"{where}: tool type {kind!r} is one of Anthropic's own tools; only custom tools "
            "(name, description, input_schema) can be offered to these models",
            "tools",
        )
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(f"{where} needs a 'name'", "tools")
    schema = tool.get("input_schema")
    if not isinstance(schema, dict):
        raise _bad(f"{where}.input_schema must be a JSON schema object", "tools")
    description = tool.get("description")
    if description is not None and not isinstance(description, str):
        raise _bad(f"{where}.description must be a string", "tools")
    return chat.Tool(name, description or "", schema)


def _tools(body: Mapping[str, Any]) -> tuple[chat.Tool, ...]:
    raw = body.get("tools")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise _bad("field 'tools' must be a list", "tools")
    tools = tuple(_tool(tool, index) for index, tool in enumerate(raw))
    choice = body.get("tool_choice")
    if choice is None:
        return tools
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in ("auto", "any"):
        return tools
    if kind == "none":
        return ()
    if kind == "tool":
        name = choice.get("name")
        chosen = tuple(t for t in tools if t.name == name)
        if not chosen:
            raise _bad(
                f"field 'tool_choice' names tool {name!r}, which is not in 'tools'",
                "tool_choice",
            )
        return chosen
    raise _bad(
        "field 'tool_choice' must be an object with type auto, any, tool or none", "tool_choice"
    )


def _think(body: Mapping[str, Any]) -> bool | None:
    thinking = body.get("thinking")
    if thinking is None:
        return False  # Anthropic's default (see the module docstring)
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise _bad(
                f"field 'thinking.budget_tokens' must be a positive integer, got {budget!r}",
                "thinking",
            )
        return True
    if kind == "disabled":
        return False
    if kind == "adaptive":
        return None
    raise _bad(
        "field 'thinking' must be an object with type enabled, disabled or adaptive", "thinking"
    )


def _format(body: Mapping[str, Any]) -> dict[str, Any] | None:
    config = body.get("output_config")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise _bad("field 'output_config' must be an object", "output_config")
    fmt = config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise _bad("field 'output_config.format' must have type json_schema", "output_config")
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise _bad("field 'output_config.format.schema' must be an object", "output_config")
    return schema


def _stop_sequences(body: Mapping[str, Any]) -> tuple[str, ...]:
    raw = body.get("stop_sequences")
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(s, str) and s for s in raw):
        raise _bad("field 'stop_sequences' must be a list of non-empty strings", "stop_sequences")
    if len(raw) > MAX_STOP_SEQUENCES or any(len(s) > MAX_STOP_LENGTH for s in raw):
        raise _bad(
            f"field 'stop_sequences' takes at most {MAX_STOP_SEQUENCES} sequences of at most "
            f"{MAX_STOP_LENGTH} characters each",
            "stop_sequences",
        )
    return tuple(dict.fromkeys(raw))


def chat_turn(body: Mapping[str, Any], *, counting: bool = False) -> chat.ChatTurn:
    """A Messages body as a :class:`chat.ChatTurn`. ``counting``: a ``count_tokens`` body
    (no ``max_tokens``)."""
    require_str(body, "model")
    return chat.ChatTurn(
        messages=_messages(body),
        tools=_tools(body),
        options=_options(body, None if counting else _max_tokens(body)),
        think=_think(body),
        format=_format(body),
        extra={"keep_alive": body["keep_alive"]} if "keep_alive" in body else {},
    )


def estimate_input_tokens(upstream: Mapping[str, Any]) -> int:
    """The prompt's size in tokens, estimated from the ``/api/chat`` body: four characters a
    token (the rule of ``openai_compat.estimate_prompt_tokens``, rounded up) over every message's
    content, thinking and tool calls (name and arguments as JSON) and the offered tools as JSON
    (names, descriptions, schemas). Images are not counted: what one costs depends on the
    model's vision encoder. The chat template's own tokens are not counted either."""
    chars = 0
    messages = upstream.get("messages")
    for message in messages if isinstance(messages, list) else []:
        for field in ("content", "thinking"):
            value = message.get(field)
            chars += len(value) if isinstance(value, str) else 0
        if message.get("tool_calls"):
            chars += len(_DUMP(message["tool_calls"]))
    if upstream.get("tools"):
        chars += len(_DUMP(upstream["tools"]))
    return (chars + 3) // 4


def shape(body: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """A Messages body → (the ``/api/chat`` body, this module's view of the request)."""
    upstream = chat_turn(body).to_ollama()
    native = Native(_stop_sequences(body), estimate_input_tokens(upstream))
    return upstream, native


def count_tokens(body: Mapping[str, Any]) -> dict[str, Any]:
    """``POST /v1/messages/count_tokens``: ``{"input_tokens": N}``, an estimate (see
    :func:`estimate_input_tokens`). The body is checked as a Messages body is (no
    ``max_tokens``)."""
    return {"input_tokens": estimate_input_tokens(chat_turn(body, counting=True).to_ollama())}


# --- stop sequences -----------------------------------------------------------------------


@attrs.define
class StopScanner:
    """Watches streamed text for stop sequences. :meth:`feed` returns the text that is safe to
    send (no sequence can start in it any more) and the sequence that matched, if one did (the
    text returned is then everything before it, and the scanner is done). It holds back only
    the longest end of the text that is the beginning of a sequence; :meth:`flush` gives that
    back when no more text will come.

    Of several matches, the one that *ends* first wins (the one the model finished first), and
    of those ending at the same place the longest; fed in any pieces, the same text gives the
    same answer."""

    sequences: tuple[str, ...]
    held: str = ""
    matched: str | None = None

    def feed(self, text: str) -> tuple[str, str | None]:
        if self.matched is not None:
            return "", self.matched
        if not self.sequences:
            return text, None
        buffer = self.held + text
        best: tuple[int, int, str] | None = None  # (end, -length, sequence)
        for sequence in self.sequences:
            start = buffer.find(sequence)
            if start >= 0:
                candidate = (start + len(sequence), -len(sequence), sequence)
                best = candidate if best is None or candidate < best else best
        if best is not None:
            end, negative_length, sequence = best
            self.matched, self.held = sequence, ""
            return buffer[: end + negative_length], sequence
        hold = self._holdback(buffer)
        self.held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], None

    def _holdback(self, buffer: str) -> int:
        """How many characters at the end of ``buffer`` could begin a sequence."""
        longest = max(len(s) for s in self.sequences) - 1
        start = max(0, len(buffer) - longest)
        firsts = {s[0] for s in self.sequences}
        for position in range(start, len(buffer)):
            if buffer[position] in firsts:
                rest = buffer[position:]
                if any(len(s) > len(rest) and s.startswith(rest) for s in self.sequences):
                    return len(buffer) - position
        return 0

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


# --- answers ------------------------------------------------------------------------------


def _native(request: Any) -> Native:
    native = getattr(request, "native", None)
    return native if isinstance(native, Native) else Native()


def stop_reason(reason: str) -> str:
    """Ollama's ``done_reason`` (as :class:`chat.Finished` gives it) as Anthropic's."""
    if reason == "tool_calls":
        return "tool_use"
    return "max_tokens" if reason == "length" else "end_turn"


def _tool_block(call: chat.ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": dict(call.arguments)}


def message_object(
    result: chat.ChatResult, stop_sequences: tuple[str, ...], request_id: str, model: str
) -> dict[str, Any]:
    """A whole answer as a Message object, its text through the same :class:`StopScanner`."""
    scanner = StopScanner(stop_sequences)
    text, matched = scanner.feed(result.text)
    if matched is None:
        text += scanner.flush()
    content: list[dict[str, Any]] = []
    if result.thinking:
        content.append({"type": "thinking", "thinking": result.thinking, "signature": ""})
    if text:
        content.append({"type": "text", "text": text})
    if matched is None:
        content.extend(_tool_block(call) for call in result.tool_calls)
    return {
        "id": f"msg_{request_id}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": "stop_sequence" if matched is not None else stop_reason(result.reason),
        "stop_sequence": matched,
        "usage": {
            "input_tokens": result.prompt_tokens,
            "output_tokens": result.completion_tokens,
        },
    }


def whole_answer(
    request: Any, data: dict[str, Any], request_id: str, created: int, model: str
) -> tuple[dict[str, Any], Any]:
    """This API's one answer object for a folded Ollama answer, and what to keep of it
    (nothing: Messages is stateless)."""
    result = chat.ChatResult.from_ollama(data, request_id)
    return message_object(result, _native(request).stop_sequences, request_id, model), None


def sse(kind: str, payload: Mapping[str, Any]) -> bytes:
    """One server-sent event as Anthropic sends them: its type as the event name too."""
    return b"event: " + kind.encode() + b"\ndata: " + _DUMP(payload).encode() + b"\n\n"


# A text delta, the event of every token: index and text filled in (see templates).
_TEXT_DELTA = Template.of(
    {
        "type": "content_block_delta",
        "index": hole(0),
        "delta": {"type": "text_delta", "text": hole(1)},
    },
    _DUMP,
    2,
    head=b"event: content_block_delta\ndata: ",
    tail=b"\n\n",
)


def stream_error(message: str) -> bytes:
    """The end of this API's stream when it fails mid-way (after its first event)."""
    return sse("error", {"type": "error", "error": {"type": "api_error", "message": message}})


class MessageStream:
    """Ollama ``/api/chat`` chunks → Anthropic's stream events, through :class:`chat.ChatReader`
    (implements :class:`chat.StreamTranslator`)."""

    def __init__(self, *, request_id: str, model: str, native: Native) -> None:
        self.id = f"msg_{request_id}"
        self.model = model
        self.native = native
        self.finished = False
        self.stopped = False
        self.outcome: Any = None
        self._reader = chat.ChatReader(request_id)
        self._scanner = StopScanner(native.stop_sequences)
        self._started = False
        self._ended = False
        self._blocks = 0  # blocks opened so far; the open one (if any) is the last
        self._open: str | None = None  # "text" or "thinking"
        self._lines = 0  # stream lines read before the final one (≈ tokens)

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.native.input_tokens, "output_tokens": 0},
        }
        return sse("message_start", {"type": "message_start", "message": message}) + sse(
            "ping", {"type": "ping"}
        )

    def _delta(self, delta: Mapping[str, Any]) -> bytes:
        payload = {"type": "content_block_delta", "index": self._blocks - 1, "delta": delta}
        return sse("content_block_delta", payload)

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        out = b""
        if self._open == "thinking":
            out += self._delta({"type": "signature_delta", "signature": ""})
        self._open = None
        return out + sse(
            "content_block_stop", {"type": "content_block_stop", "index": self._blocks - 1}
        )

    def _open_block(self, block: dict[str, Any]) -> bytes:
        out = self._close()
        payload = {"type": "content_block_start", "index": self._blocks, "content_block": block}
        self._blocks += 1
        if block["type"] in ("text", "thinking"):
            self._open = block["type"]
        return out + sse("content_block_start", payload)

    def _text(self, text: str) -> bytes:
        if not text:
            return b""
        out = b"" if self._open == "text" else self._open_block({"type": "text", "text": ""})
        # _delta({"type": "text_delta", "text": text}), from its template
        return out + _TEXT_DELTA.render(self._blocks - 1, text)

    def _thinking(self, text: str) -> bytes:
        out = self._text(self._scanner.flush())
        if self._open != "thinking":
            out += self._open_block({"type": "thinking", "thinking": "", "signature": ""})
        return out + self._delta({"type": "thinking_delta", "thinking": text})

    def _tool(self, call: chat.ToolCall) -> bytes:
        out = self._text(self._scanner.flush())
        out += self._open_block({"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
        out += self._delta(
            {"type": "input_json_delta", "partial_json": _DUMP(dict(call.arguments))}
        )
        return out + sse(
            "content_block_stop", {"type": "content_block_stop", "index": self._blocks - 1}
        )

    def _end(self, reason: str, sequence: str | None, usage: dict[str, int]) -> bytes:
        self._ended = True
        out = self._text(self._scanner.flush()) if sequence is None else b""
        out += self._close()
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        out += sse("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
        return out + sse("message_stop", {"type": "message_stop"})

    def feed(self, chunk: Mapping[str, Any]) -> bytes:
        if self._ended:
            return b""
        out = self._start()
        if chunk.get("done") is not True:
            self._lines += 1
        for event in self._reader.feed(chunk):
            if isinstance(event, chat.ThinkingDelta):
                out += self._thinking(event.text)
            elif isinstance(event, chat.TextDelta):
                text, matched = self._scanner.feed(event.text)
                out += self._text(text)
                if matched is not None:
                    self.stopped = True
                    return out + self._end("stop_sequence", matched, {"output_tokens": self._lines})
            elif isinstance(event, chat.ToolCallDelta):
                out += self._tool(event.call)
            else:
                self.finished = True
                usage = {
                    "input_tokens": event.prompt_tokens,
                    "output_tokens": event.completion_tokens,
                }
                out += self._end(stop_reason(event.reason), None, usage)
        return out

    def done(self) -> bytes:
        if self._ended:
            return b""
        return self._start() + self._end("end_turn", None, {"output_tokens": self._lines})

    def error(self, message: str) -> bytes:
        return stream_error(message)


def stream_translator(
    request: Any, request_id: str, created: int, model: str
) -> chat.StreamTranslator:
    """The translator of this API's stream."""
    return MessageStream(request_id=request_id, model=model, native=_native(request))
