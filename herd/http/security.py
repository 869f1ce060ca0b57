"""The router's front door: request-head limits, what may open a WebSocket, client API keys, and
who may change operator state. Two ASGI layers in front of everything else.

:class:`FrontGuard` (outermost):
- **Head limits.** A request's headers may total at most :data:`MAX_HEADER_BYTES` (16 KiB)
  and number at most :data:`MAX_HEADERS`; beyond either, 431. (hypercorn bounds a head that
  arrives in pieces; this bounds one that arrives in a single read too.) A request with both
  ``Content-Length`` and ``Transfer-Encoding`` is a 400. Every refusal here closes the
  connection: after a framing problem nothing more on it can be trusted.
- **WebSockets** are for the nodes' socket ``/fleet/ws`` only: a handshake to any other path
  is refused (403) before it reaches the app.
- **Operator writes** (``POST``/``DELETE`` under ``/dashboard/api/``: settings, pulls,
  deletes, benchmarks) must be JSON (``Content-Type: application/json``, else 415) and must
  not come from another site (an ``Origin`` that isn't this router's own, or
  ``Sec-Fetch-Site: cross-site``, is 403). A web page elsewhere can't submit a form to the
  router, and CORS never opens these paths.
- **CORS**, as Ollama does it: browser apps on allowed origins may call the API from another
  origin. Allowed by default: ``localhost``, ``127.0.0.1`` and ``0.0.0.0`` on any port (http
  and https), and the app schemes ``app://``, ``file://``, ``tauri://``,
  ``vscode-webview://`` and ``vscode-file://`` (Ollama's own list). Browser extensions are not
  allowed by default, as in Ollama (any installed extension could then call the fleet); list
  them (``chrome-extension://*``, ``moz-extension://*``, or one extension's id) with
  ``--origins`` / ``FLEET_ORIGINS`` or Ollama's own ``OLLAMA_ORIGINS``, which add more (comma
  lists; ``*`` wildcards). A request whose ``Origin`` is
  neither allowed nor the router's own is refused (403), as Ollama refuses it; a preflight
  (``OPTIONS`` with ``Access-Control-Request-Method``) on any API path is answered 204 with
  the allowed method and headers. Answers carry ``Access-Control-Allow-Origin`` (the origin
  itself) and expose the ``X-Herd-*`` headers. The dashboard's API and the nodes' socket are
  never opened to other origins.

:class:`ApiKeyGate`: with keys configured (``--api-key`` / ``FLEET_API_KEYS``), every HTTP
endpoint needs one — ``Authorization: Bearer <key>`` (what the OpenAI SDK sends as its
``api_key``) or ``X-Api-Key: <key>`` — except ``GET /`` (liveness), the dashboard's page and
static assets (they hold no data; the page asks for the key), and the nodes' socket
``/fleet/ws`` (which has the fleet token instead). The dashboard's event stream
(``/dashboard/events``) may also carry it as ``?key=<key>``, because a browser's EventSource
can't send headers; no other path reads a key from the URL (URLs end up in logs and
histories). A missing or wrong key is a 401 in the caller's API shape. Keys are compared in
constant time and never logged.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from herd.core.api.shaping import flavor_for_path
from herd.core.errors import BadRequest, Forbidden, HerdError, Unauthorized, Unavailable

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

PUBLIC_PATHS = frozenset({"/", "/dashboard", "/dashboard/", "/fleet/ws"})
PUBLIC_PREFIXES = ("/dashboard/static/",)
KEY_IN_QUERY_PATHS = frozenset({"/dashboard/events"})
WEBSOCKET_PATHS = frozenset({"/fleet/ws"})
OPERATOR_PREFIX = "/dashboard/api/"
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 100
DEFAULT_ORIGINS = (
    "http://localhost",
    "https://localhost",
    "http://localhost:*",
    "https://localhost:*",
    "http://127.0.0.1",
    "https://127.0.0.1",
    "http://127.0.0.1:*",
    "https://127.0.0.1:*",
    "http://0.0.0.0",
    "https://0.0.0.0",
    "http://0.0.0.0:*",
    "https://0.0.0.0:*",
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)
CORS_METHODS = b"GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
CORS_EXPOSED = (
    b"X-Herd-Node, X-Herd-Model, X-Herd-Retries, X-Herd-Fallback, X-Herd-Request-Id, Retry-After"
)
CORS_MAX_AGE = b"600"


# What a connection past the router's limit may still serve (herd.server's reserve): the
# nodes' socket, the dashboard and its API, the fleet's status and metrics.
RESERVED_PATHS = frozenset({"/fleet/ws", "/fleet/status", "/metrics", "/dashboard"})
RESERVED_PREFIXES = ("/dashboard/",)


def reserved_path(path: str) -> bool:
    return path in RESERVED_PATHS or path.startswith(RESERVED_PREFIXES)


def header_value(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def presented_key(scope: Mapping[str, Any]) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            text = str(value.decode("latin-1"))
            if text.lower().startswith("bearer "):
                return text[7:].strip()
        elif name == b"x-api-key":
            return str(value.decode("latin-1")).strip()
    if scope.get("path") in KEY_IN_QUERY_PATHS:
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        keys = query.get("key")
        return str(keys[0]) if keys else None
    return None


def key_owner(scope: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    """Who a request's stored things belong to (see :mod:`herd.core.responses_store`): on a
    router with API ``keys``, a digest of the key it presented; without, "" for every caller
    (whatever placeholder key an SDK sends)."""
    presented = presented_key(scope) if keys else None
    return hashlib.sha256(presented.encode()).hexdigest() if presented else ""


def key_ok(keys: tuple[str, ...], presented: str | None) -> bool:
    if presented is None:
        return False
    # Compare with every key (no early exit), each in constant time.
    matches = [hmac.compare_digest(presented.encode(), key.encode()) for key in keys]
    return any(matches)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def same_origin(scope: Scope) -> bool:
    """Is the request's ``Origin`` (if any) this router itself, and not declared cross-site?"""
    if (header_value(scope, b"sec-fetch-site") or "").lower() == "cross-site":
        return False
    origin = header_value(scope, b"origin")
    if origin is None:
        return True  # not a browser's cross-origin request (curl, the SDKs, same-origin GET)
    host = header_value(scope, b"host") or ""
    parts = urllib.parse.urlsplit(origin)
    return bool(parts.netloc) and parts.netloc.lower() == host.lower()


