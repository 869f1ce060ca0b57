"""Options for both roles, resolved with one precedence rule:

    command-line flag  >  environment variable  >  ``<data-dir>/env`` file  >  default

Every option is one row of :data:`OPTIONS` (flag, environment variable, default, type, help); the
CLI, ``--help``, ``docs/configuration.md`` and the dashboard's config table are all drawn from it.
Flags are parsed with no defaults of their own (``argparse.SUPPRESS``), so a flag that was not
given can never mask the environment, and argparse hands their text to :func:`resolve`, which
checks flag and variable alike with the option's rule and names the flag or the variable when a
value breaks it (``--port must be 0..65535, got 70000``). One option also reads another
program's variable last: ``--ollama-url`` falls back to Ollama's ``OLLAMA_HOST``
(:func:`parse_ollama_host` reads Ollama's forms of it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from herd.core.store_url import check_store_url, redact_url

DEFAULT_PORT = 11435
DEFAULT_NODE_PORT = 11436
MiB = 2**20


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"must be true or false (or 1/0, yes/no, on/off), got {value!r}")


def _str_list(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"must be a number > 0, got {value!r}") from None
    if not number > 0:
        raise ValueError(f"must be > 0, got {value}")
    return number


def _alias_list(value: str) -> tuple[str, ...]:
    """``PATTERN=MODEL[,MODEL];PATTERN=...`` (the env form of --model-alias), each checked."""
    from herd.core.policy.virtual import parse_alias

    entries = tuple(part.strip() for part in value.split(";") if part.strip())
    for entry in entries:
        parse_alias(entry)
    return entries


def _model_slots(value: str) -> dict[str, int]:
    """``MODEL=N,MODEL=N`` (each N >= 1). Names as Ollama resolves them (``nomic-embed-text``
    is ``nomic-embed-text:latest``), the form the router counts requests under."""
    from herd.core.models import normalize_model_name

    slots: dict[str, int] = {}
    for part in value.split(","):
        if not part.strip():
            continue
        name, sep, count = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"expected MODEL=N, got {part.strip()!r}")
        try:
            number = int(count)
        except ValueError:
            raise ValueError(
                f"slots must be a whole number, got {count.strip()!r} for {name.strip()}"
            ) from None
        if number < 1:
            raise ValueError(f"slots must be >= 1, got {number} for {name.strip()}")
        slots[normalize_model_name(name)] = number
    return slots


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return number


def _port(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"must be a port number 0..65535, got {value!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"must be 0..65535, got {value}")
    return number


def _non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"must be a whole number >= 0, got {value!r}") from None
    if number < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return number


STATE_SCHEMES = ("valkey", "redis", "unix")


def _state_url(value: str) -> str:
    """``valkey://[:password@]host[:port][/db]``, ``redis://...`` or ``unix:///path[?db=N]``
    (checked fully when the router connects, by herd.shared.resp.Address)."""
    import urllib.parse

    text = value.strip()
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in STATE_SCHEMES:
        raise ValueError(
            f"must be valkey://HOST[:PORT][/DB], redis://... or unix:///PATH, got {value!r}"
        )
    if parts.scheme == "unix" and not parts.path:
        raise ValueError(f"names no socket path: {value!r}")
    if parts.scheme != "unix":
        if not parts.hostname:
            raise ValueError(f"names no host: {value!r}")
        try:
            parts.port  # noqa: B018 (it raises for a bad port)
        except ValueError:
            raise ValueError(f"has a bad port: {value!r}") from None
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"has a database that is not a number ({db!r}): {value!r}")
    return text


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _store_url(value: str) -> str | None:
    """Empty: the SQLite file in the data dir; else a ``postgresql://`` URL."""
    return check_store_url(value) if value.strip() else None


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return level


