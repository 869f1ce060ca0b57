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


# The columns of one row, in this order (see herd.store.queries.series_rows):
# (bucket index, status, node_id, model, latency_ms, ttft_ms, completion_tokens,
#  retry_count, fallback_used, substitution, tags JSON or None)
Row = tuple[Any, ...]
_BUCKET, _STATUS, _NODE, _MODEL, _LATENCY, _TTFT, _TOKENS, _RETRIES, _FALLBACK, _SUBST, _TAGS = (
    range(11)
)


def figures(rows: Sequence[Row]) -> dict[str, Any]:
    """Every figure of one bucket (or one whole window) of rows."""
    done = [r for r in rows if r[_STATUS] == COMPLETED]
    latencies = sorted(r[_LATENCY] for r in done if r[_LATENCY] is not None)
    ttfts = sorted(r[_TTFT] for r in done if r[_TTFT] is not None)
    generating = [
        (r[_TOKENS], r[_LATENCY] - r[_TTFT])
        for r in done
        if r[_TOKENS] and r[_TTFT] is not None and r[_LATENCY] > r[_TTFT]
    ]
    gen_tokens = sum(t for t, _ in generating)
    gen_ms = sum(ms for _, ms in generating)
    out: dict[str, Any] = {
        "requests": len(rows),
        "completed": len(done),
        "errors": sum(1 for r in rows if r[_STATUS] in ERROR_STATUSES),
        "disconnects": sum(1 for r in rows if r[_STATUS] == "client_disconnected"),
        "retries": sum(r[_RETRIES] or 0 for r in rows),
        "fallbacks": sum(1 for r in rows if r[_FALLBACK]),
        "substitutions": sum(1 for r in rows if r[_SUBST] in SUBSTITUTIONS),
        "completion_tokens": sum(r[_TOKENS] or 0 for r in done),
        "tokens_per_second": round(gen_tokens / (gen_ms / 1000), 2) if gen_ms > 0 else None,
    }
    for p in PERCENTILES:
        lat, first = percentile(latencies, p), percentile(ttfts, p)
        out[f"latency_p{p}"] = round(lat, 1) if lat is not None else None
        out[f"ttft_p{p}"] = round(first, 1) if first is not None else None
    return out


def _tags(raw: Any) -> list[str]:
    try:
        tags = json.loads(raw) if raw else []
    except ValueError:
        return [UNTAGGED]
    clean = [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []
    return clean or [UNTAGGED]


def _keyed(rows: Iterable[Row], by: str, tag: str | None) -> Iterable[tuple[str, Row]]:
    """Each row with its group (a row with several tags once per tag); with ``tag``, only the
    rows carrying it."""
    if by == "none" and tag is None:
        return ((ALL, r) for r in rows)
    if by == "node":
        pairs: Iterable[tuple[str, Row]] = ((r[_NODE] or NO_NODE, r) for r in rows)
    elif by == "model":
        pairs = ((r[_MODEL], r) for r in rows)
    elif by == "tag":
        pairs = ((t, r) for r in rows for t in _tags(r[_TAGS]))
    else:
        pairs = ((ALL, r) for r in rows)
    if tag is not None:
        pairs = ((g, r) for g, r in pairs if tag in _tags(r[_TAGS]))
    return pairs


def series(
    rows: Iterable[Row],
    win: Window,
    start: float,
    by: str = "none",
    tag: str | None = None,
    max_groups: int = MAX_GROUPS,
) -> dict[str, Any]:
    """Fold rows (bucket index first, see :data:`Row`) into per-group series and per-group
    totals for the window starting at ``start``. Raises ValueError for an unknown ``by``."""
    if by not in BREAKDOWNS:
        raise ValueError(f"unknown breakdown {by!r}; choose one of {', '.join(BREAKDOWNS)}")
    grouped: dict[str, dict[int, list[Row]]] = {}
    for group, row in _keyed(rows, by, tag):
        buckets = grouped.get(group)
        if buckets is None:
            buckets = grouped[group] = {}
        bucket = buckets.get(row[_BUCKET])
        if bucket is None:
            buckets[row[_BUCKET]] = [row]
        else:
            bucket.append(row)
    ranked = sorted(grouped, key=lambda g: (-sum(map(len, grouped[g].values())), g))
    if len(ranked) > max_groups:
        merged: dict[int, list[Row]] = {}
        for group in ranked[max_groups:]:
            for index, bucket_rows in grouped.pop(group).items():
                merged.setdefault(index, []).extend(bucket_rows)
        grouped[OTHER] = merged
        ranked = [*ranked[:max_groups], OTHER]
    first = int(start) // win.bucket_seconds
    out_series = []
    totals = []
    for group in ranked:
        buckets = grouped[group]
        out_series.append(
            {
                "group": group,
                "buckets": [
                    {"t": index * win.bucket_seconds, **figures(buckets[index])}
                    for index in sorted(buckets)
                    if index >= first
                ],
            }
        )
        totals.append({"group": group, **figures([r for b in buckets.values() for r in b])})
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
    return "; ".join(parts) or "scored"


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
