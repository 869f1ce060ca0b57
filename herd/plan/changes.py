"""The virtual fleet (:mod:`herd.plan.planner`, steps 3 and the scenarios): built from the
nodes' reports and the learned speeds, and changed: nodes added from :data:`PRESETS` or as
copies, removed, models pinned or unloaded, slots set, substitution turned on or off. Each
change is a frozen value with a CLI spelling (:func:`parse_change`) and a JSON one
(:func:`change_from_json`); :func:`apply_changes` raises :class:`PlanError` naming a change
the fleet can't take."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from herd.core.models import normalize_model_name
from herd.plan.inputs import ModelFacts, NodeFacts, PlanError
from herd.plan.speeds import ModelSpeed, Speeds
from herd.sim.residency import OS_SHARE
from herd.sim.server import SimConfig, SimModel

GiB = 2**30
MAX_CHANGES = 16
MAX_SLOTS = 64


@attrs.frozen
class Preset:
    """A machine one could add, described by what sets an LLM's speed on it."""

    name: str
    title: str
    memory_bytes: int  # where models must fit (unified memory, or the GPU's VRAM)
    bandwidth: float  # memory bandwidth, bytes/s: decoding reads the whole model per token
    flops: float  # usable half-precision FLOP/s: prefill is compute-bound
    load_bytes_per_second: float  # disk to memory
    slots: int = 4

    def speed(self, size_bytes: int) -> tuple[float, float, float]:
        """(decode tokens/s, prefill tokens/s, load seconds) of a model of ``size_bytes``: 60%
        of the bandwidth per token read; 2 FLOPs per parameter per prompt token at half the
        peak, parameters from the size (about 0.6 bytes each at Q4); one second to start."""
        size = max(size_bytes, 1)
        parameters = size / 0.6
        decode = 0.6 * self.bandwidth / size
        prefill = 0.5 * self.flops / (2 * parameters)
        return decode, prefill, 1.0 + size / self.load_bytes_per_second

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "memory_bytes": self.memory_bytes,
            "slots": self.slots,
            "bandwidth_gb_s": round(self.bandwidth / 1e9),
            "tflops": round(self.flops / 1e12, 1),
        }


PRESETS = {
    p.name: p
    for p in (
        Preset("mac-mini-16", "Mac mini (M4, 16 GB)", 16 * GiB, 120e9, 4.3e12, 3e9, slots=2),
        Preset("macbook-pro-36", "MacBook Pro (M3 Pro, 36 GB)", 36 * GiB, 150e9, 7e12, 5e9),
        Preset("mac-studio-192", "Mac Studio (M2 Ultra, 192 GB)", 192 * GiB, 800e9, 27e12, 5e9),
        Preset("rtx-4090", "RTX 4090 box (24 GB VRAM)", 24 * GiB, 1008e9, 165e12, 3e9),
        Preset("cpu-64", "CPU-only server (64 GB DDR5)", 64 * GiB, 60e9, 1.5e12, 2e9, slots=2),
    )
}


# --- changes --------------------------------------------------------------------------------


@attrs.frozen
class AddNode:
    preset: str | None = None  # a PRESETS name ...
    copy_of: str | None = None  # ... or a node to copy

    def describe(self) -> str:
        if self.copy_of is not None:
            return f"add a copy of {self.copy_of}"
        preset = PRESETS.get(self.preset or "")
        return f"add a {preset.title if preset else self.preset}"


@attrs.frozen
class RemoveNode:
    node: str

    def describe(self) -> str:
        return f"remove {self.node}"


@attrs.frozen
class Pin:
    """The model is on the node (pulled there if it wasn't) and loaded when the replay
    starts, kept loaded as herd keeps every model (it can still be evicted for room)."""

    node: str
    model: str

    def describe(self) -> str:
        return f"pin {self.model} on {self.node}"


@attrs.frozen
class Unload:
    """The node no longer serves the model: not loaded, not on its disk."""

    node: str
    model: str

    def describe(self) -> str:
        return f"unload {self.model} from {self.node}"


