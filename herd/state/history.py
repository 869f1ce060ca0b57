"""Recent latency and speed per node:model, kept in memory for the scorer.

Bounded: the last :data:`WINDOW` completed requests per node:model. The scorer reads
``latency_p75_ms``, ``node_speed`` and ``model_p75_ms`` through a :class:`herd.core.scoring.History`
built from the live maps (no copy per request); they are recomputed only when a request
completes, and only for the model it used.

Spilled copies: a model running partly outside the accelerator (:mod:`herd.core.memory`,
seen in the node's heartbeats through :meth:`LatencyHistory.observe`) is slow because of where
it sits, not because of the node. Its requests count for that node:model (its latency p75 and
decode rate, which the scorer and the deadlines read), but not for the node's speed nor the
model's typical time, so the node's other models and the model's other nodes are not judged
by it. When a copy moves in or out of VRAM (a reload placed it differently) the samples of the
old placement are dropped: they describe another copy.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

import attrs

from herd.core.memory import SPILL_SHARE, offload
from herd.core.models import NodeReport
from herd.core.scoring import History

WINDOW = 100
TIMINGS = 20  # recent prefill and load speeds kept, per node:model and per node
MIN_LOAD_SECONDS = 0.5  # shorter loads say nothing reliable of a node's load speed


@attrs.define(eq=False)
class LatencyHistory:
    _latency: dict[tuple[str, str], deque[float]] = attrs.field(factory=dict)
    _rates: dict[tuple[str, str], deque[float]] = attrs.field(factory=dict)
    _served: dict[str, set[str]] = attrs.field(factory=dict)  # model -> nodes that served it
    # model -> node -> log of the node's median rate; model -> median of those (log)
    _model_rates: dict[str, dict[str, float]] = attrs.field(factory=dict)
    _fleet_log: dict[str, float] = attrs.field(factory=dict)
    _speed_sums: dict[str, list[float]] = attrs.field(factory=dict)
    # Timings the deadlines use (herd.core.policy.deadlines): per node:model prompt tokens read per
    # second, per node model bytes loaded per second.
    _prefill: dict[tuple[str, str], deque[float]] = attrs.field(factory=dict)
    _loads: dict[str, deque[float]] = attrs.field(factory=dict)
    # (node, model) pairs whose copy, as last seen in a heartbeat, is spilled.
    _spilled: set[tuple[str, str]] = attrs.field(factory=set)
    latency_p75_ms: dict[tuple[str, str], float] = attrs.field(factory=dict)
    # The same p75s by model, then node (History.latency_by_model): kept in step with
    # latency_p75_ms, so a view costs no copy.
    _p75_by_model: dict[str, dict[str, float]] = attrs.field(factory=dict)
    node_speed: dict[str, float] = attrs.field(factory=dict)
    model_p75_ms: dict[str, float] = attrs.field(factory=dict)

    def record(
        self, node_id: str, model: str, latency_ms: float, tokens_per_second: float | None
    ) -> None:
        window = self._latency.setdefault((node_id, model), deque(maxlen=WINDOW))
        window.append(latency_ms)
        ordered = sorted(window)
        p75 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.75))]
        self.latency_p75_ms[(node_id, model)] = p75
        self._p75_by_model.setdefault(model, {})[node_id] = p75
        self._served.setdefault(model, set()).add(node_id)
        if tokens_per_second and tokens_per_second > 0:
            self._rates.setdefault((node_id, model), deque(maxlen=WINDOW)).append(tokens_per_second)
            if (node_id, model) not in self._spilled:  # a spill is not the node's speed
                self._recompute_speed(node_id, model)
        self._recompute_typical(model)

    def observe(self, report: NodeReport) -> None:
        """A heartbeat: note which of the node's loaded models are spilled (see the module
        docstring); a copy whose placement changed loses its samples."""
        node_id = report.node_id
        for model in report.loaded_models:
            key = (node_id, model.name)
            spilled = offload(report, model) >= SPILL_SHARE
            if spilled == (key in self._spilled):
                continue
            if spilled:
                self._spilled.add(key)
            else:
                self._spilled.discard(key)
            if key in self._latency or key in self._rates:
                self._drop([key])

    def spilled(self, node_id: str, model: str) -> bool:
        """Was this node's copy of ``model`` spilled when last seen?"""
        return (node_id, model) in self._spilled

    def _recompute_speed(self, node: str, model: str) -> None:
        """A node's speed is the geometric mean, over the models it ran, of its rate for the
        model divided by the fleet's median rate for that model: a node that runs big (slow)
        models is not taken for a slow node.

        Kept as sums of logarithms per node (its rates, and the fleet medians it is compared
        with), so a record costs two medians plus one addition per node that ran the model,
        whatever the size of the fleet. Invariant: every node's fleet sum holds the current
        median of each model it ran."""
        log_rate = math.log(statistics.median(self._rates[(node, model)]))
        rates = self._model_rates.setdefault(model, {})
        first = node not in rates
        sums = self._speed_sums.setdefault(node, [0.0, 0.0, 0])  # log rates, log fleet, count
        sums[0] += log_rate - rates.get(node, 0.0)
        rates[node] = log_rate
        old = self._fleet_log.get(model)
        fleet = self._fleet_log[model] = statistics.median(rates.values())
        if first:  # a new model for this node: compare it with the new median from now on
            sums[1] += fleet
            sums[2] += 1
        moved: list[str] = []
        if old is not None and fleet != old:
            moved = [n for n in rates if n != node or not first]
            for other in moved:
                self._speed_sums[other][1] += fleet - old
        for other in {node, *moved}:
            total_rate, total_fleet, count = self._speed_sums[other]
            self.node_speed[other] = math.exp((total_rate - total_fleet) / count)

    def _recompute_typical(self, model: str) -> None:
        """The model's p75 on a node of speed 1.0: the median over the nodes that served it of
        their p75 times their speed. The scorer's estimate for a node that hasn't served it."""
        nodes = self._served.get(model, set())
        # Spilled copies say what a spill costs, not what the model takes: leave them out,
        # unless no other copy has run it.
        whole = [n for n in nodes if (n, model) not in self._spilled] or list(nodes)
        normalized = [
            self.latency_p75_ms[(node, model)] * self.node_speed.get(node, 1.0) for node in whole
        ]
        self.model_p75_ms[model] = statistics.median(normalized)

    def record_timings(
        self,
        node_id: str,
        model: str,
        *,
        prompt_tokens: int | None,
        prefill_seconds: float | None,
        load_seconds: float | None,
        model_bytes: int,
    ) -> None:
        """A completed request's prefill and (if it loaded the model) load speed."""
        if prompt_tokens and prefill_seconds and prefill_seconds > 0 and prompt_tokens >= 32:
            rates = self._prefill.setdefault((node_id, model), deque(maxlen=TIMINGS))
            rates.append(prompt_tokens / prefill_seconds)
        if load_seconds and load_seconds >= MIN_LOAD_SECONDS and model_bytes > 0:
            self._loads.setdefault(node_id, deque(maxlen=TIMINGS)).append(
                model_bytes / load_seconds
            )

    def prefill_rate(self, node_id: str, model: str) -> float | None:
        """Prompt tokens per second this node reads for this model (the median; the slower
        of two halves is no more trusted than the rest)."""
        rates = self._prefill.get((node_id, model))
        return statistics.median(rates) if rates else None

    def load_rate(self, node_id: str) -> float | None:
        """Model bytes per second this node loads (the median of its recent cold loads)."""
        rates = self._loads.get(node_id)
        return statistics.median(rates) if rates else None

    def decode_rate(self, node_id: str, model: str) -> float | None:
        """Tokens per second this node generates for this model (the median)."""
        rates = self._rates.get((node_id, model))
        return statistics.median(rates) if rates else None

    def forget(self, node_id: str) -> None:
        """Drop everything learned of ``node_id`` and recompute what depended on it (the
        fleet's medians, the other nodes' speeds, each model's typical time)."""
        self._loads.pop(node_id, None)
        self._spilled = {k for k in self._spilled if k[0] != node_id}
        keys = {k for k in (*self._latency, *self._rates, *self._prefill) if k[0] == node_id}
        self._drop(list(keys))

    def _drop(self, keys: list[tuple[str, str]]) -> None:
        """Forget the samples of these node:model pairs and recompute what depended on them."""
        for key in keys:
            self._latency.pop(key, None)
            self.latency_p75_ms.pop(key, None)
            on_nodes = self._p75_by_model.get(key[1])
            if on_nodes is not None:
                on_nodes.pop(key[0], None)
                if not on_nodes:
                    del self._p75_by_model[key[1]]
            self._rates.pop(key, None)
            self._prefill.pop(key, None)
            nodes = self._served.get(key[1])
            if nodes is not None:
                nodes.discard(key[0])
        self._model_rates.clear()
        self._fleet_log.clear()
        self._speed_sums.clear()
        self.node_speed.clear()
        for node, model in self._rates:
            if (node, model) not in self._spilled:
                self._recompute_speed(node, model)
        for model, nodes in list(self._served.items()):
            if nodes:
                self._recompute_typical(model)
            else:
                del self._served[model]
                self.model_p75_ms.pop(model, None)

    def view(self) -> History:
        return History(
            latency_p75_ms=self.latency_p75_ms,
            node_speed=self.node_speed,
            model_p75_ms=self.model_p75_ms,
            latency_by_model=self._p75_by_model,
        )
