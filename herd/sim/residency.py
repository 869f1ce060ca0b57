"""What a simulated machine holds in memory: one residency model for the HTTP simulator
(:mod:`herd.sim.server`) and the in-process virtual fleet (:mod:`herd.sim.virtual`), so both
load, evict, keep and unload models the same way, as Ollama does.

Pure: no trio, no clock, no I/O. The callers pass ``now`` (their Trio clock) and do the
waiting; the async side (waiting for a load another request started, for a busy model to go
idle, and the load's own time) is :class:`herd.sim.loader.Loader`, shared by both.

Rules
-----
- **Memory.** The OS and apps keep :data:`OS_SHARE` of the RAM; models get the rest
  (``usable_bytes``). What is neither used by models nor reserved by a load under way is what
  the machine reports as available.
- **Accelerators** (``vram_bytes``). None, the default: the memory isn't split, every model
  counts as on the accelerator (``/api/ps`` says ``size_vram == size``) and the machine
  reports no device. 0: a CPU-only machine (``size_vram`` 0). A positive number: a discrete GPU
  with that much VRAM, or with ``unified`` the GPU's working-set limit within RAM (Apple
  silicon). A model *fits* when it fits on the accelerator beside the others (on unified
  memory, in RAM too; a discrete GPU's models need no RAM). One that doesn't fit even on an
  empty machine is split, as Ollama splits it: what fits goes to the accelerator, the rest to
  RAM (:class:`Placement`), and it runs slower (:meth:`Residency.speed`): the part outside runs
  :data:`CPU_SLOWDOWN` times slower, so a model with share ``f`` outside runs at
  ``1 / (1 + f x (CPU_SLOWDOWN - 1))`` of its speed.
- **Loads.** :meth:`Residency.admit` decides a load: if the model fits beside what is resident
  (and what other loads have reserved) its memory is reserved and it may load; if not, idle
  models are unloaded, least recently used first (*evictions*), until it fits; if only models
  in use or being loaded stand in its way, the load waits for one of them to go idle (Ollama
  waits for busy runners too) and asks again. A model bigger than the empty machine is loaded
  anyway: the router is the one that should not have sent it.
- **Keep-alive.** A model in use never expires. When its last request ends it stays for the
  keep-alive the latest request asked for, then leaves (an *expiration*); 0 unloads it at once;
  :data:`FOREVER` keeps it. Models resident from the start (:meth:`Residency.start`) stay for
  the machine's ``loaded_keep`` until they are first used.
- **Least recently used** is the order of first use: :meth:`Residency.touch` when a request
  starts on a resident model moves it to the back of the eviction line.
- **Prompt caches** (:class:`~herd.sim.costs.PromptCache`) go with their model.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable

import attrs

from herd.sim.costs import PromptCache

FOREVER = math.inf
OS_SHARE = 0.1  # memory the OS and apps keep
# How much slower the part of a model outside the accelerator runs: system RAM has a fraction
# of VRAM's bandwidth. The scorer expects the same (ScoringSettings.spill_cpu_slowdown).
CPU_SLOWDOWN = 8.0


@attrs.frozen
class Placement:
    """Where one model's bytes are: ``vram`` of its ``size`` on the accelerator."""

    size: int
    vram: int

    @property
    def outside(self) -> float:
        """Share of the model outside the accelerator."""
        return (self.size - self.vram) / self.size if self.size > 0 else 0.0


@attrs.frozen
class Admission:
    """What :meth:`Residency.admit` decided for one load."""

    ready: bool  # True: memory is reserved, load now; False: wait for a model to go idle
    evicted: tuple[str, ...] = ()  # models unloaded to make room (already gone)


@attrs.define
class _Copy:
    """One resident model."""

    placement: Placement
    keep: float  # the keep-alive the latest request on it asked for
    expires: float = FOREVER  # when it leaves memory unless used again
    busy: int = 0  # requests using it now


