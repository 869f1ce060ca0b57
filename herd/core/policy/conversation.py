"""Conversation identity: a key for every prefix of a chat's messages.

A backend (Ollama, llama.cpp) keeps the prompt it last processed in its KV cache, so the next
turn of the same conversation, which repeats that prompt and adds to it, skips most of its
prefill on the node that served the turn before. To find that node the router keys every
message prefix: ``keys[i]`` names ``messages[: i + 1]``, built as a chain of hashes, so one pass
over the messages gives all of them. Pure: no I/O, no clock.

Cheap on purpose (every chat request pays for it): a message's text fields are hashed as they
are, not serialised to JSON first, and an image (base64, often megabytes) counts by a digest
of its length and its two ends. Two different images that share length and ends would share a
key: the cost is a routing hint (which node's cache to prefer), never a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

# How far back a continuing turn may reach for its earlier prompt: the previous prompt, then
# the assistant's answer and the new user message (3), or a tool call and its result (more).
LOOKBACK = 6


IMAGE_ENDS = 64  # characters of each end of an image that its digest reads


def _image(value: object) -> str:
    if isinstance(value, str) and len(value) > 4 * IMAGE_ENDS:
        return f"{len(value)}:{value[:IMAGE_ENDS]}:{value[-IMAGE_ENDS:]}"
    return str(value)


def _dump(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _message_text(message: object) -> str:
    """What identifies one message: its fields in key order, strings as they are."""
    if not isinstance(message, dict):
        return _dump(message)
    parts = []
    for key in sorted(message, key=str):
        value = message[key]
        if key == "images" and isinstance(value, list):
            value = [_image(image) for image in value]
        parts.append(f"{key}\x1f{value if isinstance(value, str) else _dump(value)}")
    return "\x1e".join(parts)


def prefix_keys(messages: Sequence[object]) -> list[str]:
    """One key per prefix of ``messages`` (any JSON values). Raises nothing for JSON data."""
    keys: list[str] = []
    chain = b""
    for message in messages:
        text = _message_text(message).encode("utf-8", "surrogatepass")
        chain = hashlib.blake2b(chain + text, digest_size=16).digest()
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
