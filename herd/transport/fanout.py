"""Ollama's load and unload requests, sent to every node that holds the model.

Ollama clients manage models through the inference endpoints: ``/api/generate`` with no prompt
(or ``/api/chat`` with no messages) loads a model, and the same with ``keep_alive: 0`` unloads
it (Open WebUI sends the latter). Behind a router "the model" may be loaded on several nodes,
so:

- **unload** goes to every node where the model is loaded, at once; with none, the answer is
  Ollama's own (``done_reason: "unload"``) without calling anyone;
- **load** goes to every node where it is loaded (it refreshes their ``keep_alive``); with none,
  it is routed like any request (the best node cold-loads it; see :mod:`herd.transport.dispatch`).

The answer is the first node's (Ollama's one object), ``X-Herd-Node`` names every node reached,
and the nodes are asked for a heartbeat at once so ``/api/ps`` is current. A node that fails is
named in ``X-Herd-Failed``; when all fail, the client gets the last error (502). Each call is
bounded by ``first_byte_timeout``.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import attrs
import trio

from herd.core.api.shaping import InferenceRequest
from herd.core.errors import HerdError, NodeBadStatus, NodeTimeout
from herd.core.models import NodeSnapshot, NodeStatus
from herd.state.state import RouterState
from herd.transport.bodies import ANSWER_LIMIT, error_detail, read_limited
from herd.transport.errors import map_node_errors
from herd.transport.link import Link
from herd.transport.pulls import HEARTBEAT_NOW


@attrs.frozen
class FanOut:
    """What the nodes said: the first answer, who was reached, who failed and why."""

    answer: bytes
    reached: tuple[str, ...]
    failed: dict[str, str]


def holders(state: RouterState, model: str) -> list[NodeSnapshot]:
    """Reachable nodes (not offline, backend up) where ``model`` is loaded."""
    return [
        n
        for n in state.snapshot().nodes
        if n.status is not NodeStatus.OFFLINE
        and n.report.backend.healthy
        and n.loaded(model) is not None
    ]


def unloaded_answer(request: InferenceRequest) -> bytes:
    """Ollama's answer to an unload of a model that isn't loaded anywhere."""
    created = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
    body: dict[str, Any] = {"model": request.model, "created_at": created}
    if request.route.name == "ollama.chat":
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    body.update(done=True, done_reason="unload")
    return json.dumps(body).encode()


async def _one(
    link: Link, node: NodeSnapshot, request: InferenceRequest, results: dict[str, Any]
) -> None:
    node_id = node.node_id
    url = node.report.backend.url.rstrip("/") + request.route.upstream_path
    body = {"model": request.model, **request.upstream_body, "stream": False}
    headers = link.backend_headers(node.report)
    try:
        with (
            trio.fail_after(link.config.first_byte_timeout),
            map_node_errors(node_id, "loading or unloading"),
        ):
            async with link.client.stream("POST", url, json=body, headers=headers) as response:
                if response.status_code >= 400:
                    raise NodeBadStatus(
                        f"node {node_id}: {await error_detail(response, node_id)}",
                        node_id=node_id,
                        upstream_status=response.status_code,
                    )
                results[node_id] = await read_limited(response, ANSWER_LIMIT, node_id, "an answer")
    except trio.TooSlowError:
        results[node_id] = NodeTimeout(f"node {node_id} did not answer in time", node_id=node_id)
    except HerdError as exc:
        results[node_id] = exc
    link.state.command(node_id, HEARTBEAT_NOW)


async def fan_out(link: Link, request: InferenceRequest, nodes: list[NodeSnapshot]) -> FanOut:
    """Send ``request`` to every one of ``nodes`` at once. Raises the last error when every
    node failed."""
    results: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        for node in nodes:
            nursery.start_soon(_one, link, node, request, results)
    answers = [results[n.node_id] for n in nodes if isinstance(results.get(n.node_id), bytes)]
    failed = {
        node_id: error.message for node_id, error in results.items() if isinstance(error, HerdError)
    }
    if not answers:
        raise next(e for e in results.values() if isinstance(e, HerdError))
    reached = tuple(n.node_id for n in nodes if isinstance(results.get(n.node_id), bytes))
    return FanOut(answers[0], reached, failed)