OLLAMA_DEFAULT_PORT = 11434
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def parse_ollama_host(value: str) -> str:
    """The backend URL for a value in any of the forms Ollama's ``OLLAMA_HOST`` takes:
    ``host``, ``host:port``, ``:port``, ``[v6]:port``, ``http(s)://host[:port][/path]``.

    Without a scheme it is ``http`` and the port 11434; with a scheme and no port, the
    scheme's own port (80 or 443), as Ollama reads it. A listening address meaning "every
    interface" (``0.0.0.0``, ``::``) is connected to on loopback. Pure; raises ValueError
    saying what the value should look like.
    """
    import ipaddress
    import urllib.parse

    text = value.strip()
    expected = f"must look like HOST, HOST:PORT, :PORT or http://HOST:PORT, got {value!r}"
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "http", text
        default_port = OLLAMA_DEFAULT_PORT
    else:
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"must use http:// or https://, got {value!r}")
        default_port = 443 if scheme == "https" else 80
    hostport, slash, path = rest.partition("/")
    if any(c.isspace() for c in hostport) or "@" in hostport:
        raise ValueError(expected)
    host, port_text = hostport, ""
    if hostport.startswith("["):
        inside, bracket, after = hostport[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise ValueError(expected)
        host, port_text = inside, after[1:]
        if after and not port_text:
            raise ValueError(expected)
    elif hostport.count(":") == 1:
        host, _, port_text = hostport.partition(":")
        if not port_text:
            raise ValueError(expected)
    elif hostport.count(":") > 1:
        try:  # a bare IPv6 address, as Ollama also accepts
            ipaddress.IPv6Address(hostport)
        except ValueError:
            raise ValueError(expected) from None
    if not host:
        if sep:  # "http://" or "http://:8080": a URL names its host
            raise ValueError(f"names no host: {value!r}")
        host = "127.0.0.1"
    host = _WILDCARDS.get(host, host)
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
            raise ValueError(f"has a bad port {port_text!r} (1..65535): {value!r}")
        port = int(port_text)
    shown = f"[{host}]" if ":" in host else host
    url = f"{scheme}://{shown}:{port}" + (slash + path if path else "")
    urllib.parse.urlsplit(url)  # the result must be a URL httpx can use
    return url.rstrip("/")


@attrs.frozen
class Option:
    name: str  # attribute name in the config classes
    flag: str
    env: str
    default: Any
    parse: Callable[[str], Any]
    help: str
    roles: tuple[str, ...] = ("router", "node")
    category: str = "server"
    secret: bool = False
    repeatable: bool = False  # flag may be given several times (values are collected)
    # A flag that takes no value and turns the option on (the env var takes true/false).
    switch: bool = False
    # What --help and the docs call the default when ``default`` is None ("not set").
    shown_default: str | None = None
    # Another program's variable read (from the environment only) when neither the flag, the
    # option's own variable nor the env file sets it, e.g. Ollama's OLLAMA_HOST.
    fallback_env: str | None = None
    # How a set value is shown (dashboard, logs) when it may hold a secret part.
    shown: Callable[[Any], Any] | None = None


OPTIONS: tuple[Option, ...] = (
    Option("host", "--host", "FLEET_HOST", "0.0.0.0", str, "address to listen on"),
    Option(
        "port",
        "--port",
        "FLEET_PORT",
        None,
        _port,
        f"port to listen on (router {DEFAULT_PORT}, node {DEFAULT_NODE_PORT})",
    ),
    Option(
        "data_dir",
        "--data-dir",
        "FLEET_DATA_DIR",
        "~/.fleet-manager",
        str,
        "directory for the database, logs, settings and the env file",
    ),
    Option(
        "store",
        "--store",
        "FLEET_STORE",
        None,
        _store_url,
        "where traces, benchmarks and fleet events are kept: a postgresql://USER@HOST:PORT/DB "
        "URL that several routers share (see docs/scale-out.md); unset: latency.db in the data "
        "dir",
        roles=("router",),
        shown=redact_url,
    ),
    Option(
        "heartbeat_interval",
        "--heartbeat-interval",
        "FLEET_HEARTBEAT_INTERVAL",
        5.0,
        _positive_float,
        "seconds between node heartbeats",
        category="heartbeat",
    ),
    Option(
        "heartbeat_timeout",
        "--heartbeat-timeout",
        "FLEET_HEARTBEAT_TIMEOUT",
        15.0,
        _positive_float,
        "seconds without a heartbeat before a node is degraded",
        roles=("router",),
        category="heartbeat",
    ),
    Option(
        "heartbeat_offline",
        "--heartbeat-offline",
        "FLEET_HEARTBEAT_OFFLINE",
        30.0,
        _positive_float,
        "seconds without a heartbeat before a node is offline",
        roles=("router",),
        category="heartbeat",
    ),
    Option(
        "max_retries",
        "--max-retries",
        "FLEET_MAX_RETRIES",
        2,
        _non_negative_int,
        "retries on another node when a node fails before the first byte",
        roles=("router",),
        category="routing",
    ),
    Option(
        "queue_timeout",
        "--queue-timeout",
        "FLEET_QUEUE_TIMEOUT",
        30.0,
        _positive_float,
        "seconds a request may wait for an eligible node",
        roles=("router",),
        category="routing",
    ),
    Option(
        "first_byte_timeout",
        "--first-byte-timeout",
        "FLEET_FIRST_BYTE_TIMEOUT",
        300.0,
        _positive_float,
        "seconds to wait for a node's first byte (covers cold loads)",
        roles=("router",),
        category="routing",
    ),
    Option(
        "vram_fallback",
        "--vram-fallback",
        "FLEET_VRAM_FALLBACK",
        None,
        _bool,
        "opt in to substitution: when no model the request named is loaded, serve an "
        "already-loaded model of the same category instead of cold-loading (flagged in "
        "X-Herd-Fallback and the trace; a request can refuse it). Also a dashboard setting",
        roles=("router",),
        category="routing",
        switch=True,
        shown_default="off",
    ),
    Option(
        "auto_pull",
        "--auto-pull",
        "FLEET_AUTO_PULL",
        None,
        _bool,
        "pull a model no node has onto the best node when a request asks for it, instead of "
        "answering 404. Also a dashboard setting",
        roles=("router",),
        category="routing",
        switch=True,
        shown_default="off",
    ),
    Option(
        "model_aliases",
        "--model-alias",
        "FLEET_MODEL_ALIASES",
        (),
        _alias_list,
        "a virtual model name: PATTERN=MODEL[,MODEL...] (an exact name or a glob such as "
        "claude-*haiku*; the best loaded candidate serves). Repeatable; env: ';'-separated. "
        "Also a dashboard setting",
        roles=("router",),
        category="routing",
        repeatable=True,
    ),
    Option(
        "agent_defaults",
        "--agent-defaults",
        "FLEET_AGENT_DEFAULTS",
        None,
        _bool,
        "map coding agents' model ids (claude-*, gpt-*, o*) onto the fleet's chat models by "
        "size (haiku/mini small, opus/codex large, the rest mid); false turns them off",
        roles=("router",),
        category="routing",
        shown_default="on",
    ),
    Option(
        "pull_hosts",
        "--pull-host",
        "FLEET_PULL_HOSTS",
        (),
        _str_list,
        "registry host a pull may name besides Ollama's own (e.g. hf.co); repeatable, env: "
        "comma list. Other hosts in a model name are refused",
        roles=("router",),
        category="routing",
        repeatable=True,
    ),
    Option(
        "forget_after",
        "--forget-after",
        "FLEET_FORGET_AFTER",
        86400.0,
        _positive_float,
        "seconds a node may stay offline before the router forgets it (its queues, history "
        "and metrics go too)",
        roles=("router",),
        category="heartbeat",
    ),
    Option(
        "max_body_bytes",
        "--max-body-bytes",
        "FLEET_MAX_BODY_BYTES",
        32 * MiB,
        _non_negative_int,
        "largest request body accepted (413 beyond)",
        roles=("router",),
        category="limits",
    ),
    Option(
        "body_timeout",
        "--body-timeout",
        "FLEET_BODY_TIMEOUT",
        60.0,
        _positive_float,
        "seconds a client may take to send an inference request's body (408 beyond)",
        roles=("router",),
        category="limits",
    ),
    Option(
        "max_connections_per_client",
        "--max-connections-per-client",
        "FLEET_MAX_CONNECTIONS_PER_CLIENT",
        512,
        _positive_int,
        "open connections one client address may hold (503 and closed beyond)",
        roles=("router",),
        category="limits",
    ),
    Option(
        "max_connections",
        "--max-connections",
        "FLEET_MAX_CONNECTIONS",
        0,
        _non_negative_int,
        "client connections open at once in all (0: as many as leave file descriptors free); "
        "64 more are kept for the nodes, the dashboard and /metrics",
        roles=("router",),
        category="limits",
    ),
    Option(
        "idle_timeout",
        "--idle-timeout",
        "FLEET_IDLE_TIMEOUT",
        75.0,
        _positive_float,
        "seconds a kept-alive connection may sit idle between requests (and the deadline for "
        "a request's line and headers)",
        roles=("router",),
        category="limits",
    ),
    Option(
        "mdns",
        "--mdns",
        "FLEET_MDNS",
        True,
        _bool,
        "advertise the router on the LAN by mDNS (_herd._tcp.local.) so nodes find it",
        roles=("router",),
        category="discovery",
    ),
    Option(
        "auth_token",
        "--auth-token",
        "FLEET_AUTH_TOKEN",
        None,
        str,
        "fleet secret nodes must present to join",
        category="security",
        secret=True,
    ),
    Option(
        "api_keys",
        "--api-key",
        "FLEET_API_KEYS",
        (),
        _str_list,
        "client API key (repeatable; env: comma list)",
        roles=("router",),
        category="security",
        secret=True,
        repeatable=True,
    ),
    Option(
        "origins",
        "--origins",
        "FLEET_ORIGINS",
        (),
        _str_list,
        "browser origins allowed to call the API besides localhost, 127.0.0.1, 0.0.0.0 and "
        "app/extension schemes (comma list, * wildcards, e.g. https://chat.example.com); "
        "OLLAMA_ORIGINS is read too",
        roles=("router",),
        category="security",
    ),
    Option(
        "allow_backend_hosts",
        "--allow-backend-host",
        "FLEET_ALLOW_BACKEND_HOSTS",
        (),
        _str_list,
        "a host a node may name as its backend besides its own address (a name, an address, "
        "a CIDR range, or * for any); repeatable, env: comma list",
        roles=("router",),
        category="security",
        repeatable=True,
    ),
    Option(
        "log_level",
        "--log-level",
        "FLEET_LOG_LEVEL",
        "INFO",
        _log_level,
        "console log level: DEBUG, INFO, WARNING, ERROR or CRITICAL (the JSONL file logs at DEBUG)",
        category="logging",
    ),
    Option(
        "quiet",
        "--quiet",
        "FLEET_QUIET",
        False,
        _bool,
        "no access line per request on the console (the JSONL file keeps them)",
        roles=("router",),
        category="logging",
    ),
    Option(
        "state",
        "--state",
        "FLEET_STATE",
        None,
        _state_url,
        "a Valkey or Redis server several routers share one fleet through (slots, load, "
        "conversation affinity, learned history, settings): valkey://HOST[:PORT][/DB], "
        "redis://... or unix:///PATH. Unset: this router alone, all in memory",
        roles=("router",),
        category="scale-out",
        shown_default="none",
    ),
    Option(
        "state_lease_ttl",
        "--state-lease-ttl",
        "FLEET_STATE_LEASE_TTL",
        10.0,
        _positive_float,
        "with --state: seconds a router's slot leases outlive it if it dies (it renews them "
        "every third of this while it runs)",
        roles=("router",),
        category="scale-out",
    ),
    Option(
        "router_url",
        "--router-url",
        "FLEET_NODE_ROUTER_URL",
        None,
        _str_list,
        "router URL, e.g. http://10.0.0.5:11435; repeatable (env: comma list): the node "
        "connects and heartbeats to every router given. Unset: found by mDNS",
        roles=("node",),
        category="node",
        repeatable=True,
        shown_default="none",
    ),
    Option(
        "ollama_url",
        "--ollama-url",
        "FLEET_NODE_OLLAMA_HOST",
        "http://localhost:11434",
        parse_ollama_host,
        "URL of the inference backend on this machine (http://HOST:PORT; HOST:PORT and :PORT "
        "work too); unset, Ollama's own OLLAMA_HOST is read",
        roles=("node",),
        category="node",
        fallback_env="OLLAMA_HOST",
    ),
    Option(
        "backend",
        "--backend",
        "FLEET_NODE_BACKEND",
        "ollama",
        str,
        "backend kind: ollama or openai",
        roles=("node",),
        category="node",
    ),
    Option(
        "node_id",
        "--node-id",
        "FLEET_NODE_ID",
        None,
        str,
        "this node's id (default: host name)",
        roles=("node",),
        category="node",
    ),
    Option(
        "parallel_slots",
        "--parallel-slots",
        "FLEET_NODE_PARALLEL_SLOTS",
        4,
        _non_negative_int,
        "concurrent requests the backend serves (router's limit)",
        roles=("node",),
        category="node",
    ),
    Option(
        "model_slots",
        "--model-slots",
        "FLEET_NODE_MODEL_SLOTS",
        None,
        _model_slots,
        "per-model concurrency within the node's slots, MODEL=N[,MODEL=N] (the backend runs "
        "that model N requests at a time; Ollama's embedding models are 1 by default)",
        roles=("node",),
        category="node",
        shown_default="none",
    ),
    Option(
        "lan_proxy",
        "--lan-proxy",
        "FLEET_NODE_LAN_PROXY",
        "auto",
        str,
        "serve the backend on this node's port for the router: auto (when the backend listens "
        "on loopback only and the router is elsewhere), always, never",
        roles=("node",),
        category="node",
    ),
    Option(
        "drain_timeout",
        "--drain-timeout",
        "FLEET_NODE_DRAIN_TIMEOUT",
        60.0,
        _positive_float,
        "seconds a stopping node waits for its requests to finish",
        roles=("node",),
        category="node",
    ),
    Option(
        "advertise_host",
        "--advertise-host",
        "FLEET_NODE_ADVERTISE_HOST",
        None,
        str,
        "address the router uses to reach this node's own port (default: the address this "
        "machine uses to reach the router)",
        roles=("node",),
        category="node",
    ),
    Option(
        "whisper_model",
        "--whisper-model",
        "FLEET_NODE_WHISPER_MODEL",
        None,
        str,
        "faster-whisper model (a CTranslate2 model directory or size name) for speech-to-text",
        roles=("node",),
        category="multimodal",
    ),
    Option(
        "asr_url",
        "--asr-url",
        "FLEET_NODE_ASR_URL",
        None,
        str,
        "an OpenAI-compatible transcription server (e.g. Qwen3-ASR) on this machine",
        roles=("node",),
        category="multimodal",
    ),
    Option(
        "image_timeout",
        "--image-timeout",
        "FLEET_NODE_IMAGE_TIMEOUT",
        600.0,
        _positive_float,
        "seconds one image generation may take",
        roles=("node",),
        category="multimodal",
    ),
    Option(
        "learn_capacity",
        "--learn-capacity",
        "FLEET_NODE_ENABLE_CAPACITY_LEARNING",
        False,
        _bool,
        "learn when this machine has spare capacity",
        roles=("node",),
        category="node",
    ),
)

OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}


