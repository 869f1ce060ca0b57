"""herd's Redis-protocol client against a real server (redis-server from Debian), and against
fake servers that misbehave (silent, oversized, broken) on loopback."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from herd.shared.resp import (
    MAX_BULK,
    Address,
    Parser,
    RespClient,
    RespError,
    Script,
    StoreUnavailable,
    encode,
)
from tests.engines import redis_server


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def test_urls_are_read_and_bad_ones_named() -> None:
    assert Address.parse("valkey://:s3cret@10.0.0.5:6380/2") == Address(
        "10.0.0.5", 6380, None, 2, "s3cret"
    )
    assert Address.parse("redis://localhost").port == 6379
    assert Address.parse("unix:///run/valkey.sock?db=3") == Address(
        None, 0, "/run/valkey.sock", 3, None
    )
    for bad, says in [
        ("http://x", "must start with"),
        ("valkey:///0", "names no host"),
        ("valkey://h/x", "must be a number"),
    ]:
        with pytest.raises(ValueError, match=says):
            Address.parse(bad)


def test_the_parser_takes_whole_replies_only() -> None:
    parser = Parser()
    wire = b"*3\r\n$3\r\nfoo\r\n:42\r\n*2\r\n+OK\r\n$-1\r\n-ERR nope\r\n"
    for i in range(len(wire)):  # byte by byte: nothing until a reply is whole
        parser.feed(wire[i : i + 1])
        if i < 31:
            assert parser.take() == (False, None)
    done, reply = parser.take()
    assert done and reply == [b"foo", 42, ["OK", None]]
    done, error = parser.take()
    assert done and isinstance(error, RespError) and str(error) == "ERR nope"
    assert (
        encode(["SET", b"k", 1, 2.5]) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n1\r\n$3\r\n2.5\r\n"
    )


def test_the_parser_refuses_replies_over_its_limits() -> None:
    parser = Parser()
    parser.feed(b"$%d\r\n" % (MAX_BULK + 1))
    with pytest.raises(StoreUnavailable, match="limit"):
        parser.take()
    parser = Parser()
    parser.feed(b"*1\r\n" * 20)
    with pytest.raises(StoreUnavailable, match="limits"):
        parser.take()


async def test_commands_pipelines_and_errors(redis_url: str) -> None:
    async with RespClient.open(redis_url) as client:
        assert await client.execute("SET", "greeting", "hello") == "OK"
        assert await client.execute("GET", "greeting") == b"hello"
        assert await client.execute("GET", "missing") is None
        replies = await client.pipeline(
            [("INCR", "n"), ("INCRBY", "n", 5), ("LPUSH", "greeting", 1)]
        )
        assert replies[:2] == [1, 6]
        assert isinstance(replies[2], RespError) and "WRONGTYPE" in str(replies[2])
        with pytest.raises(RespError, match="unknown command"):
            await client.execute("NOSUCHCOMMAND")
        # The connection is still good after an error reply.
        assert await client.execute("PING") == "PONG"


async def test_scripts_run_by_sha_and_load_when_missing(redis_url: str) -> None:
    script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    async with RespClient.open(redis_url) as client:
        await client.execute("SCRIPT", "FLUSH")
        assert await client.run_script(script, ["counter"], [3]) == 3  # NOSCRIPT, then EVAL
        assert await client.run_script(script, ["counter"], [4]) == 7  # by SHA now
        with pytest.raises(RespError):
            await client.run_script(Script("return redis.call('NOPE')"), [], [])


async def test_a_database_number_is_selected(redis_url: str) -> None:
    other = redis_url.rsplit("/", 1)[0] + "/3"
    async with RespClient.open(redis_url) as zero, RespClient.open(other) as three:
        await zero.execute("SET", "where", "zero")
        await three.execute("SET", "where", "three")
        assert await zero.execute("GET", "where") == b"zero"
        assert await three.execute("GET", "where") == b"three"


async def test_a_password_is_sent(tmp_path: Path) -> None:
    with redis_server(tmp_path, "--requirepass", "pw") as url:
        with_password = url.replace("valkey://", "valkey://:pw@")
        async with RespClient.open(with_password) as client:
            assert await client.execute("PING") == "PONG"
        async with RespClient.open(url) as client:
            with pytest.raises(RespError, match="NOAUTH"):
                await client.execute("GET", "x")


async def test_publish_subscribe(redis_url: str) -> None:
    async with RespClient.open(redis_url) as client, client.subscribe("herd:test") as messages:
        assert await client.execute("PUBLISH", "herd:test", "one") == 1
        with trio.fail_after(5):
            assert await messages.receive() == b"one"


async def test_concurrent_commands_share_a_bounded_pool(redis_url: str) -> None:
    async with RespClient.open(redis_url) as client:
        client.pool_size = 2
        results: list[object] = []

        async def one(i: int) -> None:
            results.append(await client.execute("ECHO", str(i)))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
        assert sorted(results) == sorted(str(i).encode() for i in range(20))  # type: ignore[type-var]
        assert len(client._idle) <= 8


async def fake_server(nursery: trio.Nursery, reply: bytes | None) -> str:
    """A TCP server that reads a command and answers ``reply`` (None: never answers)."""

    async def handle(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        if reply is not None:
            await stream.send_all(reply)
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return f"valkey://127.0.0.1:{port}/0"


async def test_a_silent_server_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        url = await fake_server(nursery, None)
        async with RespClient.open(url, command_timeout=2.0) as client:
            started = trio.current_time()
            with pytest.raises(StoreUnavailable, match="no answer in 2 s"):
                await client.execute("PING")
            assert trio.current_time() - started == pytest.approx(2.0)
            assert client._idle == []  # a connection with a reply in flight is not reused
        nursery.cancel_scope.cancel()


async def test_a_server_that_breaks_the_protocol_is_unavailable() -> None:
    async with trio.open_nursery() as nursery:
        for reply, says in [
            (b"?what\r\n", "unknown reply type"),
            (b"$%d\r\n" % (MAX_BULK * 2), "limit"),
            (b"", "closed"),
        ]:
            url = await fake_server(nursery, reply)
            if reply == b"":
                url = await closing_server(nursery)
            async with RespClient.open(url) as client:
                with pytest.raises(StoreUnavailable, match=says):
                    await client.execute("PING")
        nursery.cancel_scope.cancel()


async def closing_server(nursery: trio.Nursery) -> str:
    async def handle(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return f"valkey://127.0.0.1:{listeners[0].socket.getsockname()[1]}/0"


async def test_nobody_listening_is_unavailable() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        async with RespClient.open(f"valkey://127.0.0.1:{port}/0") as client:
            with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1"):
                await client.execute("PING")
