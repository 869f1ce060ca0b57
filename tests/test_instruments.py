"""The dashboard's instruments (#19): the pure folding of traces into series, the feed's "why",
the fleet-event diff, the store's window index (its query plans), and the endpoints over a real
router with simulated nodes."""

from __future__ import annotations

import ast
import json
import random
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing

from herd.core import instruments, timeline
from herd.core.instruments import OTHER, UNTAGGED, fold, percentile, why
from herd.core.timeline import FleetEvent, NodeFacts, diff, settings_changes
from herd.core.traces import TraceRecord
from herd.state.state import RouterState
from herd.store import db, queries
from herd.store.events import open_events
from tests.conftest import Fleet, running_fleet, two_node_specs, wait_until

# ---------------------------------------------------------------------------- pure


def row(
    bucket: int,
    status: str = "completed",
    node: str | None = "a",
    model: str = "m",
    latency: float = 100.0,
    ttft: float | None = 10.0,
    tokens: int | None = 9,
    retries: int = 0,
    fallback: bool = False,
    substitution: str | None = None,
    tags: list[str] | None = None,
) -> tuple[Any, ...]:
    return (
        bucket,
        status,
        node,
        model,
        latency,
        ttft,
        tokens,
        retries,
        int(fallback),
        substitution,
        json.dumps(tags or []),
    )


def series(
    rows: list[tuple[Any, ...]],
    win: instruments.Window,
    start: float,
    by: str = "none",
    tag: str | None = None,
    max_groups: int = instruments.MAX_GROUPS,
) -> dict[str, Any]:
    """The instruments' series of raw rows (folded as the store's SQL does)."""
    counts, values = fold(rows, by if by in instruments.BREAKDOWNS else "none", tag)
    return instruments.series(counts, values, win, start, by, max_groups)


def test_every_window_has_a_bucket_that_fits() -> None:
    assert list(instruments.WINDOWS) == ["15m", "1h", "6h", "24h", "3d", "7d"]
    for win in instruments.WINDOWS.values():
        assert 60 <= win.bucket_seconds <= 3600
        assert 15 <= win.buckets <= 168
        start, end = win.span(1_000_000.5)
        assert end - start == win.seconds
        assert start % win.bucket_seconds == 0
        assert end - win.bucket_seconds <= 1_000_000.5 < end  # the last bucket holds now
    with pytest.raises(ValueError, match="choose one of 15m, 1h"):
        instruments.window("2h")


def test_percentiles_are_by_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile(values, 99) == 99
    assert percentile([7.0], 99) == 7
    assert percentile([1.0, 2.0], 50) == 1
    assert percentile([], 50) is None


def test_empty_buckets_are_absent_and_latency_counts_completed_requests_only() -> None:
    win = instruments.window("15m")
    start, _ = win.span(60 * 1000 + 30)
    first = int(start) // 60
    rows = [
        row(first, latency=100, ttft=10),
        row(first, latency=300, ttft=30),
        row(first, status="failed", latency=5, ttft=None, tokens=None, retries=2),
        # nothing in the next two minutes
        row(first + 3, latency=200, ttft=20),
        row(first + 3, status="client_disconnected", latency=1, ttft=1),
        row(first + 3, status="incomplete", latency=9000, ttft=50, fallback=True),
        row(first + 3, substitution="vram"),
        row(first + 3, substitution="fallback_models"),
    ]
    out = series(rows, win, start)
    assert out["groups"] == ["all"]
    (only,) = out["series"]
    assert [b["t"] for b in only["buckets"]] == [first * 60, (first + 3) * 60]
    one, two = only["buckets"]
    assert (one["requests"], one["completed"], one["errors"], one["retries"]) == (3, 2, 1, 2)
    assert (one["latency_p50"], one["latency_p99"], one["ttft_p50"]) == (100, 300, 10)
    assert two["errors"] == 1 and two["disconnects"] == 1
    assert two["fallbacks"] == 1 and two["substitutions"] == 1  # fallback_models is a fallback
    assert two["latency_p99"] == 200  # the incomplete one's 9 s is not a latency
    # generation speed: tokens over the time after the first token, summed
    assert one["tokens_per_second"] == round(18 / (360 / 1000), 2)
    total = out["totals"][0]
    assert total["requests"] == 8 and total["group"] == "all"
    assert out["start"] == start and out["end"] == start + 900 and out["bucket_seconds"] == 60


