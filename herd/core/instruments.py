"""The figures behind the dashboard's instruments: windows and buckets, per-bucket percentiles
broken down by node, model or tag, the live request feed's rows and the node cards' throughput.

Rules
-----
- Pure: stdlib, attrs and ``herd.core`` only; no clock (callers pass ``now``), no I/O. The
  store fetches the rows (:func:`herd.store.queries.series_rows`), this module folds them.
- **Windows** are the named spans in :data:`WINDOWS`, 15 minutes to 7 days, each with the
  bucket that fits it (1 minute up to 1 hour), 15 to 168 buckets a chart. Buckets are aligned
  to multiples of their size (epoch seconds); the last one is the one ``now`` falls in, still
  filling.
- **A bucket with no requests has no entry.** Charts draw a gap there, never a zero latency;
  counts (requests, errors) in an empty bucket are zero, and the chart may draw them so.
- **Percentiles are exact**, by nearest rank: the p-th percentile of n values is the
  ``ceil(p * n / 100)``-th smallest. Latency and TTFT are taken over *completed* requests
  only (a failure's latency says how fast it failed, not how fast the fleet serves).
- **Errors** are ``failed`` and ``incomplete`` requests; a client that left
  (``client_disconnected``) is counted apart, as ``disconnects``. **Retries** sums the retry
  counts; **fallbacks** counts requests served by a model from their ``fallback_models``;
  **substitutions** counts requests served by another model than any they named (``vram`` or
  ``context``).
- **tokens/s** is generation speed: completion tokens over the time after the first token,
  summed over a bucket's completed requests (so a long answer weighs more than a short one).
- **Groups**: with a breakdown, at most :data:`MAX_GROUPS` groups (the busiest in the window)
  are kept; the rest are merged into one group named :data:`OTHER`, its figures computed from
  its own rows, never averaged from the groups'. A request with several tags counts once
  under each of them; one with none under :data:`UNTAGGED`; one no node served under
  :data:`NO_NODE`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from herd.core.traces import COMPLETED, TraceRecord

MAX_GROUPS = 8
OTHER = "(other)"
UNTAGGED = "(untagged)"
NO_NODE = "(no node)"
ALL = "all"
BREAKDOWNS = ("none", "node", "model", "tag")
PERCENTILES = (50, 95, 99)
ERROR_STATUSES = frozenset({"failed", "incomplete"})
SUBSTITUTIONS = frozenset({"vram", "context"})


@attrs.frozen
class Window:
    name: str
    seconds: int
    bucket_seconds: int

    @property
    def buckets(self) -> int:
        return self.seconds // self.bucket_seconds

    def span(self, now: float) -> tuple[float, float]:
        """``(start, end)`` in epoch seconds: ``buckets`` whole buckets, the last one holding
        ``now``."""
        end = (int(now) // self.bucket_seconds + 1) * self.bucket_seconds
        return float(end - self.seconds), float(end)


WINDOWS: Mapping[str, Window] = {
    w.name: w
    for w in (
        Window("15m", 15 * 60, 60),
        Window("1h", 3600, 60),
        Window("6h", 6 * 3600, 5 * 60),
        Window("24h", 24 * 3600, 15 * 60),
        Window("3d", 3 * 86400, 3600),
        Window("7d", 7 * 86400, 3600),
    )
}


def window(name: str) -> Window:
    """The window named ``name``. Raises ValueError naming the choices."""
    found = WINDOWS.get(name)
    if found is None:
        raise ValueError(f"unknown window {name!r}; choose one of {', '.join(WINDOWS)}")
    return found


def percentile(ordered: Sequence[float], p: int) -> float | None:
    """The ``p``-th percentile of ``ordered`` (sorted ascending) by nearest rank; None if
    empty."""
    if not ordered:
        return None
    rank = max(1, -(-p * len(ordered) // 100))  # ceil(p * n / 100), at least the first
    return ordered[rank - 1]


# What the store hands over (see herd.store.queries.series_data), two kinds of rows, each
# keyed by bucket index and group:
# - a Counts row per (bucket, group): requests, completed, errors, disconnects, retries,
#   fallbacks, substitutions;
# - a Value row per completed request: latency and TTFT (ms; TTFT may be None) and completion
#   tokens (may be None), for the percentiles, the token total and tokens/s.
# fold() computes both from raw trace rows exactly as the SQL does (tests compare them).
COUNTS = ("requests", "completed", "errors", "disconnects", "retries", "fallbacks", "substitutions")
Counts = tuple[Any, ...]  # (bucket, group, *COUNTS)
Value = tuple[Any, ...]  # (bucket, group, latency_ms, ttft_ms, completion_tokens)
# A raw trace row, for fold(): (bucket index, status, node_id, model, latency_ms, ttft_ms,
# completion_tokens, retry_count, fallback_used, substitution, tags JSON)
Row = tuple[Any, ...]


def _tags(raw: Any) -> list[str]:
    try:
        tags = json.loads(raw) if raw else []
    except ValueError:
        return [UNTAGGED]
    clean = [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []
    return clean or [UNTAGGED]


def group_of(row: Row, by: str) -> list[str]:
    """The groups a raw row falls in under breakdown ``by`` (several for several tags)."""
    if by == "node":
        return [row[2] or NO_NODE]
    if by == "model":
        return [row[3]]
    if by == "tag":
        return _tags(row[10])
    return [ALL]


def fold(
    rows: Iterable[Row], by: str = "none", tag: str | None = None
) -> tuple[list[Counts], list[Value]]:
    """Counts and values from raw rows (what the store's SQL computes), for ``by`` and only the
    rows tagged ``tag`` if given."""
    counts: dict[tuple[int, str], list[int]] = {}
    values: list[Value] = []
    for row in rows:
        if tag is not None and tag not in _tags(row[10]):
            continue
        bucket, status, _, _, latency, ttft, tokens, retries, fallback, substitution, _ = row
        done = status == COMPLETED
        for group in group_of(row, by):
            entry = counts.setdefault((bucket, group), [0] * len(COUNTS))
            for index, add in enumerate(
                (
                    1,
                    done,
                    status in ERROR_STATUSES,
                    status == "client_disconnected",
                    retries or 0,
                    bool(fallback),
                    substitution in SUBSTITUTIONS,
                )
            ):
                entry[index] += add
            if done:
                values.append((bucket, group, latency, ttft, tokens))
    return [(b, g, *entry) for (b, g), entry in counts.items()], values


@attrs.define
class _Cell:
    """One bucket of one group (or a whole group, merged)."""

    counts: list[int] = attrs.field(factory=lambda: [0] * len(COUNTS))
    latencies: list[float] = attrs.field(factory=list)
    ttfts: list[float] = attrs.field(factory=list)
    tokens: int = 0
    gen_tokens: int = 0
    gen_ms: float = 0.0

    def merge(self, other: _Cell) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.latencies += other.latencies
        self.ttfts += other.ttfts
        self.tokens += other.tokens
        self.gen_tokens += other.gen_tokens
        self.gen_ms += other.gen_ms

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(zip(COUNTS, self.counts, strict=True))
        out["completion_tokens"] = self.tokens
        ms = self.gen_ms
        out["tokens_per_second"] = round(self.gen_tokens / (ms / 1000), 2) if ms > 0 else None
        self.latencies.sort()
        self.ttfts.sort()
        for p in PERCENTILES:
            lat, first = percentile(self.latencies, p), percentile(self.ttfts, p)
            out[f"latency_p{p}"] = round(lat, 1) if lat is not None else None
            out[f"ttft_p{p}"] = round(first, 1) if first is not None else None
        return out


def series(
    counts: Iterable[Counts],
    values: Iterable[Value],
    win: Window,
    start: float,
    by: str = "none",
    max_groups: int = MAX_GROUPS,
) -> dict[str, Any]:
    """Per-group series (one entry per bucket that had requests) and per-group totals for the
    window starting at ``start``. Raises ValueError for an unknown ``by``."""
    if by not in BREAKDOWNS:
        raise ValueError(f"unknown breakdown {by!r}; choose one of {', '.join(BREAKDOWNS)}")
    cells: dict[str, dict[int, _Cell]] = {}
    requests: dict[str, int] = {}
    for bucket, group, *numbers in counts:
        cell = cells.setdefault(group, {}).setdefault(bucket, _Cell())
        cell.counts = [int(n or 0) for n in numbers]
        requests[group] = requests.get(group, 0) + cell.counts[0]
    for bucket, group, latency, ttft, tokens in values:
        cell = cells[group][bucket]
        cell.latencies.append(latency)
        if tokens:
            cell.tokens += tokens
        if ttft is not None:
            cell.ttfts.append(ttft)
            if tokens and latency > ttft:
                cell.gen_tokens += tokens
                cell.gen_ms += latency - ttft
    ranked = sorted(cells, key=lambda g: (-requests[g], g))
    if len(ranked) > max_groups:
        merged: dict[int, _Cell] = {}
        for group in ranked[max_groups:]:
            for bucket, cell in cells.pop(group).items():
                merged.setdefault(bucket, _Cell()).merge(cell)
        cells[OTHER] = merged
        ranked = [*ranked[:max_groups], OTHER]
    first = int(start) // win.bucket_seconds
    out_series, totals = [], []
    for group in ranked:
        buckets = cells[group]
        whole = _Cell()
        for cell in buckets.values():
            whole.merge(cell)
        out_series.append(
            {
                "group": group,
                "buckets": [
                    {"t": index * win.bucket_seconds, **buckets[index].figures()}
                    for index in sorted(buckets)
                    if index >= first
                ],
            }
        )
        totals.append({"group": group, **whole.figures()})
    return {
        "window": win.name,
        "seconds": win.seconds,
        "bucket_seconds": win.bucket_seconds,
        "start": start,
        "end": start + win.seconds,
        "by": by,
        "groups": ranked,
        "series": out_series,
        "totals": totals,
    }


# ---------------------------------------------------------------------------- the live feed


def tokens_per_second(
    completion_tokens: int | None, latency_ms: float | None, ttft_ms: float | None
) -> float | None:
    """One request's generation speed (tokens after the first, over the time after it)."""
    if not completion_tokens or latency_ms is None or ttft_ms is None or latency_ms <= ttft_ms:
        return None
    return round(completion_tokens / ((latency_ms - ttft_ms) / 1000), 1)


def why(trace: Mapping[str, Any]) -> str:
    """One line saying why the request went where it went: its strongest signals, its margin
    over the runner-up, and what resilience did (retries, fallbacks, substitutions)."""
    node = trace.get("node_id")
    if node is None:
        error = trace.get("error_message")
        return "no node served it" + (f": {error}" if error else "")
    breakdown: Mapping[str, float] = trace.get("scores_breakdown") or {}
    parts = []
    strongest = sorted(
        ((v, k) for k, v in breakdown.items() if v > 0), key=lambda item: item[0], reverse=True
    )
    if strongest:
        parts.append(", ".join(f"{k} {round(v, 1):+g}" for v, k in strongest[:2]))
    weakest = min(((v, k) for k, v in breakdown.items()), default=None)
    if weakest is not None and weakest[0] <= -5:
        parts.append(f"{weakest[1]} {round(weakest[0], 1):+g}")
    runners = trace.get("runners_up") or []
    score = trace.get("score")
    if runners and score is not None:
        best = runners[0]
        margin = score - best["score"]
        parts.append(f"beat {best['node_id']} by {margin:.1f}")
    elif score is not None:
        parts.append("the only candidate")
    if trace.get("retry_count"):
        excluded = ", ".join(trace.get("excluded_nodes") or [])
        parts.append(
            f"after {trace['retry_count']} retr{'y' if trace['retry_count'] == 1 else 'ies'}"
            + (f" (left {excluded})" if excluded else "")
        )
    if trace.get("fallback_used"):
        parts.append("a fallback model")
    if trace.get("substitution") in SUBSTITUTIONS:
        parts.append(f"substituted ({trace['substitution']})")
    if trace.get("context_action") in ("stripped", "upgraded"):
        parts.append(f"context {trace['context_action']}")
    error = trace.get("error_message")
    if error and trace.get("status") != COMPLETED:
        parts.append(f"then: {error}"[:200])
    return "; ".join(parts) or "no score kept"


def feed_row(trace: Mapping[str, Any]) -> dict[str, Any]:
    """A live feed row from a trace's dict (:meth:`TraceRecord.as_dict` or a stored row)."""
    return {
        "request_id": trace["request_id"],
        "timestamp": trace["timestamp"],
        "asked": trace["original_model"],
        "served": trace["model"],
        "node_id": trace["node_id"],
        "status": trace["status"],
        "kind": trace["kind"],
        "latency_ms": round(trace["latency_ms"], 1),
        "ttft_ms": round(trace["time_to_first_token_ms"], 1)
        if trace["time_to_first_token_ms"] is not None
        else None,
        "tokens_per_second": tokens_per_second(
            trace["completion_tokens"], trace["latency_ms"], trace["time_to_first_token_ms"]
        ),
        "retry_count": trace["retry_count"],
        "fallback_used": bool(trace["fallback_used"]),
        "substitution": trace["substitution"],
        "tags": list(trace["tags"]),
        "error": trace["error_message"],
        "why": why(trace),
    }


# ---------------------------------------------------------------------------- node cards


def node_throughput(
    traces: Sequence[TraceRecord], now: float, window: float = 300.0, truncated: bool = False
) -> dict[str, dict[str, Any]]:
    """Per node, over the last ``window`` seconds of ``traces`` (oldest first, wall clock):
    requests, requests a minute, completion tokens a second (throughput), and the seconds
    actually covered. ``truncated`` says older traces were dropped (a bounded ring that is
    full): when the oldest kept is younger than the window, the figures are over the span the
    traces do cover, and ``seconds`` says so."""
    if not traces:
        return {}
    since = now - window
    covered = window
    if truncated and traces[0].timestamp > since:
        covered = max(1.0, now - traces[0].timestamp)
    out: dict[str, dict[str, Any]] = {}
    for trace in traces:
        if trace.timestamp < since or trace.node_id is None:
            continue
        entry = out.setdefault(trace.node_id, {"requests": 0, "tokens": 0})
        entry["requests"] += 1
        if trace.status == COMPLETED:
            entry["tokens"] += trace.completion_tokens or 0
    for entry in out.values():
        entry["seconds"] = round(covered, 1)
        entry["requests_per_minute"] = round(entry["requests"] * 60 / covered, 2)
        entry["tokens_per_second"] = round(entry.pop("tokens") / covered, 2)
    return out


# ---------------------------------------------------------------------------- benchmarks


def benchmark_summary(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per target (in the order first seen), over its measured requests (not its warm-up):
    requests, errors, TTFT and latency p50/p95, the median generation speed, the warm-up's
    latency (a cold load shows there) and the nodes that served. Each result is one request:
    ``target``, ``warmup``, ``ok``, ``ttft_ms``, ``latency_ms``, ``tokens_per_second``,
    ``node``."""
    order: list[str] = []
    by_target: dict[str, list[Mapping[str, Any]]] = {}
    for result in results:
        target = str(result["target"])
        if target not in by_target:
            order.append(target)
            by_target[target] = []
        by_target[target].append(result)
    out = []
    for target in order:
        rows = by_target[target]
        warm = [r for r in rows if r.get("warmup")]
        measured = [r for r in rows if not r.get("warmup")]
        ok = [r for r in measured if r.get("ok")]
        ttft = sorted(r["ttft_ms"] for r in ok if r.get("ttft_ms") is not None)
        latency = sorted(r["latency_ms"] for r in ok if r.get("latency_ms") is not None)
        rates = sorted(r["tokens_per_second"] for r in ok if r.get("tokens_per_second"))
        first = rows[0]
        entry: dict[str, Any] = {
            "target": target,
            "model": first.get("model_asked"),
            "node": first.get("node_asked"),
            "requests": len(measured),
            "errors": len(measured) - len(ok),
            "tokens_per_second": percentile(rates, 50),
            "warmup_ms": warm[0].get("latency_ms") if warm and warm[0].get("ok") else None,
            "served_by": sorted({str(r["node"]) for r in ok if r.get("node")}),
        }
        for p in (50, 95):
            entry[f"ttft_p{p}"] = percentile(ttft, p)
            entry[f"latency_p{p}"] = percentile(latency, p)
        out.append(entry)
    return out
