"""The node agent and the router's side of the fleet socket: heartbeats, states, reconnects."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from trio_websocket import open_websocket_url

from herd.config import RouterConfig
from herd.models import NodeReport, NodeStatus
from herd.node.agent import AgentConfig, NodeAgent
from herd.node.backend import OllamaBackend, parse_time
from herd.router.service import Router
from herd.sim import SimConfig, SimModel, run_sim
from herd.wire import report_from_data, report_to_json

GiB = 2**30
SPEC = SimConfig(
    name="n1",
    models=(SimModel("m:latest", size_bytes=GiB, context_length=2048),),
    loaded=("m:latest",),
    version="0.13.1",
)


@contextlib.asynccontextmanager
async def router(tmp_path: Path, **options: object) -> AsyncIterator[Router]:
    config = RouterConfig(host="127.0.0.1", port=0, data_dir=str(tmp_path), **options)  # type: ignore[arg-type]
    async with Router(config) as running:
        yield running


async def until(r: Router, predicate: Callable[[], bool]) -> None:
    while not predicate():
        await r.state.wait_fleet_changed()


async def test_heartbeat_carries_the_node_report(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with router(tmp_path) as r, run_sim(SPEC) as sim, trio.open_nursery() as nursery:
            agent = NodeAgent(
                AgentConfig(router_url=r.url, ollama_url=sim.url, node_id="n1", parallel_slots=3)
            )
            await nursery.start(agent.run)
            await r.wait_nodes(1)
            node = r.fleet.nodes[0]
            report = node.report
            assert node.status is NodeStatus.ONLINE
            assert report.backend.healthy and report.backend.version == "0.13.1"
            assert report.backend.url == sim.url
            assert [(m.name, m.context_length) for m in report.loaded_models] == [
                ("m:latest", 2048)
            ]
            assert [m.name for m in report.available_models] == ["m:latest"]
            assert report.memory.total_bytes > 0 and report.cpu.cores > 0
            assert report.parallel_slots == 3
            assert r.state.queues.limiter("n1").total_tokens == 3
            assert agent.statistics().connected
            # The payload survives the wire unchanged.
            assert agent.last_report is not None
            wire = json.loads(report_to_json(agent.last_report))
            assert report_from_data(wire["node"]) == agent.last_report
            nursery.cancel_scope.cancel()


async def test_drain_is_announced_at_once_and_socket_close_is_offline(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with router(tmp_path, heartbeat_interval=60.0) as r, run_sim(SPEC) as sim:
            async with trio.open_nursery() as nursery:
                agent = NodeAgent(
                    AgentConfig(
                        router_url=r.url, ollama_url=sim.url, node_id="n1", heartbeat_interval=60.0
                    )
                )
                await nursery.start(agent.run)
                await r.wait_nodes(1)
                await agent.drain()  # no waiting for the next 60 s heartbeat
                await until(r, lambda: r.fleet.nodes[0].report.draining)
                nursery.cancel_scope.cancel()
            await until(r, lambda: r.fleet.nodes[0].status is NodeStatus.OFFLINE)


async def test_backend_down_is_reported(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with router(tmp_path) as r, trio.open_nursery() as nursery:
            agent = NodeAgent(
                AgentConfig(router_url=r.url, ollama_url="http://127.0.0.1:9", node_id="dead")
            )
            await nursery.start(agent.run)
            await r.wait_nodes(1)
            backend = r.fleet.nodes[0].report.backend
            assert not backend.healthy
            assert "127.0.0.1:9" in backend.error
            async with httpx.AsyncClient(base_url=r.url) as client:
                response = await client.post("/api/chat", json={"model": "m", "messages": []})
            assert response.status_code == 404  # nothing reachable has the model
            nursery.cancel_scope.cancel()


async def test_fleet_token_is_required_when_set(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with router(tmp_path, auth_token="s3cret") as r, run_sim(SPEC) as sim:
            async with trio.open_nursery() as nursery:
                stranger = NodeAgent(
                    AgentConfig(
                        router_url=r.url,
                        ollama_url=sim.url,
                        node_id="stranger",
                        backoff_initial=0.05,
                    )
                )
                await nursery.start(stranger.run)
                member = NodeAgent(
                    AgentConfig(
                        router_url=r.url, ollama_url=sim.url, node_id="member", auth_token="s3cret"
                    )
                )
                await nursery.start(member.run)
                await r.wait_nodes(1)
                while stranger.reconnects < 2:
                    await trio.testing.wait_all_tasks_blocked(0.01)
                assert [n.node_id for n in r.fleet.nodes] == ["member"]
                assert stranger.last_error is not None
                nursery.cancel_scope.cancel()


async def test_reconnect_backoff_doubles_to_the_cap(autojump_clock: trio.testing.MockClock) -> None:
    # Nothing listens on port 9: every attempt is refused at once; the waits between are exact.
    agent = NodeAgent(
        AgentConfig(
            router_url="http://127.0.0.1:9",
            ollama_url="http://127.0.0.1:9",
            backoff_initial=0.5,
            backoff_max=4.0,
            backoff_jitter=0.0,
        )
    )
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(agent.run)
        while agent.reconnects < 5:  # noqa: ASYNC110 - watched from outside, virtual time
            await trio.sleep(0.01)
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    # 0.5 + 1 + 2 + 4 + 4 (capped), plus the polling granularity above.
    assert elapsed == pytest.approx(11.5, abs=0.02)
    assert agent.last_error is not None


async def test_silent_node_goes_degraded_then_offline_on_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with router(tmp_path, heartbeat_timeout=15.0, heartbeat_offline=30.0) as r:
        ws_url = r.url.replace("http://", "ws://") + "/fleet/ws"
        async with open_websocket_url(ws_url) as ws:
            await ws.send_message(report_to_json(NodeReport(node_id="quiet")))
            assert json.loads(await ws.get_message())["type"] == "ack"
            joined = trio.current_time()
            await until(r, lambda: r.fleet.nodes[0].status is NodeStatus.DEGRADED)
            assert trio.current_time() - joined == pytest.approx(15.0, abs=0.05)
            await until(r, lambda: r.fleet.nodes[0].status is NodeStatus.OFFLINE)
            assert trio.current_time() - joined == pytest.approx(30.0, abs=0.05)
            # One heartbeat brings it straight back.
            await ws.send_message(report_to_json(NodeReport(node_id="quiet")))
            await until(r, lambda: r.fleet.nodes[0].status is NodeStatus.ONLINE)
            # A bad message gets an error naming the problem; the session goes on.
            await ws.send_message(
                json.dumps({"type": "heartbeat", "node": {"node_id": "quiet", "bogus": 1}})
            )
            error = json.loads(await ws.get_message())
            assert error["type"] == "error" and "bogus" in error["message"]
            await ws.send_message(report_to_json(NodeReport(node_id="impostor")))
            assert "belongs to node 'quiet'" in json.loads(await ws.get_message())["message"]


def test_backend_time_parsing() -> None:
    assert parse_time("2026-01-01T00:00:00Z") == 1767225600.0
    assert parse_time("2026-01-01T00:00:00.123456789+00:00") == pytest.approx(1767225600.123456)
    assert parse_time("0001-01-01T00:00:00Z") is None
    assert parse_time("2318-01-01T00:00:00Z") is None  # "forever"
    assert parse_time("garbage") is None
    assert parse_time(None) is None


async def test_probe_parses_a_real_backend() -> None:
    with trio.fail_after(10):
        async with run_sim(SPEC) as sim, httpx.AsyncClient() as client:
            state = await OllamaBackend(sim.url, client).probe()
    assert state.info.healthy and state.info.version == "0.13.1"
    assert state.loaded[0].vram_bytes == GiB
    assert state.available[0].family == "llama"


async def test_node_service_serves_its_status(tmp_path: Path) -> None:
    from herd import Node, NodeConfig

    with trio.fail_after(10):
        async with router(tmp_path) as r, run_sim(SPEC) as sim, trio.open_nursery() as nursery:
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
