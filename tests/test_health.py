"""Every health check, driven into its bad state and back (pure, no server)."""

from __future__ import annotations

from pathlib import Path

from herd.core.health import CRITICAL, INFO, OK, WARNING, HealthInput, evaluate, summary
from herd.core.models import (
    BackendInfo,
    FleetSnapshot,
    GpuInfo,
    LoadedModel,
    MemoryInfo,
    MemoryPressure,
    NodeReport,
    NodeSnapshot,
    NodeStatus,
)

GiB = 2**30
CHECKS = 19  # and one more, the shared state store's, with a store


def node(node_id: str, status: NodeStatus = NodeStatus.ONLINE, **report: object) -> NodeSnapshot:
    report.setdefault("backend", BackendInfo(healthy=True, version="0.12.0"))
    report.setdefault("agent_version", "0.1.0")
    return NodeSnapshot(
        report=NodeReport(node_id=node_id, **report),  # type: ignore[arg-type]
        status=status,
        last_seen=0.0,
    )


def run(
    nodes: tuple[NodeSnapshot, ...],
    figures: dict[str, object] | None = None,
    events: dict[str, int] | None = None,
    unloads: dict[tuple[str, str], int] | None = None,
    host: str = "127.0.0.1",
    token: bool = False,
    storage_error: str | None = None,
    traces_lost: int = 0,
) -> dict[str, str]:
    checks = evaluate(
        HealthInput(
            FleetSnapshot(nodes),
            figures or {},
            events or {},
            unloads or {},
            host,
            token,
            24,
            storage_error=storage_error,
            traces_lost=traces_lost,
        )
    )
    assert len(checks) == CHECKS and sum(summary(checks).values()) == CHECKS
    return {c.id: c.severity for c in checks}


def test_a_healthy_quiet_fleet_is_all_ok() -> None:
    assert set(run((node("a"), node("b"))).values()) == {OK}


def test_every_check_fires() -> None:
    nodes = (
        node("gone", NodeStatus.OFFLINE),
        node("late", NodeStatus.DEGRADED),
        node("tight", memory=MemoryInfo(32 * GiB, GiB, MemoryPressure.CRITICAL)),
        node(
            "bloat",
            parallel_slots=16,
            loaded_models=(LoadedModel("big:latest", context_length=131072),),
        ),
        node("old", backend=BackendInfo(healthy=True, version="0.5.0"), agent_version="0.0.9"),
        node("down", backend=BackendInfo(healthy=False, error="connection refused")),
        node("idle"),
        node(
            "spilling",
            gpus=(GpuInfo("RTX 4090", 24 * GiB, 24 * GiB, vendor="nvidia"),),
            loaded_models=(LoadedModel("llama3.3:70b", 42 * GiB, 24 * GiB),),
        ),
    )
    figures = {
        "requests": 100,
        "failed": 25,
        "incomplete": 3,
        "client_disconnected": 15,
        "retries": 20,
        "timeouts": 2,
        "requests_per_node": {"tight": 50, "bloat": 50, "old": 1, "late": 1, "spilling": 1},
    }
    events = {"vram_fallbacks": 30, "context_passthrough": 2, "reaped": 1}
    severity = run(nodes, figures, events, {("tight", "big:latest"): 4}, host="0.0.0.0")
    assert severity == {
        "offline_nodes": WARNING,
        "degraded_nodes": WARNING,
        "memory_pressure": CRITICAL,
        "underutilized_nodes": INFO,
        "vram_fallbacks": CRITICAL,  # 30% of requests got a model they did not name
        "spilled_models": WARNING,
        "kv_cache_bloat": WARNING,
        "version_mismatch": WARNING,
        "context_protection": WARNING,
        "zombie_reaper": WARNING,
        "model_thrashing": WARNING,
        "request_timeouts": WARNING,
        "error_rate": CRITICAL,
        "retry_rate": WARNING,
        "client_disconnects": WARNING,
        "incomplete_streams": WARNING,
        "backend_unreachable": CRITICAL,
        "unauthenticated_router": CRITICAL,  # any LAN device could join and get prompts
        "storage": OK,
    }


def test_every_node_offline_is_critical_and_a_token_quiets_exposure() -> None:
    severity = run((node("a", NodeStatus.OFFLINE),), host="0.0.0.0", token=True)
    assert severity["offline_nodes"] == CRITICAL
    assert severity["unauthenticated_router"] == OK


def test_rates_need_enough_traffic() -> None:
    severity = run((node("a"),), {"requests": 3, "failed": 3})
    assert severity["error_rate"] == OK


def test_substitution_share_and_storage() -> None:
    few = run((node("a"),), {"requests": 100}, {"vram_fallbacks": 5})
    assert few["vram_fallbacks"] == INFO  # opted in, and rare
    full = run((node("a"),), storage_error="could not write 3 traces: database or disk is full")
    assert full["storage"] == CRITICAL
    assert run((node("a"),), traces_lost=7)["storage"] == WARNING


def test_a_spilled_model_is_named_with_the_fix() -> None:
    gpu = GpuInfo("RTX 4090", 24 * GiB, 24 * GiB, vendor="nvidia")
    spilling = node(
        "gpu-box", gpus=(gpu,), loaded_models=(LoadedModel("llama3.3:70b", 42 * GiB, 24 * GiB),)
    )
    # A CPU-only node's models have size_vram 0: not a spill.
    cpu = node("nuc", loaded_models=(LoadedModel("llama3.2:3b", 2 * GiB, 0),))
    checks = {
        c.id: c
        for c in evaluate(HealthInput(FleetSnapshot((spilling, cpu)), {}, {}, {}, "::1", False, 24))
    }
    check = checks["spilled_models"]
    assert check.severity == WARNING
    assert check.evidence == (
        "gpu-box:llama3.3:70b has 43% outside the accelerator (18.0 of 42.0 GiB)"
    )
    for fix in ("smaller quantisation", "more VRAM", "fewer models together"):
        assert fix in check.fix
    assert run((cpu,))["spilled_models"] == OK


def test_the_shared_state_store_check_appears_only_with_a_store() -> None:
    import attrs

    from herd.core.health import StateStoreHealth

    base = HealthInput(FleetSnapshot((node("a"),)), {}, {}, {}, "127.0.0.1", False, 24)
    assert "state_store" not in {c.id for c in evaluate(base)}  # one router, no store
    up = StateStoreHealth("127.0.0.1:6379/0", available=True, routers=2)
    (check,) = [c for c in evaluate(attrs.evolve(base, state_store=up)) if c.id == "state_store"]
    assert check.severity == OK and "2 router(s)" in check.evidence
    down = StateStoreHealth(
        "127.0.0.1:6379/0",
        available=False,
        last_error="connection refused",
        unavailable_for_s=12.0,
        outages=1,
    )
    (check,) = [c for c in evaluate(attrs.evolve(base, state_store=down)) if c.id == "state_store"]
    assert check.severity == CRITICAL
    assert "unreachable for 12 s: connection refused" in check.evidence
    assert "own counts" in check.evidence and "Valkey" in check.fix


def test_the_readme_says_how_many_checks_there_are() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert f"Health: {CHECKS} checks ({CHECKS + 1} with a shared state store)" in readme
