"""A bare pass-through proxy for the overhead benchmark: the floor of herd's own stack.

A raw ASGI app served by hypercorn (trio worker, default settings, no access log) that sends
every request on to one upstream, same method, path and body, and copies the answer back as
it reads it: one ASGI send per upstream read. No routing, no parsing, no translation, no
logging. ``--client`` picks the upstream client: ``httpx`` (an ``AsyncClient``, as herd uses
it) or ``httpcore`` (httpx's own transport, one connection pool, no httpx layer on top).

    python bench/bare_proxy.py --client httpx --port 8100 --upstream http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpcore
import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

POOL = 256


async def read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def content_type(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.lower() == b"content-type"]


def httpx_app(upstream: str) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    client = httpx.AsyncClient(
        base_url=upstream,
        timeout=httpx.Timeout(10.0, read=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=POOL),
        trust_env=False,
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_body(receive)
        request = client.build_request(
            scope["method"], scope["path"], content=body, headers=content_type(scope["headers"])
        )
        response = await client.send(request, stream=True)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": content_type(response.headers.raw),
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    return app


def httpcore_app(upstream: str) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    pool = httpcore.AsyncConnectionPool(max_connections=POOL, max_keepalive_connections=POOL)
    base = upstream.rstrip("/")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_body(receive)
        headers = content_type(scope["headers"])
        async with pool.stream(
            scope["method"], base + scope["path"], headers=headers, content=body
        ) as response:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": content_type(response.headers),
                }
            )
            async for chunk in response.aiter_stream():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--client", choices=("httpx", "httpcore"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    config = Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_timeout = 75  # as herd's (the load generator keeps connections open)
    app = httpx_app(args.upstream) if args.client == "httpx" else httpcore_app(args.upstream)
    trio.run(serve, app, config)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
