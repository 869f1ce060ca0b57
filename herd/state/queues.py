"""Exact load accounting per node:model, and each node's concurrency limit.

Rules:
- A request counts on exactly one node:model at a time: ``pending`` while it waits for one of the
  node's slots, ``in_flight`` from the moment it holds a slot until its last byte or its
  cancellation. A :class:`Lease` is the only way to count, and leaving its ``async with`` block
  by *any* path (return, exception, ``trio.Cancelled``) uncounts it. So when traffic stops, every
  ``pending`` and ``in_flight`` is back to zero; ``done``/``failed`` only grow.
- A node runs at most ``limit`` requests at once (its backend's parallel slots, from the
  heartbeat). Requests beyond it wait in that node's queue, so ``pending`` is real and wait
  estimates built on it are honest. Limits may change while requests wait or run.
- Some models have a limit of their own within the node's (Ollama runs embedding-only models
  one request at a time; an operator can set others with ``--model-slots``): such a request
  takes its model's slot first, then one of the node's, always in that order.
- With several routers in front of one fleet (``--state``), the book is given a
  :class:`SlotGate`: after the local slots, a lease also takes a shared slot (a lease in the
  state store, counted against the same limits across every router) before it counts as in
  flight, and gives it back on every exit path. The local limiters still apply, so one router
  alone behaves as without a gate. A gate that can't reach its store lets the lease through on
  the local counts alone.
- Every change to what :meth:`QueueBook.load_for` reports for a node (a lease's steps, a new
  queue, a model limit, a forget) moves that node's :meth:`QueueBook.version`: the registry
  keeps a node's snapshot for scoring until it moves. Counters are changed here and nowhere
  else.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

import attrs
import trio

from herd.core.models import KIND_IMAGE, KIND_STT, KIND_TEXT, ModelLoad, QueueStatistics
from herd.state.cancellation import is_cancellation

# Per-node limits of the queue classes that don't share the LLM's parallel slots: one image at
# a time (it takes the GPU whole), two transcriptions (CPU-bound).
OWN_LIMITS = {KIND_IMAGE: 1, KIND_STT: 2}


class SlotGate(Protocol):
    """Shared slots across routers (see the module docstring). ``take`` waits for a slot
    and returns what :meth:`release` gives back (None: nothing); a gate whose store is away
    lets the lease go ahead on local counts. A cancelled ``take`` leaves nothing held. ``release``
    is synchronous (it may only queue the I/O), so an exit path can't be interrupted."""

    async def take(
        self, node_id: str, model: str, kind: str, node_limit: int, model_limit: int | None
    ) -> object | None: ...

    def release(self, held: object) -> None: ...


@attrs.define
class QueueCounters:
    kind: str = KIND_TEXT
    pending: int = 0
    in_flight: int = 0
    done: int = 0
    failed: int = 0
    last_used: float | None = None  # router clock: a request last took or left a slot

    def as_dict(self) -> dict[str, int | str]:
        return {
            "pending": self.pending,
            "in_flight": self.in_flight,
            "done": self.done,
            "failed": self.failed,
            "kind": self.kind,
        }


