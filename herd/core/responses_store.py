"""Stored OpenAI Responses: what ``previous_response_id`` and ``GET /v1/responses/{id}`` read.

The Responses API stores every response unless the request says ``store: false``, so that a
later request can continue it by id. herd keeps them **in the router's memory only**: at most
:data:`MAX_RESPONSES` responses and :data:`MAX_BYTES` bytes of them in all (their JSON size),
the least recently used going first when either limit is reached. A response larger than the
byte limit on its own is not kept. Nothing is written to disk: a router restart forgets them
all, and a request naming one that is gone gets a 400 that says so.

Each entry holds the response object as the client got it and its *conversation*: the input
items of its whole ``previous_response_id`` chain, then its own input and output items. A
continuation reads one entry, so an evicted ancestor never breaks a chain that a later response
already carries; the older snapshots of one long conversation are the ones the LRU drops first.

Each entry belongs to whoever made it: with API keys, the key it was made with (its
``owner``, a digest of the key, never the key itself). Another key reads it as missing, so one
user of a shared router can't continue or read another's conversation; without keys every
caller is the same owner.

Pure: no I/O, no clock. Reading an entry (a continuation or a ``GET``) counts as a use.
"""

from __future__ import annotations

import hmac
import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import attrs

MAX_RESPONSES = 256
MAX_BYTES = 64 * 2**20


@attrs.frozen
class StoredResponse:
    id: str  # "resp_..."
    # The response object as the client got it (``GET /v1/responses/{id}`` answers it).
    response: Mapping[str, Any]
    # Responses input items: the previous chain's, then this request's input, then its output.
    conversation: tuple[Mapping[str, Any], ...]


def _size(stored: StoredResponse) -> int:
    encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    return len(encode(stored.response).encode()) + len(encode(list(stored.conversation)).encode())


@attrs.define
class ResponseStore:
    """Stored responses, least recently used first; bounded by count and by bytes."""

    max_responses: int = MAX_RESPONSES
    max_bytes: int = MAX_BYTES
    _entries: OrderedDict[str, tuple[StoredResponse, int, str]] = attrs.field(
        factory=OrderedDict, init=False
    )
    size: int = attrs.field(default=0, init=False)  # bytes held

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, stored: StoredResponse, owner: str = "") -> bool:
        """Keep ``stored`` for ``owner`` (evicting the least recently used as needed). False if
        it alone is over the byte limit (then it is not kept)."""
        size = _size(stored)
        self._drop(stored.id)
        if size > self.max_bytes:
            return False
        self._entries[stored.id] = (stored, size, owner)
        self.size += size
        while len(self._entries) > self.max_responses or self.size > self.max_bytes:
            _, (_, evicted, _) = self._entries.popitem(last=False)
            self.size -= evicted
        return True

    def get(self, response_id: Any, owner: str = "") -> StoredResponse | None:
        """The stored response ``response_id`` names (now the most recently used), or None
        when there is none, or it belongs to another owner."""
        if not isinstance(response_id, str):
            return None
        entry = self._entries.get(response_id)
        if entry is None or not hmac.compare_digest(entry[2], owner):
            return None
        self._entries.move_to_end(response_id)
        return entry[0]

    def _drop(self, response_id: str) -> None:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.size -= entry[1]
