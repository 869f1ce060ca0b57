"""The one task that writes traces to the store (SQLite, or PostgreSQL), off the request path.

Requests hand their finished :class:`TraceRecord` to :meth:`TraceWriter.submit` (synchronous,
never blocks: a bounded channel; when it is full the trace is dropped and counted). The writer
collects traces for up to :data:`BATCH_INTERVAL` after the first one, or until it has
:data:`BATCH_MAX`, and writes them in one transaction in a worker thread: one thread hop and one
commit per batch, not per request. Readers call :meth:`flush` first, which has the batch being
collected written at once, so an endpoint read right after a request sees it. When the router
stops, what is collected or queued is written before the writer exits. Retention: traces older
than ``retention_days`` are pruned once an hour.

A write that fails (disk full, database read-only, PostgreSQL away) loses that batch, counted
as ``failed``, and routing goes on: requests never wait on the store. A connection the server
dropped is opened again for the next batch (so writes resume when the server is back). The
failure is logged once per :data:`LOG_EVERY` seconds, not per batch, and kept in
:meth:`statistics` (``last_error``) for the health check and ``/metrics``. :meth:`flush`
counts failed traces as settled, and never waits longer than :data:`FLUSH_TIMEOUT`: a broken
store can't wedge the dashboard.
"""

from __future__ import annotations

import logging
import math
import time

import attrs
import trio

from herd.core.traces import TraceRecord
from herd.store import db
from herd.store.db import Store, StoreError, StoreTarget

log = logging.getLogger("herd.store")

QUEUE_SIZE = 10_000
BATCH_MAX = 500
BATCH_INTERVAL = 0.5  # seconds a batch collects traces after its first
PRUNE_EVERY = 3600.0
SHUTDOWN_FLUSH_TIMEOUT = 5.0
FLUSH_TIMEOUT = 2.0
LOG_EVERY = 60.0


@attrs.frozen
class WriterStatistics:
    submitted: int
    written: int
    dropped: int  # the queue was full
    failed: int  # the write failed (disk full, read-only, ...)
    pruned: int
    last_error: str | None  # the last write failure, while writes keep failing
    last_error_at: float | None  # wall clock


@attrs.define(eq=False)
class TraceWriter:
    target: StoreTarget
    retention_days: float = 30.0
    # Largest database the writer may grow (SQLite's max_page_count; not applied to
    # PostgreSQL, whose administrator sizes it); None = the disk's room.
    max_bytes: int | None = None
    submitted: int = 0
    written: int = 0
    dropped: int = 0
    failed: int = 0
    pruned: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    _send: trio.MemorySendChannel[TraceRecord] | None = None
    _progress: trio.Event = attrs.field(factory=trio.Event)
    # One connection, two users (writes, pruning), one at a time.
    _lock: trio.Lock = attrs.field(factory=trio.Lock)
    _logged_at: float = -1e18  # router clock of the last failure logged
    _unlogged: int = 0  # failures since then
    _applied_max: int | None = None
    _connection: Store | None = None  # None: opened at the next write
    # The batch being collected, and the scope that waits for more (flush cuts it short).
    _batch: list[TraceRecord] = attrs.field(factory=list)
    _collecting: trio.CancelScope | None = None
    _flush_target: int = 0  # traces submitted before the last flush: written without waiting

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
        """Wait until every trace submitted so far is written or has failed, for at most
        :data:`FLUSH_TIMEOUT` seconds."""
        target = self.submitted
        self._flush_target = max(self._flush_target, target)
        if self._collecting is not None:
            self._collecting.cancel()
        with trio.move_on_after(FLUSH_TIMEOUT):
            while self.written + self.failed < target and self._send is not None:
                await self._progress.wait()

    def statistics(self) -> WriterStatistics:
        return WriterStatistics(
            self.submitted,
            self.written,
            self.dropped,
            self.failed,
            self.pruned,
            self.last_error,
            self.last_error_at,
        )

    def _open(self) -> Store:
        """The writer's connection, opened again if the server dropped it. In a worker
        thread; raises StoreError."""
        connection = self._connection
        if connection is not None and connection.broken:
            connection.close()
            connection = self._connection = None
        if connection is None:
            connection = self._connection = self.target.connect()
            self._applied_max = None
        return connection

    def _write_batch(self, batch: list[TraceRecord]) -> None:
        connection = self._open()
        if self.max_bytes is not None and self.max_bytes != self._applied_max:
            connection.limit_bytes(self.max_bytes)  # it may change while the writer runs
            self._applied_max = self.max_bytes
        db.write_traces(connection, batch)

    def _prune(self, before: float) -> int:
        return db.prune(self._open(), before)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write until cancelled. Raises :class:`~herd.store.db.StorageError` at the start
        when the store can't be reached or used."""
        await trio.to_thread.run_sync(db.initialise, self.target)
        self._connection = await trio.to_thread.run_sync(self.target.connect)
        send, receive = trio.open_memory_channel[TraceRecord](QUEUE_SIZE)
        self._send = send
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._prune_loop)
                task_status.started()
                await self._write_loop(receive)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_FLUSH_TIMEOUT):
                rest, self._batch = self._batch, []
                while True:
                    try:
                        rest.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                if rest:
                    await self._write(rest)
            self._send = None
            if self._connection is not None:
                self._connection.close()
                self._connection = None
            self._wake()

    def _wake(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _write(self, batch: list[TraceRecord]) -> None:
        try:
            async with self._lock:
                await trio.to_thread.run_sync(self._write_batch, batch)
        except StoreError as exc:
            self.failed += len(batch)
            self._failure(
                f"could not write {len(batch)} traces to {self.target.describe()}: {exc.reason}"
            )
        else:
            self.written += len(batch)
            if self.last_error is not None:
                log.info("writing traces to %s again", self.target.describe())
                self.last_error = self.last_error_at = None
        self._wake()

    def _failure(self, message: str) -> None:
        self.last_error, self.last_error_at = message, time.time()
        now = trio.current_time()
        if now - self._logged_at >= LOG_EVERY:
            more = (
                f" ({self._unlogged} more failures since the last report)" if self._unlogged else ""
            )
            log.error("%s%s; routing goes on, traces are lost until it is fixed", message, more)
            self._logged_at, self._unlogged = now, 0
        else:
            self._unlogged += 1

    async def _write_loop(self, receive: trio.MemoryReceiveChannel[TraceRecord]) -> None:
        async for first in receive:
            batch = self._batch = [first]
            # Collect for BATCH_INTERVAL, unless a reader is waiting for what is queued.
            urgent = self.written + self.failed < self._flush_target
            with trio.CancelScope(
                deadline=-math.inf if urgent else trio.current_time() + BATCH_INTERVAL
            ) as collecting:
                self._collecting = collecting
                try:
                    while len(batch) < BATCH_MAX:
                        batch.append(await receive.receive())
                except trio.EndOfChannel:
                    pass
            self._collecting = None
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            self._batch = []
            await self._write(batch)

    async def _prune_loop(self) -> None:
        while True:
            before = time.time() - self.retention_days * 86400
            try:
                async with self._lock:
                    self.pruned += await trio.to_thread.run_sync(self._prune, before)
            except StoreError as exc:
                self._failure(
                    f"could not prune old traces in {self.target.describe()}: {exc.reason}"
                )
            await trio.sleep(PRUNE_EVERY)