@attrs.frozen
class SetSlots:
    node: str  # "*" = every node
    slots: int

    def describe(self) -> str:
        where = "every node" if self.node == "*" else self.node
        return f"{self.slots} slot{'s' if self.slots != 1 else ''} on {where}"


@attrs.frozen
class SetSubstitution:
    on: bool

    def describe(self) -> str:
        return f"substitution (vram_fallback) {'on' if self.on else 'off'}"


Change = AddNode | RemoveNode | Pin | Unload | SetSlots | SetSubstitution
CHANGE_KINDS = ("add-node", "remove-node", "pin", "unload", "slots", "set")


def _node_model(kind: str, value: str) -> tuple[str, str]:
    node, sep, model = value.partition(":")
    if not sep or not node or not model:
        raise PlanError(f"{kind} takes NODE:MODEL (e.g. studio:llama3.1:8b), got {value!r}")
    return node, normalize_model_name(model)


def _bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "on", "yes", "1"):
        return True
    if lowered in ("false", "off", "no", "0"):
        return False
    raise PlanError(f"{name} must be true or false, got {value!r}")


def _slots(value: str) -> int:
    try:
        slots = int(value)
    except ValueError:
        raise PlanError(f"slots must be a whole number, got {value!r}") from None
    if not 1 <= slots <= MAX_SLOTS:
        raise PlanError(f"slots must be between 1 and {MAX_SLOTS}, got {slots}")
    return slots


def parse_change(kind: str, value: str) -> Change:
    """A change from its CLI spelling: ``add-node PRESET|copy:NODE``, ``remove-node NODE``,
    ``pin NODE:MODEL``, ``unload NODE:MODEL``, ``slots NODE=N`` (``*=N``: every node), ``set
    vram_fallback=BOOL`` or ``set slots=N``. Raises PlanError naming a bad value."""
    value = value.strip()
    if kind == "add-node":
        if value.startswith("copy:"):
            node = value[len("copy:") :]
            if not node:
                raise PlanError("add-node copy: needs a node name, e.g. copy:studio")
            return AddNode(copy_of=node)
        if value not in PRESETS:
            raise PlanError(
                f"unknown preset {value!r}; presets are {', '.join(PRESETS)} (or copy:NODE)"
            )
        return AddNode(preset=value)
    if kind == "remove-node":
        if not value:
            raise PlanError("remove-node needs a node name")
        return RemoveNode(value)
    if kind == "pin":
        return Pin(*_node_model(kind, value))
    if kind == "unload":
        return Unload(*_node_model(kind, value))
    if kind in ("slots", "set"):
        name, sep, setting = value.partition("=")
        if not sep:
            raise PlanError(f"{kind} takes NAME=VALUE, got {value!r}")
        name = name.strip()
        if kind == "slots":
            return SetSlots(name or "*", _slots(setting))
        if name == "vram_fallback":
            return SetSubstitution(_bool(name, setting))
        if name == "slots":
            return SetSlots("*", _slots(setting))
        raise PlanError(
            f"unknown setting {name!r}; the planner can set vram_fallback=true|false and slots=N"
        )
    raise PlanError(f"unknown change {kind!r}; changes are {', '.join(CHANGE_KINDS)}")


def change_from_json(data: object) -> Change:
    """A change from the API's JSON: ``{"kind": "add-node", "value": "rtx-4090"}`` (the CLI's
    spelling, see :func:`parse_change`). Raises PlanError naming a bad value."""
    if not isinstance(data, dict) or set(data) != {"kind", "value"}:
        raise PlanError(f'a change is {{"kind": ..., "value": ...}}, got {data!r:.200}')
    kind, value = data["kind"], data["value"]
    if not isinstance(kind, str) or not isinstance(value, str | bool | int):
        raise PlanError(f"a change's kind and value are strings, got {data!r:.200}")
    return parse_change(kind, str(value).lower() if isinstance(value, bool) else str(value))