def _default(name: str) -> Any:
    """An option's default, as its row in :data:`OPTIONS` says: the one place defaults are
    written (the config classes below read theirs from here)."""
    return OPTIONS_BY_NAME[name].default


class ConfigError(ValueError):
    """An option's value could not be parsed; the message names the option and its source."""


def read_env_file(path: Path) -> dict[str, str]:
    """Parse ``KEY=value`` lines (``#`` comments, optional quotes, optional ``export``)."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return values  # (a data dir that isn't a directory is reported where it is used)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def resolve(
    role: str,
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
) -> dict[str, Any]:
    """Resolve every option of ``role``. ``flags`` holds only the flags actually given (as
    argparse leaves them: strings, lists of strings for repeatable flags, True for switches);
    they are parsed here by the option's rule. An option with a ``fallback_env`` (another
    program's variable) reads it from the environment after its own variable and the file.

    Raises :class:`ConfigError` naming the flag, or the variable, its source and the value.
    """
    # The data dir decides where the env file is, so it is resolved first (without the file).
    data_dir = flags.get("data_dir") or environ.get("FLEET_DATA_DIR") or "~/.fleet-manager"
    file_values = read_env_file(Path(os.path.expanduser(data_dir)) / "env")
    resolved: dict[str, Any] = {}
    for option in OPTIONS:
        if role not in option.roles:
            continue
        if option.name in flags:
            resolved[option.name] = _flag_value(option, flags[option.name])
            continue
        sources = [
            (option.env, "environment", environ.get(option.env)),
            (option.env, f"{data_dir}/env", file_values.get(option.env)),
        ]
        if option.fallback_env:
            sources.append((option.fallback_env, "environment", environ.get(option.fallback_env)))
        for variable, source, raw in sources:
            if raw is None or (variable == option.fallback_env and not raw.strip()):
                continue
            try:
                resolved[option.name] = option.parse(raw)
            except ValueError as exc:
                plain = option.shown(raw) if option.shown else raw
                shown = "***" if option.secret else repr(plain)
                raise ConfigError(f"{variable}={shown} (from {source}) is invalid: {exc}") from exc
            break
        else:
            resolved[option.name] = option.default
    return resolved


def _flag_value(option: Option, value: Any) -> Any:
    """A flag as typed (argparse hands over strings; switches are True) parsed by the
    option's rule, so a bad value is reported in flag terms: ``--port must be 0..65535``."""
    try:
        if isinstance(value, list | tuple):
            for item in value:  # repeatable: each occurrence is one item, checked
                option.parse(item)
            return tuple(value)
        if isinstance(value, str):
            return option.parse(value)
    except ValueError as exc:
        text = str(exc)
        if option.secret:
            text = "is invalid"
        raise ConfigError(
            f"{option.flag} {text}"
            if text.startswith(("must", "is", "has", "names"))
            else f"{option.flag}: {text}"
        ) from exc
    return value


