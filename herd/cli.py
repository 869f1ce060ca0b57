"""Command line: ``herd`` (router), ``herd-node`` (node), ``herd serve``, ``herd status``,
``herd demo``, ``herd plan``, ``herd node pause|resume``.

Every option of :data:`herd.config.OPTIONS` is a flag whose argparse default is SUPPRESS, so
only flags actually typed reach :func:`herd.config.resolve`, which applies the precedence
flag > environment > ``<data-dir>/env`` > default and checks each value. ``herd-node --help``
lists the node's options; ``herd --help`` and ``herd serve --help`` list them all, grouped as
router, node and both.

A problem found while starting (a bad value, an unusable data directory, a port already in use,
a node configuration that can't work) is one line on stderr and exit status 2, never a
traceback, even when it is raised inside the running service's nurseries.
"""

from __future__ import annotations

import argparse
import errno
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

COMMANDS = ("serve", "status", "demo", "plan")

DESCRIPTION = """\
herd: one endpoint for a fleet of Ollama servers.

  herd [options]                     run the router (same as: herd serve --role router)
  herd serve --role router|node      run the router or a node agent
  herd serve --role router --local-node   router plus a node for this machine's Ollama
  herd-node [options]                run a node agent (same as: herd serve --role node)
  herd status [--url URL]            print the fleet's state
  herd demo [--traffic]              a router with a simulated fleet, no Ollama needed
  herd plan --hours 24 --add-node rtx-4090   what if: replay your traffic on a changed fleet
  herd node pause|resume             stop / restart fleet work on this machine

Every option: flag > environment > <data-dir>/env file > default."""

NODE_DESCRIPTION = """\
herd-node: the node agent beside one Ollama (or OpenAI-compatible) server. It reports the
machine to the router over one WebSocket and serves what the router asks of it.

  herd-node --router-url http://ROUTER-HOST:11435
  herd node pause|resume             stop / restart fleet work on this machine

Every option: flag > environment > <data-dir>/env file > default."""

GROUPS = {
    "router": "options of the router",
    "node": "options of a node agent (herd-node, or the router's own node with --local-node)",
    "both": "options of the router and of a node",
}


def add_options(
    parser: argparse.ArgumentParser, roles: Sequence[str]
) -> dict[str, argparse._ArgumentGroup]:
    """One flag per option of ``roles``: under the headings router, node and both when both
    roles are asked for (the router's heading starts with ``--local-node``), else under the one
    role's heading. Returns the groups by heading."""
    if set(roles) >= {"router", "node"}:
        groups = {name: parser.add_argument_group(name, text) for name, text in GROUPS.items()}
        groups["router"].add_argument(
            "--local-node",
            action="store_true",
            default=False,
            help="also run a node agent in this process for this machine's backend (the "
            "node options below configure it)",
        )
    else:
        only = parser.add_argument_group(roles[0], f"options of the {roles[0]}")
        groups = {"router": only, "node": only, "both": only}
    for option in OPTIONS:
        if not set(option.roles) & set(roles):
            continue
        default = option.default if option.default not in (None, ()) else "none"
        if option.shown_default is not None:
            default = option.shown_default
        if option.name == "port":
            default = (
                f"{DEFAULT_PORT} router / {DEFAULT_NODE_PORT} node"
                if "router" in roles
                else str(DEFAULT_NODE_PORT)
            )
        help_text = f"{option.help} [env {option.env}; default {default}]"
        kwargs: dict[str, Any] = {
            "dest": option.name,
            "default": argparse.SUPPRESS,
            "help": help_text,
        }
        metavar = option.flag.removeprefix("--").upper().replace("-", "_")
        if option.repeatable:
            kwargs["metavar"] = metavar
            kwargs["action"] = "append"
        elif option.parse is bool or option.default is False or option.switch:
            kwargs["action"] = "store_const"
            kwargs["const"] = True
        else:  # the text as typed: resolve() checks it and names the flag if it is bad
            kwargs["metavar"] = metavar
        group = "both" if len(option.roles) > 1 else option.roles[0]
        groups[group].add_argument(option.flag, **kwargs)
    return groups


