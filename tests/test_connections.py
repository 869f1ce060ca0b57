"""Connections a single client can't exhaust: closing when asked, refusing what is framed two
ways, a cap per client address, idle connections closed, accept backing off when out of file
descriptors; and half-closed clients, answered in full, told from clients gone. Real router on
loopback; the crowd of idle connections is another process."""

from __future__ import annotations

import errno
import json
import logging
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from herd.core import traces
from herd.server import ConnectionLimits, Doorkeeper, _accept_loop
from herd.sim import SimConfig, SimModel
from tests.conftest import GiB, running_fleet, two_node_specs, until_virtual, wait_until


def exchange(url: str, data: bytes, wait: float = 5.0) -> tuple[bytes, bool]:
    """Send ``data`` in one write; (everything read, whether the router closed)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            return received, False
    return received, True


@pytest.mark.parametrize(
    "head",
    [
        b"GET /api/tags HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /api/tags HTTP/1.0\r\n\r\n",
        b"GET /fleet/status HTTP/1.0\r\n\r\n",
    ],
)
async def test_a_connection_closes_when_the_client_asks(tmp_path: Path, head: bytes) -> None:
    async with running_fleet(tmp_path, two_node_specs()) as fleet:
        answer, closed = await trio.to_thread.run_sync(exchange, fleet.url, head)
        assert answer.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")) and closed


async def test_an_inference_answer_closes_when_the_client_asks(tmp_path: Path) -> None:
    body = json.dumps(
        {"model": "llama3.2:3b", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    ).encode()
    head = (
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    async with running_fleet(tmp_path, two_node_specs()) as fleet:
        answer, closed = await trio.to_thread.run_sync(exchange, fleet.url, head + body)
        assert answer.startswith(b"HTTP/1.1 200") and closed


async def test_two_framings_are_refused_and_nothing_is_smuggled(tmp_path: Path) -> None:
    smuggled = b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n"
    chunked = b"0\r\n\r\n" + smuggled
    head = (
        b"POST /api/show HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(chunked)
    )
    async with running_fleet(tmp_path, two_node_specs()) as fleet:
        for _ in range(5):
            answer, closed = await trio.to_thread.run_sync(exchange, fleet.url, head + chunked)
            # The connection is closed and the smuggled request never answered. The 400 may
            # not reach the client: hypercorn closes the socket as soon as the answer's head is
            # out, and the kernel resets a connection closed with the client's bytes unread.
            assert closed and answer.count(b"HTTP/1.1") <= 1
            if answer:
                assert answer.startswith(b"HTTP/1.1 400")
                assert b"x-herd-error: a request may not carry both Content-Length" in answer
        # Without anything after it, the refusal always arrives whole.
        alone = (
            b"POST /api/show HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        answer, closed = await trio.to_thread.run_sync(exchange, fleet.url, alone)
        assert answer.startswith(b"HTTP/1.1 400") and closed


CROWD = r"""
import json, selectors, socket, sys, time
host, port, count, expected = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
socks = [socket.create_connection((host, port), timeout=30) for _ in range(count)]
# What the router says at once (a refusal), read in one sweep over all sockets: until the
# refusals the test expects have come (however busy the machine, within a minute), then for
# a quiet second more, so that one too many would show.
selector = selectors.DefaultSelector()
for sock in socks:
    sock.setblocking(False)
    selector.register(sock, selectors.EVENT_READ)
answered = {}
give_up = time.monotonic() + 60
quiet_until = time.monotonic() + 1.0
while time.monotonic() < quiet_until or (len(answered) < expected and time.monotonic() < give_up):
    for key, _ in selector.select(timeout=0.1):
        answered[key.fileobj] = key.fileobj.recv(4096)
        selector.unregister(key.fileobj)
        quiet_until = time.monotonic() + 1.0
refused = sum(1 for data in answered.values() if b"per client address" in data)
held = [sock for sock in socks if sock not in answered]
print(json.dumps({"accepted": len(held), "refused": refused}), flush=True)
sys.stdin.readline()  # the test has checked that others are served
closed = 0
deadline = time.monotonic() + 30
for sock in held:
    sock.setblocking(True)
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        if sock.recv(4096) == b"":
            closed += 1
    except (TimeoutError, ConnectionResetError):
        pass
