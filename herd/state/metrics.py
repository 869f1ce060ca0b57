"""``/metrics``: Prometheus text exposition (format 0.0.4) of the router's own figures.

Counters and histograms are updated once per finished request (in ``RouterState.record_trace``),
never per chunk; gauges (queues, node states) are read from the live objects at scrape time.
Every label value comes from the fleet (node ids, the models nodes have), never from what a
client typed, and a forgotten node's series go with it: the number of series stays bounded.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping

import attrs

from herd.core import memory
from herd.core.models import FleetSnapshot, NodeStatus, QueueStatistics
from herd.core.traces import TraceRecord

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OTHER_MODEL = "(other)"  # the label of models no node has
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Mapping[str, str]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items()) + "}"


@attrs.define
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = attrs.field(init=False)
    total: float = 0.0
    count: int = 0

    def __attrs_post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1

    def lines(self, name: str, labels: Mapping[str, str]) -> Iterable[str]:
        for bound, count in zip(self.buckets, self.counts, strict=True):
            yield f"{name}_bucket{_labels({**labels, 'le': repr(bound)})} {count}"
        yield f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {self.count}"
        yield f"{name}_sum{_labels(labels)} {self.total}"
        yield f"{name}_count{_labels(labels)} {self.count}"


@attrs.define(eq=False)
class Metrics:
    requests: collections.Counter[tuple[str, str, str, str]] = attrs.field(
        factory=collections.Counter
    )  # (model, node, status, kind)
    tokens: collections.Counter[tuple[str, str]] = attrs.field(
        factory=collections.Counter
    )  # (model, direction)
    latency: dict[str, Histogram] = attrs.field(factory=dict)  # by kind
    ttft: dict[str, Histogram] = attrs.field(factory=dict)

    def observe(self, trace: TraceRecord, model_known: Callable[[str], bool]) -> None:
        """Count a finished request. Its model labels the series only if it is a model the
        fleet has (a request that reached a node, or ``model_known``): names clients invent
        count as :data:`OTHER_MODEL`, so a stream of 404s can't grow the series."""
        model = trace.model
        if trace.node_id is None and not model_known(model):
            model = OTHER_MODEL
        self.requests[(model, trace.node_id or "", trace.status, trace.kind)] += 1
        if trace.prompt_tokens:
            self.tokens[(model, "prompt")] += trace.prompt_tokens
        if trace.completion_tokens:
            self.tokens[(model, "completion")] += trace.completion_tokens
        if trace.status == "completed":
            self.latency.setdefault(trace.kind, Histogram(LATENCY_BUCKETS)).observe(
                trace.latency_ms / 1000
            )
            if trace.time_to_first_token_ms is not None:
                self.ttft.setdefault(trace.kind, Histogram(TTFT_BUCKETS)).observe(
                    trace.time_to_first_token_ms / 1000
                )

    def forget(self, node_id: str) -> None:
        """Drop a forgotten node's series."""
        for key in [k for k in self.requests if k[1] == node_id]:
            del self.requests[key]

    def render(
        self,
        fleet: FleetSnapshot,
        queues: QueueStatistics,
        events: Mapping[str, int],
        traces: Mapping[str, int] | None = None,
    ) -> str:
        """``traces``: the trace store's counters (``dropped``, ``failed``, ``written``)."""
        out: list[str] = []

        def family(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        family("herd_requests_total", "counter", "Routed requests by outcome.")
        for (model, node_name, status, kind), n in sorted(self.requests.items()):
            labels = {"model": model, "node": node_name, "status": status, "kind": kind}
            out.append(f"herd_requests_total{_labels(labels)} {n}")
        family("herd_tokens_total", "counter", "Tokens processed, prompt and completion.")
        for (model, direction), n in sorted(self.tokens.items()):
            out.append(f"herd_tokens_total{_labels({'model': model, 'direction': direction})} {n}")
        family(
            "herd_request_duration_seconds",
            "histogram",
            "Latency of completed requests, request to last byte.",
        )
        for kind, histogram in sorted(self.latency.items()):
            out.extend(histogram.lines("herd_request_duration_seconds", {"kind": kind}))
        family(
            "herd_time_to_first_token_seconds",
            "histogram",
            "Time from request to the backend's first byte, completed requests.",
        )
        for kind, histogram in sorted(self.ttft.items()):
            out.extend(histogram.lines("herd_time_to_first_token_seconds", {"kind": kind}))
        family(
            "herd_events_total",
            "counter",
            "Resilience events: retries, fallbacks, context protection, reaps, pre-warms.",
        )
        for event, n in sorted(events.items()):
            out.append(f"herd_events_total{_labels({'event': event})} {n}")
        family(
            "herd_traces_total",
            "counter",
            "Request traces by what became of them: written to the store, dropped (queue "
            "full), failed (the write failed: disk full, read-only).",
        )
        for outcome, n in sorted((traces or {}).items()):
            out.append(f"herd_traces_total{_labels({'outcome': outcome})} {n}")
        family("herd_queue_pending", "gauge", "Requests waiting for a slot, per node:model.")
        family_in_flight: list[str] = []
        for key, counters in sorted(queues.queues.items()):
            node_id, _, model = key.partition(":")
            labels = {"node": node_id, "model": model, "kind": str(counters["kind"])}
            out.append(f"herd_queue_pending{_labels(labels)} {counters['pending']}")
            family_in_flight.append(
                f"herd_queue_in_flight{_labels(labels)} {counters['in_flight']}"
            )
        family("herd_queue_in_flight", "gauge", "Requests being served, per node:model.")
        out.extend(family_in_flight)
        family("herd_node_status", "gauge", "1 for each node's current state.")
        for node in fleet.nodes:
            for status in NodeStatus:
                value = 1 if node.status is status else 0
                labels = {"node": node.node_id, "status": status.value}
                out.append(f"herd_node_status{_labels(labels)} {value}")
        family("herd_models_loaded", "gauge", "Models loaded in memory, per node.")
        for node in fleet.nodes:
            out.append(
                f"herd_models_loaded{_labels({'node': node.node_id})} "
                f"{len(node.report.loaded_models)}"
            )
        self._accelerators(fleet, family, out)
        return "\n".join(out) + "\n"

    def _accelerators(
        self, fleet: FleetSnapshot, family: Callable[[str, str, str], None], out: list[str]
    ) -> None:
        """Per device (the first :data:`~herd.core.memory.MAX_DEVICES` a node reports):
        memory, utilisation and temperature where the device gives them; per loaded model, the
        share of it outside the accelerator."""
        rows: dict[str, list[str]] = {
            "herd_gpu_memory_total_bytes": [],
            "herd_gpu_memory_used_bytes": [],
            "herd_gpu_utilization_ratio": [],
            "herd_gpu_temperature_celsius": [],
        }
        for node in fleet.nodes:
            for gpu in node.report.gpus[: memory.MAX_DEVICES]:
                labels = _labels(
                    {"node": node.node_id, "gpu": str(gpu.index), "name": gpu.name[:120]}
                )
                rows["herd_gpu_memory_total_bytes"].append(f"{labels} {gpu.memory_total_bytes}")
                rows["herd_gpu_memory_used_bytes"].append(f"{labels} {gpu.memory_used_bytes}")
                if gpu.utilization_percent is not None:
                    ratio = gpu.utilization_percent / 100
                    rows["herd_gpu_utilization_ratio"].append(f"{labels} {ratio}")
                if gpu.temperature_c is not None:
                    rows["herd_gpu_temperature_celsius"].append(f"{labels} {gpu.temperature_c}")
        helps = {
            "herd_gpu_memory_total_bytes": "Accelerator memory per device (on unified memory: "
            "the GPU's working-set limit).",
            "herd_gpu_memory_used_bytes": "Accelerator memory in use per device.",
            "herd_gpu_utilization_ratio": "Accelerator busy share per device, 0..1.",
            "herd_gpu_temperature_celsius": "Accelerator temperature per device.",
        }
        for name, lines in rows.items():
            family(name, "gauge", helps[name])
            out.extend(name + line for line in lines)
        family(
            "herd_model_offload_ratio",
            "gauge",
            "Share of each loaded model outside the accelerator (0 = all in VRAM; above 0 on a "
            "GPU node: spilled, running partly on the CPU).",
        )
        for node in fleet.nodes:
            for model in node.report.loaded_models:
                share = memory.offload(node.report, model)
                labels = _labels({"node": node.node_id, "model": model.name})
                out.append(f"herd_model_offload_ratio{labels} {round(share, 4)}")
