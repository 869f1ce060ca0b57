"""Folding an Ollama NDJSON stream into the one object ``stream: false`` returns.

Pure. The router always streams text from the backend (so a node is judged by its first token,
not its last); a client that asked not to stream gets what Ollama would have sent it: the
stream's final object, with the pieces every chunk carried joined up: ``message.content``,
``message.thinking`` and ``message.tool_calls`` for chat, ``response`` and ``thinking`` for
generate, and ``logprobs`` for both. Everything else (``done_reason``, token counts, durations,
``context``) is the final chunk's, as the backend produced it.
"""

from __future__ import annotations

from typing import Any

import attrs

TEXT_FIELDS = ("content", "thinking")


@attrs.define
class StreamAssembler:
    chat: bool
    texts: dict[str, list[str]] = attrs.field(factory=dict)
    tool_calls: list[Any] = attrs.field(factory=list)
    logprobs: list[Any] = attrs.field(factory=list)
    role: str = "assistant"
    other: dict[str, Any] = attrs.field(factory=dict)  # extra message fields (e.g. images)
    final: dict[str, Any] | None = None
    chunks: int = 0  # chunks that carried text or tool calls (≈ tokens, for traces)

    def feed(self, chunk: dict[str, Any]) -> None:
        """Take one parsed line of the stream (not an ``{"error": ...}`` line)."""
        carried = False
        if self.chat:
            message = chunk.get("message")
            if isinstance(message, dict):
                role = message.get("role")
                if isinstance(role, str) and role:
                    self.role = role
                for key, value in message.items():
                    if key in TEXT_FIELDS and isinstance(value, str):
                        if value:
                            self.texts.setdefault(key, []).append(value)
                            carried = True
                    elif key == "tool_calls" and isinstance(value, list):
                        self.tool_calls.extend(value)
                        carried = carried or bool(value)
                    elif key not in ("role", *TEXT_FIELDS, "tool_calls"):
                        self.other[key] = value
        else:
            for key in ("response", "thinking"):
                value = chunk.get(key)
                if isinstance(value, str) and value:
                    self.texts.setdefault(key, []).append(value)
                    carried = True
        logprobs = chunk.get("logprobs")
        if isinstance(logprobs, list):
            self.logprobs.extend(logprobs)
        if carried:
            self.chunks += 1
        if chunk.get("done") is True:
            self.final = chunk

    @property
    def done(self) -> bool:
        return self.final is not None

    def result(self) -> dict[str, Any]:
        """The assembled object. Call once :attr:`done`."""
        assert self.final is not None
        out = dict(self.final)
        if self.chat:
            message: dict[str, Any] = {"role": self.role, "content": ""}
            message.update(self.other)
            for key in TEXT_FIELDS:
                if key in self.texts:
                    message[key] = "".join(self.texts[key])
            if self.tool_calls:
                message["tool_calls"] = self.tool_calls
            out["message"] = message
        else:
            out["response"] = "".join(self.texts.get("response", ()))
            if "thinking" in self.texts:
                out["thinking"] = "".join(self.texts["thinking"])
        if self.logprobs:
            out["logprobs"] = self.logprobs
        return out
