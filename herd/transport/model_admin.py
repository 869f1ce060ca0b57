"""Model management across the fleet: pull and delete.

Pulls and deletes go straight from the router to the node's backend (the address inference
uses), not as commands over the node's WebSocket, and node agents need no model-management
code. A streamed ``/api/pull`` belongs to its client, as in Ollama: progress streams back on the
same response and a client that leaves ends the pull. A pull that must outlive its caller
(auto-pull, ``stream: false``) runs in the router's pull service (:mod:`herd.transport.pulls`).
After a change the router asks the node, over its socket, for an immediate heartbeat, so the
fleet view catches up at once instead of at the next beat.

Every pull is checked against the registry hosts the operator allows
(:func:`herd.transport.pulls.check_pull_name`) before anything is sent.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from herd.core.errors import BadRequest, HerdError, NodeBadStatus, NoEligibleNode, NotFound
from herd.core.models import FleetSnapshot, NodeSnapshot, NodeStatus, normalize_model_name
from herd.state.state import RouterState
from herd.transport.bodies import JsonLines, check_encoding, error_detail
from herd.transport.errors import describe
from herd.transport.link import Link
from herd.transport.pulls import DONE, HEARTBEAT_NOW, check_pull_name, wait_for_model

log = logging.getLogger("herd.router")

DELETE_TIMEOUT = 30.0


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
                f"{', draining' if node.report.draining else ''}"
                f"{', backend down' if not node.report.backend.healthy else ''})"
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


def pull_checked(link: Link, model: str, node_id: str | None) -> NodeSnapshot:
    """Check the name against the allowed registries and choose the target node."""
    check_pull_name(model, link.config.pull_hosts)
    return pull_target(link.state.snapshot(), node_id)


async def pull_and_wait(link: Link, node: NodeSnapshot, model: str, origin: str) -> None:
    """Pull ``model`` onto ``node`` through the router's pull service and wait for it (a
    running pull of the same model is joined). Raises :class:`HerdError`."""
    assert link.pulls is not None
    job = link.pulls.start(model, node, origin)
    await job.done.wait()
    if job.status != DONE:
        raise NodeBadStatus(job.error or "the pull failed", node_id=job.node_id)


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode() + b"\n"


async def pull_progress(link: Link, node: NodeSnapshot, model: str) -> AsyncIterator[bytes]:
    """Stream the backend's pull progress (NDJSON lines) through, each tagged with the node.
    Its start and end go to the event log (a client leaving ends the pull: ``cancelled``)."""
    link.state.timeline.record(
        "pull_started", node.node_id, model, detail="by a client (/api/pull)"
    )
    kind, detail = "pull_cancelled", "the client left before the pull finished"
    try:
        async for line in progress(link, node, "/api/pull", {"model": model, "stream": True}):
            data = json.loads(line)
            if "error" in data:
                kind, detail = "pull_failed", str(data["error"])
            elif data.get("status") == "success":
                kind, detail = "pull_done", ""
            yield line
        if kind == "pull_cancelled":
            kind, detail = "pull_failed", f"node {node.node_id} ended the pull without success"
    finally:
        link.state.timeline.record(kind, node.node_id, model, detail=detail)


async def progress(
    link: Link, node: NodeSnapshot, path: str, body: dict[str, Any]
) -> AsyncIterator[bytes]:
    """POST ``body`` to the node's backend ``path`` (pull, create, push) and stream its NDJSON
    progress through, each line tagged with the node. Lines are read one at a time with
    :data:`LINE_LIMIT`; errors end the stream in-band, as Ollama's own do."""
    url = node.report.backend.url.rstrip("/") + path
    node_id = node.node_id
    ok = False
    try:
        async with link.client.stream(
            "POST", url, json=body, headers=link.backend_headers(node.report)
        ) as response:
            if response.status_code >= 400:
                detail = await error_detail(response, node_id)
                yield _line({"error": f"node {node_id}: {detail}", "node": node_id})
                return
            check_encoding(response, node_id)
            lines = JsonLines(f"node {node_id}")
            async for chunk in response.aiter_raw():
                for data in lines.feed(chunk):
                    data["node"] = node_id
                    ok = ok or data.get("status") == "success"
                    yield _line(data)
    except httpx.TransportError as exc:
        yield _line({"error": f"node {node_id}: {describe(exc)}", "node": node_id})
    except HerdError as exc:
        yield _line({"error": exc.message, "node": node_id})
    if ok:
        link.state.command(node_id, HEARTBEAT_NOW)


