"""The SQLite database in the data dir (``latency.db``, WAL): schema, connections, retention.

Synchronous on purpose: every function here runs in a worker thread (``trio.to_thread``), never
on the event loop. Readers open their own short-lived connection (WAL lets them read while the
writer writes); the one writer connection belongs to :class:`herd.store.writer.TraceWriter`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from herd.core.timeline import FleetEvent
from herd.core.traces import TraceRecord

DB_NAME = "latency.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS request_traces (
    request_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    original_model TEXT NOT NULL,
    node_id TEXT,
    score REAL,
    scores_breakdown TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL,
    latency_ms REAL NOT NULL,
    time_to_first_token_ms REAL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    retry_count INTEGER NOT NULL DEFAULT 0,
    fallback_used INTEGER NOT NULL DEFAULT 0,
    excluded_nodes TEXT NOT NULL DEFAULT '[]',
    original_format TEXT NOT NULL,
    kind TEXT NOT NULL,
    error_message TEXT,
    timestamp REAL NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]',
    substitution TEXT,
    context_action TEXT,
    offload REAL,
    runners_up TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS request_traces_node_model ON request_traces (node_id, model, timestamp);
CREATE TABLE IF NOT EXISTS benchmark_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp REAL NOT NULL,
    name TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS fleet_events (
    id INTEGER PRIMARY KEY,
    timestamp REAL NOT NULL,
    kind TEXT NOT NULL,
    node_id TEXT,
    model TEXT,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS fleet_events_timestamp ON fleet_events (timestamp);
"""

# The dashboard's windowed queries read only these columns, so the index alone answers them
# (SQLite's "covering index": no lookup into the table per row). Time first: every dashboard
# query is a time range. It replaces the plain timestamp index of earlier versions.
WINDOW_INDEX = """
CREATE INDEX IF NOT EXISTS request_traces_window ON request_traces (
    timestamp, status, node_id, model, latency_ms, time_to_first_token_ms, prompt_tokens,
    completion_tokens, retry_count, fallback_used, substitution, tags
);
DROP INDEX IF EXISTS request_traces_timestamp;
"""
# Columns added since the first schema, with their definitions (added to older databases).
ADDED_COLUMNS = {
    "substitution": "TEXT",
    "context_action": "TEXT",
    "runners_up": "TEXT NOT NULL DEFAULT '[]'",
    "offload": "REAL",
}
# Events kept at most (the oldest go first), whatever their age.
MAX_EVENTS = 100_000

COLUMNS = (
    "request_id",
    "model",
    "original_model",
    "node_id",
    "score",
    "scores_breakdown",
    "status",
    "latency_ms",
    "time_to_first_token_ms",
    "prompt_tokens",
    "completion_tokens",
    "retry_count",
    "fallback_used",
    "excluded_nodes",
    "original_format",
    "kind",
    "error_message",
    "timestamp",
    "tags",
    "substitution",
    "context_action",
    "offload",
    "runners_up",
)
INSERT = (
    f"INSERT OR REPLACE INTO request_traces ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in COLUMNS)})"
)


class StorageError(Exception):
    """The data directory can't be used; the message says what and where."""


