"""Records and the operator API: real traffic through the router, every endpoint read back."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from herd.config import RouterConfig
from herd.core.scoring import SIGNALS
from herd.core.traces import TraceRecord
from herd.http.service import Router
from herd.sim import SimModel
from herd.store import db
from tests.conftest import Fleet, running_fleet, two_node_specs, wait_until
from tests.streams import aiter_raw

DOCS = Path(__file__).parent.parent / "docs"


async def seed(fleet: Fleet, client: httpx.AsyncClient) -> dict[str, Any]:
    """Send a known mix; return what the backends said about tokens."""
    sent: dict[str, Any] = {"prompt": 0, "completion": 0}
    for _ in range(3):
        reply = await client.post(
            "/api/chat",
            headers={"X-Herd-Tags": "app-a"},
            json={
                "model": "llama3.2:3b",
                "stream": False,
                "options": {"num_predict": 4},
                "messages": [{"role": "user", "content": "count the sheep please"}],
            },
        )
        data = reply.json()
        sent["prompt"] += data["prompt_eval_count"]
        sent["completion"] += data["eval_count"]
    for _ in range(2):
        reply = await client.post(
            "/v1/chat/completions",
            json={
                "model": "qwen2.5:7b",
                "max_tokens": 6,
                "metadata": {"tags": ["app-b", "x"]},
                "messages": [{"role": "user", "content": "hello"}],
            },
        )
        usage = reply.json()["usage"]
        sent["prompt"] += usage["prompt_tokens"]
        sent["completion"] += usage["completion_tokens"]
    embed = await client.post("/api/embed", json={"model": "nomic-embed-text", "input": "x"})
    sent["prompt"] += embed.json()["prompt_eval_count"]
    # One that fails everywhere, one cut off by the client.
    for sim in fleet.sims.values():
        sim.fail("http500", times=1)
    failed = await client.post("/api/generate", json={"model": "qwen2.5:7b", "prompt": "x"})
    assert failed.status_code == 502
    async with client.stream(
        "POST",
        "/api/chat",
        json={
            "model": "llama3.2:3b",
            "messages": [{"role": "user", "content": "a long story"}],
            "options": {"num_predict": 500},
        },
    ) as r:
        async with contextlib.aclosing(aiter_raw(r)) as chunks:
            async for _ in chunks:
                break
    await wait_until(lambda: len(fleet.router.state.traces) == 8)
    return sent


@pytest.fixture
async def seeded(tmp_path: Path):  # type: ignore[no-untyped-def]
    specs = two_node_specs()
    async with (
        running_fleet(tmp_path, specs) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=10, trust_env=False) as client,
    ):
        sent = await seed(fleet, client)
        yield fleet, client, sent


async def get(client: httpx.AsyncClient, path: str) -> Any:
    response = await client.get(path)
    assert response.status_code == 200, response.text
    return response.json()


async def test_traces_hold_every_request(seeded: Any) -> None:
    fleet, client, sent = seeded
    traces = (await get(client, "/dashboard/api/traces?limit=100"))["traces"]
    assert len(traces) == 8
    statuses = sorted(t["status"] for t in traces)
    assert statuses == [
        "client_disconnected",
        "completed",
        "completed",
        "completed",
        "completed",
        "completed",
        "completed",
        "failed",
    ]
    done = [t for t in traces if t["status"] == "completed"]
    assert sum(t["prompt_tokens"] or 0 for t in done) == sent["prompt"]
    assert sum(t["completion_tokens"] or 0 for t in done) == sent["completion"]
    chat = next(t for t in traces if t["original_format"] == "openai")
    assert set(chat["scores_breakdown"]) == set(SIGNALS)
    assert chat["tags"] == ["app-b", "x"] and chat["node_id"] == "beta"
    # Tags are herd's: the backend never sees them.
    assert all("metadata" not in body for _, body in fleet.sims["beta"].requests)
    assert chat["time_to_first_token_ms"] is not None and chat["latency_ms"] > 0
    failed = next(t for t in traces if t["status"] == "failed")
    assert "500" in failed["error_message"] and failed["retry_count"] == 1
    assert len((await get(client, "/dashboard/api/traces?limit=2"))["traces"]) == 2


async def test_aggregates_match_what_was_sent(seeded: Any) -> None:
    _fleet, client, sent = seeded
    overview = await get(client, "/dashboard/api/overview")
    assert overview["requests"] == 8
    assert (overview["completed"], overview["failed"], overview["client_disconnected"]) == (6, 1, 1)
    assert overview["prompt_tokens"] == sent["prompt"]
    assert overview["completion_tokens"] == sent["completion"]
    assert overview["fleet"]["nodes_online"] == 2
    trends = (await get(client, "/dashboard/api/trends?hours=48"))["buckets"]
    assert sum(b["requests"] for b in trends) == 8
    models = {m["model"]: m for m in (await get(client, "/dashboard/api/models"))["models"]}
    assert models["llama3.2:3b"]["requests"] == 4
    assert models["qwen2.5:7b"]["requests"] == 3
    assert models["llama3.2:3b"]["completion_tokens"] == 12
    daily = await get(client, "/dashboard/api/models?model=qwen2.5:7b")
    assert sum(d["requests"] for d in daily["days"]) == 3
    usage = (await get(client, "/dashboard/api/usage"))["usage"]
    # The request that failed everywhere is recorded against the last node it tried.
    assert {(u["node_id"], u["model"]): u["requests"] for u in usage} == {
        ("alpha", "llama3.2:3b"): 4,
        ("alpha", "nomic-embed-text:latest"): 1,
        ("alpha", "qwen2.5:7b"): 1,
        ("beta", "qwen2.5:7b"): 2,
    }
    apps = {a["tag"]: a for a in (await get(client, "/dashboard/api/apps"))["apps"]}
    assert apps["app-a"]["requests"] == 3 and apps["app-b"]["requests"] == 2
    assert apps["app-a"]["error_rate"] == 0
    per_day = (await get(client, "/dashboard/api/apps/daily?tag=app-b"))["days"]
    assert [d["requests"] for d in per_day] == [2]


async def test_time_range_is_validated(seeded: Any) -> None:
    _, client, _ = seeded
    for bad in ("0", "169", "abc"):
        response = await client.get(f"/dashboard/api/trends?hours={bad}")
        assert response.status_code == 400
        assert "hours" in response.json()["error"]
    assert (await client.get("/dashboard/api/traces?limit=0")).status_code == 400


async def test_benchmarks_round_trip(seeded: Any) -> None:
    _, client, _ = seeded
    saved = await client.post(
        "/dashboard/api/benchmarks", json={"name": "nightly", "results": {"rps": 42.5}}
    )
    assert saved.status_code == 201
    runs = (await get(client, "/dashboard/api/benchmarks"))["runs"]
    assert [(r["name"], r["data"]) for r in runs] == [("nightly", {"rps": 42.5})]


async def test_health_checks(seeded: Any) -> None:
    _fleet, client, _ = seeded
    report = await get(client, "/dashboard/api/health")
    checks = {c["id"]: c for c in report["checks"]}
    assert len(checks) == 19
    for check in checks.values():
        assert check["severity"] in {"ok", "info", "warning", "critical"}
        assert check["evidence"] and check["fix"]
    assert checks["offline_nodes"]["severity"] == "ok"
    assert checks["client_disconnects"]["severity"] in {"info", "warning"}
    assert "1 clients" in checks["client_disconnects"]["evidence"]
    assert checks["unauthenticated_router"]["severity"] == "ok"  # loopback
    assert sum(report["summary"].values()) == 19


async def test_recommendations_fit_each_node(seeded: Any) -> None:
    _, client, _ = seeded
    nodes = {
        n["node_id"]: n for n in (await get(client, "/dashboard/api/recommendations"))["nodes"]
    }
    for node in nodes.values():
        assert node["recommended"]
        assert all(m["memory_gb"] <= node["budget_gb"] for m in node["recommended"])
        assert node["recommended"][-1]["category"] == "embedding"
    # This fleet used llama3.2 the most: it comes first, and it's installed on alpha.
    first = nodes["alpha"]["recommended"][0]
    assert first["family"] == "llama3.2" and first["installed"] is True


async def test_settings_round_trip_and_persist(tmp_path: Path) -> None:
    async with (
        running_fleet(tmp_path, two_node_specs()) as fleet,
        httpx.AsyncClient(base_url=fleet.url, trust_env=False) as client,
    ):
        view = await get(client, "/dashboard/api/settings")
        assert view["settings"]["vram_fallback"] is False  # substitution is opt-in
        assert view["settings"]["auto_pull"] is False  # an unknown model is a 404
        assert view["config"]["security"]["auth_token"] == "unset"
        assert {n["node_id"] for n in view["nodes"]} == {"alpha", "beta"}
        changed = await client.post(
            "/dashboard/api/settings", json={"vram_fallback": True, "stale_timeout": 900}
        )
        assert changed.json()["settings"]["vram_fallback"] is True
        assert fleet.router.state.settings.stale_timeout == 900.0
        bad = await client.post("/dashboard/api/settings", json={"warp_speed": True})
        assert bad.status_code == 400 and "warp_speed" in bad.json()["error"]
        wrong = await client.post("/dashboard/api/settings", json={"auto_pull": "yes"})
        assert wrong.status_code == 400
    # A new router on the same data dir starts with the saved settings.
    config = RouterConfig(host="127.0.0.1", port=0, data_dir=str(tmp_path))
    async with Router(config) as again:
        assert again.state.settings.vram_fallback is True
    # A flag for the same setting beats the file.
    flagged = attrs.evolve(config, vram_fallback=False)
    async with Router(flagged) as again:
        assert again.state.settings.vram_fallback is False


async def test_model_management_and_dashboard_pull_delete(tmp_path: Path) -> None:
    specs = two_node_specs()
    specs[1] = attrs.evolve(specs[1], registry=(SimModel("gemma3:4b"),))
    async with (
        running_fleet(tmp_path, specs) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=10, trust_env=False) as client,
    ):
        await client.post(
            "/api/generate", json={"model": "qwen2.5:7b", "prompt": "x", "stream": False}
        )
        nodes = {
            n["node_id"]: n for n in (await get(client, "/dashboard/api/model-management"))["nodes"]
        }
        qwen = next(m for m in nodes["beta"]["models"] if m["name"] == "qwen2.5:7b")
        assert qwen["loaded"] and qwen["requests_7d"] == 1 and qwen["last_used"]
        pulled = await client.post(
            "/dashboard/api/pull", json={"model": "gemma3:4b", "node_id": "beta", "stream": False}
        )
        assert pulled.json() == {"status": "success", "model": "gemma3:4b", "node": "beta"}
        deleted = await client.post(
            "/dashboard/api/delete", json={"model": "gemma3:4b", "node_id": "beta"}
        )
        assert deleted.json()["deleted"] == ["beta"]


async def test_sse_events_carry_the_fleet(seeded: Any) -> None:
    _, client, _ = seeded
    with trio.fail_after(10):
        async with client.stream("GET", "/dashboard/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            async with contextlib.aclosing(response.aiter_lines()) as lines:
                async for line in lines:
                    if line.startswith("data: "):
                        event = json.loads(line[6:])
                        break
    assert event["fleet"]["nodes_online"] == 2
    assert "queues" in event and "events" in event


async def test_metrics_parse_and_count(seeded: Any) -> None:
    _, client, sent = seeded
    text = (await client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = families["herd_requests"].samples  # the parser drops "_total"
    assert sum(s.value for s in requests if s.name == "herd_requests_total") == 8
    completed = sum(s.value for s in requests if s.labels["status"] == "completed")
    assert completed == 6
    tokens = {s.labels["direction"]: 0.0 for s in families["herd_tokens"].samples}
    for sample in families["herd_tokens"].samples:
        tokens[sample.labels["direction"]] += sample.value
    assert tokens["completion"] == sent["completion"]
    latency = families["herd_request_duration_seconds"].samples
    count = sum(s.value for s in latency if s.name.endswith("_count"))
    assert count == 6
    assert "herd_queue_in_flight" in families and "herd_node_status" in families
    events = {s.labels["event"]: s.value for s in families["herd_events"].samples}
    assert events["retries"] == 1


async def test_documented_sqlite_queries_work(seeded: Any) -> None:
    fleet, _, _ = seeded
    await fleet.router.store.flush()
    text = (DOCS / "operations.md").read_text()
    queries = re.findall(r'sqlite3 ~/\.fleet-manager/latency\.db "([^"]+)"', text)
    assert len(queries) >= 2
    path = fleet.router.store.target.path
    assert path is not None
    connection = sqlite3.connect(path)
    try:
        results = [connection.execute(q).fetchall() for q in queries]
    finally:
        connection.close()
    assert any(rows for rows in results)
    assert results[0][0][2] == "failed"  # recent failures: request_id, model, status, error


def test_retention_prunes_old_traces(store_target: db.StoreTarget) -> None:
    path = store_target
    db.initialise(path)
    connection = db.connect(path)
    now = time.time()

    def trace(request_id: str, age_days: float) -> TraceRecord:
        return TraceRecord(
            request_id=request_id,
            model="m",
            original_model="m",
            node_id="n",
            score=1.0,
            scores_breakdown={},
            status="completed",
            latency_ms=5.0,
            time_to_first_token_ms=1.0,
            prompt_tokens=1,
            completion_tokens=1,
            retry_count=0,
            fallback_used=False,
            excluded_nodes=(),
            original_format="ollama",
            kind="text",
            error_message=None,
            timestamp=now - age_days * 86400,
            tags=(),
        )

    db.write_traces(connection, [trace("old", 31), trace("new", 1)])
    assert db.prune(connection, now - 30 * 86400) == 1
    rows = [r[0] for r in connection.tuples("SELECT request_id FROM request_traces")]
    connection.close()
    assert rows == ["new"]
    assert db.recent_latencies(path) == [("n", "m", 5.0, 250.0)]


async def test_traces_survive_a_restart_and_warm_the_scorer(tmp_path: Path) -> None:
    async with (
        running_fleet(tmp_path, two_node_specs()) as fleet,
        httpx.AsyncClient(base_url=fleet.url, trust_env=False) as client,
    ):
        await client.post(
            "/api/generate", json={"model": "llama3.2:3b", "prompt": "x", "stream": False}
        )
        await wait_until(lambda: bool(fleet.router.state.traces))
    config = RouterConfig(host="127.0.0.1", port=0, data_dir=str(tmp_path))
    async with Router(config) as again:
        assert ("alpha", "llama3.2:3b") in again.state.history.latency_p75_ms


def test_a_database_from_before_the_offload_column_gets_it(tmp_path: Path) -> None:
    """The trace store's columns only grow: an older database is migrated on open, its rows
    read NULL, and new traces keep the served copy's offload share."""
    path = tmp_path / "latency.db"
    old_schema = db.schema(db.SQLITE).replace(",\n    offload REAL", "")
    assert old_schema != db.schema(db.SQLITE)
    connection = sqlite3.connect(path)
    connection.executescript(old_schema)
    connection.execute(
        "INSERT INTO request_traces (request_id, model, original_model, status, latency_ms, "
        "original_format, kind, timestamp) VALUES ('before', 'm', 'm', 'completed', 1, "
        "'ollama', 'text', 1)"
    )
    connection.commit()
    connection.close()
    db.initialise(path)
    db.initialise(path)  # twice: nothing to add the second time
    store = db.connect(path)
    trace = TraceRecord(
        request_id="after",
        model="m",
        original_model="m",
        node_id="gpu-box",
        score=1.0,
        scores_breakdown={"spill": -30.0},
        status="completed",
        latency_ms=5.0,
        time_to_first_token_ms=1.0,
        prompt_tokens=1,
        completion_tokens=1,
        retry_count=0,
        fallback_used=False,
        excluded_nodes=(),
        original_format="ollama",
        kind="text",
        error_message=None,
        timestamp=2.0,
        tags=(),
        offload=0.43,
    )
    db.write_traces(store, [trace])
    rows = dict(store.tuples("SELECT request_id, offload FROM request_traces"))
    store.close()
    assert rows == {"before": None, "after": 0.43}
    assert trace.as_dict()["offload"] == 0.43