def test_breakdowns_keep_the_busiest_groups_and_fold_the_rest_from_their_rows() -> None:
    win = instruments.window("1h")
    rows = []
    for index in range(10):  # group g0 busiest ... g9 least busy
        rows += [row(5, node=f"g{index}", latency=float(1000 + index))] * (20 - index)
    rows.append(row(5, node=None, latency=1.0))
    out = series(rows, win, 0.0, by="node", max_groups=3)
    assert out["groups"] == ["g0", "g1", "g2", OTHER]
    other = out["totals"][-1]
    merged = sorted(
        [1.0] + [float(1000 + i) for i in range(3, 10) for _ in range(20 - i)]
    )  # (no node) falls into (other) too
    assert other["requests"] == len(merged)
    assert other["latency_p50"] == percentile(merged, 50)
    assert other["latency_p95"] == percentile(merged, 95)
    with pytest.raises(ValueError, match="unknown breakdown"):
        series(rows, win, 0.0, by="colour")


def test_tags_count_under_each_and_untagged_has_its_own_group() -> None:
    win = instruments.window("1h")
    rows = [row(1, tags=["a", "b"]), row(1, tags=["a"]), row(1)]
    out = series(rows, win, 0.0, by="tag")
    assert {t["group"]: t["requests"] for t in out["totals"]} == {"a": 2, "b": 1, UNTAGGED: 1}
    narrowed = series(rows, win, 0.0, by="node", tag="b")
    assert narrowed["totals"][0]["requests"] == 1


def test_why_names_the_strongest_signals_the_margin_and_what_resilience_did() -> None:
    trace = {
        "node_id": "alpha",
        "score": 80.0,
        "scores_breakdown": {"thermal": 50.0, "affinity": 15.04, "queue_depth": -12.33},
        "runners_up": [{"node_id": "beta", "score": 41.5}],
        "retry_count": 1,
        "excluded_nodes": ["gamma"],
        "fallback_used": False,
        "substitution": "vram",
        "context_action": "stripped",
    }
    assert why(trace) == (
        "thermal +50, affinity +15; queue_depth -12.3; beat beta by 38.5; "
        "after 1 retry (left gamma); substituted (vram); context stripped"
    )
    assert why({"node_id": "a", "score": 9.0, "scores_breakdown": {"thermal": 9.0}}) == (
        "thermal +9; the only candidate"
    )
    assert why({"node_id": None, "error_message": "no node can serve x"}) == (
        "no node served it: no node can serve x"
    )


def trace_record(request_id: str, node: str, at: float, tokens: int = 10) -> TraceRecord:
    return TraceRecord(
        request_id=request_id,
        model="m",
        original_model="m",
        node_id=node,
        score=1.0,
        scores_breakdown={"thermal": 1.0},
        status="completed",
        latency_ms=1000.0,
        time_to_first_token_ms=100.0,
        prompt_tokens=1,
        completion_tokens=tokens,
        retry_count=0,
        fallback_used=False,
        excluded_nodes=(),
        original_format="ollama",
        kind="text",
        error_message=None,
        timestamp=at,
        tags=(),
        runners_up=(("b", 0.5),),
    )


