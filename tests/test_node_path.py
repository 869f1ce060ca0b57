"""The node path: the router → the node's port (LAN proxy, OpenAI-compatible facade) → its backend.

Everything is real HTTP on 127.0.0.1: a real router, a real :class:`~herd.node.service.Node`
and the simulated Ollama (``herd.sim``) as the loopback-only backend. Tests with cold loads and
slow streams run on a virtual clock that jumps only after 20 ms of real idleness (real sockets
need a moment to deliver): a 12 s cold load takes 12 virtual seconds.

What they pin down: the node puts no deadline of its own on its backend's answer (the router
judges time), it passes a client's departure on by closing its backend request, and every error
it answers is Ollama-shaped JSON with herd's status for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from quart import Response

from herd.config import NodeConfig, RouterConfig
from herd.http.service import Router
from herd.node.service import Node, create_node_app
from herd.node.upstream import backend_client
from herd.server import serve_app
from herd.sim import SimConfig, SimModel, run_sim

COLD_LOAD_SECONDS = 12.0  # over twice httpx's default 5 s timeout
COLD = SimModel("cold:latest", load_seconds=COLD_LOAD_SECONDS)
COLDER = SimModel("colder:latest", load_seconds=COLD_LOAD_SECONDS)
SLOW = SimModel("slow:latest", tokens_per_second=1.0)
SLOWER = SimModel("slower:latest", tokens_per_second=0.2)  # a token every 5 s
HELLO = [{"role": "user", "content": "hi"}]
POLL_SECONDS = 0.1  # virtual: waiting for another server's counters to move


@pytest.fixture
def io_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 20 ms of real idleness: loopback I/O in flight is
    never mistaken for "everyone is asleep"."""
    return trio.testing.MockClock(autojump_threshold=0.02)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextlib.asynccontextmanager
async def real_router(tmp_path: Path, **options: Any) -> AsyncIterator[Router]:
    """A router with a default config but for ``options``. Start it before any deadline is
    set: it opens its database in a worker thread, and the virtual clock, seeing every task
    blocked meanwhile, would jump straight to that deadline."""
    config = RouterConfig(host="127.0.0.1", port=0, data_dir=str(tmp_path / "router"), **options)
    async with Router(config) as router:
        yield router


