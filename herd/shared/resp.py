"""A small Redis-protocol (RESP2) client over Trio streams, for Valkey or Redis.

Why our own: the maintained Python clients for Redis (redis-py, valkey-py) run their async API
on asyncio only, and herd is Trio throughout. RESP2 is small: commands go out as arrays of bulk
strings; replies are simple strings, errors, integers, bulk strings and arrays. This module does
that and no more: a bounded pool of connections, pipelines (several commands in one write, the
replies read in order), Lua scripts by their SHA1 (``EVALSHA``, loaded on ``NOSCRIPT``) and
publish/subscribe on a connection of its own.

Every wait has a bound: connecting and each command's round trip are limited by ``timeout``
(a command that takes longer raises :class:`StoreUnavailable`, and its connection is closed:
a connection with a reply in flight can't be reused). Replies are bounded in size
(:data:`MAX_BULK`) and depth (:data:`MAX_DEPTH`), so a wrong server can't make the router
allocate without limit. A cancelled command closes its connection for the same reason.

URLs: ``valkey://[:password@]host[:port][/db]``, ``redis://...`` (the same), and
``unix:///path/to/socket[?db=N]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs
import trio

DEFAULT_PORT = 6379
DEFAULT_TIMEOUT = 2.0  # seconds for connecting and for one command's round trip
POOL_SIZE = 8
MAX_BULK = 64 * 2**20  # bytes in one bulk reply
MAX_ARRAY = 1_000_000  # elements in one array reply
MAX_DEPTH = 8  # arrays within arrays
READ_SIZE = 65536

Reply = None | int | bytes | str | list[Any]


class RespError(Exception):
    """The server answered a command with an error (``-ERR ...``)."""


class StoreUnavailable(Exception):
    """The server can't be reached, or didn't answer in time, or broke the protocol."""


@attrs.frozen
class Address:
    host: str | None
    port: int
    path: str | None  # a unix socket
    db: int
    password: str | None

    @classmethod
    def parse(cls, url: str) -> Address:
        """Raises ValueError naming what is wrong with ``url``."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme in ("valkey", "redis"):
            if not parts.hostname:
                raise ValueError(f"{url!r} names no host")
            path = parts.path.strip("/")
            if path and not path.isdigit():
                raise ValueError(f"the database in {url!r} must be a number, got {path!r}")
            return cls(
                parts.hostname,
                parts.port or DEFAULT_PORT,
                None,
                int(path or 0),
                urllib.parse.unquote(parts.password) if parts.password else None,
            )
        if parts.scheme == "unix":
            query = urllib.parse.parse_qs(parts.query)
            db = query.get("db", ["0"])[0]
            if not db.isdigit():
                raise ValueError(f"the database in {url!r} must be a number, got {db!r}")
            return cls(None, 0, parts.path, int(db), None)
        raise ValueError(f"{url!r} must start with valkey://, redis:// or unix://")

    def shown(self) -> str:
        return self.path if self.path else f"{self.host}:{self.port}/{self.db}"


def encode(args: Sequence[object]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bool):
            data = b"1" if arg else b"0"
        elif isinstance(arg, int | float):
            data = repr(arg).encode()
        else:
            raise TypeError(f"can't send {type(arg).__name__} to the server")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Parser:
    """Incremental RESP2 reply parser: feed bytes, take whole replies."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._at = 0

    def feed(self, data: bytes | bytearray) -> None:
        if self._at:
            del self._buffer[: self._at]
            self._at = 0
        self._buffer += data
        if len(self._buffer) > MAX_BULK + 1024:
            raise StoreUnavailable("the server sent a reply over the size limit")

    def take(self) -> tuple[bool, Reply | RespError]:
        """(True, reply) when a whole reply is buffered, else (False, None)."""
        start = self._at
        try:
            reply = self._read(0)
        except _Incomplete:
            self._at = start
            return False, None
        return True, reply

    def _line(self) -> bytes:
        end = self._buffer.find(b"\r\n", self._at)
        if end < 0:
            if len(self._buffer) - self._at > 65536:
                raise StoreUnavailable("the server sent an overlong line")
            raise _Incomplete
        line = bytes(self._buffer[self._at : end])
        self._at = end + 2
        return line

    def _read(self, depth: int) -> Reply | RespError:
        line = self._line()
        if not line:
            raise StoreUnavailable("the server sent an empty line")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode("utf-8", "replace")
        if kind == b"-":
            return RespError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            if size > MAX_BULK:
                raise StoreUnavailable(f"the server sent a {size}-byte value (limit {MAX_BULK})")
            if len(self._buffer) - self._at < size + 2:
                raise _Incomplete
            data = bytes(self._buffer[self._at : self._at + size])
            self._at += size + 2
            return data
        if kind == b"*":
            count = int(rest)
            if count < 0:
                return None
            if count > MAX_ARRAY or depth >= MAX_DEPTH:
                raise StoreUnavailable("the server sent an array over the limits")
            return [self._read(depth + 1) for _ in range(count)]
        raise StoreUnavailable(f"the server sent an unknown reply type {kind!r}")


class _Incomplete(Exception):
    pass


class Connection:
    """One connection: send commands, read their replies in order."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.parser = Parser()
        self.broken = False

    async def send(self, *commands: Sequence[object]) -> None:
        await self.stream.send_all(b"".join(encode(c) for c in commands))

    async def reply(self) -> Reply | RespError:
        while True:
            done, reply = self.parser.take()
            if done:
                return reply
            data = await self.stream.receive_some(READ_SIZE)
            if not data:
                raise StoreUnavailable("the server closed the connection")
            self.parser.feed(data)

    async def aclose(self) -> None:
        self.broken = True
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await self.stream.aclose()


