"""Where a model runs on a node, and whether it fits: the memory rules per platform.

Pure (values in, values out; no I/O, no clock). The scorer (:mod:`herd.core.scoring.engine`),
the health checks, the views and the latency history all judge memory through this module, so
they judge it one way.

Platforms, by what the node reports in ``NodeReport.gpus``
----------------------------------------------------------
- **No accelerator reported** (CPU-only machines, and nodes whose agent reads none: an older
  agent, no driver): models run in RAM (:data:`RAM`). Free memory is the RAM available,
  capped by the node's capacity ceiling (:func:`ram_free`).
- **Discrete GPUs** (NVIDIA, AMD; ``unified`` False): models run in VRAM (:data:`VRAM`),
  summed over the node's devices (Ollama splits a model across GPUs). Free is what the devices
  report free. A model needs no RAM while it fits in VRAM.
- **Unified memory** (Apple silicon; ``unified`` True, :data:`UNIFIED`): the GPU uses system
  RAM up to Metal's working-set limit (the device's ``memory_total_bytes``); the device's
  ``memory_used_bytes`` is what the loaded models hold of it. A model must fit in RAM *and* in
  that limit.

Cold loads (:func:`cold_load`) follow Ollama's scheduler: a model that fits beside the loaded
ones just loads; one that fits only once others are unloaded unloads them (the scorer's
eviction signal prices that); a model bigger than all the accelerator memory it could have
(free plus what loaded models hold) is a **partial offload**: what fits goes to the
accelerator, the rest to RAM, and that part runs several times slower. It must still fit in
RAM, or the node can't take it at all.

Spill
-----
Ollama's ``/api/ps`` gives each loaded model's ``size`` and ``size_vram``. The share of a
loaded model outside the accelerator, its *offload* (:func:`offload`), is
``1 - size_vram / size``: on a node that reports an accelerator, and on any node where Ollama
put some but not all of the model in VRAM. On a node that reports no accelerator,
``size_vram`` 0 means a CPU-only machine, not a spill (its slowness is the node's own speed).
"""

from __future__ import annotations

from typing import NamedTuple

from herd.core.models import LoadedModel, ModelMemory, NodeReport

GiB = 2**30
RAM, VRAM, UNIFIED = "ram", "vram", "unified"
SPILL_SHARE = 0.01  # a loaded copy with at least this share outside the accelerator is spilled
MAX_DEVICES = 16  # devices read per report: more than any machine has (bounds views, metrics)


Memory = ModelMemory  # the memory models run in on one node (defined with the other values)


class ColdLoad(NamedTuple):
    """What a cold load of one model would do on one node (:func:`cold_load`)."""

    fits: bool  # the node can hold it at all (possibly once other models are unloaded)
    offload: float  # share of it that would run from RAM on the CPU: 0.0 = none
    evict: int  # bytes to free where models run (0: it fits beside the loaded ones)
    evict_ram: int  # RAM bytes to free
    reason: str | None = None  # when it doesn't fit: what it needs and what there is


_FITS = ColdLoad(True, 0.0, 0, 0)  # (the common answer, built once: ColdLoad is frozen)


def _gib(value: float) -> str:
    return f"{value / GiB:.1f} GiB"


def ram_free(report: NodeReport) -> int:
    """RAM a cold load may use: available memory, capped by the capacity ceiling (the ceiling
    minus what is in use). Never negative."""
    memory = report.memory
    free = memory.available_bytes
    ceiling = report.capacity.ceiling_bytes
    if ceiling is not None:
        used = memory.total_bytes - memory.available_bytes
        free = min(free, ceiling - used)
    return max(0, free)


def kind(report: NodeReport) -> str:
    """Where models run on this node: :data:`VRAM` if it reports a discrete GPU with memory,
    else :data:`UNIFIED` if it reports a unified-memory GPU, else :data:`RAM`."""
    found = RAM
    for gpu in report.gpus[:MAX_DEVICES]:
        if gpu.memory_total_bytes > 0:
            if not gpu.unified:
                return VRAM
            found = UNIFIED
    return found


def _vram(model: LoadedModel) -> int:
    size = max(0, model.size_bytes)
    return min(max(0, model.vram_bytes), size) if size else max(0, model.vram_bytes)


