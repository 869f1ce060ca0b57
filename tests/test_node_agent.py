"""The node agent: heartbeats, reconnect backoff, pings, drain, auth; the backend probe.

The agent is tested against fakes that are real servers on 127.0.0.1 (port 0):
- :class:`FakeRouter`, a trio-websocket server that records each heartbeat (parsed through the
  wire converter) and can ack, close, or refuse;
- :class:`FakeOllama`, a raw ASGI app on hypercorn answering ``/api/version``, ``/api/ps``,
  ``/api/tags`` with fixed bodies, or failing on demand;
- raw TCP servers for peers that misbehave below the WebSocket layer.
Timing tests run on a virtual clock that only jumps after a short real idle period (real
sockets need a moment to deliver), and assert exact ``trio.current_time()`` differences.

The last section runs the agent against the real router: the two sides of the fleet socket.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import json
import logging
import random
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import hypercorn.config
import hypercorn.trio
import pytest
import trio
import trio.testing
import wsproto
import wsproto.events
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from herd.config import RouterConfig
from herd.core.models import (
    AvailableModel,
    BackendInfo,
    CpuInfo,
    DiskInfo,
    LoadedModel,
    MemoryInfo,
    MemoryPressure,
    NodeReport,
    NodeStatus,
)
from herd.core.wire import report_from_data, report_to_json
from herd.http.service import Router
from herd.node.agent import AgentConfig, NodeAgent, RouterEndpoint
from herd.node.backend import (
    BackendState,
    OllamaBackend,
    carry_over,
    parse_ps,
    parse_tags,
    parse_time,
)
from herd.node.metrics import pressure_for, read_system
from herd.sim import SimConfig, SimModel, run_sim

GiB = 2**30
MiB = 2**20

# ---------------------------------------------------------------------------------------------
# Fakes
# ---------------------------------------------------------------------------------------------

VERSION = {"version": "0.13.1"}
PS: dict[str, Any] = {
    "models": [
        {
            "name": "llama3.2:3b",
            "model": "llama3.2:3b",
            "size": 3 * GiB,
            "size_vram": 2 * GiB,
            "context_length": 4096,
            "expires_at": "2026-01-01T00:05:00.123456789Z",
            "digest": "a80c4f17acd5",
            "details": {"family": "llama", "parameter_size": "3.2B"},
        },
        {  # an older Ollama: no context_length; kept loaded forever
            "name": "nomic-embed-text:latest",
            "size": 300 * MiB,
            "size_vram": 300 * MiB,
            "expires_at": "2318-08-26T04:12:00.000000000+02:00",
        },
    ]
}
TAGS: dict[str, Any] = {
    "models": [
        {
            "name": "llama3.2:3b",
            "model": "llama3.2:3b",
            "modified_at": "2025-11-02T10:00:00.5+01:00",
            "size": 2019393189,
            "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
            "details": {
                "format": "gguf",
                "family": "llama",
                "families": ["llama"],
                "parameter_size": "3.2B",
                "quantization_level": "Q4_K_M",
            },
        },
        {
            "name": "nomic-embed-text:latest",
            "size": 274302450,
            "details": {"family": "nomic-bert", "parameter_size": "137M"},
        },
        {"name": "mxbai-embed-large:latest", "details": {"family": "bert"}},
        {"name": "qwen2.5:7b", "details": {"family": "qwen2", "quantization_level": "Q4_K_M"}},
    ]
}
ROUTES: dict[str, Any] = {"/api/version": VERSION, "/api/ps": PS, "/api/tags": TAGS}


@attrs.define(eq=False)
class FakeOllama:
    """Ollama's read-only endpoints. ``mode``: ok | http500 | garbage | hang."""

    mode: str = "ok"
    url: str = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert scope["type"] == "http"
        if self.mode == "hang":
            await trio.sleep_forever()
        status, body = 200, b""
        if self.mode == "http500":
            status, body = 500, b'{"error":"boom"}'
        elif self.mode == "garbage":
            body = b"<html>this is not ollama</html>"
        elif scope["path"] in ROUTES:
            body = json.dumps(ROUTES[scope["path"]]).encode()
        else:
            status, body = 404, b'{"error":"not found"}'
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def fake_ollama(mode: str = "ok") -> AsyncIterator[FakeOllama]:
    app = FakeOllama(mode)
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.keep_alive_timeout = 3600  # virtual hours pass in some tests
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(hypercorn.trio.serve, app, config)
        app.url = binds[0]
        yield app
        nursery.cancel_scope.cancel()


