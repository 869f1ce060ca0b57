"""Waits that follow what the router expects of a node: a hung node is given seconds, a big
cold load the time such loads take there; a stalled stream is reaped after a number of its
model's token intervals. Pure budgets, then a real router on virtual time."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio
import trio.testing

from herd.core.policy.deadlines import (
    FIRST_BYTE_FLOOR,
    SAFETY,
    SLOW_PREFILL,
    STALL_FLOOR,
    first_byte_budget,
    stall_budget,
)
from herd.sim import SimConfig, SimModel
from tests.conftest import GiB, running_fleet, wait_until


def test_first_byte_budgets() -> None:
    def budget(**overrides: object) -> float:
        values: dict[str, object] = {
            "maximum": 300.0,
            "hot": True,
            "prompt_tokens": 10,
            "prefill_tokens_per_second": None,
            "model_bytes": 8 * GiB,
            "load_bytes_per_second": None,
        }
        values.update(overrides)
        return first_byte_budget(**values)  # type: ignore[arg-type]

    assert budget() == FIRST_BYTE_FLOOR + SAFETY * 10 / SLOW_PREFILL  # hot, short: seconds
    assert budget(prompt_tokens=100_000) == 300.0  # a long prompt on an unknown rate
    assert budget(prompt_tokens=100_000, prefill_tokens_per_second=5000) == 80.0
    assert budget(hot=False) == 300.0  # a cold load of unknown speed: the maximum
    cold = budget(hot=False, load_bytes_per_second=GiB / 2, prompt_tokens=0)
    assert cold == FIRST_BYTE_FLOOR + SAFETY * 16  # 8 GiB at 0.5 GiB/s: 16 s expected
    assert stall_budget(maximum=600, tokens_per_second=None) == 600
    assert stall_budget(maximum=600, tokens_per_second=40) == STALL_FLOOR
    assert stall_budget(maximum=600, tokens_per_second=0.5) == 400
    assert stall_budget(maximum=100, tokens_per_second=0.5) == 100


BIG = SimModel("big:70b", size_bytes=40 * GiB, load_seconds=40.0, tokens_per_second=10.0)


async def test_a_cold_load_gets_the_time_such_loads_take_there(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    spec = SimConfig(name="solo", models=(BIG,), memory_bytes=64 * GiB)
    async with (
        running_fleet(tmp_path, [spec], first_byte_timeout=300.0) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=None, trust_env=False) as client,
    ):
        body = {"model": "big:70b", "prompt": "hi", "stream": False, "options": {"num_predict": 3}}
        # The first cold load: its speed isn't known, so it may take the maximum; it takes 40 s.
        start = trio.current_time()
        first = await client.post("/api/generate", json=body)
        assert first.status_code == 200 and 40 <= trio.current_time() - start < 41
        # (the router learns it as it finishes its books, just after the last byte)
        await wait_until(lambda: fleet.router.state.history.load_rate("solo") is not None)
        assert fleet.router.state.history.load_rate("solo") == 40 * GiB / 40.0
        # Unloaded, and now hung: a cold load is due in about 40 s there, so the node is
        # abandoned after 20 + 3 x 40 s, not after 300.
        unload = {"model": "big:70b", "keep_alive": 0, "stream": False}
        assert (await client.post("/api/generate", json=unload)).status_code == 200
        await fleet.agents["solo"].wait_connected()
        fleet.agents["solo"].wake()
        with trio.fail_after(30):
            while fleet.router.fleet.nodes[0].loaded("big:70b") is not None:
                await fleet.router.state.wait_fleet_changed()
        fleet.sims["solo"].fail("hang", times=1)
        start = trio.current_time()
        hung = await client.post("/api/generate", json=body)
        elapsed = trio.current_time() - start
        assert hung.status_code == 504
        assert FIRST_BYTE_FLOOR + SAFETY * 40 <= elapsed < FIRST_BYTE_FLOOR + SAFETY * 40 + 2
        assert "what this node usually needs" in hung.json()["error"]


async def test_a_stalled_stream_is_reaped_after_its_models_token_intervals(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fast = SimModel("fast:1b", size_bytes=GiB, tokens_per_second=40.0)
    spec = SimConfig(name="solo", models=(fast,), loaded=("fast:1b",))
    async with (
        running_fleet(tmp_path, [spec]) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=None, trust_env=False) as client,
    ):
        body = {"model": "fast:1b", "prompt": "x", "options": {"num_predict": 40}}
        assert (await client.post("/api/generate", json=body)).status_code == 200  # learns 40/s
        await wait_until(
            lambda: fleet.router.state.history.decode_rate("solo", "fast:1b") is not None
        )
        fleet.sims["solo"].fail("stall", times=1, after_chunks=3)
        start = trio.current_time()
        stalled = await client.post("/api/generate", json=body)
        elapsed = trio.current_time() - start
        assert "no progress for 60 s" in stalled.text.splitlines()[-1]
        # Sampled every quarter of the floor: reaped between 60 and 75 s, not after 600.
        assert STALL_FLOOR <= elapsed <= STALL_FLOOR * 1.25 + 1