@attrs.define(eq=False)
class Lease:
    """One request's hold on a node:model. Use with ``async with``; before leaving, call
    :meth:`succeeded` (counts as done) or :meth:`abandoned` (the client went away: counts as
    neither done nor failed); by default a lease counts as failed."""

    book: QueueBook
    node_id: str
    model: str
    kind: str
    _outcome: str | None = "failed"
    _holding: bool = False
    _token: object = attrs.field(factory=object)
    _own: trio.CapacityLimiter | None = None  # the model's own limiter, if it has one
    _shared: object | None = None  # the gate's shared slot, if the book has a gate
    # Progress, for the zombie reaper: the relay counts chunks (an int, nothing more, on the
    # hot path); the reaper notes when the count last moved.
    acquired_at: float | None = None  # router clock: when it got its slot
    chunks: int = 0
    seen_chunks: int = -1
    last_moved: float = 0.0
    # The request's work scope, once its response is flowing: what the reaper cancels.
    scope: trio.CancelScope | None = None
    # Seconds without a chunk before the reaper ends it (herd.core.policy.deadlines); None: the
    # reaper's own timeout.
    stall_limit: float | None = None
    reap_reason: str | None = None

    def limit(self, timeout: float) -> float:
        """Seconds without a chunk before this lease is stale (its own limit, if shorter)."""
        return min(timeout, self.stall_limit) if self.stall_limit else timeout

    def reap(self, reason: str) -> None:
        """Cancel the request this lease belongs to (it has stopped making progress)."""
        self.reap_reason = reason
        if self.scope is not None:
            self.scope.cancel()

    def succeeded(self) -> None:
        self._outcome = "done"

    def failed(self) -> None:
        self._outcome = "failed"

    def abandoned(self) -> None:
        self._outcome = None

    async def __aenter__(self) -> Lease:
        counters = self.book.counters(self.node_id, self.model, self.kind)
        limiter = self.book.limiter(self.node_id, self.kind)
        own = self.book.model_limiter(self.node_id, self.model)
        counters.pending += 1
        self.book.touch(self.node_id)
        try:
            if own is not None:
                await own.acquire_on_behalf_of(self._token)
                self._own = own
            try:
                await limiter.acquire_on_behalf_of(self._token)
                gate = self.book.gate
                if gate is not None:
                    try:
                        self._shared = await gate.take(
                            self.node_id,
                            self.model,
                            self.kind,
                            int(limiter.total_tokens),
                            int(own.total_tokens) if own is not None else None,
                        )
                    except BaseException:
                        limiter.release_on_behalf_of(self._token)
                        raise
            except BaseException:
                if self._own is not None:
                    self._own.release_on_behalf_of(self._token)
                    self._own = None
                raise
        finally:
            counters.pending -= 1
            self.book.touch(self.node_id)
        counters.in_flight += 1
        counters.last_used = self.acquired_at = trio.current_time()
        self._holding = True
        self.book.active.add(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        if is_cancellation(exc) and self._outcome != "done":
            self._outcome = None  # cancelled (client gone, router stopping): not a node failure
        self.release()

    def release(self) -> None:
        """Uncount now (idempotent). Synchronous, so it can't be interrupted by cancellation."""
        if not self._holding:
            return
        self._holding = False
        self.book.active.discard(self)
        counters = self.book.counters(self.node_id, self.model, self.kind)
        counters.in_flight -= 1
        counters.last_used = trio.current_time()
        if self._outcome == "done":
            counters.done += 1
        elif self._outcome == "failed":
            counters.failed += 1
        self.book.touch(self.node_id)
        self.book.limiter(self.node_id, self.kind).release_on_behalf_of(self._token)
        if self._own is not None:
            self._own.release_on_behalf_of(self._token)
            self._own = None
        if self._shared is not None and self.book.gate is not None:
            self.book.gate.release(self._shared)
            self._shared = None
        self.book.notify()


@attrs.define(eq=False)
class QueueBook:
    default_limit: int = 4
    # Called whenever a slot is released (the router wakes waiting requests with it).
    on_release: Callable[[], None] | None = None
    # Shared slots across routers (--state); None: this router's counts are the whole truth.
    gate: SlotGate | None = None
    _queues: dict[tuple[str, str], QueueCounters] = attrs.field(factory=dict)
    # node -> model -> the same counters: a node's queues without scanning every node's.
    _by_node: dict[str, dict[str, QueueCounters]] = attrs.field(factory=dict)
    # node -> a number that changes whenever what load_for(node) returns may have changed
    # (the registry keeps each node's snapshot until it does).
    _versions: dict[str, int] = attrs.field(factory=dict)
    _changes: int = 0  # one count for every node: a version is never given out twice
    _limiters: dict[tuple[str, str], trio.CapacityLimiter] = attrs.field(factory=dict)
    # (node, model) -> that model's own limiter on that node, where it has a limit.
    _model_limiters: dict[tuple[str, str], trio.CapacityLimiter] = attrs.field(factory=dict)
    _freed: trio.Event = attrs.field(factory=trio.Event)
    active: set[Lease] = attrs.field(factory=set)

    def counters(self, node_id: str, model: str, kind: str = KIND_TEXT) -> QueueCounters:
        key = (node_id, model)
        counters = self._queues.get(key)
        if counters is None:
            counters = self._queues[key] = QueueCounters(kind=kind)
            self._by_node.setdefault(node_id, {})[model] = counters
            self.touch(node_id)
        return counters

    def touch(self, node_id: str) -> None:
        """Something :meth:`load_for` reports for ``node_id`` changed. Every change to a node's
        counters or model limits calls this (the Lease does, on each step)."""
        self._changes += 1
        self._versions[node_id] = self._changes

    def version(self, node_id: str) -> int:
        """See :meth:`touch`: equal numbers mean :meth:`load_for` would answer the same."""
        return self._versions.get(node_id, 0)

    @property
    def versions(self) -> Mapping[str, int]:
        """Every node's :meth:`version` (a node never touched is missing: 0), read-only; its
        ``get`` is the cheapest ``load_key`` for :meth:`NodeRegistry.snapshot`."""
        return self._versions

    def limiter(self, node_id: str, kind: str = KIND_TEXT) -> trio.CapacityLimiter:
        """The node's limiter for ``kind``: chat and embeddings share the backend's parallel
        slots; image generation and speech-to-text have their own (small) limits."""
        key = (node_id, kind if kind in OWN_LIMITS else KIND_TEXT)
        limiter = self._limiters.get(key)
        if limiter is None:
            limiter = self._limiters[key] = trio.CapacityLimiter(
                OWN_LIMITS.get(kind, self.default_limit)
            )
        return limiter

    def set_limit(self, node_id: str, slots: int) -> None:
        """Apply a node's advertised parallel slots (at least 1) to its text/embed limiter."""
        limiter = self.limiter(node_id)
        slots = max(1, slots)
        if limiter.total_tokens != slots:
            limiter.total_tokens = slots

    def set_model_limits(self, node_id: str, limits: Mapping[str, int]) -> None:
        """Apply a node's per-model limits (see the module docstring). A model whose limit
        is gone keeps its limiter until its requests are done, then shares the node's."""
        for model, slots in limits.items():
            key = (node_id, model)
            limiter = self._model_limiters.get(key)
            if limiter is None:
                self._model_limiters[key] = trio.CapacityLimiter(max(1, slots))
                self.touch(node_id)
            elif limiter.total_tokens != max(1, slots):
                limiter.total_tokens = max(1, slots)
                self.touch(node_id)
        for key in [k for k in self._model_limiters if k[0] == node_id and k[1] not in limits]:
            if not self._model_limiters[key].borrowed_tokens:
                del self._model_limiters[key]
                self.touch(node_id)

    def model_limiter(self, node_id: str, model: str) -> trio.CapacityLimiter | None:
        return self._model_limiters.get((node_id, model))

    def lease(self, node_id: str, model: str, kind: str = KIND_TEXT) -> Lease:
        return Lease(self, node_id, model, kind)

    def notify(self) -> None:
        """Wake everyone waiting in :meth:`wait_freed` (a slot was released)."""
        self._freed.set()
        self._freed = trio.Event()
        if self.on_release is not None:
            self.on_release()

    async def wait_freed(self) -> None:
        await self._freed.wait()

    def load_for(self, node_id: str) -> dict[str, ModelLoad]:
        """Every model the router has sent to ``node_id``: its queue and when it was last used
        (the scorer's eviction cost reads the recency)."""
        queues = self._by_node.get(node_id)
        if not queues:
            return {}
        limiters = self._model_limiters
        loads = {}
        for model, c in queues.items():
            own = limiters.get((node_id, model)) if limiters else None
            loads[model] = ModelLoad(
                pending=c.pending,
                in_flight=c.in_flight,
                last_used=c.last_used,
                slots=int(own.total_tokens) if own is not None else 0,
            )
        return loads

    def forget(self, node_id: str) -> None:
        """Drop an idle node's queues and limiters (the registry forgot it)."""
        self.touch(node_id)
        queues = self._by_node.get(node_id, {})
        for model, counters in list(queues.items()):
            if not counters.pending and not counters.in_flight:
                del self._queues[(node_id, model)]
                del queues[model]
        if not queues:
            self._by_node.pop(node_id, None)
            self._versions.pop(node_id, None)  # a later version is still new: never reused
        if not self.busy(node_id):
            for key in [k for k in self._limiters if k[0] == node_id]:
                del self._limiters[key]
            for key in [k for k in self._model_limiters if k[0] == node_id]:
                del self._model_limiters[key]

    def busy(self, node_id: str) -> bool:
        """Does any request wait for or hold a slot on ``node_id``?"""
        return any(c.pending or c.in_flight for c in self._by_node.get(node_id, {}).values())

    def items(self) -> Iterator[tuple[str, str, QueueCounters]]:
        for (node, model), counters in self._queues.items():
            yield node, model, counters

    def stale(self, now: float, timeout: float) -> list[Lease]:
        """Leases whose relay hasn't moved a chunk for ``timeout`` seconds, or their own
        shorter limit (decided here, cancelled by the caller). Progress is sampled: call at
        least every quarter of the shortest limit."""
        stale = []
        for lease in self.active:
            if lease.chunks != lease.seen_chunks:
                lease.seen_chunks = lease.chunks
                lease.last_moved = now
            elif lease.scope is not None and now - lease.last_moved >= lease.limit(timeout):
                stale.append(lease)
        return stale

    def statistics(self) -> QueueStatistics:
        queues = {f"{node}:{model}": c.as_dict() for (node, model), c in self._queues.items()}
        return QueueStatistics(
            pending=sum(c.pending for c in self._queues.values()),
            in_flight=sum(c.in_flight for c in self._queues.values()),
            done=sum(c.done for c in self._queues.values()),
            failed=sum(c.failed for c in self._queues.values()),
            queues=queues,
        )
