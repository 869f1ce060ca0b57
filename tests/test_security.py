"""API keys, the fleet token, node identity and slow clients, against a running router."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import h11
import httpx
import openai
import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from herd.cli import flags_of, router_config, serve_parser
from herd.config import RouterConfig
from herd.core.models import NodeReport, NodeStatus
from herd.core.wire import report_to_json
from herd.http.security import Origins, key_ok, presented_key
from herd.http.service import Router
from herd.node.agent import RouterEndpoint
from herd.server import hypercorn_config
from herd.sim import SimConfig
from herd.state.registry import NodeRecord
from tests.conftest import (
    LLAMA_3B,
    Fleet,
    in_thread,
    running_fleet,
    two_node_specs,
    wait_until,
)

KEY = "sk-herd-test-1234"


async def test_api_keys_guard_every_endpoint_but_liveness_and_the_page(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with (
        running_fleet(tmp_path, two_node_specs(), api_keys=(KEY, "other")) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=10, trust_env=False) as client,
    ):
        body = {
            "model": "llama3.2:3b",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": False,
        }
        for path in (
            "/api/tags",
            "/fleet/status",
            "/metrics",
            "/dashboard/api/overview",
            "/dashboard/events",
        ):
            response = await client.get(path)
            assert response.status_code == 401, path
        ollama_shape = await client.post("/api/chat", json=body)
        assert ollama_shape.status_code == 401
        assert "API key" in ollama_shape.json()["error"]
        openai_shape = await client.post("/v1/chat/completions", json=body)
        assert openai_shape.json()["error"]["type"] == "authentication_error"
        wrong = await client.post("/api/chat", json=body, headers={"Authorization": "Bearer no"})
        assert wrong.status_code == 401
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-Api-Key": "other"}):
            ok = await client.post("/api/chat", json=body, headers=headers)
            assert ok.status_code == 200
        assert (await client.get("/")).status_code == 200
        assert (await client.get("/dashboard")).status_code == 200
        # A key in the URL is taken only by the event stream (browsers' EventSource can't send
        # headers); anywhere else it would end up in logs and histories.
        assert (await client.get(f"/dashboard/api/overview?key={KEY}")).status_code == 401
        async with client.stream("GET", f"/dashboard/events?key={KEY}") as events:
            assert events.status_code == 200
        # The OpenAI SDK's api_key is exactly what the router wants.
        with openai.OpenAI(base_url=fleet.url + "/v1", api_key=KEY, max_retries=0) as sdk:
            reply = await in_thread(
                lambda: sdk.chat.completions.create(
                    model="llama3.2:3b", messages=[{"role": "user", "content": "hi"}]
                )
            )
            assert reply.choices[0].message.content
        with (
            openai.OpenAI(base_url=fleet.url + "/v1", api_key="wrong", max_retries=0) as sdk,
            pytest.raises(openai.AuthenticationError),
        ):
            await in_thread(lambda: sdk.models.list())
    # herd never logs a key (the test's own HTTP client logs its URLs; those don't count).
    herd_lines = [r.getMessage() for r in caplog.records if r.name.startswith("herd")]
    assert herd_lines and not any("sk-herd" in line for line in herd_lines)


def test_key_extraction_and_comparison() -> None:
    def scope(
        headers: list[tuple[bytes, bytes]], query: bytes = b"", path: str = "/api/tags"
    ) -> dict[str, object]:
        return {"headers": headers, "query_string": query, "path": path}

    assert presented_key(scope([(b"authorization", b"Bearer abc")])) == "abc"
    assert presented_key(scope([(b"x-api-key", b" abc ")])) == "abc"
    assert presented_key(scope([], b"key=abc&hours=24", "/dashboard/events")) == "abc"
    assert presented_key(scope([], b"key=abc&hours=24", "/dashboard/api/traces")) is None
    assert presented_key(scope([(b"authorization", b"Basic abc")])) is None
    assert key_ok(("a", "b"), "b") and not key_ok(("a",), None) and not key_ok(("a",), "ab")


async def test_limits_answer_in_the_callers_shape(tmp_path: Path) -> None:
    from herd.http import handler

    async with (
        running_fleet(tmp_path, two_node_specs()) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=10, trust_env=False) as client,
    ):
        many = [{"role": "user", "content": "x"}] * 10_001
        response = await client.post("/api/chat", json={"model": "llama3.2:3b", "messages": many})
        assert response.status_code == 400 and "too many messages" in response.json()["error"]
        # One client with too much in flight gets 429 (the limit lowered for the test).
        original = handler.PER_CLIENT_LIMIT
        handler.PER_CLIENT_LIMIT = 0
        try:
            limited = await client.post(
                "/v1/chat/completions",
                json={"model": "llama3.2:3b", "messages": [{"role": "user", "content": "x"}]},
            )
        finally:
            handler.PER_CLIENT_LIMIT = original
        assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
        assert limited.json()["error"]["type"] == "rate_limit_error"
        huge_header = await client.get("/api/tags", headers={"X-Big": "x" * 100_000})
        assert huge_header.status_code in (400, 431)
        assert (await client.get("/api/tags")).status_code == 200  # still serving


# ---------------------------------------------------------------------------------------------
# The fleet socket: who may join, and as whom
# ---------------------------------------------------------------------------------------------

TOKEN = "s3cret-fleet-token"


@pytest.fixture
def io_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 20 ms of real idleness, so loopback I/O in flight
    is never mistaken for "everyone is asleep"."""
    return trio.testing.MockClock(autojump_threshold=0.02)


