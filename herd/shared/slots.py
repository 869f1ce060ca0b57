"""Node slots shared by several routers: a slot is a lease with an expiry, in Valkey.

Theory of operation. Each node has one sorted set of the leases holding its slots
(``<prefix>slots:<node>``, member = lease id, score = expiry in the server's milliseconds) and,
for a model with a limit of its own, one more (``<prefix>mslots:<node>|<model>``). Taking a slot
is one server-side script (:data:`TAKE`): drop the expired leases, check both counts against
the limits the router passes (the node's parallel slots from its heartbeat, the model's own),
and add the lease to both, atomically, so two routers never overfill a node. The router renews
its leases every :data:`RENEW_EVERY` of :data:`LEASE_TTL` in one pipeline; a router that dies
stops renewing, and its slots come free within the lease's expiry, with nothing left behind.
Releasing removes the lease and publishes the node's id on ``<prefix>released``, which wakes
the routers waiting for that node's slots (they also retry every :data:`RETRY_EVERY`, as a
published message is only a hint: one lost to a reconnect must not strand a waiter).
:meth:`SharedSlots.release_soon` is the synchronous form a request's exit path uses: the lease
stops being renewed at once and the release runs on :meth:`SharedSlots.run_releases` (a full
queue, or a store that is away, leaves the lease to expire). A take whose reply never came
(cancelled, timed out) may still have been taken on the server, so it is released the same
way: a cancelled waiter leaves no lease behind.

The server's clock (``TIME``) is the only clock used for expiries, so routers' clocks need not
agree. Lease ids are ``<router id>:<sequence>``.
"""

from __future__ import annotations

import itertools
import logging

import attrs
import trio

from herd.shared.resp import RespClient, RespError, Script

log = logging.getLogger("herd.shared")

LEASE_TTL = 10.0  # seconds a lease lives without renewal
RENEW_EVERY = 1 / 3  # of LEASE_TTL
RETRY_EVERY = 0.5  # seconds between tries while a node's slots are full
RELEASE_BUFFER = 1024  # releases queued for the store; beyond, leases are left to expire

TAKE = Script(
    """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
local model_limit = tonumber(ARGV[4])
if model_limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= model_limit then return 0 end
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ttl * 3)
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 3)
return 1
"""
)

# ARGV: ttl, mode ("renew": only leases still there; "restore": put back lost ones), members.
RENEW = Script(
    """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[1])
local kept = 0
for i = 1, #KEYS do
  local there = redis.call('ZSCORE', KEYS[i], ARGV[i + 2])
  if there and tonumber(there) > now then
    kept = kept + 1
  end
  if there or ARGV[2] == 'restore' then
    redis.call('ZADD', KEYS[i], now + ttl, ARGV[i + 2])
    redis.call('PEXPIRE', KEYS[i], ttl * 3)
  end
end
return kept
"""
)

COUNT = Script(
    """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local counts = {}
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  counts[i] = redis.call('ZCARD', KEYS[i])
end
return counts
"""
)


@attrs.frozen
class Held:
    """One slot this router holds: the lease and the keys it is in."""

    lease_id: str
    node_id: str
    model: str
    keys: tuple[str, ...]


