"""Recent latency and speed per node:model, kept in memory for the scorer.

Bounded: the last :data:`WINDOW` completed requests per node:model. The scorer reads
``latency_p75_ms`` and ``node_speed`` through a :class:`herd.scoring.History` built from the live
maps (no copy per request); both are recomputed only when a request completes.
"""

from __future__ import annotations

import statistics
from collections import deque

import attrs

from herd.scoring import History

WINDOW = 100


@attrs.define(eq=False)
class LatencyHistory:
    _latency: dict[tuple[str, str], deque[float]] = attrs.field(factory=dict)
    _rates: dict[str, deque[float]] = attrs.field(factory=dict)
    latency_p75_ms: dict[tuple[str, str], float] = attrs.field(factory=dict)
    node_speed: dict[str, float] = attrs.field(factory=dict)

    def record(
        self, node_id: str, model: str, latency_ms: float, tokens_per_second: float | None
    ) -> None:
        window = self._latency.setdefault((node_id, model), deque(maxlen=WINDOW))
        window.append(latency_ms)
        ordered = sorted(window)
        self.latency_p75_ms[(node_id, model)] = ordered[
            min(len(ordered) - 1, int(len(ordered) * 0.75))
        ]
        if tokens_per_second and tokens_per_second > 0:
            self._rates.setdefault(node_id, deque(maxlen=WINDOW)).append(tokens_per_second)
            self._recompute_speed()

    def _recompute_speed(self) -> None:
        medians = {node: statistics.median(r) for node, r in self._rates.items() if r}
        if not medians:
            return
        fleet = statistics.median(medians.values())
        if fleet <= 0:
            return
        self.node_speed.clear()
        self.node_speed.update({node: m / fleet for node, m in medians.items()})

    def view(self) -> History:
        return History(latency_p75_ms=self.latency_p75_ms, node_speed=self.node_speed)
