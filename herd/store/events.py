"""The fleet's events in the trace database (``fleet_events``), for :mod:`herd.state.events`.

One connection of its own, used only from worker threads, one call at a time (the event log's
writer task awaits each); SQLite serialises its writes with the trace writer's, and WAL lets
readers in meanwhile. Each write also trims the table to :data:`herd.store.db.MAX_EVENTS` rows.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from herd.core.timeline import FleetEvent
from herd.store import db


@attrs.define(eq=False)
class SqliteEvents:
    connection: sqlite3.Connection

    async def write(self, batch: Sequence[FleetEvent]) -> None:
        await trio.to_thread.run_sync(db.write_events, self.connection, list(batch))

    async def prune(self, before: float) -> None:
        await trio.to_thread.run_sync(db.prune_events, self.connection, before)


@asynccontextmanager
async def open_events(path: Path) -> AsyncIterator[SqliteEvents]:
    """The events table of the database at ``path`` (made if missing), open while inside."""
    await trio.to_thread.run_sync(db.initialise, path)
    connection = await trio.to_thread.run_sync(db.connect, path)
    try:
        yield SqliteEvents(connection)
    finally:
        connection.close()
