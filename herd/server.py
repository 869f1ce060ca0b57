"""Serving an ASGI app with hypercorn's Trio worker, in-process."""

from __future__ import annotations

import logging
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve


def hypercorn_config(host: str, port: int) -> Config:
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("herd.http")
    # Also the deadline for a request's line and headers: hypercorn's keep-alive timer runs
    # from connecting (or the last response) until a whole request head has arrived, and
    # trickled bytes don't reset it, so a slowloris client is cut after this long. Bodies have
    # their own deadline (--body-timeout). read_timeout stays unset: hypercorn applies it to
    # every read, including the silence while a client reads a long streamed answer, which it
    # would cut (tests/test_security.py shows both).
    config.keep_alive_timeout = 75
    config.backlog = 2048  # bursts of hundreds of clients must not be reset at connect
    config.graceful_timeout = 5
    config.h11_max_incomplete_size = 16 * 1024  # request line + headers; 431 beyond
    config.websocket_max_message_size = 8 * 2**20
    return config


def local_url(bind: str) -> str:
    """Turn a bind like ``http://0.0.0.0:11435`` into a URL this machine can call."""
    scheme, _, address = bind.partition("://")
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "[::]", ""):
        host = "127.0.0.1"
    return f"{scheme}://{host}:{port}"


async def serve_app(
    app: Any,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled; ``task_status.started`` gets the URL to reach it."""
    config = hypercorn_config(host, port)

    async def run(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(run)
        task_status.started(local_url(binds[0]))
