"""Node states from heartbeat timing: the registry's rules, then a running router forgetting a
node that stayed away past ``--forget-after`` (and taking it back when it returns)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import trio
import trio.testing

from herd.core.models import LoadedModel, NodeReport, NodeSnapshot, NodeStatus
from herd.node.agent import AgentConfig, NodeAgent
from herd.sim import SimConfig, SimOllama, run_sim
from herd.state.registry import Admission, NodeRegistry
from herd.state.state import RouterState
from tests.conftest import LLAMA_3B, QWEN_7B, running_fleet, wait_until


def test_online_degraded_offline_and_back() -> None:
    registry = NodeRegistry(heartbeat_timeout=15, heartbeat_offline=30)
    session = object()
    changes = registry.apply_report(NodeReport(node_id="a"), now=100.0, session=session)
    assert [c.new for c in changes] == [NodeStatus.ONLINE]
    assert registry.next_deadline() == 115.0
    assert registry.tick(114.9) == []
    assert [c.new for c in registry.tick(115.0)] == [NodeStatus.DEGRADED]
    assert registry.next_deadline() == 130.0
    assert [c.new for c in registry.tick(130.0)] == [NodeStatus.OFFLINE]
    assert registry.next_deadline() == 100.0 + registry.forget_after  # when it is forgotten
    changes = registry.apply_report(NodeReport(node_id="a"), now=131.0, session=session)
    assert [(c.old, c.new) for c in changes] == [(NodeStatus.OFFLINE, NodeStatus.ONLINE)]


def test_a_node_offline_past_forget_after_is_forgotten() -> None:
    registry = NodeRegistry(heartbeat_timeout=15, heartbeat_offline=30, forget_after=3600)
    registry.apply_report(NodeReport(node_id="gone"), now=0.0, session=object())
    registry.apply_report(NodeReport(node_id="stays"), now=0.0, session=object())
    registry.tick(30.0)
    registry.apply_report(NodeReport(node_id="stays"), now=3000.0, session=object())
    registry.tick(3599.0)
    assert registry.forget(3599.9) == []
    assert registry.next_deadline() == 3600.0
    assert registry.forget(3600.0) == ["gone"]
    assert [r.report.node_id for r in registry.records()] == ["stays"]
    # A forgotten node that comes back is simply new.
    changes = registry.apply_report(NodeReport(node_id="gone"), now=4000.0, session=object())
    assert [(c.old, c.new) for c in changes] == [(None, NodeStatus.ONLINE)]


def test_socket_close_is_offline_but_an_old_session_closing_is_not() -> None:
    registry = NodeRegistry()
    old, new = object(), object()
    registry.apply_report(NodeReport(node_id="a"), 0.0, old)
    registry.apply_report(NodeReport(node_id="a"), 1.0, new)  # reconnected
    assert registry.disconnected("a", 2.0, old) == []
    assert [c.new for c in registry.disconnected("a", 2.0, new)] == [NodeStatus.OFFLINE]


def test_one_live_session_per_node_id() -> None:
    registry = NodeRegistry(heartbeat_timeout=15, heartbeat_offline=30)
    first, second = object(), object()
    assert registry.admit("a", first) == Admission(allowed=True)  # a node never seen
    registry.apply_report(NodeReport(node_id="a"), 0.0, first)
    assert registry.admit("a", first) == Admission(allowed=True)
    assert registry.admit("a", second) == Admission(allowed=False)  # live: no takeover
    registry.tick(15.0)
    assert registry.admit("a", second) == Admission(allowed=False)  # degraded is still live
    registry.tick(30.0)  # silent past offline, socket still open (half-open): replaceable
    assert registry.admit("a", second) == Admission(allowed=True, stale=first)
    registry.apply_report(NodeReport(node_id="a"), 31.0, first)
    registry.disconnected("a", 32.0, first)  # the socket closed: rejoin at once
    assert registry.admit("a", second) == Admission(allowed=True)


def test_unloaded_models_are_remembered_as_warm() -> None:
    registry = NodeRegistry()
    hot = NodeReport(node_id="a", loaded_models=(LoadedModel("m:latest"),))
    registry.apply_report(hot, 0.0)
    registry.apply_report(NodeReport(node_id="a"), 10.0)
    snapshot = registry.snapshot(lambda node: {})
    assert snapshot.nodes[0].recently_unloaded == {"m:latest": 10.0}
    registry.apply_report(hot, 20.0)
    assert registry.snapshot(lambda node: {}).nodes[0].recently_unloaded == {}


async def test_a_nodes_snapshot_is_kept_until_its_record_or_queues_change() -> None:
    """The router's snapshot reuses each node's part while nothing it was built from changed,
    and never hands out a stale one: a slot taken or left, a heartbeat, a status change, the
    other routers' load, each shows in the very next snapshot."""
    state = RouterState()
    state.registry.apply_report(NodeReport(node_id="a", parallel_slots=2), 0.0)
    state.registry.apply_report(NodeReport(node_id="b", parallel_slots=2), 0.0)

    def node(node_id: str) -> NodeSnapshot:
        found = state.snapshot().node(node_id)
        assert found is not None
        return found

    first_a, first_b = node("a"), node("b")
    assert node("a") is first_a and node("b") is first_b  # nothing changed: the same objects
    async with state.queues.lease("a", "m"):
        held = node("a")
        assert held is not first_a and held.load["m"].in_flight == 1
        assert node("b") is first_b  # a slot on a doesn't rebuild b
    assert node("a").load["m"].in_flight == 0
    state.queues.set_model_limits("a", {"m": 1})
    assert node("a").load["m"].slots == 1
    before = node("b")
    state.registry.apply_report(NodeReport(node_id="b", parallel_slots=4), 1.0)
    assert node("b") is not before and node("b").report.parallel_slots == 4
    before = node("b")
    state.registry.tick(20.0)  # b's heartbeat is 19 s old: degraded
    assert node("b").status is NodeStatus.DEGRADED and node("b") is not before
    state.set_remote_load({("a", "m"): (3, 1)})
    assert (node("a").load["m"].in_flight, node("a").load["m"].pending) == (3, 1)
    state.set_remote_load({})
    assert node("a").load["m"].in_flight == 0
    # A forgotten node's part goes with it.
    state.registry.tick(10_000_000.0)
    assert state.registry.forget(10_000_000.0) == ["a", "b"]
    assert state.snapshot().nodes == ()