@contextlib.asynccontextmanager
async def fleet_socket(
    router_url: str, token: str | None = None
) -> AsyncIterator[WebSocketConnection]:
    """A raw node socket to the router, opened as the agent opens it: on our own TCP stream,
    closed even when the handshake is refused."""
    endpoint = RouterEndpoint.from_url(router_url)
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery, stream, endpoint.host_header, endpoint.resource, extra_headers=headers
            )
            try:
                yield ws
            finally:
                await ws.aclose()
    finally:
        await stream.aclose()


def record_of(fleet: Fleet, node_id: str) -> NodeRecord:
    record = fleet.router.state.registry.get(node_id)
    assert record is not None, node_id
    return record


async def join(ws: WebSocketConnection, node_id: str) -> None:
    await ws.send_message(report_to_json(NodeReport(node_id=node_id)))
    reply = json.loads(await ws.get_message())
    assert reply["type"] == "ack" and reply["node_id"] == node_id


async def test_fleet_handshake_without_the_token_is_refused_with_401(tmp_path: Path) -> None:
    refused_401 = pytest.RaisesExc(
        ConnectionRejected,
        check=lambda e: e.status_code == 401 and e.body == b"fleet token required\n",
    )
    with trio.fail_after(10):
        async with running_fleet(tmp_path, [], auth_token=TOKEN) as fleet:
            for token in (None, "wrong-token"):
                # Refused before the socket is accepted: an HTTP answer, not a close frame.
                with pytest.RaisesGroup(refused_401, flatten_subgroups=True):
                    async with fleet_socket(fleet.url, token):
                        pass
            assert [node.node_id for node in fleet.router.fleet.nodes] == []
            async with fleet_socket(fleet.url, TOKEN) as ws:
                await join(ws, "member")
                assert [node.node_id for node in fleet.router.fleet.nodes] == ["member"]
    gc.collect()  # a socket leaked by a refused handshake would warn (= fail) here


