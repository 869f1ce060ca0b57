"""herd's own HTTP/1.1 transport to nodes: h11 on trio sockets, a keep-alive pool per node.

:func:`herd.transport.client.upstream_client` puts it under the router's one
``httpx.AsyncClient``, so every call to a node (inference, ``/api/show``, pulls, fan-outs)
goes through it and keeps httpx's API, its exceptions and the client's policy (timeouts,
headers, no redirects). Plain ``http://`` only; anything else goes to httpx's own transport.

Why not httpx's default (httpcore): it keeps one pool for every node, and on every request it
walks all its connections (quadratic bookkeeping, a ``poll()`` of each idle socket), writes a
request's head and body in two sends, and yields each parsed chunk of an answer on its own.
Here, per request and per read:

- **One pool per node** (host and port): a request takes that node's most recently used idle
  connection (checked with one ``poll()`` of that socket alone: a connection the node has
  closed, or that has data it never asked for, is dropped) or opens a new one. Idle
  connections close after :data:`KEEPALIVE_EXPIRY` seconds; at most :data:`KEEPALIVE_PER_NODE`
  stay idle per node and :data:`KEEPALIVE_TOTAL` in all. There is no cap on connections in
  use: the queue book already bounds what each node is sent.
- **One send per request** whose body is bytes (head and body together); a streamed body
  (blob uploads) is sent as it comes.
- **One chunk per read**: an answer's body is yielded once per socket read, every HTTP chunk
  that read completed joined, not once per chunk the parser found. A relay then sends what
  arrived together in one send.

Timeouts come from the request (the client's ``httpx.Timeout``): connect and write bounded,
each read bounded only if the request says so. Failures raise httpx's own exceptions
(``ConnectError``, ``ConnectTimeout``, ``WriteError``, ``WriteTimeout``, ``ReadError``,
``ReadTimeout``, ``RemoteProtocolError``), which :func:`herd.transport.errors.map_node_errors`
maps to herd's. A connection is reused only after a whole exchange both sides left open; one
cancelled, failed or closed half-way is closed.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import h11
import httpx
import trio

READ_SIZE = 65536
MAX_HEAD = 100 * 1024  # bytes of a response's status line and headers (as httpcore allows)
KEEPALIVE_EXPIRY = 5.0  # seconds an idle connection is kept
KEEPALIVE_PER_NODE = 64
KEEPALIVE_TOTAL = 256
SWEEP_EVERY = 1.0  # seconds between sweeps of every node's expired idle connections

Origin = tuple[str, int]


@attrs.define(eq=False)
class _Connection:
    stream: trio.SocketStream
    protocol: h11.Connection
    idle_since: float = 0.0

    def close(self) -> None:
        """Close at once (synchronous: safe while cancelled)."""
        self.stream.socket.close()


def _timeout(request: httpx.Request, name: str) -> float | None:
    value = request.extensions.get("timeout", {}).get(name)
    return float(value) if value is not None else None


async def _read(connection: _Connection, request: httpx.Request, limit: float | None) -> None:
    try:
        if limit is None:
            data = await connection.stream.receive_some(READ_SIZE)
        else:
            with trio.fail_after(limit):
                data = await connection.stream.receive_some(READ_SIZE)
    except trio.TooSlowError as exc:
        raise httpx.ReadTimeout("no data from the node in time", request=request) from exc
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
    try:
        connection.protocol.receive_data(data)
    except h11.RemoteProtocolError as exc:
        raise httpx.RemoteProtocolError(str(exc), request=request) from exc


def _next_event(connection: _Connection, request: httpx.Request) -> Any:
    try:
        return connection.protocol.next_event()
    except h11.RemoteProtocolError as exc:
        raise httpx.RemoteProtocolError(str(exc), request=request) from exc


async def _write(
    connection: _Connection, data: bytes, request: httpx.Request, limit: float | None
) -> None:
    try:
        with trio.fail_after(math.inf if limit is None else limit):
            await connection.stream.send_all(data)
    except trio.TooSlowError as exc:
        raise httpx.WriteTimeout(
            "the node did not take the request in time", request=request
        ) from exc
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise httpx.WriteError(str(exc) or type(exc).__name__, request=request) from exc


def _encode(connection: _Connection, event: Any, request: httpx.Request) -> bytes:
    try:
        return connection.protocol.send(event) or b""
    except h11.LocalProtocolError as exc:
        raise httpx.LocalProtocolError(str(exc), request=request) from exc


class _Body(httpx.AsyncByteStream):
    """An answer's body, one chunk per socket read; gives its connection back when whole."""

    def __init__(
        self,
        transport: NodeTransport,
        origin: Origin,
        connection: _Connection,
        request: httpx.Request,
    ) -> None:
        self._transport = transport
        self._origin = origin
        self._connection: _Connection | None = connection
        self._request = request
        self._timeout = _timeout(request, "read")

    def __aiter__(self) -> _Body:
        return self  # an iterator object, not an async generator: nothing left to finalize

    async def __anext__(self) -> bytes:
        connection = self._connection
        if connection is None:
            raise StopAsyncIteration
        request = self._request
        parts: list[bytes] = []
        try:
            while True:
                event = _next_event(connection, request)
                kind = type(event)
                if kind is h11.Data:
                    parts.append(event.data)
                elif event is h11.NEED_DATA:
                    if parts:
                        return parts[0] if len(parts) == 1 else b"".join(parts)
                    await _read(connection, request, self._timeout)
                elif kind is h11.EndOfMessage:
                    break
                else:  # ConnectionClosed (or PAUSED, which a client never sees here)
                    raise httpx.RemoteProtocolError(
                        "the node closed the connection before the answer's end", request=request
                    )
        except BaseException:
            self._close()
            raise
        self._connection = None
        self._transport._release(self._origin, connection)
        if parts:
            return parts[0] if len(parts) == 1 else b"".join(parts)
        raise StopAsyncIteration

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def aclose(self) -> None:
        self._close()  # not read to its end: the connection can't be reused


