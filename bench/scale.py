"""Scale: the routing decision's time at 100 nodes x 50 models, and router memory at 1,000
concurrent streams.

    python bench/scale.py [--nodes 100] [--models 50] [--streams 1000]
    python bench/scale.py --compare-scorer OTHER/herd/core/scoring/engine.py
    python bench/scale.py --compare-checkout OTHER   # e.g. git worktree add OTHER COMMIT
    python bench/scale.py --compare-checkout OTHER --instructions   # valgrind's counts

Part 1 times one routing decision **from the router's state**, as a request makes it: the
fleet snapshot built from a :class:`~herd.state.registry.NodeRegistry` fed one heartbeat
report per node, the :class:`~herd.state.queues.QueueBook`'s load (leases held across the
nodes) and the :class:`~herd.state.history.LatencyHistory`, then
:func:`herd.core.scoring.score` over it, with the fleet changing between decisions as a busy one
does (one node's queues each time, a heartbeat every fifth), and once more with every node's
snapshot rebuilt for each decision (what the router did before it kept them). Fleets of a
quarter, half, all and twice ``--nodes``
nodes show how the time grows: it should be linear in nodes (the queue book is indexed by node,
the snapshot's node lookups by id), not nodes times queues. Two shapes of fleet: every model on
every node's disk (the worst case, no node is eliminated early) and 10 models per node (as
disks are). Part 2 times :func:`score` alone on a prebuilt snapshot (after the first decision
its reports' facts are kept: ``NodeReport.derived``), and a latency-history record. Part 3
starts a router in a subprocess with simulated nodes, holds ``--streams`` streaming chat
requests open through it at once and reports the router process's resident memory before and
during. Only 127.0.0.1 is used. ``--compare-scorer`` runs only parts 1 and 2 at ``--nodes``,
for another checkout's scoring engine and this one's in turn (:func:`compare_scorers`);
``--compare-checkout`` does the same for another whole checkout, each round in processes of
their own (:func:`compare_checkouts`), for changes outside the engine; with
``--instructions``, it counts machine instructions per decision under valgrind instead of
timing (:func:`count_instructions`): the same on every run, where time on a busy VM moves.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import attrs
import trio

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
from herd.state.history import LatencyHistory
from herd.state.queues import QueueBook
from herd.state.registry import NodeRegistry

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


Scorer = Callable[..., object]  # herd.core.scoring.score, or another checkout's


def time_scoring(
    nodes: int,
    models: int,
    per_node: int | None = None,
    decisions: int = 2000,
    scorer: Scorer = score,
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
        scorer(request, fleet, history, 100.0, settings, rng)
        samples.append((time.perf_counter_ns() - start) / 1000)
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.95)]


def time_history(nodes: int, models: int, records: int = 20_000) -> float:
    """Median microseconds to record one completed request in the router's latency history,
    once it holds every node:model."""
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


def fleet_state(
    nodes: int, models: int, rng: random.Random, per_node: int | None
) -> tuple[NodeRegistry, QueueBook, LatencyHistory, list[str]]:
    """A registry fed one report per node of :func:`synthetic_fleet`, a history with a few
    requests per node:model, and the model names. The queue book is filled by
    :func:`hold_leases` (it needs trio)."""
    registry = NodeRegistry()
    for node in synthetic_fleet(nodes, models, rng, per_node).nodes:
        registry.apply_report(node.report, 0.0)
    history = LatencyHistory()
    names: set[str] = set()
    for record in registry.records():
        report = record.report
        names.update(report.available_index)
        for model in list(report.available_index)[:5]:
            for _ in range(3):
                history.record(report.node_id, model, rng.uniform(500, 20_000), rng.uniform(5, 80))
    return registry, QueueBook(), history, sorted(names)


async def hold_leases(
    registry: NodeRegistry, queues: QueueBook, rng: random.Random, stack: AsyncExitStack
) -> int:
    """Leases on every node's loaded models (up to its slots) and a request waiting on some
    nodes, as a busy fleet has. Returns the number of leases held."""
    held = 0
    for record in registry.records():
        report = record.report
        queues.set_limit(report.node_id, report.parallel_slots)
        on_node = 0  # the node's slots are shared by its models: never wait for one here
        for model in report.loaded_index:
            for _ in range(rng.randint(0, 2)):
                if on_node < report.parallel_slots:
                    await stack.enter_async_context(queues.lease(report.node_id, model))
                    held += 1
                    on_node += 1
        # A few other models used before, now idle: queues that stay in the book.
        for model in list(report.available_index)[:4]:
            queues.counters(report.node_id, model).last_used = 1.0
    return held


def time_decisions(
    nodes: int,
    models: int,
    per_node: int | None,
    decisions: int = 1000,
    kept: bool = True,
    scorer: Scorer = score,
) -> tuple[float, float, float, int]:
    """Median µs per decision made from the router's state (snapshot + score), its p95, the
    median of the snapshot alone, and the leases held. Between two decisions the fleet
    changes as a busy one does: one node's queues (a request took or left a slot), and every
    fifth decision one node's heartbeat. ``kept``: the router's way, each node's snapshot kept
    until its record or queues change; otherwise every node rebuilt for every decision."""

    async def run() -> tuple[float, float, float, int]:
        rng = random.Random(3)
        registry, queues, history, names = fleet_state(nodes, models, rng, per_node)
        settings = ScoringSettings()
        async with AsyncExitStack() as stack:
            held = await hold_leases(registry, queues, rng, stack)
            samples, snapshots = [], []
            ids = [r.report.node_id for r in registry.records()]
            load_key = queues.versions.get if kept else None  # as RouterState.snapshot
            for i in range(decisions):
                queues.touch(rng.choice(ids))
                if i % 5 == 0:
                    record = registry.get(rng.choice(ids))
                    assert record is not None
                    registry.apply_report(attrs.evolve(record.report), 0.0)
                request = RouteRequest(
                    model=names[i % len(names)],
                    estimated_prompt_tokens=rng.randint(10, 4000),
                    affinity_node=f"node-{rng.randrange(nodes)}",
                    affinity_tokens=1000,
                )
                start = time.perf_counter_ns()
                fleet = registry.snapshot(queues.load_for, load_key)
                built = time.perf_counter_ns()
                scorer(request, fleet, history.view(), 100.0, settings, rng)
                samples.append((time.perf_counter_ns() - start) / 1000)
                snapshots.append((built - start) / 1000)
        samples.sort()
        return (
            samples[len(samples) // 2],
            samples[int(len(samples) * 0.95)],
            statistics.median(snapshots),
            held,
        )

    return trio.run(run)


_MODES = (("state", "from the state"), ("alone", "prebuilt snapshot"))
_SHAPES = ((None, "every model on every node"), (10, "10 models per node"))


def _print_side_by_side(label: str, rows: dict[str, list[tuple[str, list[float]]]]) -> None:
    """``label``, then one line per checkout or scorer: for each column, its title and the
    median of its values (the rounds), with their range beside it when there are several."""
    print(f"  {label}:")
    for name, columns in rows.items():
        parts = []
        for title, values in columns:
            part = f"{title} {statistics.median(values):6.0f}"
            if len(values) > 1:
                part += f" ({min(values):.0f}-{max(values):.0f})"
            parts.append(part)
        print(f"    {name:32s} " + "; ".join(parts))


def compare_scorers(other: Path, nodes: int, models: int, rounds: int = 4) -> None:
    """The scorer in ``other`` (an engine.py of another checkout, loaded as a module of its
    own) and this checkout's, in turn, ``rounds`` times: decisions from the router's state and
    on a prebuilt snapshot, median µs per decision over the rounds (min-max beside it). Both
    read the same attrs classes of this checkout (``herd.core.models``), which the scorer only
    reads by attribute, so an engine from before a change of those classes may not load."""
    spec = importlib.util.spec_from_file_location("other_engine", other)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["other_engine"] = module
    spec.loader.exec_module(module)
    scorers: dict[str, Scorer] = {str(other): module.score, "this checkout": score}
    print(f"scorers side by side, {nodes} nodes x {models} models, {rounds} rounds, median us")
    for per_node, label in _SHAPES:
        found: dict[tuple[str, str], list[float]] = {}
        for _ in range(rounds):
            for name, scorer in scorers.items():
                decided = time_decisions(nodes, models, per_node, scorer=scorer)[0]
                alone = time_scoring(nodes, models, per_node, decisions=1000, scorer=scorer)[0]
                found.setdefault((name, "state"), []).append(decided)
                found.setdefault((name, "alone"), []).append(alone)
        _print_side_by_side(
            label,
            {name: [(title, found[(name, what)]) for what, title in _MODES] for name in scorers},
        )


def _checkout_program(body: str) -> str:
    """A ``python -c`` program that imports, as ``scale``, the ``bench/scale.py`` of the
    checkout whose root is its first argument, then runs ``body``."""
    head = "import sys\nroot = sys.argv[1]\nsys.path[:0] = [root + '/bench', root]\n"
    return head + "import scale\n" + body


_ONE_CHECKOUT = _checkout_program(
    """
