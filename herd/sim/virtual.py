"""The simulated fleet without HTTP: nodes that load, evict, prefill and decode on Trio's clock,
inside one process, for benchmarks that replay hours of traffic in seconds on a virtual clock
(``trio.testing.MockClock``).

A :class:`VirtualNode` is configured with the same :class:`~herd.sim.server.SimConfig` and
:class:`~herd.sim.server.SimModel` as the HTTP simulator, charges the same costs
(:mod:`herd.sim.costs`) and keeps models in memory by the same rules: memory and eviction,
keep-alive and loads are :mod:`herd.sim.residency` and :mod:`herd.sim.loader`, shared with the
HTTP simulator. At most ``config.parallel`` requests run at once; the rest wait. Each request
uses the configuration's keep-alive (the HTTP simulator's default, 5 minutes).

:meth:`VirtualNode.report` is the heartbeat the node agent would send for it.
"""

from __future__ import annotations

import math
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
from herd.sim.loader import Loader
from herd.sim.residency import FOREVER, Residency
from herd.sim.server import SimConfig, SimModel, accelerator_reading, residency_for


@attrs.frozen
class Served:
    """What one request cost on a node."""

    ttft: float  # seconds from reaching the node to the first token (queue, load, prefill)
    total: float  # seconds from reaching the node to the last token
    cold: bool  # this request waited for a cold load
    cached_tokens: int  # prompt tokens the prompt cache saved
    tokens_per_second: float  # decoding rate it saw
    offload: float = 0.0  # share of the model outside the accelerator while it ran (split)


@attrs.define(eq=False)
class VirtualNode:
    config: SimConfig
    served: int = 0
    memory: Residency = attrs.field(init=False)
    loads: Loader = attrs.field(init=False)
    _models: dict[str, SimModel] = attrs.field(init=False)
    _slots: trio.Semaphore = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._models = {m.name: m for m in self.config.models}
        self.memory = residency_for(self.config)
        self.loads = Loader(self.memory)
        sizes = {m.name: m.size_bytes for m in self.config.models}
        self.memory.start([(n, sizes.get(n, 0)) for n in self.config.loaded], 0.0)
        self._slots = trio.Semaphore(max(1, self.config.parallel))

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def prompts(self) -> PromptCache:
        return self.memory.prompts

    @property
    def cold_loads(self) -> int:
        return self.memory.cold_loads

    @property
    def evictions(self) -> int:
        return self.memory.evictions

    @property
    def usable_bytes(self) -> int:
        return self.memory.usable_bytes

    def used_bytes(self) -> int:
        return self.memory.used_bytes()

    def has(self, model: str) -> bool:
        return model in self._models

    def spec(self, model: str) -> SimModel | None:
        return self._models.get(model)

    def loaded(self) -> list[str]:
        return self.memory.names()

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
            self.loads.expire(start)
            cold = await self.loads.ensure(model, spec.size_bytes, spec.load_seconds) > 0
            self.memory.acquire(model)
            try:
                cached = min(prompt_tokens, self.prompts.cached_tokens(model, keys))
                speed = self.config.speed * self.memory.speed(model)  # slower when split
                offload = self.memory.placement(model).outside if self.memory.accelerated else 0.0
                await trio.sleep(
                    prefill_seconds(prompt_tokens - cached, spec.prefill_tokens_per_second, speed)
                )
                ttft = trio.current_time() - start
                decode = decode_seconds(
                    output_tokens, spec.tokens_per_second, speed, self.memory.in_use()
                )
                await trio.sleep(decode)
                if keys:
                    self.prompts.remember(model, keys[0], prompt_tokens)
            finally:
                self.loads.release(model)
        self.served += 1
        # Generation speed; for embeddings (nothing decoded), the prompt processing speed.
        work = decode if decode > 0 else trio.current_time() - start - (ttft if cold else 0.0)
        tokens = output_tokens if decode > 0 else prompt_tokens
        rate = tokens / work if work > 0 and tokens > 0 else 0.0
        return Served(ttft, trio.current_time() - start, cold, cached, rate, offload)

    def expire(self, now: float) -> None:
        """Unload models idle longer than their keep-alive (Ollama's keep-alive timer)."""
        self.loads.expire(now)

    # --- heartbeat ---------------------------------------------------------------------
    def report(self, now: float) -> NodeReport:
        """The heartbeat a node agent would send for this node at ``now``."""
        self.expire(now)
        loaded = []
        for name in self.memory.names():
            expires = self.memory.expires_at(name, now)
            loaded.append(
                LoadedModel(
                    name=name,
                    size_bytes=self._models[name].size_bytes,
                    vram_bytes=self.memory.size_vram(name),
                    context_length=self._models[name].context_length,
                    expires_at=None if expires == FOREVER else expires,
                )
            )
        return NodeReport(
            node_id=self.name,
            host=self.name,
            backend=BackendInfo(url=f"virtual://{self.name}", version="sim", healthy=True),
            memory=MemoryInfo(
                total_bytes=self.config.memory_bytes,
                available_bytes=self.memory.available_bytes(),
            ),
            gpus=accelerator_reading(
                self.config,
                self.memory,
                100.0 * min(1.0, self.memory.in_use() / max(1, self.config.parallel)),
            ),
            loaded_models=tuple(loaded),
            available_models=tuple(
                AvailableModel(name=m.name, size_bytes=m.size_bytes) for m in self.config.models
            ),
            in_flight=self.memory.in_use(),
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
