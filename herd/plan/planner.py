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
  unknown node, preset or model, a model that doesn't fit, too many changes.
- Every estimate says where it came from (``source`` of each :class:`ModelSpeed`), and every
  request the replay leaves out is counted in :attr:`TraceBuild.skipped`: the planner never
  answers silently from less than it was given.

Theory of operation
-------------------
1. **The trace** (:mod:`herd.plan.trace`). Text and embedding requests are replayed; image and
   speech-to-text requests are counted and left out. A request whose winning node got
   conversation-affinity points continues an earlier request on that node, for the same model
   and tags, that had finished by then: the latest one whose prompt and answer its prompt holds
   (else the latest). The two are turns of one session, and the later one is sent the recorded
   think time after the earlier one's answer. Everything else arrives at its recorded time.
   Missing token counts (failed requests) are the model's median.
2. **Speeds** (:mod:`herd.plan.speeds`), per node and model, from the completed requests:
   decoding is ``completion tokens / (latency - TTFT)``, corrected for the streams that shared
   the node meanwhile (the virtual node charges the same contention back, see
   :mod:`herd.sim.costs`), so the no-change replay reproduces the rates that were seen; prefill
   is the 80th percentile of ``uncached prompt tokens / TTFT`` over requests the router found
   hot (queueing and loads only make a TTFT longer); a cold load's time is TTFT minus prefill
   for the requests the router sent to a cold model. A node:model never seen gets the model's
   fleet speed scaled by the node's relative speed; a model never seen anywhere gets the fleet's
   speed per byte of model.
3. **The fleet** (:mod:`herd.plan.changes`) is built from the reports: memory, slots, the models
   on disk with their sizes, the models loaded now (the fleet starts with them: what was loaded
   when the window opened is not recorded). Changes (:data:`Change`) are applied to that: add a
   node from a :data:`PRESETS` entry or as a copy of one, remove one, pin or unload a model, set
   slots, turn substitution on or off.
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

import collections
import math
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from herd.core.scoring import ScoringSettings
from herd.plan.changes import (
    CHANGE_KINDS,
    MAX_CHANGES,
    PRESETS,
    AddNode,
    Change,
    Pin,
    PlannedFleet,
    PlannedModel,
    PlannedNode,
    Preset,
    RemoveNode,
    SetSlots,
    SetSubstitution,
    Unload,
    apply_changes,
    build_fleet,
    change_as_json,
    change_from_json,
    parse_change,
)
from herd.plan.inputs import (
    ModelFacts,
    NodeFacts,
    PlanAbandoned,
    PlanError,
    RecordedRequest,
)
from herd.plan.replay import Outcome, ReplayAbandoned, Replayed, run_detailed
from herd.plan.speeds import Learned, ModelSpeed, Speeds, _active_streams, learn_speeds
from herd.plan.trace import TraceBuild, asked_model, build_trace
from herd.sim.virtual import percentile

__all__ = [
    "CHANGE_KINDS",
    "FIDELITY_RULE",
    "LIMITS",
    "MAX_CHANGES",
    "MAX_REQUESTS",
    "PRESETS",
    "AddNode",
    "Change",
    "Figures",
    "Learned",
    "ModelFacts",
    "ModelSpeed",
    "NodeFacts",
    "Pin",
    "Plan",
    "PlanAbandoned",
    "PlanError",
    "PlanInputs",
    "PlannedFleet",
    "PlannedModel",
    "PlannedNode",
    "Preset",
    "RecordedRequest",
    "RemoveNode",
    "Scenario",
    "SetSlots",
    "SetSubstitution",
    "Speeds",
    "TraceBuild",
    "Unload",
    "_active_streams",
    "apply_changes",
    "asked_model",
    "build_fleet",
    "build_trace",
    "change_as_json",
    "change_from_json",
    "fidelity",
    "learn_speeds",
    "parse_change",
    "plan",
    "render",
    "within",
]

MAX_REQUESTS = 20_000  # the most recent requests of the window a plan replays, by default
FIDELITY_SHARE = 0.25
FIDELITY_SLACK_S = 0.25
WIDTH = 96  # of the text rendering

LIMITS = (
    "A virtual node is a set of request slots with, per model, a decoding rate, a prefill rate "
    "and a load time learned from your traces, memory that holds the models loaded, and "
    "least-recently-used eviction. Concurrent streams slow each other as in herd's simulator.",
    "Left out: thermal throttling; other programs using the machine; a GPU node's memory "
    "split (a recorded node's models all fit in its RAM, as if it were one pool; what runs "
    "on its GPU and what spills out of VRAM runs at the speed measured, not slower); the "
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
