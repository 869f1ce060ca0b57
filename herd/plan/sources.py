"""Where the planner's inputs come from: the trace store, the router's registry, a saved
``/fleet/status``. Thin on purpose: each turns stored data into :mod:`herd.plan.planner` values
and does nothing else.

:func:`read_window` is synchronous: run it in a worker thread (the router does, through
``trio.to_thread``; the CLI runs it directly). It reads with its own short-lived connection to
the trace store (``latency.db``, where WAL lets it read while the router writes, or the
router's PostgreSQL), as every reader of the store does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from herd.core.models import NodeStatus
from herd.plan.inputs import NodeFacts, PlanError, RecordedRequest
from herd.state.registry import NodeRecord
from herd.store.db import StoreError, StoreTarget, connected

COLUMNS = (
    "model, original_model, node_id, scores_breakdown, status, latency_ms, "
    "time_to_first_token_ms, prompt_tokens, completion_tokens, kind, timestamp, tags, substitution"
)


def read_window(
    target: StoreTarget | Path, since: float, limit: int
) -> tuple[tuple[RecordedRequest, ...], int]:
    """The most recent ``limit`` requests recorded since ``since`` (epoch seconds), oldest
    first, and how many the window holds. Raises PlanError when the database is missing or
    can't be read."""
    if isinstance(target, Path):
        target = StoreTarget.sqlite(target)
    if target.path is not None and not target.path.is_file():
        raise PlanError(
            f"no trace database at {target.path} (is this the router's data directory?)"
        )
    try:
        with connected(target) as connection:
            count = connection.value(
                "SELECT COUNT(*) FROM request_traces WHERE timestamp >= ?", (since,)
            )
            rows = connection.rows(
                f"SELECT {COLUMNS} FROM request_traces WHERE timestamp >= ? "
                "ORDER BY timestamp DESC LIMIT ?",
                (since, limit),
            )
    except StoreError as exc:
        raise PlanError(f"cannot read the traces in {target.describe()}: {exc}") from exc
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
