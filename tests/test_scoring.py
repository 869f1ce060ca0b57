"""The scorer: eliminations, each signal, ranking and tie-breaks. Plain synchronous tests."""

from __future__ import annotations

import ast
import functools
import itertools
import math
import random
from pathlib import Path

import attrs
import pytest

from herd.core.models import (
    AvailableModel,
    BackendInfo,
    Capabilities,
    Capacity,
    FleetSnapshot,
    GpuInfo,
    LoadedModel,
    MemoryInfo,
    MemoryPressure,
    ModelLoad,
    NodeReport,
    NodeSnapshot,
    NodeStatus,
)
from herd.core.scoring import (
    SIGNALS,
    History,
    RouteDecision,
    RouteRequest,
    ScoringSettings,
    explain,
    score,
)

GiB = 2**30
S = ScoringSettings()
M = "llama3.2:3b"


def node(
    node_id: str,
    *,
    loaded: tuple[str, ...] = (),
    available: tuple[str, ...] = (M,),
    size: int = 2 * GiB,
    total: int = 32 * GiB,
    free: int = 24 * GiB,
    status: NodeStatus = NodeStatus.ONLINE,
    load: dict[str, ModelLoad] | None = None,
    slots: int = 4,
    context: int = 4096,
    unloaded: dict[str, float] | None = None,
    **report: object,
) -> NodeSnapshot:
    report.setdefault("backend", BackendInfo(url=f"http://{node_id}", healthy=True))
    report.setdefault("memory", MemoryInfo(total_bytes=total, available_bytes=free))
    return NodeSnapshot(
        report=NodeReport(
            node_id=node_id,
            loaded_models=tuple(LoadedModel(n, size, size, context) for n in loaded),
            available_models=tuple(AvailableModel(n, size) for n in available),
            parallel_slots=slots,
            **report,  # type: ignore[arg-type]
        ),
        status=status,
        last_seen=0.0,
        load=load or {},
        recently_unloaded=unloaded or {},
    )


def winner_of(decision: RouteDecision) -> str:
    assert decision.winner is not None, decision.eliminated
    return decision.winner.node_id


def decide(
    *nodes: NodeSnapshot,
    request: RouteRequest | None = None,
    history: History | None = None,
    now: float = 100.0,
    seed: int = 0,
) -> RouteDecision:
    return score(
        request or RouteRequest(model=M),
        FleetSnapshot(nodes=nodes),
        history or History(),
        now,
        S,
        random.Random(seed),
    )


@pytest.mark.parametrize(
    ("snapshot", "reason"),
    [
        (node("n", status=NodeStatus.OFFLINE), "offline"),
        (node("n", draining=True), "draining"),
        (node("n", backend=BackendInfo(healthy=False, error="refused")), "backend down: refused"),
        (node("n", available=()), "model not on node"),
        (node("n", size=30 * GiB), "needs 30.0 GiB free, has 24.0 GiB"),
        (node("n", capacity=Capacity(paused=True)), "capacity paused"),
        (
            node("n", memory=MemoryInfo(32 * GiB, 24 * GiB, MemoryPressure.CRITICAL)),
            "critical memory pressure (cold load refused)",
        ),
        (
            node("n", capacity=Capacity(ceiling_bytes=12 * GiB), size=5 * GiB),
            "needs 5.0 GiB free, has 4.0 GiB",
        ),  # 8 GiB used, ceiling 12
    ],
)
def test_eliminations_name_the_reason(snapshot: NodeSnapshot, reason: str) -> None:
    decision = decide(snapshot)
    assert decision.winner is None
    assert [(e.node_id, e.reason) for e in decision.eliminated] == [("n", reason)]


def test_excluded_node_and_image_kind() -> None:
    decision = decide(
        node("a"), node("b"), request=RouteRequest(model=M, excluded_nodes=frozenset({"a"}))
    )
    assert decision.winner is not None and decision.winner.node_id == "b"
    assert decision.eliminated[0].reason == "failed earlier in this request"
    image = decide(
        node("a"),
        node(
            "b",
            capabilities=Capabilities(image_backends=("mflux",), image_models=("z-image-turbo",)),
        ),
        request=RouteRequest(model="z-image-turbo", kind="image"),
    )
    assert image.winner is not None and image.winner.node_id == "b"