@pytest.mark.parametrize("token", [None, TOKEN])
async def test_a_second_socket_cannot_take_over_a_connected_node(
    tmp_path: Path, token: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        async with (
            running_fleet(tmp_path, [], auth_token=token) as fleet,
            fleet_socket(fleet.url, token) as first,
        ):
            state = fleet.router.state
            await join(first, "alpha")
            session = record_of(fleet, "alpha").session
            async with fleet_socket(fleet.url, token) as impostor:
                await impostor.send_message(report_to_json(NodeReport(node_id="alpha")))
                with pytest.raises(ConnectionClosed) as info:
                    await impostor.get_message()
            reason = info.value.reason
            assert reason is not None and reason.code == 1008
            assert reason.reason == "node id 'alpha' is already connected from another session"
            # The first session goes on: still the node's, online, and the router's commands
            # for the node still reach it.
            assert record_of(fleet, "alpha").session is session
            assert record_of(fleet, "alpha").status is NodeStatus.ONLINE
            assert state.command("alpha", {"type": "command", "command": "heartbeat"})
            assert json.loads(await first.get_message())["command"] == "heartbeat"
            await first.send_message(report_to_json(NodeReport(node_id="alpha")))
            await wait_until(lambda: state.registry.statistics().heartbeats == 2)
            assert record_of(fleet, "alpha").session is session
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("second connection for node alpha" in r.getMessage() for r in warnings)


@pytest.mark.parametrize("token", [None, TOKEN])
async def test_a_node_whose_socket_closed_rejoins_at_once(
    tmp_path: Path, token: str | None
) -> None:
    with trio.fail_after(10):
        async with running_fleet(tmp_path, [], auth_token=token) as fleet:
            async with fleet_socket(fleet.url, token) as before_restart:
                await join(before_restart, "alpha")
            await wait_until(lambda: record_of(fleet, "alpha").status is NodeStatus.OFFLINE)
            async with fleet_socket(fleet.url, token) as after_restart:
                await join(after_restart, "alpha")
                assert fleet.router.fleet.nodes[0].status is NodeStatus.ONLINE


async def test_a_node_silent_past_offline_is_replaced_and_its_old_socket_closed(
    tmp_path: Path, io_clock: trio.testing.MockClock
) -> None:
    # The old socket is still open (a crashed machine's half-open connection), but the node
    # has sent nothing for heartbeat_offline: the node restarting must not be locked out.
    # (Deadlines start once the router is up: virtual time would leap to any deadline while
    # its database opens in a thread.)
    async with running_fleet(tmp_path, [], heartbeat_offline=30.0) as fleet:
        with trio.fail_after(120):
            async with fleet_socket(fleet.url) as stale:
                state = fleet.router.state
                await join(stale, "alpha")
                joined = trio.current_time()
                async with fleet_socket(fleet.url) as early:
                    await early.send_message(report_to_json(NodeReport(node_id="alpha")))
                    with pytest.raises(ConnectionClosed):
                        await early.get_message()  # still heartbeating recently: refused
                while record_of(fleet, "alpha").status is not NodeStatus.OFFLINE:
                    await state.wait_fleet_changed()
                assert trio.current_time() - joined == pytest.approx(30.0, abs=0.05)
                async with fleet_socket(fleet.url) as restarted:
                    await join(restarted, "alpha")
                    with pytest.raises(ConnectionClosed):
                        await stale.get_message()  # the router ended the stale session
                    assert record_of(fleet, "alpha").status is NodeStatus.ONLINE
                    assert state.command("alpha", {"type": "command", "command": "heartbeat"})
                    assert json.loads(await restarted.get_message())["command"] == "heartbeat"


# ---------------------------------------------------------------------------------------------
# Slow clients
# ---------------------------------------------------------------------------------------------


def address(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").rpartition(":")
    return host, int(port)


@attrs.frozen
class SlowAnswer:
    status: int
    body: bytes
    after: float  # seconds from connecting to the answer
    closed: bool  # the router closed the connection after answering


async def send_body_slowly(url: str, path: str) -> SlowAnswer:
    """Declare a 1000-byte body, send 9 bytes of it, and never send the rest."""
    connection = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream(*address(url))
    async with stream:
        start = trio.current_time()
        request = h11.Request(
            method="POST",
            target=path,
            headers=[
                ("Host", "router"),
                ("Content-Type", "application/json"),
                ("Content-Length", "1000"),
            ],
        )
        await stream.send_all(
            connection.send(request) + connection.send(h11.Data(data=b'{"model":'))
        )
        status, body = 0, b""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some())
            elif isinstance(event, h11.Response):
                status, after = event.status_code, trio.current_time() - start
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        closed = await stream.receive_some() == b""
    return SlowAnswer(status, body, after, closed)


async def send_headers_slowly(url: str) -> float:
    """Send a request line, then one more header line every 10 s, forever. Returns how long
    the router kept the connection open."""
    stream = await trio.open_tcp_stream(*address(url))
    async with stream, trio.open_nursery() as nursery:
        start = trio.current_time()

        async def dribble() -> None:
            await stream.send_all(b"POST /api/chat HTTP/1.1\r\nHost: router\r\n")
            with contextlib.suppress(trio.BrokenResourceError):
                while True:
                    await trio.sleep(10)  # virtual: the test runs on io_clock (a MockClock)
                    await stream.send_all(b"X-Slow: 1\r\n")

        nursery.start_soon(dribble)
        with contextlib.suppress(trio.BrokenResourceError):  # closed, or reset
            while await stream.receive_some():
                pass
        nursery.cancel_scope.cancel()
        return trio.current_time() - start


async def test_slow_clients_are_cut_but_a_long_stream_is_not(
    tmp_path: Path, io_clock: trio.testing.MockClock
) -> None:
    slow = attrs.evolve(LLAMA_3B, tokens_per_second=1.0)  # 120 tokens: two virtual minutes
    spec = SimConfig(name="slow", models=(slow,), loaded=(slow.name,))
    answers: dict[str, SlowAnswer] = {}
    streamed: list[dict[str, object]] = []
    # (Deadlines start once the router is up; see the test above.)
    async with running_fleet(tmp_path, [spec], body_timeout=30.0) as fleet:
        with trio.fail_after(600):

            async def long_stream() -> None:
                body = {"model": slow.name, "prompt": "hi", "options": {"num_predict": 120}}
                async with (
                    httpx.AsyncClient(base_url=fleet.url, timeout=None, trust_env=False) as c,
                    c.stream("POST", "/api/generate", json=body) as response,
                ):
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line:
                            streamed.append({"at": trio.current_time(), **json.loads(line)})

            async def slow_body(path: str) -> None:
                answers[path] = await send_body_slowly(fleet.url, path)

            held: list[float] = []

            async def slow_headers() -> None:
                held.append(await send_headers_slowly(fleet.url))

            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_stream)
                nursery.start_soon(slow_body, "/api/chat")
                nursery.start_soon(slow_body, "/v1/chat/completions")
                nursery.start_soon(slow_headers)
            await wait_until(fleet.counters_idle)
            assert fleet.router.state.queues.statistics().done == 1

    # The body deadline: 408 at 30 s in the caller's API shape, and the connection closed.
    ollama, openai_shape = answers["/api/chat"], answers["/v1/chat/completions"]
    for answer in (ollama, openai_shape):
        assert answer.status == 408 and answer.closed
        assert answer.after == pytest.approx(30.0, abs=0.1)
    assert "body not received within 30 s" in json.loads(ollama.body)["error"]
    error = json.loads(openai_shape.body)["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_timeout")
    # Headers that never finish: hypercorn's keep-alive timer runs until a whole request head
    # has arrived, and trickled bytes don't reset it.
    assert held == [pytest.approx(hypercorn_config("127.0.0.1", 0).keep_alive_timeout, abs=0.1)]
    # The stream ran four times the body deadline and past the keep-alive time, uncut.
    assert streamed[-1]["done"] is True and len(streamed) == 121
    assert streamed[-1]["at"] - start == pytest.approx(120.0, abs=1.0)  # type: ignore[operator]


