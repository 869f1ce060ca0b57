"""The async side of :mod:`herd.sim.residency`: loads that take time on Trio's clock, shared by
the HTTP simulator and the virtual fleet.

One load per model at a time: a request for a model another request is loading waits for that
load (and loads it itself if that one was cancelled). Loads that need room are placed in the
order they asked, as Ollama's scheduler takes its pending requests: the first waits until a
model goes idle or leaves memory (:meth:`Loader.release`, :meth:`Loader.unload`,
:meth:`Loader.expire` wake it), then asks again; the others wait behind it. Every state
change is the residency model's; this class only waits.
"""

from __future__ import annotations

import collections

import attrs
import trio

from herd.sim.residency import Residency


@attrs.define(eq=False)
class Loader:
    residency: Residency
    _loading: dict[str, trio.Event] = attrs.field(factory=dict)
    _changed: trio.Event = attrs.field(factory=trio.Event)  # set when memory may have freed
    _waiting: collections.deque[object] = attrs.field(factory=collections.deque)  # FIFO

    async def ensure(self, name: str, size: int, load_seconds: float) -> float:
        """Make ``name`` resident (the most recently used). Returns the seconds this call
        waited for a load: 0.0 when it was resident, else the time since the call (exactly
        ``load_seconds`` when this call loaded it without waiting for room)."""
        residency = self.residency
        if residency.resident(name):
            residency.touch(name)
            return 0.0
        start = trio.current_time()
        while (pending := self._loading.get(name)) is not None:
            await pending.wait()  # another request is loading it
            if residency.resident(name):
                residency.touch(name)
                return trio.current_time() - start
        # (nobody else is loading it, or that load was cancelled: load it here)
        done = self._loading[name] = trio.Event()
        try:
            waited = False
            if self._waiting or not residency.admit(name, size).ready:
                waited = True
                await self._wait_for_room(name, size)
            try:
                await trio.sleep(load_seconds)
            except BaseException:
                residency.abandon(name)
                raise
            residency.loaded(name)
        finally:
            del self._loading[name]
            done.set()
            self._wake()  # a reservation became a model, or went
        return trio.current_time() - start if waited else load_seconds

    async def _wait_for_room(self, name: str, size: int) -> None:
        """Queue behind the loads already waiting, then wait until :meth:`Residency.admit`
        reserves memory for this one."""
        ticket = object()
        self._waiting.append(ticket)
        try:
            while not (self._waiting[0] is ticket and self.residency.admit(name, size).ready):
                await self._changed.wait()
        finally:
            self._waiting.remove(ticket)
            self._wake()  # the next in line may go now

    def release(self, name: str) -> None:
        """A request on ``name`` ended (see :meth:`Residency.release`)."""
        self.residency.release(name, trio.current_time())
        self._wake()

    def unload(self, name: str) -> None:
        """Unload ``name`` now (see :meth:`Residency.unload`)."""
        if self.residency.unload(name):
            self._wake()

    def unload_when_idle(self, name: str) -> None:
        """See :meth:`Residency.unload_when_idle`."""
        self.residency.unload_when_idle(name)
        self._wake()

    def expire(self, now: float) -> list[str]:
        """Unload the models whose keep-alive ran out (see :meth:`Residency.expire`)."""
        gone = self.residency.expire(now)
        if gone:
            self._wake()
        return gone

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