@pytest.mark.parametrize(
    ("snapshot", "request_", "reason"),
    [
        (node("n"), RouteRequest(model=M, kind="video"), "kind not supported: 'video'"),
        (
            node("n", capabilities=Capabilities(text=False)),
            RouteRequest(model=M),
            "kind not supported: node serves no text models",
        ),
        (node("n"), RouteRequest(model="whisper", kind="stt"), "no speech-to-text backend"),
        (node("n"), RouteRequest(model="flux-dev", kind="image"), "no image backend"),
        (
            node("n", capabilities=Capabilities(image_backends=("mflux",))),
            RouteRequest(model="flux-dev", kind="image"),
            "image model not on node",
        ),
    ],
)
def test_kind_eliminations(snapshot: NodeSnapshot, request_: RouteRequest, reason: str) -> None:
    decision = decide(snapshot, request=request_)
    assert decision.winner is None
    assert [e.reason for e in decision.eliminated] == [reason]


def test_speech_to_text_needs_only_the_backend() -> None:
    stt = node("n", available=(), capabilities=Capabilities(stt_backends=("faster-whisper",)))
    decision = decide(stt, request=RouteRequest(model="whisper", kind="stt"))
    assert decision.winner is not None and decision.winner.node_id == "n"


def test_embeddings_use_the_model_list() -> None:
    request = RouteRequest(model="nomic-embed-text:latest", kind="embed")
    has = node("has", available=("nomic-embed-text:latest",))
    lacks = node("lacks")
    decision = decide(has, lacks, request=request)
    assert decision.winner is not None and decision.winner.node_id == "has"
    assert [(e.node_id, e.reason) for e in decision.eliminated] == [("lacks", "model not on node")]


def test_every_node_is_ranked_or_eliminated_once() -> None:
    fleet = (node("a", loaded=(M,)), node("b", draining=True), node("c"), node("d", available=()))
    decision = decide(*fleet)
    seen = [c.node_id for c in decision.ranked] + [e.node_id for e in decision.eliminated]
    assert sorted(seen) == ["a", "b", "c", "d"]
    assert [e.node_id for e in decision.eliminated] == ["b", "d"]  # fleet order
    assert decision.winner is decision.ranked[0]
    assert [c.hot for c in decision.ranked] == [True, False]


def test_a_hot_model_under_critical_pressure_is_still_served() -> None:
    pressured = node("n", loaded=(M,), memory=MemoryInfo(32 * GiB, GiB, MemoryPressure.CRITICAL))
    assert decide(pressured).winner is not None


