"""Command line: ``herd`` (router), ``herd-node`` (node), ``herd serve``, ``herd status``,
``herd demo``.

Every option of :data:`herd.config.OPTIONS` is a flag whose argparse default is SUPPRESS, so
only flags actually typed reach :func:`herd.config.resolve`, which applies the precedence
flag > environment > ``<data-dir>/env`` > default.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

from herd import __version__
from herd.config import (
    DEFAULT_NODE_PORT,
    DEFAULT_PORT,
    OPTIONS,
    ConfigError,
    NodeConfig,
    RouterConfig,
    resolve,
)

COMMANDS = ("serve", "status", "demo")

DESCRIPTION = """\
herd: one endpoint for a fleet of Ollama servers.

  herd [options]                     run the router (same as: herd serve --role router)
  herd serve --role router|node      run the router or a node agent
  herd serve --role router --local-node   router plus a node for this machine's Ollama
  herd-node [options]                run a node agent (same as: herd serve --role node)
  herd status [--url URL]            print the fleet's state
  herd demo [--traffic]              a router with a simulated fleet, no Ollama needed
  herd node pause|resume             stop / restart fleet work on this machine

Options (flag > environment > <data-dir>/env file > default):"""


def add_options(parser: argparse.ArgumentParser, roles: Sequence[str]) -> None:
    for option in OPTIONS:
        if not set(option.roles) & set(roles):
            continue
        default = option.default if option.default not in (None, ()) else "none"
        if option.shown_default is not None:
            default = option.shown_default
        if option.name == "port":
            default = f"{DEFAULT_PORT} router / {DEFAULT_NODE_PORT} node"
        help_text = f"{option.help} [env {option.env}; default {default}]"
        kwargs: dict[str, Any] = {
            "dest": option.name,
            "default": argparse.SUPPRESS,
            "help": help_text,
        }
        if option.repeatable:
            kwargs["action"] = "append"
        elif option.parse is bool or option.default is False or option.switch:
            kwargs["action"] = "store_const"
            kwargs["const"] = True
        else:
            kwargs["type"] = option.parse
        parser.add_argument(option.flag, **kwargs)


def serve_parser(prog: str, role: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"herd {__version__}")
    if role is None:
        parser.add_argument(
            "--role",
            choices=("router", "node"),
            default="router",
            help="which role to run (default router)",
        )
    parser.add_argument(
        "--local-node",
        action="store_true",
        default=False,
        help="router only: also run a node agent for this machine's backend",
    )
    add_options(parser, ("router", "node"))
    return parser


def flags_of(namespace: argparse.Namespace) -> dict[str, Any]:
    names = {o.name for o in OPTIONS}
    return {k: v for k, v in vars(namespace).items() if k in names}


def router_config(flags: Mapping[str, Any], environ: Mapping[str, str]) -> RouterConfig:
    values = resolve("router", flags, environ)
    # Ollama's own variable works here too: herd answers browsers as Ollama would.
    ollama_origins = environ.get("OLLAMA_ORIGINS", "")
    extra = tuple(o.strip() for o in ollama_origins.split(",") if o.strip())
    values["origins"] = tuple(values.get("origins") or ()) + extra
    if values.get("port") is None:
        values["port"] = DEFAULT_PORT
    return RouterConfig.from_options(values)


def node_config(flags: Mapping[str, Any], environ: Mapping[str, str]) -> NodeConfig:
    values = resolve("node", flags, environ)
    if values.get("port") is None:
        values["port"] = DEFAULT_NODE_PORT
    return NodeConfig.from_options(values)


def setup_logging(
    level: str, data_dir: str | None = None, role: str = "router", local_node: bool = False
) -> None:
    from pathlib import Path

    from herd.logs import setup_logging as configure

    path = Path(os.path.expanduser(data_dir)) if data_dir else None
    configure(level, path, role, local_node=local_node)


async def until_signalled(
    service: Callable[..., Awaitable[None]],
    *args: object,
    before_stop: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Run ``service`` until SIGINT or SIGTERM; then run ``before_stop`` (a second signal cuts
    it short), cancel the service and return, for exit status 0."""
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            nursery.start_soon(service, *args)
            async for signum in signals:
                logging.getLogger("herd").info("%s received: stopping", signal.Signals(signum).name)
                if before_stop is not None:
                    async with trio.open_nursery() as stopping:

                        async def stop_early() -> None:
                            await signals.__anext__()
                            stopping.cancel_scope.cancel()

                        stopping.start_soon(stop_early)
                        await before_stop()
                        stopping.cancel_scope.cancel()
                nursery.cancel_scope.cancel()
                break