def serve_parser(prog: str, role: str | None) -> argparse.ArgumentParser:
    """The parser of ``herd`` (role router), ``herd-node`` (role node) or ``herd serve``
    (role None: ``--role`` chooses)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=NODE_DESCRIPTION if role == "node" else DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"herd {__version__}")
    if role is None:
        parser.add_argument(
            "--role",
            choices=("router", "node"),
            default="router",
            help="which role to run (default router)",
        )
    if role == "node":
        add_options(parser, ("node",))
        return parser
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
    level: str,
    data_dir: str | None = None,
    role: str = "router",
    local_node: bool = False,
    quiet: bool = False,
) -> None:
    from herd.logs import setup_logging as configure

    path = Path(os.path.expanduser(data_dir)) if data_dir else None
    configure(level, path, role, local_node=local_node, quiet=quiet)


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


GC_THRESHOLD = 10_000  # tracked objects alive beyond the last collection before the next one


def tune_garbage_collector() -> None:
    """Set the collector for a long-running server (``herd serve``, never a program that
    embeds :class:`herd.Router`: its collector is its own). Call it once the app's modules are
    imported.

    - ``gc.freeze()``: what exists at start-up (modules, classes, the app) is never scanned
      again; a full collection scans only what came later.
    - A first-generation threshold of :data:`GC_THRESHOLD` instead of 700: a request's own
      objects, alive together with those of the requests beside it, cross 700 many times a
      second and set off a collection that finds nothing to free; nearly all of them are
      freed by their reference counts when the request ends. Cyclic garbage is still
      collected, once that many more objects are alive than at the last collection.

    Measured on the router (8,000 short requests, ``bench/overhead.py``'s fake backend): the
    collector's time fell from about 77 µs per request (598 collections, 5 of them full) to
    under 1 µs (one collection). docs/performance.md has the figures."""
    import gc

    gc.freeze()
    gc.set_threshold(GC_THRESHOLD)


def startup_error(exc: BaseException) -> Exception | None:
    """The start-up problem ``exc`` is (a bad value, a data directory, a port, a node
    configuration), also when it comes out of trio's nurseries as an exception group whose
    every leaf is one; None for anything else (a bug, whose traceback is worth seeing)."""
    from herd.node.service import NodeConfigError
    from herd.server import ListenError
    from herd.store.db import StorageError

    kinds = (ConfigError, StorageError, NodeConfigError, ListenError)
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(kinds)
        if matched is not None and rest is None:
            leaf: BaseException = matched
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf if isinstance(leaf, Exception) else None
    return None


def describe_startup_error(exc: Exception, prog: str) -> str:
    """The one line for a start-up problem, with what to do about a port that can't be had."""
    from herd.server import ListenError

    text = f"{prog}: {exc}"
    if isinstance(exc, ListenError):
        port_flag = "--port N" if prog == "herd demo" else "--port N (or FLEET_PORT=N)"
        if exc.errno == errno.EADDRINUSE:
            text += (
                " (another herd, or another program, has the port); start with "
                f"{port_flag} for another port, or stop the other process"
            )
        elif exc.errno == errno.EACCES:
            text += f"; start with {port_flag} for a port above 1023"
        elif exc.errno == errno.EADDRNOTAVAIL:
            text += "; start with --host set to one of this machine's addresses, or 0.0.0.0"
    return text


def run_serve(argv: Sequence[str], prog: str, role: str | None) -> int:
    args = serve_parser(prog, role).parse_args(argv)
    role = role or args.role
    flags = flags_of(args)
    raise_open_file_limit()
    from herd.store.db import StoreTarget, check_data_dir

    try:
        if role == "router":
            config = router_config(flags, os.environ)
            check_data_dir(
                config.data_path, store=StoreTarget.parse(config.store, config.data_path)
            )
            local = None
            if getattr(args, "local_node", False):
                local = node_config(
                    {k: v for k, v in flags.items() if k not in ("host", "port")}, os.environ
                )
            setup_logging(
                config.log_level,
                config.data_dir,
                "router",
                local_node=local is not None,
                quiet=config.quiet,
            )
            from herd.http.service import Router

            router = Router(config, local)
            tune_garbage_collector()
            trio.run(until_signalled, router.run)
        else:
            nconfig = node_config(flags, os.environ)
            check_data_dir(Path(os.path.expanduser(nconfig.data_dir)), database=False)
            setup_logging(nconfig.log_level, nconfig.data_dir, "node")
            from herd.node.service import Node, agent_config

            if nconfig.router_url:
                agent_config(nconfig)
            node = Node(nconfig)
            tune_garbage_collector()

            async def serve_node() -> None:
                await until_signalled(node.run, before_stop=node.drain)

            trio.run(serve_node)
    except KeyboardInterrupt:
        return 0
    except BaseException as exc:
        problem = startup_error(exc)
        if problem is None:
            raise
        print(describe_startup_error(problem, prog), file=sys.stderr)
        return 2
    return 0


def print_out(text: str) -> None:
    """Print to stdout; a reader that stopped reading (``herd status | head -1``) ends the
    output quietly instead of with a BrokenPipeError."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Whatever is still buffered goes nowhere, so the interpreter's own flush at exit
        # does not fail (and print its own traceback) either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def local_router_url() -> str:
    """The router on this machine, at ``$FLEET_PORT`` (11435 when unset)."""
    return f"http://127.0.0.1:{os.environ.get('FLEET_PORT', DEFAULT_PORT)}"


def get_fleet_status(url: str, api_key: str | None) -> httpx.Response:
    """GET the router's ``/fleet/status`` with ``api_key`` (default: the first of
    ``$FLEET_API_KEYS``). Raises httpx.HTTPError when the router can't be reached."""
    key = api_key or os.environ.get("FLEET_API_KEYS", "").split(",")[0].strip()
    return httpx.get(
        url.rstrip("/") + "/fleet/status",
        timeout=10,
        trust_env=False,
        headers={"Authorization": f"Bearer {key}"} if key else None,
    )


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
    url = args.url or local_router_url()
    from herd.status import render_status

    try:
        response = get_fleet_status(url, args.api_key)
        if response.status_code == 401:
            print(
                f"herd status: {url} requires an API key: pass --api-key or set FLEET_API_KEYS",
                file=sys.stderr,
            )
            return 2
        response.raise_for_status()
    except httpx.HTTPError as exc:
        print(
            f"herd status: cannot read {url}/fleet/status ({type(exc).__name__}: {exc}); "
            "is the router running? Start it with: herd (or pass its --url)",
            file=sys.stderr,
        )
        return 2
    data = response.json()
    print_out(json.dumps(data, indent=2) if args.json else render_status(data))
    return 0


