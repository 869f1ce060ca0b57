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


@attrs.frozen
class Admission:
    """What :meth:`Residency.admit` decided for one load."""

    ready: bool  # True: memory is reserved, load now; False: wait for a model to go idle
    evicted: tuple[str, ...] = ()  # models unloaded to make room (already gone)


@attrs.define
class _Copy:
    """One resident model."""

    size: int
    keep: float  # the keep-alive the latest request on it asked for
    expires: float = FOREVER  # when it leaves memory unless used again
    busy: int = 0  # requests using it now


@attrs.define(eq=False)
class Residency:
    """The models in one machine's memory. See the module docstring for the rules."""

    ram_bytes: int
    default_keep: float = 300.0  # keep-alive for requests that give none (Ollama: 5 minutes)
    loaded_keep: float = FOREVER  # how long models resident from the start stay, unused
    prompts: PromptCache = attrs.field(factory=PromptCache)
    cold_loads: int = 0  # loads completed
    evictions: int = 0  # idle models unloaded to make room for another
    expirations: int = 0  # models that left because their keep-alive ran out
    _copies: OrderedDict[str, _Copy] = attrs.field(factory=OrderedDict)  # LRU first
    _reserved: dict[str, int] = attrs.field(factory=dict)  # loads under way: name -> bytes

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

    def used_bytes(self) -> int:
        """Memory held by resident models (not counting loads under way)."""
        return sum(c.size for c in self._copies.values())

    def available_bytes(self) -> int:
        """Usable memory neither held by models nor reserved by a load: what the machine
        reports as available."""
        return max(0, self.usable_bytes - self.used_bytes() - sum(self._reserved.values()))

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
                copy = self._copies[name] = _Copy(size, self.default_keep)
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
        while not self._fits(size):
            idle = next((n for n, c in self._copies.items() if not c.busy), None)
            if idle is not None:
                self._drop(idle)
                self.evictions += 1
                evicted.append(idle)
                continue
            if self._copies or self._reserved:
                return Admission(False, tuple(evicted))
            break  # bigger than the empty machine: load it anyway
        self._reserved[name] = size
        return Admission(True, tuple(evicted))

    def loaded(self, name: str) -> None:
        """The load :meth:`admit` reserved memory for is done: ``name`` is resident (and the
        most recently used), kept until a request releases it."""
        size = self._reserved.pop(name)
        self._copies[name] = _Copy(size, self.default_keep)
        self._copies.move_to_end(name)
        self.cold_loads += 1

    def abandon(self, name: str) -> None:
        """The load of ``name`` stopped before the end: its reservation goes."""
        self._reserved.pop(name, None)

    def _fits(self, size: int) -> bool:
        used = self.used_bytes() + sum(self._reserved.values())
        return used + size <= self.usable_bytes

    def _drop(self, name: str) -> None:
        del self._copies[name]
        self.prompts.drop(name)
