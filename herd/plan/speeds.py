"""Speeds per node and model, learned from the recorded requests (:mod:`herd.plan.planner`,
step 2), and the estimates for the node:model pairs the recording says nothing of."""

from __future__ import annotations

import bisect
import collections
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from herd.core.models import KIND_TEXT
from herd.core.scoring import ScoringSettings
from herd.plan.inputs import NodeFacts, RecordedRequest
from herd.plan.trace import TraceBuild
from herd.sim.costs import CONTENTION
from herd.sim.virtual import percentile

GiB = 2**30
# Defaults when nothing of the fleet was measured: speed per byte of model (decoding is
# memory-bound, prefill compute-bound), as an M-series "Pro" class machine: an 8B model at Q4
# (4.9 GiB) decodes ~40 tokens/s and reads ~600 prompt tokens/s.
DEFAULT_DECODE_BYTES = 40.0 * 4.9 * GiB  # tokens/s x model bytes
DEFAULT_PREFILL_BYTES = 600.0 * 4.9 * GiB
DEFAULT_LOAD_BYTES_PER_SECOND = 1.0 * GiB  # disk to memory, with the runner's start
MAX_RATE = 1e6  # tokens/s: faster than this is "instant" in the recording
MIN_PREFILL_TOKENS = 32  # shorter prompts say nothing reliable of a prefill rate


@attrs.frozen
class ModelSpeed:
    """How fast one node runs one model."""

    decode: float  # tokens/s, one stream alone
    prefill: float  # prompt tokens/s
    load_seconds: float  # a cold load
    samples: int = 0  # completed requests it was learned from
    source: str = "measured"  # "measured", "estimated" (from the rest of the fleet), "preset"

    def as_dict(self) -> dict[str, Any]:
        return {
            "decode_tokens_per_second": round(self.decode, 2),
            "prefill_tokens_per_second": round(self.prefill, 1),
            "load_seconds": round(self.load_seconds, 2),
            "samples": self.samples,
            "source": self.source,
        }


@attrs.frozen
class Learned:
    """What the recording says of one node:model; None where it says nothing."""

    decode: float | None = None
    prefill: float | None = None
    load_seconds: float | None = None
    samples: int = 0


@attrs.frozen
class Speeds:
    """What the recorded traffic says of each node:model, and how to guess the rest."""

    learned: dict[tuple[str, str], Learned]
    node_speed: dict[str, float]  # relative decoding speed (1.0 = the median node)
    # Per model, its rates on a node of relative speed 1.0.
    model_decode: dict[str, float]
    model_prefill: dict[str, float]
    # Rates times model bytes on a node of speed 1.0, for models never seen.
    decode_bytes: float = DEFAULT_DECODE_BYTES
    prefill_bytes: float = DEFAULT_PREFILL_BYTES
    load_rates: dict[str, float] = attrs.field(factory=dict)  # node -> bytes/s
    fleet_load_rate: float = DEFAULT_LOAD_BYTES_PER_SECOND

    def speed(self, node: str, model: str, size_bytes: int, embedding: bool = False) -> ModelSpeed:
        """The recorded speed of ``model`` on ``node``, each part the recording doesn't give
        estimated from the rest of the fleet (see the module doc)."""
        known = self.learned.get((node, model), Learned())
        relative = self.node_speed.get(node, 1.0)
        size = max(size_bytes, 1)
        decode = known.decode
        if decode is None:
            decode = self.model_decode.get(model, self.decode_bytes / size) * relative
        prefill = known.prefill
        if prefill is None:
            prefill = self.model_prefill.get(model, self.prefill_bytes / size) * relative
        load = known.load_seconds
        if load is None:
            load = size / self.load_rates.get(node, self.fleet_load_rate)
        main = known.prefill if embedding else known.decode
        return ModelSpeed(
            decode, prefill, load, known.samples, "measured" if main is not None else "estimated"
        )


def _key(request: RecordedRequest) -> tuple[str, str]:
    return (str(request.node_id), request.model)


def _grouped(pairs: Iterable[tuple[tuple[str, str], float]]) -> dict[tuple[str, str], list[float]]:
    groups: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for key, value in pairs:
        groups[key].append(value)
    return groups


def _active_streams(windows: Sequence[tuple[float, float]]) -> list[float]:
    """For each (start, end) window, the mean number of windows open during it (itself
    included; at least 1). A sweep over the step function of open windows: O(n log n)."""
    events = sorted([(s, 1) for s, e in windows if e > s] + [(e, -1) for s, e in windows if e > s])
    times: list[float] = []
    counts: list[int] = []  # open windows from times[k] on
    integral: list[float] = []  # open-window seconds up to times[k]
    open_now, total, last = 0, 0.0, -math.inf
    for moment, step in events:
        if times and moment == last:
            open_now += step
            counts[-1] = open_now
            continue
        if times:
            total += counts[-1] * (moment - last)
        open_now += step
        times.append(moment)
        counts.append(open_now)
        integral.append(total)
        last = moment

    def area(t: float) -> float:
        k = bisect.bisect_right(times, t) - 1
        return 0.0 if k < 0 else integral[k] + counts[k] * (t - times[k])

    return [max(1.0, (area(e) - area(s)) / (e - s)) if e > s else 1.0 for s, e in windows]