def test_the_origins_allowed_by_default_are_ollamas() -> None:
    """Local pages on any port and the desktop-app schemes Ollama allows; not browser
    extensions (any installed one could call the fleet) until an operator lists them."""
    default = Origins()
    for origin in (
        "http://localhost:3000",
        "https://127.0.0.1:8443",
        "http://0.0.0.0",
        "app://obsidian.md",
        "file://",
        "tauri://localhost",
        "vscode-webview://1a2b3c",
        "vscode-file://vscode-app",
    ):
        assert default.allowed(origin), origin
    for origin in (
        "https://evil.example",
        "http://localhost.evil.example",
        "chrome-extension://abcdefgh",
        "moz-extension://1234",
    ):
        assert not default.allowed(origin), origin
    listed = Origins(("chrome-extension://abcdefgh", "https://*.example.com"))
    assert listed.allowed("chrome-extension://abcdefgh")
    assert not listed.allowed("chrome-extension://other")
    assert listed.allowed("https://chat.example.com") and not listed.allowed("http://example.com")


def config_from(argv: list[str], environ: dict[str, str]) -> RouterConfig:
    """The router's configuration exactly as ``herd ARGV`` builds it in that environment."""
    return router_config(flags_of(serve_parser("herd", "router").parse_args(argv)), environ)


