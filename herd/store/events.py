"""The fleet's events in the trace store (``fleet_events``), for :mod:`herd.state.events`.

One connection of its own, used only from worker threads, one call at a time (a lock: the
event log's writer and its hourly pruning are two tasks), opened again if the server dropped
it. SQLite serialises its writes with the trace writer's, and WAL lets readers in meanwhile;
PostgreSQL shares the table between the routers that use it. Each write also trims the table
to :data:`herd.store.db.MAX_EVENTS` rows.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from herd.core.timeline import FleetEvent
from herd.store import db
from herd.store.db import Store, StoreTarget


@attrs.define(eq=False)
class StoreEvents:
    target: StoreTarget
    connection: Store | None = None
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def _open(self) -> Store:
        if self.connection is not None and self.connection.broken:
            self.connection.close()
            self.connection = None
        if self.connection is None:
            self.connection = self.target.connect()
        return self.connection

    def _write(self, batch: list[FleetEvent]) -> None:
        with self._lock:
            db.write_events(self._open(), batch)

    def _prune(self, before: float) -> None:
        with self._lock:
            db.prune_events(self._open(), before)

    async def write(self, batch: Sequence[FleetEvent]) -> None:
        """Raises StoreError (the batch is lost; the event log counts it)."""
        await trio.to_thread.run_sync(self._write, list(batch))

    async def prune(self, before: float) -> None:
        await trio.to_thread.run_sync(self._prune, before)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


@asynccontextmanager
async def open_events(target: StoreTarget | Path) -> AsyncIterator[StoreEvents]:
    """The events table of the store at ``target`` (made if missing; a path is that SQLite
    file), open while inside. Raises StorageError when it can't be reached or used."""
    if isinstance(target, Path):
        target = StoreTarget.sqlite(target)
    await trio.to_thread.run_sync(db.initialise, target)
    events = StoreEvents(target)
    events.connection = await trio.to_thread.run_sync(target.connect)
    try:
        yield events
    finally:
        events.close()
