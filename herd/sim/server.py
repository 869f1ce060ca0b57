"""A simulated Ollama server: Ollama's HTTP API on loopback, with models that load, expire,
generate at a set token rate, use memory, and fail in the ways real nodes fail.

Used as the fake node in tests, by ``herd demo`` and by the benchmarks. It is a raw ASGI app on
hypercorn's Trio worker, so its own cost stays small next to the router it is measured against.
Time goes through ``trio.sleep`` and ``trio.current_time``, so tests on a virtual clock see
exact load, prefill, decode, pull and keep-alive times.

What it does the way Ollama does it:

- **Loads and keep-alive** follow :mod:`herd.sim.residency` (the same rules as the virtual
  fleet's, :mod:`herd.sim.virtual`). A request loads its model (the model's ``load_seconds``;
  idle models that don't fit beside it are evicted first, least recently used first, and a
  load that only busy models stand in the way of waits for one to go idle; 10% of the memory
  is the OS's) and keeps it resident for the
  request's ``keep_alive`` after the last request on it ends: a number of seconds, a Go duration
  string (``"30s"``, ``"5m"``, ``"1h30m"``), negative for ever, 0 to unload it as soon as the
  request ends. A malformed value is a 400 worded as Go words it (so the *string* ``"-1"`` is
  refused, as Ollama refuses it). Without one, ``SimConfig.keep_alive`` applies (5 minutes,
  Ollama's default). Models in ``SimConfig.loaded`` start resident for
  ``SimConfig.loaded_keep_alive`` (for ever unless set). Expired models leave memory lazily, at
  the next request or reading, so ``/api/ps`` is right whenever it is asked; its ``expires_at``
  is an RFC 3339 wall-clock time, ``time.time()`` plus the virtual time left ("for ever" is now
  plus Go's longest duration, about 292 years, as Ollama prints it).
- **GPUs** (``SimConfig.vram_bytes``, ``unified_memory``; :mod:`herd.sim.residency`): what
  fits goes to VRAM; a model bigger than the empty GPU is split, ``/api/ps`` reports its
  ``size_vram`` below its ``size``, and it prefills and decodes slower (the part outside runs
  8x slower). :meth:`SimOllama.accelerator_reading` is the device a node agent would read.
- **Load and unload requests.** ``/api/generate`` without a ``prompt`` and ``/api/chat`` without
  ``messages`` load the model and answer one object with ``"done_reason": "load"``; with
  ``keep_alive: 0`` they unload it instead (``"unload"``; nothing is loaded if it wasn't).
- **Time to the first byte.** A request waits for a slot (``SimConfig.parallel``), the cold load,
  then prefill (the prompt tokens the prompt cache doesn't hold, at ``prefill_tokens_per_second
  x speed``), then decodes at ``tokens_per_second x speed``. A streamed answer sends its headers
  with its first chunk, as Ollama does; ``stream: false`` sends nothing until all is decoded.
- **Thinking** (``SimModel.thinking``): unless the request says ``think: false``, the answer
  starts with ``thinking_tokens`` tokens of ``message.thinking`` (chat) or ``thinking``
  (generate) before the content.
- **Tool calls** (``SimModel.tools``): a chat request with ``tools`` answers a call to the first
  tool, its arguments made up from the tool's JSON schema (every property, typed, enums
  respected), the same for the same prompt; streamed, the call comes in a chunk of its own before
  the final one. Once the last message is a tool result, the answer is text.
- **Embeddings** honour ``dimensions`` (truncated, then L2-normalised again) and ``truncate``
  (default on: inputs longer than the context are cut; off: a 400).
- **Capability errors**, worded as Ollama words them: ``think`` on a model without thinking,
  ``tools`` on one without tools, images on one without ``vision``, chat on an embedding model.
- **Pulls** fetch only models in ``SimConfig.registry`` (or already present; names with a host
  part are looked up like any other, without a network). With ``pull_bytes_per_second`` set, a
  pull takes time: progress lines arrive over virtual time and the model is listed in
  ``/api/tags`` once it is done. Concurrent pulls of one model share its download, which stops
  when its last client disconnects and resumes from there on the next pull.

Failures on demand, each for ``times`` requests or until cleared:

- :meth:`SimOllama.fail`: inference requests answer 500 (``http500``), never answer (``hang``),
  drop the connection (``die_mid_stream``) or go silent for good (``stall``) or for ``seconds``
  (``pause``) after ``after_chunks`` chunks; or the server stops listening (``refuse``).
- :meth:`SimOllama.fail_probes`: the read endpoints (``/api/version``, ``/api/ps``,
  ``/api/tags``, ``/api/show``) answer 500 (``http500``), never (``hang``) or after ``seconds``
  (``slow``).
- :meth:`SimOllama.fail_pulls`: pulls never progress (``hang``) or answer 500 (``http500``).

Counters (plain attributes) tell a test what happened: ``cold_loads``, ``load_requests``,
``unload_requests``, ``expirations``, ``evictions``, ``probes``, ``pulls``, ``pulls_cancelled``,
``open_streams`` (and ``peak_open_streams``), ``disconnects``, ``prompt_cache_hits`` and the
last ``requests``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import itertools
import json
import math
import random
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import attrs
import trio

from herd.core.models import CpuInfo, DiskInfo, GpuInfo, MemoryInfo
from herd.core.policy.conversation import continuation_keys, prefix_keys
from herd.server import serve_app
from herd.sim.costs import PromptCache, prefill_seconds, pull_seconds
from herd.sim.loader import Loader
from herd.sim.residency import FOREVER, Residency

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

GiB = 2**30
WORDS = (
    "the",
    "herd",
    "moves",
    "across",
    "quiet",
    "hills",
    "while",
    "each",
    "node",
    "answers",
    "in",
    "turn",
    "and",
    "nothing",
    "is",
    "lost",
)
THINKING_WORDS = ("hmm", "let", "me", "weigh", "which", "path", "the", "herd", "takes", "first")
FAILURE_MODES = ("refuse", "http500", "hang", "die_mid_stream", "stall", "pause")
PROBE_FAILURE_MODES = ("http500", "hang", "slow")
PULL_FAILURE_MODES = ("hang", "http500")
INFERENCE_PATHS = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings")
PROBE_ROUTES = frozenset(
    {("GET", "/api/version"), ("GET", "/api/ps"), ("GET", "/api/tags"), ("POST", "/api/show")}
)
DEFAULT_REGISTRY = "registry.ollama.ai"
# Go's longest time.Duration (2**63 - 1 ns, about 292 years): what Ollama adds to "now" for a
# model kept for ever, so its /api/ps shows a date some 292 years ahead.
GO_MAX_DURATION_SECONDS = (2**63 - 1) / 1e9
PULL_TICK = 1.0  # seconds of virtual time between a pull's progress lines
NO_VISION = "this model is missing data required for image input"
THINK_LEVELS = ("high", "medium", "low")
_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 MICRO SIGN
    "μs": 1e-6,  # U+03BC GREEK SMALL LETTER MU
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GO_NUMBER = re.compile(r"([0-9]*)(\.[0-9]*)?")
_GO_UNIT = re.compile(r"[^0-9.]*")
MAX_SCHEMA_DEPTH = 8


@attrs.frozen
class SimModel:
    name: str
    size_bytes: int = 2 * GiB
    family: str = "llama"
    parameter_size: str = "3B"
    quantization: str = "Q4_K_M"
    context_length: int = 4096
    embedding: bool = False
    embedding_dim: int = 8
    load_seconds: float = 0.0  # a cold load; proportional to the size in realistic fleets
    tokens_per_second: float = 0.0  # decoding, one stream, at speed 1.0; 0 = instant
    prefill_tokens_per_second: float = 0.0  # prompt processing at speed 1.0; 0 = instant
    tools: bool = True
    thinking: bool = False  # answers start with thinking (unless the request says think: false)
    thinking_tokens: int = 8  # how many
    vision: bool = False  # takes images
    # The model this one was made from (``FROM`` in its Modelfile): ``details.parent_model``
    # in /api/tags, /api/ps and /api/show; "" for a model pulled as it is.
    parent_model: str = ""

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()


@attrs.frozen
class SimConfig:
    name: str = "sim"
    models: tuple[SimModel, ...] = ()
    loaded: tuple[str, ...] = ()
    memory_bytes: int = 16 * GiB
    version: str = "0.12.0"
    default_tokens: int = 12
    parallel: int = 4
    speed: float = 1.0  # compute speed relative to a typical node: scales prefill and decoding
    # Models a pull can fetch ("the registry"); pulling anything else fails as Ollama does.
    registry: tuple[SimModel, ...] = ()
    # keep_alive for requests that give none: seconds or a Go duration; negative = for ever.
    keep_alive: float | str = "5m"
    # How long the models in ``loaded`` stay resident from the start, unless used: for ever.
    loaded_keep_alive: float | str = -1
    pull_bytes_per_second: float = 0.0  # the link to the registry; 0 = pulls are instant
    # The accelerator (herd.sim.residency): None = memory not split (every model reported all
    # in VRAM, no device read); 0 = CPU only; else a GPU with this much VRAM, or with
    # ``unified_memory`` the GPU's working-set limit within ``memory_bytes`` (Apple silicon).
    vram_bytes: int | None = None
    unified_memory: bool = False


def residency_for(config: SimConfig, prompts: PromptCache | None = None) -> Residency:
    """The residency model of the machine ``config`` describes (shared by the HTTP simulator
    and the virtual fleet)."""
    return Residency(
        config.memory_bytes,
        vram_bytes=config.vram_bytes,
        unified=config.unified_memory,
        default_keep=keep_alive_seconds(config.keep_alive),
        loaded_keep=keep_alive_seconds(config.loaded_keep_alive),
        prompts=prompts if prompts is not None else PromptCache(),
    )


def accelerator_reading(
    config: SimConfig, memory: Residency, busy_percent: float
) -> tuple[GpuInfo, ...]:
    """The device a node agent would read on the machine ``config`` describes: none without a
    sized accelerator; on a discrete GPU its VRAM in use (loads under way too); on unified
    memory, what the loaded models hold of the working set (as the agent reports a Mac)."""
    if not config.vram_bytes:
        return ()
    unified = config.unified_memory
    return (
        GpuInfo(
            name="Apple M-series GPU (simulated)" if unified else "Simulated GPU",
            memory_total_bytes=config.vram_bytes,
            memory_used_bytes=memory.used_vram(reserved=not unified),
            vendor="apple" if unified else "nvidia",
            unified=unified,
            utilization_percent=busy_percent,
            temperature_c=None if unified else 40.0 + 0.4 * busy_percent,
            source="sim",
        ),
    )


class _Abort(Exception):
    """Raised inside the app to make hypercorn drop the connection mid-response."""


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def _rfc3339(epoch: float) -> str:
    moment = dt.datetime.fromtimestamp(epoch, dt.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _dump(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def go_duration(text: str) -> float:
    """Go's ``time.ParseDuration``, in seconds. Raises ValueError worded as Go's error."""
    quoted = json.dumps(text, ensure_ascii=False)
    rest = text
    sign = 1.0
    if rest[:1] in ("-", "+"):
        sign = -1.0 if rest[0] == "-" else 1.0
        rest = rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(f"time: invalid duration {quoted}")
    total = 0.0
    while rest:
        number = _GO_NUMBER.match(rest)
        assert number is not None  # the pattern matches the empty string
        whole, fraction = number.group(1), number.group(2) or ""
        if not whole and len(fraction) <= 1:
            raise ValueError(f"time: invalid duration {quoted}")
        value = float((whole or "0") + (fraction if len(fraction) > 1 else ""))
        rest = rest[number.end() :]
        unit_match = _GO_UNIT.match(rest)
        unit = unit_match.group(0) if unit_match else ""
        if not unit:
            raise ValueError(f"time: missing unit in duration {quoted}")
        if unit not in _GO_UNITS:
            raise ValueError(
                f"time: unknown unit {json.dumps(unit, ensure_ascii=False)} in duration {quoted}"
            )
        total += value * _GO_UNITS[unit]
        rest = rest[len(unit) :]
    return sign * total


def keep_alive_seconds(value: object) -> float:
    """Ollama's ``keep_alive`` in seconds: a number of seconds or a Go duration string;
    negative means for ever (:data:`FOREVER`). Raises ValueError with Ollama's 400 wording."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        go_type = (
            "map[string]interface {}"
            if isinstance(value, dict)
            else "[]interface {}"
            if isinstance(value, list)
            else type(value).__name__
        )
        raise ValueError(f"Unsupported type: '{go_type}'")
    seconds = go_duration(value) if isinstance(value, str) else float(value)
    return FOREVER if seconds < 0 else seconds


