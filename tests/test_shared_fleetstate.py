"""What routers share besides slots, on a real Redis-protocol server: load, affinity, learned
samples and settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from herd.shared.fleetstate import FleetStateStore, Sample
from herd.shared.resp import RespClient
from tests.engines import redis_server


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[RespClient]:
    async with RespClient.open(redis_url) as client:
        await client.execute("FLUSHDB")
        yield client


async def test_each_router_sees_the_others_load(client: RespClient) -> None:
    a, b, c = (FleetStateStore(client, name) for name in ("a", "b", "c"))
    await a.publish_load({("n1", "m"): (2, 1), ("n2", "m"): (0, 0)})
    await b.publish_load({("n1", "m"): (1, 3)})
    assert await c.others_load() == {("n1", "m"): (3, 4)}
    assert await a.others_load() == {("n1", "m"): (1, 3)}
    assert await c.live_routers() == ["a", "b"]
    await a.publish_load({})  # a finished its requests: its counts go
    assert await c.others_load() == {("n1", "m"): (1, 3)}


async def test_affinity_is_shared_by_prompt_key(client: RespClient) -> None:
    a, b = FleetStateStore(client, "a"), FleetStateStore(client, "b")
    await a.remember([("k1", "gpu-box", "qwen2.5:7b", 1800), ("k2", "mac", "llama3.2:3b", 40)])
    assert await b.find(["k0", "k1", "k2"]) == {
        "k1": ("gpu-box", "qwen2.5:7b", 1800),
        "k2": ("mac", "llama3.2:3b", 40),
    }
    assert await b.find([]) == {}


async def test_samples_reach_other_routers_and_starting_ones(client: RespClient) -> None:
    a, b = FleetStateStore(client, "a"), FleetStateStore(client, "b")
    first = Sample("n1", "llama3.2:3b", 812.5, 41.0)
    async with client.subscribe(b.samples_channel) as messages:
        await a.publish_samples([first, Sample("n2", "qwen2.5:7b", 2400.0, None)])
        with trio.fail_after(5):
            got = [b.decode_published(await messages.receive()) for _ in range(2)]
    assert got[0] == first and got[1] == Sample("n2", "qwen2.5:7b", 2400.0, None)
    assert a.decode_published(f"a {first.encode()}".encode()) is None  # its own
    assert [s.node_id for s in await b.recent_samples()] == ["n1", "n2"]  # oldest first
    assert Sample.decode(b"garbage") is None


async def test_settings_have_a_version_and_a_message(client: RespClient) -> None:
    a, b = FleetStateStore(client, "a"), FleetStateStore(client, "b")
    assert await b.load_settings() == (0, None)
    async with client.subscribe(b.settings_channel) as messages:
        version = await a.save_settings({"vram_fallback": True})
        with trio.fail_after(5):
            assert await messages.receive() == str(version).encode()
    assert await b.load_settings() == (version, {"vram_fallback": True})
    assert await a.save_settings({"vram_fallback": False}) == version + 1