def change_as_json(change: Change) -> dict[str, str]:
    """The inverse of :func:`change_from_json`."""
    if isinstance(change, AddNode):
        value = f"copy:{change.copy_of}" if change.copy_of else str(change.preset)
        return {"kind": "add-node", "value": value}
    if isinstance(change, RemoveNode):
        return {"kind": "remove-node", "value": change.node}
    if isinstance(change, Pin):
        return {"kind": "pin", "value": f"{change.node}:{change.model}"}
    if isinstance(change, Unload):
        return {"kind": "unload", "value": f"{change.node}:{change.model}"}
    if isinstance(change, SetSlots):
        return {"kind": "slots", "value": f"{change.node}={change.slots}"}
    return {"kind": "set", "value": f"vram_fallback={str(change.on).lower()}"}


# --- the fleet ------------------------------------------------------------------------------


@attrs.frozen
class PlannedModel:
    facts: ModelFacts
    speed: ModelSpeed


@attrs.frozen
class PlannedNode:
    node_id: str
    memory_bytes: int
    slots: int
    models: tuple[PlannedModel, ...]
    loaded: tuple[str, ...]
    origin: str  # "recorded", "copy of X", a preset's title
    online: bool = True
    preset: str | None = None  # the PRESETS entry its speeds come from

    def config(self) -> SimConfig:
        return SimConfig(
            name=self.node_id,
            memory_bytes=self.memory_bytes,
            parallel=self.slots,
            speed=1.0,
            models=tuple(
                SimModel(
                    name=m.facts.name,
                    size_bytes=m.facts.size_bytes,
                    family=m.facts.family or "llama",
                    parameter_size=m.facts.parameter_size,
                    context_length=m.facts.context_length or 8192,
                    embedding=m.facts.embedding,
                    load_seconds=m.speed.load_seconds,
                    tokens_per_second=m.speed.decode,
                    prefill_tokens_per_second=m.speed.prefill,
                )
                for m in self.models
            ),
            loaded=self.loaded,
        )

    def as_dict(self) -> dict[str, Any]:
        loaded = set(self.loaded)
        return {
            "node_id": self.node_id,
            "origin": self.origin,
            "online": self.online,
            "memory_bytes": self.memory_bytes,
            "slots": self.slots,
            "models": [
                {
                    "name": m.facts.name,
                    "size_bytes": m.facts.size_bytes,
                    "loaded": m.facts.name in loaded,
                    **m.speed.as_dict(),
                }
                for m in self.models
            ],
        }


@attrs.frozen
class PlannedFleet:
    nodes: tuple[PlannedNode, ...]
    substitution: bool

    def node(self, node_id: str) -> PlannedNode | None:
        return next((n for n in self.nodes if n.node_id == node_id), None)


def build_fleet(nodes: Sequence[NodeFacts], speeds: Speeds, substitution: bool) -> PlannedFleet:
    """The virtual fleet as the reports describe it (the no-change scenario)."""
    planned = []
    for node in nodes:
        models = tuple(
            PlannedModel(m, speeds.speed(node.node_id, m.name, m.size_bytes, m.embedding))
            for m in node.models
        )
        names = {m.name for m in node.models}
        planned.append(
            PlannedNode(
                node_id=node.node_id,
                memory_bytes=node.memory_bytes,
                slots=node.slots,
                models=models,
                loaded=tuple(m for m in node.loaded if m in names),
                origin="recorded",
                online=node.online,
            )
        )
    return PlannedFleet(tuple(planned), substitution)


def _fits(node: PlannedNode, size: int) -> bool:
    return size <= node.memory_bytes * (1 - OS_SHARE)


def _usable_gib(node: PlannedNode) -> str:
    return f"{node.memory_bytes * (1 - OS_SHARE) / GiB:.1f} GiB"


