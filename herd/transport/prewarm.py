"""The pre-warmer: load a model on a runner-up node when the winner's queue for it runs deep.

The dispatcher decides (:func:`herd.transport.dispatch.maybe_prewarm`) and drops a job on the
link's bounded channel without waiting; this task does the loading, one job at a time, at most
once per (node, model) per ``prewarm_cooldown``. A load is an empty ``/api/generate`` with
``keep_alive: -1``, bounded by ``first_byte_timeout``; afterwards the node is asked for a
heartbeat so the router sees the model loaded.
"""

from __future__ import annotations

import logging
import math

import httpx
import trio

from herd.transport.bodies import error_detail
from herd.transport.errors import describe
from herd.transport.link import Link
from herd.transport.pulls import HEARTBEAT_NOW

log = logging.getLogger("herd.router")

WARMED_MEMORY = 1024  # (node, model) loads remembered for the cooldown, at most


async def prewarmer(link: Link, jobs: trio.MemoryReceiveChannel[tuple[str, str]]) -> None:
    state = link.state
    warmed: dict[tuple[str, str], float] = {}
    async for node_id, model in jobs:
        now = trio.current_time()
        if now - warmed.get((node_id, model), -math.inf) < state.settings.prewarm_cooldown:
            continue
        record = state.registry.get(node_id)
        if record is None or not record.report.backend.healthy:
            continue
        warmed[(node_id, model)] = now
        if len(warmed) > WARMED_MEMORY:  # forget loads past their cooldown
            cooldown = state.settings.prewarm_cooldown
            warmed = {key: at for key, at in warmed.items() if now - at < cooldown}
        state.events["prewarms"] += 1
        log.info("pre-warming %s on %s (deep queue elsewhere)", model, node_id)
        url = record.report.backend.url.rstrip("/") + "/api/generate"
        try:
            with trio.move_on_after(link.config.first_byte_timeout):
                # An empty prompt loads the model and answers one short object.
                async with link.client.stream(
                    "POST",
                    url,
                    json={"model": model, "keep_alive": -1},
                    headers=link.backend_headers(record.report),
                ) as response:
                    await error_detail(response, node_id)  # bounded; the answer is small
        except httpx.HTTPError as exc:
            log.warning("pre-warm of %s on %s failed: %s", model, node_id, describe(exc))
        state.command(node_id, HEARTBEAT_NOW)
