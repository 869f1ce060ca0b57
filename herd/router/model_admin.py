"""Model management across the fleet: pull and delete.

Pulls and deletes go straight from the router to the node's backend (the address inference
uses), not as commands over the node's WebSocket: progress streams back on the same HTTP
response to the client, and node agents need no model-management code. After a change the router
asks the node, over its socket, for an immediate heartbeat, so the fleet view catches up at once
instead of at the next beat.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import trio

from herd.errors import (
    BadRequest,
    HerdError,
    NodeBadStatus,
    NodeUnreachable,
    NoEligibleNode,
    NotFound,
)
from herd.models import FleetSnapshot, NodeSnapshot, NodeStatus, normalize_model_name
from herd.router.state import PendingPull, RouterState

log = logging.getLogger("herd.router")

HEARTBEAT_NOW: dict[str, object] = {"type": "command", "command": "heartbeat"}


def usable(node: NodeSnapshot) -> bool:
    return (
        node.status is NodeStatus.ONLINE
        and node.report.backend.healthy
        and not node.report.draining
    )


def pull_target(fleet: FleetSnapshot, node_id: str | None = None) -> NodeSnapshot:
    """The node a pull goes to: the one named, or the usable node with the most free disk
    (then memory). Raises :class:`NotFound` / :class:`NoEligibleNode`."""
    if node_id is not None:
        node = fleet.node(node_id)
        if node is None:
            raise NotFound(f"no node named '{node_id}'")
        if not usable(node):
            raise NoEligibleNode(
                f"node '{node_id}' can't take a pull now ({node.status.value}"
                f"{', draining' if node.report.draining else ''})"
            )
        return node
    nodes = [n for n in fleet.nodes if usable(n)]
    if not nodes:
        raise NoEligibleNode("no online node with a healthy backend to pull to")
    return max(nodes, key=lambda n: (n.report.disk.free_bytes, n.report.memory.available_bytes))


def requested_node(body: dict[str, Any]) -> str | None:
    """The optional ``node_id`` of a pull or delete. Raises BadRequest if it isn't a string."""
    node_id = body.get("node_id")
    if node_id is not None and not isinstance(node_id, str):
        raise BadRequest("field 'node_id' must be a string", param="node_id")
    return node_id


def requested_model(body: dict[str, Any]) -> str:
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise BadRequest("missing required field 'model' (or 'name')", param="model")
    return normalize_model_name(name)


async def _backend_error(response: httpx.Response, node_id: str) -> NodeBadStatus:
    text = (await response.aread())[:300].decode("utf-8", "replace")
    with contextlib.suppress(ValueError, AttributeError):
        text = str(json.loads(text).get("error", text))
    return NodeBadStatus(
        f"node {node_id}: {text}", node_id=node_id, upstream_status=response.status_code
    )


async def wait_for_model(state: RouterState, node_id: str, model: str, present: bool) -> None:
    """Ask the node for a heartbeat now and wait (two heartbeat intervals at most) until it
    reports ``model`` present (or gone)."""
    state.command(node_id, HEARTBEAT_NOW)
    with trio.move_on_after(2 * state.config.heartbeat_interval + 1):
        while True:
            node = state.snapshot().node(node_id)
            if node is not None and node.has_model(model) == present:
                return
            await state.wait_fleet_changed()


async def pull(state: RouterState, node: NodeSnapshot, model: str) -> None:
    """Pull ``model`` onto ``node`` and wait until its heartbeat shows it. Raises NodeError."""
    url = node.report.backend.url.rstrip("/") + "/api/pull"
    try:
        response = await state.client.post(
            url, json={"model": model, "stream": False}, timeout=httpx.Timeout(10.0, read=None)
        )
    except httpx.TransportError as exc:
        raise NodeUnreachable(
            f"node {node.node_id}: {type(exc).__name__}: {exc}", node_id=node.node_id
        ) from exc
    if response.status_code >= 400:
        raise await _backend_error(response, node.node_id)
    log.info("pulled %s onto %s", model, node.node_id)
    await wait_for_model(state, node.node_id, model, present=True)


async def pull_once(state: RouterState, model: str) -> str:
    """Pull ``model`` to the best node, sharing one pull among concurrent callers. Returns the
    node id. Raises :class:`HerdError` (the same one for every caller) when it fails."""
    pending = state.pulls.get(model)
    if pending is not None:
        await pending.done.wait()
    else:
        pending = state.pulls[model] = PendingPull()
        try:
            node = pull_target(state.snapshot())
            pending.node_id = node.node_id
            await pull(state, node, model)
        except HerdError as exc:
            pending.error = exc.message
        finally:
            if pending.error is None and pending.node_id is None:
                pending.error = "the pull was cancelled"
            del state.pulls[model]
            pending.done.set()
    if pending.error is not None:
        raise NodeBadStatus(pending.error, node_id=pending.node_id or "")
    assert pending.node_id is not None
    return pending.node_id


async def pull_progress(state: RouterState, node: NodeSnapshot, model: str) -> AsyncIterator[bytes]:
    """Stream the backend's pull progress (NDJSON lines) through, each tagged with the node."""
    url = node.report.backend.url.rstrip("/") + "/api/pull"
    ok = False
    try:
        async with state.client.stream(
            "POST",
            url,
            json={"model": model, "stream": True},
            timeout=httpx.Timeout(10.0, read=None),
        ) as response:
            if response.status_code >= 400:
                error = await _backend_error(response, node.node_id)
                yield json.dumps({"error": error.message, "node": node.node_id}).encode() + b"\n"
                return
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except ValueError:
                    continue
                if isinstance(data, dict):
                    data["node"] = node.node_id
                    ok = ok or data.get("status") == "success"
                    yield json.dumps(data).encode() + b"\n"
    except httpx.TransportError as exc:
        message = f"node {node.node_id}: {type(exc).__name__}: {exc}"
        yield json.dumps({"error": message, "node": node.node_id}).encode() + b"\n"
    if ok:
        state.command(node.node_id, HEARTBEAT_NOW)


async def delete(state: RouterState, model: str, node_id: str | None = None) -> dict[str, Any]:
    """Delete ``model`` from one node or from every node that has it."""
    fleet = state.snapshot()
    if node_id is not None:
        node = fleet.node(node_id)
        if node is None:
            raise NotFound(f"no node named '{node_id}'")
        targets = [node]
    else:
        targets = [n for n in fleet.nodes if n.has_model(model)]
    if not any(n.has_model(model) for n in targets):
        where = f"on node '{node_id}'" if node_id else "on any node"
        raise NotFound(f"model '{model}' not found {where}")
    deleted: list[str] = []
    failed: dict[str, str] = {}
    for node in targets:
        url = node.report.backend.url.rstrip("/") + "/api/delete"
        try:
            response = await state.client.request("DELETE", url, json={"model": model}, timeout=30)
        except httpx.TransportError as exc:
            failed[node.node_id] = f"{type(exc).__name__}: {exc}"
            continue
        if response.status_code >= 400:
            failed[node.node_id] = (await _backend_error(response, node.node_id)).message
        else:
            deleted.append(node.node_id)
    for done in deleted:
        await wait_for_model(state, done, model, present=False)
    return {"model": model, "deleted": deleted, "failed": failed}
