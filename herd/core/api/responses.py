"""OpenAI Responses ⇄ Ollama translation (``POST /v1/responses``). Pure: no I/O, no clock; ids
and timestamps are passed in.

A Responses request becomes one :class:`chat.ChatTurn` (so one ``/api/chat`` body), and
Ollama's answer comes back as a ``response`` object: whole, or as the API's typed SSE events.

The request, field by field:

- ``input``: a string (one user message) or items. Messages (``type: "message"`` or just a
  ``role``) of role user, assistant, system or developer (developer is system), with string
  content or parts ``input_text``, ``output_text``, ``refusal`` (as text) and ``input_image``
  (a ``data:`` URL only: the router fetches nothing, and has no file store for ``file_id``).
  ``function_call`` items become the assistant's tool calls (consecutive ones, and one after an
  assistant message, join that message, as Ollama keeps them). Arguments that aren't a JSON
  object, which only a model makes, go on as ``{"_raw": text}`` rather than a 400, so an agent
  can send back a malformed call with the error it answered. ``function_call_output`` items
  become ``role: "tool"`` messages naming the function their ``call_id`` called. ``reasoning``
  items are kept as the ``thinking`` of the assistant message that follows them (their
  reasoning text, else their summary; encrypted content is ignored, herd never makes any), and
  dropped when no assistant message follows. Any other item type is a 400 naming it.
- ``instructions``: a system message first. As in OpenAI's API, a previous response's
  instructions are not carried over to the next.
- ``tools``: function tools only; any other type (web_search, file_search, ...) is a 400: the
  router runs no built-in tools. ``tool_choice``: ``none`` sends no tools; ``auto`` and
  ``required`` send them all (Ollama can't force a call); a named function, or
  ``allowed_tools``, sends only those.
- ``max_output_tokens`` → ``num_predict``; ``temperature``, ``top_p`` → options (Ollama's own
  ``options`` object and ``keep_alive`` are taken too, as on the chat route).
  ``reasoning.effort`` → ``think`` (:func:`chat.effort_to_think`); ``reasoning.summary`` is
  accepted and ignored (Ollama's thinking is not a summary). ``text.format``: ``text``,
  ``json_object`` (Ollama's ``"json"``) or ``json_schema`` (its ``schema``).
- ``parallel_tool_calls``, ``truncation``, ``user``, ``metadata``: checked, echoed, otherwise
  ignored (Ollama has no equivalent). ``include``, ``prompt_cache_key``, ``service_tier`` and
  similar hints are ignored. ``background``, ``conversation`` and ``prompt`` are refused (400).
- ``store`` (default true) and ``previous_response_id``: see :mod:`herd.core.responses_store`.
  The handler looks the id up before shaping; naming one the router doesn't hold is a 400 that
  says herd keeps only the last responses in memory.

The answer: ``output`` holds, in the order the model made them, a ``reasoning`` item (Ollama's
thinking as ``reasoning_text`` content; its ``summary`` stays empty), a ``message`` item with
one ``output_text`` part, and ``function_call`` items (``call_id`` Ollama's or made from the
request id). An answer with nothing in it still gets an empty message. ``done_reason: length``
is ``status: "incomplete"`` with ``incomplete_details.reason: "max_output_tokens"`` (streamed:
``response.incomplete`` instead of ``response.completed``). ``usage`` has Ollama's real counts;
cached and reasoning tokens are reported as 0 (Ollama doesn't split them out).

The stream: ``event: <type>`` / ``data: <json>`` pairs with ``sequence_number`` from 0:
``response.created``, ``response.in_progress``; per item ``response.output_item.added``, its
content part (``response.content_part.added``), deltas (``response.output_text.delta``,
``response.reasoning_text.delta``, ``response.function_call_arguments.delta``), their
``.done`` events and ``response.output_item.done``; then ``response.completed`` (or
``.incomplete``) with the whole response and usage. No ``[DONE]`` line, as OpenAI sends none.
A backend failure mid-stream ends it with ``response.failed`` (``status: "failed"``,
``error: {code: "server_error", message}``, the output so far). When the router itself cuts a
stream (:func:`stream_error`, which is given only the message) it sends an ``error`` event,
without a ``sequence_number``: it can't know how far the stream had got.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from herd.core.api import chat, openai_compat
from herd.core.api.templates import Template, hole
from herd.core.errors import BadRequest, require_str
from herd.core.responses_store import MAX_BYTES, MAX_RESPONSES, StoredResponse

_DUMP = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

CUSTOM_INPUT = "input"  # the one parameter a custom tool's stand-in function takes
CUSTOM_GRAMMAR_CHARS = 4000  # of a custom tool's grammar, shown to the model
MAX_INPUT_ITEMS = 10_000  # input items of one request, its previous chain included
ROLES = ("user", "assistant", "system", "developer")
REASONING_SUMMARIES = ("auto", "concise", "detailed")
TRUNCATIONS = ("auto", "disabled")


@attrs.frozen
class ResponsesRequest:
    """This module's view of a shaped request: what the answer repeats and what is stored."""

    # The request fields a response object echoes (instructions, tools, tool_choice, ...).
    echo: Mapping[str, Any]
    store: bool
    # The conversation so far as Responses input items: the previous chain's, then this
    # request's own input (normalised); the answer's output items are added when it is stored.
    conversation: tuple[Mapping[str, Any], ...]
    # Custom (free-form input) tools, by name: a call to one is a custom_tool_call item.
    custom_tools: frozenset[str] = frozenset()