def test_node_throughput_says_what_span_it_covers() -> None:
    now = 10_000.0
    traces = [trace_record(f"r{i}", "a", now - 290 + i * 10) for i in range(29)]
    flow = instruments.node_throughput(traces, now, 300.0)
    assert flow["a"] == {
        "requests": 29,
        "seconds": 300.0,
        "requests_per_minute": 5.8,
        "tokens_per_second": round(290 / 300, 2),
    }
    # A full ring reaching back only 100 s: the figures are over those 100 s.
    recent = [trace_record(f"r{i}", "a", now - 100 + i * 10) for i in range(10)]
    flow = instruments.node_throughput(recent, now, 300.0, truncated=True)
    assert flow["a"]["seconds"] == 100.0 and flow["a"]["requests_per_minute"] == 6.0


def facts(status: str = "online", connected: bool = True, **kw: Any) -> NodeFacts:
    return NodeFacts(status=status, connected=connected, **kw)


def test_the_fleet_diff_finds_each_kind_once() -> None:
    before = {
        "a": facts(loaded=frozenset({"x", "y"})),
        "b": facts(),
        "c": facts(),
        "d": facts("offline", connected=False),
        "gone": facts("offline"),
    }
    after = {
        "a": facts(loaded=frozenset({"y", "z"}), draining=True, paused=True),
        "b": facts("degraded", backend_healthy=False, backend_error="connection refused"),
        "c": facts("offline", connected=False),  # its socket closed: the socket's node_left
        "d": facts("online"),  # came back on a new socket: the socket's node_joined
        "new": facts(),  # likewise
    }
    found = [(e.kind, e.node_id, e.model) for e in diff(before, after, 5.0)]
    assert found == [
        ("model_loaded", "a", "z"),
        ("model_evicted", "a", "x"),
        ("drain_started", "a", None),
        ("node_paused", "a", None),
        ("node_degraded", "b", None),
        ("backend_down", "b", None),
        ("node_forgotten", "gone", None),
    ]
    back = diff({"b": after["b"]}, {"b": facts()}, 6.0)
    assert [(e.kind, e.timestamp) for e in back] == [("node_recovered", 6.0), ("backend_up", 6.0)]
    assert settings_changes({"a": True, "b": 1}, {"a": False, "b": 1}) == "a: true → false"


def test_the_instruments_and_the_timeline_are_pure() -> None:
    allowed = {"__future__", "json", "collections.abc", "typing", "attrs", "herd.core.traces"}
    banned = {"time", "trio", "datetime", "httpx", "quart", "sqlite3", "os", "random"}
    for module in (instruments, timeline):
        tree = ast.parse(Path(module.__file__ or "").read_text())
        for item in ast.walk(tree):
            if isinstance(item, ast.Import | ast.ImportFrom):
                names = (
                    [a.name for a in item.names] if isinstance(item, ast.Import) else [item.module]
                )
                assert set(names) <= allowed, (module.__name__, names)
            if isinstance(item, ast.Name):
                assert item.id not in banned, (module.__name__, item.id, item.lineno)


# ---------------------------------------------------------------------------- store

WINDOWED: dict[str, Callable[[db.Store], object]] = {
    "series": lambda c: queries.series_data(c, 0.0, 1e12, 60, "node"),
    "series by tag": lambda c: queries.series_data(c, 0.0, 1e12, 60, "tag", tag="x"),
    "series of a node's model": lambda c: queries.series_data(c, 0.0, 1e12, 60, "none", "m", "a"),
    "overview": lambda c: queries.overview(c, 0.0),
    "trends": lambda c: queries.trends(c, 0.0),
    "models": lambda c: queries.models(c, 0.0),
    "model_daily": lambda c: queries.model_daily(c, 0.0, "m"),
    "usage": lambda c: queries.usage(c, 0.0),
    "apps": lambda c: queries.apps(c, 0.0),
    "apps_daily": lambda c: queries.apps_daily(c, 0.0, "t"),
    "model_node_usage": lambda c: queries.model_node_usage(c, 0.0),
    "events": lambda c: queries.events(c, 0.0, 1e12),
}


