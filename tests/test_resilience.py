"""Resilience on a simulated fleet: context protection, VRAM-aware fallback, auto-pull, model
management, the zombie reaper, pre-warm, drain, router restart, a disconnect storm."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trio.testing

from herd.config import RouterConfig
from herd.core import traces
from herd.http.service import Router
from herd.node.agent import AgentConfig, NodeAgent
from herd.sim import SimConfig, SimModel, run_sim
from herd.state.settings import RuntimeSettings
from tests.conftest import EMBED, LLAMA_3B, QWEN_7B, GiB, running_fleet, wait_until
from tests.streams import aiter_raw

MISTRAL = SimModel("mistral:7b", size_bytes=4 * GiB, family="llama", parameter_size="7B")
QWEN_LONG = attrs.evolve(QWEN_7B, context_length=32768)
SLOW = SimModel("slow:latest", size_bytes=GiB, tokens_per_second=10.0)


def chat(model: str, **extra: object) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        **extra,
    }


@contextlib.asynccontextmanager
async def client_for(url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=url, timeout=None, trust_env=False) as client:
        yield client


async def test_context_protection(tmp_path: Path) -> None:
    specs = [
        SimConfig(name="alpha", models=(LLAMA_3B,), loaded=("llama3.2:3b",)),
        # beta can't load llama itself (a fresh load would size its window for the request):
        # the only llama is alpha's, loaded with a 4096-token window.
        SimConfig(name="beta", models=(QWEN_LONG,), loaded=("qwen2.5:7b",)),
    ]
    # Moving to another model (qwen for llama) is a substitution: opted in here.
    settings = RuntimeSettings(vram_fallback=True)
    async with (
        running_fleet(tmp_path, specs, settings) as fleet,
        client_for(fleet.url) as client,
    ):
        with trio.fail_after(20):
            # The loaded 4096-token window holds a 2048 request: num_ctx is stripped.
            fits = await client.post(
                "/api/chat", json=chat("llama3.2:3b", options={"num_ctx": 2048, "temperature": 0})
            )
            assert fits.headers["x-herd-node"] == "alpha"
            assert fleet.sims["alpha"].requests[-1][1]["options"] == {"temperature": 0}
            # 16k doesn't fit llama's window; qwen is loaded with 32k: upgrade, flagged.
            upgraded = await client.post(
                "/api/chat", json=chat("llama3.2:3b", options={"num_ctx": 16384})
            )
            assert upgraded.headers["x-herd-node"] == "beta"
            assert upgraded.headers["x-herd-model"] == "qwen2.5:7b"
            assert upgraded.headers["x-herd-fallback"] == "true"
            assert "options" not in fleet.sims["beta"].requests[-1][1]
            # Nothing loaded holds 64k: passed through as asked, and recorded.
            passed = await client.post(
                "/api/chat", json=chat("llama3.2:3b", options={"num_ctx": 65536})
            )
            assert passed.headers["x-herd-node"] == "alpha"
            assert fleet.sims["alpha"].requests[-1][1]["options"] == {"num_ctx": 65536}
            # Switched off: num_ctx always goes through.
            fleet.router.state.settings.context_protection = False
            await client.post("/api/chat", json=chat("llama3.2:3b", options={"num_ctx": 2048}))
            assert fleet.sims["alpha"].requests[-1][1]["options"] == {"num_ctx": 2048}
            await wait_until(lambda: len(fleet.router.state.traces) == 4)
        events = fleet.router.state.events
        assert (
            events["context_stripped"],
            events["context_upgraded"],
            events["context_passthrough"],
        ) == (1, 1, 1)
        actions = [(t.context_action, t.substitution) for t in fleet.router.state.traces]
        assert actions == [
            ("stripped", None),
            ("upgraded", "context"),
            ("passthrough", None),
            (None, None),
        ]


async def test_vram_fallback_same_category_only(tmp_path: Path) -> None:
    specs = [
        SimConfig(name="alpha", models=(LLAMA_3B, EMBED), loaded=("llama3.2:3b",)),
        SimConfig(name="beta", models=(MISTRAL,), loaded=()),
    ]
    settings = RuntimeSettings(vram_fallback=True)  # opt-in
    async with (
        running_fleet(tmp_path, specs, settings) as fleet,
        client_for(fleet.url) as client,
    ):
        with trio.fail_after(20):
            # mistral is cold everywhere; llama (chat) is hot: served instead, flagged.
            response = await client.post("/api/chat", json=chat("mistral:7b"))
            assert response.headers["x-herd-model"] == "llama3.2:3b"
            assert response.headers["x-herd-fallback"] == "true"
            assert fleet.sims["beta"].cold_loads == 0
            # An embedding model is never replaced by a chat model: it is cold-loaded.
            embedded = await client.post(
                "/api/embed", json={"model": "nomic-embed-text", "input": "x"}
            )
            assert embedded.headers["x-herd-model"] == "nomic-embed-text:latest"
            assert embedded.headers["x-herd-fallback"] == "false"
            # Switched off: the model asked for is loaded.
            fleet.router.state.settings.vram_fallback = False
            cold = await client.post("/api/chat", json=chat("mistral:7b"))
            assert cold.headers["x-herd-model"] == "mistral:7b"
            assert fleet.sims["beta"].cold_loads == 1
        assert fleet.router.state.events["vram_fallbacks"] == 1


async def test_auto_pull_once_for_concurrent_requests(tmp_path: Path) -> None:
    registry = (SimModel("gemma3:1b", size_bytes=GiB),)
    specs = [
        SimConfig(name="alpha", models=(LLAMA_3B,), registry=registry),
        SimConfig(name="beta", models=(LLAMA_3B,), registry=registry),
    ]
    settings = RuntimeSettings(auto_pull=True)  # opt-in
    async with running_fleet(
        tmp_path,
        specs,
        settings,
        heartbeat_interval=30.0,
        heartbeat_timeout=90.0,
        heartbeat_offline=180.0,
    ) as fleet:
        codes: list[int] = []
        async with client_for(fleet.url) as client:

            async def ask() -> None:
                response = await client.post(
                    "/api/generate", json={"model": "gemma3:1b", "prompt": "x", "stream": False}
                )
                codes.append(response.status_code)

            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        nursery.start_soon(ask)
            assert codes == [200, 200, 200]
            assert sum(sim.pulls for sim in fleet.sims.values()) == 1
            assert fleet.router.state.events["auto_pulls"] == 3  # three requests, one pull
            # A name no registry has: the pull fails and the client gets a 404 saying why.
            missing = await client.post("/api/generate", json={"model": "nope", "prompt": "x"})
            assert missing.status_code == 404
            assert "auto-pull failed" in missing.json()["error"]
            fleet.router.state.settings.auto_pull = False
            off = await client.post("/api/generate", json={"model": "gemma3:2b", "prompt": "x"})
            assert off.status_code == 404 and "auto-pull" not in off.json()["error"]


async def test_pull_and_delete_endpoints(tmp_path: Path) -> None:
    registry = (SimModel("phi4:14b", size_bytes=8 * GiB),)
    specs = [
        SimConfig(name="alpha", models=(LLAMA_3B,), registry=registry),
        SimConfig(name="beta", models=(LLAMA_3B,), registry=registry),
    ]
    async with running_fleet(tmp_path, specs) as fleet, client_for(fleet.url) as client:
        with trio.fail_after(20):
            streamed = await client.post("/api/pull", json={"name": "phi4:14b", "node_id": "beta"})
            lines = [json.loads(line) for line in streamed.text.splitlines()]
            assert lines[-1] == {"status": "success", "node": "beta"}
            assert any("completed" in line for line in lines)
            quiet = await client.post(
                "/api/pull", json={"model": "phi4:14b", "stream": False, "node_id": "alpha"}
            )
            assert quiet.json() == {"status": "success", "node": "alpha"}
            await wait_until(lambda: all(n.has_model("phi4:14b") for n in fleet.router.fleet.nodes))
            tags = {m["name"]: m["nodes"] for m in (await client.get("/api/tags")).json()["models"]}
            assert sorted(tags["phi4:14b"]) == ["alpha", "beta"]
            one = await client.request(
                "DELETE", "/api/delete", json={"model": "phi4:14b", "node_id": "alpha"}
            )
            assert one.json()["deleted"] == ["alpha"]
            everywhere = await client.request("DELETE", "/api/delete", json={"model": "phi4:14b"})
            assert everywhere.json() == {"model": "phi4:14b", "deleted": ["beta"], "failed": {}}
            gone = await client.request("DELETE", "/api/delete", json={"model": "phi4:14b"})
            assert gone.status_code == 404
            bad = await client.post("/api/pull", json={"model": "x", "node_id": "nobody"})
            assert bad.status_code == 404 and "nobody" in bad.json()["error"]
            failed = await client.post("/api/pull", json={"model": "nope"})
            assert "does not exist" in failed.text.splitlines()[-1]


async def test_reaper_ends_stalled_streams_but_not_slow_healthy_ones(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    spec = SimConfig(name="solo", models=(SLOW,), loaded=("slow:latest",))
    settings = RuntimeSettings(stale_timeout=8.0)
    async with running_fleet(tmp_path, [spec], settings) as fleet, client_for(fleet.url) as client:
        # 40 tokens at 10/s: 4 s of streaming, a chunk every 0.1 s: healthy, never reaped.
        healthy = await client.post(
            "/api/generate", json={"model": "slow", "prompt": "x", "options": {"num_predict": 40}}
        )
        assert json.loads(healthy.text.splitlines()[-1])["done"] is True
        fleet.sims["solo"].fail("stall", times=1, after_chunks=3)
        start = trio.current_time()
        stalled = await client.post("/api/generate", json={"model": "slow", "prompt": "x"})
        lines = stalled.text.splitlines()
        assert "no progress" in json.loads(lines[-1])["error"]
        assert 8.0 <= trio.current_time() - start <= 8.0 + 8.0 / 4 + 1
        await wait_until(fleet.counters_idle)
        await wait_until(lambda: fleet.sims["solo"].open_streams == 0)
        assert fleet.router.state.events["reaped"] == 1
        await wait_until(lambda: len(fleet.router.state.traces) == 2)
        assert [t.status for t in fleet.router.state.traces] == [
            traces.COMPLETED,
            traces.INCOMPLETE,
        ]


async def test_deep_queue_prewarms_the_runner_up(tmp_path: Path) -> None:
    # A big model: a cold load costs so much that a short queue keeps it on its hot node.
    big = attrs.evolve(SLOW, size_bytes=32 * GiB)
    specs = [
        SimConfig(
            name="alpha", models=(big,), loaded=("slow:latest",), parallel=1, memory_bytes=64 * GiB
        ),
        SimConfig(name="beta", models=(big,), loaded=(), memory_bytes=64 * GiB),
    ]
    async with running_fleet(tmp_path, specs) as fleet, client_for(fleet.url) as client:
        fleet.router.state.settings.vram_fallback = False
        fleet.router.state.settings.prewarm_queue_depth = 2
        # Keep every request on alpha (it wins on thermal) until the queue is deep.
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                body = {
                    "model": "slow",
                    "prompt": "x",
                    "stream": False,
                    "options": {"num_predict": 3},
                }
                for _ in range(5):
                    nursery.start_soon(functools.partial(client.post, "/api/generate", json=body))
                await wait_until(
                    lambda: "slow:latest" in fleet.sims["beta"].loaded_models, within=20
                )
        assert fleet.router.state.events["prewarms"] == 1
        assert fleet.sims["beta"].cold_loads == 1
        await wait_until(fleet.counters_idle)


async def test_draining_node_gets_no_new_work_and_is_told_when_idle(tmp_path: Path) -> None:
    specs = [
        SimConfig(name="alpha", models=(SLOW,), loaded=("slow:latest",)),
        SimConfig(name="beta", models=(SLOW,), loaded=("slow:latest",)),
    ]
    async with running_fleet(tmp_path, specs) as fleet, client_for(fleet.url) as client:
        with trio.fail_after(20):
            async with client.stream(
                "POST",
                "/api/generate",
                json={"model": "slow", "prompt": "x", "options": {"num_predict": 20}},
            ) as first:
                busy = first.headers["x-herd-node"]
                other = "beta" if busy == "alpha" else "alpha"
                agent = fleet.agents[busy]
                await agent.drain()
                await wait_until(lambda: fleet.router.fleet.node(busy).report.draining)  # type: ignore[union-attr]
                second = await client.post(
                    "/api/generate", json={"model": "slow", "prompt": "x", "stream": False}
                )
                assert second.headers["x-herd-node"] == other
                assert not agent.drained.is_set()  # its own stream is still running
                body = await first.aread()
            assert json.loads(body.splitlines()[-1])["done"] is True
            await agent.drained.wait()


async def test_nodes_rejoin_a_restarted_router_within_two_heartbeats(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = RouterConfig(host="127.0.0.1", port=0, data_dir=str(tmp_path), heartbeat_interval=5.0)
    async with (
        run_sim(SimConfig(name="a", models=(LLAMA_3B,))) as sim_a,
        run_sim(SimConfig(name="b", models=(LLAMA_3B,))) as sim_b,
        trio.open_nursery() as agents,
    ):
        first = Router(config)
        async with trio.open_nursery() as running:
            url = await running.start(first.run)
            for name, sim in (("a", sim_a), ("b", sim_b)):
                agent = NodeAgent(
                    AgentConfig(
                        router_url=url,
                        ollama_url=sim.url,
                        node_id=name,
                        heartbeat_interval=5.0,
                        backoff_max=5.0,
                    )
                )
                await agents.start(agent.run)
            await first.wait_nodes(2)
            running.cancel_scope.cancel()  # the router goes away
        await trio.sleep(7)  # autojump clock: the router is down for 7 virtual seconds
        port = int(url.rsplit(":", 1)[1])
        async with Router(attrs.evolve(config, port=port)) as second:
            # Measured from when it listens again (its start-up reads the database in a worker
            # thread, and the virtual clock runs on while a thread works).
            restarted_at = trio.current_time()
            await second.wait_nodes(2)
            assert trio.current_time() - restarted_at <= 2 * 5.0
        agents.cancel_scope.cancel()


async def test_disconnect_storm_leaves_nothing_behind(tmp_path: Path) -> None:
    spec = SimConfig(name="solo", models=(SLOW,), loaded=("slow:latest",), parallel=512)
    async with running_fleet(tmp_path, [spec]) as fleet:
        fleet.router.state.queues.set_limit("solo", 512)
        limits = httpx.Limits(max_connections=400)
        async with httpx.AsyncClient(
            base_url=fleet.url, limits=limits, timeout=None, trust_env=False
        ) as client:
            started = trio.Event()
            opened = 0

            async def stream_then_drop(cancel: trio.CancelScope) -> None:
                nonlocal opened
                with cancel:
                    async with client.stream(
                        "POST",
                        "/api/generate",
                        json={"model": "slow", "prompt": "x", "options": {"num_predict": 1000}},
                    ) as response:
                        async with contextlib.aclosing(aiter_raw(response)) as chunks:
                            async for _ in chunks:
                                opened += 1
                                if opened == 300:
                                    started.set()
                                await trio.sleep_forever()

            with trio.fail_after(60):
                scopes = [trio.CancelScope() for _ in range(300)]
                async with trio.open_nursery() as nursery:
                    for scope in scopes:
                        nursery.start_soon(stream_then_drop, scope)
                    await started.wait()
                    assert fleet.sims["solo"].open_streams == 300
                    for scope in scopes:  # everyone hangs up at once
                        scope.cancel()
                await wait_until(fleet.counters_idle, within=30)
                await wait_until(lambda: fleet.sims["solo"].open_streams == 0, within=30)
        assert fleet.sims["solo"].disconnects == 300
        await wait_until(lambda: len(fleet.router.state.traces) == 300)
        assert {t.status for t in fleet.router.state.traces} == {traces.CLIENT_DISCONNECTED}
        stats = fleet.router.state.queues.statistics()
        assert (stats.pending, stats.in_flight, stats.failed) == (0, 0, 0)


@pytest.mark.parametrize("flavor", ["ollama", "openai"])
async def test_retry_headers_name_the_attempt_that_served(tmp_path: Path, flavor: str) -> None:
    specs = [
        SimConfig(name="alpha", models=(LLAMA_3B,), loaded=("llama3.2:3b",)),
        SimConfig(name="beta", models=(LLAMA_3B,)),
    ]
    async with running_fleet(tmp_path, specs) as fleet, client_for(fleet.url) as client:
        fleet.sims["alpha"].fail("http500", times=1)  # hot, so tried first: fails once
        path = "/api/chat" if flavor == "ollama" else "/v1/chat/completions"
        with trio.fail_after(10):
            response = await client.post(path, json=chat("llama3.2:3b", stream=True))
        assert response.status_code == 200
        assert response.headers["x-herd-retries"] == "1"
        served = response.headers["x-herd-node"]
        assert served == "beta"
        assert fleet.sims[served].requests  # the serving node really got it
        await wait_until(fleet.counters_idle)
        counters = fleet.router.state.queues.statistics().queues
        failed_node = "alpha" if served == "beta" else "beta"
        assert counters[f"{failed_node}:llama3.2:3b"]["failed"] == 1
        assert counters[f"{served}:llama3.2:3b"]["done"] == 1
