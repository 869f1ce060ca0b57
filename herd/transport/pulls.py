"""The router's pull service: models pulled onto nodes by the router itself (auto-pull).

Theory of operation. A pull belongs to the router, never to the request that asked for it: it
runs in the service's own nursery, so a request that gives up (its ``queue_timeout`` passes, or
its client leaves) stops waiting but leaves the pull going for everyone else. One model has at
most one pull in progress (:meth:`PullService.start` returns the running job to a second
caller), and at most :data:`MAX_RUNNING` pulls run at once, so a client cycling through
invented names can't start a download storm. A pull whose name the registry refused is
remembered for :data:`FAILURE_MEMORY` seconds and answered at once.

A job streams the node backend's ``/api/pull`` progress (``total``/``completed`` per layer) into
the job, visible in ``/fleet/status`` and the dashboard with its rate (bytes a second over the
last :data:`RATE_WINDOW` seconds) and the time left at that rate. Every wait is bounded:
connecting by the client policy, and each progress line by :data:`STALL_TIMEOUT` (a node whose
pull stops progressing fails the job, naming the node). When the backend says ``success``, the
job waits (two heartbeats at most) for the node's heartbeat to list the model, so requests
woken by the job's end find it.

An operator may cancel a running pull (:meth:`PullService.cancel`, the dashboard's Cancel):
the job's own cancel scope ends its stream, which closes the connection to the backend (Ollama
stops a pull whose client has gone; what it downloaded stays for the next pull to resume), and
the job ends ``cancelled``; requests waiting on it get an error saying so. Starts, ends and
cancels go to the router's event log (the dashboard's timeline).

Names: a model name may carry a registry host (``host/namespace/model:tag``). Only Ollama's own
registry, and hosts the operator allows (``--pull-host``), are pulled from; others are refused
with 403 before anything is sent (see :func:`check_pull_name`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import attrs
import httpx
import trio

from herd.core.errors import (
    Conflict,
    Forbidden,
    HerdError,
    NodeBadStatus,
    NodeTimeout,
    NoEligibleNode,
    NotFound,
)
from herd.core.models import NodeSnapshot
from herd.transport.bodies import JsonLines, check_encoding, error_detail
from herd.transport.errors import map_node_errors

if TYPE_CHECKING:
    from herd.transport.link import Link

log = logging.getLogger("herd.router")

MAX_RUNNING = 4
STALL_TIMEOUT = 120.0  # seconds a pull may go without a progress line
FAILURE_MEMORY = 60.0  # seconds a refused name is answered from memory
RECENT = 20  # finished jobs kept for the views
RATE_WINDOW = 10.0  # seconds of progress the rate is measured over
MAX_SAMPLES = 256  # progress readings kept for it, at most
DEFAULT_REGISTRY = "registry.ollama.ai"
HEARTBEAT_NOW: dict[str, object] = {"type": "command", "command": "heartbeat"}

PULLING, DONE, FAILED, CANCELLED = "pulling", "done", "failed", "cancelled"


def registry_host(model: str) -> str | None:
    """The registry host a model name names, if any: ``hf.co/user/repo:q4`` → ``hf.co``;
    ``llama3.2:3b`` and ``library/llama3.2`` → None (Ollama's registry)."""
    first, slash, _ = model.partition("/")
    if not slash:
        return None
    if "." in first or ":" in first or first.lower() == "localhost":
        return first.lower()
    return None


def check_pull_name(model: str, allowed_hosts: tuple[str, ...]) -> None:
    """Refuse a pull from a registry host the operator has not allowed. Raises Forbidden."""
    host = registry_host(model)
    if host is None or host == DEFAULT_REGISTRY:
        return
    if host in {h.strip().lower() for h in allowed_hosts}:
        return
    raise Forbidden(
        f"'{model}' names the registry host '{host}', which this router does not pull from; "
        f"an operator can allow it with --pull-host {host} (env FLEET_PULL_HOSTS)",
        param="model",
    )


@attrs.define(eq=False)
class PullJob:
    model: str
    node_id: str
    origin: str  # "auto-pull"
    started_at: float  # wall clock
    status: str = PULLING
    completed: int = 0  # bytes, summed over layers
    total: int = 0
    error: str | None = None
    finished_at: float | None = None  # router clock, for the failure memory
    ended_at: float | None = None  # wall clock
    done: trio.Event = attrs.field(factory=trio.Event)
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    cancel_requested: bool = False
    _layers: dict[str, tuple[int, int]] = attrs.field(factory=dict)
    # (router time, completed bytes) over the last RATE_WINDOW seconds, for the rate.
    _samples: deque[tuple[float, int]] = attrs.field(factory=deque)

    def progress(self, line: dict[str, Any], now: float) -> None:
        digest, total, completed = line.get("digest"), line.get("total"), line.get("completed")
        if isinstance(digest, str) and isinstance(total, int) and total > 0:
            done = completed if isinstance(completed, int) else 0
            self._layers[digest] = (max(0, min(done, total)), total)
            self.completed = sum(c for c, _ in self._layers.values())
            self.total = sum(t for _, t in self._layers.values())
            self._samples.append((now, self.completed))
            while len(self._samples) > 2 and (
                now - self._samples[1][0] >= RATE_WINDOW or len(self._samples) > MAX_SAMPLES
            ):
                self._samples.popleft()

    def rate(self) -> float | None:
        """Bytes a second over the last :data:`RATE_WINDOW` seconds of progress; None before
        two readings apart in time."""
        if len(self._samples) < 2:
            return None
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else None

    def view(self) -> dict[str, Any]:
        rate = self.rate() if self.status == PULLING else None
        left = self.total - self.completed
        return {
            "model": self.model,
            "node": self.node_id,
            "origin": self.origin,
            "status": self.status,
            "completed_bytes": self.completed,
            "total_bytes": self.total,
            "percent": round(100 * self.completed / self.total, 1) if self.total else None,
            "rate_bytes_per_second": round(rate) if rate is not None else None,
            "eta_seconds": round(left / rate, 1) if rate and rate > 0 and self.total else None,
            "error": self.error,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
        }


@attrs.frozen
class PullStatistics:
    running: int
    started: int
    succeeded: int
    failed: int
    cancelled: int


@attrs.define(eq=False)
class PullService:
    link: Link
    running: dict[str, PullJob] = attrs.field(factory=dict)
    recent: deque[PullJob] = attrs.field(factory=lambda: deque(maxlen=RECENT))
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    _nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the pulls until cancelled (the router's nursery runs this)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def statistics(self) -> PullStatistics:
        return PullStatistics(
            len(self.running), self.started, self.succeeded, self.failed, self.cancelled
        )

    def views(self) -> list[dict[str, Any]]:
        """Running pulls, then the last few finished ones (newest first)."""
        return [job.view() for job in self.running.values()] + [
            job.view() for job in reversed(self.recent)
        ]

    def start(self, model: str, target: NodeSnapshot, origin: str, exact: bool = False) -> PullJob:
        """The job pulling ``model``: the one in progress, or a new one onto ``target``.
        With ``exact`` (an operator named the node), a pull of ``model`` in progress onto
        another node is a :class:`Conflict`, not a job to join. Raises :class:`NoEligibleNode`
        when :data:`MAX_RUNNING` pulls are already running."""
        job = self.running.get(model)
        if job is not None:
            if exact and job.node_id != target.node_id:
                raise Conflict(
                    f"{model} is being pulled onto {job.node_id} already; pull it onto "
                    f"{target.node_id} once that is done (or cancel it)",
                    param="model",
                )
            return job
        if len(self.running) >= MAX_RUNNING or self._nursery is None:
            raise NoEligibleNode(
                f"{len(self.running)} pulls are already in progress; try {model} again later",
                retry_after=30,
            )
        job = PullJob(model=model, node_id=target.node_id, origin=origin, started_at=time.time())
        self.running[model] = job
        self.started += 1
        log.info("pulling %s onto %s (%s)", model, target.node_id, origin)
        self._nursery.start_soon(self._pull, job, target)
        return job

    def cancel(self, model: str, node_id: str | None = None) -> PullJob:
        """Cancel the running pull of ``model`` (onto ``node_id``, if given). The job ends
        ``cancelled`` soon after (wait on ``job.done``). Raises :class:`NotFound` when no such
        pull is running."""
        job = self.running.get(model)
        if job is None or (node_id is not None and job.node_id != node_id):
            where = f" onto {node_id}" if node_id else ""
            raise NotFound(f"no pull of {model}{where} is running", param="model")
        job.cancel_requested = True
        job.scope.cancel()
        log.info("cancelling the pull of %s onto %s (asked by an operator)", model, job.node_id)
        return job

    def recent_failure(self, model: str, now: float) -> PullJob | None:
        """A pull of ``model`` that failed less than :data:`FAILURE_MEMORY` seconds ago."""
        for job in reversed(self.recent):
            if job.model == model:
                if (
                    job.status == FAILED
                    and job.finished_at is not None
                    and now - job.finished_at < FAILURE_MEMORY
                ):
                    return job
                return None
        return None

    async def _pull(self, job: PullJob, node: NodeSnapshot) -> None:
        timeline = self.link.state.timeline
        timeline.record("pull_started", node.node_id, job.model, detail=f"by {job.origin}")
        try:
            with job.scope:
                await self._stream(job, node)
                job.status = DONE
                self.succeeded += 1
                log.info("pulled %s onto %s", job.model, node.node_id)
        except HerdError as exc:
            job.status, job.error = FAILED, exc.message
            self.failed += 1
            log.warning("pull of %s onto %s failed: %s", job.model, node.node_id, exc.message)
        finally:
            if job.status == PULLING and job.cancel_requested:
                job.status, job.error = CANCELLED, "cancelled by an operator"
                self.cancelled += 1
            elif job.status == PULLING:  # cancelled: the router is stopping
                job.status, job.error = FAILED, "the router stopped before the pull finished"
            job.finished_at = trio.current_time()
            job.ended_at = time.time()
            del self.running[job.model]
            self.recent.append(job)
            job.done.set()
            kind = {DONE: "pull_done", CANCELLED: "pull_cancelled"}.get(job.status, "pull_failed")
            timeline.record(kind, node.node_id, job.model, detail=job.error or "")
            self.link.state.fleet_changed()

    async def _stream(self, job: PullJob, node: NodeSnapshot) -> None:
        """Pull through the node's backend, reading its progress. Raises HerdError."""
        link = self.link
        url = node.report.backend.url.rstrip("/") + "/api/pull"
        headers = link.backend_headers(node.report)
        body = {"model": job.model, "stream": True}
        node_id = node.node_id
        with map_node_errors(node_id, "while pulling"):
            async with link.client.stream("POST", url, json=body, headers=headers) as response:
                if response.status_code >= 400:
                    raise NodeBadStatus(
                        f"node {node_id}: {await error_detail(response, node_id)}",
                        node_id=node_id,
                        upstream_status=response.status_code,
                    )
                check_encoding(response, node_id)
                success = await self._read_progress(job, response, node_id)
        if not success:
            raise NodeBadStatus(f"node {node_id} ended the pull without success", node_id=node_id)
        await wait_for_model(link, node_id, job.model, present=True)

    async def _read_progress(self, job: PullJob, response: httpx.Response, node_id: str) -> bool:
        lines = JsonLines(f"node {node_id}")
        chunks = response.aiter_raw()
        while True:
            try:
                with trio.fail_after(STALL_TIMEOUT):
                    chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return False
            except trio.TooSlowError as exc:
                raise NodeTimeout(
                    f"node {node_id}'s pull of {job.model} made no progress for "
                    f"{STALL_TIMEOUT:g} s",
                    node_id=node_id,
                ) from exc
            for line in lines.feed(chunk):
                if "error" in line:
                    raise NodeBadStatus(f"node {node_id}: {line['error']}", node_id=node_id)
                job.progress(line, trio.current_time())
                if line.get("status") == "success":
                    return True


async def wait_for_model(link: Link, node_id: str, model: str, present: bool) -> None:
    """Ask the node for a heartbeat now and wait (two heartbeat intervals at most) until it
    reports ``model`` present (or gone)."""
    state = link.state
    state.command(node_id, HEARTBEAT_NOW)
    with trio.move_on_after(2 * link.config.heartbeat_interval + 1):
        while True:
            node = state.snapshot().node(node_id)
            if node is not None and node.has_model(model) == present:
                return
            await state.wait_fleet_changed()