async def send_error(send: Send, error: HerdError, path: str, close: bool = False) -> None:
    flavor = flavor_for_path(path)
    status = error.status_for(flavor)
    if isinstance(error, TwoFramings):
        headers = [(b"content-length", b"0"), (b"connection", b"close")]
        headers.append((b"x-herd-error", error.message.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": error.render(flavor)})


class TwoFramings(BadRequest):
    """Content-Length and Transfer-Encoding both. The answer has no body: what follows this
    request on the connection may be a smuggled one, and hypercorn closes the socket as soon
    as the answer's head is out, so the message goes in ``X-Herd-Error``."""


class HeadersTooLarge(HerdError):
    status = 431
    openai_type = "invalid_request_error"
    code = "request_header_fields_too_large"


class UnsupportedMediaType(HerdError):
    status = 415
    openai_type = "invalid_request_error"
    code = "unsupported_media_type"


def head_error(scope: Scope) -> HerdError | None:
    headers = scope.get("headers", [])
    names = {name.lower() for name, _ in headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        # Two framings: a proxy in front that reads the other one would see a second request
        # in this one's body. Refused, and the connection closed (see FrontGuard).
        return TwoFramings(
            "a request may not carry both Content-Length and Transfer-Encoding",
            param="headers",
        )
    if len(headers) > MAX_HEADERS:
        return HeadersTooLarge(f"{len(headers)} request headers; the limit is {MAX_HEADERS}")
    size = sum(len(name) + len(value) + 4 for name, value in headers)
    if size > MAX_HEADER_BYTES:
        return HeadersTooLarge(
            f"request headers total {size} bytes; the limit is {MAX_HEADER_BYTES}"
        )
    return None


def operator_write_error(scope: Scope) -> HerdError | None:
    """Refuse a write to operator state that isn't JSON, or that comes from another site."""
    if scope["method"] not in ("POST", "PUT", "PATCH", "DELETE"):
        return None
    if not scope["path"].startswith(OPERATOR_PREFIX):
        return None
    if not same_origin(scope):
        return Forbidden(
            "operator endpoints don't take requests from other sites (Origin or "
            "Sec-Fetch-Site says cross-site)"
        )
    content_type = (header_value(scope, b"content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        return UnsupportedMediaType(
            f"operator endpoints take Content-Type: application/json, got {content_type or 'none'}"
        )
    return None


class Origins:
    """Which browser origins may call the API (patterns with ``*``, matched whole)."""

    def __init__(self, extra: tuple[str, ...] = ()) -> None:
        self.patterns = tuple(p.strip().lower() for p in (*DEFAULT_ORIGINS, *extra) if p.strip())

    def allowed(self, origin: str) -> bool:
        origin = origin.lower()
        return any(fnmatch.fnmatchcase(origin, pattern) for pattern in self.patterns)


def cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-expose-headers", CORS_EXPOSED),
        (b"vary", b"Origin"),
    ]


class FrontGuard:
    def __init__(
        self,
        app: Any,
        origins: Origins | None = None,
        in_reserve: Callable[[Any], bool] | None = None,
    ) -> None:
        self.app = app
        self.origins = origins or Origins()
        # Is this connection (its ASGI ``client``) one the server took past its connection
        # limit, into the reserve kept for the fleet and its operators (herd.server)?
        self.in_reserve = in_reserve

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if (
            self.in_reserve is not None
            and self.in_reserve(scope.get("client"))  # (an empty set answers at once)
            and kind in ("http", "websocket")
            and not reserved_path(scope["path"])
        ):
            await self.refuse_past_limit(scope, send)
            return
        if kind == "websocket":
            if scope["path"] not in WEBSOCKET_PATHS or head_error(scope) is not None:
                await send({"type": "websocket.close", "code": 1008})  # hypercorn: 403
                return
        elif kind == "http":
            error = head_error(scope) or operator_write_error(scope)
            if error is not None:
                await send_error(send, error, scope["path"], close=True)
                return
            origin = header_value(scope, b"origin")
            if origin is not None and not same_origin(scope):
                await self.cross_origin(origin, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def refuse_past_limit(self, scope: Scope, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013})  # try again later
            return
        error = Unavailable(
            "the router is at its connection limit; the connections left are kept for its "
            "nodes and the dashboard. Try again shortly, or close idle connections"
        )
        await send_error(send, error, scope["path"], close=True)

    async def cross_origin(self, origin: str, scope: Scope, receive: Receive, send: Send) -> None:
        """A browser on another origin: refused unless allowed (as Ollama does); a preflight
        answered here; otherwise the app's answer with CORS headers added."""
        path = scope["path"]
        if path.startswith(("/dashboard", "/fleet/")) or not self.origins.allowed(origin):
            await send_error(send, Forbidden(f"origin {origin!r} is not allowed"), path)
            return
        if scope["method"] == "OPTIONS" and header_value(scope, b"access-control-request-method"):
            requested = header_value(scope, b"access-control-request-headers") or ""
            headers = [
                *cors_headers(origin),
                (b"access-control-allow-methods", CORS_METHODS),
                (b"access-control-allow-headers", requested.encode("latin-1")),
                (b"access-control-max-age", CORS_MAX_AGE),
                (b"content-length", b"0"),
            ]
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_with_cors(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), *cors_headers(origin)],
                }
            await send(message)

        await self.app(scope, receive, send_with_cors)


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
