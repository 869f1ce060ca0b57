"""Shared node slots on a real Redis-protocol server: two routers never overfill a node, a
release wakes the other router's waiter, a router that stops renewing loses its leases within
their expiry, and a server that lost its data gets the live leases back."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from herd.shared.resp import RespClient
from herd.shared.slots import SharedSlots
from tests.engines import redis_server

NODE, MODEL = "gpu-box", "llama3.2:3b"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[RespClient]:
    async with RespClient.open(redis_url) as client:
        await client.execute("FLUSHDB")
        yield client


async def test_two_routers_never_take_more_than_the_node_has(client: RespClient) -> None:
    a, b = SharedSlots(client, "router-a"), SharedSlots(client, "router-b")
    taken = []
    for slots in (a, b, a, b, a, b):
        taken.append(await slots.try_take(NODE, MODEL, node_limit=2))
    assert sum(t is not None for t in taken) == 2
    assert await a.in_use(NODE) == 2
    # Many at once from both: still never more than the limit.
    results: list[bool] = []

    async def one(slots: SharedSlots) -> None:
        results.append(await slots.try_take("other", MODEL, node_limit=3) is not None)

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(one, a if i % 2 else b)
    assert results.count(True) == 3
    assert await a.in_use("other") == 3


async def test_a_model_limit_holds_within_the_node_limit(client: RespClient) -> None:
    a, b = SharedSlots(client, "router-a"), SharedSlots(client, "router-b")
    embed = "nomic-embed-text:latest"
    assert await a.try_take(NODE, embed, node_limit=4, model_limit=1) is not None
    assert await b.try_take(NODE, embed, node_limit=4, model_limit=1) is None
    assert await b.try_take(NODE, MODEL, node_limit=4) is not None  # other models still fit
    assert await a.in_use(NODE, embed) == 1 and await a.in_use(NODE) == 2


async def test_a_release_wakes_the_other_routers_waiter(client: RespClient) -> None:
    a, b = SharedSlots(client, "router-a"), SharedSlots(client, "router-b")
    held = await a.try_take(NODE, MODEL, node_limit=1)
    assert held is not None
    got: list[object] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.run_wakeups)

        arrived = trio.Event()

        async def wait_for_slot() -> None:
            got.append(await b.take(NODE, MODEL, node_limit=1))
            arrived.set()

        nursery.start_soon(wait_for_slot)
        assert await b.try_take(NODE, MODEL, node_limit=1) is None and got == []
        await a.release(held)
        with trio.fail_after(5):
            await arrived.wait()
        nursery.cancel_scope.cancel()
    assert await a.in_use(NODE) == 1 and list(b.held) == [got[0].lease_id]  # type: ignore[attr-defined]


async def test_a_router_that_stops_renewing_loses_its_slots_within_the_expiry(
    client: RespClient,
) -> None:
    # The expiry runs on the server's own clock, so this test waits for it in real time: a
    # one-second lease; the waiter retries every half second and must get the slot in three.
    dead = SharedSlots(client, "router-dead", ttl=1.0)
    alive = SharedSlots(client, "router-alive", ttl=1.0)
    assert await dead.try_take(NODE, MODEL, node_limit=1) is not None
    assert await alive.try_take(NODE, MODEL, node_limit=1) is None
    with trio.fail_after(3):
        held = await alive.take(NODE, MODEL, node_limit=1)
    assert held.lease_id.startswith("router-alive:")


async def test_renewal_keeps_a_live_routers_slots(client: RespClient) -> None:
    live = SharedSlots(client, "router-live", ttl=1.0)
    other = SharedSlots(client, "router-other", ttl=1.0)
    assert await live.try_take(NODE, MODEL, node_limit=1) is not None
    with trio.move_on_after(2.5):  # past two expiries, renewing every third of one
        await live.run_renewals()
    assert await other.try_take(NODE, MODEL, node_limit=1) is None
    assert await live.renew() == 1


async def test_a_server_that_lost_the_leases_gets_them_back(client: RespClient) -> None:
    a = SharedSlots(client, "router-a")
    assert await a.try_take(NODE, MODEL, node_limit=2) is not None
    await client.execute("FLUSHDB")  # a restart without persistence
    assert await a.renew() == 0
    assert await a.in_use(NODE) == 0
    await a.restore()
    assert await a.in_use(NODE) == 1


async def test_prefixes_keep_fleets_apart(client: RespClient) -> None:
    home = SharedSlots(client, "r", prefix="home:")
    lab = SharedSlots(client, "r", prefix="lab:")
    assert await home.try_take(NODE, MODEL, node_limit=1) is not None
    assert await lab.try_take(NODE, MODEL, node_limit=1) is not None
