"""Transport failures → herd's error tree, in one place.

``httpx`` raises :class:`httpx.TransportError` subclasses (connect errors, protocol errors,
read errors, timeouts of its own); herd's callers want a :class:`~herd.core.errors.NodeError` that
names the node, says what was happening, and keeps the exception's type::

    with map_node_errors(node_id, "before the first byte"):
        response = await client.send(request, stream=True)

A failure to connect (or an httpx connect/pool timeout) is :class:`NodeUnreachable`; any other
transport error is :class:`NodeUnreachable` too (the connection broke), with the phase in the
message. Timeouts decided by herd itself are cancel scopes at the policy site, not mapped here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx

from herd.core.errors import NodeUnreachable


def describe(exc: BaseException) -> str:
    """``TypeName: first line of the message`` (no request headers, no tracebacks)."""
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return type(exc).__name__ + (f": {detail[:200]}" if detail else "")


@contextlib.contextmanager
def map_node_errors(node_id: str, phase: str) -> Iterator[None]:
    """Raise :class:`NodeUnreachable` from any ``httpx`` transport error inside the block."""
    try:
        yield
    except httpx.TransportError as exc:
        raise NodeUnreachable(
            f"node {node_id} failed {phase}: {describe(exc)}", node_id=node_id
        ) from exc
    except httpx.InvalidURL as exc:
        raise NodeUnreachable(
            f"node {node_id} advertises an unusable URL: {describe(exc)}", node_id=node_id
        ) from exc
