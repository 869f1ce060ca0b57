"""The dashboard's JSON API (``/dashboard/api/...``) and live event stream (``/dashboard/events``).

Reads go to the trace store in a worker thread after a flush, so what a request did is visible
as soon as it has finished. Health is cached for a few seconds and recommendations for five
minutes, so a dashboard polling them costs little. The instruments' series are cached for a
sixtieth of their bucket (1 s for 1-minute buckets, a minute for hourly ones): a week's chart
over a million traces is computed once a minute at most, however many dashboards are open.

The live request feed and the node cards' throughput come from the router's memory (its last
:data:`herd.state.state.TRACE_MEMORY` traces), not the store.
"""

from __future__ import annotations

import functools
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any, TypeVar

import attrs
import trio
from quart import Blueprint, Response, request

from herd import __version__
from herd.config import OPTIONS_BY_NAME, redacted
from herd.core import health as health
from herd.core import instruments
from herd.core.errors import BadRequest, NoEligibleNode, NotFound, parse_json_body
from herd.core.recommend import recommend
from herd.core.timeline import settings_changes
from herd.http import saved_settings
from herd.http.dashboard.bench import BenchmarkRunner
from herd.state.settings import updated
from herd.store import queries
from herd.store.db import StoreError
from herd.store.writer import TraceWriter
from herd.transport import model_admin
from herd.transport.link import Link

T = TypeVar("T")

HEALTH_CACHE_SECONDS = 5.0
RECOMMENDATIONS_CACHE_SECONDS = 300.0
EVENTS_INTERVAL = 2.0
EVENTS_MIN_GAP = 0.25
MAX_EVENT_SUBSCRIBERS = 64
MAX_TRACES = 1000
SERIES_CACHE = 64  # entries
CANCEL_WAIT = 5.0  # seconds a cancel waits for the pull to end
THROUGHPUT_WINDOW = 300.0  # seconds of traces behind a node card's throughput


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, content_type="application/json")


def hours_arg() -> int:
    raw = request.args.get("hours", "24")
    try:
        hours = int(raw)
    except ValueError as exc:
        raise BadRequest(
            f"'hours' must be a whole number of hours, got {raw!r}", param="hours"
        ) from exc
    if not 1 <= hours <= 168:
        raise BadRequest(f"'hours' must be between 1 and 168, got {hours}", param="hours")
    return hours


def window_arg() -> instruments.Window:
    raw = request.args.get("window", "24h")
    try:
        return instruments.window(raw)
    except ValueError as exc:
        raise BadRequest(str(exc), param="window") from exc


def text_arg(name: str) -> str | None:
    value = request.args.get(name)
    return value if value else None


def limit_arg(default: int = 50) -> int:
    raw = request.args.get("limit", str(default))
    try:
        limit = int(raw)
    except ValueError as exc:
        raise BadRequest(f"'limit' must be a whole number, got {raw!r}", param="limit") from exc
    if not 1 <= limit <= MAX_TRACES:
        raise BadRequest(f"'limit' must be between 1 and {MAX_TRACES}, got {limit}", param="limit")
    return limit


async def body_json() -> dict[str, Any]:
    data = await request.get_data(as_text=False)
    return parse_json_body(data if isinstance(data, bytes) else data.encode())


@attrs.define
class Cached:
    value: Any = None
    at: float = -1e18


@functools.cache
def catalog() -> list[dict[str, Any]]:
    """The curated model table (``herd/data/models.json``) the recommendations draw from."""
    text = resources.files("herd").joinpath("data/models.json").read_text(encoding="utf-8")
    models: list[dict[str, Any]] = json.loads(text)["models"]
    return models