@attrs.define(eq=False)
class FakeRouter:
    """The router's end of ``/fleet/ws``. ``mode``: what to do with a session's first
    heartbeat — ack (and keep the socket), close (without an ack), ack_close."""

    mode: str = "ack"
    token: str | None = None
    port: int = 0
    heartbeats: list[NodeReport] = attrs.field(factory=list)
    connected_at: list[float] = attrs.field(factory=list)
    authorization: list[bytes | None] = attrs.field(factory=list)
    rejected: int = 0
    ws: WebSocketConnection | None = None
    _changed: trio.Event = attrs.field(factory=trio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    async def send(self, message: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send_message(json.dumps(message))

    async def handler(self, request: WebSocketRequest) -> None:
        self.connected_at.append(trio.current_time())
        assert request.path == "/fleet/ws"
        presented = dict(request.headers).get(b"authorization")
        self.authorization.append(presented)
        if self.token is not None and presented != f"Bearer {self.token}".encode():
            self.rejected += 1
            self._notify()
            await request.reject(401, body=b"fleet token required")  # as the real router
            return
        ws = await request.accept()
        self.ws = ws
        try:
            first = True
            while True:
                message = json.loads(await ws.get_message())
                assert message["type"] == "heartbeat"
                self.heartbeats.append(report_from_data(message["node"]))
                self._notify()
                if first and self.mode in ("ack", "ack_close"):
                    await self.send({"type": "ack", "node_id": self.heartbeats[-1].node_id})
                if self.mode in ("close", "ack_close"):
                    await ws.aclose()
                    return
                first = False
        except ConnectionClosed:
            pass
        finally:
            self.ws = None
            self._notify()


@contextlib.asynccontextmanager
async def fake_router(mode: str = "ack", token: str | None = None) -> AsyncIterator[FakeRouter]:
    router = FakeRouter(mode, token)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, router.handler, "127.0.0.1", 0, None)
        router.port = server.port
        yield router
        nursery.cancel_scope.cancel()


@attrs.define(eq=False)
class Arrivals:
    """When connections reached a raw server, with a wake-up for each one."""

    times: list[float] = attrs.field(factory=list)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def arrived(self) -> None:
        self.times.append(trio.current_time())
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, count: int) -> None:
        while len(self.times) < count:
            await self._changed.wait()


@contextlib.asynccontextmanager
async def tcp_server(
    handler: Callable[[trio.SocketStream], Any],
) -> AsyncIterator[str]:
    """A raw TCP server (trio closes each stream when ``handler`` returns); yields its URL."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, host="127.0.0.1"), handler, 0
        )
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def running(agent: NodeAgent) -> AsyncIterator[NodeAgent]:
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        yield agent
        nursery.cancel_scope.cancel()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def io_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 20 ms of real idleness: loopback I/O in flight is
    never mistaken for "everyone is asleep"."""
    return trio.testing.MockClock(autojump_threshold=0.02)


def config(router: FakeRouter | str, ollama: FakeOllama | str, **options: Any) -> AgentConfig:
    return AgentConfig(
        router_url=router if isinstance(router, str) else router.url,
        ollama_url=ollama if isinstance(ollama, str) else ollama.url,
        **{"node_id": "n1", "backoff_jitter": 0.0, **options},
    )


# ---------------------------------------------------------------------------------------------
# Heartbeats
# ---------------------------------------------------------------------------------------------


async def test_heartbeat_carries_models_and_memory_and_round_trips() -> None:
    with trio.fail_after(10):
        async with fake_router() as router, fake_ollama() as ollama:
            agent = NodeAgent(config(router, ollama, parallel_slots=3, agent_version="9.9"))
            async with running(agent):
                await agent.wait_connected()
                await router.until(lambda: len(router.heartbeats) >= 1)
                report = router.heartbeats[0]
                assert report == agent.last_report
                wire = json.loads(report_to_json(report))
                assert wire["type"] == "heartbeat"
                assert report_from_data(wire["node"]) == report

                assert report.node_id == "n1" and report.agent_version == "9.9"
                assert report.backend == BackendInfo(
                    kind="ollama", url=ollama.url, version="0.13.1", healthy=True
                )
                assert report.loaded_models == (
                    LoadedModel("llama3.2:3b", 3 * GiB, 2 * GiB, 4096, 1767225900.123456),
                    LoadedModel("nomic-embed-text:latest", 300 * MiB, 300 * MiB, 0, None),
                )
                assert [m.name for m in report.available_models] == [
                    "llama3.2:3b",
                    "nomic-embed-text:latest",
                    "mxbai-embed-large:latest",
                    "qwen2.5:7b",
                ]
                assert report.available_models[0].quantization == "Q4_K_M"
                assert report.capabilities.embed_models == (
                    "nomic-embed-text:latest",
                    "mxbai-embed-large:latest",
                )
                assert report.memory.total_bytes >= report.memory.available_bytes > 0
                assert report.cpu.cores > 0 and report.disk.total_bytes > 0
                assert report.parallel_slots == 3 and not report.draining
                assert agent.statistics().connected
                assert agent.statistics().heartbeats_sent >= 1


