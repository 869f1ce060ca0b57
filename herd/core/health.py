"""Fleet health: every check of SPEC §8, each with a severity, the evidence and the fix.

Pure: :func:`evaluate` takes a :class:`HealthInput` (a fleet snapshot, figures from the trace
store over a window, the router's event counters, recent model unloads, the listen address) and
returns the checks. Thresholds live in :class:`Thresholds`, all in one place.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from herd.core import memory
from herd.core.models import FleetSnapshot, MemoryPressure, NodeStatus

OK, INFO, WARNING, CRITICAL = "ok", "info", "warning", "critical"
SEVERITY_ORDER = {CRITICAL: 0, WARNING: 1, INFO: 2, OK: 3}


@attrs.frozen
class Thresholds:
    error_rate_warning: float = 0.05
    error_rate_critical: float = 0.20
    retry_rate_warning: float = 0.10
    disconnect_rate_warning: float = 0.10
    vram_fallback_share_warning: float = 0.20
    kv_cache_tokens_warning: int = 131_072  # parallel slots x loaded context
    thrash_unloads_warning: int = 3  # unloads of one node:model within the window
    underused_min_fleet_requests: int = 20
    min_requests_for_rates: int = 10


@attrs.frozen
class HealthCheck:
    id: str
    title: str
    severity: str
    evidence: str
    fix: str


@attrs.frozen
class StateStoreHealth:
    """The shared state store as the router last found it (herd.shared.service)."""

    url: str
    available: bool
    last_error: str | None = None
    unavailable_for_s: float | None = None
    outages: int = 0
    routers: int = 0


@attrs.frozen
class HealthInput:
    fleet: FleetSnapshot
    figures: Mapping[str, object]  # herd.store.queries.health_figures over the window
    events: Mapping[str, int]
    unloads: Mapping[tuple[str, str], int]  # (node, model) -> unloads within the window
    listen_host: str
    fleet_token_set: bool
    window_hours: int
    # The trace store: the last write failure while writes keep failing, and traces lost.
    storage_error: str | None = None
    traces_lost: int = 0
    data_dir: str = ""
    # The shared state store (--state), when the router has one.
    state_store: StateStoreHealth | None = None


def _n(figures: Mapping[str, object], key: str) -> int:
    value = figures.get(key)
    return int(value) if isinstance(value, int | float) else 0


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def evaluate(data: HealthInput, t: Thresholds | None = None) -> list[HealthCheck]:
    t = t or Thresholds()
    checks: list[HealthCheck] = []

    def add(id_: str, title: str, severity: str, evidence: str, fix: str) -> None:
        checks.append(HealthCheck(id_, title, severity, evidence, fix))

    nodes = data.fleet.nodes
    window = f"in the last {data.window_hours} h"
    requests = _n(data.figures, "requests")

    offline = [n.node_id for n in nodes if n.status is NodeStatus.OFFLINE]
    add(
        "offline_nodes",
        "Offline nodes",
        (CRITICAL if offline and len(offline) == len(nodes) else WARNING) if offline else OK,
        f"offline: {', '.join(offline)}" if offline else f"all {len(nodes)} nodes connected",
        "Start `herd-node` on those machines, or check they can reach the router (`--router-url`).",
    )

    degraded = [n.node_id for n in nodes if n.status is NodeStatus.DEGRADED]
    add(
        "degraded_nodes",
        "Degraded nodes (late heartbeats)",
        WARNING if degraded else OK,
        f"degraded: {', '.join(degraded)}" if degraded else "every node reports on time",
        "A degraded node is overloaded or its network is flaky; check its CPU and the link.",
    )

    pressed = [
        (n.node_id, n.report.memory.pressure)
        for n in nodes
        if n.status is not NodeStatus.OFFLINE
        and n.report.memory.pressure is not MemoryPressure.NORMAL
    ]
    critical_memory = any(p is MemoryPressure.CRITICAL for _, p in pressed)
    add(
        "memory_pressure",
        "Memory pressure",
        CRITICAL if critical_memory else WARNING if pressed else OK,
        ", ".join(f"{node}: {p.value}" for node, p in pressed) or "no node is short of memory",
        "Unload models you don't use on those nodes, lower OLLAMA_NUM_PARALLEL or num_ctx, "
        "or close other applications.",
    )

    per_node = data.figures.get("requests_per_node")
    per_node = per_node if isinstance(per_node, Mapping) else {}
    idle = [
        n.node_id for n in nodes if n.status is NodeStatus.ONLINE and not per_node.get(n.node_id)
    ]
    underused = requests >= t.underused_min_fleet_requests and bool(idle)
    add(
        "underutilized_nodes",
        "Underutilised nodes",
        INFO if underused else OK,
        f"no requests {window} on: {', '.join(idle)} (fleet served {requests})"
        if underused
        else "every online node took work"
        if requests
        else "no traffic yet",
        "Pull the models your apps use onto those nodes (see Recommendations).",
    )

    vram = data.events.get("vram_fallbacks", 0)
    share = _rate(vram, requests)
    add(
        "vram_fallbacks",
        "VRAM fallbacks",
        # Substitution is opt-in, but a high share means clients mostly don't get the model
        # they name: that is an error, not a curiosity.
        CRITICAL if share >= t.vram_fallback_share_warning else INFO if vram else OK,
        f"{vram} of {requests} requests ({share:.0%}) were served by a loaded stand-in model, "
        "not the model they asked for"
        if vram
        else "every request got the model it asked for (or one it named as a fallback)",
        "If the exact model matters, turn vram_fallback off (it is off by default), keep that "
        "model loaded (more memory, or OLLAMA_MAX_LOADED_MODELS), or have clients send "
        "allow_substitution: false.",
    )

    spilled = [
        (n.node_id, m, share)
        for n in nodes
        if n.status is not NodeStatus.OFFLINE
        for m, share in memory.spilled(n.report)
    ]
    add(
        "spilled_models",
        "Models spilled out of VRAM (partly on the CPU)",
        WARNING if spilled else OK,
        ", ".join(
            f"{node}:{m.name} has {share:.0%} outside the accelerator "
            f"({(m.size_bytes - m.vram_bytes) / 2**30:.1f} of {m.size_bytes / 2**30:.1f} GiB)"
            for node, m, share in spilled
        )
        or "every loaded model is wholly on its node's accelerator (or the node has none)",
        "A spilled model runs several times slower, and herd routes around it where it can. "
        "Use a smaller quantisation of it (e.g. q4_K_M instead of q8_0) or a smaller context "
        "(num_ctx), put it on a node with more VRAM, or load fewer models together there "
        "(OLLAMA_MAX_LOADED_MODELS=1, a shorter keep_alive for the others).",
    )

    bloated = [
        (n.node_id, m.name, n.report.parallel_slots * m.context_length)
        for n in nodes
        for m in n.report.loaded_models
        if n.report.parallel_slots * m.context_length >= t.kv_cache_tokens_warning
    ]
    add(
        "kv_cache_bloat",
        "KV-cache bloat (parallel slots x context)",
        WARNING if bloated else OK,
        ", ".join(f"{node}:{model} reserves {tokens:,} tokens" for node, model, tokens in bloated)
        or "no loaded model reserves an outsized KV cache",
        "Set OLLAMA_NUM_PARALLEL to 2-4 on those nodes (and restart Ollama), or use a smaller "
        "context: each slot reserves the whole context window.",
    )

    backend_versions = {n.report.backend.version for n in nodes if n.report.backend.version}
    agent_versions = {n.report.agent_version for n in nodes if n.report.agent_version}
    mismatch = len(backend_versions) > 1 or len(agent_versions) > 1
    add(
        "version_mismatch",
        "Version mismatch",
        WARNING if mismatch else OK,
        f"backends: {', '.join(sorted(backend_versions)) or '-'}; "
        f"agents: {', '.join(sorted(agent_versions)) or '-'}",
        "Upgrade Ollama and herd to the same versions on every node.",
    )

    stripped = data.events.get("context_stripped", 0)
    upgraded = data.events.get("context_upgraded", 0)
    passthrough = data.events.get("context_passthrough", 0)
    add(
        "context_protection",
        "Context protection",
        WARNING if passthrough else INFO if stripped or upgraded else OK,
        f"num_ctx stripped {stripped}x, upgraded {upgraded}x, passed through (reload) "
        f"{passthrough}x",
        "Requests asking for more context than any loaded model has cause reloads: load the "
        "model with a larger num_ctx once (OLLAMA_CONTEXT_LENGTH) or ask for less.",
    )

    reaped = data.events.get("reaped", 0)
    add(
        "zombie_reaper",
        "Zombie reaper",
        WARNING if reaped else OK,
        f"{reaped} stuck requests were reaped" if reaped else "no request got stuck",
        "A node's backend stopped sending mid-request: check its Ollama log; raise "
        "stale_timeout if very slow models are involved.",
    )

    thrashing = [(key, n) for key, n in data.unloads.items() if n >= t.thrash_unloads_warning]
    add(
        "model_thrashing",
        "Model thrashing (repeated cold loads)",
        WARNING if thrashing else OK,
        ", ".join(f"{node}:{model} unloaded {n}x" for (node, model), n in thrashing)
        or "no model is being loaded and unloaded repeatedly",
        "Too many models compete for one node's memory: set OLLAMA_KEEP_ALIVE=-1, spread the "
        "models over more nodes, or lower OLLAMA_NUM_PARALLEL.",
    )

    timeouts = _n(data.figures, "timeouts")
    add(
        "request_timeouts",
        "Request timeouts",
        WARNING if timeouts else OK,
        f"{timeouts} requests got no first byte in time {window}"
        if timeouts
        else f"no timeouts {window}",
        "Cold loads of big models can exceed --first-byte-timeout: raise it, or keep the "
        "model loaded.",
    )

    failed = _n(data.figures, "failed") + _n(data.figures, "incomplete")
    error_rate = _rate(failed, requests)
    enough = requests >= t.min_requests_for_rates
    add(
        "error_rate",
        "Error rate",
        (
            CRITICAL
            if error_rate >= t.error_rate_critical
            else WARNING
            if error_rate >= t.error_rate_warning
            else OK
        )
        if enough
        else OK,
        f"{failed} of {requests} requests failed {window} ({error_rate:.1%})",
        "Look at the failed traces (error_message) in the Traces view or with sqlite3.",
    )

    retries = _n(data.figures, "retries")
    retry_rate = _rate(retries, requests)
    add(
        "retry_rate",
        "Retry rate",
        WARNING if enough and retry_rate >= t.retry_rate_warning else OK,
        f"{retries} retries for {requests} requests {window} ({retry_rate:.1%})",
        "Retries mean nodes fail before answering: check the backends of the excluded nodes.",
    )

    gone = _n(data.figures, "client_disconnected")
    gone_rate = _rate(gone, requests)
    add(
        "client_disconnects",
        "Client disconnects",
        WARNING if enough and gone_rate >= t.disconnect_rate_warning else INFO if gone else OK,
        f"{gone} clients hung up before their answer was complete {window}",
        "Clients giving up usually means answers are too slow: check queue depths and "
        "latency; raise client timeouts.",
    )

    incomplete = _n(data.figures, "incomplete")
    add(
        "incomplete_streams",
        "Incomplete streams",
        WARNING if incomplete else OK,
        f"{incomplete} answers broke off mid-stream {window}",
        "A backend died while answering: check that node's Ollama log and memory.",
    )

    unreachable = [
        n.node_id
        for n in nodes
        if n.status is not NodeStatus.OFFLINE and not n.report.backend.healthy
    ]
    add(
        "backend_unreachable",
        "Backend unreachable",
        CRITICAL if unreachable else OK,
        ", ".join(
            f"{n.node_id}: {n.report.backend.error}" for n in nodes if n.node_id in unreachable
        )
        or "every node reaches its backend",
        "Start Ollama on those machines (`ollama serve`) or fix --ollama-url.",
    )

    add(
        "storage",
        "Trace storage",
        CRITICAL if data.storage_error else WARNING if data.traces_lost else OK,
        data.storage_error
        or (
            f"{data.traces_lost} traces were lost (queue full or failed writes)"
            if data.traces_lost
            else f"traces are written to {data.data_dir or 'the data directory'}"
        ),
        "Free space on the disk of the data directory (or make it writable); routing goes on "
        "meanwhile, but the dashboard's history has a gap."
        if data.storage_error
        else "Nothing to do."
        if not data.traces_lost
        else "Check the disk and the router's log.",
    )

    store = data.state_store
    if store is not None:
        add(
            "state_store",
            "Shared state store",
            OK if store.available else CRITICAL,
            f"{store.url}: {store.routers} router(s) share the fleet"
            + (
                f"; it was away {store.outages} time(s) since this router started"
                if store.outages
                else ""
            )
            if store.available
            else f"{store.url} unreachable"
            + (
                f" for {store.unavailable_for_s:.0f} s"
                if store.unavailable_for_s is not None
                else ""
            )
            + f": {store.last_error or 'no answer'}. This router routes on its own counts: the "
            "other routers' requests are not counted, so a node may get more than its slots",
            "Nothing to do."
            if store.available
            else "Start the Valkey/Redis server (or fix --state); the router reconciles by itself "
            "when it answers again.",
        )

    exposed = data.listen_host not in ("127.0.0.1", "localhost", "::1")
    add(
        "unauthenticated_router",
        "Router reachable without a fleet token",
        CRITICAL if exposed and not data.fleet_token_set else OK,
        f"listening on {data.listen_host} with no --auth-token: any machine that can reach it "
        "can join as a node and receive prompts"
        if exposed and not data.fleet_token_set
        else "fleet token set or router on loopback only",
        "Set FLEET_AUTH_TOKEN on the router and on every node, so only your nodes can join.",
    )

    return sorted(checks, key=lambda c: SEVERITY_ORDER[c.severity])


def summary(checks: list[HealthCheck]) -> dict[str, int]:
    counts = {CRITICAL: 0, WARNING: 0, INFO: 0, OK: 0}
    for check in checks:
        counts[check.severity] += 1
    return counts
