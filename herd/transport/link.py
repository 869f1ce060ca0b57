"""The router's link to its nodes: what every call to a node needs, in one object.

A :class:`Link` holds the router's live state (:class:`~herd.state.state.RouterState`: where
nodes are, their queues, what was learned), the one HTTP client (:mod:`herd.transport.client`),
the limits the router was started with, and the services that act on nodes for the router (the
pull service, the pre-warmer's job channel). The HTTP surface builds one per router and hands it
to what sends requests to nodes; the state itself knows nothing of HTTP.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import attrs
import httpx
import trio

from herd.config import RouterConfig
from herd.core.models import NodeReport
from herd.state.state import RouterState
from herd.transport.client import agent_headers, backend_headers

if TYPE_CHECKING:
    from herd.transport.pulls import PullService


@attrs.define(eq=False)
class Link:
    state: RouterState
    client: httpx.AsyncClient
    config: RouterConfig
    # The router's own pulls (auto-pull, the dashboard); set while the router runs.
    pulls: PullService | None = None
    # Pre-warm jobs (node_id, model) for the pre-warmer; a full channel drops the job.
    prewarm_send: trio.MemorySendChannel[tuple[str, str]] | None = None

    def backend_headers(self, report: NodeReport) -> dict[str, str]:
        """Headers for a call to the node's backend URL (the fleet token only to a node
        agent's own proxy)."""
        return backend_headers(report, self.config.auth_token)

    def agent_headers(self) -> dict[str, str]:
        """Headers for a call to a node agent's own app."""
        return agent_headers(self.config.auth_token)

    def prewarm(self, node_id: str, model: str) -> None:
        """Ask the pre-warmer to load ``model`` on ``node_id`` (dropped when it is busy)."""
        if self.prewarm_send is not None:
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                self.prewarm_send.send_nowait((node_id, model))

    def status_view(self) -> dict[str, Any]:
        """``/fleet/status``: the state's view with the pull service's jobs."""
        return self.state.status_view(self.pulls.views() if self.pulls is not None else [])
