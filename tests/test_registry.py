"""Node states from heartbeat timing."""

from __future__ import annotations

from herd.core.models import LoadedModel, NodeReport, NodeSnapshot, NodeStatus
from herd.state.registry import Admission, NodeRegistry
from herd.state.state import RouterState


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