@contextlib.asynccontextmanager
async def node_serving(
    tmp_path: Path, router_url: str, backend_url: str, **options: Any
) -> AsyncIterator[Node]:
    """A node serving ``backend_url`` through its own port (``lan_proxy="always"``)."""
    node = Node(
        NodeConfig(
            router_url=router_url,
            ollama_url=backend_url,
            node_id="lan",
            host="127.0.0.1",
            port=0,
            data_dir=str(tmp_path / "node"),
            lan_proxy="always",
            **options,
        )
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        yield node
        nursery.cancel_scope.cancel()


async def until(predicate: Callable[[], bool]) -> None:
    """Wait for another server's counters (the sim's, which have no events) to say what we
    expect, looking every virtual tenth of a second; the caller's ``fail_after`` bounds it."""
    while True:
        if predicate():
            return
        await trio.sleep(POLL_SECONDS)


def ndjson(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# No deadline of the node's own
# ---------------------------------------------------------------------------------------------


async def test_a_cold_load_over_five_seconds_passes_the_lan_proxy(
    tmp_path: Path, io_clock: trio.testing.MockClock
) -> None:
    """With a default router config, a 12 s cold load behind the LAN proxy is served, streamed
    and not: the node waits for its backend as long as the router does."""
    sim_config = SimConfig(name="lan", models=(COLD, COLDER))
    async with real_router(tmp_path) as router:
        with trio.fail_after(300):
            async with (
                run_sim(sim_config) as sim,
                node_serving(tmp_path, router.url, sim.url),
                httpx.AsyncClient(base_url=router.url, timeout=None, trust_env=False) as client,
            ):
                await router.wait_nodes(1)
                assert router.fleet.nodes[0].report.backend.proxied
                asked = trio.current_time()
                streamed = await client.post("/api/chat", json={"model": "cold", "messages": HELLO})
                assert trio.current_time() - asked >= COLD_LOAD_SECONDS  # it really waited
                whole = await client.post(
                    "/api/chat", json={"model": "colder", "messages": HELLO, "stream": False}
                )
    assert streamed.status_code == 200 and streamed.headers["x-herd-node"] == "lan"
    lines = ndjson(streamed.text)
    assert lines[-1]["done"] is True and "error" not in lines[-1]
    assert lines[-1]["load_duration"] == int(COLD_LOAD_SECONDS * 1e9)
    assert "".join(line["message"]["content"] for line in lines).strip()
    assert whole.status_code == 200
    answer = whole.json()
    assert answer["done"] is True and answer["message"]["content"].strip()
    assert answer["load_duration"] == int(COLD_LOAD_SECONDS * 1e9)
    assert sim.cold_loads == 2 and sim.disconnects == 0


async def test_a_stream_longer_than_a_minute_passes_the_lan_proxy(
    tmp_path: Path, io_clock: trio.testing.MockClock
) -> None:
    """Quart cuts a response at 60 s unless told otherwise; the node tells it otherwise."""
    sim_config = SimConfig(name="lan", models=(SLOWER,), loaded=("slower:latest",))
    with trio.fail_after(300):
        async with (
            run_sim(sim_config) as sim,
            node_serving(tmp_path, closed_port_url(), sim.url) as node,
            httpx.AsyncClient(base_url=f"{node.url}/backend", timeout=None) as client,
        ):
            asked = trio.current_time()
            reply = await client.post(
                "/api/chat",
                json={"model": "slower", "messages": HELLO, "options": {"num_predict": 13}},
            )
            assert trio.current_time() - asked >= 65  # virtual seconds, 5 per token
    lines = ndjson(reply.text)
    assert reply.status_code == 200 and len(lines) == 14
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 13


# ---------------------------------------------------------------------------------------------
# Leaving: the client's departure reaches the backend
# ---------------------------------------------------------------------------------------------


async def test_a_client_leaving_mid_stream_closes_the_backend_stream(
    tmp_path: Path, io_clock: trio.testing.MockClock
) -> None:
    sim_config = SimConfig(name="lan", models=(SLOW,), loaded=("slow:latest",))
    with trio.fail_after(120):
        async with (
            run_sim(sim_config) as sim,
            node_serving(tmp_path, closed_port_url(), sim.url) as node,
            httpx.AsyncClient(base_url=f"{node.url}/backend", timeout=None) as client,
        ):
            body = {"model": "slow", "messages": HELLO, "options": {"num_predict": 1000}}
            async with client.stream("POST", "/api/chat", json=body) as response:
                lines = response.aiter_lines()
                first = json.loads(await lines.__anext__())
                assert first["done"] is False and sim.open_streams == 1
            # Closing an unfinished response drops the connection to the node.
            await until(lambda: sim.disconnects == 1)
            assert sim.open_streams == 0


async def test_a_client_leaving_during_a_cold_load_closes_the_backend_request(
    tmp_path: Path, io_clock: trio.testing.MockClock
) -> None:
    sim_config = SimConfig(name="lan", models=(COLD,))
    with trio.fail_after(120):
        async with (
            run_sim(sim_config) as sim,
            node_serving(tmp_path, closed_port_url(), sim.url) as node,
            httpx.AsyncClient(base_url=f"{node.url}/backend", timeout=None) as client,
        ):
            with trio.move_on_after(3):  # before the backend's first byte
                await client.post("/api/chat", json={"model": "cold", "messages": HELLO})
                pytest.fail("the cold load answered before the client left")
            await until(lambda: sim.disconnects == 1)
            assert sim.open_streams == 0 and sim.cold_loads == 0  # the load was abandoned


async def test_the_router_giving_up_closes_the_backend_request(
    tmp_path: Path, io_clock: trio.testing.MockClock
) -> None:
    """The router judges the first byte (``first_byte_timeout``) and gives up by closing its
    connection to the node; the node closes its backend request in turn."""
    sim_config = SimConfig(name="lan", models=(COLD,))
    async with real_router(tmp_path, first_byte_timeout=3.0, max_retries=0) as router:
        with trio.fail_after(300):
            async with (
                run_sim(sim_config) as sim,
                node_serving(tmp_path, router.url, sim.url),
                httpx.AsyncClient(base_url=router.url, timeout=None, trust_env=False) as client,
            ):
                await router.wait_nodes(1)
                reply = await client.post(
                    "/api/chat", json={"model": "cold", "messages": HELLO, "stream": False}
                )
                await until(lambda: sim.disconnects == 1)
                assert sim.open_streams == 0 and sim.cold_loads == 0
    assert reply.status_code == 504
    assert "sent no first byte within 3 s" in reply.json()["error"]


# ---------------------------------------------------------------------------------------------
# Errors: JSON in Ollama's shape, herd's status
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["ollama", "openai"])
async def test_a_backend_that_is_down_answers_json_502_naming_the_exception(
    tmp_path: Path, backend: str
) -> None:
    with trio.fail_after(20):
        async with (
            node_serving(tmp_path, closed_port_url(), closed_port_url(), backend=backend) as node,
            httpx.AsyncClient(base_url=f"{node.url}/backend", trust_env=False) as client,
        ):
            reply = await client.post("/api/chat", json={"model": "m", "messages": HELLO})
    assert reply.status_code == 502
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["error"].startswith("backend unreachable: ConnectError: ")


async def test_the_node_app_answers_json_for_any_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Unknown paths, wrong methods, bodies over the limit (Werkzeug's HTTP errors) and bugs
    (any other exception) all answer Ollama's JSON with the right status, never HTML."""
    caplog.set_level(logging.ERROR, logger="herd.node")
    node = Node(NodeConfig(router_url=closed_port_url(), data_dir=str(tmp_path)))
    with trio.fail_after(20):
        async with backend_client() as backend, trio.open_nursery() as nursery:
            app = create_node_app(node, backend)
            app.config["MAX_CONTENT_LENGTH"] = 1024

            @app.get("/node/bug")
            async def bug() -> Response:
                raise RuntimeError("the unexpected")

            url = await nursery.start(serve_app, app, "127.0.0.1", 0)
            async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
                replies = {
                    "missing": await client.get("/no/such/path"),
                    "method": await client.put("/node/status"),
                    "large": await client.post("/node/image", content=b"{}" + b" " * 2048),
                    "bug": await client.get("/node/bug"),
                }
            nursery.cancel_scope.cancel()
    for reply in replies.values():
        assert reply.headers["content-type"] == "application/json"
    assert replies["missing"].status_code == 404
    assert replies["missing"].json() == {"error": "no such endpoint: GET /no/such/path"}
    assert replies["method"].status_code == 405
    assert replies["method"].json() == {"error": "Method Not Allowed: PUT /node/status"}
    assert "GET" in replies["method"].headers["allow"]
    assert replies["large"].status_code == 413
    assert replies["large"].json() == {"error": "request body too large: POST /node/image"}
    assert replies["bug"].status_code == 500
    assert replies["bug"].json() == {
        "error": "internal error in herd-node: RuntimeError: the unexpected"
    }
    logged = [r for r in caplog.records if r.getMessage() == "GET /node/bug failed"]
    assert len(logged) == 1 and logged[0].exc_info is not None  # with its traceback


async def test_a_backend_breaking_its_answer_is_passed_on(
    tmp_path: Path, io_clock: trio.testing.MockClock
) -> None:
    """A broken NDJSON stream ends with an Ollama error line naming the exception; a broken
    answer of any other kind is cut off, never passed on as a short but whole-looking one."""
    sim_config = SimConfig(name="lan", models=(SLOW,), loaded=("slow:latest",))
    with trio.fail_after(120):
        async with (
            run_sim(sim_config) as sim,
            node_serving(tmp_path, closed_port_url(), sim.url) as node,
            httpx.AsyncClient(base_url=f"{node.url}/backend", timeout=None) as client,
        ):
            sim.fail("die_mid_stream", times=1, after_chunks=2)
            streamed = await client.post("/api/chat", json={"model": "slow", "messages": HELLO})
            sim.fail("die_mid_stream", times=1)
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post(
                    "/api/chat", json={"model": "slow", "messages": HELLO, "stream": False}
                )
    lines = ndjson(streamed.text)
    assert streamed.status_code == 200 and [line["done"] for line in lines[:2]] == [False, False]
    assert lines[2:] == [
        {
            "error": "backend broke the stream: RemoteProtocolError: "
            "peer closed connection without sending complete message body "
            "(incomplete chunked read)"
        }
    ]
