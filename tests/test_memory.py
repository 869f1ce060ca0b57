"""Where a model runs (herd.core.memory) and what the scorer makes of it: memory judged per
platform, spilled copies, partial offloads. Plain synchronous tests."""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest

from herd.core import memory
from herd.core.models import (
    AvailableModel,
    BackendInfo,
    Capacity,
    FleetSnapshot,
    GpuInfo,
    LoadedModel,
    MemoryInfo,
    ModelLoad,
    NodeReport,
    NodeSnapshot,
    NodeStatus,
)
from herd.core.scoring import History, RouteRequest, ScoringSettings, score
from herd.core.scoring.engine import by_model, evictions
from herd.state.history import LatencyHistory

GiB = 2**30
S = ScoringSettings()
BIG = "llama3.3:70b"
MID = "qwen2.5:32b"


def gpu(total_gib: float, used_gib: float = 0.0, *, unified: bool = False) -> GpuInfo:
    return GpuInfo(
        name="Apple M2 Max" if unified else "NVIDIA GeForce RTX 4090",
        memory_total_bytes=int(total_gib * GiB),
        memory_used_bytes=int(used_gib * GiB),
        vendor="apple" if unified else "nvidia",
        unified=unified,
    )


def node(
    node_id: str,
    *,
    ram: float = 64,
    ram_free: float = 56,
    gpus: tuple[GpuInfo, ...] = (),
    loaded: tuple[tuple[str, float, float], ...] = (),  # (name, GiB, GiB in VRAM)
    available: tuple[tuple[str, float], ...] = ((BIG, 42), (MID, 20)),
    load: dict[str, ModelLoad] | None = None,
    availability: float = 1.0,
) -> NodeSnapshot:
    return NodeSnapshot(
        report=NodeReport(
            node_id=node_id,
            capacity=Capacity(availability=availability),
            backend=BackendInfo(url=f"http://{node_id}", healthy=True),
            memory=MemoryInfo(total_bytes=int(ram * GiB), available_bytes=int(ram_free * GiB)),
            gpus=gpus,
            loaded_models=tuple(
                LoadedModel(n, int(size * GiB), int(vram * GiB), 8192) for n, size, vram in loaded
            ),
            available_models=tuple(AvailableModel(n, int(size * GiB)) for n, size in available),
        ),
        status=NodeStatus.ONLINE,
        last_seen=0.0,
        load=load or {},
    )


def decide(*nodes: NodeSnapshot, model: str = BIG, settings: ScoringSettings = S) -> list[str]:
    decision = score(
        RouteRequest(model=model), FleetSnapshot(nodes), History(), 0.0, settings, random.Random(0)
    )
    return [c.node_id for c in decision.ranked]


# --- the memory models run in, per platform ----------------------------------------------
def test_a_node_without_accelerators_is_judged_by_ram() -> None:
    where = memory.where_models_run(node("cpu").report)
    assert (where.kind, where.total, where.free) == (memory.RAM, 64 * GiB, 56 * GiB)


def test_a_gpu_node_is_judged_by_vram_summed_over_its_devices() -> None:
    report = node("gpu", gpus=(gpu(24, 2), gpu(24, 4))).report
    where = memory.where_models_run(report)
    assert (where.kind, where.total, where.free) == (memory.VRAM, 48 * GiB, 42 * GiB)
    assert where.ram_free == 56 * GiB


def test_a_mac_is_judged_by_its_working_set_and_its_ram() -> None:
    mac = node("mac", ram=64, ram_free=30, gpus=(gpu(48, 10, unified=True),)).report
    where = memory.where_models_run(mac)
    assert (where.kind, where.total, where.free) == (memory.UNIFIED, 48 * GiB, 38 * GiB)
    # 35 GiB fits the working set (38 free) but not the RAM (30 free, nothing to unload).
    assert memory.cold_load(where, 35 * GiB).fits is False
    assert memory.cold_load(where, 25 * GiB) == memory.ColdLoad(True, 0.0, 0, 0)


def test_a_cold_load_bigger_than_the_vram_is_a_partial_offload() -> None:
    where = memory.where_models_run(node("gpu", gpus=(gpu(24),)).report)
    load = memory.cold_load(where, 42 * GiB)
    assert load.fits and load.offload == pytest.approx(18 / 42)
    # One that fits in VRAM is no offload, and needs no RAM.
    assert memory.cold_load(where, 20 * GiB) == memory.ColdLoad(True, 0.0, 0, 0)
    # The part outside VRAM must fit in RAM.
    tight = memory.where_models_run(node("tight", ram_free=10, gpus=(gpu(24),)).report)
    refused = memory.cold_load(tight, 42 * GiB)
    assert not refused.fits
    assert refused.reason == (
        "needs 42.0 GiB: 24.0 GiB fits in VRAM, the other 18.0 GiB needs RAM and 10.0 GiB is free"
    )


