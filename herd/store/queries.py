"""Read-side queries for the dashboard API. Synchronous; run them in a worker thread.

Every time-ranged query takes ``since`` (epoch seconds). Figures come straight from
``request_traces``; nothing here keeps state. Each query is written once for both databases
(SQLite and PostgreSQL, see :mod:`herd.store.db`); where their SQL differs the text comes from
the connection's :class:`~herd.store.db.Dialect`. Ties are broken by a name or an id, so both
give the same rows in the same order.

On SQLite every windowed query is answered by a search of an index on its time range
(``tests/test_instruments.py`` checks the plans): mostly the covering
``request_traces_window``. There ``+node_id IS NOT NULL`` (the unary plus, the dialect's
``unindexed``) keeps SQLite from scanning the node index for that term instead of searching the
time range, and ``INDEXED BY`` (``indexed_by``) keeps it from scanning that index for its order
where a query groups by node and model. PostgreSQL searches its timestamp index.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from herd.core.timeline import CATEGORIES
from herd.store.db import Store, StoreTarget, connected

T = TypeVar("T")

_TOTALS = """
    COUNT(*) AS requests,
    COUNT(*) FILTER (WHERE status = 'completed') AS completed,
    COUNT(*) FILTER (WHERE status = 'failed') AS failed,
    COUNT(*) FILTER (WHERE status = 'incomplete') AS incomplete,
    COUNT(*) FILTER (WHERE status = 'client_disconnected') AS client_disconnected,
    SUM(retry_count) AS retries,
    SUM(fallback_used) AS fallbacks,
    AVG(CASE WHEN status = 'completed' THEN latency_ms END) AS avg_latency_ms,
    AVG(CASE WHEN status = 'completed' THEN time_to_first_token_ms END) AS avg_ttft_ms,
    COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens,
    COALESCE(SUM(completion_tokens), 0) AS completion_tokens