def plans(path: Path) -> dict[str, list[str]]:
    """Each windowed dashboard query's plan (EXPLAIN QUERY PLAN), caught as it runs."""
    found: dict[str, list[str]] = {}
    for name, run in WINDOWED.items():
        connection = db.connect(path)
        seen: list[str] = []

        def trace(sql: str, seen: list[str] = seen) -> None:
            if sql.lstrip().upper().startswith("SELECT"):
                seen.append(sql)

        raw: sqlite3.Connection = connection.raw
        raw.set_trace_callback(trace)
        try:
            run(connection)
            raw.set_trace_callback(None)
            details = []
            for sql in seen:
                details += [r[3] for r in raw.execute("EXPLAIN QUERY PLAN " + sql).fetchall()]
        finally:
            connection.close()
        found[name] = details
    return found


def test_windowed_queries_use_the_window_index_never_a_full_scan(tmp_path: Path) -> None:
    path = tmp_path / "latency.db"
    db.initialise(path)
    connection = db.connect(path)
    db.write_traces(connection, [trace_record(f"r{i}", "a", 1000.0 + i) for i in range(50)])
    connection.close()
    for name, details in plans(path).items():
        assert details, name
        for detail in details:
            assert "SCAN request_traces" not in detail, (name, detail)
            assert "SCAN fleet_events" not in detail, (name, detail)
        joined = " | ".join(details)
        if name == "events":
            assert "SEARCH fleet_events USING INDEX fleet_events_timestamp" in joined, joined
        else:
            assert re.search(
                r"SEARCH request_traces USING (COVERING )?INDEX request_traces_", joined
            )
            assert "timestamp>?" in joined, joined