def apply_changes(fleet: PlannedFleet, changes: Sequence[Change], speeds: Speeds) -> PlannedFleet:
    """``fleet`` with ``changes`` applied in order. Raises PlanError naming a change that
    can't be made (an unknown node or model, a model that doesn't fit)."""
    if len(changes) > MAX_CHANGES:
        raise PlanError(f"at most {MAX_CHANGES} changes in one scenario, got {len(changes)}")
    nodes = list(fleet.nodes)
    substitution = fleet.substitution
    catalogue = {m.facts.name: m.facts for n in fleet.nodes for m in n.models}

    def find(node_id: str, change: Change) -> int:
        for index, node in enumerate(nodes):
            if node.node_id == node_id:
                return index
        names = ", ".join(n.node_id for n in nodes) or "none"
        raise PlanError(f"{change.describe()}: no node {node_id!r} (nodes: {names})")

    def fresh_name(base: str) -> str:
        taken = {n.node_id for n in nodes}
        name, number = base, 2
        while name in taken:
            name, number = f"{base}-{number}", number + 1
        return name

    for change in changes:
        if isinstance(change, AddNode):
            if change.copy_of is not None:
                original = nodes[find(change.copy_of, change)]
                nodes.append(
                    attrs.evolve(
                        original,
                        node_id=fresh_name(f"{original.node_id}-copy"),
                        origin=f"copy of {original.node_id}",
                        online=True,
                    )
                )
                continue
            preset = PRESETS.get(change.preset or "")
            if preset is None:
                raise PlanError(
                    f"unknown preset {change.preset!r}; presets are {', '.join(PRESETS)}"
                )
            models = []
            usable = preset.memory_bytes * (1 - OS_SHARE)
            for facts in catalogue.values():
                if facts.size_bytes <= usable:
                    decode, prefill, load = preset.speed(facts.size_bytes)
                    models.append(
                        PlannedModel(facts, ModelSpeed(decode, prefill, load, 0, "preset"))
                    )
            nodes.append(
                PlannedNode(
                    node_id=fresh_name(preset.name),
                    memory_bytes=preset.memory_bytes,
                    slots=preset.slots,
                    models=tuple(models),
                    loaded=(),
                    origin=preset.title,
                    preset=preset.name,
                )
            )
        elif isinstance(change, RemoveNode):
            del nodes[find(change.node, change)]
        elif isinstance(change, Pin):
            index = find(change.node, change)
            node = nodes[index]
            pinned = catalogue.get(change.model)
            if pinned is None:
                known = ", ".join(sorted(catalogue)) or "none"
                raise PlanError(
                    f"{change.describe()}: no node has {change.model!r} (models: {known})"
                )
            if not _fits(node, pinned.size_bytes):
                raise PlanError(
                    f"{change.describe()}: {change.model} needs {pinned.size_bytes / GiB:.1f} GiB, "
                    f"{node.node_id} has {_usable_gib(node)} for models"
                )
            offered = node.models
            if all(m.facts.name != change.model for m in offered):
                speed = speeds.speed(
                    node.node_id, change.model, pinned.size_bytes, pinned.embedding
                )
                if node.preset is not None:
                    decode, prefill, load = PRESETS[node.preset].speed(pinned.size_bytes)
                    speed = ModelSpeed(decode, prefill, load, 0, "preset")
                offered = (*offered, PlannedModel(pinned, speed))
            # Loaded first; other loaded models leave (most recently listed last) if needed.
            loaded = [change.model, *(m for m in node.loaded if m != change.model)]
            sizes = {m.facts.name: m.facts.size_bytes for m in offered}
            while sum(sizes[m] for m in loaded) > node.memory_bytes * (1 - OS_SHARE):
                loaded.pop()
            nodes[index] = attrs.evolve(node, models=offered, loaded=tuple(loaded))
        elif isinstance(change, Unload):
            index = find(change.node, change)
            node = nodes[index]
            if all(m.facts.name != change.model for m in node.models):
                has = ", ".join(m.facts.name for m in node.models) or "no models"
                raise PlanError(f"{change.describe()}: {node.node_id} has {has}")
            nodes[index] = attrs.evolve(
                node,
                models=tuple(m for m in node.models if m.facts.name != change.model),
                loaded=tuple(m for m in node.loaded if m != change.model),
            )
        elif isinstance(change, SetSlots):
            if change.node == "*":
                nodes = [attrs.evolve(n, slots=change.slots) for n in nodes]
            else:
                index = find(change.node, change)
                nodes[index] = attrs.evolve(nodes[index], slots=change.slots)
        else:
            substitution = change.on
    return PlannedFleet(tuple(nodes), substitution)
