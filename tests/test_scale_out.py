"""Several routers, one fleet: two real routers (``--state`` on a private redis-server) and
simulated Ollama nodes, all real HTTP on loopback.

The redis server keeps its own clock (lease expiries), so these tests run on real time with
short timings, each bounded by ``trio.fail_after``. Where a test waits for the other side to
catch up (a release written by a background task, a router noticing the store went away), it
asks again at a short interval within a hard bound (:func:`eventually`): there is no event to
wait on across two processes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from herd.config import NodeConfig, RouterConfig
from herd.http.service import Router
from herd.node.agent import AgentConfig, NodeAgent
from herd.node.service import Node
from herd.shared.resp import RespClient
from herd.shared.service import SharedState
from herd.shared.slots import SharedSlots
from herd.sim import SimConfig, SimModel, SimOllama, run_sim
from herd.state.queues import QueueBook
from herd.state.state import RouterState
from tests.engines import free_port, redis_server

GiB = 2**30
MODEL = "llama3.2:3b"
# 12 tokens at 40 per second: each answer takes 0.3 s, long enough for requests to overlap.
SLOW = SimModel(MODEL, size_bytes=2 * GiB, tokens_per_second=40.0)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
async def flushed(redis_url: str) -> str:
    async with RespClient.open(redis_url) as client:
        await client.execute("FLUSHDB")
    return redis_url


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """Ask ``check`` every 20 ms until it holds; fail after ``within`` seconds."""
    with trio.fail_after(within):
        while not await check():  # noqa: ASYNC110 (another process's state: no event to wait on)
            await trio.sleep(0.02)


def router_config(tmp_path: Path, name: str, state: str | None, **options: Any) -> RouterConfig:
    return RouterConfig(
        host="127.0.0.1", port=0, data_dir=str(tmp_path / name), state=state, **options
    )


@contextlib.asynccontextmanager
async def fleet_of_routers(
    tmp_path: Path,
    state: str | None,
    specs: Sequence[SimConfig],
    routers: int = 2,
    **options: Any,
) -> AsyncIterator[tuple[list[Router], dict[str, SimOllama]]]:
    """``routers`` routers sharing ``state``, and each simulated node heartbeating to every
    router (one agent per router, as a node with several --router-url runs them)."""
    async with contextlib.AsyncExitStack() as stack:
        started = [
            await stack.enter_async_context(
                Router(router_config(tmp_path, f"r{i}", state, **options))
            )
            for i in range(routers)
        ]
        sims: dict[str, SimOllama] = {}
        nursery = await stack.enter_async_context(trio.open_nursery())
        for spec in specs:
            sims[spec.name] = sim = await stack.enter_async_context(run_sim(spec))
            for router in started:
                agent = NodeAgent(
                    AgentConfig(
                        router_url=router.url,
                        ollama_url=sim.url,
                        node_id=spec.name,
                        parallel_slots=spec.parallel,
                    ),
                    system=sim.system_reading,
                )
                await nursery.start(agent.run)
        with trio.fail_after(10):
            for router in started:
                await router.wait_nodes(len(specs))
        try:
            yield started, sims
        finally:
            nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def node_on_two_routers(
    tmp_path: Path, state: str
) -> AsyncIterator[tuple[Router, Router, Node]]:
    """Two routers sharing ``state`` and one node (a simulated Ollama) given both router URLs,
    online on both."""
    spec = SimConfig(name="sim", models=(SLOW,), loaded=(MODEL,))
    async with (
        Router(router_config(tmp_path, "a", state)) as a,
        Router(router_config(tmp_path, "b", state)) as b,
        run_sim(spec) as sim,
        trio.open_nursery() as nursery,
    ):
        node = Node(
            NodeConfig(
                router_url=a.url,
                more_router_urls=(b.url,),
                ollama_url=sim.url,
                node_id="both",
                data_dir=str(tmp_path / "node"),
            ),
            serve_http=False,
        )
        await nursery.start(node.run)
        await a.wait_nodes(1)
        await b.wait_nodes(1)
        yield a, b, node
        nursery.cancel_scope.cancel()


async def generate(
    client: httpx.AsyncClient, url: str, prompt: str = "hi", tokens: int | None = None
) -> httpx.Response:
    body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "stream": False}
    if tokens is not None:
        body["options"] = {"num_predict": tokens}
    return await client.post(url + "/api/generate", json=body)


async def in_use(url: str, node_id: str) -> int:
    async with RespClient.open(url) as client:
        return await SharedSlots(client, "observer").in_use(node_id)


async def eight_through_two_routers(routers: list[Router]) -> list[int]:
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:

        async def one(i: int) -> None:
            response = await generate(client, routers[i % 2].url, f"request {i}")
            statuses.append(response.status_code)

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, i)
    return statuses


async def test_a_node_with_two_slots_never_runs_more_than_two_across_both_routers(
    tmp_path: Path, flushed: str
) -> None:
    spec = SimConfig(name="solo", models=(SLOW,), loaded=(MODEL,), parallel=2)
    with trio.fail_after(60):
        async with fleet_of_routers(tmp_path, flushed, [spec]) as (routers, sims):
            statuses = await eight_through_two_routers(routers)
            assert statuses == [200] * 8
            assert sims["solo"].peak_open_streams == 2  # both slots used, never a third
            for router in routers:
                stats = router.state.queues.statistics()
                assert (stats.pending, stats.in_flight, stats.done) == (0, 0, 4)
                assert router.state.shared is not None
            await eventually(lambda: _zero(in_use(flushed, "solo")))


async def _zero(count: Awaitable[int]) -> bool:
    return await count == 0


async def test_without_the_store_two_routers_overfill_the_node(tmp_path: Path) -> None:
    """The control: the same traffic through two routers that share nothing puts up to four
    requests on the two-slot node (each router fills it), which is what --state prevents."""
    spec = SimConfig(name="solo", models=(SLOW,), loaded=(MODEL,), parallel=2)
    with trio.fail_after(60):
        async with fleet_of_routers(tmp_path, None, [spec]) as (routers, sims):
            assert await eight_through_two_routers(routers) == [200] * 8
            assert sims["solo"].peak_open_streams > 2


async def test_a_cancelled_waiter_leaves_no_shared_lease(flushed: str) -> None:
    async with RespClient.open(flushed) as client, trio.open_nursery() as nursery:
        gates = []
        for name in ("a", "b"):
            state = RouterState(queues=QueueBook(default_limit=1))
            gate = SharedState(client, state, flushed, router_id=name)
            await gate.publish_and_read()
            state.queues.gate = gate
            nursery.start_soon(gate.slots.run_releases)
            gates.append(gate)
        a, b = gates
        with trio.fail_after(10):
            async with a.state.queues.lease("n", MODEL):
                assert await in_use(flushed, "n") == 1
                with trio.move_on_after(0.7):  # past one retry: B waits for the slot A holds
                    async with b.state.queues.lease("n", MODEL):
                        raise AssertionError("B took a slot A holds")
                assert b.state.queues.counters("n", MODEL).pending == 0
                assert not b.slots.held
                assert await in_use(flushed, "n") == 1  # A's alone
            assert a.state.queues.counters("n", MODEL).in_flight == 0
            await eventually(lambda: _zero(in_use(flushed, "n")))
        nursery.cancel_scope.cancel()


async def test_a_conversations_next_turn_through_the_other_router_finds_its_node(
    tmp_path: Path, flushed: str
) -> None:
    specs = [
        SimConfig(name=name, models=(SimModel(MODEL, size_bytes=2 * GiB),), loaded=(MODEL,))
        for name in ("alpha", "beta")
    ]
    landed: list[tuple[str, str]] = []
    with trio.fail_after(60):
        async with (
            fleet_of_routers(tmp_path, flushed, specs) as (routers, _),
            httpx.AsyncClient(timeout=30, trust_env=False) as client,
        ):
            a, b = routers
            for i in range(8):  # eight conversations: chance alone would miss one of them
                first = [{"role": "user", "content": f"conversation {i}: " + "words " * 300}]
                one = await client.post(
                    a.url + "/api/chat", json={"model": MODEL, "messages": first, "stream": False}
                )
                assert one.status_code == 200
                turn = [
                    *first,
                    one.json()["message"],
                    {"role": "user", "content": "and then?"},
                ]
                await eventually(lambda: _written(a))  # A's affinity is in the store
                two = await client.post(
                    b.url + "/api/chat", json={"model": MODEL, "messages": turn, "stream": False}
                )
                assert two.status_code == 200
                landed.append((one.headers["x-herd-node"], two.headers["x-herd-node"]))
    assert all(first == second for first, second in landed), landed


async def _written(router: Router) -> bool:
    shared = router.state.shared
    assert isinstance(shared, SharedState)
    return shared.unwritten == 0


async def test_the_store_going_away_and_coming_back(tmp_path: Path) -> None:
    port = free_port()
    spec = SimConfig(
        name="solo",
        models=(SimModel(MODEL, size_bytes=2 * GiB, tokens_per_second=20.0),),
        loaded=(MODEL,),
        default_tokens=60,  # 3 s: a stream that outlives the outage
        parallel=2,
    )
    with trio.fail_after(90):
        url = f"valkey://127.0.0.1:{port}/0"
        # The store is down before the routers start: they start all the same, and say so.
        async with (
            fleet_of_routers(tmp_path, url, [spec]) as (routers, _),
            httpx.AsyncClient(timeout=30, trust_env=False) as client,
        ):
            a, _b = routers
            shared = a.state.shared
            assert isinstance(shared, SharedState)
            assert not shared.available
            status = (await client.get(a.url + "/fleet/status")).json()["state"]
            assert status["mode"] == "shared" and status["available"] is False
            assert status["last_error"]
            health = (await client.get(a.url + "/dashboard/api/health")).json()
            check = next(c for c in health["checks"] if c["id"] == "state_store")
            assert check["severity"] == "critical" and "unreachable" in check["evidence"]
            assert (await generate(client, a.url)).status_code == 200  # own counts route

            async with client.stream(
                "POST",
                a.url + "/api/generate",
                json={"model": MODEL, "prompt": "long", "stream": True},
            ) as stream:
                chunks = stream.aiter_bytes()
                await chunks.__anext__()  # in flight on the node, counted locally only
                (tmp_path / "r2").mkdir()
                with redis_server(tmp_path / "r2", port=port):
                    await eventually(lambda: _true(shared.available))
                    # Reconciled: the stream still running holds its slot in the store.
                    assert await in_use(url, "solo") == 1
                    status = (await client.get(a.url + "/fleet/status")).json()["state"]
                    assert status["available"] is True and status["outages"] == 1
                    async for _ in chunks:
                        pass
                    await eventually(lambda: _zero(in_use(url, "solo")))
                    assert (await generate(client, a.url)).status_code == 200
                # Gone again mid-run: routing goes on, and the status says so.
                await eventually(lambda: _true(not shared.available))
                assert shared.outages == 2
                assert (await generate(client, a.url)).status_code == 200


async def _true(value: bool) -> bool:
    return value


async def test_settings_changed_on_one_router_reach_the_other(tmp_path: Path, flushed: str) -> None:
    spec = SimConfig(name="solo", models=(SLOW,), loaded=(MODEL,))
    with trio.fail_after(30):
        async with (
            fleet_of_routers(tmp_path, flushed, [spec]) as (routers, _),
            httpx.AsyncClient(timeout=10, trust_env=False) as client,
        ):
            a, b = routers
            assert b.state.settings.auto_pull is False
            answer = await client.post(
                a.url + "/dashboard/api/settings", json={"auto_pull": True, "stale_timeout": 90}
            )
            assert answer.status_code == 200
            await eventually(lambda: _true(b.state.settings.auto_pull))
            assert b.state.settings.stale_timeout == 90
            shown = (await client.get(b.url + "/dashboard/api/settings")).json()
            assert shown["settings"]["auto_pull"] is True


async def test_a_router_joining_takes_the_fleets_settings_and_says_which_of_its_own_lost(
    tmp_path: Path, flushed: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Settings are the fleet's: a router started with --auto-pull joining routers whose
    saved settings have it off takes theirs, and a WARNING names what it gave up."""
    with trio.fail_after(30):
        async with Router(router_config(tmp_path, "first", flushed)) as first:
            assert first.state.settings.auto_pull is False  # the store is seeded with these
            async with Router(router_config(tmp_path, "second", flushed, auto_pull=True)) as second:
                assert second.state.settings.auto_pull is False
    lost = [r for r in caplog.records if "replace this router's own" in r.getMessage()]
    assert [r.levelname for r in lost] == ["WARNING"]
    assert "auto_pull (here True, fleet False)" in lost[0].getMessage()