def test_the_store_folds_as_the_pure_code_does(store_target: db.StoreTarget) -> None:
    """The SQL behind the series (counts per bucket and group, values of completed requests)
    gives exactly the figures folding the raw rows in Python gives."""
    rng = random.Random(7)
    now = 10_000_000.0
    traces = []
    for index in range(600):
        status = rng.choice(["completed"] * 6 + ["failed", "incomplete", "client_disconnected"])
        done = status == "completed"
        ttft = rng.choice([None, rng.uniform(1, 500)]) if done else None
        traces.append(
            attrs.evolve(
                trace_record(f"r{index}", rng.choice(["a", "b", "c"]), now - rng.uniform(0, 3600)),
                node_id=rng.choice(["a", "b", "c", None]),
                model=rng.choice(["m1", "m2"]),
                status=status,
                latency_ms=rng.uniform(1, 5000),
                time_to_first_token_ms=ttft,
                completion_tokens=rng.choice([None, 0, rng.randint(1, 300)]),
                retry_count=rng.randint(0, 2),
                fallback_used=rng.random() < 0.1,
                substitution=rng.choice([None, None, "vram", "context", "fallback_models"]),
                tags=tuple(rng.sample(["x", "y", "z"], rng.randint(0, 2))),
            )
        )
    path = store_target
    db.initialise(path)
    connection = db.connect(path)
    try:
        db.write_traces(connection, traces)
        win = instruments.window("1h")
        start, end = win.span(now)
        for by, tag, model, node in (
            ("none", None, None, None),
            ("node", None, None, None),
            ("model", None, None, "b"),
            ("tag", None, None, None),
            ("node", "y", "m2", None),
        ):
            counts, values = queries.series_data(
                connection, start, end, win.bucket_seconds, by, model, node, tag
            )
            from_sql = instruments.series(counts, values, win, start, by)
            raw = [
                (
                    int(t.timestamp // win.bucket_seconds),
                    t.status,
                    t.node_id,
                    t.model,
                    t.latency_ms,
                    t.time_to_first_token_ms,
                    t.completion_tokens,
                    t.retry_count,
                    int(t.fallback_used),
                    t.substitution,
                    json.dumps(list(t.tags)),
                )
                for t in traces
                if start <= t.timestamp < end
                and (model is None or t.model == model)
                and (node is None or t.node_id == node)
            ]
            assert from_sql == series(raw, win, start, by, tag), (by, tag, model, node)
            assert sum(t["requests"] for t in from_sql["totals"]) >= 1
    finally:
        connection.close()


# The trace table as herd 0.x made it (before #19): no runners_up, a plain timestamp index.
OLD_SCHEMA = """
CREATE TABLE request_traces (
    request_id TEXT PRIMARY KEY, model TEXT NOT NULL, original_model TEXT NOT NULL, node_id TEXT,
    score REAL, scores_breakdown TEXT NOT NULL DEFAULT '{}', status TEXT NOT NULL,
    latency_ms REAL NOT NULL, time_to_first_token_ms REAL, prompt_tokens INTEGER,
    completion_tokens INTEGER, retry_count INTEGER NOT NULL DEFAULT 0,
    fallback_used INTEGER NOT NULL DEFAULT 0, excluded_nodes TEXT NOT NULL DEFAULT '[]',
    original_format TEXT NOT NULL, kind TEXT NOT NULL, error_message TEXT,
    timestamp REAL NOT NULL, tags TEXT NOT NULL DEFAULT '[]', substitution TEXT,
    context_action TEXT
);
CREATE INDEX request_traces_timestamp ON request_traces (timestamp);
CREATE INDEX request_traces_node_model ON request_traces (node_id, model, timestamp);
"""


def test_an_older_database_is_brought_up_to_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "latency.db"
    old = sqlite3.connect(path)
    old.executescript(OLD_SCHEMA)
    old.execute(
        "INSERT INTO request_traces (request_id, model, original_model, status, latency_ms, "
        "original_format, kind, timestamp) VALUES ('old', 'm', 'm', 'completed', 5, 'ollama', "
        "'text', 1)"
    )
    old.commit()
    old.close()
    db.initialise(path)
    connection = db.connect(path)
    try:
        indexes = {r[1] for r in connection.tuples("PRAGMA index_list(request_traces)")}
        assert "request_traces_window" in indexes and "request_traces_timestamp" not in indexes
        assert queries.trace(connection, "old")["runners_up"] == []  # type: ignore[index]
        db.write_traces(connection, [trace_record("new", "a", 2.0)])
        assert queries.trace(connection, "new")["runners_up"] == [  # type: ignore[index]
            {"node_id": "b", "score": 0.5}
        ]
    finally:
        connection.close()


def test_the_event_table_keeps_the_newest(
    store_target: db.StoreTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "MAX_EVENTS", 5)
    path = store_target
    db.initialise(path)
    connection = db.connect(path)
    try:
        db.write_events(
            connection, [FleetEvent(float(i), "node_joined", f"n{i}") for i in range(8)]
        )
        db.write_events(connection, [FleetEvent(8.0, "node_left", "n8")])
        kept = [e["node_id"] for e in queries.events(connection, 0.0, 100.0)]
        assert kept == ["n4", "n5", "n6", "n7", "n8"]
        assert db.prune_events(connection, 6.0) == 2
    finally:
        connection.close()


async def test_the_event_log_never_blocks_and_counts_what_it_loses(
    store_target: db.StoreTarget,
) -> None:
    path = store_target
    state = RouterState()
    log = state.timeline
    log.record("settings_changed", detail="before the writer runs")
    async with open_events(path) as events, trio.open_nursery() as nursery:
        await nursery.start(log.run, state, events)
        for index in range(2500):  # a burst: more than the queue holds, no checkpoint
            log.record("model_loaded", "n", f"m{index}")
        await log.flush()
        nursery.cancel_scope.cancel()
    stats = log.statistics()
    assert (stats.recorded, stats.written, stats.dropped, stats.failed) == (2501, 1001, 1500, 0)
    assert len(log.ring) == 1000 and log.ring[-1].model == "m2499"  # memory keeps the newest
    connection = db.connect(path)
    try:
        stored = queries.events(connection, 0, 1e12, limit=5000)
    finally:
        connection.close()
    assert stored[0]["kind"] == "settings_changed" and len(stored) == 1001


# ---------------------------------------------------------------------------- over a router


async def chat(client: httpx.AsyncClient, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "stream": False, "messages": [{"role": "user", "content": "hi"}]}
    return await client.post("/api/chat", json={**body, **extra})


async def test_series_and_timeline_from_real_traffic(tmp_path: Path) -> None:
    async with (
        running_fleet(tmp_path, two_node_specs()) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=10, trust_env=False) as client,
    ):
        for model, tag in (("llama3.2:3b", "a"), ("qwen2.5:7b", "b"), ("llama3.2:3b", "a")):
            assert (await chat(client, model, metadata={"tags": [tag]})).status_code == 200
        for sim in fleet.sims.values():
            sim.fail("http500", times=1)
        assert (await chat(client, "qwen2.5:7b")).status_code == 502
        await wait_until(lambda: len(fleet.router.state.traces) == 4)

        async def get(path: str) -> Any:
            reply = await client.get(path)
            assert reply.status_code == 200, reply.text
            return reply.json()

        whole = await get("/dashboard/api/series?window=15m")
        (total,) = whole["totals"]
        assert (total["requests"], total["completed"], total["errors"]) == (4, 3, 1)
        assert total["retries"] >= 1 and total["latency_p50"] is not None
        assert whole["bucket_seconds"] == 60
        by_model = await get("/dashboard/api/series?window=1h&by=model")
        assert {t["group"]: t["requests"] for t in by_model["totals"]} == {
            "llama3.2:3b": 2,
            "qwen2.5:7b": 2,
        }
        by_tag = await get("/dashboard/api/series?window=6h&by=tag&model=llama3.2:3b")
        assert [(t["group"], t["requests"]) for t in by_tag["totals"]] == [("a", 2)]
        assert by_tag["filters"]["model"] == "llama3.2:3b"
        for bad, message in (
            ("window=2h", "choose one of 15m"),
            ("by=colour", "'by' must be one of none, node, model, tag"),
        ):
            reply = await client.get(f"/dashboard/api/series?{bad}")
            assert reply.status_code == 400 and message in reply.json()["error"]
        # The settings change and both nodes joining are on the timeline.
        changed = await client.post("/dashboard/api/settings", json={"vram_fallback": True})
        assert changed.status_code == 200
        events = (await get("/dashboard/api/timeline?window=15m"))["events"]
        kinds = [(e["kind"], e["node_id"]) for e in events]
        assert ("node_joined", "alpha") in kinds and ("node_joined", "beta") in kinds
        assert events[-1]["kind"] == "settings_changed"
        assert events[-1]["detail"] == "vram_fallback: false → true"
        assert events[-1]["category"] == "settings"


