"""Scale: scoring time per decision at 100 nodes x 50 models, and router memory at 1,000
concurrent streams.

    python bench/scale.py [--nodes 100] [--models 50] [--streams 1000]

Part 1 times :func:`herd.core.scoring.score` on a synthetic fleet snapshot (every node has every
model on disk, a few loaded, queues and history everywhere: the worst case, no node is
eliminated early). Part 2 starts a router in a subprocess with simulated nodes, holds
``--streams`` streaming chat requests open through it at once and reports the router process's
resident memory before and during. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from herd.core.models import (
    AvailableModel,
    BackendInfo,
    FleetSnapshot,
    LoadedModel,
    MemoryInfo,
    ModelLoad,
    NodeReport,
    NodeSnapshot,
    NodeStatus,
)
from herd.core.scoring import History, RouteRequest, ScoringSettings, score

GiB = 2**30


def synthetic_fleet(
    nodes: int, models: int, rng: random.Random, per_node: int | None = None
) -> FleetSnapshot:
    """``nodes`` nodes; ``models`` models in the fleet, ``per_node`` of them (all by default)
    on each node's disk, three of those loaded."""
    names = [f"model-{i}:{rng.choice((3, 8, 14))}b" for i in range(models)]
    snapshots = []
    for n in range(nodes):
        total = rng.choice((16, 32, 64, 128, 192)) * GiB
        on_disk = rng.sample(names, per_node) if per_node else names
        loaded = rng.sample(on_disk, 3)
        snapshots.append(
            NodeSnapshot(
                report=NodeReport(
                    node_id=f"node-{n}",
                    backend=BackendInfo(url=f"http://node-{n}", healthy=True),
                    memory=MemoryInfo(total_bytes=total, available_bytes=total // 3),
                    loaded_models=tuple(
                        LoadedModel(m, 4 * GiB, 4 * GiB, 8192, expires_at=float(i))
                        for i, m in enumerate(loaded)
                    ),
                    available_models=tuple(
                        AvailableModel(m, rng.choice((2, 5, 9)) * GiB) for m in on_disk
                    ),
                    parallel_slots=rng.choice((1, 2, 4)),
                ),
                status=NodeStatus.ONLINE,
                last_seen=0.0,
                load={m: ModelLoad(in_flight=rng.randint(0, 2), last_used=1.0) for m in loaded},
            )
        )
    return FleetSnapshot(tuple(snapshots))


def time_scoring(
    nodes: int, models: int, per_node: int | None = None, decisions: int = 2000
) -> tuple[float, float]:
    """Median and p95 microseconds per decision."""
    rng = random.Random(1)
    fleet = synthetic_fleet(nodes, models, rng, per_node)
    names = sorted({m.name for n in fleet.nodes for m in n.report.available_models})
    history = History(
        latency_p75_ms={
            (n.node_id, m): rng.uniform(500, 20_000) for n in fleet.nodes for m in names
        },
        node_speed={n.node_id: rng.uniform(0.5, 2.0) for n in fleet.nodes},
        model_p75_ms={m: 5000.0 for m in names},
    )
    settings = ScoringSettings()
    samples = []
    for i in range(decisions):
        request = RouteRequest(
            model=names[i % len(names)],
            estimated_prompt_tokens=rng.randint(10, 4000),
            affinity_node=f"node-{rng.randrange(nodes)}",
            affinity_tokens=1000,
        )
        start = time.perf_counter_ns()
        score(request, fleet, history, 100.0, settings, rng)
        samples.append((time.perf_counter_ns() - start) / 1000)
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.95)]


def time_history(nodes: int, models: int, records: int = 20_000) -> float:
    """Median microseconds to record one completed request in the router's latency history,
    once it holds every node:model."""
    from herd.state.history import LatencyHistory

    rng = random.Random(2)
    history = LatencyHistory()
    pairs = [(f"node-{n}", f"model-{m}") for n in range(nodes) for m in range(models)]
    for node, model in pairs:
        history.record(node, model, rng.uniform(500, 5000), rng.uniform(5, 80))
    samples = []
    for _ in range(records):
        node, model = rng.choice(pairs)
        start = time.perf_counter_ns()
        history.record(node, model, rng.uniform(500, 5000), rng.uniform(5, 80))
        samples.append((time.perf_counter_ns() - start) / 1000)
    samples.sort()
    return samples[len(samples) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--streams", type=int, default=1000)
    args = parser.parse_args()
    for per_node, label in ((None, "every model on every node"), (10, "10 models per node")):
        median, p95 = time_scoring(args.nodes, args.models, per_node)
        print(
            f"scoring, {args.nodes} nodes x {args.models} models, {label}: "
            f"{median:.0f} us per decision (median), {p95:.0f} us (p95)"
        )
    print(
        f"latency history, {args.nodes} nodes x {args.models} models: "
        f"{time_history(args.nodes, args.models):.0f} us per completed request (median)"
    )
    if args.streams:
        from load import concurrent_streams  # bench/load.py, beside this script

        concurrent_streams(args.streams)


if __name__ == "__main__":
    main()