async def test_a_node_given_two_router_urls_heartbeats_to_both(
    tmp_path: Path, flushed: str
) -> None:
    with trio.fail_after(30):
        async with node_on_two_routers(tmp_path, flushed) as (a, b, node):
            assert len(node.agents) == 2
            for agent in node.agents:
                await agent.wait_connected()
            before = [r.state.registry.statistics().heartbeats for r in (a, b)]
            node.wake()  # one heartbeat now, to each router
            for router, count in zip((a, b), before, strict=True):
                await eventually(functools.partial(_beats_past, router, count))
            async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
                for router in (a, b):
                    assert (await generate(client, router.url)).status_code == 200


async def _beats_past(router: Router, count: int) -> bool:
    return router.state.registry.statistics().heartbeats > count


async def test_killing_a_router_mid_stream_frees_its_slots_within_the_lease_expiry(
    tmp_path: Path, flushed: str
) -> None:
    url = flushed
    ttl = 1.0
    port = free_port()
    spec = SimConfig(
        name="solo",
        models=(SimModel(MODEL, size_bytes=2 * GiB, tokens_per_second=5.0),),
        loaded=(MODEL,),
        default_tokens=200,  # 40 s: the stream outlives its router
        parallel=1,
    )
    argv = [
        sys.executable, "-m", "herd",
        "--host", "127.0.0.1", "--port", str(port), "--mdns", "false",
        "--data-dir", str(tmp_path / "doomed"),
        "--state", url, "--state-lease-ttl", str(ttl),
    ]  # fmt: skip
    doomed_url = f"http://127.0.0.1:{port}"
    with trio.fail_after(60):
        async with (
            Router(router_config(tmp_path, "b", url, state_lease_ttl=ttl)) as survivor,
            run_sim(spec) as sim,
            trio.open_nursery() as nursery,
            httpx.AsyncClient(timeout=30, trust_env=False) as client,
        ):
            process = await trio.lowlevel.open_process(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                for router_url in (doomed_url, survivor.url):
                    agent = NodeAgent(
                        AgentConfig(
                            router_url=router_url,
                            ollama_url=sim.url,
                            node_id="solo",
                            parallel_slots=1,
                            backoff_initial=0.1,
                            backoff_max=0.5,
                        ),
                        system=sim.system_reading,
                    )
                    await nursery.start(agent.run)
                await survivor.wait_nodes(1)
                await eventually(lambda: _online(client, doomed_url), within=30)
                async with client.stream(
                    "POST",
                    doomed_url + "/api/generate",
                    json={"model": MODEL, "prompt": "long", "stream": True},
                ) as stream:
                    chunks = stream.aiter_bytes()
                    await chunks.__anext__()
                    assert await in_use(url, "solo") == 1
                    os.kill(process.pid, signal.SIGKILL)
                    killed_at = trio.current_time()
                    await process.wait()
                    await eventually(lambda: _zero(in_use(url, "solo")), within=ttl * 5)
                    freed_after = trio.current_time() - killed_at
                assert freed_after <= ttl + 1.0
                # The survivor takes the node's one slot at once.
                with trio.fail_after(5):
                    assert (await generate(client, survivor.url, tokens=2)).status_code == 200
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                nursery.cancel_scope.cancel()


async def _online(client: httpx.AsyncClient, url: str) -> bool:
    try:
        status = (await client.get(url + "/fleet/status")).json()
    except httpx.HTTPError:
        return False
    return bool(status["fleet"]["nodes_online"])


def test_the_scorers_load_is_ours_plus_the_other_routers() -> None:
    state = RouterState()
    state.queues.counters("n", MODEL).in_flight = 1
    state.queues.counters("n", MODEL).pending = 1
    state.set_remote_load({("n", MODEL): (2, 3), ("n", "other:1b"): (1, 0)})
    load = state._load_with_others("n")  # what the snapshot gives the scorer for node n
    assert (load[MODEL].in_flight, load[MODEL].pending) == (3, 4)
    assert (load["other:1b"].in_flight, load["other:1b"].pending) == (1, 0)
    assert state.queues.counters("n", MODEL).in_flight == 1  # ours stay ours
    assert state.remote_load() == {("n", MODEL): (2, 3), ("n", "other:1b"): (1, 0)}
    state.set_remote_load({})  # the store away: our own counts alone
    assert state._load_with_others("n")[MODEL].in_flight == 1


async def test_samples_one_router_learns_reach_the_other_and_a_starting_one(
    tmp_path: Path, flushed: str
) -> None:
    spec = SimConfig(name="solo", models=(SLOW,), loaded=(MODEL,))
    with trio.fail_after(30):
        async with (
            fleet_of_routers(tmp_path, flushed, [spec]) as (routers, _),
            httpx.AsyncClient(timeout=10, trust_env=False) as client,
        ):
            a, b = routers
            assert ("solo", MODEL) not in b.state.history.latency_p75_ms
            assert (await generate(client, a.url)).status_code == 200
            await eventually(lambda: _true(("solo", MODEL) in b.state.history.latency_p75_ms))
            learned = b.state.history.latency_p75_ms[("solo", MODEL)]
            assert learned == a.state.history.latency_p75_ms[("solo", MODEL)]
            await eventually(lambda: _written(a))
            async with Router(router_config(tmp_path, "late", flushed)) as late:
                assert late.state.history.latency_p75_ms[("solo", MODEL)] == learned


async def test_a_drain_asked_by_one_router_is_done_once_towards_both(
    tmp_path: Path, flushed: str
) -> None:
    with trio.fail_after(30):
        async with node_on_two_routers(tmp_path, flushed) as (a, b, node):
            drain: dict[str, object] = {"type": "command", "command": "drain"}
            assert a.state.command("both", drain) and a.state.command("both", drain)
            await eventually(lambda: _true(all(agent.draining for agent in node.agents)))
            for router in (a, b):  # both hear it in a heartbeat
                await eventually(functools.partial(_draining, router))
            with trio.fail_after(5):
                assert await node.drain()  # nothing in flight: both routers say drained


async def _draining(router: Router) -> bool:
    record = router.state.registry.get("both")
    return record is not None and record.report.draining
