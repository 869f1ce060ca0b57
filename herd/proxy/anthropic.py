"""Anthropic Messages ⇄ Ollama translation (``POST /v1/messages``). Pure: no I/O, no clock.

Placeholder: filled in by the Anthropic Messages work (issue #14).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from herd.errors import BadRequest
from herd.proxy import chat


def shape(body: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """A Messages body → (the ``/api/chat`` body, this module's view of the request)."""
    raise BadRequest("the Anthropic Messages API is not available yet")


def stream_translator(
    request: Any, request_id: str, created: int, model: str
) -> chat.StreamTranslator:
    """The translator of this API's stream."""
    raise NotImplementedError


def whole_answer(
    request: Any, data: dict[str, Any], request_id: str, created: int, model: str
) -> tuple[dict[str, Any], Any]:
    """This API's one answer object for a folded Ollama answer, and what to keep of it."""
    raise NotImplementedError


def stream_error(message: str) -> bytes:
    """The end of this API's stream when it fails mid-way (after its first event)."""
    raise NotImplementedError


def count_tokens(body: Mapping[str, Any]) -> dict[str, Any]:
    """``POST /v1/messages/count_tokens``: ``{"input_tokens": N}``, an estimate."""
    raise BadRequest("the Anthropic Messages API is not available yet")
