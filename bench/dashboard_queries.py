"""Dashboard queries at a million traces: how long each of the dashboard's reads takes.

    python bench/dashboard_queries.py [--rows 1000000] [--days 30] [--repeat 3]

Fills a temporary ``latency.db`` (herd's own schema, indexes and insert path) with ``--rows``
traces spread evenly over the last ``--days`` days (30: the default retention, so a million
rows is ~23 requests a minute, day and night), 6 nodes, 8 models, a third of the requests
tagged, 3% failures, plus 2,000 fleet events. Then it times every query the dashboard makes
(the median of ``--repeat`` runs, each on a fresh connection, as the API opens one per read):
the SQL and, for the instruments' series, the fold into percentiles per bucket and group
(``herd.core.instruments.series``), which is the larger part. It prints each query's plan's
first line too (an index search on the time range, never a full scan). ``--days 7`` puts every
row into the 7-day window: the worst case. Nothing touches the network.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from herd.core import instruments
from herd.core.timeline import FleetEvent
from herd.store import db, queries

NODES = [f"node-{i}" for i in range(6)]
MODELS = [
    "llama3.2:3b",
    "llama3.1:8b",
    "qwen2.5:7b",
    "qwen2.5:14b",
    "qwen2.5-coder:32b",
    "gemma3:12b",
    "mistral:7b",
    "nomic-embed-text:latest",
]
TAGS = [[], [], [], ["notes-app"], ["search"], ["agent", "ci"]]
BREAKDOWN = json.dumps({"thermal": 50.0, "memory_fit": 12.5, "queue_depth": -3.0})


def fill(path: Path, rows: int, days: float, rng: random.Random) -> float:
    """Write ``rows`` traces through herd's insert; returns the seconds it took."""
    db.initialise(path)
    connection = db.connect(path)
    now = time.time()
    started = time.perf_counter()
    batch: list[tuple[Any, ...]] = []
    for index in range(rows):
        at = now - days * 86400 * (index + rng.random()) / rows
        status = "completed" if rng.random() > 0.03 else rng.choice(("failed", "incomplete"))
        latency = rng.lognormvariate(7.0, 0.9)
        batch.append(
            (
                f"req-{index:08d}",
                rng.choice(MODELS),
                "asked",
                rng.choice(NODES),
                60.0,
                BREAKDOWN,
                status,
                latency,
                latency * 0.15 if status == "completed" else None,
                rng.randint(20, 2000),
                rng.randint(10, 800) if status == "completed" else None,
                int(rng.random() < 0.02),
                int(rng.random() < 0.01),
                "[]",
                "ollama",
                "text",
                "node answered 500" if status != "completed" else None,
                at,
                json.dumps(rng.choice(TAGS)),
                "vram" if rng.random() < 0.005 else None,
                None,  # context_action
                None,  # offload
                '[["node-1", 41.5]]',
            )
        )
        if len(batch) == 50_000:
            with connection.transaction():
                connection.executemany(db.INSERT, batch)
            batch = []
    if batch:
        with connection.transaction():
            connection.executemany(db.INSERT, batch)
    elapsed = time.perf_counter() - started
    events = [
        FleetEvent(now - days * 86400 * rng.random(), "model_loaded", rng.choice(NODES), m)
        for m in rng.choices(MODELS, k=2000)
    ]
    db.write_events(connection, events)
    connection.close()
    return elapsed


def series(window: str, by: str) -> Callable[[Any], Any]:
    win = instruments.window(window)

    def run(connection: Any) -> Any:
        start, end = win.span(time.time())
        counts, values = queries.series_data(connection, start, end, win.bucket_seconds, by)
        return instruments.series(counts, values, win, start, by)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(19)
    day, week = time.time() - 86400, time.time() - 7 * 86400
    cases: list[tuple[str, Callable[[Any], Any]]] = [
        ("overview (24 h)", lambda c: queries.overview(c, day)),
        ("trends (7 days, hourly)", lambda c: queries.trends(c, week)),
        ("models (24 h)", lambda c: queries.models(c, day)),
        ("usage (7 days)", lambda c: queries.usage(c, week)),
        ("apps (24 h)", lambda c: queries.apps(c, day)),
        ("model management (7 days)", lambda c: queries.model_node_usage(c, week)),
        ("health figures (24 h)", lambda c: queries.health_figures(c, day)),
        ("traces (newest 50)", lambda c: queries.traces(c, 50)),
        ("one trace by id", lambda c: queries.trace(c, "req-00000500")),
        ("timeline (7 days)", lambda c: queries.events(c, week, time.time() + 1)),
    ]
    for window in ("15m", "1h", "24h", "7d"):
        for by in ("none", "node", "model", "tag"):
            cases.append((f"series {window} by {by}", series(window, by)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / db.DB_NAME
        took = fill(path, args.rows, args.days, rng)
        size = path.stat().st_size / 2**20
        print(
            f"{args.rows:,} traces over {args.days:g} days: written in {took:.1f} s "
            f"({args.rows / took:,.0f}/s), database {size:,.0f} MiB"
        )
        connection = db.connect(path)
        in_week = connection.value(
            "SELECT COUNT(*) FROM request_traces WHERE timestamp >= ?", (week,)
        )
        connection.close()
        print(f"{in_week:,} of them in the last 7 days\n")
        print(f"{'query':<28} {'median ms':>10}  plan (SQLite's EXPLAIN QUERY PLAN)")
        print("-" * 110)
        for name, run in cases:
            times = []
            plan = ""
            for _ in range(args.repeat):
                connection = db.connect(path)
                raw = connection.raw  # SQLite's own connection, for its plans
                seen: list[str] = []
                raw.set_trace_callback(seen.append)
                started = time.perf_counter()
                run(connection)
                times.append((time.perf_counter() - started) * 1000)
                raw.set_trace_callback(None)
                selects = [s for s in seen if s.lstrip().upper().startswith("SELECT")]
                if selects:
                    rows = raw.execute("EXPLAIN QUERY PLAN " + selects[0]).fetchall()
                    plan = next((r[3] for r in rows if r[3].startswith(("SEARCH", "SCAN"))), "")
                    plan = plan.replace(" USING", ":").replace("COVERING INDEX", "covering")
                connection.close()
            print(f"{name:<28} {statistics.median(times):>10.1f}  {plan}")


if __name__ == "__main__":
    main()
