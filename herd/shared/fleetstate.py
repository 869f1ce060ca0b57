"""What several routers share about one fleet, besides slots: load, affinity, history, settings.

Keys (``<prefix>`` defaults to ``herd:``; give each fleet its own):

- ``<prefix>routers``: sorted set of live routers (member = router id, score = expiry ms).
- ``<prefix>load:<router>``: hash ``node|model`` → ``"in_flight pending"``, this router's own
  counts, rewritten every :data:`LOAD_EVERY` and expiring after :data:`LOAD_TTL`; a router's
  view of the fleet's load is its own live counts plus every other live router's last ones.
- ``<prefix>aff:<prompt key>``: ``node|model|tokens``, the node that took a prompt (expires
  after :data:`AFFINITY_TTL`, so the table is bounded by time and the server's memory policy).
- ``<prefix>samples``: published finished-request samples (``node model latency_ms rate``),
  and the list ``<prefix>recent-samples`` (the last :data:`SAMPLE_MEMORY`) a starting router
  learns from.
- ``<prefix>settings``: the runtime settings as JSON, with ``<prefix>settings-version``
  incremented and the version published on ``<prefix>settings-changed`` on every change.

Every call may raise :class:`~herd.shared.resp.StoreUnavailable`; the caller decides what a
router does without the store (it keeps routing on its own counts).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from herd.shared.resp import Reply, RespClient, RespError, Script

LOAD_EVERY = 0.5  # seconds between publications of this router's counts
LOAD_TTL = 3.0  # seconds a router's published counts outlive its last publication
AFFINITY_TTL = 3600.0  # seconds a remembered prompt stays shared
SAMPLE_MEMORY = 2000  # recent finished-request samples kept for starting routers

Counts = dict[tuple[str, str], tuple[int, int]]  # (node, model) -> (in_flight, pending)


@attrs.frozen
class Sample:
    node_id: str
    model: str
    latency_ms: float
    tokens_per_second: float | None

    def encode(self) -> str:
        rate = "-" if self.tokens_per_second is None else repr(self.tokens_per_second)
        return f"{self.node_id} {self.model} {self.latency_ms!r} {rate}"

    @classmethod
    def decode(cls, data: bytes | str) -> Sample | None:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        parts = text.split(" ")
        if len(parts) != 4:
            return None
        try:
            rate = None if parts[3] == "-" else float(parts[3])
            return cls(parts[0], parts[1], float(parts[2]), rate)
        except ValueError:
            return None


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _check(replies: Sequence[Reply | RespError]) -> list[Reply]:
    """The replies, or the first error among them raised."""
    checked: list[Reply] = []
    for reply in replies:
        if isinstance(reply, RespError):
            raise reply
        checked.append(reply)
    return checked


@attrs.define(eq=False)
class FleetStateStore:
    client: RespClient
    router_id: str
    prefix: str = "herd:"

    # --- load -----------------------------------------------------------------------------
    async def publish_load(self, counts: Counts) -> None:
        """Replace this router's published counts, and say it is alive."""
        key = f"{self.prefix}load:{self.router_id}"
        ttl_ms = int(LOAD_TTL * 1000)
        commands: list[tuple[object, ...]] = [("DEL", key)]
        fields: list[object] = []
        for (node_id, model), (in_flight, pending) in counts.items():
            if in_flight or pending:
                fields += [f"{node_id}|{model}", f"{in_flight} {pending}"]
        if fields:
            commands += [("HSET", key, *fields), ("PEXPIRE", key, ttl_ms)]
        commands.append(("EVAL", _ALIVE, 1, f"{self.prefix}routers", self.router_id, ttl_ms))
        _check(await self.client.pipeline(commands))

    async def others_load(self) -> Counts:
        """The summed counts every other live router published last."""
        others = [r for r in await self.live_routers() if r != self.router_id]
        if not others:
            return {}
        replies = _check(
            await self.client.pipeline([("HGETALL", f"{self.prefix}load:{r}") for r in others])
        )
        total: Counts = {}
        for reply in replies:
            assert isinstance(reply, list)
            for field, value in zip(reply[::2], reply[1::2], strict=True):
                node_id, _, model = _text(field).partition("|")
                try:
                    in_flight, pending = (int(n) for n in _text(value).split(" "))
                except ValueError:
                    continue
                had = total.get((node_id, model), (0, 0))
                total[(node_id, model)] = (had[0] + in_flight, had[1] + pending)
        return total

    async def live_routers(self) -> list[str]:
        routers = await self.client.run_script(LIVE, [f"{self.prefix}routers"], [])
        assert isinstance(routers, list)
        return sorted(_text(r) for r in routers)

    # --- affinity ---------------------------------------------------------------------------
    async def remember(self, entries: Iterable[tuple[str, str, str, int]]) -> None:
        """Share ``(prompt key, node, model, tokens)`` entries."""
        ttl_ms = int(AFFINITY_TTL * 1000)
        commands: list[tuple[object, ...]] = [
            ("SET", f"{self.prefix}aff:{key}", f"{node_id}|{model}|{tokens}", "PX", ttl_ms)
            for key, node_id, model, tokens in entries
        ]
        if commands:
            _check(await self.client.pipeline(commands))

    async def find(self, keys: Iterable[str]) -> dict[str, tuple[str, str, int]]:
        """The shared entries among ``keys``: key → (node, model, tokens)."""
        wanted = list(keys)
        if not wanted:
            return {}
        values = await self.client.execute("MGET", *(f"{self.prefix}aff:{k}" for k in wanted))
        assert isinstance(values, list)
        found: dict[str, tuple[str, str, int]] = {}
        for key, value in zip(wanted, values, strict=True):
            if value is None:
                continue
            node_id, _, rest = _text(value).partition("|")
            model, _, tokens = rest.rpartition("|")
            if node_id and model and tokens.isdigit():
                found[key] = (node_id, model, int(tokens))
        return found

    # --- history ----------------------------------------------------------------------------
    @property
    def samples_channel(self) -> str:
        return f"{self.prefix}samples"

    async def publish_samples(self, samples: Iterable[Sample]) -> None:
        encoded = [s.encode() for s in samples]
        if not encoded:
            return
        key = f"{self.prefix}recent-samples"
        commands: list[tuple[object, ...]] = [("LPUSH", key, *encoded)]
        commands.append(("LTRIM", key, 0, SAMPLE_MEMORY - 1))
        commands += [("PUBLISH", self.samples_channel, f"{self.router_id} {e}") for e in encoded]
        _check(await self.client.pipeline(commands))

    async def recent_samples(self) -> list[Sample]:
        """The fleet's recent samples, oldest first."""
        values = await self.client.execute(
            "LRANGE", f"{self.prefix}recent-samples", 0, SAMPLE_MEMORY - 1
        )
        assert isinstance(values, list)
        decoded = (Sample.decode(v) for v in reversed(values) if isinstance(v, bytes))
        return [s for s in decoded if s is not None]

    def decode_published(self, message: bytes) -> Sample | None:
        """A sample published by another router (None for our own or a malformed one)."""
        sender, _, rest = message.decode("utf-8", "replace").partition(" ")
        if sender == self.router_id:
            return None
        return Sample.decode(rest)

    # --- settings ---------------------------------------------------------------------------
    @property
    def settings_channel(self) -> str:
        return f"{self.prefix}settings-changed"

    async def save_settings(self, settings: Mapping[str, Any]) -> int:
        """Store the settings and tell the other routers; returns the new version."""
        replies = _check(
            await self.client.pipeline(
                [
                    ("SET", f"{self.prefix}settings", json.dumps(settings, sort_keys=True)),
                    ("INCR", f"{self.prefix}settings-version"),
                ]
            )
        )
        version = replies[1]
        assert isinstance(version, int)
        await self.client.execute("PUBLISH", self.settings_channel, version)
        return version

    async def load_settings(self) -> tuple[int, dict[str, Any] | None]:
        """(version, settings) as stored; (0, None) when no router has saved any."""
        text, version = _check(
            await self.client.pipeline(
                [("GET", f"{self.prefix}settings"), ("GET", f"{self.prefix}settings-version")]
            )
        )
        if text is None:
            return 0, None
        loaded = json.loads(_text(text))
        return int(_text(version or b"0")), loaded if isinstance(loaded, dict) else None


# A router is alive until its entry's expiry (server time); the set drops the dead ones.
_ALIVE = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return 1
"""
LIVE = Script(
    """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
"""
)
