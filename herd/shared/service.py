"""One router's part in a fleet of routers: its handle on the shared state store (``--state``).

:class:`SharedState` implements :class:`herd.state.sharing.SharedFleet` (what the state and
transport layers ask of the store) and :class:`herd.state.queues.SlotGate` (shared slots), on
top of :mod:`herd.shared.slots` and :mod:`herd.shared.fleetstate`. Its tasks run in the
router's nursery (:meth:`SharedState.run`):

- load: every :data:`~herd.shared.fleetstate.LOAD_EVERY` seconds publish this router's own
  counts and read the others' into :meth:`RouterState.set_remote_load` (so the scorer never
  waits on the store). This round trip is also the store's health watch;
- slot renewals, release messages (wake-ups) and queued releases (:class:`SharedSlots`);
- writes: affinity, samples and settings queued by the request path, written in batches;
- subscriptions: samples other routers publish (merged into this router's history) and
  settings changes (loaded and adopted: they reach every router within a round trip).

Without the store. A store that doesn't answer (at start, or later) is logged once, loudly,
and once more when it answers again; meanwhile the router routes on its own counts: slots are
taken locally only, the others' load is taken as none, affinity is this router's own, and
writes are dropped (counted). When the store answers again the router reconciles: it puts its
live leases back (:meth:`SharedSlots.restore`: each request it still serves holds its slot),
publishes its counts, reloads the settings, and its subscriptions reconnect on their own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs
import trio

from herd.core.health import StateStoreHealth
from herd.shared.fleetstate import LOAD_EVERY, FleetStateStore, Sample
from herd.shared.resp import RespClient
from herd.shared.slots import LEASE_TTL, RETRY_EVERY, Held, SharedSlots
from herd.state.queues import OWN_LIMITS
from herd.state.settings import RuntimeSettings, updated
from herd.state.state import RouterState

log = logging.getLogger("herd.shared")

WRITE_BUFFER = 4096  # affinity entries and samples queued for the store; beyond, dropped
WRITE_BATCH = 256  # written in one round trip at most
STOP_TIMEOUT = 1.0  # seconds a stopping router spends giving back what it holds


def new_router_id() -> str:
    """Unique per router process: host, process and a random tail (a restart is a new id)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@attrs.frozen
class StateStatistics:
    url: str
    router_id: str
    available: bool
    last_error: str | None
    outages: int
    slots_held: int
    routers: int
    writes_dropped: int
    releases_dropped: int


