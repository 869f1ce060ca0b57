"""The node's calls to its own backend: the timeout policy, the bounded reads, the error
mapping, the closing.

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

Nothing the backend sends is held without a bound (the limits are :mod:`herd.core.bodies`, the
router's own): a whole answer is read with :func:`read_body` (up to its limit), a stream with
:func:`read_lines` (each line up to :data:`~herd.core.bodies.LINE_LIMIT`), an error body with
:func:`error_detail` (its first 64 KiB, for the message). Past a limit the read raises
:class:`~herd.core.errors.NodeBadStatus` naming it (``the backend sent a line over the 8 MiB
limit``). The client asks for no compression (``Accept-Encoding: identity``); a backend that
compresses anyway is inflated step by step and counted inflated, so a gzip bomb costs no more
than the limit it runs into. The LAN proxy holds nothing: it passes the backend's bytes on as
they come (asking for identity too) and the router reads them with the same limits.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx
import trio

from herd.core.bodies import (
    ERROR_BODY_LIMIT,
    LINE_LIMIT,
    Collector,
    Inflater,
    LineSplitter,
    error_text,
)
from herd.core.errors import NodeBadStatus, NodeError, NodeTimeout, NodeUnreachable

BACKEND_TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=30.0, pool=None)
CLOSE_TIMEOUT = 1.0  # seconds allowed to close a backend response after cancellation
SOURCE = "the backend"  # who sent it, in the messages of the bounded reads
IDENTITY = {"Accept-Encoding": "identity"}  # no compression, please

# The request's exit stack, set by closing_backend_responses; None outside one.
_request_exits: contextvars.ContextVar[contextlib.AsyncExitStack | None] = contextvars.ContextVar(
    "herd_node_request_exits", default=None
)


def backend_client() -> httpx.AsyncClient:
    """The node's one client for its backend (and its media servers); see the module
    docstring for the timeouts. No connection limit: the router already limits how many
    requests each node gets at once. It asks for no compression (see the module docstring)."""
    return httpx.AsyncClient(
        timeout=BACKEND_TIMEOUT,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        headers=IDENTITY,
        trust_env=False,
    )


def _inflater(response: httpx.Response) -> Inflater:
    return Inflater(response.headers.get("content-encoding", ""), SOURCE)


async def read_body(response: httpx.Response, limit: int, what: str) -> bytes:
    """The rest of ``response`` (opened with ``stream=True``), at most ``limit`` bytes
    (inflated, if the backend compressed it). Raises :class:`NodeBadStatus` past the limit, for
    an encoding herd doesn't read, or a corrupt one; httpx errors propagate."""
    inflater = _inflater(response)
    body = Collector(limit, SOURCE, what, response.status_code)
    async for chunk in response.aiter_raw():
        for piece in inflater.feed(chunk):
            body.add(piece)
    inflater.end()
    return body.value()


async def read_lines(
    response: httpx.Response, limit: int = LINE_LIMIT
) -> AsyncGenerator[bytes, None]:
    """The lines of ``response``'s stream (without ``\\n``; the last one even if
    unterminated), each at most ``limit`` bytes. Raises as :func:`read_body` does. Use it under
    ``contextlib.aclosing``."""
    inflater = _inflater(response)
    splitter = LineSplitter(limit, SOURCE)
    async for chunk in response.aiter_raw():
        for piece in inflater.feed(chunk):
            for line in splitter.feed(piece):
                yield line
    inflater.end()
    if rest := splitter.rest():
        yield rest


async def error_detail(response: httpx.Response) -> str:
    """A short message from a failed answer: its first :data:`ERROR_BODY_LIMIT` bytes are read
    (inflated), the rest is not. A body herd can't read is named, not read; httpx errors
    propagate."""
    try:
        inflater = _inflater(response)
    except NodeBadStatus as exc:
        return f"HTTP {response.status_code} ({exc.message})"
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_raw():
            for piece in inflater.feed(chunk):
                parts.append(piece)
                size += len(piece)
                if size >= ERROR_BODY_LIMIT:
                    break
            if size >= ERROR_BODY_LIMIT:
                break
    except NodeBadStatus:
        pass  # a corrupt compressed body: what came before it is the message
    text = error_text(b"".join(parts)[:ERROR_BODY_LIMIT])
    return text or f"HTTP {response.status_code}"


async def fetch(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    limit: int,
    what: str,
    **options: Any,
) -> tuple[int, bytes]:
    """One whole request to the backend: (status, body). A body over ``limit`` raises
    :class:`NodeBadStatus`; a failed answer's (4xx, 5xx) body is its :func:`error_detail`,
    encoded. ``options`` go to ``client.build_request`` (``json``, ``data``, ``files``,
    ``timeout``). httpx errors propagate; the response is closed however it ends."""
    response = await client.send(client.build_request(method, url, **options), stream=True)
    try:
        if response.status_code >= 400:
            return response.status_code, (await error_detail(response)).encode()
        return response.status_code, await read_body(response, limit, what)
    finally:
        await close_shielded(response)


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
    with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT):
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