async def test_model_loads_evictions_and_leaving_nodes_reach_the_timeline(tmp_path: Path) -> None:
    async with (
        running_fleet(tmp_path, two_node_specs()) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=10, trust_env=False) as client,
    ):
        state = fleet.router.state
        # beta has llama on disk only: this loads it there (alpha is pinned out)
        reply = await chat(client, "llama3.2:3b", metadata={"node": "beta"})
        assert reply.status_code == 200 and reply.headers["x-herd-node"] == "beta"
        unload = await client.post("/api/generate", json={"model": "qwen2.5:7b", "keep_alive": 0})
        assert unload.status_code == 200
        fleet.agents["beta"].wake()

        def seen(kind: str, node: str, model: str | None = None) -> bool:
            return any(
                e.kind == kind and e.node_id == node and (model is None or e.model == model)
                for e in state.timeline.ring
            )

        with trio.fail_after(10):
            while not (
                seen("model_loaded", "beta", "llama3.2:3b")
                and seen("model_evicted", "beta", "qwen2.5:7b")
            ):
                await state.wait_fleet_changed()
        await fleet.agents["alpha"].drain()
        with trio.fail_after(10):
            while not (seen("drain_started", "alpha") and seen("node_drained", "alpha")):
                await state.wait_fleet_changed()
        await state.timeline.flush()
        stored = await trio.to_thread.run_sync(
            lambda: queries.run(fleet.router.store.target, lambda c: queries.events(c, 0, 1e12))
        )
        assert ("model_loaded", "beta", "llama3.2:3b") in [
            (e["kind"], e["node_id"], e["model"]) for e in stored
        ]
    assert state.timeline.statistics().failed == 0


