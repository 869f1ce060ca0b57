"""Load accounting: every path out of a lease returns the counters to zero."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from herd.router.queues import QueueBook


async def test_success_failure_and_cancel_paths_return_to_zero() -> None:
    book = QueueBook(default_limit=2)
    async with book.lease("a", "m") as lease:
        assert book.counters("a", "m").in_flight == 1
        lease.succeeded()
    with pytest.raises(RuntimeError):
        async with book.lease("a", "m"):
            raise RuntimeError("node broke")
    with trio.CancelScope() as scope:
        async with book.lease("a", "m"):
            scope.cancel()
            await trio.sleep_forever()
    counters = book.counters("a", "m")
    assert (counters.pending, counters.in_flight, counters.done, counters.failed) == (0, 0, 1, 1)


async def test_limit_makes_requests_wait_in_pending() -> None:
    book = QueueBook(default_limit=1)
    book.set_limit("a", 1)
    release = trio.Event()
    entered: list[int] = []

    async def user(i: int) -> None:
        async with book.lease("a", "m") as lease:
            entered.append(i)
            await release.wait()
            lease.succeeded()

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(user, i)
        await trio.testing.wait_all_tasks_blocked()
        counters = book.counters("a", "m")
        assert (counters.pending, counters.in_flight) == (2, 1)
        assert book.load_for("a")["m"].pending == 2
        book.set_limit("a", 3)  # a heartbeat raised the node's slots
        await trio.testing.wait_all_tasks_blocked()
        assert (counters.pending, counters.in_flight) == (0, 3)
        released_at = trio.current_time()
        release.set()
    assert (counters.pending, counters.in_flight, counters.done) == (0, 0, 3)
    assert not book.busy("a")
    idle = book.load_for("a")["m"]
    assert (idle.pending, idle.in_flight) == (0, 0)
    # The eviction cost reads this recency: set when the last request left its slot.
    assert idle.last_used is not None and released_at <= idle.last_used <= trio.current_time()


async def test_cancel_while_pending_uncounts() -> None:
    book = QueueBook(default_limit=1)
    async with book.lease("a", "m"):
        with trio.move_on_after(1):
            async with book.lease("a", "m"):
                pass  # pragma: no cover - never gets a slot
        assert book.counters("a", "m").pending == 0
    assert book.statistics().in_flight == 0