# --- the request --------------------------------------------------------------------------


def _bad(message: str, param: str) -> BadRequest:
    return BadRequest(message, param=param)


def _text_of(part: Mapping[str, Any], key: str, where: str) -> str:
    value = part.get(key)
    if not isinstance(value, str):
        raise _bad(f"{where}: a {part.get('type')} part needs '{key}' (a string)", "input")
    return value


def _image(part: Mapping[str, Any], where: str) -> dict[str, Any]:
    if part.get("file_id") is not None and part.get("image_url") is None:
        raise _bad(
            f"{where}: images by file_id are not supported (herd has no file store); "
            "send the image as a data: URL in image_url",
            "input",
        )
    url = part.get("image_url")
    try:
        chat.data_url_image(url, where)
    except BadRequest as exc:
        raise _bad(exc.message, "input") from exc
    return {"type": "input_image", "image_url": url}


def _parts(
    content: Any, where: str, allowed: tuple[str, ...], field: str = "content"
) -> str | list[dict[str, Any]]:
    """Message content (or a function call's output): a string, or parts, normalised."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}.{field} must be a string or a list of parts", "input")
    out: list[dict[str, Any]] = []
    for position, part in enumerate(content):
        here = f"{where}.{field}[{position}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(part, dict) or kind not in allowed:
            shown = kind if isinstance(part, dict) else type(part).__name__
            raise _bad(
                f"{here}: unsupported content part {shown!r} (herd takes "
                + ", ".join(allowed)
                + ")",
                "input",
            )
        if kind == "input_image":
            out.append(_image(part, here))
        elif kind == "refusal":
            out.append({"type": "refusal", "refusal": _text_of(part, "refusal", here)})
        else:
            out.append({"type": kind, "text": _text_of(part, "text", here)})
    return out


MESSAGE_PARTS = ("input_text", "output_text", "refusal", "input_image")
OUTPUT_PARTS = ("input_text", "input_image")


def _reasoning_texts(value: Any, kind: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [
        {"type": kind, "text": p["text"]}
        for p in value
        if isinstance(p, dict) and isinstance(p.get("text"), str)
    ]


def _call_id(item: Mapping[str, Any], where: str) -> str:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise _bad(f"{where}: a {item.get('type')} item needs 'call_id' (a string)", "input")
    return call_id


def _item(item: Any, where: str) -> dict[str, Any]:
    """One input item, checked and normalised to the fields herd uses."""
    if not isinstance(item, dict):
        raise _bad(f"{where} must be an object", "input")
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        role = item.get("role")
        if role not in ROLES:
            raise _bad(
                f"{where}.role must be user, assistant, system or developer, got {role!r}",
                "input",
            )
        return {
            "type": "message",
            "role": role,
            "content": _parts(item.get("content"), where, MESSAGE_PARTS),
        }
    if kind == "function_call":
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"{where}: a function_call item needs 'name' (a string)", "input")
        arguments = item.get("arguments", "")
        if isinstance(arguments, Mapping):
            arguments = _DUMP(dict(arguments))
        elif not isinstance(arguments, str):
            raise _bad(f"{where}: function_call {name!r}: arguments must be JSON text", "input")
        return {
            "type": "function_call",
            "call_id": _call_id(item, where),
            "name": name,
            "arguments": arguments,
        }
    if kind == "custom_tool_call":
        name, given = item.get("name"), item.get("input", "")
        if not isinstance(name, str) or not name or not isinstance(given, str):
            raise _bad(
                f"{where}: a custom_tool_call item needs 'name' and 'input' (strings)", "input"
            )
        return {
            "type": "function_call",
            "call_id": _call_id(item, where),
            "name": name,
            "arguments": _DUMP({CUSTOM_INPUT: given}),
        }
    if kind in ("function_call_output", "custom_tool_call_output"):
        output = item.get("output")
        return {
            "type": "function_call_output",
            "call_id": _call_id(item, where),
            "output": _parts(output, where, OUTPUT_PARTS, "output") if output is not None else "",
        }
    if kind == "reasoning":
        return {
            "type": "reasoning",
            "summary": _reasoning_texts(item.get("summary"), "summary_text"),
            "content": _reasoning_texts(item.get("content"), "reasoning_text"),
        }
    if kind == "item_reference":
        raise _bad(
            f"{where}: item references are not supported; continue a stored response with "
            "previous_response_id, or send the items themselves",
            "input",
        )
    raise _bad(
        f"{where}: unsupported input item type {kind!r} (herd takes message, function_call, "
        "function_call_output, custom_tool_call, custom_tool_call_output and reasoning items)",
        "input",
    )


def _input(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    value = body.get("input")
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _bad("field 'input' must be a string or a non-empty list of input items", "input")
    if len(value) > MAX_INPUT_ITEMS:
        raise _bad(f"too many input items: {len(value)} (the limit is {MAX_INPUT_ITEMS})", "input")
    return [_item(item, f"input[{index}]") for index, item in enumerate(value)]


def _content_text(content: str | list[dict[str, Any]]) -> tuple[str, tuple[str, ...]]:
    if isinstance(content, str):
        return content, ()
    texts: list[str] = []
    images: list[str] = []
    for part in content:
        if part["type"] == "input_image":
            images.append(chat.data_url_image(part["image_url"], "input"))
        else:
            texts.append(part.get("text", part.get("refusal", "")))
    return "\n".join(texts), tuple(images)


def _arguments(text: str) -> Mapping[str, Any]:
    """A call's arguments as an object. Text that isn't a JSON object is the model's own (a
    client sends back the calls it was given), kept as ``{"_raw": text}`` as the answer side
    keeps it, rather than refusing the conversation that holds it."""
    try:
        return chat.parse_arguments(text, "function_call")
    except BadRequest:
        return {"_raw": text}


def _messages(items: Sequence[Mapping[str, Any]]) -> list[chat.Message]:
    """Normalised input items → chat messages."""
    out: list[chat.Message] = []
    names: dict[str, str] = {}  # call_id → function name
    thinking = ""  # a reasoning item's text, for the assistant message after it
    for item in items:
        kind = item["type"]
        if kind == "reasoning":
            texts = item["content"] or item["summary"]
            thinking = "\n".join(p["text"] for p in texts)
            continue
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            text, images = _content_text(item["content"])
            out.append(
                chat.Message(
                    role=role,
                    content=text,
                    images=images,
                    thinking=thinking if role == "assistant" else "",
                )
            )
        elif kind == "function_call":
            call = chat.ToolCall(item["call_id"], item["name"], _arguments(item["arguments"]))
            names[call.id] = call.name
            if out and out[-1].role == "assistant":
                last = out[-1]
                out[-1] = attrs.evolve(
                    last, tool_calls=(*last.tool_calls, call), thinking=last.thinking or thinking
                )
            else:
                out.append(chat.Message(role="assistant", thinking=thinking, tool_calls=(call,)))
        else:  # function_call_output
            text, images = _content_text(item["output"])
            out.append(
                chat.Message(
                    role="tool",
                    content=text,
                    images=images,
                    tool_name=names.get(item["call_id"], ""),
                )
            )
        thinking = ""
    return out


def _tools(body: Mapping[str, Any]) -> tuple[list[dict[str, Any]], tuple[chat.Tool, ...]]:
    """(the tools as the response echoes them, the tools for Ollama)."""
    tools = body.get("tools")
    if tools is None:
        return [], ()
    if not isinstance(tools, list):
        raise _bad("field 'tools' must be a list", "tools")
    echo: list[dict[str, Any]] = []
    out: list[chat.Tool] = []
    for index, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(tool, dict) and kind == "custom":
            echo.append(dict(tool))
            out.append(_custom_tool(tool, index))
            continue
        if not isinstance(tool, dict) or kind != "function":
            raise _bad(
                f"tools[{index}]: tool type {kind!r} is not supported; herd serves function "
                "and custom tools (the router runs no built-in tools such as web_search or "
                "file_search)",
                "tools",
            )
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools[{index}] needs 'name' (a string)", "tools")
        parameters = tool.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise _bad(f"tools[{index}].parameters must be an object (a JSON schema)", "tools")
        description = tool.get("description")
        if description is not None and not isinstance(description, str):
            raise _bad(f"tools[{index}].description must be a string", "tools")
        echo.append(
            {
                "type": "function",
                "name": name,
                "description": description,
                "parameters": parameters,
                "strict": tool.get("strict") if isinstance(tool.get("strict"), bool) else None,
            }
        )
        out.append(chat.Tool(name, description or "", parameters or {}))
    return echo, tuple(out)


def _custom_tool(tool: Mapping[str, Any], index: int) -> chat.Tool:
    """A custom tool (free-form text input, e.g. Codex's apply_patch) as a function with one
    string parameter, :data:`CUSTOM_INPUT`. Its grammar, if any, goes into the description:
    Ollama can't constrain the text to it."""
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(f"tools[{index}] needs 'name' (a string)", "tools")
    description = tool.get("description") if isinstance(tool.get("description"), str) else ""
    fmt = tool.get("format")
    hint = "free-form text"
    if isinstance(fmt, dict) and fmt.get("type") == "grammar":
        definition = str(fmt.get("definition", ""))[:CUSTOM_GRAMMAR_CHARS]
        hint = f"text in this {fmt.get('syntax', '')} grammar:\n{definition}"
    parameters = {
        "type": "object",
        "properties": {CUSTOM_INPUT: {"type": "string", "description": f"The input: {hint}"}},
        "required": [CUSTOM_INPUT],
    }
    return chat.Tool(name, str(description), parameters)


def _chosen_names(choice: Any, tools: tuple[chat.Tool, ...]) -> set[str] | None:
    """The tool names ``tool_choice`` limits the request to (None: all of them)."""
    if choice is None or choice in ("auto", "required"):
        return None
    if choice == "none":
        return set()
    wanted: Any
    if isinstance(choice, dict) and choice.get("type") == "function":
        wanted = [choice]
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        wanted = choice.get("tools")
        if choice.get("mode", "auto") not in ("auto", "required") or not isinstance(wanted, list):
            raise _bad(
                "tool_choice allowed_tools needs mode auto or required and a list of tools",
                "tool_choice",
            )
    else:
        raise _bad(
            "field 'tool_choice' must be none, auto, required, {type: function, name} or "
            f"{{type: allowed_tools, ...}}, got {json.dumps(choice)[:80]}",
            "tool_choice",
        )
    names = {t.name for t in tools}
    chosen: set[str] = set()
    for entry in wanted:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or entry.get("type") != "function":
            raise _bad(
                f"tool_choice names only function tools, got {json.dumps(entry)[:80]}",
                "tool_choice",
            )
        if name not in names:
            raise _bad(f"tool_choice names {name!r}, which is not in 'tools'", "tool_choice")
        chosen.add(name)
    return chosen


def _number(body: Mapping[str, Any], field: str) -> float | int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"field '{field}' must be a number, got {json.dumps(value)[:40]}", field)
    return value


