"""Reading what a node sends, with a limit.

Nothing a node sends is read whole without a bound: a misbehaving or hostile node must not be
able to grow the router's memory or stall its event loop. Bodies are read raw (the client asks
for no compression, and a compressed answer is refused rather than inflated), in chunks, and a
body past its limit fails with :class:`~herd.core.errors.NodeBadStatus` naming the limit. The
limits and the pure pieces are :mod:`herd.core.bodies`, shared with the node agent's reads of
its backend.
"""

from __future__ import annotations

import httpx

from herd.core.bodies import (
    ANSWER_LIMIT,
    DETAIL_CHARS,
    EMBED_LIMIT,
    ERROR_BODY_LIMIT,
    LINE_LIMIT,
    SHOW_LIMIT,
    Collector,
    JsonLines,
    KiB,
    MiB,
    error_text,
)
from herd.core.errors import NodeBadStatus

__all__ = [
    "ANSWER_LIMIT",
    "DETAIL_CHARS",
    "EMBED_LIMIT",
    "ERROR_BODY_LIMIT",
    "LINE_LIMIT",
    "SHOW_LIMIT",
    "JsonLines",
    "KiB",
    "MiB",
    "check_encoding",
    "error_detail",
    "error_text",
    "read_limited",
]


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
    body = Collector(limit, f"node {node_id}", what, response.status_code)
    try:
        async for chunk in response.aiter_raw():
            body.add(chunk)
    except NodeBadStatus as exc:
        exc.node_id = node_id
        raise
    return body.value()


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
