"""The trace store on PostgreSQL (``--store postgresql://...``), on a real server from
tests/engines.py on loopback: every dashboard query gives what SQLite gives for the same
traces, the store can't be reached at start (a clear error) or drops the connection while
running (counted, routing goes on, writes resume), and two routers sharing one database each
show both routers' traces and events."""

from __future__ import annotations

import functools
import json
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from herd.config import ConfigError, RouterConfig, resolve
from herd.core.timeline import FleetEvent
from herd.core.traces import TraceRecord
from herd.http.service import Router
from herd.sim import SimConfig
from herd.store import db, queries
from herd.store.db import StorageError, StoreTarget
from herd.store.writer import TraceWriter
from tests.conftest import LLAMA_3B, QWEN_7B, GiB, postgres_schema, running_fleet, wait_until
from tests.engines import free_port

DAY = 86400.0
NOW = 1_750_000_000.0  # a fixed epoch, so days and hours fall the same way every run


def traces(count: int, seed: int = 20) -> list[TraceRecord]:
    """Varied traces over three days; latencies in whole milliseconds (sums exact on both)."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        status = rng.choice(["completed"] * 6 + ["failed", "incomplete", "client_disconnected"])
        done = status == "completed"
        out.append(
            TraceRecord(
                request_id=f"r{index:04d}",
                model=rng.choice(["llama3.2:3b", "qwen2.5:7b"]),
                original_model="asked",
                node_id=rng.choice(["a", "b", "c", None]),
                score=float(rng.randint(0, 100)),
                scores_breakdown={"thermal": float(rng.randint(0, 50))},
                status=status,
                latency_ms=float(rng.randint(1, 5000)),
                time_to_first_token_ms=float(rng.randint(1, 500)) if done else None,
                prompt_tokens=rng.choice([None, rng.randint(1, 900)]),
                completion_tokens=rng.choice([None, 0, rng.randint(1, 300)]),
                retry_count=rng.randint(0, 2),
                fallback_used=rng.random() < 0.1,
                excluded_nodes=("c",) if rng.random() < 0.1 else (),
                original_format=rng.choice(["ollama", "openai"]),
                kind="text",
                error_message=None if done else "node took too long for the first byte",
                timestamp=NOW - rng.randint(0, int(3 * DAY)),
                tags=tuple(rng.sample(["x", "y", "z"], rng.randint(0, 2))),
                substitution=rng.choice([None, None, "vram", "context"]),
                offload=rng.choice([None, 0.25]),
                runners_up=(("b", 0.5),) if rng.random() < 0.5 else (),
            )
        )
    return out


EVENTS = [FleetEvent(NOW - i * 600.0, "node_joined", f"n{i}", "m", "") for i in range(40)]

QUERIES: dict[str, Callable[[db.Store], Any]] = {
    "overview": lambda c: queries.overview(c, NOW - DAY),
    "trends": lambda c: queries.trends(c, NOW - 3 * DAY),
    "models": lambda c: queries.models(c, 0),
    "model_daily": lambda c: queries.model_daily(c, 0, "qwen2.5:7b"),
    "usage": lambda c: queries.usage(c, 0),
    "apps": lambda c: queries.apps(c, 0),
    "apps_daily": lambda c: queries.apps_daily(c, 0),
    "apps_daily of a tag": lambda c: queries.apps_daily(c, 0, "y"),
    "traces": lambda c: queries.traces(c, 50),
    "trace": lambda c: queries.trace(c, "r0007"),
    "no trace": lambda c: queries.trace(c, "nope"),
    "model_node_usage": lambda c: queries.model_node_usage(c, 0),
    "health_figures": lambda c: queries.health_figures(c, NOW - 2 * DAY),
    "events": lambda c: queries.events(c, NOW - 3 * 3600, NOW + 1, limit=10),
    "benchmarks": lambda c: [
        {k: v for k, v in run.items() if k != "timestamp"} for run in queries.benchmarks(c, 0)
    ],
}


def _series(by: str, filters: dict[str, str], c: db.Store) -> tuple[list[Any], ...]:
    return tuple(
        sorted(part, key=repr)
        for part in queries.series_data(c, NOW - DAY, NOW + 1, 300, by, **filters)
    )


for _by in ("none", "node", "model", "tag"):
    for _filters in ({}, {"model": "llama3.2:3b"}, {"node": "a"}, {"tag": "x"}):
        QUERIES[f"series by {_by} {_filters}"] = functools.partial(_series, _by, _filters)


@pytest.fixture
def postgres(postgres_url: str) -> Iterator[StoreTarget]:
    with postgres_schema(postgres_url) as url:
        yield StoreTarget.postgres(url)


def fill(target: StoreTarget) -> dict[str, Any]:
    db.initialise(target)
    with db.connected(target) as connection:
        db.write_traces(connection, traces(700))
        db.write_traces(connection, traces(3, seed=99))  # rewritten ids replace their rows
        db.write_events(connection, EVENTS)
        first = queries.save_benchmark(connection, "one", {"requests": 3})
        second = queries.save_benchmark(connection, "two", {"nested": {"a": [1, 2]}})
        assert (first, second) == (1, 2)
        answers = {name: query(connection) for name, query in QUERIES.items()}
        answers["prune"] = db.prune(connection, NOW - 2 * DAY)
        answers["prune events"] = db.prune_events(connection, NOW - 3600)
        answers["after pruning"] = queries.overview(connection, 0)
    answers["recent latencies"] = db.recent_latencies(target, per_key=5)
    return answers


def test_every_query_answers_the_same_on_postgresql_as_on_sqlite(
    tmp_path: Path, postgres: StoreTarget
) -> None:
    on_sqlite = fill(StoreTarget.sqlite(tmp_path / "latency.db"))
    on_postgres = fill(postgres)
    for name in on_sqlite:
        assert on_postgres[name] == on_sqlite[name], name
    # And the answers say something: the figures are not all empty.
    assert on_sqlite["overview"]["requests"] > 100 and on_sqlite["apps"]
    assert on_sqlite["usage"][0]["day"].count("-") == 2
    assert on_sqlite["series by tag {}"][0] and on_sqlite["prune"] > 0
    assert on_sqlite["health_figures"]["timeouts"] > 0
    assert len(on_sqlite["events"]) == 10


def test_initialising_twice_and_an_older_table_are_fine(postgres: StoreTarget) -> None:
    """A table from before the offload column gets it; a second start adds nothing."""
    old = db.schema(db.POSTGRES).replace(",\n    offload DOUBLE PRECISION", "")
    assert old != db.schema(db.POSTGRES)
    with db.connected(postgres) as connection:
        connection.script(old)
        connection.execute(
            "INSERT INTO request_traces (request_id, model, original_model, status, latency_ms, "
            "original_format, kind, timestamp) VALUES ('before', 'm', 'm', 'completed', 1, "
            "'ollama', 'text', 1)"
        )
    db.initialise(postgres)
    db.initialise(postgres)
    with db.connected(postgres) as connection:
        assert "offload" in connection.columns("request_traces")
        assert queries.trace(connection, "before")["offload"] is None  # type: ignore[index]


def test_an_unreachable_store_at_start_is_one_clear_error(tmp_path: Path) -> None:
    url = f"postgresql://herd:secret@127.0.0.1:{free_port()}/herd"
    with pytest.raises(StorageError) as info:
        db.initialise(StoreTarget.postgres(url))
    message = str(info.value)
    assert message.startswith("cannot use the trace store postgresql://herd:***@127.0.0.1:")
    assert "cannot connect" in message and "secret" not in message
    result = subprocess.run(
        [sys.executable, "-m", "herd.cli", "--data-dir", str(tmp_path), "--mdns", "false"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"FLEET_STORE": url, "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot use the trace store" in lines[0], result.stderr
    assert "secret" not in result.stderr and "Traceback" not in result.stderr


async def test_a_router_whose_store_is_unreachable_does_not_start(tmp_path: Path) -> None:
    url = f"postgresql://herd@127.0.0.1:{free_port()}/herd"
    config = RouterConfig(host="127.0.0.1", port=0, data_dir=str(tmp_path), store=url)
    with trio.fail_after(30), pytest.raises(StorageError, match="cannot connect"):
        async with Router(config):
            pass


def test_a_bad_store_url_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--store must be a postgresql://"):
        resolve("router", {"store": "mysql://x@y/z"}, {"FLEET_DATA_DIR": str(tmp_path)})
    with pytest.raises(ConfigError) as info:
        resolve("router", {}, {"FLEET_STORE": "redis://u:pw@h/0", "FLEET_DATA_DIR": str(tmp_path)})
    assert "FLEET_STORE" in str(info.value) and "pw" not in str(info.value)
    values = resolve("router", {"store": "postgresql://u:pw@h:5432/herd"}, {})
    from herd.config import redacted

    assert redacted(values)["store"] == "postgresql://u:***@h:5432/herd"
    assert resolve("router", {}, {"FLEET_DATA_DIR": str(tmp_path)})["store"] is None


def test_without_psycopg_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if it were not installed
    with pytest.raises(StorageError, match=r"pip install '\.\[postgres\]'"):
        db.initialise(StoreTarget.postgres("postgresql://herd@127.0.0.1:1/herd"))


async def test_a_dropped_connection_loses_a_batch_and_writing_resumes(
    postgres: StoreTarget, postgres_url: str
) -> None:
    import psycopg

    writer = TraceWriter(postgres)
    batch = traces(3)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.submit(batch[0])
        await writer.flush()
        assert writer.written == 1
        # The server drops the writer's connection (a restart, a failover, an admin).
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'herd' AND pid <> pg_backend_pid()"
            )
        writer.submit(batch[1])
        await writer.flush()
        assert (writer.written, writer.failed) == (1, 1)
        assert writer.last_error is not None and postgres.describe() in writer.last_error
        writer.submit(batch[2])  # a new connection for the next batch
        await writer.flush()
        assert (writer.written, writer.failed, writer.statistics().last_error) == (2, 1, None)
        nursery.cancel_scope.cancel()
    with db.connected(postgres) as connection:
        stored = [t["request_id"] for t in queries.traces(connection, 10)]
    assert sorted(stored) == sorted([batch[0].request_id, batch[2].request_id])


def specs(*names: str) -> list[SimConfig]:
    return [
        SimConfig(name=name, models=(LLAMA_3B, QWEN_7B), loaded=("llama3.2:3b",),
                  memory_bytes=16 * GiB)
        for name in names
    ]  # fmt: skip


async def test_two_routers_on_one_store_each_show_both_routers_traces(
    tmp_path: Path, postgres: StoreTarget
) -> None:
    assert postgres.url is not None
    body = {
        "model": "llama3.2:3b",
        "stream": False,
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with (
        running_fleet(tmp_path / "a", specs("alpha"), store=postgres.url) as one,
        running_fleet(tmp_path / "b", specs("beta"), store=postgres.url) as two,
        httpx.AsyncClient(base_url=one.url, timeout=10, trust_env=False) as to_one,
        httpx.AsyncClient(base_url=two.url, timeout=10, trust_env=False) as to_two,
    ):
        served = []
        for client in (to_one, to_two, to_two):
            reply = await client.post("/api/chat", json=body)
            assert reply.status_code == 200
            served.append((reply.headers["x-herd-request-id"], reply.headers["x-herd-node"]))
        await wait_until(lambda: one.router.store.submitted == 1)
        await wait_until(lambda: two.router.store.submitted == 2)
        assert [node for _, node in served] == ["alpha", "beta", "beta"]
        # Each router writes its own traces (within a batch interval); each router's
        # dashboard then reads them all from the one database.
        for fleet in (one, two):
            await fleet.router.store.flush()
            await fleet.router.state.timeline.flush()
        for client in (to_one, to_two):
            shown = (await client.get("/dashboard/api/traces?limit=10")).json()["traces"]
            assert sorted((t["request_id"], t["node_id"]) for t in shown) == sorted(served)
            series = (await client.get("/dashboard/api/series?window=15m&by=node")).json()
            assert {t["group"]: t["requests"] for t in series["totals"]} == {
                "alpha": 1,
                "beta": 2,
            }
            overview = (await client.get("/dashboard/api/overview?hours=1")).json()
            assert overview["requests"] == 3
            events = (await client.get("/dashboard/api/timeline?window=15m")).json()["events"]
            joined = {e["node_id"] for e in events if e["kind"] == "node_joined"}
            assert joined == {"alpha", "beta"}
    assert one.router.store.statistics().failed == two.router.store.statistics().failed == 0


async def test_a_store_that_goes_away_stops_nothing_and_comes_back(
    tmp_path: Path, postgres: StoreTarget, postgres_url: str
) -> None:
    """The router's tables vanish under it (as a database restored from an old dump, or
    dropped): requests route, the dashboard says why in JSON, health still answers, and once
    the tables are back the next batches are written."""
    import psycopg

    assert postgres.url is not None
    schema = postgres.url.rpartition("%3D")[2]
    body = {
        "model": "llama3.2:3b",
        "stream": False,
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with (
        running_fleet(tmp_path, specs("alpha"), store=postgres.url) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=10, trust_env=False) as client,
    ):
        store = fleet.router.store
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
            admin.execute(f"CREATE SCHEMA {schema}")
        assert (await client.post("/api/chat", json=body)).status_code == 200  # routing goes on
        await wait_until(lambda: store.submitted == 1)
        await store.flush()
        assert store.failed == 1 and store.last_error is not None
        shown = await client.get("/dashboard/api/traces")
        assert shown.status_code == 503 and "can't be read" in shown.json()["error"]
        health = await client.get("/dashboard/api/health")
        assert health.status_code == 200
        storage = next(c for c in health.json()["checks"] if c["id"] == "storage")
        assert storage["severity"] == "critical" and "request_traces" in storage["evidence"]
        # Back (here: the tables made again, as the next start would).
        await trio.to_thread.run_sync(db.initialise, postgres)
        reply = await client.post("/api/chat", json=body)
        await wait_until(lambda: store.submitted == 2)
        await store.flush()
        assert (store.written, store.failed, store.statistics().last_error) == (1, 1, None)
        shown = await client.get("/dashboard/api/traces")
        assert [t["request_id"] for t in shown.json()["traces"]] == [
            reply.headers["x-herd-request-id"]
        ]


async def test_settings_are_kept_in_the_store_for_every_router_on_it(
    tmp_path: Path, postgres: StoreTarget, postgres_url: str
) -> None:
    """With a PostgreSQL store the routers' runtime settings are kept there, one copy: a router
    started later on the same store (another machine, its own data directory) comes up with
    them. The first router's settings.json is read while the store has none yet; a change the
    store can't keep is refused, and nothing changes."""
    import psycopg

    assert postgres.url is not None
    first_dir = tmp_path / "a"
    first_dir.mkdir()
    (first_dir / "settings.json").write_text(json.dumps({"prewarm_queue_depth": 7}))
    async with (
        running_fleet(first_dir, specs("alpha"), store=postgres.url) as one,
        httpx.AsyncClient(base_url=one.url, timeout=10, trust_env=False) as client,
    ):
        assert one.router.state.settings.prewarm_queue_depth == 7  # the file, as before
        changed = await client.post(
            "/dashboard/api/settings", json={"vram_fallback": True, "stale_timeout": 120}
        )
        assert changed.status_code == 200
        # The store away: the change is refused, in JSON, and not applied.
        schema = postgres.url.rpartition("%3D")[2]
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"ALTER TABLE {schema}.router_settings RENAME TO elsewhere")
        refused = await client.post("/dashboard/api/settings", json={"auto_pull": True})
        assert refused.status_code == 503
        assert "could not be saved" in refused.json()["error"]
        assert one.router.state.settings.auto_pull is False
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"ALTER TABLE {schema}.elsewhere RENAME TO router_settings")
    assert json.loads((first_dir / "settings.json").read_text()) == {"prewarm_queue_depth": 7}
    with db.connected(postgres) as connection:
        saved = db.read_settings(connection)
    assert (saved["vram_fallback"], saved["stale_timeout"], saved["prewarm_queue_depth"]) == (
        True,
        120.0,
        7,
    )
    async with running_fleet(tmp_path / "b", specs("beta"), store=postgres.url) as two:
        settings = two.router.state.settings
        assert (settings.vram_fallback, settings.stale_timeout) == (True, 120.0)
        assert settings.prewarm_queue_depth == 7