def learn_speeds(
    build: TraceBuild,
    nodes: Sequence[NodeFacts],
    thermal_loaded: float = ScoringSettings().thermal_loaded,
) -> Speeds:
    """Speeds per node:model from the replayed requests; see the module doc (2)."""
    fleet_sizes = {m.name: m.size_bytes for n in nodes for m in n.models}
    sizes = {(n.node_id, m.name): m.size_bytes for n in nodes for m in n.models}

    def size_of(key: tuple[str, str]) -> int:
        return sizes.get(key) or fleet_sizes.get(key[1], 0)

    requests = build.requests
    done = [
        i
        for i, r in enumerate(requests)
        if r.completed and r.node_id is not None and r.ttft is not None
    ]

    def hot(r: RecordedRequest) -> bool:
        return r.thermal is None or r.thermal >= thermal_loaded - 1e-9

    # Decoding as seen: each request's rate (the first token came with the TTFT).
    seen: dict[int, float] = {}
    for i in done:
        r = requests[i]
        generating = r.latency - (r.ttft or 0.0)
        tokens = (r.completion_tokens or 0) - 1
        if r.kind == KIND_TEXT and tokens >= 1 and generating > 0:
            seen[i] = min(MAX_RATE, tokens / generating)
    seen_rate = {
        key: statistics.median(v)
        for key, v in _grouped((_key(requests[i]), rate) for i, rate in seen.items()).items()
    }

    def first_token(r: RecordedRequest) -> float:
        rate = seen_rate.get(_key(r))
        return 1.0 / rate if r.kind == KIND_TEXT and rate else 0.0

    def uncached(i: int) -> int:
        return max(0, (requests[i].prompt_tokens or 0) - build.cached.get(i, 0))

    # Prefill, from the requests the router sent to a hot model.
    prefill: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for i in done:
        r = requests[i]
        if hot(r) and uncached(i) >= MIN_PREFILL_TOKENS:
            seconds = (r.ttft or 0.0) - first_token(r)
            rate = MAX_RATE if seconds <= 0 else min(MAX_RATE, uncached(i) / seconds)
            prefill[_key(r)].append(rate)
    prefill_rate = {key: percentile(v, 0.8) for key, v in prefill.items()}

    def prefill_seconds(i: int) -> float:
        rate = prefill_rate.get(_key(requests[i]), 0.0)
        return uncached(i) / rate if rate > 0 else 0.0

    # Decoding alone: each rate corrected for the streams that shared the node while it ran
    # (from its prefill to its last token, as the virtual node counts them).
    by_node: dict[str, list[int]] = collections.defaultdict(list)
    for i in done:
        by_node[str(requests[i].node_id)].append(i)
    decode: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for indices in by_node.values():
        windows = []
        for i in indices:
            r = requests[i]
            ttft = r.ttft or 0.0
            windows.append(
                (r.arrival + ttft - min(ttft, prefill_seconds(i)), r.arrival + r.latency)
            )
        for i, active in zip(indices, _active_streams(windows), strict=True):
            if i in seen:
                factor = 1.0 + CONTENTION * (active - 1.0)
                decode[_key(requests[i])].append(seen[i] * factor)
    decode_rate = {key: statistics.median(v) for key, v in decode.items()}

    # Cold loads: TTFT less the prefill, for requests the router sent to a cold model.
    loads: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for i in done:
        r = requests[i]
        seconds = (r.ttft or 0.0) - prefill_seconds(i) - first_token(r)
        if not hot(r) and seconds > 0:
            loads[_key(r)].append(seconds)
    load_seconds = {key: percentile(v, 0.75) for key, v in loads.items()}
    node_load_rates: dict[str, list[float]] = collections.defaultdict(list)
    for key, seconds in load_seconds.items():
        if size_of(key) > 0:
            node_load_rates[key[0]].append(size_of(key) / seconds)
    load_rates = {node: statistics.median(v) for node, v in node_load_rates.items()}
    every_rate = [rate for v in node_load_rates.values() for rate in v]

    # Relative node speeds: the geometric mean of a node's rate over each model's median rate
    # (as the router's LatencyHistory does), so a node that runs big models isn't "slow".
    medians = {
        model: statistics.median(v for (_, m), v in decode_rate.items() if m == model)
        for model in {m for _, m in decode_rate}
    }
    logs: dict[str, list[float]] = collections.defaultdict(list)
    for (node, model), rate in decode_rate.items():
        logs[node].append(math.log(rate / medians[model]))
    node_speed = {node: math.exp(statistics.fmean(v)) for node, v in logs.items()}

    def normalised(rates: Mapping[tuple[str, str], float]) -> dict[str, float]:
        per_model: dict[str, list[float]] = collections.defaultdict(list)
        for (node, model), rate in rates.items():
            if rate < MAX_RATE:
                per_model[model].append(rate / node_speed.get(node, 1.0))
        return {model: statistics.median(v) for model, v in per_model.items()}

    model_decode, model_prefill = normalised(decode_rate), normalised(prefill_rate)

    def per_byte(rates: Mapping[str, float], default: float) -> float:
        values = [rate * fleet_sizes[m] for m, rate in rates.items() if fleet_sizes.get(m, 0) > 0]
        return statistics.median(values) if values else default

    counts = collections.Counter((str(requests[i].node_id), requests[i].model) for i in done)
    learned = {
        key: Learned(
            decode_rate.get(key), prefill_rate.get(key), load_seconds.get(key), counts[key]
        )
        for key in set(decode_rate) | set(prefill_rate) | set(load_seconds)
    }
    return Speeds(
        learned=learned,
        node_speed=node_speed,
        model_decode=model_decode,
        model_prefill=model_prefill,
        decode_bytes=per_byte(model_decode, DEFAULT_DECODE_BYTES),
        prefill_bytes=per_byte(model_prefill, DEFAULT_PREFILL_BYTES),
        load_rates=load_rates,
        fleet_load_rate=statistics.median(every_rate)
        if every_rate
        else DEFAULT_LOAD_BYTES_PER_SECOND,
    )