def test_a_model_that_fits_the_vram_once_others_go_unloads_them_instead_of_spilling() -> None:
    crowded = node("gpu", gpus=(gpu(24, 15),), loaded=(("small", 6, 6), ("other", 9, 9)))
    where = memory.where_models_run(crowded.report)
    load = memory.cold_load(where, 20 * GiB)
    assert load.fits and load.offload == 0.0 and load.evict == 11 * GiB
    assert evictions(RouteRequest(model=MID), crowded) == ("small", "other")


def test_offload_of_loaded_models() -> None:
    report = node(
        "gpu", gpus=(gpu(24, 24),), loaded=((BIG, 42, 24), (MID, 20, 20), ("cpu", 2, 0))
    ).report
    shares = {m.name: memory.offload(report, m) for m in report.loaded_models}
    assert shares == {BIG: pytest.approx(18 / 42), MID: 0.0, "cpu": 1.0}
    assert [m.name for m, _ in memory.spilled(report)] == [BIG, "cpu"]
    # No accelerator reported: size_vram 0 is a CPU-only machine, not a spill; a partial
    # size_vram (an older agent on a GPU box) still is one.
    old = node("old", loaded=(("cpu-only", 2, 0), ("partial", 10, 4))).report
    assert [(m.name, share) for m, share in memory.spilled(old)] == [("partial", 0.6)]


# --- scoring ----------------------------------------------------------------------------
def test_the_fully_resident_copy_beats_a_spilled_hot_one() -> None:
    spilled = node("spilled", gpus=(gpu(24, 24),), loaded=((BIG, 42, 24),))
    resident = node(
        "resident",
        ram=192,
        ram_free=140,
        gpus=(gpu(144, 42, unified=True),),
        loaded=((BIG, 42, 42),),
    )
    assert decide(spilled, resident) == ["resident", "spilled"]
    decision = score(
        RouteRequest(model=BIG),
        FleetSnapshot((spilled, resident)),
        History(),
        0.0,
        S,
        random.Random(0),
    )
    loser = decision.ranked[1]
    assert loser.hot and loser.offload == pytest.approx(18 / 42)
    assert loser.breakdown["spill"] < -S.thermal_loaded + S.thermal_on_disk  # > the thermal gap
    assert decision.ranked[0].breakdown["spill"] == 0.0


def test_a_cold_full_vram_copy_beats_a_hot_spilled_one() -> None:
    spilled = node("spilled", gpus=(gpu(24, 24),), loaded=((BIG, 42, 24),))
    cold = node("cold", ram=192, ram_free=180, gpus=(gpu(144, unified=True),))
    assert decide(spilled, cold) == ["cold", "spilled"]


def test_a_cold_partial_offload_ranks_below_a_cold_full_vram_load() -> None:
    """The pre-warmer warms the first cold runner-up: it must be the one that will run in
    VRAM, not the fast GPU box that would split the model."""
    busy = node(
        "busy",
        ram=192,
        ram_free=140,
        gpus=(gpu(144, 42, unified=True),),
        loaded=((BIG, 42, 42),),
        load={BIG: ModelLoad(pending=12, in_flight=4)},
    )
    split = node("split", gpus=(gpu(24),))  # 64 GiB of RAM, 24 of VRAM: it would split it
    # The full one's owner is using it (availability 0.5, no bonus): without the spill signal
    # the split one would rank first.
    full = node("full", ram=128, ram_free=100, gpus=(gpu(96, unified=True),), availability=0.5)
    ranking = decide(busy, split, full)
    assert [n for n in ranking if n != "busy"] == ["full", "split"]
    blind = ScoringSettings(spill_penalty_max=0.0)
    assert [n for n in decide(busy, split, full, settings=blind) if n != "busy"] == [
        "split",
        "full",
    ]


def test_memory_fit_and_eligibility_use_vram_on_gpu_nodes() -> None:
    # Plenty of RAM, VRAM almost full of another model that is busy: a 20 GiB model fits only
    # by unloading it, which the eviction signal prices.
    crowded = node(
        "crowded",
        gpus=(gpu(24, 20),),
        loaded=(("other", 20, 20),),
        load={"other": ModelLoad(in_flight=1)},
    )
    roomy = node("roomy", gpus=(gpu(24),))
    decision = score(
        RouteRequest(model=MID),
        FleetSnapshot((crowded, roomy)),
        History(),
        0.0,
        S,
        random.Random(0),
    )
    first, second = decision.ranked
    assert first.node_id == "roomy" and second.breakdown["eviction"] == -S.eviction_busy
    assert first.breakdown["memory_fit"] > 0 and second.breakdown["memory_fit"] == 0.0
    # A model that can't fit even split is eliminated, naming VRAM and RAM.
    none = node("none", ram=32, ram_free=8, gpus=(gpu(8),))
    out = score(
        RouteRequest(model=BIG), FleetSnapshot((none,)), History(), 0.0, S, random.Random(0)
    )
    assert out.winner is None
    assert out.eliminated[0].reason == (
        "needs 42.0 GiB: 8.0 GiB fits in VRAM, the other 34.0 GiB needs RAM and 8.0 GiB is free"
    )