print(json.dumps({"closed": closed}), flush=True)
"""


async def test_a_thousand_idle_connections_from_one_address_leave_others_served(
    tmp_path: Path,
) -> None:
    router_options: dict[str, Any] = {"max_connections_per_client": 200, "idle_timeout": 5.0}
    async with running_fleet(tmp_path, two_node_specs(), **router_options) as fleet:
        host, port = fleet.url.removeprefix("http://").split(":")
        # 200 held open (the two nodes' sockets, from this address too, among them), the
        # rest told why and closed.
        held = 200 - len(fleet.agents)
        crowd = await trio.lowlevel.open_process(
            [sys.executable, "-c", CROWD, host, port, "1000", str(1000 - held)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert crowd.stdout is not None and crowd.stdin is not None
            with trio.fail_after(90):
                counts = json.loads(await _line(crowd.stdout))
                assert counts == {"accepted": held, "refused": 1000 - held}
                # Someone else (another loopback address) is served at once.
                transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
                async with httpx.AsyncClient(
                    base_url=fleet.url, transport=transport, timeout=10, trust_env=False
                ) as other:
                    assert (await other.get("/api/tags")).status_code == 200
                await crowd.stdin.send_all(b"go\n")
                # The idle ones are closed by the router after the idle timeout.
                assert json.loads(await _line(crowd.stdout)) == {"closed": held}
                assert await crowd.wait() == 0
        finally:
            with trio.CancelScope(shield=True):
                crowd.kill()
                await crowd.wait()


async def _line(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data


class OutOfDescriptors(trio.abc.Listener[trio.SocketStream]):
    """A listener whose accept fails for lack of file descriptors ``failures`` times."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[float] = []

    async def accept(self) -> trio.SocketStream:
        self.calls.append(trio.current_time())
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        pass


async def test_accept_backs_off_when_out_of_descriptors(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="herd.http")
    listener = OutOfDescriptors(failures=7)
    doors = Doorkeeper(ConnectionLimits(), max_total=100)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_accept_loop, listener, nursery, lambda stream: None, doors)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    gaps = [round(b - a, 3) for a, b in zip(listener.calls, listener.calls[1:], strict=False)]
    assert gaps == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]  # doubling to a cap, not spinning
    assert len([r for r in caplog.records if "cannot accept" in r.getMessage()]) == 1


def test_the_doorkeeper_counts_per_address_and_in_all() -> None:
    doors = Doorkeeper(ConnectionLimits(max_per_client=2), max_total=3)
    assert doors.admit("a") is None and doors.admit("a") is None
    assert "per client address" in (doors.admit("a") or "")
    assert doors.admit("b") is None
    assert "connection limit" in (doors.admit("c") or "")
    doors.release("a")
    assert doors.admit("c") is None
    assert doors.by_client == {"a": 1, "b": 1, "c": 1}


# ---------------------------------------------------------------- half-closed clients

SLOW = SimModel("slow:latest", size_bytes=GiB, tokens_per_second=10.0)
STREAMED: dict[str, dict[str, Any]] = {
    "/api/chat": {"options": {"num_predict": 12}},
    "/v1/chat/completions": {"max_tokens": 12},
}
LAST = {"/api/chat": b'"done":true', "/v1/chat/completions": b"data: [DONE]"}


def streamed_chat(path: str) -> bytes:
    body = json.dumps(
        {
            "model": "slow",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            **STREAMED[path],
        }
    ).encode()
    return (
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (path.encode(), len(body))
    ) + body


async def connect(url: str) -> trio.SocketStream:
    host, port = url.removeprefix("http://").split(":")
    return await trio.open_tcp_stream(host, int(port))