"""


def run(target: StoreTarget | Path, query: Callable[[Store], T]) -> T:
    """``query`` over a new connection to ``target`` (closed after). Raises StoreError."""
    with connected(target) as connection:
        return query(connection)


def _rows(connection: Store, sql: str, *args: Any) -> list[dict[str, Any]]:
    return [_clean(row) for row in connection.rows(sql, args)]


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    for key, value in row.items():
        if isinstance(value, float):
            row[key] = round(value, 3)
        elif value is None and key in (
            "completed",
            "failed",
            "incomplete",
            "client_disconnected",
            "retries",
            "fallbacks",
        ):
            row[key] = 0
    return row


def _day(connection: Store) -> str:
    return connection.dialect.day.format("timestamp")


def _tags(connection: Store, alias: str = "tag") -> str:
    return connection.dialect.json_items.format("request_traces.tags", alias)


def _with_node(connection: Store) -> str:
    return connection.dialect.unindexed.format("node_id") + " IS NOT NULL"


def overview(connection: Store, since: float) -> dict[str, Any]:
    row = _rows(connection, f"SELECT {_TOTALS} FROM request_traces WHERE timestamp >= ?", since)[0]
    row["error_rate"] = (
        round((row["failed"] + row["incomplete"]) / row["requests"], 4) if row["requests"] else 0.0
    )
    row["models_used"] = connection.value(
        "SELECT COUNT(DISTINCT model) FROM request_traces WHERE timestamp >= ?", (since,)
    )
    return row


def trends(connection: Store, since: float) -> list[dict[str, Any]]:
    hour = connection.dialect.bucket.format("timestamp", 3600)
    return _rows(
        connection,
        f"""
        SELECT {hour} * 3600 AS hour, {_TOTALS}
        FROM request_traces WHERE timestamp >= ? GROUP BY hour ORDER BY hour""",
        since,
    )


def models(connection: Store, since: float) -> list[dict[str, Any]]:
    rows = _rows(
        connection,
        f"""
        SELECT model, {_TOTALS},
            SUM(CASE WHEN status = 'completed' THEN completion_tokens END) AS gen_tokens,
            SUM(CASE WHEN status = 'completed'
                THEN latency_ms - COALESCE(time_to_first_token_ms, 0) END) AS gen_ms
        FROM request_traces WHERE timestamp >= ? GROUP BY model ORDER BY requests DESC, model""",
        since,
    )
    for row in rows:
        gen_tokens, gen_ms = row.pop("gen_tokens"), row.pop("gen_ms")
        row["tokens_per_second"] = (
            round(gen_tokens / (gen_ms / 1000), 2) if gen_tokens and gen_ms else None
        )
    return rows


def model_daily(connection: Store, since: float, model: str) -> list[dict[str, Any]]:
    return _rows(
        connection,
        f"""
        SELECT {_day(connection)} AS day, {_TOTALS}
        FROM request_traces WHERE timestamp >= ? AND model = ? GROUP BY day ORDER BY day""",
        since,
        model,
    )


def usage(connection: Store, since: float) -> list[dict[str, Any]]:
    return _rows(
        connection,
        f"""
        SELECT {_day(connection)} AS day, node_id, model, {_TOTALS}
        FROM request_traces WHERE timestamp >= ? AND {_with_node(connection)}
        GROUP BY day, node_id, model ORDER BY day, node_id, model""",
        since,
    )


def apps(connection: Store, since: float) -> list[dict[str, Any]]:
    rows = _rows(
        connection,
        f"""
        SELECT tag.value AS tag, {_TOTALS}
        FROM request_traces, {_tags(connection)}
        WHERE timestamp >= ? GROUP BY tag.value ORDER BY requests DESC, tag.value""",
        since,
    )
    for row in rows:
        row["error_rate"] = round((row["failed"] + row["incomplete"]) / row["requests"], 4)
    return rows


def apps_daily(connection: Store, since: float, tag: str | None = None) -> list[dict[str, Any]]:
    where = "AND tag.value = ?" if tag else ""
    args: tuple[Any, ...] = (since, tag) if tag else (since,)
    return _rows(
        connection,
        f"""
        SELECT {_day(connection)} AS day, tag.value AS tag, {_TOTALS}
        FROM request_traces, {_tags(connection)}
        WHERE timestamp >= ? {where} GROUP BY day, tag.value ORDER BY day, tag.value""",
        *args,
    )


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    for key in ("scores_breakdown", "excluded_nodes", "tags"):
        row[key] = json.loads(row[key])
    row["runners_up"] = [{"node_id": n, "score": s} for n, s in json.loads(row["runners_up"])]
    row["fallback_used"] = bool(row["fallback_used"])
    return row


def traces(connection: Store, limit: int) -> list[dict[str, Any]]:
    rows = _rows(
        connection,
        "SELECT * FROM request_traces ORDER BY timestamp DESC, request_id DESC LIMIT ?",
        limit,
    )
    return [_decoded(row) for row in rows]


def trace(connection: Store, request_id: str) -> dict[str, Any] | None:
    """One stored trace by its request id, or None."""
    rows = _rows(connection, "SELECT * FROM request_traces WHERE request_id = ?", request_id)
    return _decoded(rows[0]) if rows else None


# The instruments' series (herd.core.instruments.series): counts per bucket and group, and
# each completed request's latency and TTFT, both answered from the window index.
_GROUPS = {
    "none": "'all'",
    "node": "COALESCE(node_id, '(no node)')",
    "model": "model",
    "tag": "COALESCE(tag.value, '(untagged)')",
}
_SERIES_COUNTS = """
    SELECT {bucket} AS b, {group} AS g, COUNT(*),
        COUNT(*) FILTER (WHERE status = 'completed'),
        COUNT(*) FILTER (WHERE status IN ('failed', 'incomplete')),
        COUNT(*) FILTER (WHERE status = 'client_disconnected'), SUM(retry_count),
        SUM(fallback_used), COUNT(*) FILTER (WHERE substitution IN ('vram', 'context'))
    FROM request_traces {join} WHERE {where} GROUP BY b, g"""
_SERIES_VALUES = """
    SELECT {bucket}, {group}, latency_ms, time_to_first_token_ms, completion_tokens
    FROM request_traces {join} WHERE {where} AND status = 'completed'"""


def series_data(
    connection: Store,
    start: float,
    end: float,
    bucket_seconds: int,
    by: str = "none",
    model: str | None = None,
    node: str | None = None,
    tag: str | None = None,
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Counts and values (see :mod:`herd.core.instruments`) for ``start <= timestamp < end``,
    grouped by ``by`` ("none", "node", "model" or "tag"), narrowed to a model, a node or a
    tag. Values come back as plain tuples: a week may hold hundreds of thousands."""
    where = "timestamp >= :start AND timestamp < :end"
    if model is not None:
        where += " AND model = :model"
    if node is not None:
        where += " AND node_id = :node"
    if tag is not None:
        where += f" AND EXISTS (SELECT 1 FROM {_tags(connection, 't')} WHERE t.value = :tag)"
    join = f"LEFT JOIN {_tags(connection)} ON TRUE" if by == "tag" else ""
    shape = {
        "bucket": connection.dialect.bucket.format("timestamp", ":bucket"),
        "group": _GROUPS[by],
        "join": join,
        "where": where,
    }
    args = {
        "bucket": bucket_seconds,
        "start": start,
        "end": end,
        "model": model,
        "node": node,
        "tag": tag,
    }
    counts = connection.tuples(_SERIES_COUNTS.format(**shape), args)
    values = connection.tuples(_SERIES_VALUES.format(**shape), args)
    return counts, values


