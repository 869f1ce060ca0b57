"""Adaptive capacity: a learned week, current pressure, meetings, the manual override."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import httpx
import trio

from herd.config import NodeConfig, RouterConfig
from herd.http.service import Router
from herd.node.capacity import (
    SLOTS,
    CapacityLearner,
    Reading,
    WeeklyModel,
    assess,
    busyness,
    in_meeting,
    slot_of,
)
from herd.node.service import Node
from herd.sim import SimConfig, SimModel, run_sim

GiB = 2**30
MONDAY = dt.datetime(2026, 11, 16)  # a Monday


def work_weeks(weeks: int = 3) -> WeeklyModel:
    """Busy 9-17 on weekdays (CPU 90%), idle otherwise, observed every 10 minutes."""
    model = WeeklyModel()
    moment = MONDAY
    while moment < MONDAY + dt.timedelta(weeks=weeks):
        office = moment.weekday() < 5 and 9 <= moment.hour < 17
        model.observe(moment, busyness(90.0 if office else 3.0, 35.0, False))
        moment += dt.timedelta(minutes=10)
    return model


def test_slots_cover_the_week() -> None:
    assert slot_of(MONDAY) == 0
    assert slot_of(MONDAY + dt.timedelta(days=6, hours=23)) == SLOTS - 1
    assert slot_of(MONDAY + dt.timedelta(days=1, hours=10)) == 34


def test_the_learned_week_shapes_availability_and_the_ceiling() -> None:
    model = work_weeks()
    idle_now = Reading(cpu_percent=5.0, memory_percent=30.0)
    tuesday_10 = MONDAY + dt.timedelta(weeks=3, days=1, hours=10)
    tuesday_03 = MONDAY + dt.timedelta(weeks=3, days=1, hours=3)
    office = assess(model, tuesday_10, idle_now, 32 * GiB)
    night = assess(model, tuesday_03, idle_now, 32 * GiB)
    assert office.mode == "learned" and not office.paused
    assert office.availability < 0.6 < night.availability  # expects its owner back at work
    assert night.availability > 0.9
    assert office.ceiling_bytes is not None and night.ceiling_bytes is not None
    assert office.ceiling_bytes < night.ceiling_bytes <= int(32 * GiB * 0.9)
    # What happens now counts too: a busy night is a busy night.
    busy_night = assess(model, tuesday_03, Reading(cpu_percent=95.0, memory_percent=30.0), 32 * GiB)
    assert busy_night.availability <= 0.1


def test_meetings_and_the_manual_override_pause() -> None:
    model = work_weeks(1)
    for reading in (Reading(5.0, 30.0, in_meeting=True), Reading(5.0, 30.0, paused=True)):
        capacity = assess(model, MONDAY, reading, 16 * GiB)
        assert (capacity.paused, capacity.availability, capacity.ceiling_bytes) == (True, 0.0, 0)
    assert in_meeting({"VDCAssistant", "zsh"}, "darwin") is True
    assert in_meeting({"VDCAssistant"}, "linux") is False  # no detection elsewhere


def test_the_week_and_the_pause_persist(tmp_path: Path) -> None:
    path = tmp_path / "capacity.json"
    learner = CapacityLearner.load(path)
    for hour in range(24):
        learner.current(80.0, 50.0, 16 * GiB, MONDAY + dt.timedelta(hours=hour))
    learner.set_paused(True)
    again = CapacityLearner.load(path)
    assert again.paused is True
    assert again.model.expected(MONDAY + dt.timedelta(hours=5)) == learner.model.expected(
        MONDAY + dt.timedelta(hours=5)
    )
    (tmp_path / "broken.json").write_text("{not json")
    assert CapacityLearner.load(tmp_path / "broken.json").model.samples == [0] * SLOTS


async def test_pause_and_resume_reach_the_router(tmp_path: Path) -> None:
    spec = SimConfig(name="laptop", models=(SimModel("llama3.2:3b"),), loaded=("llama3.2:3b",))
    config = RouterConfig(host="127.0.0.1", port=0, data_dir=str(tmp_path / "r"), queue_timeout=1.0)
    with trio.fail_after(20):
        async with Router(config) as router, run_sim(spec) as sim, trio.open_nursery() as nursery:
            node = Node(
                NodeConfig(
                    router_url=router.url,
                    ollama_url=sim.url,
                    node_id="laptop",
                    host="127.0.0.1",
                    port=0,
                    data_dir=str(tmp_path / "n"),
                    learn_capacity=True,
                )
            )
            await nursery.start(node.run)
            await router.wait_nodes(1)
            assert router.fleet.nodes[0].report.capacity.mode == "learned"

            async def capacity_paused(value: bool) -> None:
                while router.fleet.nodes[0].report.capacity.paused is not value:
                    await router.state.wait_fleet_changed()

            async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
                assert (await client.post(f"{node.url}/node/pause")).json() == {"paused": True}
                await capacity_paused(True)
                refused = await client.post(
                    router.url + "/api/generate",
                    json={"model": "llama3.2:3b", "prompt": "x", "stream": False},
                )
                assert refused.status_code == 503 and "capacity paused" in refused.text
                await client.post(f"{node.url}/node/resume")
                await capacity_paused(False)
                served = await client.post(
                    router.url + "/api/generate",
                    json={"model": "llama3.2:3b", "prompt": "x", "stream": False},
                )
                assert served.status_code == 200
            assert (tmp_path / "n" / "capacity.json").exists()
            nursery.cancel_scope.cancel()
