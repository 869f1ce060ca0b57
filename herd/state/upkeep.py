"""The router state's own upkeep: two tasks the router runs for as long as it runs.

- :func:`monitor` ages nodes (online → degraded → offline, then forgotten after
  ``forget_after``): it sleeps until the registry's next possible transition or a fleet change,
  never polls. Each transition, and each node forgotten, is a fleet change.
- :func:`reaper` ends in-flight requests whose stream stopped moving: it samples every lease's
  chunk counter every quarter of the shortest limit a stream can have (a stream's own limit
  follows its model's token rate, never below
  :data:`~herd.core.policy.deadlines.STALL_FLOOR`) and cancels the request of one that stalled.
"""

from __future__ import annotations

import logging
import math

import trio

from herd.core.policy.deadlines import STALL_FLOOR
from herd.state.state import RouterState

log = logging.getLogger("herd.router")


async def monitor(state: RouterState) -> None:
    """Age nodes: wake at the next possible transition or when the fleet changes."""
    while True:
        deadline = state.registry.next_deadline()
        with trio.move_on_at(deadline if deadline is not None else math.inf):
            await state.wait_fleet_changed()
        now = trio.current_time()
        changes = state.registry.tick(now)
        forgotten = state.forget_nodes(now)
        for node_id in forgotten:
            log.info("forgot node %s (offline for %.0f s)", node_id, state.registry.forget_after)
        for change in changes:
            log.info(
                "node %s is %s (was %s)",
                change.node_id,
                change.new.value,
                change.old.value if change.old else "new",
            )
        if changes or forgotten:  # a forgotten node leaves the views (and the timeline) now
            state.fleet_changed(changes)


async def reaper(state: RouterState) -> None:
    """Reap in-flight requests whose stream stopped moving for ``stale_timeout``."""
    while True:
        timeout = state.settings.stale_timeout
        # A settings change takes effect at once.
        with trio.move_on_after(min(timeout, STALL_FLOOR) / 4):
            await state.wait_settings_changed()
            continue
        for lease in state.queues.stale(trio.current_time(), timeout):
            limit = lease.limit(timeout)
            log.warning(
                "reaping a request on %s:%s: no progress for %.0f s",
                lease.node_id,
                lease.model,
                limit,
            )
            lease.reap(f"reaped by the router: no progress for {limit:g} s")
            state.events["reaped"] += 1