async def test_a_request_may_name_its_node(fleet: Fleet, client: httpx.AsyncClient) -> None:
    for node in ("alpha", "beta", "alpha"):
        reply = await chat(client, "llama3.2:3b", metadata={"node": node})
        assert reply.status_code == 200 and reply.headers["x-herd-node"] == node
    bad = await chat(client, "llama3.2:3b", metadata={"node": 7})
    assert bad.status_code == 400 and "metadata.node" in bad.json()["error"]


async def test_the_feed_and_a_trace_with_its_runners_up(
    fleet: Fleet, client: httpx.AsyncClient
) -> None:
    assert (await chat(client, "llama3.2:3b")).status_code == 200
    assert (await chat(client, "qwen2.5:7b", metadata={"tags": ["x"]})).status_code == 200
    await wait_until(lambda: len(fleet.router.state.traces) == 2)
    feed = (await client.get("/dashboard/api/requests?limit=5")).json()["requests"]
    assert [r["served"] for r in feed] == ["qwen2.5:7b", "llama3.2:3b"]  # newest first
    newest = feed[0]
    assert newest["asked"] == "qwen2.5:7b" and newest["status"] == "completed"
    assert newest["ttft_ms"] is not None and newest["tokens_per_second"] is not None
    assert newest["tags"] == ["x"] and newest["why"].startswith("thermal")
    llama = feed[1]
    detail = (await client.get(f"/dashboard/api/requests/{llama['request_id']}")).json()
    assert detail["why"] == llama["why"]
    (runner,) = detail["runners_up"]  # both nodes have llama: the other one is the runner-up
    assert runner["node_id"] != detail["node_id"] and runner["score"] <= detail["score"]
    assert "beat " + runner["node_id"] in detail["why"]
    # Out of memory (a restart, or 1,000 requests later), it comes from the store, the same.
    fleet.router.state.traces.clear()
    stored = (await client.get(f"/dashboard/api/requests/{llama['request_id']}")).json()
    assert stored["runners_up"] == detail["runners_up"]
    assert stored["scores_breakdown"] == detail["scores_breakdown"]
    assert stored["why"] == detail["why"]
    missing = await client.get("/dashboard/api/requests/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


async def test_the_live_stream_carries_throughput_per_node(
    fleet: Fleet, client: httpx.AsyncClient
) -> None:
    for _ in range(3):
        assert (await chat(client, "qwen2.5:7b")).status_code == 200
    await wait_until(lambda: len(fleet.router.state.traces) == 3)
    with trio.fail_after(10):
        async with client.stream("GET", "/dashboard/events") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    status = json.loads(line[6:])
                    break
    flow = status["throughput"]["beta"]
    assert flow["requests"] == 3 and flow["seconds"] == 300.0
    assert flow["tokens_per_second"] > 0
    assert status["last_request_id"] == fleet.router.state.traces[-1].request_id
    assert time.time() - fleet.router.state.traces[-1].timestamp < 60


async def test_a_request_naming_a_node_that_cannot_serve_waits_then_says_why(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        running_fleet(tmp_path, two_node_specs(), queue_timeout=5.0) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=None, trust_env=False) as client,
    ):
        start = trio.current_time()
        reply = await chat(client, "llama3.2:3b", metadata={"node": "gamma"})
        assert reply.status_code == 503
        assert "not the node the request named (gamma)" in reply.json()["error"]
        assert 5 <= trio.current_time() - start < 6
        await wait_until(fleet.counters_idle)
