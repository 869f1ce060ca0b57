"""Value types shared by the router, the node agent and the scorer.

Everything here is a frozen attrs class: plain data, no behaviour that does I/O. The node agent
builds a :class:`NodeReport` each heartbeat and sends it over the WebSocket as JSON
(through :mod:`herd.core.wire`); the router turns it into a :class:`NodeSnapshot`, adding what
only the router knows (status, last-seen time, queue load). The scorer reads snapshots and
nothing else.

Units: bytes for memory and sizes, seconds (``trio.current_time()`` on the router, wall-clock
epoch seconds where a value crosses machines, as marked) for time.
"""

from __future__ import annotations

import enum
import functools
from typing import NamedTuple

import attrs

# Request kinds: each has its own queue class shown as a badge ([TEXT], [EMBED], ...).
KIND_TEXT = "text"
KIND_EMBED = "embed"
KIND_IMAGE = "image"
KIND_STT = "stt"
KINDS = (KIND_TEXT, KIND_EMBED, KIND_IMAGE, KIND_STT)


class NodeStatus(enum.StrEnum):
    ONLINE = "online"
    DEGRADED = "degraded"
    OFFLINE = "offline"


class MemoryPressure(enum.StrEnum):
    NORMAL = "normal"
    WARN = "warn"
    CRITICAL = "critical"


@attrs.frozen
class LoadedModel:
    """A model resident in the backend's memory (Ollama ``/api/ps``)."""

    name: str
    size_bytes: int = 0
    vram_bytes: int = 0
    context_length: int = 0
    # Wall-clock epoch seconds when the backend will unload it; None = never / unknown.
    expires_at: float | None = None


@attrs.frozen
class AvailableModel:
    """A model on the node's disk (Ollama ``/api/tags``)."""

    name: str
    size_bytes: int = 0
    family: str = ""
    parameter_size: str = ""
    quantization: str = ""
    modified_at: str = ""
    digest: str = ""
    parent_model: str = ""
    # What the backend says the model can do (Ollama /api/show): "completion", "vision",
    # "embedding", "tools", "thinking", "insert"; empty = not known (yet).
    capabilities: tuple[str, ...] = ()


@attrs.frozen
class BackendInfo:
    """The node's inference backend as its last probe saw it.

    ``healthy`` is False when that probe failed, with the reason in ``error``. The report's
    model lists (``loaded_models``, ``available_models``) and ``parallel_slots`` then still
    carry what the last good probe read, and ``models_stale`` is True: the models are most
    likely still there (a probe can fail while the backend is busy or restarting), so the node
    should not be treated as lacking them. A node whose backend has never answered reports
    empty lists, not stale ones.
    """

    kind: str = "ollama"  # "ollama" | "openai"
    url: str = ""  # URL the router uses to reach the backend
    version: str = ""
    healthy: bool = False
    error: str = ""
    # True when ``url`` is the node agent's LAN proxy in front of a loopback-only backend.
    proxied: bool = False
    # True when the report's model lists come from an earlier probe (this one failed).
    models_stale: bool = False


@attrs.frozen
class CpuInfo:
    cores: int = 0
    percent: float = 0.0


@attrs.frozen
class MemoryInfo:
    total_bytes: int = 0
    available_bytes: int = 0
    pressure: MemoryPressure = MemoryPressure.NORMAL


@attrs.frozen
class DiskInfo:
    total_bytes: int = 0
    free_bytes: int = 0


@attrs.frozen
class GpuInfo:
    """One accelerator, as the node agent read it (:mod:`herd.node.accelerators`).

    On a discrete GPU (``unified`` False) the memory is its VRAM, as the device reports it. On
    unified memory (Apple silicon) ``memory_total_bytes`` is the GPU's working-set limit within
    system RAM and ``memory_used_bytes`` what the loaded models hold of it. Utilisation and
    temperature are None where the device can't say. Every field has a default, so a report
    from an agent that sends fewer of them still reads.
    """

    name: str = ""
    memory_total_bytes: int = 0
    memory_used_bytes: int = 0
    index: int = 0
    vendor: str = ""  # "nvidia" | "amd" | "apple"
    unified: bool = False  # shares system RAM (Apple silicon)
    utilization_percent: float | None = None
    temperature_c: float | None = None
    source: str = ""  # how it was read: "nvml", "nvidia-smi", "rocm-smi", "apple"


class ModelMemory(NamedTuple):
    """The memory models run in on one node, as its report says it: see
    :mod:`herd.core.memory`, which works it out (``NodeReport.memory_where``)."""

    kind: str  # "ram", "vram" or "unified"
    total: int  # bytes where models run: RAM, VRAM summed over devices, or the working set
    free: int  # free there for a cold load now (RAM: capped by the capacity ceiling)
    held: int  # held there by loaded models (unloading them frees it)
    ram_free: int  # RAM a cold load may use (the capacity ceiling applied)
    ram_held: int  # RAM held by loaded models (on VRAM nodes: the parts outside VRAM)


@attrs.frozen
class Capabilities:
    text: bool = True
    embed_models: tuple[str, ...] = ()
    image_backends: tuple[str, ...] = ()  # "mflux", "diffusionkit", "ollama"
    image_models: tuple[str, ...] = ()  # what those backends can generate with
    stt_backends: tuple[str, ...] = ()  # "faster-whisper", "qwen3-asr"
    stt_models: tuple[str, ...] = ()


@attrs.frozen
class Capacity:
    """Adaptive capacity (SPEC §6). ``mode`` is "full" unless capacity learning is on."""

    mode: str = "full"
    # Memory the router may plan to use on this node; None = no ceiling beyond free memory.
    ceiling_bytes: int | None = None
    availability: float = 1.0  # 0..1
    paused: bool = False


