"""The what-if planner's API, a blueprint of its own (the dashboard's Planner tab, ``herd plan``
with ``--router``):

    GET  /dashboard/api/plan/options   presets, the fleet as the planner sees it, the limits
    POST /dashboard/api/plan           {"hours": 24, "changes": [{"kind": "add-node",
                                        "value": "rtx-4090"}, ...]} -> the plan
                                       ("scenarios": [[...], [...]] for several at once)

How a plan runs: in a worker thread (:func:`trio.to_thread.run_sync`), because its replays are
synchronous ``trio.run`` loops on virtual clocks of their own (:mod:`herd.plan.replay`). The
thread reads the window from ``latency.db`` (after the trace writer's flush) and replays it;
the nodes' reports, the settings and the router's scoring weights are read on the event loop
first. Limits, each a 503 (:class:`~herd.core.errors.Unavailable`) or a 400 naming itself:

- one plan at a time: a plan that finds another running waits for it up to
  :data:`WAIT_SECONDS`, then gets a 503 saying a plan is running;
- at most :data:`MAX_REQUESTS` requests, the window's most recent (the answer says when the
  window held more), and :data:`MAX_SCENARIOS` scenarios of at most
  :data:`herd.plan.planner.MAX_CHANGES` changes;
- at most :data:`BUDGET_SECONDS` of real time: the replay checks before each request and
  stops past it. A client that goes away stops it the same way: the request's task waits for
  its thread (never abandoned), and a sibling task tells the thread to stop when the request
  is cancelled, so no plan outlives its request.
"""

from __future__ import annotations

import json
import math
import threading
import time
from typing import Any

import trio
from quart import Blueprint, Response, request

from herd.core.errors import BadRequest, Unavailable, parse_json_body
from herd.plan import planner, sources
from herd.store.writer import TraceWriter
from herd.transport.link import Link

MAX_REQUESTS = planner.MAX_REQUESTS
MAX_SCENARIOS = 4
MAX_HOURS = 168
BUDGET_SECONDS = 60.0
WAIT_SECONDS = 60.0


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, content_type="application/json")


def _hours(body: dict[str, Any]) -> float:
    hours = body.get("hours", 24)
    if isinstance(hours, bool) or not isinstance(hours, int | float) or not math.isfinite(hours):
        raise BadRequest(f"'hours' must be a number of hours, got {hours!r}", param="hours")
    if not 0 < hours <= MAX_HOURS:
        raise BadRequest(f"'hours' must be more than 0 and at most {MAX_HOURS}, got {hours}")
    return float(hours)


def _scenarios(body: dict[str, Any]) -> list[list[planner.Change]]:
    unknown = set(body) - {"hours", "changes", "scenarios"}
    if unknown:
        raise BadRequest(
            f"unknown field(s) {', '.join(sorted(unknown))}; a plan takes hours, "
            "changes or scenarios"
        )
    if "scenarios" in body and "changes" in body:
        raise BadRequest("give 'changes' (one scenario) or 'scenarios' (a list of them), not both")
    raw = body["scenarios"] if "scenarios" in body else [body.get("changes", [])]
    if not isinstance(raw, list) or not all(isinstance(s, list) for s in raw):
        raise BadRequest("'scenarios' is a list of lists of changes", param="scenarios")
    if len(raw) > MAX_SCENARIOS:
        raise BadRequest(f"at most {MAX_SCENARIOS} scenarios in one plan, got {len(raw)}")
    try:
        return [[planner.change_from_json(c) for c in scenario] for scenario in raw]
    except planner.PlanError as exc:
        raise BadRequest(str(exc), param="changes") from exc


def create_plan_blueprint(link: Link, store: TraceWriter | None = None) -> Blueprint:
    """The planner's API over ``link`` (the router's state and options) and ``store`` (the
    traces it plans on)."""
    state = link.state
    bp = Blueprint("dashboard_plan", __name__)
    one_at_a_time = trio.Lock()

    def nodes() -> tuple[planner.NodeFacts, ...]:
        return sources.nodes_from_registry(state.registry.records())

    @bp.get("/dashboard/api/plan/options")
    async def options() -> Response:
        fleet = nodes()
        return _json(
            {
                "presets": [p.as_dict() for p in planner.PRESETS.values()],
                "nodes": [
                    {
                        "node_id": n.node_id,
                        "online": n.online,
                        "memory_bytes": n.memory_bytes,
                        "slots": n.slots,
                        "models": [
                            {
                                "name": m.name,
                                "size_bytes": m.size_bytes,
                                "loaded": m.name in n.loaded,
                            }
                            for m in n.models
                        ],
                    }
                    for n in fleet
                ],
                "models": sorted({m.name for n in fleet for m in n.models}),
                "settings": {"vram_fallback": state.settings.vram_fallback},
                "change_kinds": list(planner.CHANGE_KINDS),
                "limits": {
                    "max_hours": MAX_HOURS,
                    "max_requests": MAX_REQUESTS,
                    "max_scenarios": MAX_SCENARIOS,
                    "max_changes": planner.MAX_CHANGES,
                    "budget_seconds": BUDGET_SECONDS,
                },
                "fidelity_rule": planner.FIDELITY_RULE,
                "model_limits": list(planner.LIMITS),
            }
        )

    @bp.post("/dashboard/api/plan")
    async def make_plan() -> Response:
        data = await request.get_data(as_text=False)
        body = parse_json_body(data if isinstance(data, bytes) else data.encode())
        hours = _hours(body)
        scenarios = _scenarios(body)
        if store is None:
            raise Unavailable("this router keeps no trace store: nothing to plan on")
        fleet = nodes()
        if not fleet:
            raise BadRequest("no node has joined this router: there is no fleet to plan on")
        await store.flush()
        settings = state.settings
        config = link.config
        since = time.time() - hours * 3600
        stop = threading.Event()

        def work() -> planner.Plan:
            deadline = time.monotonic() + BUDGET_SECONDS
            requests, in_window = sources.read_window(store.target, since, MAX_REQUESTS)
            inputs = planner.PlanInputs(
                requests=requests,
                nodes=fleet,
                hours=hours,
                in_window=in_window,
                substitution=settings.vram_fallback,
                scoring=state.scoring,
                heartbeat=config.heartbeat_interval,
                queue_timeout=config.queue_timeout,
            )
            return planner.plan(
                inputs,
                scenarios,
                abandon=lambda: stop.is_set() or time.monotonic() > deadline,
            )

        async def stop_when_cancelled() -> None:
            try:
                await trio.sleep_forever()
            finally:
                stop.set()

        try:
            one_at_a_time.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(WAIT_SECONDS):
                await one_at_a_time.acquire()
            if one_at_a_time.statistics().owner is not trio.lowlevel.current_task():
                raise Unavailable(
                    "a plan is already running; try again when it has finished"
                ) from None
        started = time.monotonic()
        failure: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_when_cancelled)
                try:
                    result = await trio.to_thread.run_sync(work)
                except (planner.PlanError, planner.PlanAbandoned) as exc:
                    failure = exc
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            one_at_a_time.release()
        if isinstance(failure, planner.PlanError):
            raise BadRequest(str(failure), param="changes") from failure
        if failure is not None:
            raise Unavailable(
                f"the plan took more than its budget of {BUDGET_SECONDS:g} s ({failure}): plan "
                "fewer hours",
                retry_after=1,
            ) from failure
        answer = result.as_dict()
        answer["elapsed_seconds"] = round(time.monotonic() - started, 3)
        answer["limits_used"] = {"max_requests": MAX_REQUESTS, "budget_seconds": BUDGET_SECONDS}
        return _json(answer)

    return bp