def held_where(where: str, model: LoadedModel) -> int:
    """Bytes ``model`` holds in the memory models run in on a node of kind ``where``."""
    return max(0, model.size_bytes) if where == RAM else _vram(model)


def held_ram(where: str, model: LoadedModel) -> int:
    """RAM bytes ``model`` holds on a node of kind ``where`` (on VRAM nodes, its part outside
    VRAM)."""
    size = max(0, model.size_bytes)
    return max(0, size - _vram(model)) if where == VRAM else size


def where_models_run(report: NodeReport) -> Memory:
    """The memory models run in on the node that sent ``report``. Raises nothing."""
    where = kind(report)
    free_ram = ram_free(report)
    ram_held = sum(held_ram(where, m) for m in report.loaded_models)
    if where == RAM:
        return Memory(
            RAM, max(0, report.memory.total_bytes), free_ram, ram_held, free_ram, ram_held
        )
    unified = where == UNIFIED
    devices = [
        g for g in report.gpus[:MAX_DEVICES] if g.memory_total_bytes > 0 and g.unified == unified
    ]
    total = sum(g.memory_total_bytes for g in devices)
    used = sum(min(g.memory_total_bytes, max(0, g.memory_used_bytes)) for g in devices)
    held = sum(_vram(m) for m in report.loaded_models)
    return Memory(where, total, max(0, total - used), held, free_ram, ram_held)


def offload(report: NodeReport, model: LoadedModel) -> float:
    """Share of loaded ``model`` outside the accelerator (0.0 = all in VRAM, or a CPU-only
    node; see the module docstring). Raises nothing."""
    size = model.size_bytes
    if size <= 0:
        return 0.0
    vram = _vram(model)
    if vram >= size:
        return 0.0
    if vram == 0 and kind(report) == RAM:
        return 0.0  # no accelerator: a CPU-only machine, not a spill
    return (size - vram) / size


def cold_load(where: Memory, size: int) -> ColdLoad:
    """What loading a model of ``size`` bytes (0: unknown, taken to fit) would do on a node
    whose memory is ``where``: see the module docstring. Raises nothing."""
    if size <= 0:
        return _FITS
    ram_room = where.ram_free + where.ram_held
    if where.kind == RAM:
        if size <= where.free:
            return _FITS
        if size <= where.free + where.held:
            return ColdLoad(True, 0.0, size - where.free, size - where.free)
        held = f" (+{_gib(where.held)} in loaded models)" if where.held else ""
        return ColdLoad(False, 0.0, 0, 0, f"needs {_gib(size)} free, has {_gib(where.free)}{held}")
    room = where.free + where.held  # accelerator memory with every other model unloaded
    if where.kind == UNIFIED:
        if size > ram_room:
            held = f" (+{_gib(where.ram_held)} in loaded models)" if where.ram_held else ""
            return ColdLoad(
                False, 0.0, 0, 0, f"needs {_gib(size)} free, has {_gib(where.ram_free)}{held}"
            )
        ram_need = max(0, size - where.ram_free)
    else:
        ram_need = 0
    if size <= where.free:
        return ColdLoad(True, 0.0, 0, ram_need) if ram_need else _FITS
    if size <= room:
        return ColdLoad(True, 0.0, size - where.free, ram_need)
    # Bigger than all the accelerator memory it could have: a partial offload.
    outside = size - room
    if where.kind == VRAM:
        if outside > ram_room:
            return ColdLoad(
                False,
                outside / size,
                0,
                0,
                f"needs {_gib(size)}: {_gib(room)} fits in VRAM, the other {_gib(outside)} "
                f"needs RAM and {_gib(where.ram_free)} is free",
            )
        ram_need = max(0, outside - where.ram_free)
    return ColdLoad(True, outside / size, where.held, ram_need)


def spilled(report: NodeReport) -> list[tuple[LoadedModel, float]]:
    """The loaded models spilled (at least :data:`SPILL_SHARE` outside the accelerator), with
    their offload share."""
    out = []
    for model in report.loaded_models:
        share = offload(report, model)
        if share >= SPILL_SHARE:
            out.append((model, share))
    return out