@attrs.define(eq=False)
class SharedSlots:
    client: RespClient
    router_id: str
    prefix: str = "herd:"
    ttl: float = LEASE_TTL
    held: dict[str, Held] = attrs.field(factory=dict)
    _sequence: itertools.count[int] = attrs.field(factory=itertools.count)
    _released: trio.Event = attrs.field(factory=trio.Event)
    _releases: trio.MemorySendChannel[Held] = attrs.field(init=False)
    _release_queue: trio.MemoryReceiveChannel[Held] = attrs.field(init=False)
    releases_dropped: int = 0

    def __attrs_post_init__(self) -> None:
        self._releases, self._release_queue = trio.open_memory_channel[Held](RELEASE_BUFFER)

    @property
    def channel(self) -> str:
        return self.prefix + "released"

    def node_key(self, node_id: str) -> str:
        return f"{self.prefix}slots:{node_id}"

    def model_key(self, node_id: str, model: str) -> str:
        return f"{self.prefix}mslots:{node_id}|{model}"

    async def try_take(
        self, node_id: str, model: str, node_limit: int, model_limit: int | None = None
    ) -> Held | None:
        """Take a slot if the node (and the model) has one free now; None if full.
        Raises :class:`~herd.shared.resp.StoreUnavailable` when the server is away."""
        lease_id = f"{self.router_id}:{next(self._sequence)}"
        keys = (self.node_key(node_id), self.model_key(node_id, model))
        try:
            taken = await self.client.run_script(
                TAKE, keys, [lease_id, int(self.ttl * 1000), node_limit, model_limit or 0]
            )
        except BaseException:
            # The script may have run before its reply was lost: give it back (see above).
            self.release_soon(Held(lease_id, node_id, model, keys))
            raise
        if taken != 1:
            return None
        held = Held(lease_id, node_id, model, keys if model_limit else keys[:1])
        self.held[lease_id] = held
        return held

    def hold_unshared(self, node_id: str, model: str, model_limit: int | None = None) -> Held:
        """A slot taken on local counts while the server is away: held (and renewed) as if
        taken there, so :meth:`restore` puts it there when the server is back."""
        lease_id = f"{self.router_id}:{next(self._sequence)}"
        keys = (self.node_key(node_id), self.model_key(node_id, model))
        held = Held(lease_id, node_id, model, keys if model_limit else keys[:1])
        self.held[lease_id] = held
        return held

    async def take(
        self, node_id: str, model: str, node_limit: int, model_limit: int | None = None
    ) -> Held:
        """Wait for a slot on the node (released elsewhere, or expired), then take it."""
        while True:
            held = await self.try_take(node_id, model, node_limit, model_limit)
            if held is not None:
                return held
            released = self._released
            with trio.move_on_after(RETRY_EVERY):
                await released.wait()

    async def release(self, held: Held) -> None:
        """Give the slot back and tell the waiting routers."""
        self.held.pop(held.lease_id, None)
        commands: list[tuple[object, ...]] = [("ZREM", key, held.lease_id) for key in held.keys]
        commands.append(("PUBLISH", self.channel, held.node_id))
        for reply in await self.client.pipeline(commands):
            if isinstance(reply, RespError):
                raise reply

    def release_soon(self, held: Held) -> None:
        """Stop renewing the lease now and release it on :meth:`run_releases`."""
        self.held.pop(held.lease_id, None)
        try:
            self._releases.send_nowait(held)
        except trio.WouldBlock:
            self.releases_dropped += 1  # it expires within the ttl

    async def run_releases(self) -> None:
        """Release the leases :meth:`release_soon` queued, for as long as the router runs."""
        async for held in self._release_queue:
            try:
                await self.release(held)
            except Exception as exc:  # the store is away: the lease expires there
                log.debug("releasing slot lease %s failed: %s", held.lease_id, exc)

    def next_release(self) -> Held:
        """A queued release, taken off the queue (a stopping router does them itself).
        Raises trio.WouldBlock when none is queued."""
        return self._release_queue.receive_nowait()

    def forget(self, held: Held) -> None:
        """Stop renewing a lease (the server is away; it will expire there)."""
        self.held.pop(held.lease_id, None)

    def wake(self) -> None:
        """A slot came free somewhere (a release message arrived): waiters try again."""
        self._released.set()
        self._released = trio.Event()

    async def renew(self, mode: str = "renew") -> int:
        """Push every held lease's expiry forward; returns how many were still live there.
        ``mode="restore"`` also puts back the ones the server lost (it restarted, or was away
        past their expiry): each request this router still serves holds its slot again,
        whatever the limits say now."""
        if not self.held:
            return 0
        keys: list[str] = []
        members: list[str] = []
        for held in self.held.values():
            for key in held.keys:
                keys.append(key)
                members.append(held.lease_id)
        kept = await self.client.run_script(RENEW, keys, [int(self.ttl * 1000), mode, *members])
        assert isinstance(kept, int)
        return kept

    async def restore(self) -> int:
        return await self.renew("restore")

    async def in_use(self, node_id: str, model: str | None = None) -> int:
        """Slots taken on the node (or by the model's own limit) by every router, now."""
        key = self.node_key(node_id) if model is None else self.model_key(node_id, model)
        counts = await self.client.run_script(COUNT, [key], [])
        assert isinstance(counts, list)
        count = counts[0]
        assert isinstance(count, int)
        return count

    async def run_renewals(self) -> None:
        """Renew every ``ttl * RENEW_EVERY`` seconds, for as long as the router runs. A
        failed renewal is logged and tried again at the next tick."""
        while True:
            await trio.sleep(self.ttl * RENEW_EVERY)
            try:
                await self.renew()
            except Exception as exc:  # the store is away: the caller's health watch says so
                log.debug("renewing %d slot leases failed: %s", len(self.held), exc)

    async def run_wakeups(self) -> None:
        """Listen for released slots (reconnecting after a lost connection)."""
        while True:
            try:
                async with self.client.subscribe(self.channel) as messages:
                    async for _ in messages:
                        self.wake()
            except Exception as exc:
                log.debug("slot release subscription lost: %s", exc)
            await trio.sleep(RETRY_EVERY)