async def read_to_end(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def read_until(stream: trio.abc.ReceiveStream, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, f"the router closed before {marker!r}: {data!r}"
        data += chunk
    return data


def solo_slow(parallel: int = 4) -> list[SimConfig]:
    return [SimConfig(name="solo", models=(SLOW,), loaded=("slow:latest",), parallel=parallel)]


@pytest.mark.parametrize("close", [False, True])
@pytest.mark.parametrize("path", list(STREAMED))
async def test_a_client_that_half_closes_still_reads_its_whole_stream(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, path: str, close: bool
) -> None:
    request = streamed_chat(path)
    if close:
        request = request.replace(b"\r\nHost: x\r\n", b"\r\nHost: x\r\nConnection: close\r\n")
    async with running_fleet(tmp_path, solo_slow()) as fleet:
        with trio.fail_after(60):
            stream = await connect(fleet.url)
            async with stream:
                await stream.send_all(request)
                await stream.send_eof()  # done sending; still reading
                answer = await read_to_end(stream)
        # An interim answer first (how the router tells a half-close from a client gone),
        # then the whole stream, then the router closes (nothing more can come from the client).
        assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 "), answer[:200]
        assert LAST[path] in answer and answer.endswith(b"0\r\n\r\n")
        await until_virtual(lambda: len(fleet.router.state.traces) == 1)
        assert fleet.router.state.traces[0].status == traces.COMPLETED
        assert fleet.counters_idle() and fleet.sims["solo"].disconnects == 0


async def test_an_http_1_0_client_that_half_closes_gets_no_interim_answer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    request = streamed_chat("/api/chat").replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    async with running_fleet(tmp_path, solo_slow()) as fleet:
        with trio.fail_after(60):
            stream = await connect(fleet.url)
            async with stream:
                await stream.send_all(request)
                await stream.send_eof()
                answer = await read_to_end(stream)
        # An HTTP/1.0 client may not be sent a 1xx: the answer alone, to its end.
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert LAST["/api/chat"] in answer
        await until_virtual(lambda: len(fleet.router.state.traces) == 1)
        assert fleet.router.state.traces[0].status == traces.COMPLETED


@pytest.mark.parametrize("half_closed_first", [False, True])
async def test_a_client_gone_mid_stream_still_cancels_its_request(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, half_closed_first: bool
) -> None:
    async with running_fleet(tmp_path, solo_slow()) as fleet:
        sim = fleet.sims["solo"]
        with trio.fail_after(60):
            stream = await connect(fleet.url)
            async with stream:
                await stream.send_all(streamed_chat("/api/chat"))
                if half_closed_first:
                    await stream.send_eof()
                await read_until(stream, b'"content"')  # the head and a first token
                assert fleet.router.state.queues.statistics().in_flight == 1
            # gone
            await until_virtual(fleet.counters_idle)
            await until_virtual(lambda: sim.open_streams == 0)
        assert sim.disconnects == 1
        await until_virtual(lambda: len(fleet.router.state.traces) == 1)
        assert fleet.router.state.traces[0].status == traces.CLIENT_DISCONNECTED


async def test_a_client_gone_before_its_answer_starts_is_noticed_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # One slot, taken: the second request waits in the queue, nothing sent to its client yet.
    # That client closes (a FIN, as a half-close sends): the router's interim answer draws the
    # kernel's reset, and the request leaves the queue without waiting for its turn.
    async with running_fleet(tmp_path, solo_slow(parallel=1)) as fleet:
        queues = fleet.router.state.queues
        with trio.fail_after(60):
            first = await connect(fleet.url)
            async with first:
                await first.send_all(streamed_chat("/api/chat"))
                await read_until(first, b'"content"')
                second = await connect(fleet.url)
                async with second:
                    await second.send_all(streamed_chat("/api/chat"))
                    await until_virtual(lambda: queues.statistics().pending == 1)
                    start = trio.current_time()
                await until_virtual(lambda: queues.statistics().pending == 0)
                assert trio.current_time() - start < 0.5  # not after the first's 1.2 s
                assert queues.statistics().in_flight == 1  # the first goes on
                await until_virtual(lambda: len(fleet.router.state.traces) == 1)
                assert fleet.router.state.traces[0].status == traces.CLIENT_DISCONNECTED
                assert b'"done":true' in await read_until(first, b"\r\n0\r\n\r\n")
        await until_virtual(lambda: len(fleet.router.state.traces) == 2)
        assert fleet.router.state.traces[1].status == traces.COMPLETED


@pytest.mark.parametrize("requests", [0, 1])
async def test_a_kept_alive_connection_half_closed_between_requests_is_closed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, requests: int
) -> None:
    async with running_fleet(tmp_path, solo_slow()) as fleet:
        with trio.fail_after(10):
            stream = await connect(fleet.url)
            async with stream:
                for _ in range(requests):
                    await stream.send_all(b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")
                    answer = await read_until(stream, b"}")  # a small JSON object, whole
                    assert answer.startswith(b"HTTP/1.1 200 ")
                await trio.sleep(1)  # virtual: the router is done with the exchange; it idles
                start = trio.current_time()
                await stream.send_eof()
                assert await read_to_end(stream) == b""  # closed at once, not at idle timeout
                assert trio.current_time() - start < 1


async def test_a_half_close_in_the_middle_of_a_body_ends_the_exchange(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    head = (
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n"
    )
    async with running_fleet(tmp_path, solo_slow()) as fleet:
        with trio.fail_after(10):
            stream = await connect(fleet.url)
            async with stream:
                await stream.send_all(head + b'{"model": "slow"')
                start = trio.current_time()
                await stream.send_eof()
                answer = await read_to_end(stream)
                assert trio.current_time() - start < 1
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400 "), answer
        assert fleet.counters_idle() and not fleet.router.state.traces


# ---------------------------------------------------------------- the reserve past the limit


def test_past_the_limit_a_reserve_is_kept_and_named() -> None:
    doors = Doorkeeper(ConnectionLimits(max_per_client=10, reserve=1), max_total=2)
    assert doors.admit("a", ("a", 1)) is None and doors.admit("b", ("b", 1)) is None
    assert not doors.in_reserve(["a", 1])
    assert doors.admit("c", ("c", 7)) is None  # past the limit: into the reserve
    assert doors.in_reserve(["c", 7]) and not doors.in_reserve(["c", 8])
    assert "connection limit (2)" in (doors.admit("d", ("d", 1)) or "")  # the reserve is full
    doors.release("c", ("c", 7))
    assert not doors.in_reserve(["c", 7]) and doors.reserved == set()


async def ask(stream: trio.SocketStream, path: str) -> bytes:
    """One GET on a kept-alive connection; its status line."""
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: herd\r\n\r\n".encode())
    head = await read_until(stream, b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0]


async def test_clients_that_fill_the_router_leave_room_for_its_nodes_and_operator(
    tmp_path: Path,
) -> None:
    """Two nodes' sockets and two idle clients fill a router allowed four connections: a fifth
    connection (in the reserve) still gets the dashboard, the fleet's status and /metrics, and
    a 503 for the API; once a client leaves, the API answers again. The nodes stay online."""
    async with running_fleet(tmp_path, two_node_specs(), max_connections=4) as fleet:
        with trio.fail_after(20):
            idle = [await connect(fleet.url) for _ in range(2)]
            for stream in idle:
                assert await ask(stream, "/api/version") == b"HTTP/1.1 200 "
            late = await connect(fleet.url)
            for path in ("/fleet/status", "/metrics", "/dashboard/api/overview"):
                assert await ask(late, path) == b"HTTP/1.1 200 ", path
            await late.send_all(b"GET /api/tags HTTP/1.1\r\nHost: herd\r\n\r\n")
            refused = await read_to_end(late)  # answered, then closed
            assert refused.startswith(b"HTTP/1.1 503")
            assert b"kept for its nodes and the dashboard" in refused
            await late.aclose()
            await idle[0].aclose()
            doors = fleet.router.doors
            assert doors is not None
            await wait_until(lambda: doors.open < 4)  # the router sees the close at once
            again = await connect(fleet.url)
            assert await ask(again, "/api/tags") == b"HTTP/1.1 200 "
            await again.aclose()
            await idle[1].aclose()
        async with httpx.AsyncClient(base_url=fleet.url, trust_env=False) as client:
            status = (await client.get("/fleet/status")).json()
        assert status["fleet"]["nodes_online"] == 2