@attrs.frozen
class RouterConfig:
    """The router's options. Defaults are :data:`OPTIONS`' except where an embedded router
    (``herd.Router`` in another program) deliberately differs from the ``herd`` command: it
    listens on loopback and does not advertise itself unless asked."""

    host: str = "127.0.0.1"  # embedded: loopback (the command's default is every interface)
    port: int = DEFAULT_PORT  # (the option's default depends on the role)
    data_dir: str = _default("data_dir")
    # A postgresql:// URL (traces, benchmarks, events there); None: latency.db in data_dir.
    store: str | None = _default("store")
    heartbeat_interval: float = _default("heartbeat_interval")
    heartbeat_timeout: float = _default("heartbeat_timeout")
    heartbeat_offline: float = _default("heartbeat_offline")
    max_retries: int = _default("max_retries")
    queue_timeout: float = _default("queue_timeout")
    first_byte_timeout: float = _default("first_byte_timeout")
    max_body_bytes: int = _default("max_body_bytes")
    body_timeout: float = _default("body_timeout")
    max_connections_per_client: int = _default("max_connections_per_client")
    max_connections: int = _default("max_connections")
    idle_timeout: float = _default("idle_timeout")
    auth_token: str | None = _default("auth_token")
    api_keys: tuple[str, ...] = _default("api_keys")
    log_level: str = _default("log_level")
    # No access line per request on the console (the JSONL file keeps them).
    quiet: bool = _default("quiet")
    # Embedded routers don't advertise themselves unless asked; the `herd` command does.
    mdns: bool = False  # embedded: off (the command's default is on)
    # Start values of the runtime settings of the same names; None = not set here (the
    # settings file, else RuntimeSettings' default, applies). Set, they beat the file.
    vram_fallback: bool | None = _default("vram_fallback")
    auto_pull: bool | None = _default("auto_pull")
    agent_defaults: bool | None = _default("agent_defaults")
    # Aliases given as flags (PATTERN=MODEL[,MODEL]); they replace the file's at start.
    model_aliases: tuple[str, ...] = _default("model_aliases")
    pull_hosts: tuple[str, ...] = _default("pull_hosts")
    forget_after: float = _default("forget_after")
    # Extra browser origins (CORS) beyond the defaults, see herd.http.security.
    origins: tuple[str, ...] = _default("origins")
    # Hosts nodes may name besides their own address (herd.core.policy.node_urls).
    allow_backend_hosts: tuple[str, ...] = _default("allow_backend_hosts")
    # The shared state store several routers use (herd.shared); None: this router alone.
    state: str | None = _default("state")
    state_lease_ttl: float = _default("state_lease_ttl")

    def __attrs_post_init__(self) -> None:
        """Relations between options (each option's own range is checked where it is read).
        Raises :class:`ConfigError` naming the rule."""
        if not self.heartbeat_timeout < self.heartbeat_offline:
            raise ConfigError(
                f"--heartbeat-offline ({self.heartbeat_offline:g}) must be greater than "
                f"--heartbeat-timeout ({self.heartbeat_timeout:g})"
            )
        if not self.heartbeat_interval < self.heartbeat_timeout:
            raise ConfigError(
                f"--heartbeat-timeout ({self.heartbeat_timeout:g}) must be greater than "
                f"--heartbeat-interval ({self.heartbeat_interval:g}): nodes would go degraded "
                "between two heartbeats"
            )

    @property
    def data_path(self) -> Path:
        return Path(os.path.expanduser(self.data_dir))

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> RouterConfig:
        fields = {f.name for f in attrs.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in fields and v is not None}
        return cls(**kwargs)


