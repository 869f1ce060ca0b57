"""The node's calls to its own backend: the timeout policy, the error mapping, the closing.

The node serves what the router sends it (the LAN proxy, the OpenAI-compatible facade) and
leaves the judging of time to the router, as the router's own upstream client does: connecting
is bounded (``connect``), and so is sending a body (``write``), but waiting for an answer is not
(``read=None``: a cold load or a long CPU prefill may take minutes before the first byte), and
neither is waiting for a pooled connection (the router bounds concurrency per node). The router
judges the first byte with its ``first_byte_timeout`` and gives up by closing its connection to
the node; the node's app is cancelled then and closes its backend request in turn:
:func:`closing_backend_responses`, around each request, makes sure of it. Probes are different:
they pass their own short timeouts per request (``herd.node.backend``).

:func:`backend_error` maps any httpx failure to herd's error tree (:mod:`herd.core.errors`),
with the exception's type in the message.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncIterator

import httpx
import trio

from herd.core.errors import NodeBadStatus, NodeError, NodeTimeout, NodeUnreachable

BACKEND_TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=30.0, pool=None)
CLOSE_TIMEOUT = 1.0  # seconds allowed to close a backend response after cancellation

# The request's exit stack, set by closing_backend_responses; None outside one.
_request_exits: contextvars.ContextVar[contextlib.AsyncExitStack | None] = contextvars.ContextVar(
    "herd_node_request_exits", default=None
)


def backend_client() -> httpx.AsyncClient:
    """The node's one client for its backend (and its media servers); see the module
    docstring for the timeouts. No connection limit: the router already limits how many
    requests each node gets at once."""
    return httpx.AsyncClient(
        timeout=BACKEND_TIMEOUT,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        trust_env=False,
    )


def describe(exc: BaseException) -> str:
    """``ConnectError: [Errno 111] Connection refused`` (the type alone when it says nothing)."""
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return type(exc).__name__ + (f": {detail}" if detail else "")


def backend_error(exc: httpx.HTTPError, *, mid_stream: bool = False) -> NodeError:
    """The :class:`NodeError` for a failed call to the backend, naming the exception's type:
    ``backend unreachable: ConnectError: ...``, or ``backend broke the stream: ReadError``
    once part of the answer has gone out."""
    what = describe(exc)
    if isinstance(exc, httpx.TimeoutException):
        return NodeTimeout(f"backend {'stalled mid-stream' if mid_stream else 'timed out'}: {what}")
    if isinstance(exc, httpx.TransportError):
        return NodeUnreachable(
            f"backend {'broke the stream' if mid_stream else 'unreachable'}: {what}"
        )
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return NodeBadStatus(f"backend answered {status}: {what}", upstream_status=status)
    return NodeError(f"backend failed: {what}")


async def close_shielded(response: httpx.Response) -> None:
    """Close ``response`` even while being cancelled (the client left): an unread response
    is closed by dropping its connection, which the backend sees as the client leaving."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
        await response.aclose()


@contextlib.asynccontextmanager
async def closing_backend_responses() -> AsyncIterator[None]:
    """Around one request: the backend responses it opened (:func:`close_when_done`) are closed
    when it ends, however it ends. A body generator's ``finally`` closes its response when the
    body is sent, fails or is cancelled mid-way; but a client that leaves while the headers are
    being written cancels the request before the body is ever started, and an unstarted
    generator runs no ``finally``."""
    async with contextlib.AsyncExitStack() as stack:
        token = _request_exits.set(stack)
        try:
            yield
        finally:
            _request_exits.reset(token)


def close_when_done(response: httpx.Response) -> None:
    """Close ``response`` when the current request ends (see
    :func:`closing_backend_responses`; outside it, the caller alone closes it)."""
    stack = _request_exits.get()
    if stack is not None:
        stack.push_async_callback(close_shielded, response)
