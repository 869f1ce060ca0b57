"""The what-if planner: the operator's own recorded traffic, replayed on a virtual copy of the
fleet with changes, side by side with the replay of the fleet as it is.

Rules
-----
- Values in, values out. :func:`plan` takes the recorded requests (:class:`RecordedRequest`,
  read from ``latency.db`` by :mod:`herd.plan.sources`), the nodes' last reports
  (:class:`NodeFacts`) and the router's settings, and returns a :class:`Plan`. Nothing here
  opens the store, asks the router or reads a clock; the replays run on their own virtual
  clocks (:func:`herd.plan.replay.run_detailed`). A time budget comes in as ``abandon``.
- Bad input is a :class:`PlanError` (a ``ValueError``) whose message names the value: an
  unknown node, preset or model, a model that doesn't fit, a change that contradicts itself.
- Every estimate says where it came from (``source`` of each :class:`ModelSpeed`), and every
  request the replay leaves out is counted in :attr:`TraceBuild.skipped`: the planner never
  answers silently from less than it was given.

Theory of operation
-------------------
1. **The trace.** Text and embedding requests are replayed; image and speech-to-text requests
   are counted and left out. A request whose winning node got conversation-affinity points
   continues an earlier request on that node, for the same model and tags, that had finished
   by then: the latest one whose prompt and answer its prompt holds (else the latest). The two
   are turns of one session, and the later one is sent the recorded think time after the
   earlier one's answer. Everything else arrives at its recorded time.
   Missing token counts (failed requests) are the model's median.
2. **Speeds**, per node and model, from the completed requests (:func:`learn_speeds`):
   decoding is ``completion tokens / (latency - TTFT)``, corrected for the streams that shared
   the node meanwhile (the virtual node charges the same contention back, see
   :mod:`herd.sim.costs`), so the no-change replay reproduces the rates that were seen; prefill
   is the 80th percentile of ``uncached prompt tokens / TTFT`` over requests the router found
   hot (queueing and loads only make a TTFT longer); a cold load's time is TTFT minus prefill
   for the requests the router sent to a cold model. A node:model never seen gets the model's
   fleet speed scaled by the node's relative speed; a model never seen anywhere gets the
   fleet's speed per byte of model.
3. **The fleet** is built from the reports: memory, slots, the models on disk with their sizes,
   the models loaded now (the fleet starts with them: what was loaded when the window opened
   is not recorded). Changes (:data:`Change`) are applied to that: add a node from a
   :data:`PRESETS` entry or as a copy of one, remove one, pin or unload a model, set slots, turn
   substitution on or off.
4. **Replays**: the no-change fleet and each scenario, with herd's own scorer, registry and
   queues, models kept loaded until evicted (herd asks for ``keep_alive: -1``).
5. **Figures** (:class:`Figures`): p50 / p95 latency and time to first token of completed
   requests, errors, cold starts (requests that waited for a model load), loads, evictions,
   substitutions, requests per node. The recording gets the same figures (cold starts there are
   requests the router sent to a node without the model loaded).
6. **Fidelity** (:func:`fidelity`): the no-change replay *matches* the recording when each of
   its p50 and p95 latency and TTFT is within :data:`FIDELITY_SHARE` of the recorded figure or
   within :data:`FIDELITY_SLACK_S` seconds of it. When it doesn't, the plan says so: the
   changes' effects are then less trustworthy (the fleet does something the model of a node
   leaves out, see :data:`LIMITS`).
"""

from __future__ import annotations

import bisect
import collections
import math
import statistics
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from herd.core.models import KIND_EMBED, KIND_TEXT, NodeReport, normalize_model_name
from herd.core.scoring import ScoringSettings
from herd.plan.replay import Outcome, ReplayAbandoned, Replayed, Session, Turn, run_detailed
from herd.sim.costs import CONTENTION
from herd.sim.server import SimConfig, SimModel
from herd.sim.virtual import OS_SHARE, percentile

GiB = 2**30
REPLAYED_KINDS = (KIND_TEXT, KIND_EMBED)
MAX_REQUESTS = 20_000  # the most recent requests of the window a plan replays, by default
MAX_CHANGES = 16
MAX_SLOTS = 64
FIDELITY_SHARE = 0.25
FIDELITY_SLACK_S = 0.25
# Defaults when nothing of the fleet was measured: speed per byte of model (decoding is
# memory-bound, prefill compute-bound), as an M-series "Pro" class machine: an 8B model at Q4
# (4.9 GiB) decodes ~40 tokens/s and reads ~600 prompt tokens/s.
DEFAULT_DECODE_BYTES = 40.0 * 4.9 * GiB  # tokens/s x model bytes
DEFAULT_PREFILL_BYTES = 600.0 * 4.9 * GiB
DEFAULT_LOAD_BYTES_PER_SECOND = 1.0 * GiB  # disk to memory, with the runner's start
DEFAULT_PROMPT_TOKENS = 200
DEFAULT_COMPLETION_TOKENS = 200
MAX_RATE = 1e6  # tokens/s: faster than this is "instant" in the recording
MIN_PREFILL_TOKENS = 32  # shorter prompts say nothing reliable of a prefill rate
FOLLOW_WINDOW_S = 3600.0
WIDTH = (
    96  # of the text rendering  # a continuation is looked for among turns that ended this recently
)

