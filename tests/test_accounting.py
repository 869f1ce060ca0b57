"""Per-request nurseries and exact load accounting, end to end through real sockets."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import httpx
import trio
import trio.testing

from herd.core import traces
from herd.core.policy.deadlines import FIRST_BYTE_FLOOR
from herd.sim import SimConfig, SimModel, SimOllama
from tests.conftest import Fleet, GiB, running_fleet, two_node_specs, wait_until
from tests.streams import aiter_raw

SLOW = SimModel("slow:latest", size_bytes=1 * GiB, tokens_per_second=20.0)


def no_open_streams(sim: SimOllama) -> bool:
    return sim.open_streams == 0


def queue(fleet: Fleet, key: str) -> dict[str, int | str]:
    return fleet.router.state.queues.statistics().queues.get(key, {})


async def test_client_disconnect_cancels_the_upstream_request(tmp_path: Path) -> None:
    spec = SimConfig(name="solo", models=(SLOW,), loaded=("slow:latest",))
    async with running_fleet(tmp_path, [spec]) as fleet:
        sim = fleet.sims["solo"]
        async with httpx.AsyncClient(base_url=fleet.url, trust_env=False) as client:
            with trio.fail_after(10):
                async with client.stream(
                    "POST",
                    "/api/chat",
                    json={
                        "model": "slow",
                        "messages": [{"role": "user", "content": "hi"}],
                        "options": {"num_predict": 1000},
                    },
                ) as response:
                    assert response.headers["x-herd-node"] == "solo"
                    async with contextlib.aclosing(aiter_raw(response)) as chunks:
                        async for _ in chunks:
                            break  # one chunk, then the client goes away
                    assert sim.open_streams == 1
                    assert queue(fleet, "solo:slow:latest")["in_flight"] == 1
        await wait_until(lambda: sim.open_streams == 0)
        await wait_until(lambda: fleet.counters_idle())
        assert sim.disconnects == 1
        await wait_until(lambda: bool(fleet.router.state.traces))
        trace = fleet.router.state.traces[-1]
        assert trace.status == traces.CLIENT_DISCONNECTED
        assert trace.node_id == "solo"
        counters = queue(fleet, "solo:slow:latest")
        assert (counters["pending"], counters["in_flight"], counters["failed"]) == (0, 0, 0)


async def test_success_failure_and_disconnect_all_return_counters_to_zero(
    fleet: Fleet, client: httpx.AsyncClient
) -> None:
    body = {
        "model": "llama3.2:3b",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
    }
    ok = await client.post("/api/chat", json=body)
    assert ok.status_code == 200
    # alpha fails with 500: the request is retried on beta, which also has the model.
    fleet.sims["alpha"].fail("http500", times=1)
    retried = await client.post("/api/chat", json=body)
    assert retried.status_code == 200
    assert retried.headers["x-herd-node"] == "beta"
    assert retried.headers["x-herd-retries"] == "1"
    # Both fail: the client gets the error, nothing stays counted.
    fleet.sims["alpha"].fail("http500", times=1)
    fleet.sims["beta"].fail("http500", times=1)
    failed = await client.post("/api/chat", json=body)
    assert failed.status_code == 502
    assert "500" in failed.json()["error"]
    # A stream cut short by the client.
    async with client.stream("POST", "/api/chat", json={**body, "stream": True}) as response:
        async with contextlib.aclosing(aiter_raw(response)) as chunks:
            async for _ in chunks:
                break
    await wait_until(fleet.counters_idle)
    stats = fleet.router.state.queues.statistics()
    assert stats.pending == 0 and stats.in_flight == 0
    assert stats.failed == 3  # alpha once, then alpha and beta
    statuses = [t.status for t in fleet.router.state.traces]
    assert statuses[:3] == [traces.COMPLETED, traces.COMPLETED, traces.FAILED]
    for sim in fleet.sims.values():
        await wait_until(functools.partial(no_open_streams, sim))


async def test_node_limit_queues_requests_as_pending(tmp_path: Path) -> None:
    spec = SimConfig(name="one-slot", models=(SLOW,), loaded=("slow:latest",), parallel=1)
    async with (
        running_fleet(tmp_path, [spec]) as fleet,
        httpx.AsyncClient(base_url=fleet.url, trust_env=False, timeout=20) as client,
    ):
        body = {"model": "slow", "prompt": "count", "options": {"num_predict": 4}, "stream": False}
        results: list[int] = []

        async def one() -> None:
            results.append((await client.post("/api/generate", json=body)).status_code)

        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(one)
                await wait_until(lambda: queue(fleet, "one-slot:slow:latest").get("pending") == 2)
                assert queue(fleet, "one-slot:slow:latest")["in_flight"] == 1
                status = (await client.get("/fleet/status")).json()
                assert status["fleet"]["requests_active"] == 3
                assert status["queues"]["one-slot:slow:latest"]["pending"] == 2
        assert results == [200, 200, 200]
        await wait_until(fleet.counters_idle)  # the router releases just after the last byte
        assert queue(fleet, "one-slot:slow:latest")["done"] == 3


async def test_mid_stream_failure_ends_cleanly_in_both_formats(
    fleet: Fleet, client: httpx.AsyncClient
) -> None:
    body = {"model": "llama3.2:3b", "messages": [{"role": "user", "content": "hi"}]}
    fleet.sims["alpha"].fail("die_mid_stream", times=1, after_chunks=2)
    response = await client.post("/api/chat", json=body)
    lines = [line for line in response.text.splitlines() if line]
    assert "error" in lines[-1] and len(lines) >= 2
    fleet.sims["alpha"].fail("die_mid_stream", times=1, after_chunks=2)
    response = await client.post("/v1/chat/completions", json={**body, "stream": True})
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2]
    await wait_until(fleet.counters_idle)
    await wait_until(lambda: len(fleet.router.state.traces) == 2)
    assert [t.status for t in fleet.router.state.traces] == [traces.INCOMPLETE] * 2


async def test_refused_and_hung_nodes_are_retried_elsewhere(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_fleet(tmp_path, two_node_specs(), first_byte_timeout=60.0) as fleet:
        async with httpx.AsyncClient(base_url=fleet.url, trust_env=False, timeout=None) as client:
            body = {"model": "llama3.2:3b", "prompt": "hi", "stream": False}
            fleet.sims["alpha"].fail("refuse")
            await fleet.sims["alpha"].closed.wait()
            refused = await client.post("/api/generate", json=body)
            assert refused.status_code == 200
            assert (refused.headers["x-herd-node"], refused.headers["x-herd-retries"]) == (
                "beta",
                "1",
            )
            fleet.sims["alpha"].clear_failure()
            await fleet.sims["alpha"].listening.wait()
            fleet.sims["alpha"].fail("hang", times=1)
            start = trio.current_time()
            hung = await client.post("/api/generate", json=body)
            assert hung.headers["x-herd-node"] == "beta"
            # A hot model and a two-word prompt: the first byte is due in seconds, so the hung
            # node is given about the floor, not the 60 s maximum.
            assert FIRST_BYTE_FLOOR <= trio.current_time() - start < FIRST_BYTE_FLOOR + 1
        await wait_until(fleet.counters_idle)
        await wait_until(lambda: fleet.sims["alpha"].open_streams == 0)
        stats = fleet.router.state.queues.statistics()
        assert stats.failed == 2 and stats.done == 2