FORGET_AFTER = 302.5  # not a multiple of the heartbeat interval: a heartbeat is no wake-up


def agent_for(router_url: str, sim: SimOllama) -> NodeAgent:
    return NodeAgent(
        AgentConfig(router_url=router_url, ollama_url=sim.url, node_id=sim.config.name),
        system=sim.system_reading,
    )


async def run_until_cancelled(
    agent: NodeAgent, scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]
) -> None:
    """Run ``agent`` until ``scope`` is cancelled (the machine switched off)."""
    with scope:
        await agent.run(task_status=task_status)


def beta_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if 'node="beta"' in line]


async def test_a_running_router_forgets_a_node_offline_past_forget_after_and_takes_it_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    alpha = SimConfig(name="alpha", models=(LLAMA_3B,), loaded=("llama3.2:3b",))
    beta = SimConfig(name="beta", models=(QWEN_7B,), loaded=("qwen2.5:7b",))
    async with (
        running_fleet(tmp_path, [alpha], forget_after=FORGET_AFTER) as fleet,
        run_sim(beta) as sim,
        httpx.AsyncClient(base_url=fleet.url, timeout=None, trust_env=False) as client,
        trio.open_nursery() as machines,
    ):
        state = fleet.router.state

        async def until(predicate: Callable[[], bool], within: float = 60.0) -> None:
            with trio.fail_after(within):  # virtual time
                while not predicate():
                    await state.wait_fleet_changed()

        def known() -> set[str]:
            return {n.node_id for n in state.snapshot().nodes}

        def status_of(node_id: str) -> NodeStatus | None:
            record = state.registry.get(node_id)
            return record.status if record is not None else None

        switch_off = trio.CancelScope()
        await machines.start(run_until_cancelled, agent_for(fleet.url, sim), switch_off)
        await until(lambda: "beta" in known())
        body = {"model": "qwen2.5:7b", "prompt": "hi", "stream": False}
        served = await client.post("/api/generate", json=body)
        assert served.status_code == 200 and served.headers["x-herd-node"] == "beta"
        await wait_until(lambda: len(state.traces) == 1)
        metrics = (await client.get("/metrics")).text
        assert any(line.startswith("herd_requests_total") for line in beta_lines(metrics))
        assert any(line.startswith("herd_queue_in_flight") for line in beta_lines(metrics))
        assert ("beta", "qwen2.5:7b") in state.history.latency_p75_ms  # learned of beta

        # The machine goes away: offline at once (its socket closed), still listed.
        switch_off.cancel()
        await until(lambda: status_of("beta") is NodeStatus.OFFLINE)
        record = state.registry.get("beta")
        assert record is not None
        forget_at = record.last_seen + FORGET_AFTER
        await trio.sleep_until(forget_at - 60)  # the reaper wakes every 15 s: no jump past it
        status = (await client.get("/fleet/status")).json()
        assert [(n["node_id"], n["status"]) for n in status["nodes"]] == [
            ("alpha", "online"),
            ("beta", "offline"),
        ]

        # Past forget_after it is gone from everything the router keeps and shows, and the
        # fleet hears of it at once (the dashboard's stream, the timeline).
        await until(lambda: "beta" not in known(), within=120)
        assert trio.current_time() == forget_at
        assert state.registry.get("beta") is None
        assert state.registry.statistics().nodes_total == 1
        status = (await client.get("/fleet/status")).json()
        assert [n["node_id"] for n in status["nodes"]] == ["alpha"]
        assert not [key for key in status["queues"] if key.startswith("beta:")]
        assert beta_lines((await client.get("/metrics")).text) == []
        assert not [key for key in state.history.latency_p75_ms if key[0] == "beta"]
        assert "beta" not in state.history.node_speed
        assert not state.model_known("qwen2.5:7b")
        gone = await client.post("/api/generate", json=body)
        assert gone.status_code == 404, gone.text  # no node has it now
        await wait_until(
            lambda: any(
                (e.kind, e.node_id) == ("node_forgotten", "beta") for e in state.timeline.recent()
            )
        )

        # It comes back as a new node, with nothing left over from before.
        await machines.start(run_until_cancelled, agent_for(fleet.url, sim), trio.CancelScope())
        await until(lambda: "beta" in known())
        status = (await client.get("/fleet/status")).json()
        assert {n["node_id"]: n["status"] for n in status["nodes"]} == {
            "alpha": "online",
            "beta": "online",
        }
        again = await client.post("/api/generate", json=body)
        assert again.status_code == 200 and again.headers["x-herd-node"] == "beta"
        await wait_until(lambda: len(state.traces) == 3)
        (count,) = [
            line
            for line in beta_lines((await client.get("/metrics")).text)
            if line.startswith("herd_requests_total")
        ]
        assert count.endswith(" 1")  # counted afresh: the first request went with the node
        machines.cancel_scope.cancel()
