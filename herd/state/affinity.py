"""Which node served which conversation: the router's memory for conversation affinity.

Bounded (:data:`CAPACITY` prompts, least recently used dropped first). Each entry maps the key
of a prompt that was sent (see :mod:`herd.core.policy.conversation`) to the node and model that took
it and the prompt's estimated tokens: what the next turn would find in that node's cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import attrs

CAPACITY = 20_000


@attrs.frozen
class Served:
    node_id: str
    model: str
    tokens: int


@attrs.define(eq=False)
class AffinityTable:
    capacity: int = CAPACITY
    _entries: OrderedDict[str, Served] = attrs.field(factory=OrderedDict)

    def remember(self, key: str, node_id: str, model: str, tokens: int) -> None:
        self._entries[key] = Served(node_id, model, tokens)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def find(self, keys: Iterable[str], model: str) -> Served | None:
        """The entry of the longest remembered prefix served with ``model``, if any."""
        for key in keys:
            served = self._entries.get(key)
            if served is not None and served.model == model:
                self._entries.move_to_end(key)
                return served
        return None

    def forget(self, node_id: str) -> None:
        """Drop every prompt a forgotten node took."""
        for key in [k for k, served in self._entries.items() if served.node_id == node_id]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
