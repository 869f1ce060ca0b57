"""No eligible node: wait for the fleet to change (not by polling), then 503; fallbacks."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio
import trio.lowlevel
import trio.testing

from herd.node.agent import AgentConfig, NodeAgent
from herd.sim import SimConfig, run_sim
from tests.conftest import LLAMA_3B, running_fleet, two_node_specs, wait_until

BODY = {"model": "llama3.2:3b", "prompt": "hi", "stream": False}


async def test_waits_for_a_node_then_503_with_retry_after(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    spec = SimConfig(name="only", models=(LLAMA_3B,), loaded=("llama3.2:3b",))
    async with (
        running_fleet(tmp_path, [spec], queue_timeout=30.0) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=None, trust_env=False) as client,
    ):
        await fleet.agents["only"].drain()  # still known, no longer eligible
        router = fleet.router
        while not router.fleet.nodes[0].report.draining:
            await router.state.wait_fleet_changed()
        start = trio.current_time()
        response = await client.post("/api/generate", json=BODY)
        assert response.status_code == 503
        assert response.headers["retry-after"]
        assert "only: draining" in response.json()["error"]
        # Heartbeats keep arriving meanwhile (each re-scores); the answer comes at the deadline.
        assert 30.0 <= trio.current_time() - start < 31.0
        openai = await client.post(
            "/v1/chat/completions",
            json={"model": "llama3.2:3b", "messages": [{"role": "user", "content": "x"}]},
        )
        assert openai.status_code == 503
        assert openai.json()["error"]["code"] == "no_eligible_node"


async def test_a_node_joining_wakes_the_waiting_request(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    spec = SimConfig(name="first", models=(LLAMA_3B,), loaded=("llama3.2:3b",))
    async with running_fleet(tmp_path, [spec], queue_timeout=60.0) as fleet:
        await fleet.agents["first"].drain()
        while not fleet.router.fleet.nodes[0].report.draining:
            await fleet.router.state.wait_fleet_changed()
        results: list[httpx.Response] = []

        async def ask() -> None:
            async with httpx.AsyncClient(
                base_url=fleet.url, timeout=None, trust_env=False
            ) as client:
                results.append(await client.post("/api/generate", json=BODY))

        async with (
            trio.open_nursery() as nursery,
            run_sim(
                SimConfig(name="second", models=(LLAMA_3B,), loaded=("llama3.2:3b",))
            ) as second,
        ):
            nursery.start_soon(ask)
            await trio.sleep(12)  # autojump clock: 12 virtual s in the holding queue
            assert not results
            joined = trio.current_time()
            agent = NodeAgent(
                AgentConfig(router_url=fleet.url, ollama_url=second.url, node_id="second")
            )
            nursery.start_soon(agent.run)
            while not results:
                await trio.testing.wait_all_tasks_blocked()
                await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()
        assert results[0].status_code == 200
        assert results[0].headers["x-herd-node"] == "second"
        assert trio.current_time() - joined < 1.0


async def test_fallback_models_in_order(tmp_path: Path) -> None:
    specs = two_node_specs()
    async with (
        running_fleet(tmp_path, specs) as fleet,
        httpx.AsyncClient(base_url=fleet.url, trust_env=False) as client,
    ):
        with trio.fail_after(10):
            response = await client.post(
                "/api/generate",
                json={**BODY, "model": "gone:70b", "fallback_models": ["also-gone", "qwen2.5:7b"]},
            )
        assert response.status_code == 200
        assert response.headers["x-herd-model"] == "qwen2.5:7b"
        assert response.headers["x-herd-fallback"] == "true"
        assert response.json()["model"] == "qwen2.5:7b"
        await wait_until(lambda: bool(fleet.router.state.traces))
        trace = fleet.router.state.traces[-1]
        assert (trace.original_model, trace.model, trace.fallback_used) == (
            "gone:70b",
            "qwen2.5:7b",
            True,
        )
        # None of them anywhere: 404 for the model asked for.
        missing = await client.post(
            "/api/generate", json={**BODY, "model": "gone:70b", "fallback_models": ["also-gone"]}
        )
        assert missing.status_code == 404
        assert "gone:70b" in missing.json()["error"]
