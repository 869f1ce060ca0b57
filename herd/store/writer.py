"""The one task that writes traces to SQLite, off the request path.

Requests hand their finished :class:`TraceRecord` to :meth:`TraceWriter.submit` (synchronous,
never blocks: a bounded channel; when it is full the trace is dropped and counted). The writer
takes whatever has queued up — one trace when traffic is light, a batch when it isn't — and writes
it in a worker thread. Readers call :meth:`flush` first, so an endpoint read right after a
request sees it. When the router stops, what is queued is written before the writer exits.
Retention: traces older than ``retention_days`` are pruned once an hour.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import attrs
import trio

from herd.router.traces import TraceRecord
from herd.store import db

log = logging.getLogger("herd.store")

QUEUE_SIZE = 10_000
BATCH_MAX = 500
PRUNE_EVERY = 3600.0
SHUTDOWN_FLUSH_TIMEOUT = 5.0


@attrs.frozen
class WriterStatistics:
    submitted: int
    written: int
    dropped: int
    pruned: int


@attrs.define(eq=False)
class TraceWriter:
    path: Path
    retention_days: float = 30.0
    submitted: int = 0
    written: int = 0
    dropped: int = 0
    pruned: int = 0
    _send: trio.MemorySendChannel[TraceRecord] | None = None
    _progress: trio.Event = attrs.field(factory=trio.Event)
    # One connection, two users (writes, pruning), one at a time.
    _lock: trio.Lock = attrs.field(factory=trio.Lock)

    def submit(self, trace: TraceRecord) -> None:
        if self._send is None:
            return
        try:
            self._send.send_nowait(trace)
        except trio.WouldBlock:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("trace queue full: %d traces dropped so far", self.dropped)
            return
        self.submitted += 1

    async def flush(self) -> None:
        """Wait until every trace submitted so far is written (or dropped)."""
        target = self.submitted
        while self.written < target and self._send is not None:
            await self._progress.wait()

    def statistics(self) -> WriterStatistics:
        return WriterStatistics(self.submitted, self.written, self.dropped, self.pruned)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.to_thread.run_sync(db.initialise, self.path)
        connection = await trio.to_thread.run_sync(db.connect, self.path)
        send, receive = trio.open_memory_channel[TraceRecord](QUEUE_SIZE)
        self._send = send
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._prune_loop, connection)
                task_status.started()
                await self._write_loop(connection, receive)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_FLUSH_TIMEOUT):
                rest = []
                while True:
                    try:
                        rest.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                if rest:
                    async with self._lock:
                        await trio.to_thread.run_sync(db.write_traces, connection, rest)
                    self.written += len(rest)
            self._send = None
            connection.close()
            self._wake()

    def _wake(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _write_loop(
        self, connection: sqlite3.Connection, receive: trio.MemoryReceiveChannel[TraceRecord]
    ) -> None:
        async for first in receive:
            batch = [first]
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                async with self._lock:
                    await trio.to_thread.run_sync(db.write_traces, connection, batch)
            except sqlite3.Error as exc:
                log.error("could not write %d traces: %s", len(batch), exc)
                self.dropped += len(batch)
                self.submitted -= len(batch)
            else:
                self.written += len(batch)
            self._wake()

    async def _prune_loop(self, connection: sqlite3.Connection) -> None:
        while True:
            before = time.time() - self.retention_days * 86400
            try:
                async with self._lock:
                    self.pruned += await trio.to_thread.run_sync(db.prune, connection, before)
            except sqlite3.Error as exc:
                log.error("could not prune old traces: %s", exc)
            await trio.sleep(PRUNE_EVERY)