def events(connection: Store, start: float, end: float, limit: int = 2000) -> list[dict[str, Any]]:
    """Fleet events with ``start <= timestamp < end``, oldest first; the newest ``limit`` when
    there are more."""
    rows = _rows(
        connection,
        """
        SELECT * FROM (
            SELECT id, timestamp, kind, node_id, model, detail FROM fleet_events
            WHERE timestamp >= ? AND timestamp < ? ORDER BY timestamp DESC, id DESC LIMIT ?
        ) AS newest ORDER BY timestamp, id""",
        start,
        end,
        limit,
    )
    for row in rows:
        row["category"] = CATEGORIES.get(row["kind"], "other")
    return rows


def model_node_usage(connection: Store, since: float) -> dict[tuple[str, str], dict[str, Any]]:
    indexed = connection.dialect.indexed_by.format("request_traces_window")
    rows = _rows(
        connection,
        f"""
        SELECT node_id, model, COUNT(*) AS requests, MAX(timestamp) AS last_used
        FROM request_traces {indexed}
        WHERE timestamp >= ? AND {_with_node(connection)}
        GROUP BY node_id, model""",
        since,
    )
    return {(r["node_id"], r["model"]): r for r in rows}


def health_figures(connection: Store, since: float) -> dict[str, Any]:
    row = _rows(
        connection,
        f"""
        SELECT {_TOTALS},
            COUNT(*) FILTER (
                WHERE status = 'failed' AND error_message LIKE '%first byte%'
            ) AS timeouts
        FROM request_traces WHERE timestamp >= ?""",
        since,
    )[0]
    row["timeouts"] = row["timeouts"] or 0
    per_node = _rows(
        connection,
        f"""
        SELECT node_id, COUNT(*) AS requests FROM request_traces
        WHERE timestamp >= ? AND {_with_node(connection)} GROUP BY node_id""",
        since,
    )
    row["requests_per_node"] = {r["node_id"]: r["requests"] for r in per_node}
    return row


def save_benchmark(connection: Store, name: str, data: dict[str, Any]) -> int:
    with connection.transaction():
        found = connection.value(
            "INSERT INTO benchmark_runs (timestamp, name, data) VALUES (?, ?, ?) RETURNING id",
            (time.time(), name, json.dumps(data)),
        )
    return int(found or 0)


def benchmarks(connection: Store, since: float) -> list[dict[str, Any]]:
    rows = _rows(connection, "SELECT * FROM benchmark_runs WHERE timestamp >= ? ORDER BY id", since)
    for row in rows:
        row["data"] = json.loads(row["data"])
    return rows