LIMITS = (
    "A virtual node is a set of request slots with, per model, a decoding rate, a prefill rate "
    "and a load time learned from your traces, memory that holds the models loaded, and "
    "least-recently-used eviction. Concurrent streams slow each other as in herd's simulator.",
    "Left out: thermal throttling; other programs using the machine; memory shared between GPU "
    "and CPU (a model that spills out of VRAM runs at the speed measured, not slower); the "
    "operating system's page cache (every load after an eviction costs a full load); network "
    "time between the router and the nodes; node failures, restarts and hung backends (errors "
    "that happened are not replayed as failures); client retries; context-window reloads.",
    "Ollama's own details are simplified: its prompt cache is modelled as the last 8 prompts "
    "per loaded model, its eviction picks the least recently used idle model (Ollama also "
    "weighs keep-alive), and a request's own keep_alive is taken to be herd's -1.",
    "Conversations are recognised from the router's conversation-affinity points; a "
    "conversation that moved to another node is replayed as separate sessions. Later turns "
    "arrive the recorded think time after the previous answer; everything else arrives when it "
    "did. Image and speech-to-text requests are not replayed.",
    "The fleet starts with the models loaded now. A node:model with no traffic in the window "
    "gets an estimated speed; presets get figures from their hardware's memory bandwidth and "
    "compute, so a copy of a node you have (copy:NODE) predicts better than a preset.",
)


class PlanError(ValueError):
    """A plan can't be made as asked; the message names the offending value."""


class PlanAbandoned(Exception):
    """The plan was stopped before it finished (its time budget, or its client went away)."""


# --- inputs ---------------------------------------------------------------------------------


@attrs.frozen
class RecordedRequest:
    """One request as the trace store recorded it (the fields the planner reads)."""

    arrival: float  # wall clock, epoch seconds
    model: str  # what served (what was asked, when nothing served)
    kind: str = KIND_TEXT
    status: str = "completed"
    node_id: str | None = None
    latency: float = 0.0  # seconds, arrival to the last byte
    ttft: float | None = None  # seconds, arrival to the first byte
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    original_model: str = ""
    tags: tuple[str, ...] = ()
    thermal: float | None = None  # the winner's thermal points; None: no winner
    affinity: float = 0.0  # the winner's conversation-affinity points
    substitution: str | None = None

    @classmethod
    def from_trace(cls, row: Mapping[str, Any]) -> RecordedRequest:
        """From a ``request_traces`` row (``scores_breakdown`` and ``tags`` decoded)."""
        breakdown = row.get("scores_breakdown") or {}
        ttft = row.get("time_to_first_token_ms")
        thermal = breakdown.get("thermal")
        return cls(
            arrival=float(row["timestamp"]),
            model=str(row["model"]),
            kind=str(row.get("kind") or KIND_TEXT),
            status=str(row.get("status") or "completed"),
            node_id=row.get("node_id"),
            latency=max(0.0, float(row.get("latency_ms") or 0.0) / 1000),
            ttft=max(0.0, float(ttft) / 1000) if ttft is not None else None,
            prompt_tokens=row.get("prompt_tokens"),
            completion_tokens=row.get("completion_tokens"),
            original_model=str(row.get("original_model") or ""),
            tags=tuple(str(t) for t in row.get("tags") or ()),
            thermal=float(thermal) if isinstance(thermal, int | float) else None,
            affinity=float(breakdown.get("affinity") or 0.0),
            substitution=row.get("substitution"),
        )

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def failed(self) -> bool:
        return self.status in ("failed", "incomplete")


@attrs.frozen
class ModelFacts:
    """A model on a node, as its report lists it."""

    name: str
    size_bytes: int
    embedding: bool = False
    context_length: int = 0  # loaded window; 0 = not loaded, unknown
    family: str = ""
    parameter_size: str = ""


@attrs.frozen
class NodeFacts:
    """What the planner needs of one node's last report."""

    node_id: str
    memory_bytes: int
    slots: int
    models: tuple[ModelFacts, ...]
    loaded: tuple[str, ...] = ()
    online: bool = True

    @classmethod
    def from_report(cls, report: NodeReport, online: bool = True) -> NodeFacts:
        embed = set(report.capabilities.embed_models)
        contexts = {m.name: m.context_length for m in report.loaded_models}
        models: dict[str, ModelFacts] = {}
        for available in report.available_models:
            models[available.name] = ModelFacts(
                name=available.name,
                size_bytes=available.size_bytes,
                embedding=available.name in embed or _embedding_caps(available.capabilities),
                context_length=contexts.get(available.name, 0),
                family=available.family,
                parameter_size=available.parameter_size,
            )
        for loaded in report.loaded_models:
            models.setdefault(
                loaded.name,
                ModelFacts(
                    loaded.name, loaded.size_bytes, loaded.name in embed, loaded.context_length
                ),
            )
        return cls(
            node_id=report.node_id,
            memory_bytes=report.memory.total_bytes,
            slots=max(1, report.parallel_slots),
            models=tuple(models.values()),
            loaded=tuple(m.name for m in report.loaded_models),
            online=online,
        )

    @classmethod
    def from_status(cls, node: Mapping[str, Any]) -> NodeFacts:
        """From one node of ``/fleet/status`` (:func:`herd.core.views.node_view`). Raises
        PlanError naming what is missing."""
        try:
            embed = set(node.get("capabilities", {}).get("embed_models") or ())
            contexts = {m["name"]: int(m.get("context_length") or 0) for m in node["models_loaded"]}
            models: dict[str, ModelFacts] = {}
            for available in node["models_available"]:
                name = str(available["name"])
                models[name] = ModelFacts(
                    name=name,
                    size_bytes=int(available.get("size_bytes") or 0),
                    embedding=name in embed or _embedding_caps(available.get("capabilities")),
                    context_length=contexts.get(name, 0),
                    family=str(available.get("family") or ""),
                    parameter_size=str(available.get("parameter_size") or ""),
                )
            for loaded in node["models_loaded"]:
                name = str(loaded["name"])
                models.setdefault(
                    name,
                    ModelFacts(name, int(loaded.get("size_bytes") or 0), name in embed),
                )
            return cls(
                node_id=str(node["node_id"]),
                memory_bytes=int(node["memory"]["total_bytes"]),
                slots=max(1, int(node.get("parallel_slots") or 1)),
                models=tuple(models.values()),
                loaded=tuple(str(m["name"]) for m in node["models_loaded"]),
                online=node.get("status") != "offline",
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"a node in the fleet status is missing {exc}: {node!r:.200}") from exc


