"""Where the planner's inputs come from: the trace store, the router's registry, a saved
``/fleet/status``. Thin on purpose: each turns stored data into :mod:`herd.plan.planner` values
and does nothing else.

:func:`read_window` is synchronous SQLite: run it in a worker thread (the router does,
through ``trio.to_thread``; the CLI runs it directly). It reads with its own short-lived
connection, as every reader of ``latency.db`` does (WAL lets it read while the router writes).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from herd.core.models import NodeStatus
from herd.plan.inputs import NodeFacts, PlanError, RecordedRequest
from herd.state.registry import NodeRecord
from herd.store.db import connect

COLUMNS = (
    "model, original_model, node_id, scores_breakdown, status, latency_ms, "
    "time_to_first_token_ms, prompt_tokens, completion_tokens, kind, timestamp, tags, substitution"
)


def read_window(path: Path, since: float, limit: int) -> tuple[tuple[RecordedRequest, ...], int]:
    """The most recent ``limit`` requests recorded since ``since`` (epoch seconds), oldest
    first, and how many the window holds. Raises PlanError when the database is missing or
    can't be read."""
    if not path.is_file():
        raise PlanError(f"no trace database at {path} (is this the router's data directory?)")
    try:
        connection = connect(path)
        try:
            count = connection.execute(
                "SELECT COUNT(*) FROM request_traces WHERE timestamp >= ?", (since,)
            ).fetchone()[0]
            rows = connection.execute(
                f"SELECT {COLUMNS} FROM request_traces WHERE timestamp >= ? "
                "ORDER BY timestamp DESC LIMIT ?",
                (since, limit),
            ).fetchall()
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise PlanError(f"cannot read the traces in {path}: {exc}") from exc
    requests = tuple(RecordedRequest.from_trace(_decoded(dict(row))) for row in reversed(rows))
    return requests, int(count)


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    for key, empty in (("scores_breakdown", {}), ("tags", [])):
        try:
            value = json.loads(row.get(key) or "null")
        except ValueError:
            value = None
        row[key] = value if isinstance(value, type(empty)) else empty
    return row


def nodes_from_registry(records: Iterable[NodeRecord]) -> tuple[NodeFacts, ...]:
    """The router's nodes, each as its last report describes it."""
    return tuple(
        NodeFacts.from_report(r.report, online=r.status is not NodeStatus.OFFLINE) for r in records
    )


def nodes_from_status(data: Mapping[str, Any]) -> tuple[NodeFacts, ...]:
    """The nodes of a ``/fleet/status`` answer (live, or saved to a file). Raises PlanError
    when it isn't one."""
    nodes = data.get("nodes") if isinstance(data, Mapping) else None
    if not isinstance(nodes, list):
        raise PlanError("not a /fleet/status answer: it has no 'nodes' list")
    return tuple(NodeFacts.from_status(node) for node in nodes)