def _flag(body: Mapping[str, Any], field: str, default: bool) -> bool:
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"field '{field}' must be true or false, got {json.dumps(value)[:40]}", field)
    return value


def _options(body: Mapping[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    extra = body.get("options")
    if extra is not None:
        if not isinstance(extra, dict):
            raise _bad("field 'options' must be an object (Ollama options)", "options")
        options.update(extra)
    for field in ("temperature", "top_p"):
        value = _number(body, field)
        if value is not None:
            options[field] = value
    limit = body.get("max_output_tokens")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise _bad(
                f"field 'max_output_tokens' must be a positive integer, got "
                f"{json.dumps(limit)[:40]}",
                "max_output_tokens",
            )
        options["num_predict"] = limit
    return options


def _text(body: Mapping[str, Any]) -> tuple[dict[str, Any], str | dict[str, Any] | None]:
    """(``text`` as the response echoes it, Ollama's ``format``)."""
    text = body.get("text")
    if text is None:
        return {"format": {"type": "text"}}, None
    if not isinstance(text, dict):
        raise _bad("field 'text' must be an object", "text")
    fmt = text.get("format")
    if fmt is None:
        return {**text, "format": {"type": "text"}}, None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return text, None
    if kind == "json_object":
        return text, "json"
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise _bad("text.format.schema must be an object (a JSON schema)", "text.format")
        return text, dict(schema)
    raise _bad(
        f"text.format.type must be text, json_object or json_schema, got {kind!r}", "text.format"
    )


def _reasoning(body: Mapping[str, Any]) -> tuple[dict[str, Any] | None, bool | str | None]:
    """(``reasoning`` as the response echoes it, Ollama's ``think``)."""
    reasoning = body.get("reasoning")
    if reasoning is None:
        return None, None
    if not isinstance(reasoning, dict):
        raise _bad("field 'reasoning' must be an object", "reasoning")
    summary = reasoning.get("summary")
    if summary is not None and summary not in REASONING_SUMMARIES:
        raise _bad(
            f"reasoning.summary must be auto, concise or detailed, got {summary!r}",
            "reasoning.summary",
        )
    effort = reasoning.get("effort")
    think = chat.effort_to_think(effort, "reasoning.effort")
    return {"effort": effort, "summary": summary}, think


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    if body.get("background"):
        raise _bad("background responses are not supported by herd", "background")
    if body.get("conversation") is not None:
        raise _bad(
            "the Conversations API is not supported by herd; continue a response with "
            "previous_response_id, or send the conversation in 'input'",
            "conversation",
        )
    if body.get("prompt") is not None:
        raise _bad("stored prompt templates are not supported by herd", "prompt")


def _previous(body: Mapping[str, Any], previous: StoredResponse | None) -> str | None:
    wanted = body.get("previous_response_id")
    if wanted is None:
        return None
    if not isinstance(wanted, str) or not wanted:
        raise _bad("field 'previous_response_id' must be a response id", "previous_response_id")
    if previous is None or previous.id != wanted:
        raise _bad(
            f"previous_response_id {wanted!r} is not stored on this router: herd keeps only "
            f"the last {MAX_RESPONSES} responses ({MAX_BYTES // 2**20} MiB) in memory, not on "
            "disk, so it was never stored (store: false), has been evicted, or the router has "
            "restarted since; send the whole conversation in 'input' instead",
            "previous_response_id",
        )
    return wanted


def _optional_str(body: Mapping[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is not None and not isinstance(value, str):
        raise _bad(f"field '{field}' must be a string", field)
    return value


def shape(body: Mapping[str, Any], previous: Any = None) -> tuple[dict[str, Any], Any]:
    """A Responses body (and the stored conversation its ``previous_response_id`` names, if
    any) → (the ``/api/chat`` body, this module's view of the request)."""
    require_str(body, "model")
    _refuse_unsupported(body)
    stored = previous if isinstance(previous, StoredResponse) else None
    previous_id = _previous(body, stored)
    earlier = list(stored.conversation) if stored is not None else []
    own = _input(body)
    if len(earlier) + len(own) > MAX_INPUT_ITEMS:
        raise _bad(
            f"too many input items with the previous responses: {len(earlier) + len(own)} "
            f"(the limit is {MAX_INPUT_ITEMS})",
            "previous_response_id",
        )
    # Items stored earlier were checked when they came in (or made here); normalise again so
    # every conversation item has one shape.
    earlier = [
        _item(dict(item), f"previous_response_id item {i}") for i, item in enumerate(earlier)
    ]
    conversation = earlier + own
    instructions = _optional_str(body, "instructions")
    messages = _messages(conversation)
    if instructions:
        messages.insert(0, chat.Message(role="system", content=instructions))
    tools_echo, tools = _tools(body)
    chosen = _chosen_names(body.get("tool_choice"), tools)
    if chosen is not None:
        tools = tuple(t for t in tools if t.name in chosen)
    text_echo, fmt = _text(body)
    reasoning_echo, think = _reasoning(body)
    truncation = body.get("truncation")
    if truncation is not None and truncation not in TRUNCATIONS:
        raise _bad(f"field 'truncation' must be auto or disabled, got {truncation!r}", "truncation")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _bad("field 'metadata' must be an object", "metadata")
    store = _flag(body, "store", True)
    options = _options(body)
    echo = {
        "instructions": instructions,
        "tools": tools_echo,
        "tool_choice": body.get("tool_choice") or "auto",
        "parallel_tool_calls": _flag(body, "parallel_tool_calls", True),
        "temperature": _number(body, "temperature"),
        "top_p": _number(body, "top_p"),
        "max_output_tokens": body.get("max_output_tokens"),
        "previous_response_id": previous_id,
        "store": store,
        "text": text_echo,
        "reasoning": reasoning_echo,
        "truncation": truncation or "disabled",
        "user": _optional_str(body, "user"),
        "metadata": metadata if metadata is not None else {},
    }
    turn = chat.ChatTurn(
        messages=tuple(messages),
        tools=tools,
        options=options,
        think=think,
        format=fmt,
        extra={"keep_alive": body["keep_alive"]} if "keep_alive" in body else {},
    )
    custom = frozenset(
        str(t.get("name"))
        for t in body.get("tools") or ()
        if isinstance(t, dict) and t.get("type") == "custom"
    )
    native = ResponsesRequest(
        echo=echo, store=store, conversation=tuple(conversation), custom_tools=custom
    )
    return turn.to_ollama(), native


# --- the answer ---------------------------------------------------------------------------


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _sse(payload: Mapping[str, Any]) -> bytes:
    return (
        b"event: " + str(payload["type"]).encode() + b"\ndata: " + _DUMP(payload).encode() + b"\n\n"
    )


def _native(request: Any) -> ResponsesRequest:
    native = getattr(request, "native", None)
    if not isinstance(native, ResponsesRequest):
        raise TypeError("not a shaped /v1/responses request")
    return native


@attrs.define
class _Open:
    """The output item being written (a reasoning or a message item)."""

    kind: str  # "reasoning" | "message"
    item_id: str
    index: int
    texts: list[str] = attrs.field(factory=list)
    template: Template | None = None  # its delta event (made on its first delta)


class ResponsesStreamTranslator:
    """Ollama ``/api/chat`` chunks → Responses SSE events (see the module docstring), through
    :class:`chat.ChatReader`. ``response`` is the final response object once finished;
    ``outcome`` what to store of it (None with ``store: false``). With ``render=False`` it
    builds only those and renders no events (``feed`` returns ``b""``): a whole answer's
    events would be thrown away."""

    def __init__(
        self,
        native: ResponsesRequest,
        *,
        request_id: str,
        created: int,
        model: str,
        render: bool = True,
    ) -> None:
        self.native = native
        self.render = render
        self.id = f"resp_{request_id}"
        self.request_id = request_id
        self.created = created
        self.model = model
        self.finished = False
        self.stopped = False  # the stream ends only with the backend's
        self.outcome: StoredResponse | None = None
        self.response: dict[str, Any] | None = None
        self._reader = chat.ChatReader(request_id)
        self._sequence = 0
        self._started = False
        self._output: list[dict[str, Any]] = []
        self._open: _Open | None = None

    # events

    def _event(self, kind: str, **fields: Any) -> bytes:
        if not self.render:
            self._sequence += 1
            return b""
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return _sse(payload)

    def _response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": error,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "model": self.model,
            "output": output,
            "usage": usage,
            **self.native.echo,
        }

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        response = self._response("in_progress", [])
        return self._event("response.created", response=response) + self._event(
            "response.in_progress", response=response
        )

    # items

    def _part(self, kind: str, text: str) -> dict[str, Any]:
        if kind == "message":
            return {"type": "output_text", "text": text, "annotations": []}
        return {"type": "reasoning_text", "text": text}

    def _item(self, opened: _Open, status: str) -> dict[str, Any]:
        text = "".join(opened.texts)
        if opened.kind == "message":
            return {
                "id": opened.item_id,
                "type": "message",
                "role": "assistant",
                "status": status,
                "content": [self._part("message", text)] if status != "in_progress" else [],
            }
        return {
            "id": opened.item_id,
            "type": "reasoning",
            "summary": [],
            "content": [self._part("reasoning", text)] if status != "in_progress" else [],
            "status": status,
        }

    def _begin(self, kind: str) -> bytes:
        """Open an item of ``kind`` (closing another kind first)."""
        out = b""
        if self._open is not None:
            if self._open.kind == kind:
                return out
            out += self._close("completed")
        index = len(self._output)
        prefix = "msg" if kind == "message" else "rs"
        opened = _Open(kind, f"{prefix}_{self.request_id}_{index}", index)
        self._open = opened
        out += self._event(
            "response.output_item.added",
            output_index=index,
            item=self._item(opened, "in_progress"),
        )
        out += self._event(
            "response.content_part.added",
            item_id=opened.item_id,
            output_index=index,
            content_index=0,
            part=self._part(kind, ""),
        )
        return out

    def _delta(self, kind: str, text: str) -> bytes:
        out = self._begin(kind)
        opened = self._open
        assert opened is not None
        opened.texts.append(text)
        if not self.render:
            self._sequence += 1
            return out
        if opened.template is None:  # the item's delta event, sequence number and text to fill
            fields: dict[str, Any] = {
                "item_id": opened.item_id,
                "output_index": opened.index,
                "content_index": 0,
                "delta": hole(1),
            }
            if kind == "message":
                kind_name, fields["logprobs"] = "response.output_text.delta", []
            else:
                kind_name = "response.reasoning_text.delta"
            opened.template = Template.of(
                {"type": kind_name, "sequence_number": hole(0), **fields},
                _DUMP,
                2,
                head=b"event: " + kind_name.encode() + b"\ndata: ",
                tail=b"\n\n",
            )
        self._sequence += 1
        return out + opened.template.render(self._sequence - 1, text)

    def _close(self, status: str) -> bytes:
        opened = self._open
        if opened is None:
            return b""
        self._open = None
        text = "".join(opened.texts)
        where = {"item_id": opened.item_id, "output_index": opened.index, "content_index": 0}
        if opened.kind == "message":
            out = self._event("response.output_text.done", **where, text=text, logprobs=[])
        else:
            out = self._event("response.reasoning_text.done", **where, text=text)
        out += self._event(
            "response.content_part.done", **where, part=self._part(opened.kind, text)
        )
        item = self._item(opened, status)
        self._output.append(item)
        return out + self._event("response.output_item.done", output_index=opened.index, item=item)

    def _custom_call(self, call: chat.ToolCall) -> bytes:
        out = self._close("completed")
        index = len(self._output)
        given = call.arguments.get(CUSTOM_INPUT)
        text = given if isinstance(given, str) else _DUMP(dict(call.arguments))
        item: dict[str, Any] = {
            "id": f"ctc_{self.request_id}_{index}",
            "type": "custom_tool_call",
            "call_id": call.id,
            "name": call.name,
            "input": "",
            "status": "in_progress",
        }
        out += self._event("response.output_item.added", output_index=index, item=item)
        where = {"item_id": item["id"], "output_index": index}
        out += self._event("response.custom_tool_call_input.delta", **where, delta=text)
        out += self._event("response.custom_tool_call_input.done", **where, input=text)
        item = {**item, "input": text, "status": "completed"}
        self._output.append(item)
        return out + self._event("response.output_item.done", output_index=index, item=item)

    def _call(self, call: chat.ToolCall) -> bytes:
        if call.name in self.native.custom_tools:
            return self._custom_call(call)
        out = self._close("completed")
        index = len(self._output)
        arguments = openai_compat._openai_call(call)["function"]["arguments"]
        item = {
            "id": f"fc_{self.request_id}_{index}",
            "type": "function_call",
            "call_id": call.id,
            "name": call.name,
            "arguments": "",
            "status": "in_progress",
        }
        out += self._event("response.output_item.added", output_index=index, item=item)
        where = {"item_id": item["id"], "output_index": index}
        out += self._event("response.function_call_arguments.delta", **where, delta=arguments)
        out += self._event("response.function_call_arguments.done", **where, arguments=arguments)
        item = {**item, "arguments": arguments, "status": "completed"}
        self._output.append(item)
        return out + self._event("response.output_item.done", output_index=index, item=item)

    def _finish(self, event: chat.Finished) -> bytes:
        status = "incomplete" if event.reason == "length" else "completed"
        out = b""
        if self._open is None and not self._output:
            out += self._begin("message")  # an empty answer is still a message
        out += self._close(status)
        usage = _usage(event.prompt_tokens, event.completion_tokens)
        response = self._response(status, list(self._output), usage)
        self.response = response
        self.finished = True
        if self.native.store:
            self.outcome = StoredResponse(
                id=self.id,
                response=response,
                conversation=(*self.native.conversation, *self._output),
            )
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return out + self._event(kind, response=response)

    # chat.StreamTranslator

    def feed(self, chunk: Mapping[str, Any]) -> bytes:
        out = self._start()
        for event in self._reader.feed(chunk):
            if isinstance(event, chat.ThinkingDelta):
                out += self._delta("reasoning", event.text)
            elif isinstance(event, chat.TextDelta):
                out += self._delta("message", event.text)
            elif isinstance(event, chat.ToolCallDelta):
                out += self._call(event.call)
            else:
                out += self._finish(event)
        return out

    def done(self) -> bytes:
        return b""  # the Responses stream has no [DONE] line

    def error(self, message: str) -> bytes:
        out = self._start()
        output = list(self._output)
        if self._open is not None:
            output.append(self._item(self._open, "incomplete"))
        response = self._response(
            "failed", output, error={"code": "server_error", "message": message}
        )
        return out + self._event("response.failed", response=response)


def stream_translator(
    request: Any, request_id: str, created: int, model: str
) -> chat.StreamTranslator:
    """The translator of this API's stream."""
    return ResponsesStreamTranslator(
        _native(request), request_id=request_id, created=created, model=model
    )


def whole_answer(
    request: Any, data: dict[str, Any], request_id: str, created: int, model: str
) -> tuple[dict[str, Any], Any]:
    """This API's one answer object for a folded Ollama answer, and what to keep of it."""
    translator = ResponsesStreamTranslator(
        _native(request), request_id=request_id, created=created, model=model, render=False
    )
    translator.feed({**data, "done": True})
    assert translator.response is not None
    return translator.response, translator.outcome


def stream_error(message: str) -> bytes:
    """The end of this API's stream when it fails mid-way (after its first event)."""
    return _sse({"type": "error", "code": "server_error", "message": message, "param": None})