def check_data_dir(data_dir: Path, database: bool = True) -> None:
    """Check that ``data_dir`` can be created and written (and, with ``database``, that the
    trace database opens and takes a write). Raises :class:`StorageError` naming the path and
    the reason."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / ".herd-write-check"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StorageError(f"cannot write to the data directory {data_dir}: {reason}") from exc
    if not database:
        return
    path = data_dir / DB_NAME
    try:
        initialise(path)
        connection = connect(path)
        try:
            with connection:
                connection.execute("CREATE TABLE IF NOT EXISTS herd_write_check (x)")
                connection.execute("DROP TABLE herd_write_check")
        finally:
            connection.close()
    except (sqlite3.Error, OSError) as exc:
        raise StorageError(f"cannot use the trace database {path}: {exc}") from exc


def connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=10, check_same_thread=False)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


def initialise(path: Path) -> None:
    """Create the tables and indexes, and bring an older database up to this schema (columns
    added, the window index built: a minute or so for millions of rows, once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with connect(path) as connection:
        connection.executescript(SCHEMA)
        have = {row["name"] for row in connection.execute("PRAGMA table_info(request_traces)")}
        for name, definition in ADDED_COLUMNS.items():
            if name not in have:
                connection.execute(f"ALTER TABLE request_traces ADD COLUMN {name} {definition}")
        connection.executescript(WINDOW_INDEX)
    connection.close()


def trace_row(trace: TraceRecord) -> tuple[Any, ...]:
    return (
        trace.request_id,
        trace.model,
        trace.original_model,
        trace.node_id,
        trace.score,
        json.dumps(dict(trace.scores_breakdown)),
        trace.status,
        trace.latency_ms,
        trace.time_to_first_token_ms,
        trace.prompt_tokens,
        trace.completion_tokens,
        trace.retry_count,
        int(trace.fallback_used),
        json.dumps(list(trace.excluded_nodes)),
        trace.original_format,
        trace.kind,
        trace.error_message,
        trace.timestamp,
        json.dumps(list(trace.tags)),
        trace.substitution,
        trace.context_action,
        trace.offload,
        json.dumps([[node, score] for node, score in trace.runners_up]),
    )


def write_traces(connection: sqlite3.Connection, traces: Iterable[TraceRecord]) -> None:
    with connection:
        connection.executemany(INSERT, [trace_row(t) for t in traces])


def prune(connection: sqlite3.Connection, before: float) -> int:
    """Delete traces older than ``before`` (epoch seconds). Returns how many went."""
    with connection:
        cursor = connection.execute("DELETE FROM request_traces WHERE timestamp < ?", (before,))
    return cursor.rowcount


def write_events(connection: sqlite3.Connection, events: Iterable[FleetEvent]) -> None:
    """Append events, then drop the oldest beyond :data:`MAX_EVENTS` (by id: cheap)."""
    with connection:
        connection.executemany(
            "INSERT INTO fleet_events (timestamp, kind, node_id, model, detail) "
            "VALUES (?, ?, ?, ?, ?)",
            [(e.timestamp, e.kind, e.node_id, e.model, e.detail) for e in events],
        )
        last = connection.execute("SELECT MAX(id) FROM fleet_events").fetchone()[0]
        if last is not None and last > MAX_EVENTS:
            connection.execute("DELETE FROM fleet_events WHERE id <= ?", (last - MAX_EVENTS,))


def prune_events(connection: sqlite3.Connection, before: float) -> int:
    """Delete events older than ``before`` (epoch seconds). Returns how many went."""
    with connection:
        cursor = connection.execute("DELETE FROM fleet_events WHERE timestamp < ?", (before,))
    return cursor.rowcount


def recent_latencies(path: Path, per_key: int = 100) -> list[tuple[str, str, float, float | None]]:
    """The last ``per_key`` completed requests per node:model: (node, model, latency_ms,
    tokens per second) — to warm the scorer's history after a restart."""
    query = """
        SELECT node_id, model, latency_ms, completion_tokens, time_to_first_token_ms FROM (
            SELECT *, ROW_NUMBER() OVER (PARTITION BY node_id, model ORDER BY timestamp DESC) AS n
            FROM request_traces WHERE status = 'completed' AND node_id IS NOT NULL
        ) WHERE n <= ? ORDER BY timestamp
    """
    connection = connect(path)
    try:
        rows = connection.execute(query, (per_key,)).fetchall()
    finally:
        connection.close()
    out = []
    for row in rows:
        rate = None
        generating = (row["latency_ms"] or 0) - (row["time_to_first_token_ms"] or 0)
        if row["completion_tokens"] and generating > 0:
            rate = row["completion_tokens"] / (generating / 1000)
        out.append((row["node_id"], row["model"], row["latency_ms"], rate))
    return out
