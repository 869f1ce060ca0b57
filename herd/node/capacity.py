"""Adaptive capacity (``--learn-capacity``): how much of this machine the fleet may use now.

Laptops and desktops are people's machines first. The node learns, for each of the week's 168
hours (7 days x 24), how busy its owner usually keeps it, and combines that with what it sees
right now (CPU and memory in use, a meeting, a manual pause) into the ``Capacity`` it reports:
an availability from 0 to 1 (the scorer's availability signal), a memory ceiling the router
keeps cold loads under, and a paused flag (no new work at all).

Pure: no clock, no I/O. Callers pass local datetimes and readings; tests run synthetic weeks.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import attrs

from herd.core.models import Capacity

SLOTS = 7 * 24
ALPHA = 0.2  # weight of a new observation in a slot's moving average
MIN_AVAILABILITY = 0.05
CEILING_FLOOR = 0.25  # share of total memory always available to the fleet (unless paused)
CEILING_SPAN = 0.65  # extra share granted as availability rises to 1
BUSY_CPU = 70.0  # CPU percent that counts as "fully busy" by its owner
BUSY_MEMORY = 85.0


def slot_of(moment: dt.datetime) -> int:
    """Monday 00:00-00:59 is slot 0; Sunday 23:00-23:59 is slot 167."""
    return moment.weekday() * 24 + moment.hour


def busyness(cpu_percent: float, memory_percent: float, input_active: bool) -> float:
    """How busy the owner keeps the machine right now, 0..1."""
    cpu = min(1.0, max(0.0, cpu_percent / BUSY_CPU))
    memory = min(1.0, max(0.0, (memory_percent - 40.0) / (BUSY_MEMORY - 40.0)))
    busy = max(cpu, memory)
    return max(busy, 0.5) if input_active else busy


@attrs.define
class WeeklyModel:
    """The learned week: a moving average of busyness per hour slot."""

    busy: list[float] = attrs.field(factory=lambda: [0.0] * SLOTS)
    samples: list[int] = attrs.field(factory=lambda: [0] * SLOTS)

    def observe(self, moment: dt.datetime, busy: float) -> None:
        slot = slot_of(moment)
        if self.samples[slot] == 0:
            self.busy[slot] = busy
        else:
            self.busy[slot] += ALPHA * (busy - self.busy[slot])
        self.samples[slot] += 1

    def expected(self, moment: dt.datetime) -> float | None:
        """The usual busyness at this hour, or None if never observed."""
        slot = slot_of(moment)
        return self.busy[slot] if self.samples[slot] else None

    def to_json(self) -> str:
        return json.dumps({"busy": [round(b, 4) for b in self.busy], "samples": self.samples})

    @classmethod
    def from_json(cls, text: str) -> WeeklyModel:
        data: Any = json.loads(text)
        busy, samples = data["busy"], data["samples"]
        if len(busy) != SLOTS or len(samples) != SLOTS:
            raise ValueError(f"a weekly model has {SLOTS} slots")
        return cls(busy=[float(b) for b in busy], samples=[int(s) for s in samples])


@attrs.frozen
class Reading:
    cpu_percent: float
    memory_percent: float
    input_active: bool = False
    in_meeting: bool = False
    paused: bool = False  # the owner's manual override


def assess(
    model: WeeklyModel, moment: dt.datetime, reading: Reading, total_memory: int
) -> Capacity:
    """The capacity to report now. Also the observation to learn from (see ``observe``)."""
    now = busyness(reading.cpu_percent, reading.memory_percent, reading.input_active)
    usual = model.expected(moment)
    busy = now if usual is None else max(now, 0.5 * now + 0.5 * usual)
    paused = reading.paused or reading.in_meeting
    availability = 0.0 if paused else max(MIN_AVAILABILITY, 1.0 - busy)
    share = 0.0 if paused else CEILING_FLOOR + CEILING_SPAN * availability
    return Capacity(
        mode="learned",
        ceiling_bytes=int(total_memory * share),
        availability=round(availability, 3),
        paused=paused,
    )


@attrs.define(eq=False)
class CapacityLearner:
    """The I/O around the pure model: reads the machine, keeps the week in
    ``<data-dir>/capacity.json`` (saved every ``SAVE_EVERY`` observations and on pause/resume),
    and holds the owner's manual pause."""

    path: Any  # pathlib.Path of capacity.json
    model: WeeklyModel = attrs.field(factory=WeeklyModel)
    paused: bool = False
    observations: int = 0

    SAVE_EVERY = 60

    @classmethod
    def load(cls, path: Any) -> CapacityLearner:
        learner = cls(path=path)
        try:
            data = json.loads(path.read_text())
            learner.model = WeeklyModel.from_json(json.dumps(data["model"]))
            learner.paused = bool(data.get("paused", False))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a new machine, or an unreadable file: start learning afresh
        return learner

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"model": json.loads(self.model.to_json()), "paused": self.paused}
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(data))
        temporary.replace(self.path)

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self.save()

    def current(
        self,
        cpu_percent: float,
        memory_percent: float,
        total_memory: int,
        moment: dt.datetime,
        in_meeting: bool = False,
    ) -> Capacity:
        reading = Reading(cpu_percent, memory_percent, in_meeting=in_meeting, paused=self.paused)
        capacity = assess(self.model, moment, reading, total_memory)
        self.model.observe(moment, busyness(cpu_percent, memory_percent, False))
        self.observations += 1
        if self.observations % self.SAVE_EVERY == 0:
            self.save()
        return capacity


MEETING_PROCESSES = frozenset({"VDCAssistant", "AppleCameraAssistant"})


def in_meeting(process_names: set[str], platform: str) -> bool:
    """macOS: a camera assistant process runs while the camera is in use. Elsewhere: no
    detection (always False)."""
    return platform == "darwin" and bool(process_names & MEETING_PROCESSES)
