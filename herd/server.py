"""Serving an ASGI app in-process: hypercorn's HTTP/1.1 and WebSocket protocol handling, behind
herd's own accept loop.

hypercorn parses and answers each connection (``TCPServer``); herd accepts the connections
itself, so it can say no before a connection costs anything:

- **Per client address**, at most ``max_per_client`` connections at once; one more is answered
  ``503`` (``Connection: close``, ``Retry-After``, a JSON error naming the limit) and closed.
- **In all**, at most enough connections to leave ``fd_headroom`` file descriptors free (each
  proxied request also holds a connection to a node, and the store, the logs and the nodes'
  sockets need theirs); beyond it, the same refusal.
- **When accept fails for lack of descriptors** (EMFILE, ENFILE, ENOBUFS, ENOMEM), the loop
  backs off (50 ms doubling to 1 s) instead of spinning, and logs it once a minute.
- **Idle connections** close after ``keep_alive_timeout`` (75 s) between requests, and at once
  after a response to ``Connection: close`` or HTTP/1.0 (see :class:`FinishResponses`).

A port that can't be had (in use, privileged, an address not of this machine) is a
:class:`ListenError` naming the address, raised from :func:`serve_app` before it has started;
the CLI prints it as one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

log = logging.getLogger("herd.http")

ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BACKOFF_FIRST, BACKOFF_MAX = 0.05, 1.0
REPORT_EVERY = 60.0
REFUSE_TIMEOUT = 2.0
FINISH_TIMEOUT = 5.0


class ListenError(Exception):
    """The server could not listen on its address. ``errno`` is the socket error's."""

    def __init__(self, host: str, port: int, error: OSError) -> None:
        self.host = host
        self.port = port
        self.errno = error.errno
        shown = f"[{host}]" if ":" in host else host
        if error.errno == errno.EADDRINUSE:
            reason = "the address is already in use"
        elif error.errno == errno.EACCES:
            reason = "permission denied (ports below 1024 need root)"
        elif error.errno == errno.EADDRNOTAVAIL:
            reason = f"{host} is not an address of this machine"
        else:
            reason = error.strerror or (os.strerror(error.errno) if error.errno else str(error))
        super().__init__(f"cannot listen on {shown}:{port}: {reason}")


def _listening_sockets(config: Config, host: str, port: int) -> Any:
    """hypercorn's sockets for ``config``, bound and listening; :class:`ListenError` if not."""
    try:
        sockets = config.create_sockets()
    except OSError as exc:
        raise ListenError(host, port, exc) from exc
    try:
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)
    except OSError as exc:
        for sock in sockets.insecure_sockets:
            sock.close()
        raise ListenError(host, port, exc) from exc
    return sockets


def hypercorn_config(host: str, port: int, idle_timeout: float = 75.0) -> Config:
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("herd.http")
    # Also the deadline for a request's line and headers: hypercorn's keep-alive timer runs
    # from connecting (or the last response) until a whole request head has arrived, and
    # trickled bytes don't reset it, so a slowloris client is cut after this long. Bodies have
    # their own deadline (--body-timeout). read_timeout stays unset: hypercorn applies it to
    # every read, including the silence while a client reads a long streamed answer, which it
    # would cut (tests/test_security.py shows both).
    config.keep_alive_timeout = idle_timeout
    config.backlog = 2048  # bursts of hundreds of clients must not be reset at connect
    config.graceful_timeout = 5
    config.h11_max_incomplete_size = 16 * 1024  # request line + headers; 431 beyond
    config.websocket_max_message_size = 8 * 2**20
    return config


@attrs.frozen
class ConnectionLimits:
    max_per_client: int = 512
    fd_headroom: int = 256
    idle_timeout: float = 75.0


def open_file_limit() -> int:
    """This process's soft limit on open files (a large number where there is none)."""
    try:
        import resource
    except ImportError:  # Windows
        return 1 << 20
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else int(soft)


@attrs.define(eq=False)
class Doorkeeper:
    """Decides, synchronously, whether a new connection may stay; counts the ones that do."""

    limits: ConnectionLimits
    max_total: int
    open: int = 0
    by_client: dict[str, int] = attrs.field(factory=dict)
    refused: int = 0

    def admit(self, client: str) -> str | None:
        """None: admitted (now counted). Else the reason for refusing it."""
        if self.by_client.get(client, 0) >= self.limits.max_per_client:
            return (
                f"too many connections from {client} (the limit is "
                f"{self.limits.max_per_client} per client address); close idle ones"
            )
        if self.open >= self.max_total:
            return f"the router is at its connection limit ({self.max_total}); try again shortly"
        self.open += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1
        return None

    def release(self, client: str) -> None:
        self.open -= 1
        left = self.by_client[client] - 1
        if left:
            self.by_client[client] = left
        else:
            del self.by_client[client]


def local_url(bind: str) -> str:
    """Turn a bind like ``http://0.0.0.0:11435`` into a URL this machine can call."""
    scheme, _, address = bind.partition("://")
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "[::]", ""):
        host = "127.0.0.1"
    return f"{scheme}://{host}:{port}"


def _peer(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    return str(address[0]) if isinstance(address, tuple) else str(address)


async def _refuse(stream: trio.SocketStream, reason: str) -> None:
    body = json.dumps({"error": reason}).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: 5\r\nconnection: close\r\n\r\n"
    ).encode()
    with (
        trio.move_on_after(REFUSE_TIMEOUT),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
    ):
        await stream.send_all(head + body)
    with trio.CancelScope(shield=True):
        await stream.aclose()