def _embedding_caps(capabilities: object) -> bool:
    caps = tuple(capabilities) if isinstance(capabilities, list | tuple) else ()
    return "embedding" in caps and "completion" not in caps


# --- presets --------------------------------------------------------------------------------


@attrs.frozen
class Preset:
    """A machine one could add, described by what sets an LLM's speed on it."""

    name: str
    title: str
    memory_bytes: int  # where models must fit (unified memory, or the GPU's VRAM)
    bandwidth: float  # memory bandwidth, bytes/s: decoding reads the whole model per token
    flops: float  # usable half-precision FLOP/s: prefill is compute-bound
    load_bytes_per_second: float  # disk to memory
    slots: int = 4

    def speed(self, size_bytes: int) -> tuple[float, float, float]:
        """(decode tokens/s, prefill tokens/s, load seconds) of a model of ``size_bytes``: 60%
        of the bandwidth per token read; 2 FLOPs per parameter per prompt token at half the
        peak, parameters from the size (about 0.6 bytes each at Q4); one second to start."""
        size = max(size_bytes, 1)
        parameters = size / 0.6
        decode = 0.6 * self.bandwidth / size
        prefill = 0.5 * self.flops / (2 * parameters)
        return decode, prefill, 1.0 + size / self.load_bytes_per_second

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "memory_bytes": self.memory_bytes,
            "slots": self.slots,
            "bandwidth_gb_s": round(self.bandwidth / 1e9),
            "tflops": round(self.flops / 1e12, 1),
        }


PRESETS = {
    p.name: p
    for p in (
        Preset("mac-mini-16", "Mac mini (M4, 16 GB)", 16 * GiB, 120e9, 4.3e12, 3e9, slots=2),
        Preset("macbook-pro-36", "MacBook Pro (M3 Pro, 36 GB)", 36 * GiB, 150e9, 7e12, 5e9),
        Preset("mac-studio-192", "Mac Studio (M2 Ultra, 192 GB)", 192 * GiB, 800e9, 27e12, 5e9),
        Preset("rtx-4090", "RTX 4090 box (24 GB VRAM)", 24 * GiB, 1008e9, 165e12, 3e9),
        Preset("cpu-64", "CPU-only server (64 GB DDR5)", 64 * GiB, 60e9, 1.5e12, 2e9, slots=2),
    )
}


# --- changes --------------------------------------------------------------------------------


@attrs.frozen
class AddNode:
    preset: str | None = None  # a PRESETS name ...
    copy_of: str | None = None  # ... or a node to copy

    def describe(self) -> str:
        if self.copy_of is not None:
            return f"add a copy of {self.copy_of}"
        preset = PRESETS.get(self.preset or "")
        return f"add a {preset.title if preset else self.preset}"


@attrs.frozen
class RemoveNode:
    node: str

    def describe(self) -> str:
        return f"remove {self.node}"


@attrs.frozen
class Pin:
    """The model is on the node (pulled there if it wasn't) and loaded when the replay
    starts, kept loaded as herd keeps every model (it can still be evicted for room)."""

    node: str
    model: str

    def describe(self) -> str:
        return f"pin {self.model} on {self.node}"


@attrs.frozen
class Unload:
    """The node no longer serves the model: not loaded, not on its disk."""

    node: str
    model: str

    def describe(self) -> str:
        return f"unload {self.model} from {self.node}"


@attrs.frozen
class SetSlots:
    node: str  # "*" = every node
    slots: int

    def describe(self) -> str:
        where = "every node" if self.node == "*" else self.node
        return f"{self.slots} slot{'s' if self.slots != 1 else ''} on {where}"


@attrs.frozen
class SetSubstitution:
    on: bool

    def describe(self) -> str:
        return f"substitution (vram_fallback) {'on' if self.on else 'off'}"


Change = AddNode | RemoveNode | Pin | Unload | SetSlots | SetSubstitution
CHANGE_KINDS = ("add-node", "remove-node", "pin", "unload", "slots", "set")


def _node_model(kind: str, value: str) -> tuple[str, str]:
    node, sep, model = value.partition(":")
    if not sep or not node or not model:
        raise PlanError(f"{kind} takes NODE:MODEL (e.g. studio:llama3.1:8b), got {value!r}")
    return node, normalize_model_name(model)


def _bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "on", "yes", "1"):
        return True
    if lowered in ("false", "off", "no", "0"):
        return False
    raise PlanError(f"{name} must be true or false, got {value!r}")


def _slots(value: str) -> int:
    try:
        slots = int(value)
    except ValueError:
        raise PlanError(f"slots must be a whole number, got {value!r}") from None
    if not 1 <= slots <= MAX_SLOTS:
        raise PlanError(f"slots must be between 1 and {MAX_SLOTS}, got {slots}")
    return slots