@attrs.define(eq=False)
class Residency:
    """The models in one machine's memory. See the module docstring for the rules."""

    ram_bytes: int
    vram_bytes: int | None = None  # see the module docstring: None, 0, or the accelerator's
    unified: bool = False  # the accelerator's memory is part of the RAM (Apple silicon)
    default_keep: float = 300.0  # keep-alive for requests that give none (Ollama: 5 minutes)
    loaded_keep: float = FOREVER  # how long models resident from the start stay, unused
    prompts: PromptCache = attrs.field(factory=PromptCache)
    cold_loads: int = 0  # loads completed
    evictions: int = 0  # idle models unloaded to make room for another
    expirations: int = 0  # models that left because their keep-alive ran out
    _copies: OrderedDict[str, _Copy] = attrs.field(factory=OrderedDict)  # LRU first
    _reserved: dict[str, Placement] = attrs.field(factory=dict)  # loads under way

    @property
    def usable_bytes(self) -> int:
        return int(self.ram_bytes * (1 - OS_SHARE))

    # --- what is resident ----------------------------------------------------------------
    def resident(self, name: str) -> bool:
        return name in self._copies

    def names(self) -> list[str]:
        """Resident models, least recently used first."""
        return list(self._copies)

    def busy(self, name: str) -> int:
        copy = self._copies.get(name)
        return copy.busy if copy is not None else 0

    def in_use(self) -> int:
        """Requests running on resident models."""
        return sum(c.busy for c in self._copies.values())

    @property
    def accelerated(self) -> bool:
        """The machine has an accelerator of a known size (``vram_bytes`` > 0)."""
        return bool(self.vram_bytes)

    def _ram(self, placement: Placement) -> int:
        """RAM a model placed so holds: on a discrete GPU, only its part outside VRAM."""
        if self.accelerated and not self.unified:
            return placement.size - placement.vram
        return placement.size

    def used_bytes(self) -> int:
        """RAM held by resident models (not counting loads under way)."""
        return sum(self._ram(c.placement) for c in self._copies.values())

    def used_vram(self, reserved: bool = True) -> int:
        """Accelerator memory held by resident models (and, with ``reserved``, loads under
        way); 0 on a machine without a sized accelerator."""
        if not self.accelerated:
            return 0
        held = sum(c.placement.vram for c in self._copies.values())
        return held + (sum(p.vram for p in self._reserved.values()) if reserved else 0)

    def available_bytes(self) -> int:
        """Usable RAM neither held by models nor reserved by a load: what the machine reports
        as available."""
        reserved = sum(self._ram(p) for p in self._reserved.values())
        return max(0, self.usable_bytes - self.used_bytes() - reserved)

    def placement(self, name: str) -> Placement:
        """Where resident ``name`` is."""
        return self._copies[name].placement

    def size_vram(self, name: str) -> int:
        """What ``/api/ps`` reports as ``size_vram`` for resident ``name``."""
        placement = self._copies[name].placement
        if self.vram_bytes is None:
            return placement.size  # memory not split: all of it counts as on the accelerator
        return placement.vram

    def speed(self, name: str) -> float:
        """Share of its full speed resident ``name`` runs at: 1.0 unless it is split (see
        the module docstring)."""
        copy = self._copies.get(name)
        if copy is None or not self.accelerated:
            return 1.0
        return 1.0 / (1.0 + copy.placement.outside * (CPU_SLOWDOWN - 1.0))

    def expires_at(self, name: str, now: float) -> float:
        """When ``name`` leaves memory if nothing else uses it (:data:`FOREVER` for never); a
        model in use counts its keep-alive from ``now``."""
        copy = self._copies[name]
        return now + copy.keep if copy.busy else copy.expires

    # --- start and keep-alive ------------------------------------------------------------
    def start(self, models: Iterable[tuple[str, int]], now: float | None) -> None:
        """Make ``models`` ((name, bytes)) resident, as loaded before ``now``; they stay for
        ``loaded_keep`` from ``now`` unless used (``now`` None: until timed by a later call).
        Models already resident and idle get their timer (re)started."""
        for name, size in models:
            copy = self._copies.get(name)
            if copy is None:
                copy = self._copies[name] = _Copy(self._split(size), self.default_keep)
            if not copy.busy:
                copy.expires = FOREVER if now is None else now + self.loaded_keep

    def touch(self, name: str) -> None:
        """A request starts on resident ``name``: it becomes the most recently used."""
        self._copies.move_to_end(name)

    def acquire(self, name: str, keep: float | None = None) -> None:
        """A request starts using resident ``name``; its keep-alive (None: the default)
        becomes the model's."""
        copy = self._copies[name]
        copy.busy += 1
        copy.keep = self.default_keep if keep is None else keep

    def release(self, name: str, now: float) -> bool:
        """A request on ``name`` ended; the last one out starts the keep-alive timer (0:
        unloaded now). Returns True if the model left memory."""
        copy = self._copies.get(name)
        if copy is None:
            return False  # unloaded meanwhile (deleted)
        copy.busy -= 1
        if copy.busy > 0:
            return False
        if copy.keep <= 0:
            self._drop(name)
            self.expirations += 1
            return True
        copy.expires = now + copy.keep
        return False

    def expire(self, now: float) -> list[str]:
        """Unload the idle models whose keep-alive ran out by ``now``. Returns them."""
        gone = [n for n, c in self._copies.items() if not c.busy and c.expires <= now]
        for name in gone:
            self._drop(name)
            self.expirations += 1
        return gone

    def unload(self, name: str) -> bool:
        """Unload ``name`` now, busy or not (a delete). Returns True if it was resident."""
        if name not in self._copies:
            return False
        self._drop(name)
        return True

    def unload_when_idle(self, name: str) -> None:
        """``keep_alive: 0`` without a prompt: unload now if idle, else when the last request
        on it ends. Nothing happens if it isn't resident."""
        copy = self._copies.get(name)
        if copy is None:
            return
        if copy.busy:
            copy.keep = 0.0
        else:
            self._drop(name)

    # --- loads ---------------------------------------------------------------------------
    def admit(self, name: str, size: int) -> Admission:
        """Decide a load of ``name`` (``size`` bytes): evict idle models (least recently used
        first) until it fits, then reserve its memory (``ready``); or, when only models in use
        or being loaded are in the way, wait (not ``ready``: ask again once one goes idle)."""
        evicted: list[str] = []
        while (placement := self._fitting(size)) is None:
            idle = next((n for n, c in self._copies.items() if not c.busy), None)
            if idle is not None:
                self._drop(idle)
                self.evictions += 1
                evicted.append(idle)
                continue
            if self._copies or self._reserved:
                return Admission(False, tuple(evicted))
            # Bigger than the empty machine: split it (or, without an accelerator, load it
            # anyway: the router should not have sent it).
            self._reserved[name] = self._split(size)
            return Admission(True, tuple(evicted))
        self._reserved[name] = placement
        return Admission(True, tuple(evicted))

    def loaded(self, name: str) -> None:
        """The load :meth:`admit` reserved memory for is done: ``name`` is resident (and the
        most recently used), kept until a request releases it."""
        placement = self._reserved.pop(name)
        self._copies[name] = _Copy(placement, self.default_keep)
        self._copies.move_to_end(name)
        self.cold_loads += 1

    def abandon(self, name: str) -> None:
        """The load of ``name`` stopped before the end: its reservation goes."""
        self._reserved.pop(name, None)

    def _split(self, size: int) -> Placement:
        """Where a model of ``size`` goes beside what is resident and reserved: on the
        accelerator what fits there (all of it, if it does), the rest in RAM."""
        if not self.accelerated:
            return Placement(size, 0)
        assert self.vram_bytes is not None
        return Placement(size, max(0, min(size, self.vram_bytes - self.used_vram())))

    def _fitting(self, size: int) -> Placement | None:
        """The placement of a model of ``size`` beside what is resident and reserved, if it
        fits whole (on the accelerator, when there is one); else None."""
        ram_used = self.used_bytes() + sum(self._ram(p) for p in self._reserved.values())
        if not self.accelerated:
            return Placement(size, 0) if ram_used + size <= self.usable_bytes else None
        assert self.vram_bytes is not None
        vram_used = self.used_vram()
        if vram_used + size > self.vram_bytes:
            return None
        if self.unified and ram_used + size > self.usable_bytes:
            return None
        return Placement(size, size)

    def _drop(self, name: str) -> None:
        del self._copies[name]
        self.prompts.drop(name)