@attrs.frozen
class NodeReport:
    """One heartbeat's payload, as the node agent sends it."""

    node_id: str
    host: str = ""
    agent_version: str = ""
    # The node agent's own HTTP address (image generation, speech-to-text); "" if none.
    agent_url: str = ""
    backend: BackendInfo = BackendInfo()
    cpu: CpuInfo = CpuInfo()
    memory: MemoryInfo = MemoryInfo()
    disk: DiskInfo = DiskInfo()
    gpus: tuple[GpuInfo, ...] = ()
    loaded_models: tuple[LoadedModel, ...] = ()
    available_models: tuple[AvailableModel, ...] = ()
    in_flight: int = 0
    # Parallel request slots of the backend: the router's per-node concurrency limit.
    parallel_slots: int = 4
    # Per-model limits within those (``--model-slots``): some models run one request at a
    # time. Models not named share the node's slots.
    model_slots: dict[str, int] = attrs.field(factory=dict)
    capabilities: Capabilities = Capabilities()
    capacity: Capacity = Capacity()
    draining: bool = False
    # Wall-clock epoch seconds at the node when the report was made.
    sent_at: float = 0.0

    # Worked out when the report is built: a report lives for a heartbeat interval and is read
    # by every routing decision meanwhile. Not on the wire (cattrs skips init=False fields), not
    # compared. (Plain slots, not functools.cached_property: attrs gives a class with one a
    # __getattr__, and that makes every attribute read of the class a slow one.)
    # By name; the first entry of a name wins.
    loaded_index: dict[str, LoadedModel] = attrs.field(init=False, eq=False, repr=False)
    available_index: dict[str, AvailableModel] = attrs.field(init=False, eq=False, repr=False)
    # The memory models run in on this node (herd.core.memory.where_models_run).
    memory_where: ModelMemory = attrs.field(init=False, eq=False, repr=False)
    # Values worked out from this report alone, kept with it: the scorer's facts of one model
    # for one kind of request here (herd.core.scoring.engine), worked out once per report,
    # not once per decision.
    derived: dict[tuple[str, str], object] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        from herd.core.memory import where_models_run  # (that module reads this one)

        keep = object.__setattr__  # (frozen)
        keep(self, "loaded_index", {m.name: m for m in reversed(self.loaded_models)})
        keep(self, "available_index", {m.name: m for m in reversed(self.available_models)})
        keep(self, "derived", {})
        keep(self, "memory_where", where_models_run(self))


@attrs.frozen
class ModelLoad:
    """Router-side load of one node:model queue."""

    pending: int = 0
    in_flight: int = 0
    # Router clock of the last time a request for this model took or left a slot here.
    last_used: float | None = None
    # The model's own concurrency limit on this node; 0 = it shares the node's slots.
    slots: int = 0


@attrs.frozen
class NodeSnapshot:
    """What the router knows of one node at one instant; the scorer's view of a node."""

    report: NodeReport
    status: NodeStatus
    last_seen: float  # router clock (trio.current_time())
    # Router-side queue load per model name on this node.
    load: dict[str, ModelLoad] = attrs.field(factory=dict)
    # Router clock time each model was last seen loaded but is now unloaded (warm residency).
    recently_unloaded: dict[str, float] = attrs.field(factory=dict)
    # Worked out when the snapshot is built (a kept snapshot is read by many decisions; see
    # herd.state.registry.NodeRegistry.snapshot), as NodeReport's: plain slots, not compared.
    # Requests running or waiting on the node, all models.
    queued: int = attrs.field(init=False, eq=False, repr=False)
    # Values worked out from this snapshot alone (its report and its queues), kept with it:
    # the order in which the scorer expects the backend to drop loaded models
    # (herd.core.scoring.engine.evictions).
    derived: dict[str, object] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        keep = object.__setattr__  # (frozen)
        keep(self, "queued", sum(m.in_flight + m.pending for m in self.load.values()))
        keep(self, "derived", {})

    @property
    def node_id(self) -> str:
        return self.report.node_id

    @property
    def in_flight(self) -> int:
        return sum(m.in_flight for m in self.load.values())

    @property
    def pending(self) -> int:
        return sum(m.pending for m in self.load.values())

    def loaded(self, model: str) -> LoadedModel | None:
        return self.report.loaded_index.get(model)

    def available(self, model: str) -> AvailableModel | None:
        return self.report.available_index.get(model)

    def has_model(self, model: str) -> bool:
        return self.loaded(model) is not None or self.available(model) is not None


@attrs.frozen
class FleetSnapshot:
    nodes: tuple[NodeSnapshot, ...] = ()

    # By node id, built on first use (a snapshot is read by one decision, often many times).
    @functools.cached_property
    def _by_id(self) -> dict[str, NodeSnapshot]:
        index: dict[str, NodeSnapshot] = {}
        for n in self.nodes:
            index.setdefault(n.node_id, n)  # the first of an id wins, as a scan would find
        return index

    def node(self, node_id: str) -> NodeSnapshot | None:
        return self._by_id.get(node_id)


def normalize_model_name(name: str) -> str:
    """Ollama treats ``llama3`` and ``llama3:latest`` as the same model."""
    name = name.strip()
    if name and ":" not in name.rsplit("/", 1)[-1]:
        return name + ":latest"
    return name


@attrs.frozen
class QueueStatistics:
    """The queue book's totals (requests waiting, running, done, failed) and each queue's
    counters by ``node:model`` key, as the views and metrics show them."""

    pending: int
    in_flight: int
    done: int
    failed: int
    queues: dict[str, dict[str, int | str]]