def parse_change(kind: str, value: str) -> Change:
    """A change from its CLI spelling: ``add-node PRESET|copy:NODE``, ``remove-node NODE``,
    ``pin NODE:MODEL``, ``unload NODE:MODEL``, ``slots NODE=N`` (``*=N``: every node), ``set
    vram_fallback=BOOL`` or ``set slots=N``. Raises PlanError naming a bad value."""
    value = value.strip()
    if kind == "add-node":
        if value.startswith("copy:"):
            node = value[len("copy:") :]
            if not node:
                raise PlanError("add-node copy: needs a node name, e.g. copy:studio")
            return AddNode(copy_of=node)
        if value not in PRESETS:
            raise PlanError(
                f"unknown preset {value!r}; presets are {', '.join(PRESETS)} (or copy:NODE)"
            )
        return AddNode(preset=value)
    if kind == "remove-node":
        if not value:
            raise PlanError("remove-node needs a node name")
        return RemoveNode(value)
    if kind == "pin":
        return Pin(*_node_model(kind, value))
    if kind == "unload":
        return Unload(*_node_model(kind, value))
    if kind in ("slots", "set"):
        name, sep, setting = value.partition("=")
        if not sep:
            raise PlanError(f"{kind} takes NAME=VALUE, got {value!r}")
        name = name.strip()
        if kind == "slots":
            return SetSlots(name or "*", _slots(setting))
        if name == "vram_fallback":
            return SetSubstitution(_bool(name, setting))
        if name == "slots":
            return SetSlots("*", _slots(setting))
        raise PlanError(
            f"unknown setting {name!r}; the planner can set vram_fallback=true|false and slots=N"
        )
    raise PlanError(f"unknown change {kind!r}; changes are {', '.join(CHANGE_KINDS)}")


def change_from_json(data: object) -> Change:
    """A change from the API's JSON: ``{"kind": "add-node", "value": "rtx-4090"}`` (the CLI's
    spelling, see :func:`parse_change`). Raises PlanError naming a bad value."""
    if not isinstance(data, dict) or set(data) != {"kind", "value"}:
        raise PlanError(f'a change is {{"kind": ..., "value": ...}}, got {data!r:.200}')
    kind, value = data["kind"], data["value"]
    if not isinstance(kind, str) or not isinstance(value, str | bool | int):
        raise PlanError(f"a change's kind and value are strings, got {data!r:.200}")
    return parse_change(kind, str(value).lower() if isinstance(value, bool) else str(value))


def change_as_json(change: Change) -> dict[str, str]:
    """The inverse of :func:`change_from_json`."""
    if isinstance(change, AddNode):
        value = f"copy:{change.copy_of}" if change.copy_of else str(change.preset)
        return {"kind": "add-node", "value": value}
    if isinstance(change, RemoveNode):
        return {"kind": "remove-node", "value": change.node}
    if isinstance(change, Pin):
        return {"kind": "pin", "value": f"{change.node}:{change.model}"}
    if isinstance(change, Unload):
        return {"kind": "unload", "value": f"{change.node}:{change.model}"}
    if isinstance(change, SetSlots):
        return {"kind": "slots", "value": f"{change.node}={change.slots}"}
    return {"kind": "set", "value": f"vram_fallback={str(change.on).lower()}"}


# --- the trace ------------------------------------------------------------------------------


@attrs.frozen
class TraceBuild:
    sessions: tuple[Session, ...]
    requests: tuple[RecordedRequest, ...]  # the ones replayed, oldest first
    conversations: int  # sessions of more than one turn
    skipped: dict[str, int]  # reason -> requests left out
    # index in ``requests`` -> prompt tokens the node's prompt cache most likely held
    cached: dict[int, int]


def asked_model(request: RecordedRequest) -> str:
    """The model to replay the request for: the one asked for when a substitution served
    another (the replay decides substitution itself), else the one that served."""
    if request.substitution == "vram" and request.original_model:
        return request.original_model
    return request.model


def build_trace(requests: Sequence[RecordedRequest]) -> TraceBuild:
    """The replay trace of ``requests``; see the module doc (1)."""
    ordered = sorted(requests, key=lambda r: r.arrival)
    skipped: collections.Counter[str] = collections.Counter()
    kept: list[RecordedRequest] = []
    for request in ordered:
        if request.kind in REPLAYED_KINDS:
            kept.append(request)
        else:
            skipped[f"{request.kind} requests (not replayed)"] += 1
    if not kept:
        return TraceBuild((), (), 0, dict(skipped), {})
    prompts, completions = _token_medians(kept)
    start = kept[0].arrival
    # Per session: its turns' requests. Tails: (node, model, tags) -> open sessions.
    members: list[list[int]] = []
    tails: dict[tuple[str, str, tuple[str, ...]], list[int]] = collections.defaultdict(list)
    cached: dict[int, int] = {}

    def tokens(r: RecordedRequest) -> int:
        return r.prompt_tokens if r.prompt_tokens else prompts.get(r.model, DEFAULT_PROMPT_TOKENS)

    for index, request in enumerate(kept):
        session: int | None = None
        if request.affinity > 0 and request.node_id is not None and request.kind == KIND_TEXT:
            key = (request.node_id, request.model, request.tags)
            open_sessions = tails[key]
            # Best: the latest whose prompt and answer this prompt holds; failing that (a
            # backend that counts only uncached tokens), the latest.
            best: tuple[int, float] = (2, 0.0)
            chosen = -1
            for position, candidate in enumerate(open_sessions):
                last = kept[members[candidate][-1]]
                end = last.arrival + last.latency
                grown = tokens(request) - tokens(last) - (last.completion_tokens or 0)
                fit = (0 if grown >= 0 else 1, -end)
                if end <= request.arrival + 1e-6 and fit < best:
                    session, best, chosen = candidate, fit, position
            if session is not None:
                del open_sessions[chosen]
                cached[index] = tokens(kept[members[session][-1]])
            # Drop sessions that can no longer be continued.
            tails[key] = [
                s
                for s in open_sessions
                if kept[members[s][-1]].arrival + kept[members[s][-1]].latency
                >= request.arrival - FOLLOW_WINDOW_S
            ]
        if session is None:
            session = len(members)
            members.append([])
        members[session].append(index)
        if request.node_id is not None and request.kind == KIND_TEXT:
            tails[(request.node_id, request.model, request.tags)].append(session)

    sessions = []
    for number, indices in enumerate(members):
        turns = []
        messages: list[dict[str, str]] = [{"role": "system", "content": f"session {number}"}]
        previous: RecordedRequest | None = None
        for turn, index in enumerate(indices):
            request = kept[index]
            think = 0.0
            if previous is not None:
                think = max(0.0, request.arrival - (previous.arrival + previous.latency))
            embed = request.kind == KIND_EMBED
            if not embed:
                messages.append({"role": "user", "content": f"session {number} turn {turn}"})
            output = 0
            if not embed:
                output = request.completion_tokens or completions.get(
                    request.model, DEFAULT_COMPLETION_TOKENS
                )
            turns.append(
                Turn(
                    model=asked_model(request),
                    prompt_tokens=tokens(request),
                    output_tokens=output,
                    kind=request.kind,
                    messages=tuple(messages) if not embed else (),
                    think=think,
                )
            )
            if not embed:
                messages.append({"role": "assistant", "content": f"session {number} {turn}"})
            previous = request
        first = kept[indices[0]]
        sessions.append(Session(first.arrival - start, tuple(turns)))
    sessions.sort(key=lambda s: s.start)
    return TraceBuild(
        sessions=tuple(sessions),
        requests=tuple(kept),
        conversations=sum(1 for m in members if len(m) > 1),
        skipped=dict(skipped),
        cached=cached,
    )


