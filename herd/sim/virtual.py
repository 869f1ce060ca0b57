"""The simulated fleet without HTTP: nodes that load, evict, prefill and decode on Trio's clock,
inside one process, for benchmarks that replay hours of traffic in seconds on a virtual clock
(``trio.testing.MockClock``).

A :class:`VirtualNode` is configured with the same :class:`~herd.sim.server.SimConfig` and
:class:`~herd.sim.server.SimModel` as the HTTP simulator and charges the same costs
(:mod:`herd.sim.costs`), plus what a real Ollama does that the HTTP simulator skips:

- **Memory and eviction.** A cold load that doesn't fit unloads idle models, least recently
  used first; if only busy ones are left, it waits for one to go idle (Ollama does the same).
- **Keep-alive.** A model idle for ``keep_alive`` seconds is unloaded.
- **Parallel slots.** At most ``config.parallel`` requests run at once; the rest wait.

:meth:`VirtualNode.report` is the heartbeat the node agent would send for it.
"""

from __future__ import annotations

import collections
import math
from collections import OrderedDict
from collections.abc import Sequence

import attrs
import trio

from herd.core.models import (
    AvailableModel,
    BackendInfo,
    Capabilities,
    LoadedModel,
    MemoryInfo,
    NodeReport,
)
from herd.sim.costs import PromptCache, decode_seconds, prefill_seconds
from herd.sim.server import SimConfig, SimModel

KEEP_ALIVE = 300.0  # Ollama's default: a model idle this long is unloaded
OS_SHARE = 0.1  # memory the OS and apps keep, as in SimOllama.system_reading


@attrs.frozen
class Served:
    """What one request cost on a node."""

    ttft: float  # seconds from reaching the node to the first token (queue, load, prefill)
    total: float  # seconds from reaching the node to the last token
    cold: bool  # this request waited for a cold load
    cached_tokens: int  # prompt tokens the prompt cache saved
    tokens_per_second: float  # decoding rate it saw


