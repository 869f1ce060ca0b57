"""Reading what a node sends, with a limit.

Nothing a node sends is read whole without a bound: a misbehaving or hostile node must not be
able to grow the router's memory or stall its event loop. Bodies are read raw (the client asks
for no compression, and a compressed answer is refused rather than inflated), in chunks, and a
body past its limit fails with :class:`~herd.core.errors.NodeBadStatus` naming the limit.
"""

from __future__ import annotations

import json

import httpx

from herd.core.errors import NodeBadStatus

KiB = 1024
MiB = 2**20
ERROR_BODY_LIMIT = 64 * KiB  # an error answer: only its message is wanted
DETAIL_CHARS = 300  # of an error's text, in a message to the client
SHOW_LIMIT = 32 * MiB  # /api/show (verbose answers carry the tokenizer)
ANSWER_LIMIT = 64 * MiB  # one non-streamed answer (a chat reply, an image, a transcript)
EMBED_LIMIT = 256 * MiB  # embeddings of a large batch
LINE_LIMIT = 8 * MiB  # one line of a node's NDJSON stream


def check_encoding(response: httpx.Response, node_id: str) -> None:
    """Refuse a compressed answer: herd asks for none (``Accept-Encoding: identity``)."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise NodeBadStatus(
            f"node {node_id} sent a {encoding}-encoded answer though herd asked for none",
            node_id=node_id,
            upstream_status=response.status_code,
        )


async def read_limited(response: httpx.Response, limit: int, node_id: str, what: str) -> bytes:
    """Read the rest of a streamed ``response`` (opened with ``stream=True``), at most
    ``limit`` bytes. Raises :class:`NodeBadStatus` past the limit or for a compressed answer;
    transport errors propagate (see :func:`herd.transport.errors.map_node_errors`)."""
    check_encoding(response, node_id)
    parts: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > limit:
            raise NodeBadStatus(
                f"node {node_id} sent {what} over the {limit // MiB or 1} MiB limit"
                if limit >= MiB
                else f"node {node_id} sent {what} over the {limit // KiB} KiB limit",
                node_id=node_id,
                upstream_status=response.status_code,
            )
        parts.append(chunk)
    return b"".join(parts)


def error_text(raw: bytes) -> str:
    """The message of an error body: ``{"error": ...}`` (Ollama), ``{"error": {"message":
    ...}}`` (OpenAI), or the start of the text."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        if isinstance(message, str):
            return message[:DETAIL_CHARS]
        if isinstance(error, str):
            return error[:DETAIL_CHARS]
    return raw[:DETAIL_CHARS].decode("utf-8", "replace").strip()


async def error_detail(response: httpx.Response, node_id: str) -> str:
    """A short message from a failed answer, read with :data:`ERROR_BODY_LIMIT` (a longer one
    is cut, not read)."""
    if response.headers.get("content-encoding", "identity").strip().lower() not in (
        "",
        "identity",
    ):
        return f"HTTP {response.status_code} (a compressed body, not read)"
    parts: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        parts.append(chunk)
        size += len(chunk)
        if size >= ERROR_BODY_LIMIT:
            break
    text = error_text(b"".join(parts)[:ERROR_BODY_LIMIT])
    return text or f"HTTP {response.status_code}"
