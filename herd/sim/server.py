"""A simulated Ollama server: Ollama's HTTP API on loopback, with models that load, generate at a
set token rate, use memory, and fail in the ways real nodes fail.

Used as the fake node in tests, by ``herd demo`` and by the benchmarks. It is a raw ASGI app on
hypercorn's Trio worker, so its own cost stays small next to the router it is measured against.
Time goes through ``trio.sleep``, so tests on a virtual clock see exact load times.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import itertools
import json
import math
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import attrs
import trio

from herd.models import CpuInfo, DiskInfo, MemoryInfo
from herd.policy.conversation import continuation_keys, prefix_keys
from herd.server import serve_app
from herd.sim.costs import PromptCache, prefill_seconds

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
FAILURE_MODES = ("refuse", "http500", "hang", "die_mid_stream", "stall")
INFERENCE_PATHS = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings")


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


class _Abort(Exception):
    """Raised inside the app to make hypercorn drop the connection mid-response."""


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def _dump(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


@attrs.define(eq=False)
class SimOllama:
    config: SimConfig
    url: str = ""
    open_streams: int = 0
    disconnects: int = 0
    cold_loads: int = 0
    pulls: int = 0
    prompt_cache_hits: int = 0
    prompts: PromptCache = attrs.field(factory=PromptCache)
    requests: deque[tuple[str, dict[str, Any]]] = attrs.field(factory=lambda: deque(maxlen=1000))
    _models: dict[str, SimModel] = attrs.field(factory=dict)
    _resident: OrderedDict[str, None] = attrs.field(factory=OrderedDict)
    _failure: str | None = None
    _failures_left: int | None = None
    _after_chunks: int = 2
    _slots: trio.Semaphore | None = None
    _loading: dict[str, trio.Event] = attrs.field(factory=dict)
    _listener: trio.CancelScope | None = None
    _reopen: trio.Event = attrs.field(factory=trio.Event)
    # Set while the server accepts connections; replaced by a fresh event when it stops.
    listening: trio.Event = attrs.field(factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        for model in self.config.models:
            self._models[model.name] = model
        for name in self.config.loaded:
            self._resident[name] = None

    # --- control ----------------------------------------------------------------------
    def fail(self, mode: str, times: int | None = None, after_chunks: int = 2) -> None:
        """Make inference requests fail: ``http500``, ``hang`` (no headers, ever) or
        ``die_mid_stream`` / ``stall`` (after ``after_chunks`` chunks, drop the connection / go
        silent with it open), ``times`` times or until cleared;
        or ``refuse``: stop listening, so connections are refused, until cleared (then await
        ``listening.wait()``)."""
        if mode not in FAILURE_MODES:
            raise ValueError(f"unknown failure mode {mode!r}; choose from {FAILURE_MODES}")
        if mode == "refuse":
            if times is not None:
                raise ValueError("'refuse' lasts until clear_failure(); times does not apply")
            if self._listener is not None:
                self._listener.cancel()
                self.listening = trio.Event()  # now, so a waiter can't see the old one
        self._failure, self._failures_left, self._after_chunks = mode, times, after_chunks

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

    @property
    def loaded_models(self) -> list[str]:
        return list(self._resident)

    def used_bytes(self) -> int:
        return sum(self._models[n].size_bytes for n in self._resident if n in self._models)

    def system_reading(self) -> tuple[CpuInfo, MemoryInfo, DiskInfo]:
        """The simulated machine's metrics, for a node agent reporting this sim."""
        total = self.config.memory_bytes
        # The OS and apps take a share, as on a real machine.
        available = max(0, int(total * 0.9) - self.used_bytes())
        busy = min(100.0, 100.0 * self.open_streams / max(1, self.config.parallel))
        return (
            CpuInfo(cores=8, percent=busy),
            MemoryInfo(total_bytes=total, available_bytes=available),
            DiskInfo(total_bytes=1024 * GiB, free_bytes=512 * GiB),
        )

    # --- serving ------------------------------------------------------------------------
    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._slots = trio.Semaphore(max(1, self.config.parallel))
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
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if method == "POST" and path in INFERENCE_PATHS:
            await self._inference(path, body, receive, send)
            return
        handler = {
            ("GET", "/"): self._root,
            ("HEAD", "/"): self._root,
            ("GET", "/api/tags"): self._tags,
            ("GET", "/api/ps"): self._ps,
            ("GET", "/api/version"): self._version,
            ("POST", "/api/show"): self._show,
            ("POST", "/api/pull"): self._pull,
            ("DELETE", "/api/delete"): self._delete,
        }.get((method, path))
        if handler is None:
            await self._json(send, 404, {"error": f"404 page not found: {path}"})
            return
        await handler(body, send)

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
            "parent_model": "",
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
        models = []
        for name in self._resident:
            m = self._models[name]
            models.append(
                {
                    "name": m.name,
                    "model": m.name,
                    "size": m.size_bytes,
                    "digest": m.digest,
                    "details": self._details(m),
                    "expires_at": "2318-01-01T00:00:00Z",
                    "size_vram": m.size_bytes,
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
        if ":" not in name.rsplit("/", 1)[-1]:
            name += ":latest"
        model = self._models.get(name)
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
        if model.tools and not model.embedding:
            capabilities.append("tools")
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

    async def _pull(self, body: bytes, send: Send) -> None:
        data = self._parse(body)
        if isinstance(data, str):
            await self._json(send, 400, {"error": data})
            return
        name = data.get("model") or data.get("name")
        if not isinstance(name, str) or not name:
            await self._json(send, 400, {"error": "model is required"})
            return
        if ":" not in name.rsplit("/", 1)[-1]:
            name += ":latest"
        known = {m.name: m for m in self.config.registry} | self._models
        if name not in known:
            error = {"error": "pull model manifest: file does not exist"}
            if data.get("stream") is False:
                await self._json(send, 500, error)
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson")],
                }
            )
            await send(
                {
                    "type": "http.response.body",
                    "more_body": False,
                    "body": _dump({"status": "pulling manifest"}) + b"\n" + _dump(error) + b"\n",
                }
            )
            return
        model = self._models.setdefault(name, known[name])
        self.pulls += 1
        if data.get("stream") is False:
            await self._json(send, 200, {"status": "success"})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-ndjson")],
            }
        )
        lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        for done in (0, model.size_bytes // 2, model.size_bytes):
            lines.append(
                {
                    "status": f"pulling {model.digest[:12]}",
                    "digest": model.digest,
                    "total": model.size_bytes,
                    "completed": done,
                }
            )
        lines += [
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        for line in lines:
            await send(
                {"type": "http.response.body", "body": _dump(line) + b"\n", "more_body": True}
            )
        await send({"type": "http.response.body", "body": b""})

    async def _delete(self, body: bytes, send: Send) -> None:
        model = await self._requested_model(body, send)
        if model is None:
            return
        del self._models[model.name]
        self._resident.pop(model.name, None)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

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
        model = self._model_or_error(data)
        if isinstance(model, tuple):
            await self._json(send, model[0], {"error": model[1]})
            return
        embed_path = path in ("/api/embed", "/api/embeddings")
        if embed_path != model.embedding:
            verb = "embeddings" if embed_path else "generate"
            await self._json(send, 400, {"error": f'"{model.name}" does not support {verb}'})
            return
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
            self.open_streams += 1
            try:
                await self._respond(path, data, model, failure, send_marking_end)
            finally:
                self.open_streams -= 1
                if gone:
                    self.disconnects += 1
                nursery.cancel_scope.cancel()

    async def _ensure_loaded(self, model: SimModel) -> float:
        """Make ``model`` resident (evicting least recently used ones). Returns load seconds."""
        if model.name in self._resident:
            self._resident.move_to_end(model.name)
            return 0.0
        pending = self._loading.get(model.name)
        if pending is not None:
            await pending.wait()
            return model.load_seconds
        done = self._loading[model.name] = trio.Event()
        try:
            await trio.sleep(model.load_seconds)
            while (
                self._resident and self.used_bytes() + model.size_bytes > self.config.memory_bytes
            ):
                evicted, _ = self._resident.popitem(last=False)
                self.prompts.drop(evicted)
            self._resident[model.name] = None
            self.cold_loads += 1
        finally:
            del self._loading[model.name]
            done.set()
        return model.load_seconds

    async def _respond(
        self, path: str, data: dict[str, Any], model: SimModel, failure: str | None, send: Send
    ) -> None:
        assert self._slots is not None
        if failure == "hang":
            await trio.sleep_forever()
        async with self._slots:
            load = await self._ensure_loaded(model)
            if path == "/api/embed":
                await self._embed(data, model, load, send)
            elif path == "/api/embeddings":
                prompt = str(data.get("prompt", ""))
                await self._json(send, 200, {"embedding": self._vector(prompt, model)})
            else:
                await self._generate(path, data, model, load, failure, send)

    def _vector(self, text: str, model: SimModel) -> list[float]:
        digest = hashlib.sha256(f"{model.name}\0{text}".encode()).digest()
        raw = [(digest[i % len(digest)] - 127.5) / 127.5 for i in range(model.embedding_dim)]
        norm = math.sqrt(sum(v * v for v in raw)) or 1.0
        return [round(v / norm, 6) for v in raw]

    async def _embed(self, data: dict[str, Any], model: SimModel, load: float, send: Send) -> None:
        value = data.get("input")
        inputs = [value] if isinstance(value, str) else value
        if not isinstance(inputs, list) or not all(isinstance(v, str) for v in inputs):
            await self._json(send, 400, {"error": "input must be a string or list of strings"})
            return
        await self._json(
            send,
            200,
            {
                "model": model.name,
                "embeddings": [self._vector(text, model) for text in inputs],
                "total_duration": int(load * 1e9) + 1_000_000,
                "load_duration": int(load * 1e9),
                "prompt_eval_count": sum(max(1, len(t.split())) for t in inputs),
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
            prompt_tokens - cached, model.prefill_tokens_per_second, self.config.speed
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
        failure: str | None,
        send: Send,
    ) -> None:
        chat = path == "/api/chat"
        options = data.get("options") if isinstance(data.get("options"), dict) else {}
        assert isinstance(options, dict)
        limit = options.get("num_predict")
        count = limit if isinstance(limit, int) and limit >= 0 else self.config.default_tokens
        count = min(count, model.context_length)  # as a real server: bounded by the context
        if chat and data.get("tools") and model.tools:
            tokens: list[str] = []
            tool_calls = [
                {"function": {"name": data["tools"][0]["function"]["name"], "arguments": {}}}
            ]
        elif data.get("format"):
            tokens = ['{"answer": ', '"herd"}']
            tool_calls = []
        else:
            tokens = [w + " " for w in itertools.islice(itertools.cycle(WORDS), count)]
            tool_calls = []
        done_reason = "length" if isinstance(limit, int) and limit == len(tokens) else "stop"
        stream = data.get("stream", True) is not False
        created = _now_iso()
        prompt_tokens = self._prompt_tokens(data)
        rate = model.tokens_per_second * self.config.speed
        delay = 1.0 / rate if rate > 0 else 0.0
        prefill = await self._prefill(data, model, prompt_tokens)

        def piece(
            text: str, done: bool, calls: list[dict[str, Any]] | None = None
        ) -> dict[str, Any]:
            out: dict[str, Any] = {"model": model.name, "created_at": created}
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if calls:
                    message["tool_calls"] = calls
                out["message"] = message
            else:
                out["response"] = text
            out["done"] = done
            return out

        def final(text: str, calls: list[dict[str, Any]] | None) -> dict[str, Any]:
            out = piece(text, True, calls)
            eval_ns = int(len(tokens) * delay * 1e9) or len(tokens) * 1000
            out.update(
                {
                    "done_reason": done_reason,
                    "total_duration": int(load * 1e9) + eval_ns + 1_000_000,
                    "load_duration": int(load * 1e9),
                    "prompt_eval_count": prompt_tokens,
                    "prompt_eval_duration": int(prefill * 1e9) or 1_000_000,
                    "eval_count": max(len(tokens), len(tool_calls)),
                    "eval_duration": eval_ns,
                }
            )
            return out

        if not stream:
            if delay:
                await trio.sleep(delay * len(tokens))
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
            await self._json(send, 200, final("".join(tokens), tool_calls or None))
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-ndjson")],
            }
        )
        for sent, token in enumerate(tokens):
            if failure == "die_mid_stream" and sent >= self._after_chunks:
                raise _Abort("died mid-stream")
            if failure == "stall" and sent >= self._after_chunks:
                await trio.sleep_forever()
            if delay:
                await trio.sleep(delay)
            await send(
                {
                    "type": "http.response.body",
                    "body": _dump(piece(token, False)) + b"\n",
                    "more_body": True,
                }
            )
        if failure == "die_mid_stream":
            raise _Abort("died mid-stream")
        await send(
            {"type": "http.response.body", "body": _dump(final("", tool_calls or None)) + b"\n"}
        )


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
