"""One chat turn, whatever API it arrived in: the representation every translator shares.

Pure: no I/O, no clock; ids are passed in.

Every chat-shaped API herd serves (OpenAI chat completions, Anthropic Messages, OpenAI Responses)
is translated *into* a :class:`ChatTurn` (messages, tools, sampling options, thinking, output
format) and from there into Ollama's ``/api/chat`` body, by :meth:`ChatTurn.to_ollama` alone.
The answer comes back the same way for all of them: Ollama's stream is read by
:class:`ChatReader` into a few neutral events (:class:`TextDelta`, :class:`ThinkingDelta`,
:class:`ToolCallDelta`, :class:`Finished`), and a whole answer into a :class:`ChatResult`. Each
API module only maps its own fields onto these, so the Ollama side of the mapping is written
once.

Thinking levels. Ollama's ``think`` takes true/false for every thinking model and the levels
``low``/``medium``/``high`` only for some (gpt-oss); :func:`think_for_model` turns a level into
``true`` for the others, so a client's ``reasoning_effort: "high"`` never turns into an error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

import attrs

from herd.core.errors import BadRequest

THINK_LEVELS = ("low", "medium", "high")
# Model name prefixes whose Ollama templates take a thinking level, not just on/off.
LEVELED_THINKERS = ("gpt-oss",)


@attrs.frozen
class ToolCall:
    id: str
    name: str
    arguments: Mapping[str, Any]  # a JSON object


@attrs.frozen
class Message:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str = ""
    images: tuple[str, ...] = ()  # base64, without a data: prefix
    thinking: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_name: str = ""  # role "tool": the tool whose result this is

    def to_ollama(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.images:
            out["images"] = list(self.images)
        if self.thinking:
            out["thinking"] = self.thinking
        if self.tool_calls:
            out["tool_calls"] = [
                {"function": {"name": c.name, "arguments": dict(c.arguments)}}
                for c in self.tool_calls
            ]
        if self.tool_name:
            out["tool_name"] = self.tool_name
        return out


@attrs.frozen
class Tool:
    name: str
    description: str = ""
    parameters: Mapping[str, Any] = attrs.field(factory=dict)  # JSON schema

    def to_ollama(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "parameters": dict(self.parameters)}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@attrs.frozen
class ChatTurn:
    messages: tuple[Message, ...]
    tools: tuple[Tool, ...] = ()
    # Ollama options: temperature, top_p, top_k, seed, num_predict, stop, ...
    options: Mapping[str, Any] = attrs.field(factory=dict)
    think: bool | str | None = None  # None: the model's default
    format: str | Mapping[str, Any] | None = None  # "json" or a JSON schema
    # Ollama body fields passed as the client gave them (keep_alive, ...).
    extra: Mapping[str, Any] = attrs.field(factory=dict)

    def to_ollama(self) -> dict[str, Any]:
        """The ``/api/chat`` body (without ``model``; shaping sets ``stream``)."""
        body: dict[str, Any] = {"messages": [m.to_ollama() for m in self.messages]}
        if self.tools:
            body["tools"] = [t.to_ollama() for t in self.tools]
        if self.options:
            body["options"] = dict(self.options)
        if self.think is not None:
            body["think"] = self.think
        if self.format is not None:
            body["format"] = self.format if isinstance(self.format, str) else dict(self.format)
        body.update(self.extra)
        return body


def think_for_model(think: Any, model: str) -> Any:
    """The ``think`` value to send for ``model``: a level only where the model takes levels."""
    if isinstance(think, str) and think in THINK_LEVELS:
        bare = model.rsplit("/", 1)[-1]
        return think if bare.startswith(LEVELED_THINKERS) else True
    return think


def effort_to_think(effort: Any, field: str) -> bool | str | None:
    """An OpenAI ``reasoning_effort`` (or Responses ``reasoning.effort``) as Ollama's ``think``:
    ``none`` is off, ``minimal`` is low, the levels stay levels (see :func:`think_for_model`).
    Raises BadRequest for anything else."""
    if effort is None:
        return None
    if effort == "none":
        return False
    if effort == "minimal":
        return "low"
    if effort in THINK_LEVELS:
        return str(effort)
    raise BadRequest(
        f"field '{field}' must be none, minimal, low, medium or high, got {effort!r}", param=field
    )


def parse_arguments(arguments: Any, where: str) -> Mapping[str, Any]:
    """Tool-call arguments as an object: JSON text (OpenAI) or an object (Anthropic, Ollama).
    Raises BadRequest naming ``where``."""
    if isinstance(arguments, Mapping):
        return arguments
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError as exc:
            raise BadRequest(f"{where}: arguments are not valid JSON: {exc}") from exc
        if isinstance(parsed, dict):
            return parsed
    raise BadRequest(f"{where}: arguments must be a JSON object")


def data_url_image(url: Any, where: str) -> str:
    """The base64 payload of an image given as a ``data:`` URL. The router fetches no URLs.
    Raises BadRequest naming ``where``."""
    if not isinstance(url, str):
        raise BadRequest(f"{where}: an image needs a URL")
    if not url.startswith("data:"):
        raise BadRequest(
            f"{where}: only data: URLs are accepted for images (got {url[:40]!r}); "
            "the router does not fetch URLs"
        )
    header, _, data = url.partition(",")
    if ";base64" not in header or not data:
        raise BadRequest(f"{where}: an image data URL must be base64")
    return data


# --- the answer ---------------------------------------------------------------------------


@attrs.frozen
class TextDelta:
    text: str


@attrs.frozen
class ThinkingDelta:
    text: str


@attrs.frozen
class ToolCallDelta:
    index: int  # 0, 1, ... in the order the model made them
    call: ToolCall


@attrs.frozen
class Finished:
    reason: str  # Ollama's done_reason: "stop", "length", ... ("tool_calls" if any were made)
    prompt_tokens: int
    completion_tokens: int


Event = TextDelta | ThinkingDelta | ToolCallDelta | Finished


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def tool_call(raw: Any, request_id: str, index: int) -> ToolCall:
    """One of Ollama's ``message.tool_calls`` entries, with an id (Ollama's own, if it gave
    one; else made from the request id and the call's position)."""
    function = raw.get("function") if isinstance(raw, dict) else None
    function = function if isinstance(function, dict) else {}
    given = raw.get("id") if isinstance(raw, dict) else None
    arguments = function.get("arguments")
    try:
        parsed = parse_arguments(arguments, "tool call")
    except BadRequest:
        parsed = {"_raw": arguments}  # the model's own text, kept rather than dropped
    return ToolCall(
        id=given if isinstance(given, str) and given else f"call_{request_id[:12]}_{index}",
        name=str(function.get("name", "")),
        arguments=parsed,
    )