async def test_heartbeats_repeat_on_the_interval(io_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with fake_router() as router, fake_ollama() as ollama:
            agent = NodeAgent(config(router, ollama, heartbeat_interval=5.0))
            async with running(agent):
                await router.until(lambda: len(router.heartbeats) == 1)
                start = trio.current_time()
                await router.until(lambda: len(router.heartbeats) == 3)
                assert trio.current_time() - start == pytest.approx(10.0, abs=1e-6)
                assert router.connected_at == [router.connected_at[0]]  # one socket


async def test_advertise_url_replaces_the_backend_url() -> None:
    with trio.fail_after(10):
        async with fake_router() as router, fake_ollama() as ollama:
            agent = NodeAgent(config(router, ollama, advertise_url="http://10.0.0.7:11434"))
            async with running(agent):
                await router.until(lambda: len(router.heartbeats) >= 1)
    assert router.heartbeats[0].backend.url == "http://10.0.0.7:11434"


async def test_backend_down_is_reported_unhealthy_with_the_url(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="herd.node")
    down = closed_port_url()
    with trio.fail_after(10):
        async with fake_router() as router:
            agent = NodeAgent(config(router, down))
            async with running(agent):
                await router.until(lambda: len(router.heartbeats) >= 1)
    report = router.heartbeats[0]
    assert not report.backend.healthy
    assert report.backend.error.startswith(down + "/api/")
    assert "ConnectError" in report.backend.error
    # Never answered: nothing known to carry over, so no lists, and they are not "stale".
    assert report.loaded_models == () and report.available_models == ()
    assert not report.backend.models_stale
    assert report.capabilities.embed_models == ()
    assert f"backend down: {report.backend.error}; no models known yet" in caplog.messages


async def test_a_failed_probe_keeps_the_last_lists_marked_stale(
    io_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """One failed probe is not a missing model: the heartbeat keeps the last good probe's
    lists, marked stale, until a good probe brings fresh ones. Down and back are logged once
    each, not once per heartbeat."""
    caplog.set_level(logging.INFO, logger="herd.node")
    with trio.fail_after(60):
        async with fake_router() as router, fake_ollama() as ollama:
            agent = NodeAgent(config(router, ollama, heartbeat_interval=60.0, parallel_slots=3))
            async with running(agent):
                await router.until(lambda: len(router.heartbeats) == 1)
                ollama.mode = "http500"
                await router.send({"type": "command", "command": "heartbeat"})
                await router.until(lambda: len(router.heartbeats) == 2)
                await router.send({"type": "command", "command": "heartbeat"})
                await router.until(lambda: len(router.heartbeats) == 3)
                ollama.mode = "ok"
                await router.send({"type": "command", "command": "heartbeat"})
                await router.until(lambda: len(router.heartbeats) == 4)
    fresh, down, still_down, back = router.heartbeats
    assert fresh.backend.healthy and not fresh.backend.models_stale
    assert fresh.loaded_models and fresh.available_models
    for stale in (down, still_down):
        assert not stale.backend.healthy and stale.backend.models_stale
        assert stale.backend.error.startswith(ollama.url + "/api/")
        assert ": HTTP 500" in stale.backend.error
        assert stale.loaded_models == fresh.loaded_models
        assert stale.available_models == fresh.available_models
        assert stale.capabilities.embed_models == fresh.capabilities.embed_models
        assert stale.parallel_slots == fresh.parallel_slots == 3
        # The router reads it through the same converter (FakeRouter parsed these with it).
        assert report_from_data(json.loads(report_to_json(stale))["node"]) == stale
    assert back.backend == fresh.backend  # healthy, not stale, no error
    assert back.loaded_models == fresh.loaded_models
    assert back.available_models == fresh.available_models
    downs = [r for r in caplog.records if r.getMessage().startswith("backend down: ")]
    assert [r.getMessage() for r in downs] == [
        f"backend down: {down.backend.error}; reporting its last known models as stale"
    ]
    assert downs[0].levelno == logging.WARNING
    assert caplog.messages.count(f"backend {ollama.url} is back") == 1


def test_carry_over_takes_the_lists_and_slots_of_the_last_good_probe() -> None:
    known = BackendState(
        info=BackendInfo(
            kind="openai", url="http://127.0.0.1:8080", version="openai", healthy=True
        ),
        loaded=(LoadedModel("smollm2:latest", context_length=1024),),
        available=(AvailableModel("smollm2:latest"),),
        slots=2,
    )
    failed = BackendState(
        info=BackendInfo(kind="openai", url="http://127.0.0.1:8080", error="x: ReadTimeout")
    )
    assert carry_over(failed, known) == BackendState(
        info=BackendInfo(
            kind="openai", url="http://127.0.0.1:8080", error="x: ReadTimeout", models_stale=True
        ),
        loaded=known.loaded,
        available=known.available,
        slots=2,
    )
    assert carry_over(failed, None) == failed  # never answered: nothing to carry
    fresh = BackendState(info=known.info, slots=1)
    assert carry_over(fresh, known) == fresh  # a good probe is reported as it is


# ---------------------------------------------------------------------------------------------
# Reconnecting
# ---------------------------------------------------------------------------------------------


async def test_reconnect_backoff_doubles_to_the_cap_with_seeded_jitter(
    io_clock: trio.testing.MockClock,
) -> None:
    # The router drops every session after its first heartbeat, without an ack: a session
    # that the router never acknowledged doesn't reset the backoff.
    with trio.fail_after(120):
        async with fake_router(mode="close") as router, fake_ollama() as ollama:
            agent = NodeAgent(
                config(
                    router,
                    ollama,
                    backoff_initial=0.5,
                    backoff_max=4.0,
                    backoff_jitter=0.1,
                ),
                rng=random.Random(42),
            )
            async with running(agent):
                await router.until(lambda: len(router.connected_at) == 7)
                stats = agent.statistics()
    twin = random.Random(42)
    expected = [d * (1 + 0.1 * twin.random()) for d in (0.5, 1.0, 2.0, 4.0, 4.0, 4.0)]
    gaps = [b - a for a, b in itertools.pairwise(router.connected_at)]
    assert gaps == pytest.approx(expected, abs=1e-6)
    assert len(router.heartbeats) == 7  # each session delivered its heartbeat first
    assert stats.reconnects == 6 and stats.heartbeats_sent == 7
    assert stats.last_error == "router connection closed (code 1000)"


async def test_backoff_resets_after_an_acknowledged_session(
    io_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with fake_router(mode="ack_close") as router, fake_ollama() as ollama:
            agent = NodeAgent(config(router, ollama, backoff_initial=0.5, backoff_max=4.0))
            async with running(agent):
                await router.until(lambda: len(router.connected_at) == 5)
    gaps = [b - a for a, b in itertools.pairwise(router.connected_at)]
    assert gaps == pytest.approx([0.5] * 4, abs=1e-6)


async def test_refused_connections_back_off_and_say_why(io_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with fake_ollama() as ollama:
            agent = NodeAgent(config(closed_port_url(), ollama, backoff_initial=0.5))
            async with running(agent):
                start = trio.current_time()
                # Attempts at +0, +0.5, +1.5, +3.5: three reconnects by +3.6 s.
                await trio.sleep(3.6)  # io_clock: an autojump MockClock, virtual seconds
                stats = agent.statistics()
                assert trio.current_time() - start == pytest.approx(3.6)
    assert stats.reconnects == 3 and stats.heartbeats_sent == 0 and not stats.connected
    assert stats.last_error is not None and "OSError" in stats.last_error


async def test_unanswered_ping_tears_the_session_down(io_clock: trio.testing.MockClock) -> None:
    # A router that completes the handshake and then never reads again: heartbeats still go
    # into the socket buffer, but no pong ever comes back.
    arrivals = Arrivals()

    async def half_dead(stream: trio.SocketStream) -> None:
        arrivals.arrived()
        ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        while True:
            ws.receive_data(await stream.receive_some())
            for event in ws.events():
                if isinstance(event, wsproto.events.Request):
                    await stream.send_all(ws.send(wsproto.events.AcceptConnection()))
                    await trio.sleep_forever()

    with trio.fail_after(60):
        async with tcp_server(half_dead) as url, fake_ollama() as ollama:
            agent = NodeAgent(
                config(url, ollama, heartbeat_interval=5.0, ping_timeout=10.0, backoff_initial=1)
            )
            async with running(agent):
                await agent.wait_connected()
                await arrivals.until(2)
                error = agent.statistics().last_error
    assert arrivals.times[1] - arrivals.times[0] == pytest.approx(10.0 + 1.0, abs=1e-6)
    assert error == "TimeoutError: router did not answer a ping within 10 s"


async def test_a_peer_that_drops_the_handshake_times_out(
    io_clock: trio.testing.MockClock,
) -> None:
    # trio-websocket alone would wait forever here: the TCP close before the handshake
    # response never wakes the client's handshake wait.
    arrivals = Arrivals()

    async def hang_up(stream: trio.SocketStream) -> None:
        arrivals.arrived()
        await stream.receive_some()  # the handshake request; then close without answering

    with trio.fail_after(60):
        async with tcp_server(hang_up) as url, fake_ollama() as ollama:
            agent = NodeAgent(config(url, ollama, connect_timeout=10.0, backoff_initial=1))
            async with running(agent):
                await arrivals.until(2)
                error = agent.statistics().last_error
    assert arrivals.times[1] - arrivals.times[0] == pytest.approx(10.0 + 1.0, abs=1e-6)
    assert error is not None and error.startswith("TimeoutError: no handshake from ws://")


# ---------------------------------------------------------------------------------------------
# Drain and router messages
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("asked_by", ["agent", "router"])
async def test_drain_sends_a_heartbeat_at_once(
    io_clock: trio.testing.MockClock, asked_by: str
) -> None:
    with trio.fail_after(30):
        async with fake_router() as router, fake_ollama() as ollama:
            agent = NodeAgent(config(router, ollama, heartbeat_interval=60.0))
            async with running(agent):
                await router.until(lambda: len(router.heartbeats) == 1)
                asked = trio.current_time()
                if asked_by == "agent":
                    await agent.drain()
                else:
                    await router.send({"type": "command", "command": "drain"})
                await router.until(lambda: len(router.heartbeats) == 2)
                assert trio.current_time() == asked  # not 60 s later
                assert router.heartbeats[1].draining and agent.statistics().draining
                assert not agent.drained.is_set()
                await router.send({"type": "drained"})
                await agent.drained.wait()
    assert [h.draining for h in router.heartbeats] == [False, True]


async def test_router_messages_heartbeat_now_and_unknowns_ignored(
    io_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="herd.node")
    with trio.fail_after(30):
        async with fake_router() as router, fake_ollama() as ollama:
            agent = NodeAgent(config(router, ollama, heartbeat_interval=60.0))
            async with running(agent):
                await router.until(lambda: len(router.heartbeats) == 1)
                asked = trio.current_time()
                await router.send({"type": "from-the-future", "x": 1})
                await router.send({"type": "command", "command": "levitate"})
                await router.send({"type": "error", "message": "bad heartbeat"})
                assert router.ws is not None
                await router.ws.send_message("not json")
                await router.send({"type": "command", "command": "heartbeat"})
                await router.until(lambda: len(router.heartbeats) == 2)
                assert trio.current_time() == asked
                assert not router.heartbeats[1].draining
                assert len(router.connected_at) == 1  # nothing above broke the session
    assert "unknown router command 'levitate'" in caplog.text
    assert "router: bad heartbeat" in caplog.text


async def test_draining_before_connecting_is_in_the_first_heartbeat() -> None:
    with trio.fail_after(10):
        async with fake_router() as router, fake_ollama() as ollama:
            agent = NodeAgent(config(router, ollama))
            await agent.drain()
            async with running(agent):
                await router.until(lambda: len(router.heartbeats) >= 1)
    assert router.heartbeats[0].draining


# ---------------------------------------------------------------------------------------------
# Auth
# ---------------------------------------------------------------------------------------------

REFUSED_TOKEN = "router refused the fleet token (401): check --auth-token here and on the router"


async def test_fleet_token_goes_in_the_handshake_and_is_never_logged(
    io_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="herd.node")
    with trio.fail_after(30):
        async with fake_router(token="s3cret") as router, fake_ollama() as ollama:
            member = NodeAgent(config(router, ollama, node_id="member", auth_token="s3cret"))
            stranger = NodeAgent(config(router, ollama, node_id="stranger"))
            async with running(member), running(stranger):
                await router.until(lambda: router.rejected >= 2 and bool(router.heartbeats))
                stranger_stats = stranger.statistics()
    assert b"Bearer s3cret" in router.authorization and None in router.authorization
    assert {h.node_id for h in router.heartbeats} == {"member"}
    assert stranger_stats.last_error == REFUSED_TOKEN
    assert stranger_stats.heartbeats_sent == 0
    # Said plainly, as a warning (and the agent kept trying: two refusals above).
    refusals = [r for r in caplog.records if "refused the fleet token (401)" in r.getMessage()]
    assert refusals and all(r.levelno == logging.WARNING for r in refusals)
    assert "s3cret" not in caplog.text
    gc.collect()  # a socket leaked by a rejected handshake would warn (= fail) here


# ---------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------


def fixed_system() -> tuple[CpuInfo, MemoryInfo, DiskInfo]:
    return (
        CpuInfo(cores=8, percent=12.5),
        MemoryInfo(total_bytes=32 * GiB, available_bytes=3 * GiB, pressure=MemoryPressure.WARN),
        DiskInfo(total_bytes=500 * GiB, free_bytes=200 * GiB),
    )


def test_build_report_assembles_everything() -> None:
    agent = NodeAgent(
        AgentConfig(
            router_url="http://router:11435",
            node_id="box",
            advertise_url="http://192.168.1.9:11434",
            parallel_slots=2,
            agent_version="1.2.3",
        ),
        system=fixed_system,
    )
    state = BackendState(
        info=BackendInfo(url="http://localhost:11434", version="0.13.1", healthy=True),
        loaded=(LoadedModel("llama3.2:3b", 3 * GiB, 3 * GiB, 8192, 1.0e9),),
        available=(
            AvailableModel("llama3.2:3b", family="llama"),
            AvailableModel("all-minilm:latest", family="bert"),
            AvailableModel("nomic-embed-text:v1.5", family="nomic-bert"),
            AvailableModel("my-embedder:1", family="qwen3"),
        ),
    )
    agent.draining = True
    report = agent.build_report(state, 1_700_000_000.0)
    assert report.node_id == "box" and report.host == socket.gethostname()
    assert report.agent_version == "1.2.3" and report.sent_at == 1_700_000_000.0
    assert report.backend == BackendInfo(
        url="http://192.168.1.9:11434", version="0.13.1", healthy=True
    )
    assert (report.cpu, report.memory, report.disk) == fixed_system()
    assert report.gpus == () and report.in_flight == 0 and report.parallel_slots == 2
    assert report.loaded_models == state.loaded and report.available_models == state.available
    assert report.capabilities.text
    assert report.capabilities.embed_models == (
        "all-minilm:latest",
        "nomic-embed-text:v1.5",
        "my-embedder:1",
    )
    assert report.draining
    assert report_from_data(json.loads(report_to_json(report))["node"]) == report


def test_backend_time_parsing() -> None:
    assert parse_time("2026-01-01T00:00:00Z") == 1767225600.0
    assert parse_time("2026-01-01T00:00:00.123456789+00:00") == pytest.approx(1767225600.123456)
    assert parse_time("2026-01-01T02:00:00.5+02:00") == 1767225600.5
    assert parse_time("2026-01-01T00:00:00.Z") == 1767225600.0
    assert parse_time("0001-01-01T00:00:00Z") is None  # Go's zero time
    assert parse_time("2318-01-01T00:00:00Z") is None  # "forever"
    assert parse_time("9999-12-31T23:59:59Z") is None
    assert parse_time("garbage") is None
    assert parse_time("") is None
    assert parse_time(None) is None


def test_parsers_skip_what_they_cannot_read() -> None:
    assert parse_ps(None) == () and parse_tags([]) == ()
    assert parse_ps({"models": "no"}) == ()
    odd = {"models": [{"name": 3}, "x", {"name": "a", "size": "big", "details": "none"}]}
    assert parse_ps(odd) == (LoadedModel("a"),)
    assert parse_tags(odd) == (AvailableModel("a"),)
    assert parse_ps({"models": [{"name": "b", "size": True, "context_length": 2048.0}]}) == (
        LoadedModel("b", context_length=2048),
    )


def test_memory_pressure_thresholds_and_system_read() -> None:
    assert pressure_for(0.0) is MemoryPressure.NORMAL
    assert pressure_for(84.9) is MemoryPressure.NORMAL
    assert pressure_for(85.0) is MemoryPressure.WARN
    assert pressure_for(94.9) is MemoryPressure.WARN
    assert pressure_for(95.0) is MemoryPressure.CRITICAL
    cpu, memory, disk = read_system()
    assert cpu.cores > 0 and 0.0 <= cpu.percent <= 100.0
    assert memory.total_bytes >= memory.available_bytes > 0
    assert disk.total_bytes >= disk.free_bytes > 0
    assert read_system("/no/such/path")[2] == DiskInfo()


def test_router_url_parsing() -> None:
    assert RouterEndpoint.from_url("http://10.0.0.5:11435") == RouterEndpoint(
        "10.0.0.5", 11435, False, "/fleet/ws"
    )
    assert AgentConfig(router_url="http://10.0.0.5:11435/").ws_url == (
        "ws://10.0.0.5:11435/fleet/ws"
    )
    assert AgentConfig(router_url="https://herd.example/base/").ws_url == (
        "wss://herd.example/base/fleet/ws"
    )
    v6 = RouterEndpoint.from_url("http://[::1]:8080")
    assert (v6.host, v6.host_header) == ("::1", "[::1]:8080")
    for bad in ("10.0.0.5:11435", "ftp://x", "http://", "http://host:99999"):
        with pytest.raises(ValueError, match="router URL"):
            AgentConfig(router_url=bad)


# ---------------------------------------------------------------------------------------------
# The backend probe
# ---------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def probing(url: str) -> AsyncIterator[OllamaBackend]:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield OllamaBackend(url + "/", client)


async def test_probe_reads_a_healthy_backend() -> None:
    with trio.fail_after(10):
        async with fake_ollama() as ollama, probing(ollama.url) as backend:
            state = await backend.probe()
    assert state.info == BackendInfo(url=ollama.url, version="0.13.1", healthy=True)
    assert state.loaded == parse_ps(PS) and state.available == parse_tags(TAGS)
    assert state.available[0] == AvailableModel(
        "llama3.2:3b",
        size_bytes=2019393189,
        family="llama",
        parameter_size="3.2B",
        quantization="Q4_K_M",
        modified_at="2025-11-02T10:00:00.5+01:00",
        digest=TAGS["models"][0]["digest"],
    )


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("http500", ": HTTP 500"), ("garbage", ": answer is not JSON (Expecting value")],
)
async def test_probe_reports_a_broken_backend(mode: str, expected: str) -> None:
    with trio.fail_after(10):
        async with fake_ollama(mode) as ollama, probing(ollama.url) as backend:
            state = await backend.probe()
    assert not state.info.healthy and state.info.version == ""
    assert state.info.error.startswith(ollama.url + "/api/") and expected in state.info.error
    assert "\n" not in state.info.error
    assert state.loaded == () and state.available == ()


async def test_probe_gives_up_on_a_hung_backend_on_time(
    io_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(30):
        async with fake_ollama("hang") as ollama, probing(ollama.url) as backend:
            start = trio.current_time()
            state = await backend.probe()
            assert trio.current_time() - start == pytest.approx(3.0, abs=1e-6)
    assert state.info == BackendInfo(url=ollama.url, error=f"{ollama.url}: no answer within 3 s")


# ---------------------------------------------------------------------------------------------
# Against the real router (both ends of the fleet socket)
# ---------------------------------------------------------------------------------------------

SIM = SimConfig(
    name="n1",
    models=(SimModel("m:latest", size_bytes=GiB, context_length=2048),),
    loaded=("m:latest",),
    version="0.13.1",
)


@contextlib.asynccontextmanager
async def real_router(tmp_path: Path, **options: Any) -> AsyncIterator[Router]:
    config = RouterConfig(host="127.0.0.1", port=0, data_dir=str(tmp_path), **options)
    async with Router(config) as running_router:
        yield running_router


async def fleet_until(r: Router, predicate: Callable[[], bool]) -> None:
    while not predicate():
        await r.state.wait_fleet_changed()


async def test_real_router_registers_the_node(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with real_router(tmp_path) as r, run_sim(SIM) as sim:
            agent = NodeAgent(AgentConfig(router_url=r.url, ollama_url=sim.url, node_id="n1"))
            async with running(agent):
                await r.wait_nodes(1)
                node = r.fleet.nodes[0]
                assert node.status is NodeStatus.ONLINE
                assert node.report.backend.healthy and node.report.backend.url == sim.url
                assert r.state.queues.limiter("n1").total_tokens == 4
                await agent.wait_connected()
                assert agent.last_report is not None
                await agent.drain()  # the router hears it at once, and acts on it
                await fleet_until(r, lambda: r.fleet.nodes[0].report.draining)
                with trio.fail_after(5):
                    await agent.drained.wait()  # nothing in flight: the router says so
            await fleet_until(r, lambda: r.fleet.nodes[0].status is NodeStatus.OFFLINE)


async def test_real_router_refuses_a_node_without_the_token(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with real_router(tmp_path, auth_token="s3cret") as r, run_sim(SIM) as sim:
            stranger = NodeAgent(
                AgentConfig(router_url=r.url, ollama_url=sim.url, node_id="stranger")
            )
            member = NodeAgent(
                AgentConfig(
                    router_url=r.url, ollama_url=sim.url, node_id="member", auth_token="s3cret"
                )
            )
            async with running(stranger), running(member):
                await r.wait_nodes(1)
                await member.wait_connected()
                with trio.move_on_after(0.2):
                    await stranger.wait_connected()
                    pytest.fail("a node without the fleet token got in")
                assert [n.node_id for n in r.fleet.nodes] == ["member"]
                assert stranger.last_error == REFUSED_TOKEN
    gc.collect()


async def test_real_router_marks_a_silent_node_degraded_then_offline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with real_router(tmp_path, heartbeat_timeout=15.0, heartbeat_offline=30.0) as r:
        ws_url = r.url.replace("http://", "ws://") + "/fleet/ws"
        async with open_websocket_url(ws_url) as ws:
            await ws.send_message(report_to_json(NodeReport(node_id="quiet")))
            assert json.loads(await ws.get_message())["type"] == "ack"
            joined = trio.current_time()
            await fleet_until(r, lambda: r.fleet.nodes[0].status is NodeStatus.DEGRADED)
            assert trio.current_time() - joined == pytest.approx(15.0, abs=0.05)
            await fleet_until(r, lambda: r.fleet.nodes[0].status is NodeStatus.OFFLINE)
            assert trio.current_time() - joined == pytest.approx(30.0, abs=0.05)
            # One heartbeat brings it straight back.
            await ws.send_message(report_to_json(NodeReport(node_id="quiet")))
            await fleet_until(r, lambda: r.fleet.nodes[0].status is NodeStatus.ONLINE)
            # A bad message gets an error naming the problem; the session goes on.
            await ws.send_message(
                json.dumps({"type": "heartbeat", "node": {"node_id": "quiet", "bogus": 1}})
            )
            error = json.loads(await ws.get_message())
            assert error["type"] == "error" and "bogus" in error["message"]
            await ws.send_message(report_to_json(NodeReport(node_id="impostor")))
            assert "belongs to node 'quiet'" in json.loads(await ws.get_message())["message"]


async def test_node_service_serves_its_status(tmp_path: Path) -> None:
    from herd import Node, NodeConfig

    with trio.fail_after(10):
        async with real_router(tmp_path) as r, run_sim(SIM) as sim, trio.open_nursery() as nursery:
            node = Node(
                NodeConfig(
                    router_url=r.url,
                    ollama_url=sim.url,
                    node_id="svc",
                    host="127.0.0.1",
                    port=0,
                    data_dir=str(tmp_path),
                )
            )
            await nursery.start(node.run)
            await r.wait_nodes(1)
            assert node.url is not None
            async with httpx.AsyncClient(base_url=node.url) as client:
                assert (await client.get("/")).text == "herd node is running"
                status = (await client.get("/node/status")).json()
            assert status["connected"] is True
            assert status["heartbeats_sent"] >= 1
            assert status["report"]["node_id"] == "svc"
            nursery.cancel_scope.cancel()


async def test_lan_proxy_serves_a_loopback_backend(tmp_path: Path) -> None:
    """The backend listens on 127.0.0.1 only; the router reaches it through the node's port."""
    from herd import Node, NodeConfig

    with trio.fail_after(20):
        async with (
            real_router(tmp_path, auth_token="fleet-secret") as r,
            run_sim(SIM) as sim,
            trio.open_nursery() as nursery,
        ):
            node = Node(
                NodeConfig(
                    router_url=r.url,
                    ollama_url=sim.url,
                    node_id="lan",
                    host="127.0.0.1",
                    port=0,
                    data_dir=str(tmp_path),
                    lan_proxy="always",
                    auth_token="fleet-secret",
                )
            )
            await nursery.start(node.run)
            await r.wait_nodes(1)
            backend = r.fleet.nodes[0].report.backend
            assert backend.proxied is True
            assert backend.url == f"{node.url}/backend" != sim.url
            async with httpx.AsyncClient(base_url=r.url, timeout=10) as client:
                streamed = await client.post(
                    "/api/chat",
                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                )
                lines = [json.loads(line) for line in streamed.text.splitlines()]
                assert lines[-1]["done"] is True and streamed.headers["x-herd-node"] == "lan"
                tags = (await client.get("/api/tags")).json()["models"]
                assert tags[0]["name"] == "m:latest"
            assert sim.requests[-1][0] == "/api/chat"  # it really went to the backend
            assert node.url is not None
            async with httpx.AsyncClient(base_url=node.url) as direct:
                refused = await direct.get("/backend/api/tags")
                assert refused.status_code == 401  # the proxy is for the fleet only
            nursery.cancel_scope.cancel()


def test_lan_proxy_auto_rule() -> None:
    from herd.config import NodeConfig
    from herd.node.service import needs_lan_proxy

    def auto(ollama: str, router_url: str) -> bool:
        return needs_lan_proxy(NodeConfig(router_url=router_url, ollama_url=ollama))

    assert auto("http://localhost:11434", "http://10.0.0.5:11435") is True
    assert auto("http://127.0.0.1:11434", "http://studio.lan:11435") is True
    assert auto("http://localhost:11434", "http://127.0.0.1:11435") is False  # same machine
    assert auto("http://10.0.0.7:11434", "http://10.0.0.5:11435") is False  # reachable as is


async def test_the_fleet_leaves_the_global_random_alone(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Hypothesis (and any program that embeds herd) owns the global ``random``: a test that
    draws data while a router runs beside it fails if the router draws from it too. Pings are
    where a WebSocket library reaches for it; herd pings with its own payloads."""
    from tests.conftest import running_fleet, two_node_specs

    random.seed(1234)
    before = random.getstate()
    async with running_fleet(tmp_path, two_node_specs()) as fleet:
        await trio.sleep(60)  # virtual: twelve heartbeat intervals
        assert all(agent.pings_sent >= 10 for agent in fleet.agents.values())
        async with httpx.AsyncClient(base_url=fleet.url, trust_env=False) as client:
            reply = await client.post(
                "/api/chat",
                json={
                    "model": "llama3.2:3b",
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": False,
                },
            )
            assert reply.status_code == 200
    assert random.getstate() == before
