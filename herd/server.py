"""Serving an ASGI app in-process: hypercorn's HTTP/1.1 and WebSocket protocol handling, behind
herd's own accept loop.

hypercorn parses and answers each connection (``TCPServer``); herd accepts the connections
itself, so it can say no before a connection costs anything:

- **Per client address**, at most ``max_per_client`` connections at once; one more is answered
  ``503`` (``Connection: close``, ``Retry-After``, a JSON error naming the limit) and closed.
- **In all**, at most enough connections to leave ``fd_headroom`` file descriptors free (each
  proxied request also holds a connection to a node, and the store and the logs need theirs),
  or ``max_total`` when given. Then ``reserve`` more are taken, for the fleet and its
  operators only: a connection taken into the reserve (:meth:`Doorkeeper.in_reserve`) serves
  the nodes' socket, the dashboard and ``/metrics``, and is answered ``503`` for anything else
  (the app decides, by path: :class:`herd.http.security.FrontGuard`), so clients that fill the
  router never lock its nodes and its operator out. Beyond the reserve, the same refusal.
- **When accept fails for lack of descriptors** (EMFILE, ENFILE, ENOBUFS, ENOMEM), the loop
  backs off (50 ms doubling to 1 s) instead of spinning, and logs it once a minute.
- **Idle connections** close after ``keep_alive_timeout`` (75 s) between requests, and at once
  after a response to ``Connection: close`` or HTTP/1.0 (see :class:`FinishResponses`), or
  when the client closes its end (hypercorn alone would keep the socket until the idle timer).
- **A client that half-closes** (shuts its sending side after a whole request, and reads on)
  is answered in full where ``serve_app(answer_half_closed=True)`` (the router's port): see
  :class:`ServedStream`. Elsewhere an end of file is a disconnect, as hypercorn has it.

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
import select
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import attrs
import h11
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
# An interim answer every HTTP/1.1 client must accept (and skip) before the real one; sent to a
# client that has half-closed, to learn whether it is still there (see ServedStream).
INTERIM = b"HTTP/1.1 100 Continue\r\n\r\n"


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
    max_total: int = 0  # connections in all; 0: as many as leave fd_headroom descriptors free
    reserve: int = 64  # connections beyond max_total, kept for the fleet and its operators

    def total(self) -> int:
        """The connections admitted in all before the reserve."""
        if self.max_total > 0:
            return self.max_total
        return max(16, (open_file_limit() - self.fd_headroom - 2 * self.reserve) // 2)


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
    # Peers (address, port) of the connections taken into the reserve.
    reserved: set[tuple[str, int]] = attrs.field(factory=set)

    @classmethod
    def for_limits(cls, limits: ConnectionLimits) -> Doorkeeper:
        return cls(limits, limits.total())

    def admit(self, client: str, peer: tuple[str, int] | None = None) -> str | None:
        """None: admitted (now counted; into the reserve past ``max_total``, as ``peer``).
        Else the reason for refusing it."""
        if self.by_client.get(client, 0) >= self.limits.max_per_client:
            return (
                f"too many connections from {client} (the limit is "
                f"{self.limits.max_per_client} per client address); close idle ones"
            )
        if self.open >= self.max_total:
            if self.open >= self.max_total + self.limits.reserve or peer is None:
                return (
                    f"the router is at its connection limit ({self.max_total}); try again shortly"
                )
            self.reserved.add(peer)
        self.open += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1
        return None

    def release(self, client: str, peer: tuple[str, int] | None = None) -> None:
        self.open -= 1
        if peer is not None:
            self.reserved.discard(peer)
        left = self.by_client[client] - 1
        if left:
            self.by_client[client] = left
        else:
            del self.by_client[client]

    def in_reserve(self, peer: Any) -> bool:
        """Was the connection from ``peer`` (an ASGI scope's ``client``) taken into the
        reserve? Those serve the fleet and its operators only."""
        return bool(self.reserved) and peer is not None and tuple(peer) in self.reserved


def local_url(bind: str) -> str:
    """Turn a bind like ``http://0.0.0.0:11435`` into a URL this machine can call."""
    scheme, _, address = bind.partition("://")
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "[::]", ""):
        host = "127.0.0.1"
    return f"{scheme}://{host}:{port}"


