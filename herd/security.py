"""Client API keys (``--api-key`` / ``FLEET_API_KEYS``): one ASGI gate in front of the router.

With keys configured, every HTTP endpoint needs one — ``Authorization: Bearer <key>`` (what the
OpenAI SDK sends as its ``api_key``), ``X-Api-Key: <key>``, or, for the dashboard's event stream
which browsers can't give headers, ``?key=<key>`` — except ``GET /`` (liveness), the dashboard's
page and static assets (they hold no data; the page asks for the key), and the nodes' socket
``/fleet/ws`` (which has the fleet token instead). A missing or wrong key is a 401 in the
caller's API shape. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from herd.errors import Unauthorized
from herd.proxy.shaping import flavor_for_path

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

PUBLIC_PATHS = frozenset({"/", "/dashboard", "/dashboard/", "/fleet/ws"})
PUBLIC_PREFIXES = ("/dashboard/static/",)


def presented_key(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            text = str(value.decode("latin-1"))
            if text.lower().startswith("bearer "):
                return text[7:].strip()
        elif name == b"x-api-key":
            return str(value.decode("latin-1")).strip()
    query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
    keys = query.get("key")
    return str(keys[0]) if keys else None


def key_ok(keys: tuple[str, ...], presented: str | None) -> bool:
    if presented is None:
        return False
    # Compare with every key (no early exit), each in constant time.
    matches = [hmac.compare_digest(presented.encode(), key.encode()) for key in keys]
    return any(matches)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class ApiKeyGate:
    def __init__(self, keys: tuple[str, ...], app: Any) -> None:
        self.keys = keys
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.keys
            and scope["type"] == "http"
            and not is_public(scope["path"])
            and not key_ok(self.keys, presented_key(scope))
        ):
            error = Unauthorized(
                "a valid API key is required: send 'Authorization: Bearer "
                "<key>' (the OpenAI SDK's api_key) or 'X-Api-Key: <key>'"
            )
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"www-authenticate", b"Bearer"),
                    ],
                }
            )
            await send(
                {"type": "http.response.body", "body": error.render(flavor_for_path(scope["path"]))}
            )
            return
        await self.app(scope, receive, send)