async def preflight(
    client: httpx.AsyncClient, origin: str, path: str = "/api/chat"
) -> httpx.Response:
    return await client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
        },
    )


async def test_origins_from_flags_and_both_environment_variables_reach_the_router(
    tmp_path: Path,
) -> None:
    base = ["--data-dir", str(tmp_path), "--host", "127.0.0.1", "--port", "0"]
    ollama_ui = {"OLLAMA_ORIGINS": "https://ollama-ui.example, https://*.ollama.example"}
    flagged = config_from([*base, "--origins", "https://chat.example.com"], ollama_ui)
    assert flagged.origins == (
        "https://chat.example.com",
        "https://ollama-ui.example",
        "https://*.ollama.example",
    )
    from_env = config_from(base, {"FLEET_ORIGINS": "https://a.example,https://b.example"})
    assert from_env.origins == ("https://a.example", "https://b.example")
    # The flag beats FLEET_ORIGINS; OLLAMA_ORIGINS adds to whichever was chosen.
    both = config_from(
        [*base, "--origins", "https://chat.example.com"],
        {"FLEET_ORIGINS": "https://a.example", **ollama_ui},
    )
    assert both.origins == flagged.origins
    assert config_from(base, {}).origins == ()

    async with (
        Router(flagged) as router,
        httpx.AsyncClient(base_url=router.url, timeout=10, trust_env=False) as client,
    ):
        for origin in (
            "https://chat.example.com",  # --origins
            "https://ollama-ui.example",  # OLLAMA_ORIGINS
            "https://team.ollama.example",  # OLLAMA_ORIGINS, by its wildcard
            "http://localhost:3000",  # the defaults stay
        ):
            allowed = await preflight(client, origin)
            assert allowed.status_code == 204, origin
            assert allowed.headers["access-control-allow-origin"] == origin
            assert "POST" in allowed.headers["access-control-allow-methods"]
            assert allowed.headers["access-control-allow-headers"] == "content-type, authorization"
        # A browser extension only once listed, as in Ollama.
        assert (await preflight(client, "chrome-extension://abcdefghijklmnop")).status_code == 403
        refused = await preflight(client, "https://evil.example")
        assert refused.status_code == 403
        assert "access-control-allow-origin" not in refused.headers
        assert refused.json() == {"error": "origin 'https://evil.example' is not allowed"}
        # The settings endpoint is never opened to another origin, allowed or not.
        settings = await preflight(client, "https://chat.example.com", "/dashboard/api/settings")
        assert settings.status_code == 403
        assert "access-control-allow-origin" not in settings.headers
        # A real request from an allowed origin gets its answer with the CORS headers.
        listed = await client.get("/api/tags", headers={"Origin": "https://ollama-ui.example"})
        assert listed.status_code == 200
        assert listed.headers["access-control-allow-origin"] == "https://ollama-ui.example"
        assert "X-Herd-Node" in listed.headers["access-control-expose-headers"]