def _peer(stream: trio.SocketStream) -> tuple[str, tuple[str, int] | None]:
    """The client's address, and (address, port) where it has one."""
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?", None
    if isinstance(address, tuple):
        return str(address[0]), (str(address[0]), int(address[1]))
    return str(address), None


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
    answer_half_closed: bool = False,
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
        client, peer = _peer(stream)
        reason = doors.admit(client, peer)
        if reason is not None:
            doors.refused += 1
            nursery.start_soon(_refuse, stream, reason)
            continue
        nursery.start_soon(
            _serve_counted, serve_one, stream, client, peer, doors, answer_half_closed
        )


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


def _exchange(server: Any) -> h11.Connection | None:
    """The h11 state of the exchange hypercorn's ``server`` (a ``TCPServer``) is serving; None
    when it speaks something else (a WebSocket after its handshake, HTTP/2) or hasn't begun."""
    protocol = getattr(getattr(server, "protocol", None), "protocol", None)
    connection = getattr(protocol, "connection", None)
    return connection if isinstance(connection, h11.Connection) else None


def _answer_owed(exchange: h11.Connection | None) -> bool:
    """Has the client sent a whole request whose answer hasn't all gone out yet? (Its side
    is DONE after the request, or MUST_CLOSE when the request said ``Connection: close`` or was
    HTTP/1.0.)"""
    return (
        exchange is not None
        and exchange.their_state in (h11.DONE, h11.MUST_CLOSE)
        and exchange.our_state in (h11.SEND_RESPONSE, h11.SEND_BODY)
    )


@contextlib.contextmanager
def _hangups(sock: Any) -> Iterator[int | None]:
    """A descriptor that turns readable when ``sock`` hangs up or fails (the peer's kernel reset
    the connection), which its own readiness can't show once it has read an end of file. None
    where there is no epoll (or no descriptor left for one)."""
    if not hasattr(select, "epoll"):
        yield None
        return
    try:
        watch = select.epoll()
    except OSError:
        yield None
        return
    try:
        try:
            watch.register(sock.fileno(), select.EPOLLHUP | select.EPOLLERR)
        except OSError:
            yield None
        else:
            yield watch.fileno()
    finally:
        watch.close()