@attrs.define(eq=False)
class VirtualNode:
    config: SimConfig
    keep_alive: float = KEEP_ALIVE
    cold_loads: int = 0
    evictions: int = 0
    served: int = 0
    prompts: PromptCache = attrs.field(factory=PromptCache)
    _models: dict[str, SimModel] = attrs.field(init=False)
    _resident: OrderedDict[str, float] = attrs.field(factory=OrderedDict)  # name -> last used
    _active: collections.Counter[str] = attrs.field(factory=collections.Counter)
    _loading: dict[str, trio.Event] = attrs.field(factory=dict)
    _idle: trio.Event = attrs.field(factory=trio.Event)  # set when a model goes idle
    _slots: trio.Semaphore = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._models = {m.name: m for m in self.config.models}
        for name in self.config.loaded:
            self._resident[name] = 0.0
        self._slots = trio.Semaphore(max(1, self.config.parallel))

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def usable_bytes(self) -> int:
        return int(self.config.memory_bytes * (1 - OS_SHARE))

    def used_bytes(self) -> int:
        return sum(self._models[n].size_bytes for n in self._resident)

    def has(self, model: str) -> bool:
        return model in self._models

    def spec(self, model: str) -> SimModel | None:
        return self._models.get(model)

    def loaded(self) -> list[str]:
        return list(self._resident)

    # --- serving ---------------------------------------------------------------------
    async def serve(
        self, model: str, prompt_tokens: int, keys: Sequence[str], output_tokens: int
    ) -> Served:
        """Run one request: wait for a slot, load the model if needed, prefill what the prompt
        cache doesn't hold, decode. ``keys`` are the prompt's prefix keys, longest first (the
        first is remembered as this prompt)."""
        spec = self._models[model]
        start = trio.current_time()
        async with self._slots:
            cold = await self._ensure_loaded(spec)
            self._active[model] += 1
            try:
                cached = min(prompt_tokens, self.prompts.cached_tokens(model, keys))
                await trio.sleep(
                    prefill_seconds(
                        prompt_tokens - cached, spec.prefill_tokens_per_second, self.config.speed
                    )
                )
                ttft = trio.current_time() - start
                active = sum(self._active.values())
                decode = decode_seconds(
                    output_tokens, spec.tokens_per_second, self.config.speed, active
                )
                await trio.sleep(decode)
                if keys:
                    self.prompts.remember(model, keys[0], prompt_tokens)
            finally:
                self._active[model] -= 1
                self._resident[model] = trio.current_time()
                if not self._active[model]:
                    self._idle.set()
                    self._idle = trio.Event()
        self.served += 1
        # Generation speed; for embeddings (nothing decoded), the prompt processing speed.
        work = decode if decode > 0 else trio.current_time() - start - (ttft if cold else 0.0)
        tokens = output_tokens if decode > 0 else prompt_tokens
        rate = tokens / work if work > 0 and tokens > 0 else 0.0
        return Served(ttft, trio.current_time() - start, cold, cached, rate)

    async def _ensure_loaded(self, spec: SimModel) -> bool:
        """Make ``spec`` resident; True if this request waited for a cold load."""
        if spec.name in self._resident:
            self._resident.move_to_end(spec.name)
            return False
        while (pending := self._loading.get(spec.name)) is not None:
            await pending.wait()  # another request is loading it
            if spec.name in self._resident:
                return True
        # (the other load was cancelled: load it here)
        done = self._loading[spec.name] = trio.Event()
        try:
            await self._make_room(spec.size_bytes)
            await trio.sleep(spec.load_seconds)
            self._resident[spec.name] = trio.current_time()
            self.cold_loads += 1
        finally:
            del self._loading[spec.name]
            done.set()
        return True

    async def _make_room(self, size: int) -> None:
        """Unload idle models, least recently used first, until ``size`` fits; wait for busy
        ones to go idle if that isn't enough."""
        while self.used_bytes() + size > self.usable_bytes:
            idle = [n for n in self._resident if not self._active[n]]
            if idle:
                self._unload(idle[0])
            elif self._resident:
                await self._idle.wait()
            else:
                return  # bigger than the machine: the caller checked; load it anyway

    def _unload(self, name: str) -> None:
        del self._resident[name]
        self.prompts.drop(name)
        self.evictions += 1

    def expire(self, now: float) -> None:
        """Unload models idle longer than ``keep_alive`` (Ollama's keep-alive timer)."""
        for name, last in list(self._resident.items()):
            if not self._active[name] and last and now - last >= self.keep_alive:
                del self._resident[name]
                self.prompts.drop(name)

    # --- heartbeat ---------------------------------------------------------------------
    def report(self, now: float) -> NodeReport:
        """The heartbeat a node agent would send for this node at ``now``."""
        self.expire(now)
        loaded = tuple(
            LoadedModel(
                name=name,
                size_bytes=self._models[name].size_bytes,
                vram_bytes=self._models[name].size_bytes,
                context_length=self._models[name].context_length,
                expires_at=(last or now) + self.keep_alive,
            )
            for name, last in self._resident.items()
        )
        return NodeReport(
            node_id=self.name,
            host=self.name,
            backend=BackendInfo(url=f"virtual://{self.name}", version="sim", healthy=True),
            memory=MemoryInfo(
                total_bytes=self.config.memory_bytes,
                available_bytes=max(0, self.usable_bytes - self.used_bytes()),
            ),
            loaded_models=loaded,
            available_models=tuple(
                AvailableModel(name=m.name, size_bytes=m.size_bytes) for m in self.config.models
            ),
            in_flight=sum(self._active.values()),
            parallel_slots=max(1, self.config.parallel),
            capabilities=Capabilities(
                embed_models=tuple(m.name for m in self.config.models if m.embedding)
            ),
            sent_at=now,
        )


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (``share`` 0..1) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]