def test_spill_penalty_grows_with_the_share_outside_vram() -> None:
    penalties = []
    for vram in (42, 40, 34, 24, 0):
        one = node("n", gpus=(gpu(48, vram),), loaded=((BIG, 42, vram),))
        decision = score(
            RouteRequest(model=BIG), FleetSnapshot((one,)), History(), 0.0, S, random.Random(0)
        )
        assert decision.winner is not None
        penalties.append(decision.winner.breakdown["spill"])
    assert penalties[0] == 0.0
    assert penalties == sorted(penalties, reverse=True) and len(set(penalties)) == 5


def test_spill_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="spill_cpu_slowdown must be > 1"):
        ScoringSettings(spill_cpu_slowdown=1.0)


# --- learning: a spilled copy's slowness is its own ----------------------------------------
def _report(node_id: str, *loaded: tuple[str, float, float]) -> NodeReport:
    return node(node_id, gpus=(gpu(24, 24),), loaded=loaded).report


def test_a_spilled_copy_is_not_taken_for_a_slow_node() -> None:
    history = LatencyHistory()
    # Both nodes run the small model in VRAM at the same speed.
    for node_id in ("a", "b"):
        for _ in range(5):
            history.record(node_id, MID, 1000.0, 40.0)
    assert history.node_speed == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    # On "a" the 70B is split (18 of 42 GiB outside VRAM) and runs at a quarter of the speed
    # "b" runs its copy, wholly in VRAM, at.
    history.observe(_report("a", (MID, 20, 20), (BIG, 42, 24)))
    history.observe(_report("b", (BIG, 42, 42)))
    assert history.spilled("a", BIG) and not history.spilled("b", BIG)
    for _ in range(5):
        history.record("a", BIG, 40_000.0, 2.5)
        history.record("b", BIG, 10_000.0, 10.0)
    # The node keeps its speed; the node:model carries its slowness.
    assert history.node_speed["a"] == pytest.approx(1.0)
    assert history.latency_p75_ms[("a", BIG)] == 40_000.0
    assert history.decode_rate("a", BIG) == 2.5
    # The model's typical time is the copy in VRAM's, not a mix with the spilled one.
    assert history.model_p75_ms[BIG] == pytest.approx(10_000.0)
    # Reloaded wholly in VRAM: what was learned of the split copy goes.
    history.observe(_report("a", (BIG, 42, 42)))
    assert not history.spilled("a", BIG)
    assert ("a", BIG) not in history.latency_p75_ms and history.decode_rate("a", BIG) is None
    assert history.latency_p75_ms[("a", MID)] == 1000.0  # the node's other models stay


def test_the_history_by_model_the_scorer_reads_stays_in_step_with_its_pairs() -> None:
    """The scorer reads a node:model's p75 from ``History.latency_by_model``, which the
    history keeps beside ``latency_p75_ms``: the two agree after records, a spill's samples
    dropped and a node forgotten, and a History built from the pairs alone works it out."""
    history = LatencyHistory()

    def in_step() -> dict[str, Mapping[str, float]]:
        view = history.view()
        assert view.latency_by_model == by_model(history.latency_p75_ms)
        built = History(view.latency_p75_ms, view.node_speed, view.model_p75_ms)
        assert built.latency_by_model == view.latency_by_model
        return dict(view.latency_by_model)

    for latency, node_id in ((1000.0, "a"), (1500.0, "b"), (2500.0, "c")):
        history.record(node_id, MID, latency, 40.0)
        history.record(node_id, BIG, latency * 10, 5.0)
    assert in_step() == {
        MID: {"a": 1000.0, "b": 1500.0, "c": 2500.0},
        BIG: {"a": 10_000.0, "b": 15_000.0, "c": 25_000.0},
    }
    history.observe(_report("a", (BIG, 42, 24)))  # spilled: its samples of the whole copy go
    assert "a" not in in_step()[BIG]
    history.forget("b")
    assert in_step() == {MID: {"a": 1000.0, "c": 2500.0}, BIG: {"c": 25_000.0}}
    history.forget("c")
    history.observe(_report("a", (BIG, 42, 42)))
    assert in_step() == {MID: {"a": 1000.0}}
    history.forget("a")
    assert in_step() == {}


def test_without_spill_detection_the_node_would_look_slow() -> None:
    """The same samples, no heartbeat seen: the node's speed drops (what herd did before)."""
    history = LatencyHistory()
    for node_id in ("a", "b"):
        for _ in range(5):
            history.record(node_id, MID, 1000.0, 40.0)
    for _ in range(5):
        history.record("a", BIG, 40_000.0, 2.5)
        history.record("b", BIG, 10_000.0, 10.0)
    assert history.node_speed["a"] == pytest.approx(0.5**0.5)  # half as fast on one of two