def _token_medians(requests: Sequence[RecordedRequest]) -> tuple[dict[str, int], dict[str, int]]:
    prompts: dict[str, list[int]] = collections.defaultdict(list)
    completions: dict[str, list[int]] = collections.defaultdict(list)
    for r in requests:
        if r.prompt_tokens:
            prompts[r.model].append(r.prompt_tokens)
        if r.completion_tokens:
            completions[r.model].append(r.completion_tokens)
    return (
        {m: int(statistics.median(v)) for m, v in prompts.items()},
        {m: int(statistics.median(v)) for m, v in completions.items()},
    )


# --- speeds ---------------------------------------------------------------------------------


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


# --- the fleet ------------------------------------------------------------------------------


@attrs.frozen
class PlannedModel:
    facts: ModelFacts
    speed: ModelSpeed


@attrs.frozen
class PlannedNode:
    node_id: str
    memory_bytes: int
    slots: int
    models: tuple[PlannedModel, ...]
    loaded: tuple[str, ...]
    origin: str  # "recorded", "copy of X", a preset's title
    online: bool = True
    preset: str | None = None  # the PRESETS entry its speeds come from

    def config(self) -> SimConfig:
        return SimConfig(
            name=self.node_id,
            memory_bytes=self.memory_bytes,
            parallel=self.slots,
            speed=1.0,
            models=tuple(
                SimModel(
                    name=m.facts.name,
                    size_bytes=m.facts.size_bytes,
                    family=m.facts.family or "llama",
                    parameter_size=m.facts.parameter_size,
                    context_length=m.facts.context_length or 8192,
                    embedding=m.facts.embedding,
                    load_seconds=m.speed.load_seconds,
                    tokens_per_second=m.speed.decode,
                    prefill_tokens_per_second=m.speed.prefill,
                )
                for m in self.models
            ),
            loaded=self.loaded,
        )

    def as_dict(self) -> dict[str, Any]:
        loaded = set(self.loaded)
        return {
            "node_id": self.node_id,
            "origin": self.origin,
            "online": self.online,
            "memory_bytes": self.memory_bytes,
            "slots": self.slots,
            "models": [
                {
                    "name": m.facts.name,
                    "size_bytes": m.facts.size_bytes,
                    "loaded": m.facts.name in loaded,
                    **m.speed.as_dict(),
                }
                for m in self.models
            ],
        }


@attrs.frozen
class PlannedFleet:
    nodes: tuple[PlannedNode, ...]
    substitution: bool

    def node(self, node_id: str) -> PlannedNode | None:
        return next((n for n in self.nodes if n.node_id == node_id), None)


def build_fleet(nodes: Sequence[NodeFacts], speeds: Speeds, substitution: bool) -> PlannedFleet:
    """The virtual fleet as the reports describe it (the no-change scenario)."""
    planned = []
    for node in nodes:
        models = tuple(
            PlannedModel(m, speeds.speed(node.node_id, m.name, m.size_bytes, m.embedding))
            for m in node.models
        )
        names = {m.name for m in node.models}
        planned.append(
            PlannedNode(
                node_id=node.node_id,
                memory_bytes=node.memory_bytes,
                slots=node.slots,
                models=models,
                loaded=tuple(m for m in node.loaded if m in names),
                origin="recorded",
                online=node.online,
            )
        )
    return PlannedFleet(tuple(planned), substitution)


def _fits(node: PlannedNode, size: int) -> bool:
    return size <= node.memory_bytes * (1 - OS_SHARE)


def _usable_gib(node: PlannedNode) -> str:
    return f"{node.memory_bytes * (1 - OS_SHARE) / GiB:.1f} GiB"