@attrs.define(eq=False)
class SharedState:
    client: RespClient
    state: RouterState
    url: str  # as shown (no password)
    router_id: str = attrs.field(factory=new_router_id)
    ttl: float = LEASE_TTL
    load_every: float = LOAD_EVERY
    slots: SharedSlots = attrs.field(init=False)
    store: FleetStateStore = attrs.field(init=False)
    # The store answered the last round trip (False until the first succeeds).
    _available: bool = False
    _checked: bool = False  # a round trip was tried at all
    last_error: str | None = None
    lost_at: float | None = None  # router clock: when it stopped answering
    outages: int = 0
    writes_dropped: int = 0
    routers: int = 0  # live routers, as last read
    settings_version: int = 0
    _writes: trio.MemorySendChannel[tuple[str, Any]] = attrs.field(init=False)
    _write_queue: trio.MemoryReceiveChannel[tuple[str, Any]] = attrs.field(init=False)
    _reconnected: trio.Event = attrs.field(factory=trio.Event)
    unwritten: int = 0  # queued writes not yet tried

    def __attrs_post_init__(self) -> None:
        self.slots = SharedSlots(self.client, self.router_id, ttl=self.ttl)
        self.store = FleetStateStore(self.client, self.router_id)
        self._writes, self._write_queue = trio.open_memory_channel[tuple[str, Any]](WRITE_BUFFER)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, url: str, state: RouterState, *, ttl: float = LEASE_TTL, command_timeout: float = 2.0
    ) -> AsyncIterator[SharedState]:
        """Connect lazily to ``url`` (nothing is sent until :meth:`run`). Raises ValueError
        for a URL that isn't one (see :meth:`herd.shared.resp.Address.parse`)."""
        async with RespClient.open(url, command_timeout) as client:
            yield cls(client, state, client.address.shown(), ttl=ttl)

    # --- health ------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self._available

    def _lost(self, exc: BaseException) -> None:
        self.last_error = str(exc) or type(exc).__name__
        self.state.set_remote_load({})
        if self._available or not self._checked:
            self._available = False
            self._checked = True
            self.lost_at = trio.current_time()
            self.outages += 1
            log.error(
                "!" * 78 + "\n  the shared state store %s is unreachable (%s): routing goes on "
                "with this router's own counts; other routers' requests are not counted\n"
                + "!"
                * 78,
                self.url,
                self.last_error,
            )

    async def _found(self) -> None:
        """A round trip succeeded: if the store was away, reconcile with it."""
        if self._available:
            return
        was_lost = self._checked
        restored = await self.slots.restore() if was_lost else 0
        await self._load_settings()
        self._available = self._checked = True
        if was_lost:
            log.warning(
                "the shared state store %s answers again: %d slot leases restored, counts "
                "republished, settings reloaded",
                self.url,
                restored,
            )
        else:
            log.info("shared state store %s: connected as router %s", self.url, self.router_id)
        self.last_error, self.lost_at = None, None
        self._reconnected.set()
        self._reconnected = trio.Event()

    # --- the slot gate (herd.state.queues.SlotGate) ------------------------------------------
    async def take(
        self, node_id: str, model: str, kind: str, node_limit: int, model_limit: int | None
    ) -> object | None:
        key = node_id if kind not in OWN_LIMITS else f"{node_id}#{kind}"
        if self._available:
            try:
                return await self.slots.take(key, model, node_limit, model_limit)
            except trio.Cancelled:
                raise
            except Exception as exc:  # the store went away while we waited
                self._lost(exc)
        # Local counts decide; the slot is put in the store when it is back (reconciling).
        return self.slots.hold_unshared(key, model, model_limit)

    def release(self, held: object) -> None:
        assert isinstance(held, Held)
        if self._available:
            self.slots.release_soon(held)
        else:
            self.slots.forget(held)  # if it is there, it expires there

    # --- herd.state.sharing.SharedFleet ------------------------------------------------------
    async def find_affinity(self, keys: Sequence[str]) -> dict[str, tuple[str, str, int]]:
        return await self.store.find(keys)

    def remember_affinity(self, key: str, node_id: str, model: str, tokens: int) -> None:
        self._queue("affinity", (key, node_id, model, tokens))

    def publish_sample(
        self, node_id: str, model: str, latency_ms: float, tokens_per_second: float | None
    ) -> None:
        self._queue("sample", Sample(node_id, model, latency_ms, tokens_per_second))

    def settings_changed(self, settings: RuntimeSettings) -> None:
        self._queue("settings", attrs.asdict(settings))

    def _queue(self, kind: str, item: Any) -> None:
        if not self._available:
            self.writes_dropped += 1
            return
        try:
            self._writes.send_nowait((kind, item))
            self.unwritten += 1
        except trio.WouldBlock:
            self.writes_dropped += 1

    def statistics(self) -> StateStatistics:
        return StateStatistics(
            url=self.url,
            router_id=self.router_id,
            available=self._available,
            last_error=self.last_error,
            outages=self.outages,
            slots_held=len(self.slots.held),
            routers=self.routers,
            writes_dropped=self.writes_dropped,
            releases_dropped=self.slots.releases_dropped,
        )

    def health(self) -> StateStoreHealth:
        """What the Health tab's ``state_store`` check reads (herd.core.health)."""
        return StateStoreHealth(
            url=self.url,
            available=self._available,
            last_error=self.last_error,
            unavailable_for_s=(
                trio.current_time() - self.lost_at if self.lost_at is not None else None
            ),
            outages=self.outages,
            routers=self.routers,
        )

    def view(self) -> dict[str, Any]:
        view = attrs.asdict(self.statistics())
        view["mode"] = "shared"
        view["unavailable_for_s"] = (
            round(trio.current_time() - self.lost_at, 1) if self.lost_at is not None else None
        )
        return view

    # --- tasks -------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start: one round trip (settings and the fleet's recent samples; a store that is
        away is said so, and the router starts all the same), then the tasks of the module
        docstring, until cancelled."""
        try:
            await self.publish_and_read()
            for sample in await self.store.recent_samples():
                self._learn(sample)
        except trio.Cancelled:
            raise
        except Exception as exc:
            self._lost(exc)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._load_loop)
            nursery.start_soon(self.slots.run_renewals)
            nursery.start_soon(self.slots.run_wakeups)
            nursery.start_soon(self.slots.run_releases)
            nursery.start_soon(self._write_loop)
            nursery.start_soon(self._follow, self.store.samples_channel, self._on_sample)
            nursery.start_soon(self._follow, self.store.settings_channel, self._on_settings)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT):
                    await self._leave()

    async def _leave(self) -> None:
        """A stopping router frees what it holds at once (not at expiry): its leases (every
        request is over by now, or being cancelled), its load and its place among the live."""
        if not self._available:
            return
        held = list(self.slots.held.values())
        while True:
            try:
                held.append(self.slots.next_release())
            except trio.WouldBlock:
                break
        commands: list[tuple[object, ...]] = [
            ("ZREM", key, lease.lease_id) for lease in held for key in lease.keys
        ]
        commands += [
            ("DEL", f"{self.store.prefix}load:{self.router_id}"),
            ("ZREM", f"{self.store.prefix}routers", self.router_id),
        ]
        commands += [("PUBLISH", self.slots.channel, lease.node_id) for lease in held[:100]]
        try:
            await self.client.pipeline(commands)
        except Exception as exc:
            log.debug("leaving the shared state store: %s", exc)
        self.slots.held.clear()

    async def publish_and_read(self) -> None:
        """One load round trip: our counts out, the others' in (raises if the store is away)."""
        counts = {
            (node_id, model): (c.in_flight, c.pending)
            for node_id, model, c in self.state.queues.items()
        }
        await self.store.publish_load(counts)
        others = await self.store.others_load()
        self.routers = len(await self.store.live_routers())
        await self._found()
        self.state.set_remote_load(others)

    async def _load_loop(self) -> None:
        while True:
            await trio.sleep(self.load_every)
            try:
                await self.publish_and_read()
            except trio.Cancelled:
                raise
            except Exception as exc:
                self._lost(exc)

    async def _write_loop(self) -> None:
        async for first in self._write_queue:
            batch = [first]
            while len(batch) < WRITE_BATCH:
                try:
                    batch.append(self._write_queue.receive_nowait())
                except trio.WouldBlock:
                    break
            affinity = [item for kind, item in batch if kind == "affinity"]
            samples = [item for kind, item in batch if kind == "sample"]
            settings = [item for kind, item in batch if kind == "settings"]
            try:
                await self.store.remember(affinity)
                await self.store.publish_samples(samples)
                if settings:
                    self.settings_version = await self.store.save_settings(settings[-1])
            except trio.Cancelled:
                raise
            except Exception as exc:
                self.writes_dropped += len(batch)
                self._lost(exc)
            finally:
                self.unwritten -= len(batch)

    async def _follow(self, channel: str, handle: Any) -> None:
        """Messages on ``channel`` while the store is there (resubscribing after a loss)."""
        while True:
            if self._available:
                try:
                    async with self.client.subscribe(channel) as messages:
                        async for message in messages:
                            await handle(message)
                except trio.Cancelled:
                    raise
                except Exception as exc:
                    log.debug("subscription to %s lost: %s", channel, exc)
                with trio.move_on_after(RETRY_EVERY):
                    await self._reconnected.wait()
            else:
                await self._reconnected.wait()

    async def _on_sample(self, message: bytes) -> None:
        sample = self.store.decode_published(message)
        if sample is not None:
            self._learn(sample)

    def _learn(self, sample: Sample) -> None:
        self.state.history.record(
            sample.node_id, sample.model, sample.latency_ms, sample.tokens_per_second
        )

    async def _on_settings(self, message: bytes) -> None:
        try:
            version = int(message)
        except ValueError:
            return
        if version > self.settings_version:
            await self._load_settings()

    async def _load_settings(self) -> None:
        """Adopt the store's settings if they are newer than ours; seed the store with ours
        when no router has saved any."""
        first = self.settings_version == 0
        version, saved = await self.store.load_settings()
        if saved is None:
            self.settings_version = await self.store.save_settings(
                attrs.asdict(self.state.settings)
            )
            return
        if version <= self.settings_version:
            return
        self.settings_version = version
        try:
            settings = updated(RuntimeSettings(), saved)
        except Exception as exc:  # another (newer) router's settings we can't read
            log.warning("ignoring the shared settings (version %d): %s", version, exc)
            return
        if settings != self.state.settings:
            differ = [
                f"{name} (here {getattr(self.state.settings, name)!r}, fleet {value!r})"
                for name, value in attrs.asdict(settings, recurse=False).items()
                if getattr(self.state.settings, name) != value
            ]
            if first:
                # The fleet's settings beat this router's own (its settings file and flags
                # such as --auto-pull): say so where an operator who set them looks.
                log.warning(
                    "the fleet's shared settings (version %d) replace this router's own: %s",
                    version,
                    "; ".join(differ),
                )
            else:
                log.info(
                    "settings changed by another router (version %d): %s",
                    version,
                    "; ".join(differ),
                )
            self.state.adopt_settings(settings)
