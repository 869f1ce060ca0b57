"""Benchmarks run from the dashboard: a fixed set of prompts through the router, per target.

Theory of operation. A run measures what a client of this router gets: each request goes to
the router's own address (``/api/chat``, streamed, the router's first API key when keys are
set), so it is shaped, scored, relayed and traced like any other, tagged
:data:`TAG`. A target is a model, on one node (``metadata.node``: no other node may serve it)
or on whichever node the router picks. Per target: one warm-up request (its latency shows a
cold load; not in the figures), then :data:`PROMPTS` ``repeat`` times, one request at a time.
Each request records its TTFT (first byte of the answer), latency (last byte), the node's
generation speed (``eval_count`` over ``eval_duration`` in the final line) and who served.
Answers are fixed in length (``num_predict`` :data:`NUM_PREDICT`, temperature 0, a seed), so
runs compare over time.

Bounds: one run at a time (a second start is a 409), at most :data:`MAX_TARGETS` targets and
:data:`MAX_REPEAT` repeats, each request within :data:`REQUEST_TIMEOUT`, each answer line
within :data:`~herd.transport.bodies.LINE_LIMIT`. The run is a task in the runner's nursery (the
router's): a page that closes doesn't stop it, the dashboard's Cancel does (its cancel scope),
and so does the router stopping. Whatever finished is saved to ``benchmark_runs`` in the store
with the run's status (``done``, ``cancelled`` or ``failed``); start and end go to the event
log.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import attrs
import httpx
import trio

from herd.core.errors import BadRequest, Conflict, NodeBadStatus, NotFound
from herd.core.instruments import benchmark_summary
from herd.core.models import normalize_model_name
from herd.store import queries
from herd.store.db import StoreError
from herd.transport.bodies import JsonLines, error_detail
from herd.transport.errors import describe

if TYPE_CHECKING:
    from herd.store.writer import TraceWriter
    from herd.transport.link import Link

log = logging.getLogger("herd.router")

TAG = "herd-benchmark"
PROMPTS = (
    ("greeting", "Say hello to a new colleague in one short sentence."),
    ("explain", "Explain in three sentences why the sky is blue."),
    ("code", "Write a short Python function that returns the n-th Fibonacci number."),
)
NUM_PREDICT = 128
MAX_TARGETS = 16
MAX_REPEAT = 5
MAX_NAME = 100
REQUEST_TIMEOUT = 300.0
SAVE_TIMEOUT = 10.0
RUNNING, DONE, CANCELLED, FAILED = "running", "done", "cancelled", "failed"
FORMAT = "herd.benchmark/1"  # what a saved run's data says it is


@attrs.frozen
class Target:
    model: str
    node_id: str | None = None  # None: the router chooses

    @property
    def label(self) -> str:
        return f"{self.model} @ {self.node_id or 'any node'}"


@attrs.define(eq=False)
class BenchmarkRun:
    number: int
    name: str
    targets: tuple[Target, ...]
    repeat: int
    started_at: float  # wall clock
    status: str = RUNNING
    done: int = 0
    current: str | None = None
    results: list[dict[str, Any]] = attrs.field(factory=list)
    error: str | None = None
    saved_id: int | None = None
    finished_at: float | None = None
    cancel_requested: bool = False
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    finished: trio.Event = attrs.field(factory=trio.Event)

    @property
    def total(self) -> int:
        return len(self.targets) * (1 + self.repeat * len(PROMPTS))

    def data(self) -> dict[str, Any]:
        """What is saved in the store."""
        return {
            "format": FORMAT,
            "status": self.status,
            "repeat": self.repeat,
            "prompts": [name for name, _ in PROMPTS],
            "num_predict": NUM_PREDICT,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "targets": benchmark_summary(self.results),
            "requests": self.results,
        }

    def view(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "name": self.name,
            "status": self.status,
            "done": self.done,
            "total": self.total,
            "current": self.current,
            "targets": [t.label for t in self.targets],
            "repeat": self.repeat,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "saved_id": self.saved_id,
            "summary": benchmark_summary(self.results),
        }


@attrs.define(eq=False)
class BenchmarkRunner:
    link: Link
    store: TraceWriter | None = None  # where the results are saved
    url: str = ""  # the router's own address, set once it listens
    current: BenchmarkRun | None = None
    last: BenchmarkRun | None = None
    runs: int = 0
    _nursery: trio.Nursery | None = None
    _client: httpx.AsyncClient | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the runs until cancelled (the router's nursery runs this)."""
        timeout = httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None)
        async with (
            httpx.AsyncClient(timeout=timeout, trust_env=False, follow_redirects=False) as client,
            trio.open_nursery() as nursery,
        ):
            self._client, self._nursery = client, nursery
            task_status.started()
            await trio.sleep_forever()

    def view(self) -> dict[str, Any]:
        run = self.current or self.last
        return {
            "running": self.current is not None,
            "run": run.view() if run is not None else None,
            "prompts": [{"name": n, "prompt": p} for n, p in PROMPTS],
            "limits": {"targets": MAX_TARGETS, "repeat": MAX_REPEAT},
        }

    def checked(self, body: dict[str, Any]) -> tuple[str, tuple[Target, ...], int]:
        """The run a request body asks for: ``name``, ``targets`` (``[{"model", "node_id"}]``,
        node optional) and ``repeat``. Raises :class:`BadRequest` naming what is wrong."""
        name = body.get("name") or "benchmark"
        if not isinstance(name, str) or len(name) > MAX_NAME:
            raise BadRequest(f"'name' must be a string of at most {MAX_NAME} characters")
        repeat = body.get("repeat", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, int) or not 1 <= repeat <= MAX_REPEAT:
            raise BadRequest(
                f"'repeat' must be a whole number from 1 to {MAX_REPEAT}, got {repeat!r}",
                param="repeat",
            )
        raw = body.get("targets")
        if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_TARGETS:
            raise BadRequest(f"'targets' must be a list of 1 to {MAX_TARGETS} targets")
        fleet = self.link.state.snapshot()
        targets: list[Target] = []
        for item in raw:
            if not isinstance(item, dict) or not isinstance(item.get("model"), str):
                raise BadRequest('each target must be {"model": "...", "node_id": "..."}')
            model = normalize_model_name(item["model"])
            node_id = item.get("node_id")
            if node_id is not None:
                if not isinstance(node_id, str):
                    raise BadRequest("a target's 'node_id' must be a string")
                node = fleet.node(node_id)
                if node is None:
                    raise BadRequest(f"no node named '{node_id}'", param="targets")
                if not node.has_model(model):
                    raise BadRequest(f"node '{node_id}' has no model '{model}'", param="targets")
            elif not any(n.has_model(model) for n in fleet.nodes):
                raise BadRequest(f"no node has the model '{model}'", param="targets")
            target = Target(model, node_id)
            if target not in targets:
                targets.append(target)
        return name, tuple(targets), repeat

    def start(self, name: str, targets: tuple[Target, ...], repeat: int) -> BenchmarkRun:
        """Start a run. Raises :class:`Conflict` while another is running."""
        if self.current is not None:
            raise Conflict(
                f"benchmark '{self.current.name}' is running ({self.current.done} of "
                f"{self.current.total} requests); cancel it or wait for it to finish"
            )
        assert self._nursery is not None, "the benchmark runner is not running"
        self.runs += 1
        run = BenchmarkRun(self.runs, name, targets, repeat, time.time())
        self.current = run
        self._nursery.start_soon(self._run, run)
        return run

    def cancel(self) -> BenchmarkRun:
        """Cancel the running benchmark. Raises :class:`NotFound` when none is running."""
        run = self.current
        if run is None:
            raise NotFound("no benchmark is running")
        run.cancel_requested = True
        run.scope.cancel()
        return run

    async def _run(self, run: BenchmarkRun) -> None:
        timeline = self.link.state.timeline
        timeline.record("benchmark_started", detail=f"{run.name}: {len(run.targets)} targets")
        log.info("benchmark %s: %d targets, %d requests", run.name, len(run.targets), run.total)
        try:
            with run.scope:
                for target in run.targets:
                    run.current = target.label
                    await self._measure(run, target, PROMPTS[0], warmup=True)
                    for _ in range(run.repeat):
                        for prompt in PROMPTS:
                            await self._measure(run, target, prompt, warmup=False)
                run.status = DONE
        finally:
            if run.status == RUNNING:
                run.status = CANCELLED if run.cancel_requested else FAILED
                if not run.cancel_requested:
                    run.error = "the router stopped before the benchmark finished"
            run.current = None
            run.finished_at = time.time()
            with trio.CancelScope(shield=True), trio.move_on_after(SAVE_TIMEOUT):
                await self._save(run)
            timeline.record(
                "benchmark_finished",
                detail=f"{run.name}: {run.status}, {run.done} of {run.total} requests",
            )
            self.last, self.current = run, None
            run.finished.set()

    async def _save(self, run: BenchmarkRun) -> None:
        store = self.store
        if store is None:
            return
        data = run.data()
        try:
            run.saved_id = await trio.to_thread.run_sync(
                queries.run, store.target, lambda c: queries.save_benchmark(c, run.name, data)
            )
        except StoreError as exc:  # the run is over either way
            run.error = f"could not save the results: {exc}"
            log.warning("benchmark %s: %s", run.name, run.error)

    async def _measure(
        self, run: BenchmarkRun, target: Target, prompt: tuple[str, str], warmup: bool
    ) -> None:
        result: dict[str, Any] = {
            "target": target.label,
            "model_asked": target.model,
            "node_asked": target.node_id,
            "prompt": prompt[0],
            "warmup": warmup,
            "ok": False,
            "ttft_ms": None,
            "latency_ms": None,
            "tokens_per_second": None,
            "completion_tokens": None,
            "node": None,
            "model": None,
            "error": None,
        }
        try:
            await self._request(target, prompt[1], result)
        except trio.TooSlowError:
            result["error"] = f"no answer within {REQUEST_TIMEOUT:g} s"
        except httpx.HTTPError as exc:
            result["error"] = describe(exc)
        run.results.append(result)
        run.done += 1

    async def _request(self, target: Target, text: str, result: dict[str, Any]) -> None:
        """One request through the router, measured into ``result``. Raises
        trio.TooSlowError, httpx.HTTPError."""
        assert self._client is not None
        metadata: dict[str, Any] = {"tags": [TAG]}
        if target.node_id is not None:
            metadata["node"] = target.node_id
        body = {
            "model": target.model,
            "messages": [{"role": "user", "content": text}],
            "stream": True,
            "options": {"num_predict": NUM_PREDICT, "temperature": 0, "seed": 7},
            "metadata": metadata,
        }
        keys = self.link.config.api_keys
        headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
        start = trio.current_time()
        with trio.fail_after(REQUEST_TIMEOUT):
            async with self._client.stream(
                "POST", self.url + "/api/chat", json=body, headers=headers
            ) as response:
                result["node"] = response.headers.get("x-herd-node")
                result["model"] = response.headers.get("x-herd-model")
                if response.status_code >= 400:
                    result["error"] = await error_detail(response, "router")
                    return
                final = await self._read(response, start, result)
        if result["error"] is not None:
            return
        result["latency_ms"] = round((trio.current_time() - start) * 1000, 1)
        count, duration = final.get("eval_count"), final.get("eval_duration")
        if isinstance(count, int) and isinstance(duration, int | float) and duration > 0:
            result["tokens_per_second"] = round(count / (duration / 1e9), 1)
            result["completion_tokens"] = count
        result["ok"] = True

    async def _read(
        self, response: httpx.Response, start: float, result: dict[str, Any]
    ) -> dict[str, Any]:
        """Read the answer's NDJSON lines; the final one (``done``) is returned. An error line
        or an oversized one is put in ``result``."""
        final: dict[str, Any] = {}
        lines = JsonLines("the router")
        async for chunk in response.aiter_raw():
            if result["ttft_ms"] is None and chunk:
                result["ttft_ms"] = round((trio.current_time() - start) * 1000, 1)
            try:
                read = lines.feed(chunk)
            except NodeBadStatus as exc:
                result["error"] = exc.message
                return final
            for data in read:
                if "error" in data:
                    result["error"] = str(data["error"])[:300]
                    return final
                if data.get("done"):
                    final = data
        if not final:
            result["error"] = "the answer ended without its final line"
        return final
