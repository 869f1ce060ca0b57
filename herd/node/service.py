"""The node as a service: the heartbeat agent plus the node's own small HTTP app.

Embeddable like the router::

    async with trio.open_nursery() as nursery:
        await nursery.start(Node(NodeConfig(router_url=url, port=0)).run)
"""

from __future__ import annotations

import json
import logging
import socket

import attrs
import trio
from quart import Response
from quart_trio import QuartTrio

from herd.config import NodeConfig
from herd.node.agent import AgentConfig, NodeAgent
from herd.server import serve_app
from herd.wire import unstructure

log = logging.getLogger("herd.node")


class NodeConfigError(ValueError):
    """The node can't start with this configuration; the message says what to change."""


def agent_config(config: NodeConfig) -> AgentConfig:
    if not config.router_url:
        raise NodeConfigError(
            "no router URL: pass --router-url http://ROUTER-HOST:11435 "
            "(or set FLEET_NODE_ROUTER_URL)"
        )
    if config.backend != "ollama":
        raise NodeConfigError(
            f"backend {config.backend!r} is not supported by this version; use --backend ollama"
        )
    return AgentConfig(
        router_url=config.router_url.rstrip("/"),
        ollama_url=config.ollama_url.rstrip("/"),
        node_id=config.node_id or socket.gethostname(),
        heartbeat_interval=config.heartbeat_interval,
        # Reconnect at least once per heartbeat interval: after a router restart the fleet is
        # whole again within two intervals.
        backoff_max=config.heartbeat_interval,
        parallel_slots=config.parallel_slots or 4,
        auth_token=config.auth_token,
    )


def create_node_app(agent: NodeAgent) -> QuartTrio:
    app = QuartTrio("herd-node")

    @app.get("/")
    async def root() -> Response:
        return Response("herd node is running", content_type="text/plain")

    @app.get("/node/status")
    async def status() -> Response:
        report = agent.last_report
        stats = agent.statistics()
        body = {
            "report": unstructure(report) if report is not None else None,
            "connected": stats.connected,
            "heartbeats_sent": stats.heartbeats_sent,
            "reconnects": stats.reconnects,
            "last_error": stats.last_error,
        }
        return Response(json.dumps(body), content_type="application/json")

    return app


@attrs.define(eq=False)
class Node:
    config: NodeConfig
    serve_http: bool = True
    agent: NodeAgent | None = None
    url: str | None = None

    async def drain(self) -> bool:
        """Stop taking work: announce draining and wait (up to ``drain_timeout``) until the
        router says none of this node's requests are in flight. Returns True if drained."""
        agent = self.agent
        if agent is None:
            return True
        await agent.drain()
        if not agent.connected:
            return True
        with trio.move_on_after(self.config.drain_timeout):
            await agent.drained.wait()
            log.info("drained: no requests left in flight")
            return True
        log.warning("drain timed out after %.0f s; stopping anyway", self.config.drain_timeout)
        return False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. Started once the node's HTTP app (if any) is listening and the
        agent is running (it connects, and reconnects, on its own)."""
        self.agent = NodeAgent(agent_config(self.config))
        async with trio.open_nursery() as nursery:
            if self.serve_http:
                self.url = await nursery.start(
                    serve_app, create_node_app(self.agent), self.config.host, self.config.port
                )
                log.info("node listening on %s", self.url)
            await nursery.start(self.agent.run)
            task_status.started()