@attrs.define
class ChatReader:
    """Reads Ollama ``/api/chat`` stream chunks (or ``/api/generate`` ones) into events."""

    request_id: str
    calls: int = 0
    finished: Finished | None = None

    def feed(self, chunk: Mapping[str, Any]) -> list[Event]:
        events: list[Event] = []
        message = chunk.get("message")
        if isinstance(message, dict):
            thinking, content = message.get("thinking"), message.get("content")
            calls = message.get("tool_calls")
        else:  # /api/generate
            thinking, content, calls = chunk.get("thinking"), chunk.get("response"), None
        if isinstance(thinking, str) and thinking:
            events.append(ThinkingDelta(thinking))
        if isinstance(content, str) and content:
            events.append(TextDelta(content))
        if isinstance(calls, list):
            for raw in calls:
                events.append(
                    ToolCallDelta(self.calls, tool_call(raw, self.request_id, self.calls))
                )
                self.calls += 1
        if chunk.get("done") is True:
            reason = str(chunk.get("done_reason") or "stop")
            self.finished = Finished(
                "tool_calls" if self.calls else reason,
                _count(chunk.get("prompt_eval_count")),
                _count(chunk.get("eval_count")),
            )
            events.append(self.finished)
        return events


@attrs.frozen
class ChatResult:
    """A whole answer (Ollama's ``stream: false`` object, or a folded stream)."""

    text: str
    thinking: str
    tool_calls: tuple[ToolCall, ...]
    reason: str  # as in Finished
    prompt_tokens: int
    completion_tokens: int

    @classmethod
    def from_ollama(cls, data: Mapping[str, Any], request_id: str) -> ChatResult:
        reader = ChatReader(request_id)
        text: list[str] = []
        thinking: list[str] = []
        calls: list[ToolCall] = []
        for event in reader.feed({**data, "done": True}):
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, ThinkingDelta):
                thinking.append(event.text)
            elif isinstance(event, ToolCallDelta):
                calls.append(event.call)
        finished = reader.finished
        assert finished is not None
        return cls(
            "".join(text),
            "".join(thinking),
            tuple(calls),
            finished.reason,
            finished.prompt_tokens,
            finished.completion_tokens,
        )


class StreamTranslator(Protocol):
    """Turns Ollama stream chunks into a client API's stream (OpenAI chat or completions SSE,
    Anthropic Messages events, OpenAI Responses events)."""

    finished: bool  # the backend's final chunk was fed
    # The translator saw the end itself (an Anthropic stop sequence): stop reading, close the
    # upstream (the backend stops), and count the answer as complete.
    stopped: bool
    # What the API module wants kept of the answer once it is done (Responses: its output).
    outcome: Any

    def feed(self, chunk: Mapping[str, Any]) -> bytes: ...
    def done(self) -> bytes: ...
    def error(self, message: str) -> bytes: ...
