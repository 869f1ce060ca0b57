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
- **No cookies**: what one node sets is never sent to another.
- **Connections**: herd's own transport (:class:`herd.transport.upstream.NodeTransport`): a
  keep-alive pool per node, one send per request, one chunk per socket read.
- **The fleet token** (``Authorization: Bearer``) goes only to herd's own node agents: a
  node's app (``agent_url``) and its LAN proxy or OpenAI facade (a backend URL the node marks
  ``proxied``). An inference server (Ollama) behind a node never sees it.

:class:`NodeClient` is an ``httpx.AsyncClient`` with this policy and a short way through it for
the requests the router makes (no auth flow, no event hooks, no redirects to follow, no
cookies): ``send`` hands the request straight to the transport, and ``build_request`` parses
each node URL once. Anything else (an ``auth=``, ``follow_redirects=True``) takes httpx's own
way.
"""

from __future__ import annotations

from http.cookiejar import DefaultCookiePolicy
from typing import Any

import httpx

from herd.core.models import NodeReport
from herd.transport.upstream import KEEPALIVE_TOTAL, NodeTransport

CONNECT_TIMEOUT = 10.0
WRITE_TIMEOUT = 60.0
KEEPALIVE_CONNECTIONS = KEEPALIVE_TOTAL
URL_CACHE = 4096  # parsed URLs kept (node URLs repeat; cleared when full)


class NodeClient(httpx.AsyncClient):
    """See the module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        self._nodes = NodeTransport()
        super().__init__(transport=self._nodes, **kwargs)
        self.cookies.jar.set_policy(DefaultCookiePolicy(allowed_domains=[]))  # keeps none
        self._urls: dict[str, httpx.URL] = {}

    def _url(self, url: str) -> httpx.URL:
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) >= URL_CACHE:
                self._urls.clear()
            parsed = self._urls[url] = httpx.URL(url)
        return parsed

    def build_request(self, method: str, url: httpx.URL | str, **kwargs: Any) -> httpx.Request:
        if isinstance(url, str) and url.startswith(("http://", "https://")):
            return super().build_request(method, self._url(url), **kwargs)
        return super().build_request(method, url, **kwargs)

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: Any = httpx.USE_CLIENT_DEFAULT,
        follow_redirects: Any = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        if (
            auth is not httpx.USE_CLIENT_DEFAULT
            or follow_redirects is True
            or self.follow_redirects
            or self.auth is not None
            or any(self.event_hooks.values())
            or self.is_closed
        ):
            return await super().send(
                request, stream=stream, auth=auth, follow_redirects=follow_redirects
            )
        response = await self._nodes.handle_async_request(request)
        response.request = request
        if not stream:
            try:
                await response.aread()
            except BaseException:
                await response.aclose()
                raise
        return response


def upstream_client() -> httpx.AsyncClient:
    """A new client with the policy above (the caller owns and closes it)."""
    return NodeClient(
        headers={"Accept-Encoding": "identity"},
        timeout=httpx.Timeout(connect=CONNECT_TIMEOUT, read=None, write=WRITE_TIMEOUT, pool=None),
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