def apply_changes(fleet: PlannedFleet, changes: Sequence[Change], speeds: Speeds) -> PlannedFleet:
    """``fleet`` with ``changes`` applied in order. Raises PlanError naming a change that
    can't be made (an unknown node or model, a model that doesn't fit)."""
    if len(changes) > MAX_CHANGES:
        raise PlanError(f"at most {MAX_CHANGES} changes in one scenario, got {len(changes)}")
    nodes = list(fleet.nodes)
    substitution = fleet.substitution
    catalogue = {m.facts.name: m.facts for n in fleet.nodes for m in n.models}

    def find(node_id: str, change: Change) -> int:
        for index, node in enumerate(nodes):
            if node.node_id == node_id:
                return index
        names = ", ".join(n.node_id for n in nodes) or "none"
        raise PlanError(f"{change.describe()}: no node {node_id!r} (nodes: {names})")

    def fresh_name(base: str) -> str:
        taken = {n.node_id for n in nodes}
        name, number = base, 2
        while name in taken:
            name, number = f"{base}-{number}", number + 1
        return name

    for change in changes:
        if isinstance(change, AddNode):
            if change.copy_of is not None:
                original = nodes[find(change.copy_of, change)]
                nodes.append(
                    attrs.evolve(
                        original,
                        node_id=fresh_name(f"{original.node_id}-copy"),
                        origin=f"copy of {original.node_id}",
                        online=True,
                    )
                )
                continue
            preset = PRESETS.get(change.preset or "")
            if preset is None:
                raise PlanError(
                    f"unknown preset {change.preset!r}; presets are {', '.join(PRESETS)}"
                )
            models = []
            usable = preset.memory_bytes * (1 - OS_SHARE)
            for facts in catalogue.values():
                if facts.size_bytes <= usable:
                    decode, prefill, load = preset.speed(facts.size_bytes)
                    models.append(
                        PlannedModel(facts, ModelSpeed(decode, prefill, load, 0, "preset"))
                    )
            nodes.append(
                PlannedNode(
                    node_id=fresh_name(preset.name),
                    memory_bytes=preset.memory_bytes,
                    slots=preset.slots,
                    models=tuple(models),
                    loaded=(),
                    origin=preset.title,
                    preset=preset.name,
                )
            )
        elif isinstance(change, RemoveNode):
            del nodes[find(change.node, change)]
        elif isinstance(change, Pin):
            index = find(change.node, change)
            node = nodes[index]
            pinned = catalogue.get(change.model)
            if pinned is None:
                known = ", ".join(sorted(catalogue)) or "none"
                raise PlanError(
                    f"{change.describe()}: no node has {change.model!r} (models: {known})"
                )
            if not _fits(node, pinned.size_bytes):
                raise PlanError(
                    f"{change.describe()}: {change.model} needs {pinned.size_bytes / GiB:.1f} GiB, "
                    f"{node.node_id} has {_usable_gib(node)} for models"
                )
            offered = node.models
            if all(m.facts.name != change.model for m in offered):
                speed = speeds.speed(
                    node.node_id, change.model, pinned.size_bytes, pinned.embedding
                )
                if node.preset is not None:
                    decode, prefill, load = PRESETS[node.preset].speed(pinned.size_bytes)
                    speed = ModelSpeed(decode, prefill, load, 0, "preset")
                offered = (*offered, PlannedModel(pinned, speed))
            # Loaded first; other loaded models leave (most recently listed last) if needed.
            loaded = [change.model, *(m for m in node.loaded if m != change.model)]
            sizes = {m.facts.name: m.facts.size_bytes for m in offered}
            while sum(sizes[m] for m in loaded) > node.memory_bytes * (1 - OS_SHARE):
                loaded.pop()
            nodes[index] = attrs.evolve(node, models=offered, loaded=tuple(loaded))
        elif isinstance(change, Unload):
            index = find(change.node, change)
            node = nodes[index]
            if all(m.facts.name != change.model for m in node.models):
                has = ", ".join(m.facts.name for m in node.models) or "no models"
                raise PlanError(f"{change.describe()}: {node.node_id} has {has}")
            nodes[index] = attrs.evolve(
                node,
                models=tuple(m for m in node.models if m.facts.name != change.model),
                loaded=tuple(m for m in node.loaded if m != change.model),
            )
        elif isinstance(change, SetSlots):
            if change.node == "*":
                nodes = [attrs.evolve(n, slots=change.slots) for n in nodes]
            else:
                index = find(change.node, change)
                nodes[index] = attrs.evolve(nodes[index], slots=change.slots)
        else:
            substitution = change.on
    return PlannedFleet(tuple(nodes), substitution)


# --- figures --------------------------------------------------------------------------------


@attrs.frozen
class Figures:
    """One column of the plan: the recording, the no-change replay or a scenario."""

    label: str
    requests: int
    completed: int
    errors: int
    latency_p50: float  # seconds; NaN when nothing completed
    latency_p95: float
    ttft_p50: float
    ttft_p95: float
    cold_starts: int  # requests that waited for a model load
    loads: int | None  # model loads (not recorded by the router: None for the recording)
    evictions: int | None
    substitutions: int
    per_node: dict[str, int]  # requests completed per node
    error_reasons: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        for key in ("latency_p50", "latency_p95", "ttft_p50", "ttft_p95"):
            value = data[key]
            data[key] = round(value, 3) if math.isfinite(value) else None
        return data


