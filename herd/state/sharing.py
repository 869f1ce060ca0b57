"""What the router's state asks of a shared state store (``--state``), as a protocol.

Several routers in front of one fleet share slots, load, conversation affinity, learned
history and settings through a store (:mod:`herd.shared.service` implements this). The state
and transport layers only see this protocol, so they stay free of the store's client: each
method here either answers from memory or queues its I/O for the store's own tasks, except
:meth:`SharedFleet.find_affinity`, which the caller bounds with a short deadline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from herd.core.health import StateStoreHealth
from herd.state.settings import RuntimeSettings

# (node, model) -> (in_flight, pending): what the other routers count, last published.
RemoteLoad = dict[tuple[str, str], tuple[int, int]]


class SharedFleet(Protocol):
    @property
    def available(self) -> bool:
        """Is the store answering now (as of the last round trip)?"""
        ...

    async def find_affinity(self, keys: Sequence[str]) -> dict[str, tuple[str, str, int]]:
        """Shared entries among ``keys``: key -> (node, model, tokens). May raise anything
        the store's client raises; the caller bounds the wait and falls back to its own."""
        ...

    def remember_affinity(self, key: str, node_id: str, model: str, tokens: int) -> None:
        """Share that ``node_id`` took this prompt (queued; dropped if the queue is full)."""
        ...

    def publish_sample(
        self, node_id: str, model: str, latency_ms: float, tokens_per_second: float | None
    ) -> None:
        """Share one finished request's service time (queued; dropped if the queue is full)."""
        ...

    def settings_changed(self, settings: RuntimeSettings) -> None:
        """This router's settings changed (an operator's edit): save them for every router."""
        ...

    def view(self) -> dict[str, Any]:
        """The ``state`` section of ``/fleet/status``."""
        ...

    def health(self) -> StateStoreHealth:
        """What the Health tab's ``state_store`` check reads (:mod:`herd.core.health`)."""
        ...
