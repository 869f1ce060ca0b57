"""Benchmarks run from the dashboard (#19): through a real router to simulated nodes, on virtual
time: measured, saved, one at a time, cancellable, with clear refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing

from herd.http.dashboard.bench import NUM_PREDICT, PROMPTS, TAG
from herd.sim import SimConfig
from tests.conftest import LLAMA_3B, QWEN_7B, GiB, running_fleet, wait_until

LLAMA = attrs.evolve(LLAMA_3B, tokens_per_second=64.0)  # 128 tokens: 2 s
QWEN = attrs.evolve(QWEN_7B, tokens_per_second=32.0)  # 4 s


def specs() -> list[SimConfig]:
    return [
        SimConfig(
            name="alpha", models=(LLAMA, QWEN), loaded=("llama3.2:3b",), memory_bytes=32 * GiB
        ),
        SimConfig(name="beta", models=(LLAMA,), loaded=("llama3.2:3b",), memory_bytes=16 * GiB),
    ]


KEY = {"Authorization": "Bearer sesame"}


async def current(client: httpx.AsyncClient) -> dict[str, Any]:
    reply = await client.get("/dashboard/api/benchmarks/current", headers=KEY)
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


async def test_a_benchmark_measures_each_target_and_is_saved(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        running_fleet(tmp_path, specs(), api_keys=("sesame",)) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=None, trust_env=False) as client,
    ):
        targets = [{"model": "llama3.2:3b", "node_id": "beta"}, {"model": "qwen2.5:7b"}]
        reply = await client.post(
            "/dashboard/api/benchmarks/run",
            headers=KEY,
            json={"name": "nightly", "targets": targets, "repeat": 2},
        )
        assert reply.status_code == 202, reply.text
        total = 2 * (1 + 2 * len(PROMPTS))
        assert (reply.json()["status"], reply.json()["total"]) == ("running", total)
        runner = fleet.router.benchmarks
        assert runner is not None and runner.current is not None
        with trio.fail_after(600):
            await runner.current.finished.wait()
        view = (await current(client))["run"]
        assert (view["status"], view["done"], view["error"]) == ("done", total, None)
        llama, qwen = view["summary"]
        assert (llama["target"], llama["served_by"]) == ("llama3.2:3b @ beta", ["beta"])
        assert (qwen["target"], qwen["served_by"]) == ("qwen2.5:7b @ any node", ["alpha"])
        for summary, rate in ((llama, 64.0), (qwen, 32.0)):
            assert (summary["requests"], summary["errors"]) == (2 * len(PROMPTS), 0)
            assert summary["tokens_per_second"] == pytest.approx(rate, rel=0.02)
            # latency: the answer's 128 tokens at the model's rate (virtual time), and a little
            assert summary["latency_p50"] == pytest.approx(NUM_PREDICT / rate * 1000, rel=0.05)
            assert summary["ttft_p50"] < summary["latency_p50"] / 10
            assert summary["warmup_ms"] is not None
        # Saved in the store with everything measured, and on the timeline.
        runs = (await client.get("/dashboard/api/benchmarks", headers=KEY)).json()["runs"]
        (saved,) = runs
        assert saved["name"] == "nightly" and saved["id"] == view["saved_id"]
        data = saved["data"]
        assert (data["format"], data["status"], data["repeat"]) == ("herd.benchmark/1", "done", 2)
        assert data["targets"] == view["summary"] and len(data["requests"]) == total
        kinds = [e.kind for e in fleet.router.state.timeline.ring if "benchmark" in e.kind]
        assert kinds == ["benchmark_started", "benchmark_finished"]
        # Every request went through the router, tagged (and pinned where asked).
        traces = list(fleet.router.state.traces)
        assert len(traces) == total and all(t.tags == (TAG,) for t in traces)
        assert {t.node_id for t in traces if t.model == "llama3.2:3b"} == {"beta"}
        await wait_until(fleet.counters_idle)


async def test_one_benchmark_at_a_time_and_a_cancel_keeps_what_finished(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        running_fleet(tmp_path, specs()) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=None, trust_env=False) as client,
    ):
        body = {"targets": [{"model": "qwen2.5:7b", "node_id": "alpha"}], "repeat": 5}
        assert (await client.post("/dashboard/api/benchmarks/run", json=body)).status_code == 202
        second = await client.post("/dashboard/api/benchmarks/run", json=body)
        assert second.status_code == 409
        assert "is running (0 of 16 requests)" in second.json()["error"]
        await trio.sleep(10)  # the warm-up and one more (4 s each), a third under way
        view = (await current(client))["run"]
        assert view["done"] == 2 and view["current"] == "qwen2.5:7b @ alpha"
        cancelled = await client.post("/dashboard/api/benchmarks/cancel", json={})
        assert cancelled.status_code == 200
        assert (cancelled.json()["status"], cancelled.json()["done"]) == ("cancelled", 2)
        again = await client.post("/dashboard/api/benchmarks/cancel", json={})
        assert again.status_code == 404 and "no benchmark is running" in again.json()["error"]
        (saved,) = (await client.get("/dashboard/api/benchmarks")).json()["runs"]
        assert saved["data"]["status"] == "cancelled" and len(saved["data"]["requests"]) == 2
        # The request cut short left nothing behind on the node.
        await wait_until(fleet.counters_idle)
        assert (await current(client))["running"] is False
        # And the next run may start.
        assert (await client.post("/dashboard/api/benchmarks/run", json=body)).status_code == 202


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"targets": []}, "'targets' must be a list of 1 to 16 targets"),
        ({"targets": [{"model": "llama3.2:3b"}] * 17}, "1 to 16 targets"),
        ({"targets": [{"model": "llama3.2:3b", "node_id": "gamma"}]}, "no node named 'gamma'"),
        ({"targets": [{"model": "qwen2.5:7b", "node_id": "beta"}]}, "node 'beta' has no model"),
        ({"targets": [{"model": "nope:1b"}]}, "no node has the model 'nope:1b'"),
        ({"targets": [{"model": "llama3.2:3b"}], "repeat": 0}, "'repeat' must be a whole number"),
        ({"targets": [{"model": "llama3.2:3b"}], "repeat": True}, "'repeat' must be"),
        ({"targets": ["llama3.2:3b"]}, 'each target must be {"model"'),
        ({"targets": [{"model": "llama3.2:3b"}], "name": "x" * 101}, "at most 100 characters"),
    ],
)
async def test_a_benchmark_that_cannot_run_is_refused_naming_why(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, body: dict[str, Any], message: str
) -> None:
    async with (
        running_fleet(tmp_path, specs()) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=None, trust_env=False) as client,
    ):
        reply = await client.post("/dashboard/api/benchmarks/run", json=body)
        assert reply.status_code == 400 and message in reply.json()["error"], reply.text
        assert fleet.router.benchmarks is not None
        assert fleet.router.benchmarks.current is None