class PlanChange(argparse.Action):
    """Collects ``--add-node``, ``--remove-node``, ... as (kind, value) in the order typed:
    changes apply in that order."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        changes = list(getattr(namespace, "changes", None) or [])
        changes.append((self.metavar_kind, str(values)))
        namespace.changes = changes

    @property
    def metavar_kind(self) -> str:
        return self.dest.replace("_", "-").removeprefix("change-")


PLAN_EPILOG = (
    "The fleet comes from the router's /fleet/status (--router; default this machine's router)\n"
    "or from a saved copy of it (--fleet FILE: curl http://ROUTER:11435/fleet/status > f.json).\n"
    "The traffic comes from latency.db in the data directory. docs/planner.md says what the\n"
    "replay leaves out."
)


def plan_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herd plan",
        description="What if: replay the last hours of this router's traffic on a virtual copy "
        "of the fleet, as it is and with changes, and compare latency, time to first token, "
        "cold loads and errors.",
        epilog=PLAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hours", type=float, default=24.0, help="the window (24 h; at most 168)")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="the router's data directory ($FLEET_DATA_DIR or "
        "~/.fleet-manager): its latency.db and settings.json are read",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--router",
        default=None,
        help=f"router URL for the nodes' reports (default http://127.0.0.1:$FLEET_PORT or "
        f"{DEFAULT_PORT})",
    )
    source.add_argument("--fleet", default=None, help="a saved /fleet/status JSON file instead")
    parser.add_argument(
        "--api-key",
        default=None,
        help="API key, if the router requires one (default: the first of $FLEET_API_KEYS)",
    )
    from herd.plan.planner import MAX_REQUESTS, PRESETS

    changes = parser.add_argument_group("changes (repeatable; applied in the order given)")
    for flag, metavar, text in (
        (
            "--add-node",
            "PRESET|copy:NODE",
            f"add a node: a preset ({', '.join(PRESETS)}) or a copy of one of yours",
        ),
        ("--remove-node", "NODE", "remove a node"),
        ("--pin", "NODE:MODEL", "put MODEL on NODE, loaded from the start"),
        ("--unload", "NODE:MODEL", "NODE no longer serves MODEL (not loaded, not on its disk)"),
        ("--slots", "NODE=N", "parallel request slots on NODE (*=N: every node)"),
        ("--set", "NAME=VALUE", "a setting: vram_fallback=true|false, slots=N"),
    ):
        changes.add_argument(
            flag,
            action=PlanChange,
            dest="change_" + flag.removeprefix("--").replace("-", "_"),
            metavar=metavar,
            help=text,
        )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=MAX_REQUESTS,
        help=f"replay at most this many of the window's most recent requests ({MAX_REQUESTS})",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(changes=[])
    return parser


def plan_fleet(args: argparse.Namespace) -> dict[str, Any]:
    """The /fleet/status the plan starts from: a saved file, or the router's. Raises
    ValueError with a message for the user."""
    if args.fleet:
        try:
            data = json.loads(Path(args.fleet).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the fleet file {args.fleet}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{args.fleet} is not a /fleet/status answer")
        return data
    url = args.router or local_router_url()
    try:
        response = get_fleet_status(url, args.api_key)
    except httpx.HTTPError as exc:
        raise ValueError(
            f"cannot read the nodes' reports from {url}/fleet/status: {exc}. Start the router, "
            "give its address with --router, or plan on a saved copy with --fleet FILE"
        ) from exc
    if response.status_code == 401:
        raise ValueError(f"{url} requires an API key: pass --api-key or set FLEET_API_KEYS")
    if response.status_code != 200:
        raise ValueError(
            f"{url}/fleet/status answered {response.status_code}: {response.text:.200}"
        )
    data = response.json()
    if not isinstance(data, dict):
        raise ValueError(f"{url}/fleet/status did not answer a fleet status")
    return data


def run_plan(argv: Sequence[str]) -> int:
    parser = plan_parser()
    args = parser.parse_args(argv)
    import time

    import attrs

    from herd.config import RouterConfig
    from herd.plan import planner, sources
    from herd.state.settings import RuntimeSettings, load_settings
    from herd.store.db import DB_NAME

    if not 0 < args.hours <= 168:
        parser.error(f"--hours must be more than 0 and at most 168, got {args.hours:g}")
    if not 1 <= args.max_requests <= 1_000_000:
        parser.error(f"--max-requests must be 1..1000000, got {args.max_requests}")
    default_dir = str(attrs.fields(RouterConfig).data_dir.default)
    data_dir = Path(
        os.path.expanduser(args.data_dir or os.environ.get("FLEET_DATA_DIR") or default_dir)
    )
    try:
        changes = [planner.parse_change(kind, value) for kind, value in args.changes]
        status = plan_fleet(args)
        nodes = sources.nodes_from_status(status)
        since = time.time() - args.hours * 3600
        requests, in_window = sources.read_window(data_dir / DB_NAME, since, args.max_requests)
        settings = load_settings(data_dir, RuntimeSettings())
        inputs = planner.PlanInputs(
            requests=requests,
            nodes=nodes,
            hours=args.hours,
            in_window=in_window,
            substitution=settings.vram_fallback,
        )
        result = planner.plan(inputs, [changes] if changes else [])
    except planner.PlanError as exc:
        print(f"herd plan: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"herd plan: {exc}", file=sys.stderr)
        return 1
    print_out(json.dumps(result.as_dict(), indent=2) if args.json else planner.render(result))
    return 0


def argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An option's parser as an argparse type: its ValueError's text becomes argparse's own
    message (``argument --port: must be 0..65535, got 70000``), not a function's name."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def demo_parser() -> argparse.ArgumentParser:
    from herd.config import _bool, _port

    parser = argparse.ArgumentParser(
        prog="herd demo",
        description="A router with three simulated Ollama nodes (no Ollama needed). It reads "
        "no FLEET_* variable and keeps its data in a temporary directory.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument(
        "--port",
        type=argument_type(_port),
        default=DEFAULT_PORT,
        help=f"the router's port ({DEFAULT_PORT})",
    )
    parser.add_argument(
        "--traffic", action="store_true", help="send a steady mixed load through the router"
    )
    parser.add_argument(
        "--mdns",
        nargs="?",
        const=True,
        default=False,
        type=argument_type(_bool),
        metavar="true|false",
        help="advertise the demo router on the LAN by mDNS, as herd does; off unless given "
        "(real nodes on the LAN without --router-url would join the demo)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no access line per request on the console"
    )
    parser.add_argument("--log-level", default="INFO", help="console log level (INFO)")
    return parser


def run_demo(argv: Sequence[str]) -> int:
    args = demo_parser().parse_args(argv)
    setup_logging(args.log_level.upper(), quiet=args.quiet)
    from herd.demo import run_demo as demo

    try:
        trio.run(until_signalled, demo, args.host, args.port, args.traffic, args.mdns)
    except KeyboardInterrupt:
        return 0
    except BaseException as exc:
        problem = startup_error(exc)
        if problem is None:
            raise
        print(describe_startup_error(problem, "herd demo"), file=sys.stderr)
        return 2
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
        print(
            f"herd node: cannot reach the node agent at {args.url} ({type(exc).__name__}: "
            f"{exc}); is herd-node running there? (pass its --url)",
            file=sys.stderr,
        )
        return 2
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
    if argv and argv[0] == "plan":
        return run_plan(argv[1:])
    return run_serve(argv, "herd", "router")


def node_main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_serve(argv, "herd-node", "node")


if __name__ == "__main__":
    sys.exit(main())
