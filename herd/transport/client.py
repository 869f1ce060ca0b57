"""The HTTP client the router uses for every call to a node or its backend.

Policy, and why:
- **Timeouts.** Connecting is bounded (:data:`CONNECT_TIMEOUT`); writes are bounded; reads are
  not: how long a first byte may take is the caller's decision, made with a cancel scope at
  the policy site (``first_byte_timeout`` in dispatch, the pull service's stall deadline), and
  a stream may legitimately go quiet for a long time mid-way (the reaper watches that).
- **No compression.** Every request says ``Accept-Encoding: identity``: the router relays
  backend bytes untouched, and a compressed answer read into memory could inflate without
  bound (a gzip bomb). A node that compresses anyway is refused (see
  :func:`herd.transport.bodies.check_encoding`).
- **No environment.** Proxies and ``.netrc`` from the environment are ignored: nodes are on
  the LAN.
- **Redirects** are never followed (httpx's default): a node can't send the router elsewhere.
- **Connections**: herd's own transport (:class:`herd.transport.upstream.NodeTransport`): a
  keep-alive pool per node, one send per request, one chunk per socket read.
- **The fleet token** (``Authorization: Bearer``) goes only to herd's own node agents: a
  node's app (``agent_url``) and its LAN proxy or OpenAI facade (a backend URL the node marks
  ``proxied``). An inference server (Ollama) behind a node never sees it.
"""

from __future__ import annotations

import httpx

from herd.core.models import NodeReport
from herd.transport.upstream import KEEPALIVE_TOTAL, NodeTransport

CONNECT_TIMEOUT = 10.0
WRITE_TIMEOUT = 60.0
KEEPALIVE_CONNECTIONS = KEEPALIVE_TOTAL


def upstream_client() -> httpx.AsyncClient:
    """A new client with the policy above (the caller owns and closes it)."""
    return httpx.AsyncClient(
        headers={"Accept-Encoding": "identity"},
        timeout=httpx.Timeout(connect=CONNECT_TIMEOUT, read=None, write=WRITE_TIMEOUT, pool=None),
        transport=NodeTransport(),
        trust_env=False,
        follow_redirects=False,
    )


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def backend_headers(report: NodeReport, token: str | None) -> dict[str, str]:
    """Headers for a call to ``report.backend.url``: the fleet token only when that URL is the
    node agent's own proxy (LAN proxy or OpenAI facade), never for a backend called directly."""
    return _bearer(token) if report.backend.proxied else {}


def agent_headers(token: str | None) -> dict[str, str]:
    """Headers for a call to a node agent's own app (``report.agent_url``)."""
    return _bearer(token)