@attrs.frozen
class Script:
    """A Lua script, run by its SHA1 (loaded on the server the first time it is missing)."""

    source: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


@attrs.define(eq=False)
class RespClient:
    """A bounded pool of connections to one server. Use :meth:`open` as an async context."""

    address: Address
    timeout: float = DEFAULT_TIMEOUT
    pool_size: int = POOL_SIZE
    _idle: list[Connection] = attrs.field(factory=list)
    _limiter: trio.CapacityLimiter = attrs.field(init=False)
    _closed: bool = False

    def __attrs_post_init__(self) -> None:
        self._limiter = trio.CapacityLimiter(self.pool_size)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, url: str, command_timeout: float = DEFAULT_TIMEOUT
    ) -> AsyncIterator[RespClient]:
        client = cls(Address.parse(url), command_timeout)
        try:
            yield client
        finally:
            await client.aclose()

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.aclose()

    async def _connect(self) -> Connection:
        address = self.address
        try:
            with trio.fail_after(self.timeout):
                stream: trio.abc.Stream
                if address.path is not None:
                    stream = await trio.open_unix_socket(address.path)
                else:
                    assert address.host is not None
                    stream = await trio.open_tcp_stream(address.host, address.port)
                connection = Connection(stream)
                setup: list[Sequence[object]] = []
                if address.password:
                    setup.append(("AUTH", address.password))
                if address.db:
                    setup.append(("SELECT", address.db))
                if setup:
                    await connection.send(*setup)
                    for _ in setup:
                        reply = await connection.reply()
                        if isinstance(reply, RespError):
                            await connection.aclose()
                            raise StoreUnavailable(f"{address.shown()}: {reply}")
                return connection
        except trio.TooSlowError as exc:
            raise StoreUnavailable(
                f"{address.shown()}: no connection in {self.timeout:g} s"
            ) from exc
        except OSError as exc:
            raise StoreUnavailable(f"{address.shown()}: {exc.strerror or exc}") from exc

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        if self._closed:
            raise StoreUnavailable("the client is closed")
        async with self._limiter:
            connection = self._idle.pop() if self._idle else await self._connect()
            ok = False
            try:
                yield connection
                ok = True
            finally:
                if ok and not connection.broken and not self._closed:
                    self._idle.append(connection)
                else:
                    await connection.aclose()

    async def pipeline(self, commands: Sequence[Sequence[object]]) -> list[Reply | RespError]:
        """Send ``commands`` in one write and read their replies in order; an error reply is
        returned in its place (a :class:`RespError`), not raised."""
        async with self._connection() as connection:
            try:
                with trio.fail_after(self.timeout):
                    await connection.send(*commands)
                    return [await connection.reply() for _ in commands]
            except trio.TooSlowError as exc:
                connection.broken = True
                raise StoreUnavailable(
                    f"{self.address.shown()}: no answer in {self.timeout:g} s"
                ) from exc
            except (OSError, trio.BrokenResourceError, ValueError) as exc:
                connection.broken = True
                raise StoreUnavailable(f"{self.address.shown()}: {exc}") from exc
            except BaseException:
                connection.broken = True  # cancelled or broken mid-reply: not reusable
                raise

    async def execute(self, *command: object) -> Reply:
        """Run one command. Raises :class:`RespError` for an error reply."""
        (reply,) = await self.pipeline([command])
        if isinstance(reply, RespError):
            raise reply
        return reply

    async def run_script(
        self, script: Script, keys: Sequence[object], args: Sequence[object]
    ) -> Reply:
        """Run a Lua script atomically on the server (``EVALSHA``, loading it when missing)."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        (reply,) = await self.pipeline([command])
        if isinstance(reply, RespError) and str(reply).startswith("NOSCRIPT"):
            (reply,) = await self.pipeline([("EVAL", script.source, len(keys), *keys, *args)])
        if isinstance(reply, RespError):
            raise reply
        return reply

    @contextlib.asynccontextmanager
    async def subscribe(self, *channels: str) -> AsyncIterator[trio.MemoryReceiveChannel[bytes]]:
        """Messages published on ``channels``, on a connection of its own, until the block
        ends. A lost connection ends the message stream (the caller reconnects)."""
        connection = await self._connect()
        send, receive = trio.open_memory_channel[bytes](64)
        try:
            with trio.fail_after(self.timeout):
                await connection.send(("SUBSCRIBE", *channels))
                for _ in channels:
                    await connection.reply()
            async with trio.open_nursery() as nursery:

                async def pump() -> None:
                    async with send:
                        with contextlib.suppress(
                            StoreUnavailable, OSError, trio.BrokenResourceError
                        ):
                            while True:
                                reply = await connection.reply()
                                if (
                                    isinstance(reply, list)
                                    and len(reply) == 3
                                    and reply[0] == b"message"
                                    and isinstance(reply[2], bytes)
                                ):
                                    with contextlib.suppress(trio.WouldBlock):
                                        send.send_nowait(reply[2])

                nursery.start_soon(pump)
                try:
                    yield receive
                finally:
                    nursery.cancel_scope.cancel()
        except trio.TooSlowError as exc:
            raise StoreUnavailable(f"{self.address.shown()}: subscribe timed out") from exc
        finally:
            await connection.aclose()
