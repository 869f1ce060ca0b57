"""Serving an ASGI app with hypercorn's Trio worker, in-process.

A port that can't be had (in use, privileged, an address not of this machine) is a
:class:`ListenError` naming the address, raised from :func:`serve_app` before it has started;
the CLI prints it as one line.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve


class ListenError(Exception):
    """The server could not listen on its address. ``errno`` is the socket error's."""

    def __init__(self, host: str, port: int, error: OSError) -> None:
        self.host = host
        self.port = port
        self.errno = error.errno
        shown = f"[{host}]" if ":" in host else host
        if error.errno == errno.EADDRINUSE:
            reason = "the address is already in use"
        elif error.errno == errno.EACCES:
            reason = "permission denied (ports below 1024 need root)"
        elif error.errno == errno.EADDRNOTAVAIL:
            reason = f"{host} is not an address of this machine"
        else:
            reason = error.strerror or (os.strerror(error.errno) if error.errno else str(error))
        super().__init__(f"cannot listen on {shown}:{port}: {reason}")


class _Config(Config):  # type: ignore[misc]  # (hypercorn has no type hints for mypy)
    """Hypercorn's config, whose sockets are bound and listening before the server starts,
    failing as a :class:`ListenError`."""

    herd_host = ""
    herd_port = 0

    def create_sockets(self) -> Any:
        try:
            sockets = super().create_sockets()
        except OSError as exc:
            raise ListenError(self.herd_host, self.herd_port, exc) from exc
        try:
            for sock in sockets.insecure_sockets:
                sock.listen(self.backlog)
        except OSError as exc:
            for sock in sockets.insecure_sockets:
                sock.close()
            raise ListenError(self.herd_host, self.herd_port, exc) from exc
        return sockets


def hypercorn_config(host: str, port: int) -> Config:
    config = _Config()
    config.herd_host, config.herd_port = host, port
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
    """Serve ``app`` until cancelled; ``task_status.started`` gets the URL to reach it.
    Raises :class:`ListenError` (inside the nursery's exception group) if it can't listen."""
    config = hypercorn_config(host, port)

    async def run(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(run)
        task_status.started(local_url(binds[0]))