@attrs.define(eq=False)
class NodeTransport(httpx.AsyncBaseTransport):
    """See the module docstring. Owned by the router's client (closed with it)."""

    keepalive_expiry: float = KEEPALIVE_EXPIRY
    keepalive_per_node: int = KEEPALIVE_PER_NODE
    keepalive_total: int = KEEPALIVE_TOTAL
    _idle: dict[Origin, list[_Connection]] = attrs.field(factory=dict)
    _idle_count: int = 0
    _swept_at: float = -math.inf
    _closed: bool = False
    # Schemes other than http (https): httpx's own transport, made when first needed.
    _other: httpx.AsyncHTTPTransport | None = None

    def statistics(self) -> dict[str, int]:
        return {"idle": self._idle_count, "nodes_with_idle": len(self._idle)}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            if self._other is None:
                self._other = httpx.AsyncHTTPTransport(trust_env=False)
            return await self._other.handle_async_request(request)
        origin = (url.host, url.port or 80)
        connection = self._take(origin)
        if connection is None:
            connection = await self._connect(origin, request)
        try:
            await self._send(connection, request)
            head = await self._head(connection, request)
        except BaseException:
            connection.close()
            raise
        return httpx.Response(
            status_code=head.status_code,
            headers=head.headers.raw_items(),
            stream=_Body(self, origin, connection, request),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": head.reason},
        )

    async def _connect(self, origin: Origin, request: httpx.Request) -> _Connection:
        timeout = _timeout(request, "connect")
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                stream = await trio.open_tcp_stream(*origin)
        except trio.TooSlowError as exc:
            raise httpx.ConnectTimeout(
                f"no connection to {origin[0]}:{origin[1]} within {timeout:g} s", request=request
            ) from exc
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        return _Connection(stream, h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD))

    async def _send(self, connection: _Connection, request: httpx.Request) -> None:
        timeout = _timeout(request, "write")
        head = _encode(
            connection,
            h11.Request(
                method=request.method, target=request.url.raw_path, headers=request.headers.raw
            ),
            request,
        )
        try:
            body: bytes | None = request.content
        except httpx.RequestNotRead:
            body = None
        if body is not None:
            data = head + (_encode(connection, h11.Data(data=body), request) if body else b"")
            await _write(
                connection,
                data + _encode(connection, h11.EndOfMessage(), request),
                request,
                timeout,
            )
            return
        await _write(connection, head, request, timeout)
        assert isinstance(request.stream, httpx.AsyncByteStream)
        async for part in request.stream:
            if part:
                await _write(
                    connection, _encode(connection, h11.Data(data=part), request), request, timeout
                )
        await _write(connection, _encode(connection, h11.EndOfMessage(), request), request, timeout)

    async def _head(self, connection: _Connection, request: httpx.Request) -> h11.Response:
        timeout = _timeout(request, "read")
        while True:
            event = _next_event(connection, request)
            if event is h11.NEED_DATA:
                await _read(connection, request, timeout)
            elif isinstance(event, h11.Response):
                return event
            elif isinstance(event, h11.InformationalResponse):
                continue
            else:
                raise httpx.RemoteProtocolError(
                    "the node closed the connection without an answer", request=request
                )

    def _take(self, origin: Origin) -> _Connection | None:
        """The node's most recently used idle connection that is still good, if any."""
        idle = self._idle.get(origin)
        now = trio.current_time()
        while idle:
            connection = idle.pop()
            self._idle_count -= 1
            if now - connection.idle_since >= self.keepalive_expiry or (
                connection.stream.socket.is_readable()
            ):
                connection.close()  # expired, closed by the node, or sent what nobody asked
                continue
            if not idle:
                del self._idle[origin]
            return connection
        self._idle.pop(origin, None)
        return None

    def _release(self, origin: Origin, connection: _Connection) -> None:
        """An exchange ended whole: keep the connection for the next, or close it."""
        protocol = connection.protocol
        if (
            self._closed
            or protocol.our_state is not h11.DONE
            or protocol.their_state is not h11.DONE
        ):
            connection.close()
            return
        now = trio.current_time()
        if now - self._swept_at >= SWEEP_EVERY:
            self._sweep(now)
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= self.keepalive_per_node or self._idle_count >= self.keepalive_total:
            if not idle:
                del self._idle[origin]
            connection.close()
            return
        protocol.start_next_cycle()
        connection.idle_since = now
        idle.append(connection)
        self._idle_count += 1

    def _sweep(self, now: float) -> None:
        """Close every node's expired idle connections (oldest first in each list)."""
        self._swept_at = now
        for origin in list(self._idle):
            idle = self._idle[origin]
            while idle and now - idle[0].idle_since >= self.keepalive_expiry:
                idle.pop(0).close()
                self._idle_count -= 1
            if not idle:
                del self._idle[origin]

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
        self._idle_count = 0
        if self._other is not None:
            await self._other.aclose()