class ServedStream(OrderedSends):
    """The client's stream as hypercorn sees it (on top of :class:`OrderedSends`), with what the
    client's end of file means.

    hypercorn takes an end of file as the client gone: it tells the app ``http.disconnect``,
    which cancels the request. But a client that shuts its sending side after a whole request
    (``shutdown(SHUT_WR)``: some proxies and command-line clients do) has only finished
    sending; it still reads. With ``answer_half_closed``, an end of file that comes while a
    whole request's answer is owed is held back from hypercorn until the answer has gone out,
    and the client counts as gone only when a send to it fails or its kernel resets the
    connection:

    - A client that closed for good and one that half-closed send the same FIN; they differ
      only in what their kernel does with data sent to them (a closed socket answers with a
      reset). Before the answer has begun, the router sends :data:`INTERIM` (``100 Continue``,
      which an HTTP/1.1 client skips); once it streams, its next chunk does the same. The
      reset is watched for through :func:`_hangups` (Linux: at once, with one descriptor more
      while such an answer is under way); elsewhere it shows when the send after it fails.
    - An end of file in the middle of a request's body, or between requests, goes to
      hypercorn at once (an incomplete body is a 400 and a close; an idle connection closes).

    An end of file between requests also stops hypercorn's idle timer: hypercorn's reader is
    done then, and the timer alone would keep the connection (its socket, its count) open for
    the rest of ``keep_alive_timeout`` with nothing more to come from the client. (After an
    answer, hypercorn sees the end of file before it would recycle the exchange, and closes.)

    ``server`` is the ``TCPServer`` serving this stream; its h11 state (:func:`_exchange`) says
    whether an answer is owed. It is read, never changed; the one thing done to hypercorn is
    that stop of its idle timer (``TCPServer.idle_task``).
    """

    def __init__(self, stream: trio.SocketStream, answer_half_closed: bool = False) -> None:
        super().__init__(stream)
        self.answer_half_closed = answer_half_closed
        self.server: Any = None
        self._answered: trio.Event | None = None  # while an end of file is held back
        self._gone = False

    def _client_gone(self) -> None:
        self._gone = True
        if self._answered is not None:
            self._answered.set()

    def _release(self) -> None:
        if self._answered is not None and not _answer_owed(_exchange(self.server)):
            self._answered.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.stream.receive_some(max_bytes)
        if data:
            return data
        if self.answer_half_closed and _answer_owed(_exchange(self.server)):
            await self._answer_first()
        exchange = _exchange(self.server)
        idle = getattr(self.server, "idle_task", None)
        if (
            exchange is not None
            and exchange.their_state is h11.IDLE
            and exchange.our_state is h11.IDLE
            and idle is not None
        ):
            # Between requests (a restart of the timer already under way goes first: it holds
            # the timer's lock from the moment the exchange turns idle). Only here: anywhere
            # else this must not pause before hypercorn has the end of file, or an exchange
            # about to be recycled would restart the timer after it.
            await idle.stop()
        return data

    async def _answer_first(self) -> None:
        """Wait until the answer owed has gone out; raise BrokenResourceError if the client
        turns out to be gone first."""
        self._answered = answered = trio.Event()
        try:
            with _hangups(self.socket) as hangup:
                async with trio.open_nursery() as nursery:
                    if hangup is not None:
                        nursery.start_soon(self._watch, hangup)
                    await self._probe()
                    await answered.wait()
                    nursery.cancel_scope.cancel()
        finally:
            self._answered = None
        if self._gone:
            raise trio.BrokenResourceError("the client is gone (the connection was reset)")

    async def _watch(self, hangup: int) -> None:
        await trio.lowlevel.wait_readable(hangup)
        self._client_gone()

    async def _probe(self) -> None:
        """Send :data:`INTERIM` if nothing of the answer has gone out yet (HTTP/1.1 only: an
        HTTP/1.0 client may not be sent one)."""

        def unanswered() -> bool:
            exchange = _exchange(self.server)
            return (
                exchange is not None
                and exchange.our_state is h11.SEND_RESPONSE
                and exchange.their_http_version == b"1.1"
                and not self._held
            )

        if not unanswered():
            return  # the answer has begun: its next chunk is the probe
        await self._lock()
        try:
            if unanswered():  # still, now that no other send can start
                await self.stream.send_all(INTERIM)
        except trio.BrokenResourceError:
            self._client_gone()
        finally:
            self._sending.release()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await super().send_all(data)
        except trio.BrokenResourceError:
            self._client_gone()
            raise
        self._release()

    async def send_eof(self) -> None:
        try:
            await super().send_eof()
        except trio.BrokenResourceError:
            self._client_gone()
            raise
        finally:
            if self._answered is not None:
                self._answered.set()

    async def aclose(self) -> None:
        if self._answered is not None:
            self._answered.set()
        await super().aclose()


async def _serve_counted(
    serve_one: Callable[[trio.abc.HalfCloseableStream], Any],
    stream: trio.SocketStream,
    client: str,
    peer: tuple[str, int] | None,
    doors: Doorkeeper,
    answer_half_closed: bool = False,
) -> None:
    try:
        served = ServedStream(stream, answer_half_closed)
        served.server = serve_one(served)
        await served.server
    finally:
        doors.release(client, peer)
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
                # Shielded, with its own deadline: one scope, not a shield and a timeout.
                with trio.CancelScope(shield=True, deadline=trio.current_time() + FINISH_TIMEOUT):
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
    answer_half_closed: bool = False,
    doors: Doorkeeper | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled; ``task_status.started`` gets the URL to reach it.
    Raises :class:`ListenError` if it can't listen (before it has started).
    ``answer_half_closed``: a client that shuts its sending side after a whole request still
    gets its answer (:class:`ServedStream`); else that is a disconnect. ``doors``: the
    connection counts (made from ``limits`` when not given; the app may ask them which
    connections are in the reserve)."""
    limits = limits or ConnectionLimits()
    config = hypercorn_config(host, port, limits.idle_timeout)
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    doors = doors or Doorkeeper.for_limits(limits)
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
                    connections.start_soon(
                        _accept_loop, listener, connections, serve_one, doors, answer_half_closed
                    )
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