def raise_open_file_limit(wanted: int = 65536) -> int:
    """Raise this process's soft limit on open files towards ``wanted`` (within the hard
    limit): each stream through the router holds two sockets, and macOS starts processes at
    256. Returns the soft limit now in force (unchanged where the platform has no limits)."""
    try:
        import resource
    except ImportError:  # Windows
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def run_serve(argv: Sequence[str], prog: str, role: str | None) -> int:
    args = serve_parser(prog, role).parse_args(argv)
    role = role or args.role
    flags = flags_of(args)
    raise_open_file_limit()
    from herd.store.db import StorageError, check_data_dir

    try:
        if role == "router":
            config = router_config(flags, os.environ)
            check_data_dir(config.data_path)
            local = None
            if args.local_node:
                local = node_config(
                    {k: v for k, v in flags.items() if k not in ("host", "port")}, os.environ
                )
            setup_logging(config.log_level, config.data_dir, "router", local_node=local is not None)
            from herd.router.service import Router

            trio.run(until_signalled, Router(config, local).run)
        else:
            nconfig = node_config(flags, os.environ)
            check_data_dir(Path(os.path.expanduser(nconfig.data_dir)), database=False)
            setup_logging(nconfig.log_level, nconfig.data_dir, "node")
            from herd.node.service import Node, NodeConfigError, agent_config

            try:
                if nconfig.router_url:
                    agent_config(nconfig)
            except NodeConfigError as exc:
                print(f"herd-node: {exc}", file=sys.stderr)
                return 2
            node = Node(nconfig)

            async def serve_node() -> None:
                await until_signalled(node.run, before_stop=node.drain)

            trio.run(serve_node)
    except (ConfigError, StorageError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


def run_status(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="herd status", description="Print the fleet's state.")
    parser.add_argument(
        "--url",
        default=None,
        help=f"router URL (default http://127.0.0.1:$FLEET_PORT or {DEFAULT_PORT})",
    )
    parser.add_argument("--json", action="store_true", help="print the raw /fleet/status JSON")
    parser.add_argument(
        "--api-key",
        default=None,
        help="API key, if the router requires one (default: the first of $FLEET_API_KEYS)",
    )
    args = parser.parse_args(argv)
    url = args.url or f"http://127.0.0.1:{os.environ.get('FLEET_PORT', DEFAULT_PORT)}"
    key = args.api_key or os.environ.get("FLEET_API_KEYS", "").split(",")[0].strip()
    from herd.status import render_status

    try:
        response = httpx.get(
            url.rstrip("/") + "/fleet/status",
            timeout=10,
            trust_env=False,
            headers={"Authorization": f"Bearer {key}"} if key else None,
        )
        if response.status_code == 401:
            print(
                f"herd status: {url} requires an API key: pass --api-key or set FLEET_API_KEYS",
                file=sys.stderr,
            )
            return 1
        response.raise_for_status()
    except httpx.HTTPError as exc:
        print(
            f"herd status: cannot read {url}/fleet/status: {exc}\n"
            "Is the router running? Start it with: herd",
            file=sys.stderr,
        )
        return 1
    data = response.json()
    print(json.dumps(data, indent=2) if args.json else render_status(data))
    return 0


def run_demo(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="herd demo",
        description="A router with three simulated Ollama nodes (no Ollama needed).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument(
        "--traffic", action="store_true", help="send a steady mixed load through the router"
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level.upper())
    from herd.demo import run_demo as demo

    try:
        trio.run(until_signalled, demo, args.host, args.port, args.traffic)
    except KeyboardInterrupt:
        return 0
    return 0


def run_node_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="herd node", description="Pause or resume fleet work on this machine's node."
    )
    parser.add_argument("action", choices=("pause", "resume"))
    parser.add_argument(
        "--url",
        default=f"http://127.0.0.1:{DEFAULT_NODE_PORT}",
        help="the node's own address (default: this machine's node)",
    )
    args = parser.parse_args(argv)
    token = os.environ.get("FLEET_AUTH_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(
            f"{args.url.rstrip('/')}/node/{args.action}",
            headers=headers,
            timeout=10,
            trust_env=False,
        )
    except httpx.HTTPError as exc:
        print(f"herd node: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"herd node: {response.text}", file=sys.stderr)
        return 1
    print(
        "paused: the fleet sends this machine no new work"
        if args.action == "pause"
        else "resumed: this machine takes fleet work again"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "node":
        return run_node_command(argv[1:])
    if argv and argv[0] == "serve":
        return run_serve(argv[1:], "herd serve", None)
    if argv and argv[0] == "status":
        return run_status(argv[1:])
    if argv and argv[0] == "demo":
        return run_demo(argv[1:])
    return run_serve(argv, "herd", "router")


def node_main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_serve(argv, "herd-node", "node")


if __name__ == "__main__":
    sys.exit(main())