def recorded_figures(build: TraceBuild, thermal_loaded: float) -> Figures:
    requests = build.requests
    done = [r for r in requests if r.completed]
    ttfts = [r.ttft for r in done if r.ttft is not None]
    reasons: collections.Counter[str] = collections.Counter(r.status for r in requests if r.failed)
    return Figures(
        label="recorded",
        requests=len(requests),
        completed=len(done),
        errors=sum(1 for r in requests if r.failed),
        latency_p50=percentile([r.latency for r in done], 0.5),
        latency_p95=percentile([r.latency for r in done], 0.95),
        ttft_p50=percentile(ttfts, 0.5),
        ttft_p95=percentile(ttfts, 0.95),
        cold_starts=sum(
            1 for r in requests if r.thermal is not None and r.thermal < thermal_loaded - 1e-9
        ),
        loads=None,
        evictions=None,
        substitutions=sum(1 for r in requests if r.substitution == "vram"),
        per_node=dict(collections.Counter(str(r.node_id) for r in done if r.node_id)),
        error_reasons=dict(reasons),
    )


def replay_figures(label: str, replayed: Replayed) -> Figures:
    outcomes: Sequence[Outcome] = replayed.outcomes
    done = [o for o in outcomes if o.error is None]
    reasons = collections.Counter(str(o.error) for o in outcomes if o.error is not None)
    return Figures(
        label=label,
        requests=len(outcomes),
        completed=len(done),
        errors=len(outcomes) - len(done),
        latency_p50=percentile([o.latency for o in done], 0.5),
        latency_p95=percentile([o.latency for o in done], 0.95),
        ttft_p50=percentile([o.ttft for o in done], 0.5),
        ttft_p95=percentile([o.ttft for o in done], 0.95),
        cold_starts=sum(1 for o in done if o.cold),
        loads=sum(replayed.cold_loads.values()),
        evictions=sum(replayed.evictions.values()),
        substitutions=sum(1 for o in done if o.served_model is not None),
        per_node=dict(collections.Counter(str(o.node_id) for o in done if o.node_id)),
        error_reasons=dict(reasons),
    )


@attrs.frozen
class Fidelity:
    matches: bool
    rule: str
    # figure -> (recorded, replayed, within tolerance)
    figures: dict[str, tuple[float, float, bool]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "matches": self.matches,
            "rule": self.rule,
            "figures": {
                name: {
                    "recorded": _finite(recorded),
                    "replayed": _finite(replayed),
                    "within": within,
                }
                for name, (recorded, replayed, within) in self.figures.items()
            },
        }


FIDELITY_RULE = (
    f"p50 and p95 latency and time to first token each within {FIDELITY_SHARE:.0%} or "
    f"{FIDELITY_SLACK_S:g} s of the recorded figures"
)


def within(recorded: float, replayed: float) -> bool:
    """The tolerance of :data:`FIDELITY_RULE`."""
    if not (math.isfinite(recorded) and math.isfinite(replayed)):
        return math.isnan(recorded) and math.isnan(replayed)
    return abs(replayed - recorded) <= max(FIDELITY_SHARE * recorded, FIDELITY_SLACK_S)


def fidelity(recorded: Figures, replayed: Figures) -> Fidelity:
    figures = {}
    for name in ("latency_p50", "latency_p95", "ttft_p50", "ttft_p95"):
        a, b = getattr(recorded, name), getattr(replayed, name)
        figures[name] = (a, b, within(a, b))
    return Fidelity(all(ok for _, _, ok in figures.values()), FIDELITY_RULE, figures)


def _finite(value: float) -> float | None:
    return round(value, 3) if math.isfinite(value) else None


# --- the plan -------------------------------------------------------------------------------


@attrs.frozen
class PlanInputs:
    requests: tuple[RecordedRequest, ...]  # the window's requests (at most the limit)
    nodes: tuple[NodeFacts, ...]
    hours: float
    in_window: int  # requests recorded in the window (more than ``requests`` if truncated)
    substitution: bool = False  # the router's vram_fallback setting
    scoring: ScoringSettings = attrs.field(factory=ScoringSettings)
    heartbeat: float = 5.0
    queue_timeout: float = 30.0


@attrs.frozen
class Scenario:
    changes: tuple[Change, ...]
    fleet: PlannedFleet
    figures: Figures

    @property
    def label(self) -> str:
        return "; ".join(c.describe() for c in self.changes) or "no change"


@attrs.frozen
class Plan:
    hours: float
    in_window: int
    used: int  # the requests read (the most recent of the window, up to the limit)
    replayed: int
    sessions: int
    conversations: int
    skipped: dict[str, int]
    notes: tuple[str, ...]
    recorded: Figures
    baseline: Scenario  # no change
    scenarios: tuple[Scenario, ...]
    fidelity: Fidelity

    def as_dict(self) -> dict[str, Any]:
        return {
            "window": {
                "hours": self.hours,
                "requests_in_window": self.in_window,
                "requests_replayed": self.replayed,
                "requests_used": self.used,
                "truncated": self.in_window > self.used,
                "sessions": self.sessions,
                "conversations": self.conversations,
                "skipped": self.skipped,
            },
            "notes": list(self.notes),
            "recorded": self.recorded.as_dict(),
            "baseline": _scenario_dict(self.baseline),
            "scenarios": [_scenario_dict(s) for s in self.scenarios],
            "fidelity": self.fidelity.as_dict(),
            "limits": list(LIMITS),
        }


def _scenario_dict(scenario: Scenario) -> dict[str, Any]:
    return {
        "label": scenario.label,
        "changes": [change_as_json(c) for c in scenario.changes],
        "substitution": scenario.fleet.substitution,
        "figures": scenario.figures.as_dict(),
        "fleet": [n.as_dict() for n in scenario.fleet.nodes],
    }


