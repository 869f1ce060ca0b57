"""Pulls: off by default; when on, owned by the router (not by the request that asked),
deduplicated, visible with progress, bounded for the requests waiting on them; and only from
registries the operator allows. Real router, simulated nodes, virtual time."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from herd.sim import SimConfig, SimModel
from herd.state.settings import RuntimeSettings
from herd.transport.pulls import STALL_TIMEOUT, check_pull_name, registry_host
from tests.conftest import LLAMA_3B, GiB, running_fleet, wait_until

GEMMA = SimModel("gemma3:1b", size_bytes=GiB)
RATE = GiB / 100  # a 1 GiB model takes 100 s to pull


def specs(rate: float = RATE) -> list[SimConfig]:
    return [
        SimConfig(name=name, models=(LLAMA_3B,), registry=(GEMMA,), pull_bytes_per_second=rate)
        for name in ("alpha", "beta")
    ]


def generate(model: str) -> dict[str, object]:
    return {"model": model, "prompt": "x", "stream": False}


async def test_off_by_default_a_registry_name_is_a_404_and_nothing_is_pulled(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        running_fleet(tmp_path, specs()) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=None, trust_env=False) as client,
    ):
        reply = await client.post("/api/generate", json=generate("gemma3:1b"))
        assert reply.status_code == 404
        assert sum(sim.pulls for sim in fleet.sims.values()) == 0


async def test_a_pull_belongs_to_the_router_and_outlives_waiting_requests(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    settings = RuntimeSettings(auto_pull=True)
    async with (
        running_fleet(tmp_path, specs(), settings, queue_timeout=30.0) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=None, trust_env=False) as client,
    ):
        start = trio.current_time()
        codes: list[tuple[int, str | None]] = []

        async def ask() -> None:
            reply = await client.post("/api/generate", json=generate("gemma3:1b"))
            codes.append((reply.status_code, reply.headers.get("retry-after")))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(ask)
            # While they wait, the pull shows in /fleet/status with its progress.
            await trio.sleep(20)
            status = (await client.get("/fleet/status")).json()
            (job,) = [p for p in status["pulls"] if p["status"] == "pulling"]
            assert job["model"] == "gemma3:1b" and job["origin"] == "auto-pull"
            assert 0 < job["completed_bytes"] < job["total_bytes"] == GiB
        # Each waited its queue timeout, then 503 with Retry-After, while the pull goes on.
        assert codes == [(503, "10")] * 3
        assert 30 <= trio.current_time() - start < 31
        assert sum(sim.pulls for sim in fleet.sims.values()) <= 1  # one pull, not three
        # The pull finishes without them; the next request finds the model.
        pulls = fleet.router.link.pulls
        assert pulls is not None
        with trio.fail_after(200):
            await pulls.running["gemma3:1b"].done.wait()
        reply = await client.post("/api/generate", json=generate("gemma3:1b"))
        assert reply.status_code == 200 and reply.headers["x-herd-model"] == "gemma3:1b"
        stats = pulls.statistics()
        assert (stats.started, stats.succeeded, stats.failed) == (1, 1, 0)


async def test_a_waiter_leaving_does_not_break_the_pull_for_the_others(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    settings = RuntimeSettings(auto_pull=True)
    async with (
        running_fleet(tmp_path, specs(rate=GiB / 10), settings, queue_timeout=60.0) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=None, trust_env=False) as client,
    ):
        answers: list[int] = []

        async def ask() -> None:
            answers.append(
                (await client.post("/api/generate", json=generate("gemma3:1b"))).status_code
            )

        async with trio.open_nursery() as nursery:
            with trio.move_on_after(2):  # the first asker gives up (its connection closes)
                await ask()
            nursery.start_soon(ask)
        assert answers == [200]  # the second got the model
        pulls = fleet.router.link.pulls
        assert pulls is not None
        assert pulls.statistics().succeeded == 1
        await wait_until(fleet.counters_idle)


async def test_a_pull_to_a_hung_node_is_bounded_and_then_remembered(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    settings = RuntimeSettings(auto_pull=True)
    async with (
        running_fleet(tmp_path, specs(), settings, queue_timeout=30.0) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=None, trust_env=False) as client,
    ):
        for sim in fleet.sims.values():
            sim.fail_pulls("hang")
        start = trio.current_time()
        waiting = await client.post("/api/generate", json=generate("gemma3:1b"))
        assert waiting.status_code == 503
        assert trio.current_time() - start < 31  # the queue timeout, not forever
        pulls = fleet.router.link.pulls
        assert pulls is not None
        with trio.fail_after(STALL_TIMEOUT + 10):
            await pulls.running["gemma3:1b"].done.wait()
        failed = await client.post("/api/generate", json=generate("gemma3:1b"))
        assert failed.status_code == 404
        assert "made no progress" in failed.json()["error"]
        # A name the registry refuses fails at once, and is remembered for a while.
        for sim in fleet.sims.values():
            sim.clear_pull_failure()
        refused = await client.post("/api/generate", json=generate("nope:1b"))
        assert refused.status_code == 404
        assert "file does not exist" in refused.json()["error"]
        again = await client.post("/api/generate", json=generate("nope:1b"))
        assert again.status_code == 404
        assert pulls.statistics().started == 2  # not three


def test_registry_hosts_in_model_names() -> None:
    assert registry_host("llama3.2:3b") is None
    assert registry_host("library/llama3.2:3b") is None
    assert registry_host("hf.co/bartowski/model:Q4") == "hf.co"
    assert registry_host("127.0.0.1:32169/library/evil") == "127.0.0.1:32169"
    assert registry_host("localhost/x") == "localhost"
    check_pull_name("registry.ollama.ai/library/llama3.2:3b", ())
    check_pull_name("hf.co/x/y:latest", ("hf.co",))


async def test_pulls_from_hosts_the_operator_has_not_allowed_are_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    evil = "127.0.0.1:32169/library/evil:latest"
    ok_host = "hf.co/someone/model:latest"
    registry = (SimModel(evil), SimModel(ok_host))
    fleet_specs = [
        SimConfig(name="alpha", models=(LLAMA_3B,), registry=registry),
    ]
    settings = RuntimeSettings(auto_pull=True)
    async with (
        running_fleet(tmp_path, fleet_specs, settings, pull_hosts=("hf.co",)) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=None, trust_env=False) as client,
    ):
        auto = await client.post("/api/generate", json=generate(evil))
        assert auto.status_code == 403
        assert "--pull-host 127.0.0.1:32169" in auto.json()["error"]
        direct = await client.post("/api/pull", json={"model": evil})
        assert direct.status_code == 403
        dashboard = await client.post("/dashboard/api/pull", json={"model": evil})
        assert dashboard.status_code == 403
        assert fleet.sims["alpha"].pulls == 0
        # A host the operator allowed is pulled.
        allowed = await client.post("/api/pull", json={"model": ok_host, "stream": False})
        assert allowed.status_code == 200, allowed.text
        assert fleet.sims["alpha"].pulls == 1


async def test_a_pull_shows_its_rate_and_time_left_and_an_operator_can_cancel_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    settings = RuntimeSettings(auto_pull=True)
    async with (
        running_fleet(tmp_path, specs(), settings, queue_timeout=300.0) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=None, trust_env=False) as client,
    ):
        state = fleet.router.state
        started = await client.post(
            "/dashboard/api/pulls", json={"model": "gemma3:1b", "node_id": "beta"}
        )
        assert started.status_code == 202, started.text
        assert (started.json()["node"], started.json()["origin"]) == ("beta", "dashboard")
        # The same model onto another node while that runs: refused, saying where it goes.
        elsewhere = await client.post(
            "/dashboard/api/pulls", json={"model": "gemma3:1b", "node_id": "alpha"}
        )
        assert elsewhere.status_code == 409
        assert "being pulled onto beta" in elsewhere.json()["error"]
        answers: list[httpx.Response] = []

        async def wait_for_it() -> None:  # auto-pull joins the running pull
            answers.append(await client.post("/api/generate", json=generate("gemma3:1b")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_it)
            await trio.sleep(30)
            (job,) = (await client.get("/dashboard/api/pulls")).json()["pulls"]
            assert job["status"] == "pulling"
            assert job["rate_bytes_per_second"] == pytest.approx(RATE, rel=0.05)
            left = (job["total_bytes"] - job["completed_bytes"]) / RATE
            assert job["eta_seconds"] == pytest.approx(left, abs=2)
            cancelled = await client.post(
                "/dashboard/api/pulls/cancel", json={"model": "gemma3:1b", "node_id": "beta"}
            )
            assert cancelled.status_code == 200, cancelled.text
            view = cancelled.json()
            assert (view["status"], view["error"]) == ("cancelled", "cancelled by an operator")
            assert view["rate_bytes_per_second"] is None and view["ended_at"] is not None
        (answer,) = answers
        assert answer.status_code == 404
        assert "cancelled by an operator" in answer.json()["error"]
        await wait_until(lambda: fleet.sims["beta"].pulls_cancelled == 1)
        pulls = fleet.router.link.pulls
        assert pulls is not None and pulls.running == {}
        stats = pulls.statistics()
        assert (stats.started, stats.succeeded, stats.failed, stats.cancelled) == (1, 0, 0, 1)
        kinds = [(e.kind, e.node_id, e.model) for e in state.timeline.ring if "pull" in e.kind]
        assert kinds == [
            ("pull_started", "beta", "gemma3:1b"),
            ("pull_cancelled", "beta", "gemma3:1b"),
        ]
        # Nothing is running now: a cancel says so.
        again = await client.post("/dashboard/api/pulls/cancel", json={"model": "gemma3:1b"})
        assert again.status_code == 404 and "no pull of gemma3:1b" in again.json()["error"]
        # A cancelled pull is not a remembered failure: the next request pulls again.
        resumed = await client.post(
            "/dashboard/api/pulls", json={"model": "gemma3:1b", "node_id": "beta"}
        )
        assert resumed.status_code == 202
        with trio.fail_after(200):
            await pulls.running["gemma3:1b"].done.wait()
        assert pulls.statistics().succeeded == 1
        await wait_until(fleet.counters_idle)
