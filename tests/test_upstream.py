"""herd's transport to nodes (herd.transport.upstream) against raw HTTP servers on 127.0.0.1:
connections kept per node and reused only when whole, chunks of one read given together,
failures as httpx's exceptions."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import httpx
import pytest
import trio
import trio.testing

from herd.transport.client import upstream_client
from herd.transport.upstream import KEEPALIVE_EXPIRY, NodeTransport

Handler = Callable[[trio.SocketStream, bytes], Awaitable[bool]]  # -> keep the connection?


class RawServer:
    """Reads one request at a time (head and Content-Length body or a chunked body), hands
    it to ``handler``; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.url = ""
        self.closed = trio.Event()  # set when the server has closed a connection

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            await self.exchanges(stream)
        finally:
            await stream.aclose()
            self.closed.set()

    async def exchanges(self, stream: trio.SocketStream) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            lower = head.lower()
            if b"transfer-encoding: chunked" in lower:
                while not buffer.endswith(b"0\r\n\r\n"):
                    buffer += await stream.receive_some(65536)
                body, buffer = buffer, b""
            else:
                length = 0
                for line in lower.split(b"\r\n")[1:]:
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                while len(buffer) < length:
                    buffer += await stream.receive_some(65536)
                body, buffer = buffer[:length], buffer[length:]
            self.requests.append(head + b"\r\n\r\n" + body)
            if not await self.handler(stream, head):
                return


async def answer_ok(stream: trio.SocketStream, head: bytes) -> bool:
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    return True


async def start(nursery: trio.Nursery, handler: Handler) -> RawServer:
    server = RawServer(handler)
    listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), server.serve, 0)
    server.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    return server


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with upstream_client() as client:
        yield client


async def test_a_connection_is_kept_and_reused(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, answer_ok)
            for _ in range(3):
                response = await client.post(server.url + "/api/chat", content=b'{"a": 1}')
                assert response.text == "ok"
            assert server.connections == 1
            # The head and body went in one request, framed by their length.
            assert server.requests[0].endswith(b'\r\n\r\n{"a": 1}')
            assert b"content-length: 8" in server.requests[0].lower()
            assert b"accept-encoding: identity" in server.requests[0].lower()
            nursery.cancel_scope.cancel()


async def test_a_connection_the_node_closed_is_not_reused(client: httpx.AsyncClient) -> None:
    async def answer_and_close(stream: trio.SocketStream, head: bytes) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        return False  # closes it without saying so (no Connection: close)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, answer_and_close)
            assert (await client.get(server.url + "/")).text == "ok"
            await server.closed.wait()  # on loopback its FIN is at the client's socket now
            assert (await client.get(server.url + "/")).text == "ok"
            assert server.connections == 2
            nursery.cancel_scope.cancel()


async def test_idle_connections_expire(autojump_clock: trio.testing.MockClock) -> None:
    transport = NodeTransport()
    async with httpx.AsyncClient(transport=transport) as client, trio.open_nursery() as nursery:
        server = await start(nursery, answer_ok)
        await client.get(server.url + "/")
        assert transport.statistics()["idle"] == 1
        await trio.sleep(KEEPALIVE_EXPIRY + 0.5)
        await client.get(server.url + "/")
        assert server.connections == 2
        nursery.cancel_scope.cancel()


async def test_chunks_that_arrive_together_come_out_together(
    client: httpx.AsyncClient,
) -> None:
    go_on = trio.Event()

    async def three_then_one(stream: trio.SocketStream, head: bytes) -> bool:
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            b"2\r\na\n\r\n2\r\nb\n\r\n2\r\nc\n\r\n"
        )
        await go_on.wait()
        await stream.send_all(b"2\r\nd\n\r\n0\r\n\r\n")
        return True

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, three_then_one)
            async with client.stream("POST", server.url + "/api/chat", content=b"{}") as response:
                parts = response.aiter_raw()
                assert await parts.__anext__() == b"a\nb\nc\n"
                go_on.set()
                assert [part async for part in parts] == [b"d\n"]
            assert (await client.post(server.url + "/api/chat", content=b"{}")).status_code == 200
            assert server.connections == 1  # whole: kept
            nursery.cancel_scope.cancel()


async def test_a_body_cut_short_is_a_protocol_error_and_the_connection_goes(
    client: httpx.AsyncClient,
) -> None:
    calls = 0

    async def cut_first(stream: trio.SocketStream, head: bytes) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
            return False
        return await answer_ok(stream, head)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, cut_first)
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(server.url + "/")
            assert (await client.get(server.url + "/")).text == "ok"
            assert server.connections == 2
            nursery.cancel_scope.cancel()


async def test_an_answer_left_unread_closes_its_connection(client: httpx.AsyncClient) -> None:
    async def long_answer(stream: trio.SocketStream, head: bytes) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, long_answer)
            async with client.stream("GET", server.url + "/") as response:
                assert await response.aiter_raw().__anext__() == b"x" * 10
            nursery.start_soon(client.get, server.url + "/")
            await trio.testing.wait_all_tasks_blocked()
            assert server.connections == 2
            nursery.cancel_scope.cancel()


async def test_a_refused_connection_is_a_connect_error(client: httpx.AsyncClient) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        with trio.fail_after(10), pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/")


async def test_a_streamed_body_goes_chunked(client: httpx.AsyncClient) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"one,"
        yield b""
        yield b"two"

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, answer_ok)
            response = await client.post(server.url + "/api/blobs/sha256:1", content=body())
            assert response.text == "ok"
            sent = server.requests[0]
            assert b"transfer-encoding: chunked" in sent.lower()
            assert sent.endswith(b"\r\n\r\n4\r\none,\r\n3\r\ntwo\r\n0\r\n\r\n")
            nursery.cancel_scope.cancel()


async def test_a_read_timeout_of_the_request_is_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def never(stream: trio.SocketStream, head: bytes) -> bool:
        await trio.sleep_forever()

    async with upstream_client() as client, trio.open_nursery() as nursery:
        server = await start(nursery, never)
        start_at = trio.current_time()
        with pytest.raises(httpx.ReadTimeout):
            await client.get(server.url + "/", timeout=httpx.Timeout(10, read=3))
        assert trio.current_time() - start_at == pytest.approx(3)
        nursery.cancel_scope.cancel()


async def test_head_and_no_content_answers_have_no_body(client: httpx.AsyncClient) -> None:
    async def head_answer(stream: trio.SocketStream, head: bytes) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        return True

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, head_answer)
            response = await client.head(server.url + "/api/blobs/sha256:1")
            assert response.status_code == 200
            assert response.content == b""
            response = await client.head(server.url + "/api/blobs/sha256:1")
            assert server.connections == 1
            nursery.cancel_scope.cancel()


async def test_a_node_cookie_is_never_kept(client: httpx.AsyncClient) -> None:
    async def with_cookie(stream: trio.SocketStream, head: bytes) -> bool:
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nset-cookie: session=abc; Path=/\r\ncontent-length: 2\r\n\r\nok"
        )
        return True

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await start(nursery, with_cookie)
            await client.get(server.url + "/")
            await client.get(server.url + "/", follow_redirects=True)  # httpx's own way
            await client.get(server.url + "/")
            assert not any(b"cookie:" in r.lower() for r in server.requests)
            nursery.cancel_scope.cancel()
