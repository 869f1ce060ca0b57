"""Shared fixtures: a real router on 127.0.0.1 with real simulated Ollama nodes behind it.

Everything is real HTTP on loopback: the router's hypercorn server, each simulated Ollama
(``herd.sim``) and each node agent's WebSocket to the router.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import httpx
import pytest
import trio
import trio.testing

from herd import demo
from herd.config import RouterConfig
from herd.http.service import Router
from herd.node.agent import AgentConfig, NodeAgent
from herd.sim import SimConfig, SimModel, SimOllama, run_sim
from herd.state.settings import RuntimeSettings
from herd.store.db import StoreTarget

T = TypeVar("T")

GiB = 2**30

LLAMA_3B = SimModel("llama3.2:3b", size_bytes=2 * GiB, parameter_size="3B")
QWEN_7B = SimModel("qwen2.5:7b", size_bytes=5 * GiB, family="qwen2", parameter_size="7B")
EMBED = attrs.evolve(demo.EMBED, embedding_dim=8)


@attrs.define(eq=False)
class Fleet:
    router: Router
    sims: dict[str, SimOllama]
    agents: dict[str, NodeAgent]

    @property
    def url(self) -> str:
        return self.router.url

    def counters_idle(self) -> bool:
        stats = self.router.state.queues.statistics()
        return stats.pending == 0 and stats.in_flight == 0


def two_node_specs() -> list[SimConfig]:
    return [
        SimConfig(
            name="alpha",
            models=(LLAMA_3B, QWEN_7B, EMBED),
            loaded=("llama3.2:3b",),
            memory_bytes=32 * GiB,
        ),
        SimConfig(
            name="beta", models=(LLAMA_3B, QWEN_7B), loaded=("qwen2.5:7b",), memory_bytes=16 * GiB
        ),
    ]


@contextlib.asynccontextmanager
async def running_fleet(
    tmp_path: Path,
    specs: Sequence[SimConfig],
    settings: RuntimeSettings | None = None,
    agent_options: dict[str, dict[str, Any]] | None = None,
    idle_at_end: bool = True,
    **router_options: Any,
) -> AsyncIterator[Fleet]:
    """A router on loopback with one node agent per spec, each before a simulated Ollama.

    When the test's block ends without an error, every queue counter must be back at zero
    within ten seconds (a request's books close just after its last byte): a request the
    router forgot to finish fails the test that made it. ``idle_at_end=False`` for a test
    that ends with requests still running on purpose."""
    config = RouterConfig(host="127.0.0.1", port=0, data_dir=str(tmp_path), **router_options)
    async with contextlib.AsyncExitStack() as stack:
        router = await stack.enter_async_context(
            Router(config, settings=settings or RuntimeSettings())
        )
        sims: dict[str, SimOllama] = {}
        agents: dict[str, NodeAgent] = {}
        nursery = await stack.enter_async_context(trio.open_nursery())
        for spec in specs:
            sims[spec.name] = await stack.enter_async_context(run_sim(spec))
            options: dict[str, Any] = {
                "router_url": router.url,
                "ollama_url": sims[spec.name].url,
                "node_id": spec.name,
                "heartbeat_interval": config.heartbeat_interval,
                "parallel_slots": spec.parallel,
                "auth_token": config.auth_token,
            }
            options.update((agent_options or {}).get(spec.name, {}))  # any of these too
            agent = NodeAgent(
                AgentConfig(**options),
                system=sims[spec.name].system_reading,  # the simulated machine's memory
                accelerators=sims[spec.name].read_accelerators,  # and its GPU, if any
            )
            agents[spec.name] = agent
            await nursery.start(agent.run)
        with trio.fail_after(10):
            await router.wait_nodes(len(specs))
        fleet = Fleet(router=router, sims=sims, agents=agents)
        try:
            yield fleet
            if idle_at_end:
                with trio.move_on_after(10):
                    while not fleet.counters_idle():
                        await trio.testing.wait_all_tasks_blocked(cushion=0.002)
                stats = router.state.queues.statistics()
                assert fleet.counters_idle(), (
                    f"requests left counted at the end: {stats.in_flight} in flight, "
                    f"{stats.pending} pending"
                )
        finally:
            nursery.cancel_scope.cancel()


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    async with running_fleet(tmp_path, two_node_specs()) as fleet:
        yield fleet


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fleet.url, timeout=10, trust_env=False) as client:
        yield client


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Wait for a condition another task (or the kernel) will make true: the router finishes
    its books just after the client has read the last byte."""
    with trio.fail_after(within):
        while not predicate():
            await trio.testing.wait_all_tasks_blocked(cushion=0.002)


async def until_virtual(predicate: Callable[[], bool], every: float = 0.01) -> None:
    """Wait under the autojump clock for a condition that needs virtual time to pass (the next
    token of a simulated stream, say), looking every ``every`` virtual seconds; the caller's
    ``fail_after`` bounds it. (``wait_until`` would keep the clock from jumping.)"""
    while True:
        if predicate():
            return
        await trio.sleep(every)


async def in_thread(fn: Callable[[], T]) -> T:
    """Run a blocking client (the OpenAI or Ollama SDK) without blocking the router's loop."""
    with trio.fail_after(20):
        return await trio.to_thread.run_sync(fn)


# ---------------------------------------------------------------------------- trace stores


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private PostgreSQL on loopback for the session (tests/engines.py)."""
    from tests.engines import postgres_server

    with postgres_server(tmp_path_factory.mktemp("postgres")) as url:
        yield url


_schemas = itertools.count()


@contextlib.contextmanager
def postgres_schema(admin_url: str) -> Iterator[str]:
    """A fresh, empty schema in the session's PostgreSQL; yields a URL whose connections use it
    (and drops it after)."""
    import psycopg

    name = f"t{os.getpid()}_{next(_schemas)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {name}")
    try:
        yield f"{admin_url}?options=-csearch_path%3D{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreTarget]:
    """The trace store on each dialect: latency.db in tmp_path, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield StoreTarget.sqlite(tmp_path / "latency.db")
        return
    with postgres_schema(request.getfixturevalue("postgres_url")) as url:
        yield StoreTarget.postgres(url)
