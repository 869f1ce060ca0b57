"""Spill detection end to end, over real HTTP on loopback: the simulator splits a model too big
for its GPU (``size_vram < size`` in /api/ps) and runs it slower; the node agent reports the
device; the router shows the spill (/fleet/status, `herd status`, /metrics, the health check),
routes to a copy wholly in VRAM, and pre-warms one rather than a node that would split it."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from herd.core import health
from herd.sim import SimConfig, SimModel, SimOllama, run_sim
from herd.status import render_status
from tests.conftest import GiB, running_fleet, wait_until

BIG = SimModel("big:70b", size_bytes=42 * GiB, tokens_per_second=40.0, parameter_size="70B")
SMALL = SimModel("small:8b", size_bytes=5 * GiB, tokens_per_second=40.0, parameter_size="8B")
# A gaming PC: 64 GiB of RAM, a 24 GiB GPU.
GPU_BOX = SimConfig(
    name="gpu-box", models=(BIG, SMALL), memory_bytes=64 * GiB, vram_bytes=24 * GiB, parallel=2
)
# Apple silicon with 192 GiB: the GPU may use 144 GiB of it.
STUDIO = SimConfig(
    name="studio",
    models=(BIG, SMALL),
    memory_bytes=192 * GiB,
    vram_bytes=144 * GiB,
    unified_memory=True,
    parallel=2,
)


@contextlib.asynccontextmanager
async def sim_and_client(config: SimConfig) -> AsyncIterator[tuple[SimOllama, httpx.AsyncClient]]:
    async with (
        run_sim(config) as sim,
        httpx.AsyncClient(base_url=sim.url, timeout=None, trust_env=False) as client,
    ):
        yield sim, client


def generate(model: str, tokens: int = 10) -> dict[str, object]:
    return {"model": model, "prompt": "hi", "stream": False, "options": {"num_predict": tokens}}


async def test_the_simulator_splits_a_model_too_big_for_its_gpu_and_runs_it_slower(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with sim_and_client(GPU_BOX) as (sim, client):
            start = trio.current_time()
            fast = (await client.post("/api/generate", json=generate("small:8b"))).json()
            # 10 tokens at 40/s, wholly in VRAM.
            assert trio.current_time() - start == pytest.approx(0.25)
            assert fast["eval_duration"] == 250_000_000
            (entry,) = (await client.get("/api/ps")).json()["models"]
            assert (entry["size"], entry["size_vram"]) == (5 * GiB, 5 * GiB)
            # The 70B doesn't fit the 24 GiB GPU even alone: the small one goes, and 24 GiB of
            # it go to VRAM, 18 GiB to RAM. 3/7 of it outside runs 1 + 3/7 x 7 = 4x slower.
            start = trio.current_time()
            slow = (await client.post("/api/generate", json=generate("big:70b"))).json()
            assert trio.current_time() - start == pytest.approx(1.0)
            assert slow["eval_duration"] == 1_000_000_000
            (entry,) = (await client.get("/api/ps")).json()["models"]
            assert (entry["name"], entry["size"], entry["size_vram"]) == (
                "big:70b",
                42 * GiB,
                24 * GiB,
            )
            assert sim.evictions == 1
            # The agent's readings: the GPU full, the 18 GiB outside it in RAM.
            (device,) = sim.accelerator_reading()
            assert (device.memory_total_bytes, device.memory_used_bytes) == (24 * GiB, 24 * GiB)
            assert not device.unified and device.vendor == "nvidia"
            _, memory, _ = sim.system_reading()
            assert memory.available_bytes == int(64 * GiB * 0.9) - 18 * GiB


async def test_unified_memory_counts_the_ram_and_the_working_set(
    autojump_clock: trio.testing.MockClock,
) -> None:
    small_mac = SimConfig(
        name="mac",
        models=(BIG, SMALL),
        memory_bytes=48 * GiB,
        vram_bytes=36 * GiB,  # 3/4 of 48 GiB
        unified_memory=True,
    )
    with trio.fail_after(60):
        async with sim_and_client(small_mac) as (sim, client):
            await client.post("/api/generate", json=generate("big:70b"))
            (entry,) = (await client.get("/api/ps")).json()["models"]
            assert (entry["size"], entry["size_vram"]) == (42 * GiB, 36 * GiB)
            (device,) = sim.accelerator_reading()
            assert device.unified and device.memory_used_bytes == 36 * GiB
            _, memory, _ = sim.system_reading()  # the whole model is in RAM
            assert memory.available_bytes == int(48 * GiB * 0.9) - 42 * GiB


async def test_the_router_shows_the_spill_and_routes_to_the_copy_in_vram(tmp_path: Path) -> None:
    async with (
        running_fleet(tmp_path, [GPU_BOX, STUDIO]) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=30, trust_env=False) as client,
    ):
        with trio.fail_after(30):
            # A cold 70B goes to the node where it fits in VRAM, not to the 64 GiB box that
            # would split it.
            first = await client.post("/api/generate", json=generate("big:70b", 2))
            assert first.status_code == 200
            traces = fleet.router.state.traces
            await wait_until(lambda: len(traces) == 1)  # books are kept after the last byte
            trace = traces[-1]
            assert trace.node_id == "studio" and trace.scores_breakdown["spill"] == 0.0
            # Someone loads it on the GPU box directly (not through herd): it spills.
            gpu_box = fleet.sims["gpu-box"]
            async with httpx.AsyncClient(base_url=gpu_box.url, trust_env=False) as direct:
                loaded = await direct.post("/api/generate", json={"model": "big:70b"})
                assert loaded.json()["done_reason"] == "load"
            fleet.agents["gpu-box"].wake()
            fleet.agents["studio"].wake()

            def spilled_seen() -> bool:
                box = fleet.router.state.registry.get("gpu-box")
                studio = fleet.router.state.registry.get("studio")
                return (
                    box is not None
                    and studio is not None
                    and any(
                        m.name == "big:70b" and m.vram_bytes < m.size_bytes
                        for m in box.report.loaded_models
                    )
                    and "big:70b" in studio.report.loaded_index
                )

            await wait_until(spilled_seen, within=10)
            status = (await client.get("/fleet/status")).json()
            assert status["fleet"]["models_spilled"] == 1
            nodes = {n["node_id"]: n for n in status["nodes"]}
            box = nodes["gpu-box"]
            assert box["accelerator"]["kind"] == "vram"
            assert box["accelerator"]["total_bytes"] == 24 * GiB
            assert box["gpus"][0]["memory_used_bytes"] == 24 * GiB
            (model,) = box["models_loaded"]
            assert model["spilled"] and model["offload"] == pytest.approx(18 / 42, abs=1e-4)
            assert nodes["studio"]["accelerator"]["kind"] == "unified"
            assert not nodes["studio"]["models_loaded"][0]["spilled"]
            text = render_status(status)
            assert "big:70b  ctx 4096  42.0 GiB  SPILLED: 43% on the CPU" in text
            assert "gpu0 Simulated GPU  VRAM 0.0/24.0 GiB free" in text
            # Both copies are hot; the one in VRAM wins.
            again = await client.post("/api/generate", json=generate("big:70b", 2))
            assert again.status_code == 200
            await wait_until(lambda: len(traces) == 2)
            assert traces[-1].node_id == "studio"
            # /metrics and the health check say so too.
            metrics = (await client.get("/metrics")).text
            assert 'herd_model_offload_ratio{node="gpu-box",model="big:70b"} 0.4286' in metrics
            assert (
                'herd_gpu_memory_total_bytes{node="gpu-box",gpu="0",name="Simulated GPU"} '
                f"{24 * GiB}" in metrics
            )
            gpu = '{node="gpu-box",gpu="0",name="Simulated GPU"}'
            assert f"herd_gpu_utilization_ratio{gpu} " in metrics
            assert f"herd_gpu_temperature_celsius{gpu} " in metrics  # a discrete GPU says
            assert 'herd_gpu_temperature_celsius{node="studio"' not in metrics  # a Mac doesn't
            # A request pinned to the split copy: its trace says how much ran on the CPU.
            pinned = await client.post(
                "/api/generate", json={**generate("big:70b", 2), "metadata": {"node": "gpu-box"}}
            )
            assert pinned.status_code == 200 and pinned.headers["x-herd-node"] == "gpu-box"
            await wait_until(lambda: len(traces) == 3)
            assert traces[-1].offload == pytest.approx(18 / 42, abs=1e-4)
            assert traces[-2].offload == 0.0  # the copy in VRAM
            checks = {
                c["id"]: c for c in (await client.get("/dashboard/api/health")).json()["checks"]
            }
            assert checks["spilled_models"]["severity"] == health.WARNING
            assert "gpu-box:big:70b" in checks["spilled_models"]["evidence"]


async def test_a_deep_queue_prewarms_a_full_vram_copy_not_a_split_one(tmp_path: Path) -> None:
    slow_big = SimModel("big:70b", size_bytes=40 * GiB, tokens_per_second=10.0)
    specs = [
        SimConfig(
            name="hot",
            models=(slow_big,),
            loaded=("big:70b",),
            parallel=1,
            memory_bytes=192 * GiB,
            vram_bytes=144 * GiB,
            unified_memory=True,
        ),
        # The split one is listed first, so a tie would not favour the right answer.
        SimConfig(name="split", models=(slow_big,), memory_bytes=128 * GiB, vram_bytes=24 * GiB),
        SimConfig(
            name="full",
            models=(slow_big,),
            memory_bytes=128 * GiB,
            vram_bytes=96 * GiB,
            unified_memory=True,
        ),
    ]
    async with (
        running_fleet(tmp_path, specs) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=None, trust_env=False) as client,
    ):
        fleet.router.state.settings.prewarm_queue_depth = 2
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                body = generate("big:70b", 3)
                for _ in range(5):
                    nursery.start_soon(functools.partial(client.post, "/api/generate", json=body))
                await wait_until(lambda: "big:70b" in fleet.sims["full"].loaded_models, within=20)
        assert fleet.router.state.events["prewarms"] >= 1
        assert fleet.sims["split"].cold_loads == 0
        await wait_until(fleet.counters_idle)