async def _accept_loop(
    listener: trio.abc.Listener[trio.SocketStream],
    nursery: trio.Nursery,
    serve_one: Callable[[trio.abc.HalfCloseableStream], Any],
    doors: Doorkeeper,
) -> None:
    backoff = BACKOFF_FIRST
    reported = -math.inf
    failures = 0
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            failures += 1
            now = trio.current_time()
            if now - reported >= REPORT_EVERY:
                log.error(
                    "cannot accept connections: %s (%d times so far); backing off. Raise the "
                    "open-file limit (ulimit -n) or lower --max-connections-per-client",
                    errno.errorcode.get(exc.errno or 0, exc),
                    failures,
                )
                reported = now
            await trio.sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)
            continue
        backoff = BACKOFF_FIRST
        client = _peer(stream)
        reason = doors.admit(client)
        if reason is not None:
            doors.refused += 1
            nursery.start_soon(_refuse, stream, reason)
            continue
        nursery.start_soon(_serve_counted, serve_one, stream, client, doors)


def _head_waits_for_body(data: bytes | bytearray | memoryview) -> bool:
    """Is ``data`` a whole response head announcing a body of known, non-zero length? Its body
    is the next thing the app sends (or, for HEAD, the end of the response)."""
    if data[:9] != b"HTTP/1.1 " or data[-4:] != b"\r\n\r\n" or data[9:10] == b"1":
        return False
    head = bytes(data).lower()
    return b"\r\ncontent-length: " in head and b"\r\ncontent-length: 0\r\n" not in head


class OrderedSends(trio.abc.HalfCloseableStream):
    """A socket stream whose ``send_all`` and ``send_eof`` wait for each other. hypercorn
    closes a connection (``send_eof``) without waiting for a send another of its tasks has
    under way (an error answer to pipelined data, say); trio refuses the overlap with
    BusyResourceError, and the answer in flight is lost.

    It also saves a send per answer of known length: hypercorn writes a response's head, its
    body and its end in separate sends. A head that announces a body (``Content-Length`` > 0)
    is held and goes out with the next send (the body, or the empty end of a HEAD answer; at
    the latest with ``send_eof``); an empty send (the end of a body of known length) costs
    nothing."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.socket = stream.socket
        self._sending = trio.Lock()
        self._held = b""

    async def _lock(self) -> None:
        """Take the send lock; without a pass through the scheduler when it is free (the
        socket send that follows has one of its own)."""
        try:
            self._sending.acquire_nowait()
        except trio.WouldBlock:
            await self._sending.acquire()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._lock()
        try:
            if self._held:
                data, self._held = self._held + bytes(data), b""
            elif _head_waits_for_body(data):
                self._held = bytes(data)
                return
            if data:
                await self.stream.send_all(data)
        finally:
            self._sending.release()

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        async with self._sending:
            if self._held:
                data, self._held = self._held, b""
                await self.stream.send_all(data)
            await self.stream.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def _serve_counted(
    serve_one: Callable[[trio.abc.HalfCloseableStream], Any],
    stream: trio.SocketStream,
    client: str,
    doors: Doorkeeper,
) -> None:
    try:
        await serve_one(OrderedSends(stream))
    finally:
        doors.release(client)
        # hypercorn closes the stream itself, unless it is cancelled half-way through (the
        # server stopping): then this does.
        with trio.CancelScope(shield=True):
            await stream.aclose()


class FinishResponses:
    """ASGI wrapper for a Quart-Trio app: the last ``send`` of each response runs shielded
    from cancellation, within :data:`FINISH_TIMEOUT`.

    Why: when a response is the last on its connection (``Connection: close``, HTTP/1.0),
    hypercorn closes the socket *inside* that last send, and when it isn't, it starts the idle
    timer there; meanwhile it tells the app the exchange is over, and Quart-Trio cancels its
    request nursery. Unshielded, the cancellation lands half-way through hypercorn's work: the
    socket stays open (a client that asked to close waits; idle sockets pile up with no timer).
    The router wraps its inference paths in it too: a router stopping just as the last bytes go
    out would otherwise cancel the request after the client has its whole answer, and record
    it as failed.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def finishing_send(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                with trio.CancelScope(shield=True), trio.move_on_after(FINISH_TIMEOUT):
                    await send(message)
                return
            await send(message)

        await self.app(scope, receive, finishing_send)


async def serve_app(
    app: Any,
    host: str,
    port: int,
    limits: ConnectionLimits | None = None,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled; ``task_status.started`` gets the URL to reach it.
    Raises :class:`ListenError` if it can't listen (before it has started)."""
    limits = limits or ConnectionLimits()
    config = hypercorn_config(host, port, limits.idle_timeout)
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    doors = Doorkeeper(limits, max(16, (open_file_limit() - limits.fd_headroom) // 2))
    sockets = _listening_sockets(config, host, port)
    listeners = [
        trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        for sock in sockets.insecure_sockets
    ]
    serve_one = partial(TCPServer, wrapped, config, context, ConnectionState(lifespan_state))
    try:
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            async with trio.open_nursery() as connections:
                for listener in listeners:
                    connections.start_soon(_accept_loop, listener, connections, serve_one, doors)
                address = sockets.insecure_sockets[0].getsockname()
                task_status.started(local_url(f"http://{_bind_text(address)}"))
                try:
                    await trio.sleep_forever()
                finally:
                    await context.terminated.set()
            lifespan_nursery.cancel_scope.cancel()
    finally:
        for listener in listeners:
            with trio.CancelScope(shield=True):
                await listener.aclose()


def _bind_text(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
