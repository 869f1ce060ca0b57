"""Load accounting: every path out of a lease returns the counters to zero."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from herd.state.queues import QueueBook


async def test_success_failure_and_cancel_paths_return_to_zero() -> None:
    book = QueueBook(default_limit=2)
    async with book.lease("a", "m") as lease:
        assert book.counters("a", "m").in_flight == 1
        lease.succeeded()
    with pytest.raises(RuntimeError):
        async with book.lease("a", "m"):
            raise RuntimeError("node broke")
    with trio.CancelScope() as scope:
        async with book.lease("a", "m"):
            scope.cancel()
            await trio.sleep_forever()
    counters = book.counters("a", "m")
    assert (counters.pending, counters.in_flight, counters.done, counters.failed) == (0, 0, 1, 1)


async def test_limit_makes_requests_wait_in_pending() -> None:
    book = QueueBook(default_limit=1)
    book.set_limit("a", 1)
    release = trio.Event()
    entered: list[int] = []

    async def user(i: int) -> None:
        async with book.lease("a", "m") as lease:
            entered.append(i)
            await release.wait()
            lease.succeeded()

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(user, i)
        await trio.testing.wait_all_tasks_blocked()
        counters = book.counters("a", "m")
        assert (counters.pending, counters.in_flight) == (2, 1)
        assert book.load_for("a")["m"].pending == 2
        book.set_limit("a", 3)  # a heartbeat raised the node's slots
        await trio.testing.wait_all_tasks_blocked()
        assert (counters.pending, counters.in_flight) == (0, 3)
        released_at = trio.current_time()
        release.set()
    assert (counters.pending, counters.in_flight, counters.done) == (0, 0, 3)
    assert not book.busy("a")
    idle = book.load_for("a")["m"]
    assert (idle.pending, idle.in_flight) == (0, 0)
    # The eviction cost reads this recency: set when the last request left its slot.
    assert idle.last_used is not None and released_at <= idle.last_used <= trio.current_time()


async def test_cancel_while_pending_uncounts() -> None:
    book = QueueBook(default_limit=1)
    async with book.lease("a", "m"):
        with trio.move_on_after(1):
            async with book.lease("a", "m"):
                pass  # pragma: no cover - never gets a slot
        assert book.counters("a", "m").pending == 0
    assert book.statistics().in_flight == 0


async def test_a_model_with_its_own_limit_runs_that_many_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    import httpx

    from herd.cli import node_config
    from herd.sim import SimConfig, SimModel
    from tests.conftest import EMBED, GiB, running_fleet

    slow = SimModel("slow:latest", size_bytes=GiB, tokens_per_second=10.0)
    seer = SimModel("llama3.2-vision:11b", size_bytes=8 * GiB, family="mllama", vision=True)
    spec = SimConfig(name="solo", models=(slow, EMBED, seer), loaded=("slow:latest",), parallel=4)
    # As an operator types it (the tag left out): the node's --model-slots.
    node = node_config({"model_slots": "slow=1", "data_dir": str(tmp_path)}, {})
    assert node.model_slots == {"slow:latest": 1}
    options = {"solo": {"model_slots": dict(node.model_slots)}}
    async with (
        running_fleet(tmp_path, [spec], agent_options=options) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=None, trust_env=False) as client,
    ):
        book = fleet.router.state.queues
        seen: list[tuple[int, int]] = []

        async def ask() -> None:
            body = {"model": "slow", "prompt": "x", "stream": False}
            assert (await client.post("/api/generate", json=body)).status_code == 200

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(ask)
            await trio.sleep(0.5)  # virtual: all three are in by now
            counters = book.counters("solo", "slow:latest")
            seen.append((counters.in_flight, counters.pending))
            # The scorer sees the model's own queue, not the node's spare slots.
            load = fleet.router.fleet.nodes[0].load["slow:latest"]
            assert load.slots == 1
        assert seen == [(1, 2)]  # one at a time though the node has four slots
        # Ollama runs an embedding-only model one request at a time: so does the book.
        limits = book.model_limiter("solo", "nomic-embed-text:latest")
        assert limits is not None and limits.total_tokens == 1
        # ... and Llama 3.2 Vision / Qwen3-VL (their encoder cache), whatever its slots.
        vision = book.model_limiter("solo", "llama3.2-vision:11b")
        assert vision is not None and vision.total_tokens == 1


def test_model_limits_are_named_as_ollama_resolves_them() -> None:
    """An embedding program may build a node's limits by hand, tag left out: the router
    counts requests under the resolved name, so the limit applies there."""
    from herd.core.models import BackendInfo, NodeReport, NodeSnapshot, NodeStatus
    from herd.core.policy.models import model_limits

    report = NodeReport(
        node_id="n",
        backend=BackendInfo(url="http://n", healthy=True, kind="vllm"),
        model_slots={"slow": 2, "big:70b": 1, "off": 0},
    )
    node = NodeSnapshot(report=report, status=NodeStatus.ONLINE, last_seen=0.0)
    assert model_limits(node) == {"slow:latest": 2, "big:70b": 1}