out = []
for per_node in (None, 10):
    out.append(scale.time_decisions(int(sys.argv[2]), int(sys.argv[3]), per_node)[0])
    out.append(scale.time_scoring(int(sys.argv[2]), int(sys.argv[3]), per_node, 1000)[0])
print(" ".join(str(value) for value in out))
"""
)


_COUNT_ONE = _checkout_program(
    """
nodes, models, per_node, decisions = (int(value) for value in sys.argv[2:6])
if sys.argv[6] == "state":
    scale.time_decisions(nodes, models, per_node or None, decisions)
else:
    scale.time_scoring(nodes, models, per_node or None, decisions)
"""
)


def count_instructions(other: Path, nodes: int, models: int) -> None:
    """Machine instructions per decision (parts 1 and 2) for the checkout at ``other`` and
    this one, counted by valgrind's callgrind: the same on every run, whatever else the
    machine is doing, so it shows a change of a few percent that wall-clock time on a busy VM
    hides. Each figure is the difference between 400 and 100 decisions (the set-up cancels
    out), divided by 300; it includes the bench's own work between decisions (the request,
    the fleet's changes). Instructions are not time (memory and branches differ), but they
    move with it. Needs ``valgrind`` (Debian's package); two counts run at once."""
    import shutil
    import subprocess

    if shutil.which("valgrind") is None:
        sys.exit("--instructions needs valgrind (apt install valgrind)")
    this = Path(__file__).resolve().parent.parent
    roots = {str(other): other.resolve(), "this checkout": this}

    def start(root: Path, per_node: str, mode: str, decisions: int) -> subprocess.Popen[str]:
        command = [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-c",
            _COUNT_ONE,
            str(root),
            str(nodes),
            str(models),
            per_node,
            str(decisions),
            mode,
        ]
        return subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    def counted(process: subprocess.Popen[str]) -> int:
        _, err = process.communicate()
        for line in err.splitlines():
            if "Collected :" in line:
                return int(line.rsplit(":", 1)[1].strip())
        raise RuntimeError(f"valgrind gave no count: {err[-500:]}")

    print(f"instructions per decision (callgrind), {nodes} nodes x {models} models")
    for per_node, label in _SHAPES:
        rows: dict[str, list[tuple[str, list[float]]]] = {}
        for name, root in roots.items():
            for mode, title in _MODES:
                few = start(root, str(per_node or 0), mode, 100)
                many = start(root, str(per_node or 0), mode, 400)
                per_decision = (counted(many) - counted(few)) / 300
                rows.setdefault(name, []).append((f"{title}, k", [per_decision / 1000]))
        _print_side_by_side(label, rows)


def compare_checkouts(other: Path, nodes: int, models: int, rounds: int = 6) -> None:
    """Parts 1 and 2 for the checkout at ``other`` (a directory holding ``herd/`` and
    ``bench/``) and this one, in turn, ``rounds`` times, each in a process of its own: the
    whole of each checkout (its value classes, registry and queue book too, not only its
    scoring engine). Median µs per decision over the rounds, min-max beside it."""
    import subprocess

    this = Path(__file__).resolve().parent.parent
    roots = {str(other): other.resolve(), "this checkout": this}
    found: dict[str, list[list[float]]] = {name: [] for name in roots}
    for _ in range(rounds):
        for name, root in roots.items():
            done = subprocess.run(
                [sys.executable, "-c", _ONE_CHECKOUT, str(root), str(nodes), str(models)],
                capture_output=True,
                text=True,
                check=True,
            )
            found[name].append([float(value) for value in done.stdout.split()])
    print(f"checkouts side by side, {nodes} nodes x {models} models, {rounds} rounds, median us")
    for shape, (_, label) in enumerate(_SHAPES):
        columns = list(enumerate(_MODES))
        _print_side_by_side(
            label,
            {
                name: [
                    (title, [run[2 * shape + at] for run in found[name]])
                    for at, (_, title) in columns
                ]
                for name in roots
            },
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--streams", type=int, default=1000, help="0: skip part 3")
    parser.add_argument(
        "--compare-scorer",
        metavar="ENGINE_PY",
        type=Path,
        help="only compare: this scoring engine file (another checkout's "
        "herd/core/scoring/engine.py) and this one's, side by side, at --nodes",
    )
    parser.add_argument(
        "--compare-checkout",
        metavar="DIR",
        type=Path,
        help="only compare: another checkout (a directory with herd/ and bench/, e.g. a git "
        "worktree of an older commit) and this one, side by side, each round in fresh "
        "processes, at --nodes",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="with --compare-checkout: count machine instructions per decision with valgrind "
        "instead of timing (the same on every run; slow: minutes)",
    )
    args = parser.parse_args()
    if args.compare_checkout and args.instructions:
        count_instructions(args.compare_checkout, args.nodes, args.models)
        return
    if args.compare_checkout:
        compare_checkouts(args.compare_checkout, args.nodes, args.models)
        return
    if args.compare_scorer:
        compare_scorers(args.compare_scorer, args.nodes, args.models)
        return
    print(
        f"routing decision from the router's state (snapshot + score), {args.models} models, "
        "median (p95) us per decision; snapshot alone; us per node"
    )
    for per_node, label in _SHAPES:
        for nodes in (args.nodes // 4, args.nodes // 2, args.nodes, args.nodes * 2):
            median, p95, snapshot, held = time_decisions(nodes, args.models, per_node)
            print(
                f"  {label}, {nodes:>4} nodes, {held:>4} leases held: {median:6.0f} us "
                f"({p95:.0f}); snapshot {snapshot:5.0f} us; {median / nodes:5.2f} us per node"
            )
    print("the same at --nodes with every node's snapshot rebuilt for each decision (no reuse):")
    for per_node, label in _SHAPES:
        median, p95, snapshot, held = time_decisions(args.nodes, args.models, per_node, kept=False)
        print(
            f"  {label}, {args.nodes:>4} nodes: {median:6.0f} us ({p95:.0f}); "
            f"snapshot {snapshot:5.0f} us"
        )
    for per_node, label in _SHAPES:
        median, p95 = time_scoring(args.nodes, args.models, per_node)
        print(
            f"scoring alone (a prebuilt snapshot), {args.nodes} nodes x {args.models} models, "
            f"{label}: "
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