def test_thermal_hot_beats_warm_beats_disk() -> None:
    # A model as big as thermal_full_load_bytes: the whole gap from hot to on disk.
    big = functools.partial(node, size=S.thermal_full_load_bytes, total=128 * GiB, free=100 * GiB)
    hot = big("hot", loaded=(M,))
    warm = big("warm", unloaded={M: 90.0})
    cold = big("cold")
    decision = decide(cold, warm, hot)
    assert [c.node_id for c in decision.ranked] == ["hot", "warm", "cold"]
    assert [c.breakdown["thermal"] for c in decision.ranked] == [50.0, 30.0, 10.0]
    # A small model loses less for a cold load: loading it is quick.
    small = decide(node("small", size=S.thermal_full_load_bytes // 4)).ranked[0]
    assert small.breakdown["thermal"] == 50.0 - (50.0 - 10.0) / 4
    # Warm only within the window.
    stale = decide(big("w", unloaded={M: 0.0}), now=S.warm_window_s + 1)
    assert stale.ranked[0].breakdown["thermal"] == 10.0
    # "Less than warm_window_s ago": the boundary itself is no longer warm.
    edge = decide(big("w", unloaded={M: 0.0}), now=S.warm_window_s)
    assert edge.ranked[0].breakdown["thermal"] == 10.0
    just = decide(big("w", unloaded={M: 0.0}), now=S.warm_window_s - 0.001)
    assert just.ranked[0].breakdown["thermal"] == 30.0


def test_queue_penalty_saturates_but_keeps_growing_and_is_eased_by_speed() -> None:
    def penalty(pending: int, history: History | None = None, in_flight: int = 4) -> float:
        busy = node("busy", load={M: ModelLoad(pending=pending, in_flight=in_flight)})
        return decide(busy, history=history).ranked[0].breakdown["queue_depth"]

    # Full scale at queue_penalty_max; beyond it, slowly (logarithmically) more.
    deep, deeper = penalty(40), penalty(80)
    assert deeper < deep < -S.queue_penalty_max
    assert deeper > 2 * deep  # slowly: twice the queue costs far less than twice the points
    # Per round of slots, divided by the node's speed.
    assert penalty(0, in_flight=2) == -S.queue_penalty_per_slot_load / 2
    slow = penalty(0, History(node_speed={"busy": 0.5}), in_flight=2)
    fast = penalty(0, History(node_speed={"busy": 2.0}), in_flight=2)
    assert slow == -S.queue_penalty_per_slot_load and fast == -S.queue_penalty_per_slot_load / 4
    # A node the history doesn't know yet, while others are known, counts as slowish.
    unknown = penalty(0, History(node_speed={"other": 1.0}), in_flight=2)
    assert unknown == -round(S.queue_penalty_per_slot_load / 2 / S.unknown_node_speed, 3)


def test_queue_moves_small_models_off_a_hot_node_but_big_ones_stay() -> None:
    # A small model loads in a second or two: a deep queue on the hot node sends it elsewhere.
    hot_busy = node("hot", loaded=(M,), load={M: ModelLoad(pending=12, in_flight=4)})
    warm_idle = node("idle", unloaded={M: 99.0})
    assert winner_of(decide(hot_busy, warm_idle)) == "idle"
    # A 32 GiB model costs a minute to load: a short queue doesn't move it.
    big = functools.partial(node, size=32 * GiB, total=128 * GiB, free=100 * GiB)
    hot = big("hot", loaded=(M,), load={M: ModelLoad(pending=2, in_flight=4)})
    cold = big("cold")
    assert winner_of(decide(hot, cold)) == "hot"
    # ...but a history that shows the hot node slow for it does.
    history = History(
        latency_p75_ms={("hot", M): 60_000.0}, model_p75_ms={M: 10_000.0}, node_speed={"cold": 1.0}
    )
    assert winner_of(decide(hot, cold, history=history)) == "cold"


def test_wait_time_from_history() -> None:
    # Without a typical time for the model: the absolute p75, log-scaled.
    history = History(latency_p75_ms={("slow", M): 30_000.0, ("quick", M): 200.0})
    decision = decide(node("slow"), node("quick"), history=history)
    breakdown = {c.node_id: c.breakdown["wait_time"] for c in decision.ranked}
    assert breakdown["slow"] == -S.wait_penalty_max
    assert -S.wait_penalty_max / 4 < breakdown["quick"] < 0
    assert winner_of(decision) == "quick"
    # With one: in units of the typical time, full penalty at wait_full_multiple of them; a
    # node that hasn't served the model is estimated from its speed; a queue multiplies.
    typical = 10_000.0
    history = History(
        latency_p75_ms={("known", M): typical},
        model_p75_ms={M: typical},
        node_speed={"known": 1.0, "fast": 2.0},
    )
    queued = node("queued", load={M: ModelLoad(in_flight=2)})  # half a round of its 4 slots
    decision = decide(node("known"), node("fast"), queued, history=history)
    points = {c.node_id: c.breakdown["wait_time"] for c in decision.ranked}
    one = S.wait_penalty_max / S.wait_full_multiple
    assert points["known"] == -round(one, 3)
    assert points["fast"] == -round(one / 2, 3)
    # Unknown speed (slowish), then half as long again for the queue ahead.
    assert points["queued"] == -round(one / S.unknown_node_speed * 1.5, 3)


def test_role_affinity_big_models_to_big_machines() -> None:
    big_model = RouteRequest(model="llama3.3:70b")
    studio = node(
        "studio", available=("llama3.3:70b",), size=40 * GiB, total=128 * GiB, free=100 * GiB
    )
    mid = node("mid", available=("llama3.3:70b",), size=40 * GiB, total=64 * GiB, free=50 * GiB)
    decision = decide(mid, studio, request=big_model)
    assert winner_of(decision) == "studio"
    assert decision.ranked[0].breakdown["role_affinity"] == S.role_affinity_max
    small = decide(
        node("laptop", total=16 * GiB, free=12 * GiB),
        node("server", total=128 * GiB, free=100 * GiB),
    )
    roles = {c.node_id: c.breakdown["role_affinity"] for c in small.ranked}
    assert roles["laptop"] > roles["server"] == 0.0


def test_context_fit() -> None:
    request = RouteRequest(model=M, estimated_prompt_tokens=3000)
    fits = decide(node("n", loaded=(M,), context=8192), request=request).ranked[0]
    tight = decide(node("n", loaded=(M,), context=3600), request=request).ranked[0]
    short = decide(node("n", loaded=(M,), context=2048), request=request).ranked[0]
    assert fits.breakdown["context_fit"] == S.context_fit_max
    assert 0 < tight.breakdown["context_fit"] < S.context_fit_max
    assert short.breakdown["context_fit"] == -S.context_fit_max
    asked = RouteRequest(model=M, requested_context=16384)
    assert (
        decide(node("n", loaded=(M,), context=8192), request=asked)
        .ranked[0]
        .breakdown["context_fit"]
        == -S.context_fit_max
    )


def test_availability_and_degraded() -> None:
    full = decide(node("n")).ranked[0].breakdown["availability"]
    degraded = decide(node("n", status=NodeStatus.DEGRADED)).ranked[0].breakdown["availability"]
    learned = decide(node("n", capacity=Capacity(availability=0.25))).ranked[0]
    assert full == S.availability_max
    assert degraded == S.availability_max - S.degraded_penalty
    assert learned.breakdown["availability"] == -5.0


def test_memory_fit_counts_the_cold_load() -> None:
    roomy = decide(node("n", free=24 * GiB, size=2 * GiB)).ranked[0].breakdown["memory_fit"]
    cramped = decide(node("n", free=6 * GiB, size=5 * GiB)).ranked[0].breakdown["memory_fit"]
    assert roomy == S.memory_fit_max
    assert 0 < cramped < 2


def test_breakdown_sums_to_score_and_names_every_signal() -> None:
    decision = decide(node("a", loaded=(M,)), node("b"), node("c", unloaded={M: 50.0}))
    for candidate in decision.ranked:
        assert set(candidate.breakdown) == set(SIGNALS)
        assert candidate.score == pytest.approx(sum(candidate.breakdown.values()))
    assert decision.runners_up == decision.ranked[1:]
    assert "a" in explain(decision)


def test_ties_break_at_random_but_reproducibly() -> None:
    a, b = node("a"), node("b")
    winners = {winner_of(decide(a, b, seed=seed)) for seed in range(40)}
    assert winners == {"a", "b"}
    first = [winner_of(decide(a, b, seed=s)) for s in range(10)]
    again = [winner_of(decide(a, b, seed=s)) for s in range(10)]
    assert first == again


def test_only_ties_are_shuffled() -> None:
    hot = node("hot", loaded=(M,))  # scores above the three equal cold nodes
    orders = {
        tuple(c.node_id for c in decide(hot, node("a"), node("b"), node("c"), seed=s).ranked)
        for s in range(60)
    }
    assert {order[0] for order in orders} == {"hot"}
    assert {order[1:] for order in orders} == set(itertools.permutations("abc"))
    # Nothing ties: the random source is not drawn from (a seeded caller's other draws are its
    # own to make).
    rng = random.Random(5)
    before = rng.getstate()
    score(RouteRequest(model=M), FleetSnapshot((hot, node("a"))), History(), 100.0, S, rng)
    assert rng.getstate() == before


def test_same_inputs_same_decision() -> None:
    fleet = (node("a", loaded=(M,)), node("b"))
    assert decide(*fleet, seed=3) == decide(*fleet, seed=3)
    assert attrs.evolve(decide(*fleet).request) == RouteRequest(model=M)


ALLOWED = {
    "__future__",
    "math",
    "operator",
    "random",
    "collections",
    "collections.abc",
    "typing",
    "attrs",
    "herd.core.models",
    "herd.core.memory",
    "herd.core.scoring",
    "herd.core.scoring.engine",
}
BANNED_NAMES = {"time", "trio", "asyncio", "datetime", "httpx", "quart", "os", "socket"}
BANNED_ATTRIBUTES = {"current_time", "monotonic", "perf_counter", "time_ns", "utcnow"}


def _sources() -> list[tuple[str, ast.Module]]:
    package = Path(__file__).parent.parent / "herd" / "core" / "scoring"
    found = [(path.name, ast.parse(path.read_text())) for path in sorted(package.glob("*.py"))]
    # The memory rules the scorer reads (where a model runs on a node) are held to the same.
    rules = package.parent / "memory.py"
    found.append((rules.name, ast.parse(rules.read_text())))
    assert len(found) >= 3
    return found


def test_scoring_is_pure() -> None:
    for name, tree in _sources():
        for item in ast.walk(tree):
            if isinstance(item, ast.Import):
                modules = [alias.name for alias in item.names]
            elif isinstance(item, ast.ImportFrom):
                modules = [item.module or ""]
            else:
                modules = []
            for module in modules:
                assert module in ALLOWED, f"{name} imports {module}"
            if isinstance(item, ast.Name):
                assert item.id not in BANNED_NAMES, f"{name}:{item.lineno} uses {item.id}"
            if isinstance(item, ast.Attribute):
                assert item.attr not in BANNED_ATTRIBUTES, f"{name}:{item.lineno} {item.attr}"
            # The global random generator is shared state: only a passed-in Random may be used.
            if (
                isinstance(item, ast.Attribute)
                and isinstance(item.value, ast.Name)
                and item.value.id == "random"
            ):
                assert item.attr == "Random", f"{name}:{item.lineno} random.{item.attr}"


def test_scoring_has_no_module_level_mutable_state() -> None:
    mutable = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)
    for name, tree in _sources():
        for item in tree.body:
            targets = item.targets if isinstance(item, ast.Assign) else []
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                continue  # export list, by convention
            if isinstance(item, ast.Assign | ast.AnnAssign) and item.value is not None:
                assert not isinstance(item.value, mutable), f"{name}:{item.lineno}"
                if isinstance(item.value, ast.Call) and isinstance(item.value.func, ast.Name):
                    assert item.value.func.id not in {"list", "dict", "set"}, f"{name}"
            assert not isinstance(item, ast.Global), f"{name}:{item.lineno}"


def test_image_jobs_avoid_evicting_hot_models() -> None:
    caps = Capabilities(image_backends=("mflux",), image_models=("flux-dev",))
    busy = node("busy", loaded=(M,), free=6 * GiB, total=64 * GiB, capabilities=caps)
    idle = node("idle", free=20 * GiB, total=24 * GiB, capabilities=caps)
    decision = decide(busy, idle, request=RouteRequest(model="flux-dev", kind="image"))
    assert decision.winner is not None and decision.winner.node_id == "idle"
    scores = {c.node_id: c.breakdown["thermal"] for c in decision.ranked}
    assert scores == {"busy": -S.image_eviction_penalty, "idle": 0.0}
    # Alone, the crowded node still takes the job: better than refusing it.
    assert decide(busy, request=RouteRequest(model="flux-dev", kind="image")).winner is not None


def test_odd_numbers_from_nodes_and_history_never_raise() -> None:
    nan = float("nan")
    fleet = (
        node("a", loaded=(M,), capacity=Capacity(availability=nan), context=0),
        node("b", total=0, free=0, size=0, load={M: ModelLoad(in_flight=3)}, slots=0),
        node("c", capacity=Capacity(availability=7.0, ceiling_bytes=GiB // 2), size=0),
    )
    history = History(
        latency_p75_ms={("a", M): nan, ("b", M): -5.0, ("c", M): float("inf")},
        node_speed={"a": nan, "b": 0.0, "c": -1.0},
    )
    decision = decide(*fleet, history=history)
    assert len(decision.ranked) == 3
    for candidate in decision.ranked:
        assert all(math.isfinite(v) for v in candidate.breakdown.values()), candidate
        assert math.isfinite(candidate.score)
    points = {c.node_id: c.breakdown for c in decision.ranked}
    assert points["a"]["availability"] == 0.0  # NaN availability: no opinion
    assert points["a"]["wait_time"] == 0.0  # NaN latency: no history
    assert points["b"]["wait_time"] == 0.0
    assert points["c"]["wait_time"] == 0.0  # inf latency: no history either
    assert points["c"]["availability"] == S.availability_max  # clamped to 1.0
    # Speed 0 is floored at speed_floor, slots 0 read as 1: a deep (saturated) penalty.
    assert points["b"]["queue_depth"] < -S.queue_penalty_max


@pytest.mark.parametrize(
    "change",
    [
        {"thermal_loaded": -1.0},
        {"queue_penalty_max": float("nan")},
        {"wait_penalty_max": float("inf")},
        {"wait_full_penalty_ms": 0.0},
        {"big_node_bytes": 0},
        {"memory_comfort_share": 0.0},
        {"context_comfort_ratio": 0.9},
        {"thermal_full_load_bytes": 0},  # divisors, all of them
        {"queue_penalty_max": 0.0},
        {"speed_floor": 0.0},
        {"unknown_node_speed": 0.0},
        {"wait_full_multiple": 0.0},
    ],
)
def test_settings_refuse_meaningless_values(change: dict[str, float]) -> None:
    (name,) = change
    with pytest.raises(ValueError, match=name):
        ScoringSettings(**change)  # type: ignore[arg-type]


def test_settings_can_be_tuned() -> None:
    cold_first = ScoringSettings(thermal_loaded=0.0, thermal_on_disk=60.0)
    decision = score(
        RouteRequest(model=M),
        FleetSnapshot(nodes=(node("hot", loaded=(M,)), node("cold"))),
        History(),
        0.0,
        cold_first,
        random.Random(0),
    )
    assert decision.winner is not None and decision.winner.node_id == "cold"


def _random_fleet(rng: random.Random) -> FleetSnapshot:
    """Eight nodes of every shape the scorer tells apart: hot, warm, cold, evicting, spilled,
    offline, draining, full, queued, each with a mix of three models."""
    models = (M, "qwen3:8b", "nomic-embed-text")
    nodes = []
    for i in range(8):
        on_disk = tuple(m for m in models if rng.random() < 0.8)
        loaded = tuple(m for m in on_disk if rng.random() < 0.4)
        load = {
            m: ModelLoad(
                pending=rng.randint(0, 3),
                in_flight=rng.randint(0, 2),
                last_used=rng.choice((None, 10.0, 90.0)),
                slots=rng.choice((0, 0, 1)),
            )
            for m in models
            if rng.random() < 0.5
        }
        gpus: tuple[GpuInfo, ...] = ()
        if rng.random() < 0.4:
            gpus = (GpuInfo(name="gpu", memory_total_bytes=8 * GiB, memory_used_bytes=GiB),)
        nodes.append(
            NodeSnapshot(
                report=NodeReport(
                    node_id=f"n{i}",
                    backend=BackendInfo(url=f"http://n{i}", healthy=rng.random() < 0.9),
                    memory=MemoryInfo(
                        total_bytes=rng.choice((8, 16, 64)) * GiB,
                        available_bytes=rng.choice((2, 6, 12)) * GiB,
                    ),
                    loaded_models=tuple(
                        LoadedModel(m, 5 * GiB, rng.choice((5, 3)) * GiB, rng.choice((2048, 8192)))
                        for m in loaded
                    ),
                    available_models=tuple(
                        AvailableModel(m, rng.choice((2, 5, 20)) * GiB) for m in on_disk
                    ),
                    parallel_slots=rng.choice((1, 2, 4)),
                    draining=rng.random() < 0.1,
                    gpus=gpus,
                ),
                status=rng.choice((NodeStatus.ONLINE, NodeStatus.ONLINE, NodeStatus.DEGRADED))
                if rng.random() < 0.9
                else NodeStatus.OFFLINE,
                last_seen=0.0,
                load=load,
                recently_unloaded={m: 50.0 for m in models if rng.random() < 0.3},
            )
        )
    return FleetSnapshot(tuple(nodes))


def test_what_a_report_keeps_between_decisions_never_changes_one() -> None:
    """The scorer keeps what a node's report says of each model with the report
    (NodeReport.derived), and the order its loaded models would be dropped in with the node's
    snapshot (NodeSnapshot.derived), for the next decision. Every decision made on reports and
    snapshots used before equals the decision on fresh copies of them, whatever changes
    between them: the request (model, kind, nodes excluded or named, conversation, prompt
    size), the history, the clock, the settings, and the queues and status of snapshots that
    share a report."""
    rng = random.Random(11)
    tuned = ScoringSettings(memory_fit_max=20.0, spill_penalty_max=5.0, eviction_idle=9.0)
    dropping = 0
    for _ in range(40):
        fleet = _random_fleet(rng)
        for _ in range(12):
            request = RouteRequest(
                model=rng.choice((M, "qwen3:8b", "nomic-embed-text")),
                kind=rng.choice(("text", "text", "embed")),
                estimated_prompt_tokens=rng.choice((0, 500, 6000)),
                excluded_nodes=frozenset(rng.sample(["n0", "n1", "n2", "n3"], rng.randint(0, 2))),
                only_node=rng.choice((None, None, "n3")),
                affinity_node=rng.choice((None, "n1", "n5")),
                affinity_tokens=rng.choice((0, 1500)),
            )
            history = History(
                latency_p75_ms={(f"n{i}", M): rng.uniform(100, 9000) for i in range(8)},
                node_speed={f"n{i}": rng.uniform(0.3, 2.0) for i in range(0, 8, 2)},
                model_p75_ms={M: 2000.0} if rng.random() < 0.5 else {},
            )
            now = rng.choice((60.0, 400.0, 4000.0))
            settings = rng.choice((S, tuned))
            seed = rng.randrange(1000)
            kept = score(request, fleet, history, now, settings, random.Random(seed))
            fresh = FleetSnapshot(
                tuple(attrs.evolve(n, report=attrs.evolve(n.report)) for n in fleet.nodes)
            )
            assert not any(n.report.derived or n.derived for n in fresh.nodes)
            assert score(request, fresh, history, now, settings, random.Random(seed)) == kept
            # The next snapshot of the same reports: other queues, another status.
            shifted = FleetSnapshot(
                tuple(
                    attrs.evolve(
                        n,
                        status=rng.choice(list(NodeStatus)),
                        load={
                            m: ModelLoad(pending=rng.randint(0, 4), last_used=80.0) for m in n.load
                        },
                    )
                    for n in fleet.nodes
                )
            )
            again = FleetSnapshot(
                tuple(attrs.evolve(n, report=attrs.evolve(n.report)) for n in shifted.nodes)
            )
            assert score(request, shifted, history, now, settings, random.Random(seed)) == score(
                request, again, history, now, settings, random.Random(seed)
            )
            dropping += sum(1 for n in fleet.nodes if n.derived)
    assert dropping > 0  # (cold loads that evict were scored: the drop order was kept)
