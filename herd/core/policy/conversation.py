"""Conversation identity: a key for every prefix of a chat's messages.

A backend (Ollama, llama.cpp) keeps the prompt it last processed in its KV cache, so the next
turn of the same conversation, which repeats that prompt and adds to it, skips most of its
prefill on the node that served the turn before. To find that node the router keys every
message prefix: ``keys[i]`` names ``messages[: i + 1]``, built as a chain of hashes, so one pass
over the messages gives all of them. Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

# How far back a continuing turn may reach for its earlier prompt: the previous prompt, then
# the assistant's answer and the new user message (3), or a tool call and its result (more).
LOOKBACK = 6


def prefix_keys(messages: Sequence[object]) -> list[str]:
    """One key per prefix of ``messages`` (any JSON values). Raises nothing for JSON data."""
    keys: list[str] = []
    chain = b""
    for message in messages:
        text = json.dumps(message, sort_keys=True, separators=(",", ":"), default=str)
        chain = hashlib.blake2b(chain + text.encode(), digest_size=16).digest()
        keys.append(chain.hex())
    return keys


def continuation_keys(messages: Sequence[object], keys: Sequence[str]) -> list[str]:
    """The keys under which an earlier turn of this conversation may have been remembered,
    longest prefix first: the whole prompt (a repeat), then up to :data:`LOOKBACK` shorter ones.
    A prefix of only system messages is skipped: many conversations share one system prompt,
    and it is not a conversation of its own."""
    out = []
    for index in range(len(keys) - 1, max(-1, len(keys) - 1 - LOOKBACK), -1):
        if _only_system(messages[: index + 1]):
            break
        out.append(keys[index])
    return out


def _only_system(messages: Sequence[object]) -> bool:
    return all(isinstance(m, dict) and m.get("role") == "system" for m in messages)