def create_blueprint(
    link: Link, store: TraceWriter | None = None, runner: BenchmarkRunner | None = None
) -> Blueprint:
    """The dashboard's API over ``link`` (the router's state, client and configuration),
    ``store`` (the trace writer: the records and statistics come from its database) and
    ``runner`` (the runner of the dashboard's benchmarks, while the router runs)."""
    state, config = link.state, link.config
    bp = Blueprint("dashboard_api", __name__)
    health_cache = Cached()
    recommendations_cache = Cached()
    series_cache: dict[tuple[Any, ...], Cached] = {}
    subscribers = 0

    async def query(fn: Callable[..., T], *args: Any) -> T:
        assert store is not None
        await store.flush()
        return await trio.to_thread.run_sync(
            lambda: queries.run(store.target, lambda connection: fn(connection, *args))
        )

    def since(hours: int) -> float:
        return time.time() - hours * 3600

    @bp.errorhandler(StoreError)
    async def store_unreadable(exc: StoreError) -> Response:
        # The store is away (PostgreSQL down, a locked or broken file): say so, in JSON.
        return _json({"error": f"the trace store can't be read now: {exc}"}, 503)

    @bp.get("/dashboard/api/overview")
    async def overview() -> Response:
        hours = hours_arg()
        figures = await query(queries.overview, since(hours))
        status = link.status_view()
        return _json(
            {
                "hours": hours,
                **figures,
                "fleet": status["fleet"],
                "events": status["events"],
                "pulls": status["pulls"],
            }
        )

    @bp.get("/dashboard/api/trends")
    async def trends() -> Response:
        hours = hours_arg()
        return _json({"hours": hours, "buckets": await query(queries.trends, since(hours))})

    @bp.get("/dashboard/api/models")
    async def models() -> Response:
        hours = hours_arg()
        model = request.args.get("model")
        if model:
            daily = await query(queries.model_daily, since(hours), model)
            return _json({"hours": hours, "model": model, "days": daily})
        return _json({"hours": hours, "models": await query(queries.models, since(hours))})

    @bp.get("/dashboard/api/usage")
    async def usage() -> Response:
        hours = hours_arg()
        return _json({"hours": hours, "usage": await query(queries.usage, since(hours))})

    @bp.get("/dashboard/api/apps")
    async def apps() -> Response:
        hours = hours_arg()
        return _json({"hours": hours, "apps": await query(queries.apps, since(hours))})

    @bp.get("/dashboard/api/apps/daily")
    async def apps_daily() -> Response:
        hours = hours_arg()
        tag = request.args.get("tag")
        return _json(
            {"hours": hours, "tag": tag, "days": await query(queries.apps_daily, since(hours), tag)}
        )

    @bp.get("/dashboard/api/traces")
    async def traces() -> Response:
        limit = limit_arg()
        return _json({"traces": await query(queries.traces, limit)})

    # ------------------------------------------------------------ instruments (#19)
    @bp.get("/dashboard/api/series")
    async def series() -> Response:
        win = window_arg()
        by = request.args.get("by", "none")
        if by not in instruments.BREAKDOWNS:
            raise BadRequest(
                f"'by' must be one of {', '.join(instruments.BREAKDOWNS)}, got {by!r}", param="by"
            )
        model, node, tag = text_arg("model"), text_arg("node"), text_arg("tag")
        key = (win.name, by, model, node, tag)
        now = trio.current_time()
        cached = series_cache.get(key)
        if cached is None or now - cached.at > win.bucket_seconds / 60:
            start, end = win.span(time.time())
            counts, values = await query(
                queries.series_data, start, end, win.bucket_seconds, by, model, node, tag
            )
            value = instruments.series(counts, values, win, start, by)
            value["filters"] = {"model": model, "node": node, "tag": tag}
            while len(series_cache) >= SERIES_CACHE:
                del series_cache[next(iter(series_cache))]
            series_cache[key] = cached = Cached(value, now)
        return _json(cached.value)

    @bp.get("/dashboard/api/timeline")
    async def timeline() -> Response:
        win = window_arg()
        start, end = win.span(time.time())
        await state.timeline.flush()
        found = await query(queries.events, start, end)
        return _json({"window": win.name, "start": start, "end": end, "events": found})

    @bp.get("/dashboard/api/requests")
    async def request_feed() -> Response:
        limit = limit_arg()
        recent = list(state.traces)[-limit:]
        rows = [instruments.feed_row(t.as_dict()) for t in reversed(recent)]
        return _json({"requests": rows, "kept": state.traces.maxlen})

    @bp.get("/dashboard/api/requests/<request_id>")
    async def request_detail(request_id: str) -> Response:
        found = next((t.as_dict() for t in state.traces if t.request_id == request_id), None)
        if found is None:
            found = await query(queries.trace, request_id)
        if found is None:
            raise NotFound(f"no trace of request '{request_id}' (in memory or in the store)")
        return _json({**found, **instruments.feed_row(found)})

    @bp.get("/dashboard/api/pulls")
    async def pulls_view() -> Response:
        return _json({"pulls": link.pulls.views() if link.pulls is not None else []})

    @bp.post("/dashboard/api/pulls")
    async def start_pull() -> Response:
        body = await body_json()
        model = model_admin.requested_model(body)
        node_id = model_admin.requested_node(body)
        node = model_admin.pull_checked(link, model, node_id)
        assert link.pulls is not None
        job = link.pulls.start(model, node, "dashboard", exact=node_id is not None)
        return _json(job.view(), status=202)

    @bp.post("/dashboard/api/pulls/cancel")
    async def cancel_pull() -> Response:
        body = await body_json()
        assert link.pulls is not None
        job = link.pulls.cancel(model_admin.requested_model(body), model_admin.requested_node(body))
        with trio.move_on_after(CANCEL_WAIT):
            await job.done.wait()
        return _json(job.view())

    def benchmark_runner() -> BenchmarkRunner:
        if runner is None:
            raise NoEligibleNode("the benchmark runner is not running")
        return runner

    @bp.get("/dashboard/api/benchmarks/current")
    async def benchmark_current() -> Response:
        return _json(benchmark_runner().view())

    @bp.post("/dashboard/api/benchmarks/run")
    async def benchmark_start() -> Response:
        runner = benchmark_runner()
        run = runner.start(*runner.checked(await body_json()))
        return _json(run.view(), status=202)

    @bp.post("/dashboard/api/benchmarks/cancel")
    async def benchmark_cancel() -> Response:
        run = benchmark_runner().cancel()
        # Bounded by the run itself: cancelled, it only saves what it measured, and that write
        # waits at most SQLite's busy timeout (a timer here would race the worker thread).
        await run.finished.wait()
        return _json(run.view())

    @bp.get("/dashboard/api/benchmarks")
    async def benchmarks() -> Response:
        hours = hours_arg() if "hours" in request.args else 168
        return _json({"runs": await query(queries.benchmarks, since(hours))})

    @bp.post("/dashboard/api/benchmarks")
    async def save_benchmark() -> Response:
        body = await body_json()
        name = body.get("name", "benchmark")
        if not isinstance(name, str):
            raise BadRequest("field 'name' must be a string", param="name")
        data = body.get("results", body)
        run_id = await query(queries.save_benchmark, name, data)
        return _json({"id": run_id, "name": name}, status=201)

    @bp.get("/dashboard/api/health")
    async def health_view() -> Response:
        now = trio.current_time()
        if now - health_cache.at > HEALTH_CACHE_SECONDS:
            hours = 24
            assert store is not None
            storage = store.statistics()
            storage_error = storage.last_error
            try:
                figures = await query(queries.health_figures, since(hours))
            except StoreError as exc:  # the checks from memory still stand; storage says why
                figures = {}
                storage_error = storage_error or f"the trace store can't be read: {exc}"
            result = health.evaluate(
                health.HealthInput(
                    fleet=state.snapshot(),
                    figures=figures,
                    events=state.all_events(),
                    unloads=state.registry.unload_counts(now - hours * 3600),
                    listen_host=config.host,
                    fleet_token_set=bool(config.auth_token),
                    window_hours=hours,
                    storage_error=storage_error,
                    traces_lost=storage.dropped + storage.failed,
                    data_dir=str(config.data_path),
                    state_store=state.shared.health() if state.shared is not None else None,
                )
            )
            health_cache.value = {
                "summary": health.summary(result),
                "checks": [attrs.asdict(c) for c in result],
            }
            health_cache.at = now
        return _json(health_cache.value)

    @bp.get("/dashboard/api/recommendations")
    async def recommendations() -> Response:
        now = trio.current_time()
        if now - recommendations_cache.at > RECOMMENDATIONS_CACHE_SECONDS:
            used = await query(queries.models, since(168))
            recommendations_cache.value = {
                "nodes": recommend(
                    state.snapshot(), {m["model"]: m["requests"] for m in used}, catalog()
                )
            }
            recommendations_cache.at = now
        return _json(recommendations_cache.value)

    def settings_view() -> dict[str, Any]:
        shown = redacted(attrs.asdict(config))
        by_category: dict[str, dict[str, Any]] = {}
        for name, value in shown.items():
            option = OPTIONS_BY_NAME.get(name)
            category = option.category if option is not None else "server"
            by_category.setdefault(category, {})[name] = value
        hostname = socket.gethostname()
        nodes = [
            {
                "node_id": n.node_id,
                "status": n.status.value,
                "agent_version": n.report.agent_version,
                "backend": n.report.backend.kind,
                "backend_version": n.report.backend.version,
                "host": n.report.host,
                "router": n.report.host == hostname,
            }
            for n in state.snapshot().nodes
        ]
        return {
            "settings": attrs.asdict(state.settings),
            "config": by_category,
            "nodes": nodes,
            "router_version": __version__,
        }

    @bp.get("/dashboard/api/settings")
    async def get_settings() -> Response:
        return _json(settings_view())

    @bp.post("/dashboard/api/settings")
    async def post_settings() -> Response:
        before = attrs.asdict(state.settings)
        new = updated(state.settings, await body_json())
        # Saved first: a change that can't be kept is refused, not shown and then lost.
        await saved_settings.save(config.data_path, store.target if store else None, new)
        state.change_settings(new)
        changed = settings_changes(before, attrs.asdict(state.settings))
        if changed:
            state.timeline.record("settings_changed", detail=changed)
        health_cache.at = -1e18
        return _json(settings_view())

    @bp.get("/dashboard/api/model-management")
    async def model_management() -> Response:
        usage = await query(queries.model_node_usage, since(168))
        nodes = []
        for node in state.snapshot().nodes:
            loaded = {m.name: m for m in node.report.loaded_models}
            models = []
            for model in node.report.available_models:
                used = usage.get((node.node_id, model.name), {})
                models.append(
                    {
                        "name": model.name,
                        "size_bytes": model.size_bytes,
                        "family": model.family,
                        "parameter_size": model.parameter_size,
                        "loaded": model.name in loaded,
                        "context_length": loaded[model.name].context_length
                        if model.name in loaded
                        else None,
                        "requests_7d": used.get("requests", 0),
                        "last_used": used.get("last_used"),
                    }
                )
            nodes.append(
                {
                    "node_id": node.node_id,
                    "status": node.status.value,
                    "disk_free_bytes": node.report.disk.free_bytes,
                    "memory_total_bytes": node.report.memory.total_bytes,
                    "models": models,
                }
            )
        return _json({"nodes": nodes})

    @bp.post("/dashboard/api/pull")
    async def dashboard_pull() -> Response:
        body = await body_json()
        model = model_admin.requested_model(body)
        node_id = model_admin.requested_node(body)
        node = model_admin.pull_checked(link, model, node_id)
        if body.get("stream") is False:
            await model_admin.pull_and_wait(link, node, model, "dashboard")
            return _json({"status": "success", "model": model, "node": node.node_id})
        return Response(
            model_admin.pull_progress(link, node, model), content_type="application/x-ndjson"
        )

    @bp.post("/dashboard/api/delete")
    async def dashboard_delete() -> Response:
        body = await body_json()
        node_id = model_admin.requested_node(body)
        result = await model_admin.delete(link, model_admin.requested_model(body), node_id)
        return _json(result, status=200 if result["deleted"] else 502)

    @bp.get("/dashboard/events")
    async def events() -> Response:
        nonlocal subscribers
        if subscribers >= MAX_EVENT_SUBSCRIBERS:
            raise NoEligibleNode("too many dashboard event subscribers; try again later")

        async def stream() -> AsyncIterator[bytes]:
            nonlocal subscribers
            subscribers += 1
            try:
                while True:
                    status = link.status_view()
                    recent = state.traces
                    status["throughput"] = instruments.node_throughput(
                        recent,
                        time.time(),
                        THROUGHPUT_WINDOW,
                        truncated=len(recent) == recent.maxlen,
                    )
                    status["last_request_id"] = recent[-1].request_id if recent else None
                    yield b"event: fleet\ndata: " + json.dumps(status).encode() + b"\n\n"
                    await trio.sleep(EVENTS_MIN_GAP)  # throttle: at most 4 a second
                    with trio.move_on_after(EVENTS_INTERVAL - EVENTS_MIN_GAP):
                        await state.wait_fleet_changed()
            finally:
                subscribers -= 1

        return Response(
            stream(), content_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    return bp
