"""The simulator's one residency model (herd.sim.residency), pure: loads, evictions, waits,
keep-alive; and the shared loader on virtual time."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from herd.sim.loader import Loader
from herd.sim.residency import FOREVER, Residency

GiB = 2**30


def test_usable_memory_leaves_the_os_its_share() -> None:
    memory = Residency(10 * GiB)
    assert memory.usable_bytes == 9 * GiB
    assert memory.available_bytes() == 9 * GiB


def test_a_load_evicts_idle_models_least_recently_used_first() -> None:
    memory = Residency(10 * GiB)
    for name in ("a", "b", "c"):
        assert memory.admit(name, 3 * GiB).ready
        memory.loaded(name)
    memory.touch("a")  # a request starts on "a": "b" is now the least recently used
    admission = memory.admit("d", 3 * GiB)
    assert admission.ready and admission.evicted == ("b",)
    memory.loaded("d")
    assert memory.names() == ["c", "a", "d"] and memory.evictions == 1
    assert memory.cold_loads == 4 and memory.available_bytes() == 0


def test_a_load_waits_for_busy_models_and_reserves_its_memory() -> None:
    memory = Residency(10 * GiB)
    assert memory.admit("a", 6 * GiB).ready
    memory.loaded("a")
    memory.acquire("a", 60.0)
    assert not memory.admit("b", 6 * GiB).ready  # "a" is busy: wait
    memory.release("a", now=10.0)
    assert memory.admit("b", 6 * GiB).ready  # idle now: evicted
    assert memory.names() == [] and memory.available_bytes() == 3 * GiB  # b's reservation
    assert not memory.admit("c", 6 * GiB).ready  # a load under way holds its memory
    memory.abandon("b")
    assert memory.admit("c", 6 * GiB).ready


def test_a_model_bigger_than_the_machine_loads_once_it_is_empty() -> None:
    memory = Residency(10 * GiB)
    assert memory.admit("small", GiB).ready
    memory.loaded("small")
    admission = memory.admit("huge", 40 * GiB)
    assert admission.ready and admission.evicted == ("small",)


def test_keep_alive_from_the_last_request_and_at_start() -> None:
    memory = Residency(10 * GiB, default_keep=300.0, loaded_keep=10.0)
    memory.start([("preloaded", GiB)], None)
    assert memory.expires_at("preloaded", 0.0) == FOREVER  # not timed yet
    memory.start([("preloaded", GiB)], 100.0)
    assert memory.expire(109.0) == [] and memory.expire(110.0) == ["preloaded"]
    assert memory.admit("m", GiB).ready
    memory.loaded("m")
    memory.acquire("m", 30.0)
    memory.acquire("m", None)  # the latest request's keep-alive (the default) wins
    assert memory.expires_at("m", 200.0) == 500.0  # in use: counted from now
    memory.release("m", 200.0)
    assert memory.expire(1000.0) == []  # still one request on it
    memory.release("m", 1000.0)
    assert memory.expire(1299.0) == [] and memory.expire(1300.0) == ["m"]
    assert memory.expirations == 2
    assert memory.admit("gone", GiB).ready
    memory.loaded("gone")
    memory.acquire("gone", 0.0)
    assert memory.release("gone", 5.0)  # keep_alive 0: unloaded as the request ends
    assert not memory.resident("gone")


def test_unload_when_idle_waits_for_the_last_request() -> None:
    memory = Residency(10 * GiB)
    assert memory.admit("m", GiB).ready
    memory.loaded("m")
    memory.prompts.remember("m", "key", 100)
    memory.acquire("m", math.inf)
    memory.unload_when_idle("m")
    assert memory.resident("m")
    memory.release("m", 1.0)
    assert not memory.resident("m")
    assert memory.prompts.cached_tokens("m", ["key"]) == 0  # its prompt cache went with it


async def test_the_loader_waits_for_room_then_loads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    memory = Residency(10 * GiB)
    loads = Loader(memory)
    assert await loads.ensure("a", 6 * GiB, 4.0) == 4.0
    memory.acquire("a")
    finished: list[float] = []

    async def load_b() -> None:
        finished.append(await loads.ensure("b", 6 * GiB, 2.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(load_b)
        await trio.sleep(5.0)  # "a" stays busy for 5 s; "b" waits for it
        assert memory.names() == ["a"]
        loads.release("a")
    assert finished == [pytest.approx(7.0)] and memory.names() == ["b"]
    assert await loads.ensure("b", 6 * GiB, 2.0) == 0.0  # resident: no wait