async def delete(link: Link, model: str, node_id: str | None = None) -> dict[str, Any]:
    """Delete ``model`` from one node or from every node that has it."""
    fleet = link.state.snapshot()
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
        headers = link.backend_headers(node.report)
        try:
            async with link.client.stream(
                "DELETE", url, json={"model": model}, headers=headers, timeout=DELETE_TIMEOUT
            ) as response:
                if response.status_code >= 400:
                    failed[node.node_id] = (
                        f"node {node.node_id}: {await error_detail(response, node.node_id)}"
                    )
                else:
                    deleted.append(node.node_id)
        except httpx.TransportError as exc:
            failed[node.node_id] = describe(exc)
    for done in deleted:
        link.state.timeline.record("model_deleted", done, model)
    for done in deleted:
        await wait_for_model(link, done, model, present=False)
    return {"model": model, "deleted": deleted, "failed": failed}


def nodes_with(state: RouterState, model: str, node_id: str | None) -> list[NodeSnapshot]:
    """The usable nodes that have ``model`` (only the one named, if ``node_id``). Raises
    :class:`NotFound` naming what is missing."""
    fleet = state.snapshot()
    if node_id is not None:
        node = fleet.node(node_id)
        if node is None:
            raise NotFound(f"no node named '{node_id}'")
        candidates = [node]
    else:
        candidates = list(fleet.nodes)
    found = [n for n in candidates if usable(n) and n.has_model(model)]
    if not found:
        where = f"on node '{node_id}'" if node_id else "on any node"
        raise NotFound(f"model '{model}' not found {where}")
    return found


async def copy(link: Link, source: str, destination: str, node_id: str | None) -> dict[str, Any]:
    """``/api/copy`` on every node that has ``source`` (or the one named), so the new name
    is wherever the model is."""
    copied: list[str] = []
    failed: dict[str, str] = {}
    for node in nodes_with(link.state, source, node_id):
        url = node.report.backend.url.rstrip("/") + "/api/copy"
        headers = link.backend_headers(node.report)
        body = {"source": source, "destination": destination}
        try:
            async with link.client.stream(
                "POST", url, json=body, headers=headers, timeout=DELETE_TIMEOUT
            ) as response:
                if response.status_code >= 400:
                    failed[node.node_id] = (
                        f"node {node.node_id}: {await error_detail(response, node.node_id)}"
                    )
                else:
                    copied.append(node.node_id)
        except httpx.TransportError as exc:
            failed[node.node_id] = describe(exc)
    for done in copied:
        await wait_for_model(link, done, destination, present=True)
    return {"source": source, "destination": destination, "copied": copied, "failed": failed}


def create_target(
    state: RouterState, body: dict[str, Any], blob_nodes: Mapping[str, str]
) -> NodeSnapshot:
    """Where ``/api/create`` runs: the node named; else the node the request's blobs were
    uploaded to; else a node with its ``from`` model; else the node with the most free disk."""
    node_id = requested_node(body)
    files = body.get("files")
    if node_id is None and isinstance(files, dict):
        for digest in files.values():
            if isinstance(digest, str) and digest in blob_nodes:
                node_id = blob_nodes[digest]
                break
    base = body.get("from")
    if node_id is None and isinstance(base, str) and base.strip():
        with contextlib.suppress(NotFound):
            return nodes_with(state, normalize_model_name(base), None)[0]
    return pull_target(state.snapshot(), node_id)