def canonical_name(name: str) -> str:
    """A model name as Ollama shows it: ``:latest`` added, the default registry host and the
    ``library`` namespace dropped (``registry.ollama.ai/library/x`` is ``x:latest``)."""
    parts = name.split("/")
    if ":" not in parts[-1]:
        parts[-1] += ":latest"
    if len(parts) == 3 and parts[0] == DEFAULT_REGISTRY:
        parts = parts[1:]
    if len(parts) == 2 and parts[0] == "library":
        parts = parts[1:]
    return "/".join(parts)


def full_name(name: str) -> str:
    """A canonical name with its host and namespace, as Ollama names a model in its errors."""
    parts = name.split("/")
    if len(parts) == 1:
        return f"{DEFAULT_REGISTRY}/library/{name}"
    if len(parts) == 2:
        return f"{DEFAULT_REGISTRY}/{name}"
    return name


def _number(value: Any, default: float) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else default


def schema_value(schema: Any, rng: random.Random, depth: int = 0) -> Any:
    """A value that fits the JSON schema ``schema``, drawn from ``rng``."""
    if not isinstance(schema, dict):
        return rng.choice(WORDS)
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[rng.randrange(len(enum))]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return schema_value(options[0], rng, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if not isinstance(kind, str):
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        return schema_object(schema, rng, depth) if depth < MAX_SCHEMA_DEPTH else {}
    if kind == "array":
        if depth >= MAX_SCHEMA_DEPTH:
            return []
        fewest = max(0, int(_number(schema.get("minItems"), 1)))
        most = max(fewest, int(_number(schema.get("maxItems"), fewest + 1)))
        count = rng.randint(fewest, min(most, fewest + 2))
        return [schema_value(schema.get("items"), rng, depth + 1) for _ in range(count)]
    if kind in ("integer", "number"):
        low = _number(schema.get("minimum"), 0.0)
        high = max(low, _number(schema.get("maximum"), low + 100.0))
        if kind == "integer":
            return rng.randint(math.ceil(low), max(math.ceil(low), math.floor(high)))
        return round(rng.uniform(low, high), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    formats = {
        "date": "2026-01-01",
        "date-time": "2026-01-01T00:00:00Z",
        "email": "herd@example.com",
    }
    fixed = formats.get(str(schema.get("format")))
    return fixed if fixed is not None else rng.choice(WORDS)


def schema_object(schema: dict[str, Any], rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """An object for an object schema: its required properties, then the optional ones."""
    raw_properties = schema.get("properties")
    properties: dict[str, Any] = raw_properties if isinstance(raw_properties, dict) else {}
    raw_required = schema.get("required")
    required = (
        [r for r in raw_required if isinstance(r, str)] if isinstance(raw_required, list) else []
    )
    out: dict[str, Any] = {}
    for name in [*required, *properties]:
        if name not in out:
            out[name] = schema_value(properties.get(name), rng, depth + 1)
    return out


@attrs.define(eq=False)
class _Download:
    """One model's download, shared by the pulls waiting for it."""

    model: SimModel
    start_bytes: int
    started: float  # virtual time
    rate: float  # bytes per second; 0 = instant
    waiters: int = 0

    @property
    def finishes(self) -> float:
        return self.started + pull_seconds(self.model.size_bytes - self.start_bytes, self.rate)

    def completed(self, now: float) -> int:
        total = self.model.size_bytes
        if self.rate <= 0 or now >= self.finishes:
            return total
        return min(total, self.start_bytes + int((now - self.started) * self.rate))


@attrs.define(eq=False)
class SimOllama:
    config: SimConfig
    url: str = ""
    open_streams: int = 0
    peak_open_streams: int = 0  # the most inference requests it held at once
    disconnects: int = 0
    pulls: int = 0
    prompt_cache_hits: int = 0
    load_requests: int = 0  # answered with done_reason "load"
    unload_requests: int = 0  # answered with done_reason "unload"
    probes: int = 0  # requests to /api/version, /api/ps, /api/tags and /api/show
    pulls_cancelled: int = 0  # pulls whose client went away before the end
    prompts: PromptCache = attrs.field(factory=PromptCache)
    requests: deque[tuple[str, dict[str, Any]]] = attrs.field(factory=lambda: deque(maxlen=1000))
    blobs: dict[str, int] = attrs.field(factory=dict)  # digest -> size, uploaded for create
    pushes: int = 0
    # Every request's (method, path, headers), as a real server would log them.
    seen: deque[tuple[str, str, dict[str, str]]] = attrs.field(factory=lambda: deque(maxlen=1000))
    _models: dict[str, SimModel] = attrs.field(factory=dict)
    _failure: str | None = None
    _failures_left: int | None = None
    _after_chunks: int = 2
    _pause_seconds: float = 0.0
    _probe_failure: str | None = None
    _probe_failures_left: int | None = None
    _probe_seconds: float = 0.0
    _pull_failure: str | None = None
    _pull_failures_left: int | None = None
    _slots: trio.Semaphore | None = None
    _listener: trio.CancelScope | None = None
    _reopen: trio.Event = attrs.field(factory=trio.Event)
    # Set once "refuse" has closed the listener and every connection (until cleared).
    closed: trio.Event = attrs.field(factory=trio.Event)
    # Set while the server accepts connections; replaced by a fresh event when it stops.
    listening: trio.Event = attrs.field(factory=trio.Event)
    # What is in memory (herd.sim.residency, shared with the virtual fleet), and its loads.
    memory: Residency = attrs.field(init=False)
    loads: Loader = attrs.field(init=False)
    _downloads: dict[str, _Download] = attrs.field(factory=dict)
    _partial: dict[str, int] = attrs.field(factory=dict)  # bytes kept from interrupted pulls

    def __attrs_post_init__(self) -> None:
        self.memory = residency_for(self.config, self.prompts)
        self.loads = Loader(self.memory)
        for model in self.config.models:
            self._models[model.name] = model
        self.memory.start(self._resident_at_start(), None)  # timed from serve()

    def _resident_at_start(self) -> list[tuple[str, int]]:
        sizes = {m.name: m.size_bytes for m in self.config.models}
        return [(name, sizes.get(name, 0)) for name in self.config.loaded]

    @property
    def cold_loads(self) -> int:
        return self.memory.cold_loads

    @property
    def evictions(self) -> int:
        """Models unloaded to make room for another."""
        return self.memory.evictions

    @property
    def expirations(self) -> int:
        """Models that left memory because their keep_alive ran out."""
        return self.memory.expirations

    # --- control ----------------------------------------------------------------------
    def fail(
        self, mode: str, times: int | None = None, after_chunks: int = 2, seconds: float = 0.0
    ) -> None:
        """Make inference requests fail: ``http500``, ``hang`` (no headers, ever) or, after
        ``after_chunks`` chunks, ``die_mid_stream`` (drop the connection), ``stall`` (go silent
        with it open, for good) or ``pause`` (go silent for ``seconds``, then go on), ``times``
        times or until cleared; or ``refuse``: stop listening, so connections are refused, until
        cleared (then await ``listening.wait()``). Streamed headers go out with the first
        chunk, as Ollama sends them, so ``stall`` or ``pause`` with ``after_chunks=0`` holds the
        headers back too (``die_mid_stream`` sends them, then drops). With ``stream: false``
        there are no chunks: ``stall`` never answers and ``pause`` answers ``seconds`` late."""
        if mode not in FAILURE_MODES:
            raise ValueError(f"unknown failure mode {mode!r}; choose from {FAILURE_MODES}")
        if mode == "pause" and seconds <= 0:
            raise ValueError("'pause' needs seconds > 0")
        if mode == "refuse":
            if times is not None:
                raise ValueError("'refuse' lasts until clear_failure(); times does not apply")
            if self._listener is not None:
                self._listener.cancel()
                self.listening = trio.Event()  # now, so a waiter can't see the old one
                self.closed = trio.Event()
        self._failure, self._failures_left, self._after_chunks = mode, times, after_chunks
        self._pause_seconds = seconds

    def clear_failure(self) -> None:
        if self._failure == "refuse":
            self._reopen.set()
        self._failure = None
        self._failures_left = None

    def _take_failure(self) -> str | None:
        mode = self._failure
        if mode is None:
            return None
        if self._failures_left is not None:
            self._failures_left -= 1
            if self._failures_left <= 0:
                self.clear_failure()
        return mode

    def fail_probes(self, mode: str, times: int | None = None, seconds: float = 0.0) -> None:
        """Make the read endpoints (``/api/version``, ``/api/ps``, ``/api/tags``, ``/api/show``)
        answer 500 (``http500``), never (``hang``) or ``seconds`` late (``slow``), ``times``
        times or until :meth:`clear_probe_failure`. Inference is not affected."""
        if mode not in PROBE_FAILURE_MODES:
            raise ValueError(f"unknown probe failure {mode!r}; choose from {PROBE_FAILURE_MODES}")
        if mode == "slow" and seconds <= 0:
            raise ValueError("'slow' needs seconds > 0")
        self._probe_failure, self._probe_failures_left = mode, times
        self._probe_seconds = seconds

    def clear_probe_failure(self) -> None:
        self._probe_failure = None
        self._probe_failures_left = None

    def _take_probe_failure(self) -> str | None:
        mode = self._probe_failure
        if mode is not None and self._probe_failures_left is not None:
            self._probe_failures_left -= 1
            if self._probe_failures_left <= 0:
                self.clear_probe_failure()
        return mode

    def fail_pulls(self, mode: str, times: int | None = None) -> None:
        """Make pulls never progress past their first line (``hang``: a node whose registry
        link is gone) or answer 500 (``http500``), ``times`` times or until cleared."""
        if mode not in PULL_FAILURE_MODES:
            raise ValueError(f"unknown pull failure {mode!r}; choose from {PULL_FAILURE_MODES}")
        self._pull_failure, self._pull_failures_left = mode, times

    def clear_pull_failure(self) -> None:
        self._pull_failure = None
        self._pull_failures_left = None

    def _take_pull_failure(self) -> str | None:
        mode = self._pull_failure
        if mode is not None and self._pull_failures_left is not None:
            self._pull_failures_left -= 1
            if self._pull_failures_left <= 0:
                self.clear_pull_failure()
        return mode

    @property
    def loaded_models(self) -> list[str]:
        self._expire()
        return self.memory.names()

    def used_bytes(self) -> int:
        self._expire()
        return self.memory.used_bytes()

    def system_reading(self) -> tuple[CpuInfo, MemoryInfo, DiskInfo]:
        """The simulated machine's metrics, for a node agent reporting this sim."""
        self._expire()
        busy = min(100.0, 100.0 * self.open_streams / max(1, self.config.parallel))
        return (
            CpuInfo(cores=8, percent=busy),
            # The OS and apps take a share, as on a real machine (see herd.sim.residency).
            MemoryInfo(
                total_bytes=self.config.memory_bytes, available_bytes=self.memory.available_bytes()
            ),
            DiskInfo(total_bytes=1024 * GiB, free_bytes=512 * GiB),
        )

    def accelerator_reading(self) -> tuple[GpuInfo, ...]:
        """The simulated machine's accelerator as the node agent would read it (none unless
        ``SimConfig.vram_bytes`` is set above 0), for a node agent reporting this sim."""
        self._expire()
        busy = min(100.0, 100.0 * self.open_streams / max(1, self.config.parallel))
        return accelerator_reading(self.config, self.memory, busy)

    async def read_accelerators(self) -> tuple[GpuInfo, ...]:
        """:meth:`accelerator_reading` as a node agent's accelerator source."""
        return self.accelerator_reading()

    # --- residency ----------------------------------------------------------------------
    def _expire(self) -> None:
        """Unload the models whose keep-alive ran out (lazily: before every answer)."""
        try:
            now = trio.current_time()
        except RuntimeError:  # outside trio.run: no clock to read
            return
        self.loads.expire(now)

    def _expires_at(self, name: str, now: float, wall: float) -> str:
        """When ``name`` leaves memory, as /api/ps says it: an RFC 3339 wall-clock time."""
        at = self.memory.expires_at(name, now)
        left = GO_MAX_DURATION_SECONDS if at == FOREVER else at - now
        return _rfc3339(wall + min(left, GO_MAX_DURATION_SECONDS))

    # --- serving ------------------------------------------------------------------------
    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._slots = trio.Semaphore(max(1, self.config.parallel))
        self.memory.start(
            [(n, s) for n, s in self._resident_at_start() if self.memory.resident(n)],
            trio.current_time(),
        )
        started = False
        while True:
            with trio.CancelScope() as self._listener:
                async with trio.open_nursery() as nursery:
                    self.url = await nursery.start(serve_app, self, host, port)
                    port = int(self.url.rsplit(":", 1)[1])  # reopen on the same port
                    self.listening.set()
                    if not started:
                        started = True
                        task_status.started(self.url)
            # "refuse": the listener (and every open connection) is gone until cleared.
            self.closed.set()
            await self._reopen.wait()
            self._reopen = trio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        self.seen.append(
            (method, path, {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]})
        )
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self._expire()
        if method == "POST" and path in INFERENCE_PATHS:
            await self._inference(path, body, receive, send)
            return
        if (method, path) == ("POST", "/api/pull"):
            await self._pull(body, receive, send)
            return
        if path.startswith("/api/blobs/") and method in ("HEAD", "POST"):
            await self._blob(method, path.removeprefix("/api/blobs/"), body, send)
            return
        handler = {
            ("POST", "/api/copy"): self._copy,
            ("POST", "/api/create"): self._create,
            ("POST", "/api/push"): self._push,
            ("GET", "/"): self._root,
            ("HEAD", "/"): self._root,
            ("GET", "/api/tags"): self._tags,
            ("GET", "/api/ps"): self._ps,
            ("GET", "/api/version"): self._version,
            ("POST", "/api/show"): self._show,
            ("DELETE", "/api/delete"): self._delete,
        }.get((method, path))
        if handler is None:
            await self._json(send, 404, {"error": f"404 page not found: {path}"})
            return
        if (method, path) in PROBE_ROUTES:
            self.probes += 1
            failure = self._take_probe_failure()
            if failure == "http500":
                await self._json(send, 500, {"error": "simulated internal error"})
                return
            if failure is not None:
                await self._watched(receive, send, self._late(failure, handler, body))
                return
        await handler(body, send)

    def _late(
        self, failure: str, handler: Callable[[bytes, Send], Awaitable[None]], body: bytes
    ) -> Callable[[Send], Awaitable[None]]:
        """A probe answered late (``slow``) or never (``hang``)."""
        seconds = self._probe_seconds if failure == "slow" else math.inf

        async def late(send: Send) -> None:
            await trio.sleep(seconds)
            self._expire()  # what it says is true when it says it
            await handler(body, send)

        return late

    async def _watched(
        self, receive: Receive, send: Send, work: Callable[[Send], Awaitable[None]]
    ) -> bool:
        """Run ``work`` (answering through the ``send`` it is given), cancelled if the client
        disconnects before the last byte. Returns True when it did."""
        gone = finished = False
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal gone
                while (await receive())["type"] != "http.disconnect":
                    pass
                if not finished:  # after the last byte a disconnect is the normal end
                    gone = True
                    nursery.cancel_scope.cancel()

            async def send_marking_end(message: Message) -> None:
                nonlocal finished
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    finished = True
                await send(message)

            nursery.start_soon(watch)
            try:
                await work(send_marking_end)
            finally:
                nursery.cancel_scope.cancel()
        return gone

    async def _json(
        self, send: Send, status: int, data: Any, content_type: bytes = b"application/json"
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type)],
            }
        )
        await send({"type": "http.response.body", "body": _dump(data)})

    async def _ndjson_start(self, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-ndjson")],
            }
        )

    async def _line(self, send: Send, data: Any) -> None:
        await send({"type": "http.response.body", "body": _dump(data) + b"\n", "more_body": True})

    def _parse(self, body: bytes) -> dict[str, Any] | str:
        try:
            data = json.loads(body or b"{}")
        except ValueError as exc:
            return f"invalid JSON: {exc}"
        if not isinstance(data, dict):
            return "request body must be a JSON object"
        return data

    # --- read endpoints -----------------------------------------------------------------
    async def _root(self, body: bytes, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": b"Ollama is running"})

    def _details(self, model: SimModel) -> dict[str, Any]:
        return {
            "parent_model": model.parent_model,
            "format": "gguf",
            "family": model.family,
            "families": [model.family],
            "parameter_size": model.parameter_size,
            "quantization_level": model.quantization,
        }

    async def _tags(self, body: bytes, send: Send) -> None:
        models = [
            {
                "name": m.name,
                "model": m.name,
                "modified_at": "2026-01-01T00:00:00Z",
                "size": m.size_bytes,
                "digest": m.digest,
                "details": self._details(m),
            }
            for m in self._models.values()
        ]
        await self._json(send, 200, {"models": models})

    async def _ps(self, body: bytes, send: Send) -> None:
        now, wall = trio.current_time(), time.time()
        models = []
        for name in self.memory.names():
            m = self._models[name]
            models.append(
                {
                    "name": m.name,
                    "model": m.name,
                    "size": m.size_bytes,
                    "digest": m.digest,
                    "details": self._details(m),
                    "expires_at": self._expires_at(name, now, wall),
                    "size_vram": self.memory.size_vram(name),
                    "context_length": m.context_length,
                }
            )
        await self._json(send, 200, {"models": models})

    async def _version(self, body: bytes, send: Send) -> None:
        await self._json(send, 200, {"version": self.config.version})

    def _model_or_error(self, data: dict[str, Any]) -> SimModel | tuple[int, str]:
        name = data.get("model") or data.get("name")
        if not isinstance(name, str) or not name:
            return 400, "model is required"
        model = self._models.get(canonical_name(name))
        if model is None:
            return 404, f'model "{name}" not found, try pulling it first'
        return model

    async def _requested_model(self, body: bytes, send: Send) -> SimModel | None:
        """The model a management request names, or None after answering with the error."""
        data = self._parse(body)
        if isinstance(data, str):
            await self._json(send, 400, {"error": data})
            return None
        model = self._model_or_error(data)
        if isinstance(model, tuple):
            await self._json(send, model[0], {"error": model[1]})
            return None
        return model

    async def _show(self, body: bytes, send: Send) -> None:
        model = await self._requested_model(body, send)
        if model is None:
            return
        capabilities = ["embedding"] if model.embedding else ["completion"]
        if model.vision:
            capabilities.append("vision")
        if model.tools and not model.embedding:
            capabilities.append("tools")
        if model.thinking and not model.embedding:
            capabilities.append("thinking")
        await self._json(
            send,
            200,
            {
                "modelfile": f"FROM {model.name}\n",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": self._details(model),
                "model_info": {
                    "general.architecture": model.family,
                    f"{model.family}.context_length": model.context_length,
                },
                "capabilities": capabilities,
                "modified_at": "2026-01-01T00:00:00Z",
            },
        )

    # --- pulls and deletes --------------------------------------------------------------
    async def _pull(self, body: bytes, receive: Receive, send: Send) -> None:
        data = self._parse(body)
        if isinstance(data, str):
            await self._json(send, 400, {"error": data})
            return
        name = data.get("model") or data.get("name")
        if not isinstance(name, str) or not name:
            await self._json(send, 400, {"error": "model is required"})
            return
        name = canonical_name(name)
        stream = data.get("stream") is not False
        failure = self._take_pull_failure()
        if failure == "http500":
            await self._json(send, 500, {"error": "simulated internal error"})
            return
        known = {m.name: m for m in self.config.registry} | self._models
        if failure == "hang":

            async def stuck(out: Send) -> None:
                if stream:
                    await self._ndjson_start(out)
                    await self._line(out, {"status": "pulling manifest"})
                await trio.sleep_forever()

            if await self._watched(receive, send, stuck):
                self.pulls_cancelled += 1
            return
        if name not in known:
            error = {"error": "pull model manifest: file does not exist"}
            if not stream:
                await self._json(send, 500, error)
                return
            await self._ndjson_start(send)
            await send(
                {
                    "type": "http.response.body",
                    "more_body": False,
                    "body": _dump({"status": "pulling manifest"}) + b"\n" + _dump(error) + b"\n",
                }
            )
            return
        model = known[name]
        self.pulls += 1

        async def pull(out: Send) -> None:
            await self._pull_model(model, stream, out)

        if await self._watched(receive, send, pull):
            self.pulls_cancelled += 1

    async def _pull_model(self, model: SimModel, stream: bool, send: Send) -> None:
        """Download ``model`` (sharing a download under way), then list it."""
        if stream:
            await self._ndjson_start(send)
            await self._line(send, {"status": "pulling manifest"})
        download = self._downloads.get(model.name)
        if download is None:
            have = model.size_bytes if model.name in self._models else 0
            download = self._downloads[model.name] = _Download(
                model,
                max(have, self._partial.pop(model.name, 0)),
                trio.current_time(),
                self.config.pull_bytes_per_second,
            )
        download.waiters += 1
        try:
            while True:
                now = trio.current_time()
                completed = download.completed(now)
                if stream:
                    await self._line(
                        send,
                        {
                            "status": f"pulling {model.digest[:12]}",
                            "digest": f"sha256:{model.digest}",
                            "total": model.size_bytes,
                            "completed": completed,
                        },
                    )
                if completed >= model.size_bytes:
                    break
                await trio.sleep(min(PULL_TICK, download.finishes - now))
        finally:
            download.waiters -= 1
            if download.waiters == 0 and self._downloads.get(model.name) is download:
                # The last client is gone (or done): the download stops, its bytes stay.
                del self._downloads[model.name]
                completed = download.completed(trio.current_time())
                if completed < model.size_bytes:
                    self._partial[model.name] = completed
        self._models.setdefault(model.name, model)  # the manifest is written: it is listed
        if not stream:
            await self._json(send, 200, {"status": "success"})
            return
        for status in ("verifying sha256 digest", "writing manifest"):
            await self._line(send, {"status": status})
        await send({"type": "http.response.body", "body": _dump({"status": "success"}) + b"\n"})

    async def _delete(self, body: bytes, send: Send) -> None:
        model = await self._requested_model(body, send)
        if model is None:
            return
        del self._models[model.name]
        self.loads.unload(model.name)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    # --- model building: copy, create, push, blobs ------------------------------------
    async def _blob(self, method: str, digest: str, body: bytes, send: Send) -> None:
        """``HEAD``: 200 if the blob is here, else 404. ``POST``: store it (201), if its
        sha256 is the digest named (else 400, as Ollama checks)."""
        if method == "HEAD":
            status = 200 if digest in self.blobs else 404
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        actual = "sha256:" + hashlib.sha256(body).hexdigest()
        if actual != digest:
            await self._json(send, 400, {"error": "digest mismatch"})
            return
        self.blobs[digest] = len(body)
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def _copy(self, body: bytes, send: Send) -> None:
        data = self._parse(body)
        source = data.get("source") if isinstance(data, dict) else None
        target = data.get("destination") if isinstance(data, dict) else None
        if not isinstance(source, str) or not isinstance(target, str) or not target:
            await self._json(send, 400, {"error": "source and destination are required"})
            return
        model = self._models.get(canonical_name(source))
        if model is None:
            await self._json(send, 404, {"error": f"model '{source}' not found"})
            return
        name = canonical_name(target)
        self._models[name] = attrs.evolve(model, name=name)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def _progress(self, send: Send, lines: list[dict[str, Any]], stream: bool) -> None:
        if not stream:
            await self._json(send, 200, lines[-1])
            return
        await self._ndjson_start(send)
        for line in lines:
            await send(
                {"type": "http.response.body", "body": _dump(line) + b"\n", "more_body": True}
            )
        await send({"type": "http.response.body", "body": b""})

    async def _create(self, body: bytes, send: Send) -> None:
        """A model from another (``from``) or from uploaded blobs (``files``)."""
        data = self._parse(body)
        if isinstance(data, str):
            await self._json(send, 400, {"error": data})
            return
        name, base, files = data.get("model"), data.get("from"), data.get("files")
        if not isinstance(name, str) or not name:
            await self._json(send, 400, {"error": "model is required"})
            return
        if isinstance(files, dict):
            missing = [d for d in files.values() if d not in self.blobs]
            if missing:
                await self._json(send, 400, {"error": f"blob {missing[0]} not found"})
                return
            template = SimModel(canonical_name(name))
        elif isinstance(base, str) and canonical_name(base) in self._models:
            template = self._models[canonical_name(base)]
        else:
            await self._json(send, 400, {"error": "neither 'from' nor 'files' was specified"})
            return
        self._models[canonical_name(name)] = attrs.evolve(template, name=canonical_name(name))
        lines: list[dict[str, Any]] = [
            {"status": "using existing layer"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        await self._progress(send, lines, data.get("stream") is not False)

    async def _push(self, body: bytes, send: Send) -> None:
        model = await self._requested_model(body, send)
        if model is None:
            return
        data = self._parse(body)
        stream = not isinstance(data, dict) or data.get("stream") is not False
        lines: list[dict[str, Any]] = [
            {"status": "retrieving manifest"},
            {"status": "pushing manifest"},
            {"status": "success"},
        ]
        self.pushes += 1
        await self._progress(send, lines, stream)

    # --- inference ----------------------------------------------------------------------
    async def _inference(self, path: str, body: bytes, receive: Receive, send: Send) -> None:
        data = self._parse(body)
        if isinstance(data, str):
            await self._json(send, 400, {"error": data})
            return
        self.requests.append((path, data))
        failure = self._take_failure()
        if failure == "http500":
            await self._json(send, 500, {"error": "simulated internal error"})
            return
        try:  # fields Ollama refuses while reading the request
            raw_keep = data.get("keep_alive")
            keep = self.memory.default_keep if raw_keep is None else keep_alive_seconds(raw_keep)
            think = _think(data.get("think"))
        except ValueError as exc:
            await self._json(send, 400, {"error": str(exc)})
            return
        model = self._model_or_error(data)
        if isinstance(model, tuple):
            await self._json(send, model[0], {"error": model[1]})
            return
        if path in ("/api/embed", "/api/embeddings"):
            if not model.embedding:
                unsupported = f'"{model.name}" does not support embeddings'
                await self._json(send, 400, {"error": unsupported})
                return
        else:
            if _is_load_request(path, data) and keep == 0:
                await self._unload_request(path, data, model, send)
                return
            error = _capability_error(path, data, model, think)
            if error is not None:
                await self._json(send, 400, {"error": error})
                return

        async def respond(out: Send) -> None:
            await self._respond(path, data, model, keep, think, failure, out)

        self.open_streams += 1
        self.peak_open_streams = max(self.peak_open_streams, self.open_streams)
        try:
            gone = await self._watched(receive, send, respond)
        finally:
            self.open_streams -= 1
        if gone:
            self.disconnects += 1

    async def _unload_request(
        self, path: str, data: dict[str, Any], model: SimModel, send: Send
    ) -> None:
        self.unload_requests += 1
        self.loads.unload_when_idle(model.name)  # (if busy: when its last request ends)
        await self._json(send, 200, _load_answer(path, data, "unload"))

    async def _ensure_loaded(self, model: SimModel) -> float:
        """Make ``model`` resident (evicting least recently used idle ones, waiting for busy
        ones). Returns the seconds this request waited for a load."""
        return await self.loads.ensure(model.name, model.size_bytes, model.load_seconds)

    async def _respond(
        self,
        path: str,
        data: dict[str, Any],
        model: SimModel,
        keep: float,
        think: bool | str | None,
        failure: str | None,
        send: Send,
    ) -> None:
        assert self._slots is not None
        if failure == "hang":
            await trio.sleep_forever()
        if path in ("/api/chat", "/api/generate") and _is_load_request(path, data):
            await self._ensure_loaded(model)  # a load takes no parallel slot
            self.memory.acquire(model.name, keep)
            self.loads.release(model.name)
            self.load_requests += 1
            await self._json(send, 200, _load_answer(path, data, "load"))
            return
        async with self._slots:
            load = await self._ensure_loaded(model)
            self.memory.acquire(model.name, keep)
            try:
                if path == "/api/embed":
                    await self._embed(data, model, load, send)
                elif path == "/api/embeddings":
                    prompt = str(data.get("prompt", ""))
                    vector = _rounded(self._vector(prompt, model))
                    await self._json(send, 200, {"embedding": vector})
                elif _has_images(path, data) and not model.vision:
                    await self._json(send, 400, {"error": NO_VISION})
                else:
                    thinks = model.thinking if think is None else bool(think)
                    await self._generate(path, data, model, load, thinks, failure, send)
            finally:
                self.loads.release(model.name)

    def _vector(self, text: str, model: SimModel) -> list[float]:
        """A unit vector for ``text``, the same every time."""
        digest = hashlib.sha256(f"{model.name}\0{text}".encode()).digest()
        size = len(digest)
        blocks = [digest]
        for block in range(1, -(-model.embedding_dim // size)):
            blocks.append(hashlib.sha256(digest + block.to_bytes(4, "big")).digest())
        raw = [(blocks[i // size][i % size] - 127.5) / 127.5 for i in range(model.embedding_dim)]
        return _normalised(raw)

    async def _embed(self, data: dict[str, Any], model: SimModel, load: float, send: Send) -> None:
        value = data.get("input")
        inputs = [value] if isinstance(value, str) else value
        if not isinstance(inputs, list) or not all(isinstance(v, str) for v in inputs):
            await self._json(send, 400, {"error": "input must be a string or list of strings"})
            return
        options = data.get("options") if isinstance(data.get("options"), dict) else {}
        assert isinstance(options, dict)
        num_ctx = options.get("num_ctx")
        context = model.context_length
        if isinstance(num_ctx, int) and not isinstance(num_ctx, bool) and num_ctx > 0:
            context = min(context, num_ctx)
        dimensions = data.get("dimensions")
        vectors = []
        tokens = 0
        for text in inputs:
            words = text.split()
            if len(words) > context:
                if data.get("truncate") is False:
                    error = "input exceeds maximum context length"
                    await self._json(send, 400, {"error": error})
                    return
                text = " ".join(words[:context])
            tokens += max(1, min(len(words), context))
            vector = self._vector(text, model)
            if isinstance(dimensions, int) and 0 < dimensions < len(vector):
                vector = _normalised(vector[:dimensions])
            vectors.append(_rounded(vector))
        await self._json(
            send,
            200,
            {
                "model": model.name,
                "embeddings": vectors,
                "total_duration": int(load * 1e9) + 1_000_000,
                "load_duration": int(load * 1e9),
                "prompt_eval_count": tokens,
            },
        )

    def _prompt_tokens(self, data: dict[str, Any]) -> int:
        words = 0
        for message in data.get("messages") or []:
            if isinstance(message, dict):
                words += len(str(message.get("content", "")).split()) + 4
        words += len(str(data.get("prompt", "")).split())
        return max(1, words)

    async def _prefill(self, data: dict[str, Any], model: SimModel, prompt_tokens: int) -> float:
        """Process the prompt: the part the prompt cache doesn't hold costs prefill time.
        Returns the seconds spent."""
        messages = data.get("messages")
        messages = messages if isinstance(messages, list) else []
        keys = prefix_keys(messages)
        cached = min(
            prompt_tokens, self.prompts.cached_tokens(model.name, continuation_keys(messages, keys))
        )
        if cached:
            self.prompt_cache_hits += 1
        seconds = prefill_seconds(
            prompt_tokens - cached,
            model.prefill_tokens_per_second,
            self.config.speed * self.memory.speed(model.name),
        )
        if seconds:
            await trio.sleep(seconds)
        if keys:
            self.prompts.remember(model.name, keys[-1], prompt_tokens)
        return seconds

    async def _generate(
        self,
        path: str,
        data: dict[str, Any],
        model: SimModel,
        load: float,
        thinks: bool,
        failure: str | None,
        send: Send,
    ) -> None:
        chat = path == "/api/chat"
        options = data.get("options") if isinstance(data.get("options"), dict) else {}
        assert isinstance(options, dict)
        limit = options.get("num_predict")
        limited = isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0
        count = limit if isinstance(limit, int) and limited else self.config.default_tokens
        count = min(count, model.context_length)  # as a real server: bounded by the context
        thinking_count = max(0, model.thinking_tokens) if thinks else 0
        if limited:
            thinking_count = min(thinking_count, count)
        thinking = [
            w + " " for w in itertools.islice(itertools.cycle(THINKING_WORDS), thinking_count)
        ]
        messages = data.get("messages") if chat else None
        messages = messages if isinstance(messages, list) else []
        tool_calls: list[dict[str, Any]] = []
        if chat and data.get("tools") and model.tools and not _after_tool_result(messages):
            tool_calls = [_tool_call(data["tools"], messages)]
            tokens: list[str] = []
        elif data.get("format"):
            tokens = ['{"answer": ', '"herd"}']
        else:
            tokens = [w + " " for w in itertools.islice(itertools.cycle(WORDS), count)]
        if limited:
            tokens = tokens[: max(0, count - thinking_count)]
        # A call's arguments cost tokens to generate too (about four characters each).
        call_tokens = sum(max(1, len(_dump(c["function"]["arguments"])) // 4) for c in tool_calls)
        produced = thinking_count + len(tokens)
        done_reason = "length" if limited and limit == produced and not tool_calls else "stop"
        stream = data.get("stream", True) is not False
        created = _now_iso()
        prompt_tokens = self._prompt_tokens(data)
        rate = model.tokens_per_second * self.config.speed * self.memory.speed(model.name)
        delay = 1.0 / rate if rate > 0 else 0.0
        eval_count = produced + call_tokens
        prefill = await self._prefill(data, model, prompt_tokens)

        def piece(
            text: str,
            done: bool,
            calls: list[dict[str, Any]] | None = None,
            thought: str = "",
        ) -> dict[str, Any]:
            out: dict[str, Any] = {"model": model.name, "created_at": created}
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if thought:
                    message["thinking"] = thought
                if calls:
                    message["tool_calls"] = calls
                out["message"] = message
            else:
                out["response"] = text
                if thought:
                    out["thinking"] = thought
            out["done"] = done
            return out

        def final(text: str, calls: list[dict[str, Any]] | None, thought: str) -> dict[str, Any]:
            out = piece(text, True, calls, thought)
            eval_ns = int(eval_count * delay * 1e9) or eval_count * 1000
            out.update(
                {
                    "done_reason": done_reason,
                    "total_duration": int((load + prefill) * 1e9) + eval_ns + 1_000_000,
                    "load_duration": int(load * 1e9),
                    "prompt_eval_count": prompt_tokens,
                    "prompt_eval_duration": int(prefill * 1e9) or 1_000_000,
                    "eval_count": eval_count,
                    "eval_duration": eval_ns,
                }
            )
            return out

        if not stream:
            if delay:
                await trio.sleep(delay * eval_count)
            if failure == "stall":
                await trio.sleep_forever()
            if failure == "pause":
                await trio.sleep(self._pause_seconds)
            if failure == "die_mid_stream":
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "http.response.body", "body": b'{"model":', "more_body": True})
                raise _Abort("died")
            answer = final("".join(tokens), tool_calls or None, "".join(thinking))
            await self._json(send, 200, answer)
            return
        # (tokens to decode first, chunk): thinking, then content, then the tool call.
        steps = [(1, piece("", False, thought=t)) for t in thinking]
        steps += [(1, piece(t, False)) for t in tokens]
        if tool_calls:
            steps.append((call_tokens, piece("", False, tool_calls)))
        steps.append((0, final("", None, "")))
        for sent, (cost, chunk) in enumerate(steps):
            last = sent == len(steps) - 1
            if failure == "die_mid_stream" and (sent >= self._after_chunks or last):
                if sent == 0:  # (headers first: hypercorn would answer 500 to an early raise)
                    await self._ndjson_start(send)
                raise _Abort("died mid-stream")
            if failure == "stall" and sent >= self._after_chunks:
                await trio.sleep_forever()
            if failure == "pause" and sent == self._after_chunks:
                await trio.sleep(self._pause_seconds)
            if delay and cost:
                await trio.sleep(delay * cost)
            if sent == 0:  # Ollama's headers go out with its first chunk
                await self._ndjson_start(send)
            if last:
                await send({"type": "http.response.body", "body": _dump(chunk) + b"\n"})
            else:
                await self._line(send, chunk)


def _normalised(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def _rounded(vector: list[float]) -> list[float]:
    return [round(v, 6) for v in vector]


def _think(value: Any) -> bool | str | None:
    """The request's ``think``: unset, a boolean or a level. Raises ValueError as Ollama."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value in THINK_LEVELS:
        return value
    raise ValueError('think must be a boolean or string ("high", "medium", "low", true, or false)')


def _is_load_request(path: str, data: dict[str, Any]) -> bool:
    """No prompt (generate) or no messages (chat): Ollama only loads (or unloads) the model."""
    if path == "/api/chat":
        return not data.get("messages")
    return not data.get("prompt")


def _has_images(path: str, data: dict[str, Any]) -> bool:
    if path == "/api/generate":
        return bool(data.get("images"))
    messages = data.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict) and bool(m.get("images")) for m in messages
    )


def _capability_error(
    path: str, data: dict[str, Any], model: SimModel, think: bool | str | None
) -> str | None:
    """What Ollama answers (400) before loading for a request ``model`` can't serve."""
    requested = data.get("model") or data.get("name")
    if isinstance(think, str) and not model.name.startswith("gpt-oss"):  # levels: gpt-oss only
        return f'think value "{think}" is not supported for this model'
    if think and not model.thinking:
        return f'"{requested}" does not support thinking'
    if model.embedding:
        return f'"{requested}" does not support {"chat" if path == "/api/chat" else "generate"}'
    if path == "/api/chat" and data.get("tools") and not model.tools:
        return f"{full_name(model.name)} does not support tools"
    return None


def _load_answer(path: str, data: dict[str, Any], reason: str) -> dict[str, Any]:
    out: dict[str, Any] = {"model": data.get("model") or data.get("name"), "created_at": _now_iso()}
    if path == "/api/chat":
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    out["done"] = True
    out["done_reason"] = reason
    return out


def _after_tool_result(messages: list[Any]) -> bool:
    return bool(messages) and isinstance(messages[-1], dict) and messages[-1].get("role") == "tool"


def _tool_call(tools: Any, messages: list[Any]) -> dict[str, Any]:
    """A call to the first tool, its arguments made up from its schema, the same for the same
    conversation."""
    first = tools[0] if isinstance(tools, list) and tools else {}
    raw_function = first.get("function") if isinstance(first, dict) else None
    function: dict[str, Any] = raw_function if isinstance(raw_function, dict) else {}
    name = str(function.get("name", ""))
    prompt = "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    digest = hashlib.sha256(f"{name}\0{prompt}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    parameters = function.get("parameters")
    arguments = schema_object(parameters, rng) if isinstance(parameters, dict) else {}
    return {
        "id": f"call_{digest[8:12].hex()}",
        "function": {"index": 0, "name": name, "arguments": arguments},
    }


@contextlib.asynccontextmanager
async def run_sim(config: SimConfig, host: str = "127.0.0.1") -> AsyncIterator[SimOllama]:
    """Serve a :class:`SimOllama` on ``host`` (port 0) for the duration of the block."""
    sim = SimOllama(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, host, 0)
        try:
            yield sim
        finally:
            nursery.cancel_scope.cancel()