@attrs.frozen
class NodeConfig:
    """The node agent's options; defaults are :data:`OPTIONS`'. ``--router-url`` may be
    given several times: the first is ``router_url``, the others ``more_router_urls``."""

    router_url: str | None = _default("router_url")
    more_router_urls: tuple[str, ...] = ()
    ollama_url: str = _default("ollama_url")
    backend: str = _default("backend")
    node_id: str | None = _default("node_id")
    host: str = _default("host")
    port: int = DEFAULT_NODE_PORT
    data_dir: str = _default("data_dir")
    heartbeat_interval: float = _default("heartbeat_interval")
    parallel_slots: int = _default("parallel_slots")
    model_slots: dict[str, int] = attrs.field(factory=dict)
    auth_token: str | None = _default("auth_token")
    drain_timeout: float = _default("drain_timeout")
    advertise_host: str | None = _default("advertise_host")
    lan_proxy: str = _default("lan_proxy")
    whisper_model: str | None = _default("whisper_model")
    asr_url: str | None = _default("asr_url")
    image_timeout: float = _default("image_timeout")
    learn_capacity: bool = _default("learn_capacity")
    log_level: str = _default("log_level")

    @property
    def router_urls(self) -> tuple[str, ...]:
        """Every router this node connects to, in order, each once."""
        urls = (self.router_url, *self.more_router_urls) if self.router_url else ()
        return tuple(dict.fromkeys(url.rstrip("/") for url in urls))

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> NodeConfig:
        fields = {f.name for f in attrs.fields(cls)}
        values = dict(values)
        urls = values.pop("router_url", None)
        if isinstance(urls, str):
            urls = (urls,)
        kwargs = {k: v for k, v in values.items() if k in fields and v is not None}
        if urls:
            kwargs["router_url"], kwargs["more_router_urls"] = urls[0], tuple(urls[1:])
        return cls(**kwargs)


def redacted(values: Mapping[str, Any]) -> dict[str, Any]:
    """Options safe to show (dashboard, logs): secrets become "set"/"unset"."""
    shown: dict[str, Any] = {}
    for name, value in values.items():
        option = OPTIONS_BY_NAME.get(name)
        if option is not None and option.secret:
            shown[name] = "set" if value else "unset"
        elif option is not None and option.shown is not None and value is not None:
            shown[name] = option.shown(value)
        else:
            shown[name] = value
    return shown
