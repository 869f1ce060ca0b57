"""Recent latency and speed per node:model, kept in memory for the scorer.

Bounded: the last :data:`WINDOW` completed requests per node:model. The scorer reads
``latency_p75_ms``, ``node_speed`` and ``model_p75_ms`` through a :class:`herd.scoring.History`
built from the live maps (no copy per request); they are recomputed only when a request
completes, and only for the model it used.
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
    _rates: dict[tuple[str, str], deque[float]] = attrs.field(factory=dict)
    _relative: dict[tuple[str, str], float] = attrs.field(factory=dict)  # rate / fleet median
    _served: dict[str, set[str]] = attrs.field(factory=dict)  # model -> nodes that served it
    latency_p75_ms: dict[tuple[str, str], float] = attrs.field(factory=dict)
    node_speed: dict[str, float] = attrs.field(factory=dict)
    model_p75_ms: dict[str, float] = attrs.field(factory=dict)

    def record(
        self, node_id: str, model: str, latency_ms: float, tokens_per_second: float | None
    ) -> None:
        window = self._latency.setdefault((node_id, model), deque(maxlen=WINDOW))
        window.append(latency_ms)
        ordered = sorted(window)
        self.latency_p75_ms[(node_id, model)] = ordered[
            min(len(ordered) - 1, int(len(ordered) * 0.75))
        ]
        self._served.setdefault(model, set()).add(node_id)
        if tokens_per_second and tokens_per_second > 0:
            self._rates.setdefault((node_id, model), deque(maxlen=WINDOW)).append(tokens_per_second)
            self._recompute_speed(model)
        self._recompute_typical(model)

    def _recompute_speed(self, model: str) -> None:
        """A node's speed is the median, over the models it ran, of its rate for the model
        divided by the fleet's median rate for that model: a node that runs big (slow) models
        is not taken for a slow node."""
        medians = {
            node: statistics.median(self._rates[(node, model)])
            for node in self._served.get(model, ())
            if self._rates.get((node, model))
        }
        fleet = statistics.median(medians.values()) if medians else 0.0
        if fleet <= 0:
            return
        for node, rate in medians.items():
            self._relative[(node, model)] = rate / fleet
        for node in medians:
            ratios = [v for (n, _), v in self._relative.items() if n == node]
            self.node_speed[node] = statistics.median(ratios)

    def _recompute_typical(self, model: str) -> None:
        """The model's p75 on a node of speed 1.0: the median over the nodes that served it of
        their p75 times their speed. The scorer's estimate for a node that hasn't served it."""
        normalized = [
            self.latency_p75_ms[(node, model)] * self.node_speed.get(node, 1.0)
            for node in self._served.get(model, ())
        ]
        self.model_p75_ms[model] = statistics.median(normalized)

    def view(self) -> History:
        return History(
            latency_p75_ms=self.latency_p75_ms,
            node_speed=self.node_speed,
            model_p75_ms=self.model_p75_ms,
        )