def plan(
    inputs: PlanInputs,
    scenarios: Sequence[Sequence[Change]],
    *,
    abandon: Callable[[], bool] | None = None,
    seed: int = 1,
) -> Plan:
    """Replay the recorded window on the fleet as it is and under each scenario. Raises
    PlanError for a change that can't be made (before any replay runs), PlanAbandoned when
    ``abandon`` returned True."""
    if not inputs.nodes:
        raise PlanError("the fleet has no nodes: the router knows none (is any node connected?)")
    build = build_trace(inputs.requests)
    thermal_loaded = inputs.scoring.thermal_loaded
    speeds = learn_speeds(build, inputs.nodes, thermal_loaded)
    base = build_fleet(inputs.nodes, speeds, inputs.substitution)
    fleets = [apply_changes(base, changes, speeds) for changes in scenarios]
    notes = _notes(build, inputs.nodes)

    def replay(fleet: PlannedFleet, label: str) -> Figures:
        try:
            replayed = run_detailed(
                [n.config() for n in fleet.nodes],
                build.sessions,
                "herd",
                seed=seed,
                settings=inputs.scoring,
                heartbeat=inputs.heartbeat,
                queue_timeout=inputs.queue_timeout,
                keep_alive=math.inf,
                substitution=fleet.substitution,
                abandon=abandon,
            )
        except ReplayAbandoned as exc:
            raise PlanAbandoned(str(exc)) from exc
        return replay_figures(label, replayed)

    baseline = Scenario((), base, replay(base, "no change"))
    results = tuple(
        Scenario(tuple(changes), fleet, replay(fleet, "what if"))
        for changes, fleet in zip(scenarios, fleets, strict=True)
    )
    recorded = recorded_figures(build, thermal_loaded)
    return Plan(
        hours=inputs.hours,
        in_window=inputs.in_window,
        used=len(inputs.requests),
        replayed=len(build.requests),
        sessions=len(build.sessions),
        conversations=build.conversations,
        skipped=build.skipped,
        notes=notes,
        recorded=recorded,
        baseline=baseline,
        scenarios=results,
        fidelity=fidelity(recorded, baseline.figures),
    )


def _notes(build: TraceBuild, nodes: Sequence[NodeFacts]) -> tuple[str, ...]:
    """What the operator should know about this window and fleet."""
    notes = []
    known = {n.node_id for n in nodes}
    served = collections.Counter(r.node_id for r in build.requests if r.node_id is not None)
    for name, count in sorted(served.items()):
        if name not in known:
            notes.append(
                f"{name} served {count} requests in the window but the router has no report for "
                "it now; the replay sends its requests to the other nodes"
            )
    for node in nodes:
        if not node.online:
            notes.append(
                f"{node.node_id} is offline now; it is replayed as last seen (remove it to plan "
                "without it)"
            )
    models = {m.name for n in nodes for m in n.models}
    missing = collections.Counter(
        asked_model(r) for r in build.requests if asked_model(r) not in models
    )
    for model, count in sorted(missing.items()):
        notes.append(f"no node has {model} now: its {count} requests fail in every replay")
    if not build.requests:
        notes.append("no text or embedding requests in the window: nothing to replay")
    return tuple(notes)


# --- text -----------------------------------------------------------------------------------


def render(result: Plan) -> str:
    """The plan as a table for a terminal."""
    columns = [result.recorded, result.baseline.figures, *(s.figures for s in result.scenarios)]
    heads = ["recorded", "no change", *(f"what if {i + 1}" for i in range(len(result.scenarios)))]
    skipped = sum(result.skipped.values())
    lines = [
        f"herd plan: {result.replayed} requests of the last {result.hours:g} h replayed "
        f"({result.sessions} sessions, {result.conversations} conversations"
        + (f"; {skipped} left out" if skipped else "")
        + ")"
    ]
    if result.in_window > result.used:
        lines.append(
            f"  (the window holds {result.in_window} requests: the most recent {result.used} "
            "were used)"
        )
    for index, scenario in enumerate(result.scenarios):
        lines.append(f"  what if {index + 1}: {scenario.label}")
    lines.append("")
    rows: list[tuple[str, Callable[[Figures], str]]] = [
        ("requests", lambda f: str(f.requests)),
        ("latency p50 s", lambda f: _seconds(f.latency_p50)),
        ("latency p95 s", lambda f: _seconds(f.latency_p95)),
        ("TTFT p50 s", lambda f: _seconds(f.ttft_p50)),
        ("TTFT p95 s", lambda f: _seconds(f.ttft_p95)),
        ("cold starts", lambda f: str(f.cold_starts)),
        ("model loads", lambda f: "-" if f.loads is None else str(f.loads)),
        ("evictions", lambda f: "-" if f.evictions is None else str(f.evictions)),
        ("substitutions", lambda f: str(f.substitutions)),
        ("errors", lambda f: str(f.errors)),
    ]
    width = max(12, *(len(h) for h in heads))
    lines.append(f"{'':<16}" + "".join(f"{h:>{width}}" for h in heads))
    for name, get in rows:
        lines.append(f"{name:<16}" + "".join(f"{get(f):>{width}}" for f in columns))
    lines.append("")
    verdict = (
        "reproduces the recording"
        if result.fidelity.matches
        else "does NOT reproduce the recording: treat the predictions with care"
    )
    text = f"The no-change replay {verdict} (it should have {result.fidelity.rule})."
    lines.extend(textwrap.wrap(text, WIDTH))
    for note in result.notes:
        lines.extend(textwrap.wrap(note, WIDTH, initial_indent="note: ", subsequent_indent="  "))
    lines.append("")
    lines.append("What the model of a node leaves out:")
    for text in LIMITS:
        lines.extend(textwrap.wrap(text, WIDTH, initial_indent="  - ", subsequent_indent="    "))
    return "\n".join(lines)


def _seconds(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "-"
