"""The what-if planner (:mod:`herd.plan.planner`), its sources, API and CLI.

The main tests plan on a recorded trace: real requests (chat conversations, one-off documents,
embedding batches) sent through a real router to three simulated Ollama nodes over loopback
HTTP, on virtual time, recorded by the router in ``latency.db``. The planner then reads that
store and the router's node reports, as it does in production, and must (1) reproduce the
recording with no change, within :data:`herd.plan.planner.FIDELITY_RULE`, (2) predict a worse
p95 without the fast node and (3) a better one with a second one.

The router stamps traces with the wall clock; on virtual time the test gives its request
handler a wall clock that follows the virtual one, so recorded arrivals are spaced as they
happened.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing

from herd import cli
from herd.core.models import KIND_EMBED, KIND_IMAGE, KIND_TEXT
from herd.http import handler as handler_module
from herd.http.dashboard import plan_api
from herd.plan import planner, sources
from herd.plan.planner import (
    AddNode,
    Change,
    NodeFacts,
    Pin,
    PlanError,
    PlanInputs,
    RecordedRequest,
    RemoveNode,
    SetSlots,
    SetSubstitution,
    Unload,
)
from herd.plan.replay import ReplayAbandoned, Session, Turn, run_detailed
from herd.sim import SimConfig, SimModel
from herd.store.db import DB_NAME
from tests.conftest import Fleet, GiB, running_fleet, wait_until

CHAT8 = SimModel(
    "chat:8b",
    size_bytes=5 * GiB,
    parameter_size="8B",
    load_seconds=5.0,
    tokens_per_second=12.0,
    prefill_tokens_per_second=500.0,
)
CHAT3 = SimModel(
    "chat:3b",
    size_bytes=2 * GiB,
    parameter_size="3B",
    load_seconds=2.0,
    tokens_per_second=25.0,
    prefill_tokens_per_second=1000.0,
)
EMBED = SimModel(
    "embed:v1",
    size_bytes=GiB // 2,
    embedding=True,
    family="nomic-bert",
    load_seconds=0.5,
    prefill_tokens_per_second=4000.0,
)
# The fast node does most of the work; the slow one has room for the small model only.
SPECS = [
    SimConfig(
        name="fast",
        models=(CHAT8, CHAT3, EMBED),
        loaded=("chat:8b", "chat:3b"),
        memory_bytes=32 * GiB,
        speed=3.0,
        parallel=4,
    ),
    SimConfig(
        name="mid",
        models=(CHAT8, CHAT3, EMBED),
        loaded=("chat:3b",),
        memory_bytes=16 * GiB,
        speed=1.0,
        parallel=2,
    ),
    SimConfig(
        name="slow",
        models=(CHAT3, EMBED),
        loaded=("chat:3b",),
        memory_bytes=8 * GiB,
        speed=0.5,
        parallel=2,
    ),
]
MINUTES = 10
SEED = 4


# --- a recorded trace -------------------------------------------------------------------------


@attrs.frozen
class Recording:
    data_dir: Path
    nodes: tuple[NodeFacts, ...]
    status: dict[str, Any]  # /fleet/status at the end
    now: float  # wall clock (as the router saw it) right after the last request
    requests: int

    def inputs(self, hours: float = 1.0) -> PlanInputs:
        requests, in_window = sources.read_window(
            self.data_dir / DB_NAME, self.now - hours * 3600, planner.MAX_REQUESTS
        )
        return PlanInputs(requests=requests, nodes=self.nodes, hours=hours, in_window=in_window)


def words(count: int) -> str:
    return " ".join(["w"] * count)


async def workload(url: str, seed: int, minutes: float) -> int:
    """Conversations (2-5 turns, 3-15 s to think), one-off documents and embedding batches,
    Poisson arrivals. Returns how many requests were answered (all must be)."""
    rng = random.Random(seed)
    plans: list[tuple[float, list[tuple[str, int, int, float]], bool]] = []
    horizon = minutes * 60

    def arrivals(every: float) -> Iterator[float]:
        t = rng.expovariate(1 / every)
        while t < horizon:
            yield t
            t += rng.expovariate(1 / every)

    for t in arrivals(8):
        model = rng.choice(["chat:8b", "chat:8b", "chat:3b"])
        turns = [
            (model, rng.randint(100, 600), rng.randint(20, 80), rng.uniform(3, 15) if i else 0.0)
            for i in range(rng.randint(2, 5))
        ]
        plans.append((t, turns, False))
    for t in arrivals(4):
        model = rng.choice(["chat:8b", "chat:3b"])
        plans.append((t, [(model, rng.randint(200, 1500), rng.randint(15, 120), 0.0)], False))
    for t in arrivals(20):
        plans.append((t, [("embed:v1", rng.randint(200, 2000), 0, 0.0)], True))
    answered = 0
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=url, timeout=None, trust_env=False, limits=limits
    ) as client:
        start = trio.current_time()

        async def session(index: int, at: float, turns: list[Any], embed: bool) -> None:
            nonlocal answered
            await trio.sleep_until(start + at)
            messages: list[dict[str, str]] = []
            for number, (model, asked, answer, think) in enumerate(turns):
                await trio.sleep(think)
                if embed:
                    body = {"model": model, "input": words(asked)}
                    response = await client.post("/api/embed", json=body)
                else:
                    text = f"s{index} t{number} " + words(asked)
                    messages.append({"role": "user", "content": text})
                    options = {"num_predict": answer}
                    body = {"model": model, "messages": messages, "options": options}
                    response = await client.post("/api/chat", json=body)
                    messages.append({"role": "assistant", "content": words(answer)})
                assert response.status_code == 200, response.text
                answered += 1

        async with trio.open_nursery() as nursery:
            for index, (at, turns, embed) in enumerate(plans):
                nursery.start_soon(session, index, at, turns, embed)
    return answered


async def record(data_dir: Path, epoch: float) -> Recording:
    async with running_fleet(data_dir, SPECS) as fleet:
        with trio.fail_after(3600):
            answered = await workload(fleet.url, SEED, MINUTES)
        now = epoch + trio.current_time()
        await settle(fleet)
        async with httpx.AsyncClient(base_url=fleet.url, trust_env=False) as client:
            status = (await client.get("/fleet/status")).json()
        nodes = sources.nodes_from_registry(fleet.router.state.registry.records())
    return Recording(data_dir, nodes, status, now, answered)


async def settle(fleet: Fleet) -> None:
    """Wait until the trace writer has written every trace (a flush is bounded by its own
    timeout, which virtual time can run out while the writer's thread works)."""
    store = fleet.router.store
    assert store is not None
    with trio.fail_after(600):
        while store.written + store.failed < store.submitted:
            await store.flush()
    assert store.failed == 0 and store.dropped == 0


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    data_dir = tmp_path_factory.mktemp("recorded")
    epoch = time.time()
    # The handler's wall clock, on virtual time: arrivals are recorded as they were spaced.
    clock = types.SimpleNamespace(time=lambda: epoch + trio.current_time())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(handler_module, "time", clock)
        result = trio.run(
            record, data_dir, epoch, clock=trio.testing.MockClock(autojump_threshold=0)
        )
    return result


@pytest.fixture(scope="module")
def plan_result(recording: Recording) -> planner.Plan:
    return planner.plan(
        recording.inputs(),
        [
            [RemoveNode("fast")],
            [AddNode(copy_of="fast")],
            [AddNode(preset="rtx-4090"), Pin("rtx-4090", "chat:8b")],
        ],
    )


def test_the_recording_is_real_traffic(recording: Recording, plan_result: planner.Plan) -> None:
    assert recording.requests > 300
    assert plan_result.replayed == recording.requests
    assert plan_result.recorded.completed == recording.requests
    # Conversations were recognised from the affinity points, not only one-off requests.
    assert plan_result.conversations > 40
    assert plan_result.sessions < recording.requests * 0.8
    assert {n.node_id for n in recording.nodes} == {"fast", "mid", "slow"}


def test_no_change_matches_the_recording_within_the_stated_tolerance(
    plan_result: planner.Plan,
) -> None:
    recorded, replayed = plan_result.recorded, plan_result.baseline.figures
    assert plan_result.fidelity.matches, plan_result.fidelity.as_dict()
    for name in ("latency_p50", "latency_p95", "ttft_p50", "ttft_p95"):
        a, b = getattr(recorded, name), getattr(replayed, name)
        # The rule, spelled out: within 25% of the recorded figure, or within 0.25 s.
        assert abs(b - a) <= max(0.25 * a, 0.25), (name, a, b)
    assert replayed.requests == recorded.requests
    assert replayed.errors == recorded.errors == 0
    # Where the work went is reproduced too: the fast node took most of it, in both.
    assert replayed.per_node["fast"] > 0.7 * replayed.completed
    assert abs(replayed.per_node["fast"] - recorded.per_node["fast"]) < 0.1 * recorded.completed


def test_removing_the_fast_node_predicts_a_worse_p95(plan_result: planner.Plan) -> None:
    base, without = plan_result.baseline.figures, plan_result.scenarios[0].figures
    assert plan_result.scenarios[0].label == "remove fast"
    assert without.latency_p95 > 1.5 * base.latency_p95
    assert without.ttft_p95 > base.ttft_p95
    assert "fast" not in without.per_node


def test_adding_a_node_predicts_a_better_p95(plan_result: planner.Plan) -> None:
    base = plan_result.baseline.figures
    copy, gpu = plan_result.scenarios[1].figures, plan_result.scenarios[2].figures
    assert plan_result.scenarios[1].label == "add a copy of fast"
    assert copy.latency_p95 < 0.95 * base.latency_p95
    assert copy.per_node.get("fast-copy", 0) > 0
    # A GPU box (speeds from the preset's hardware) with the busy model loaded on it.
    assert (
        plan_result.scenarios[2].label == "add a RTX 4090 box (24 GB VRAM); pin chat:8b on rtx-4090"
    )
    assert gpu.latency_p95 < 0.95 * base.latency_p95
    assert gpu.per_node.get("rtx-4090", 0) > 0


def test_speeds_are_learned_from_the_recording(recording: Recording) -> None:
    build = planner.build_trace(recording.inputs().requests)
    speeds = planner.learn_speeds(build, recording.nodes)
    fast = speeds.learned[("fast", "chat:8b")]
    # 12 tokens/s x speed 3 in the simulator (which doesn't slow concurrent streams; the
    # virtual node does, and the learned single-stream rate makes up for it).
    assert fast.decode is not None and 36 <= fast.decode <= 36 * 1.6
    assert fast.prefill is not None and 0.8 * 1500 <= fast.prefill <= 1.2 * 1500
    assert speeds.node_speed["fast"] > speeds.node_speed["slow"]
    # mid never ran chat:8b in the window: its speed there is estimated from the fleet's.
    estimated = speeds.speed("mid", "chat:8b", 5 * GiB)
    assert estimated.source in ("estimated", "measured")


def test_the_cli_plans_on_the_store_and_a_saved_fleet(
    recording: Recording, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet_file = tmp_path / "fleet.json"
    fleet_file.write_text(json.dumps(recording.status))
    argv = ["plan", "--data-dir", str(recording.data_dir), "--fleet", str(fleet_file)]
    assert cli.main([*argv, "--remove-node", "fast", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["window"]["requests_replayed"] == recording.requests
    assert shown["scenarios"][0]["changes"] == [{"kind": "remove-node", "value": "fast"}]
    base = shown["baseline"]["figures"]["latency_p95"]
    assert shown["scenarios"][0]["figures"]["latency_p95"] > 1.5 * base
    assert shown["fidelity"]["matches"] is True
    # The table for a terminal, with the limits stated.
    assert cli.main([*argv, "--add-node", "copy:fast", "--slots", "mid=4"]) == 0
    text = capsys.readouterr().out
    assert "what if 1: add a copy of fast; 4 slots on mid" in text
    assert "latency p95 s" in text and "no change" in text
    assert "What the model of a node leaves out" in text
    # A bad change is one line and exit status 2, naming what was wrong.
    assert cli.main([*argv, "--pin", "mid:nope:1b"]) == 2
    assert "no node has 'nope:1b'" in capsys.readouterr().err


# --- the trace --------------------------------------------------------------------------------


def req(arrival: float, **fields: Any) -> RecordedRequest:
    defaults: dict[str, Any] = {
        "model": "m:1",
        "node_id": "a",
        "latency": 2.0,
        "ttft": 0.2,
        "prompt_tokens": 100,
        "completion_tokens": 50,
        "thermal": 50.0,
    }
    return RecordedRequest(arrival=arrival, **{**defaults, **fields})


def test_conversations_are_recognised_from_affinity_and_growing_prompts() -> None:
    requests = [
        req(0.0, prompt_tokens=100),  # a conversation starts
        req(1.0, prompt_tokens=900),  # a one-off document on the same node
        req(10.0, prompt_tokens=250, affinity=5.0),  # turn 2: holds 100 + 50 answered
        req(11.0, prompt_tokens=1200),  # another one-off (the next prompt can't hold it)
        req(20.0, prompt_tokens=400, affinity=7.5),  # turn 3
        req(21.0, kind=KIND_IMAGE, model="flux"),  # not replayed
        req(22.0, kind=KIND_EMBED, model="e:1", prompt_tokens=None, completion_tokens=None),
        req(23.0, status="failed", prompt_tokens=None, completion_tokens=None, node_id=None),
    ]
    build = planner.build_trace(requests)
    assert build.skipped == {"image requests (not replayed)": 1}
    assert len(build.requests) == 7
    conversation = next(s for s in build.sessions if len(s.turns) == 3)
    assert conversation.start == 0.0
    assert [t.prompt_tokens for t in conversation.turns] == [100, 250, 400]
    # Each turn is sent the recorded think time after the previous answer (2 s each).
    assert [t.think for t in conversation.turns] == [0.0, 8.0, 8.0]
    assert [m["role"] for m in conversation.turns[2].messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert build.conversations == 1
    assert len(build.sessions) == 5
    # Cache estimates for the prefill rate: the previous turn's prompt.
    assert build.cached == {2: 100, 4: 250}
    # The link is a guess: of the requests that could have come before, the latest wins.
    guess = planner.build_trace([*requests[:3], req(11.0, prompt_tokens=120), requests[4]])
    assert sorted(len(s.turns) for s in guess.sessions) == [1, 2, 2]
    # Missing token counts are the model's median; an embedding has no output.
    failed = next(s for s in build.sessions if s.start == 23.0).turns[0]
    assert failed.prompt_tokens == 400 and failed.output_tokens == 50
    embed = next(s for s in build.sessions if s.start == 22.0).turns[0]
    assert embed.kind == KIND_EMBED and embed.output_tokens == 0 and not embed.messages


def test_a_substituted_request_is_replayed_for_the_model_asked() -> None:
    request = req(0.0, model="small:1b", original_model="big:70b", substitution="vram")
    assert planner.asked_model(request) == "big:70b"
    fallback = req(0.0, model="b:1", original_model="a:1", substitution="fallback_models")
    assert planner.asked_model(fallback) == "b:1"  # the client named it; the replay can't


def test_trace_rows_are_read_with_their_breakdown(tmp_path: Path) -> None:
    from herd.core.traces import TraceRecord
    from herd.store import db

    path = tmp_path / DB_NAME
    db.initialise(path)
    connection = db.connect(path)
    rows = [
        TraceRecord(
            request_id=f"r{i}",
            model="m:1",
            original_model="m:1",
            node_id="a",
            score=60.0,
            scores_breakdown={"thermal": 50.0 if i else 12.5, "affinity": 2.5 * i},
            status="completed",
            latency_ms=1500.0,
            time_to_first_token_ms=300.0,
            prompt_tokens=10,
            completion_tokens=20,
            retry_count=0,
            fallback_used=False,
            excluded_nodes=(),
            original_format="ollama",
            kind=KIND_TEXT,
            error_message=None,
            timestamp=1000.0 + i,
            tags=("app",),
        )
        for i in range(5)
    ]
    db.write_traces(connection, rows)
    connection.close()
    requests, in_window = sources.read_window(path, 1001.0, 2)
    assert in_window == 4
    assert [r.arrival for r in requests] == [1003.0, 1004.0]  # the most recent, oldest first
    assert requests[0].affinity == 7.5 and requests[0].thermal == 50.0
    assert requests[0].latency == 1.5 and requests[0].ttft == 0.3 and requests[0].tags == ("app",)
    first, _ = sources.read_window(path, 0.0, 1)
    assert first[0].arrival == 1004.0
    cold, _ = sources.read_window(path, 0.0, 10)
    assert cold[0].thermal == 12.5
    with pytest.raises(PlanError, match="no trace database"):
        sources.read_window(tmp_path / "nothing.db", 0.0, 10)


# --- speeds -----------------------------------------------------------------------------------


def test_active_streams_is_the_mean_overlap() -> None:
    windows = [(0.0, 10.0), (5.0, 15.0), (20.0, 21.0), (0.0, 10.0)]
    active = planner._active_streams(windows)
    assert active[0] == pytest.approx(2.5)  # itself, the twin for 10 s, the next for 5
    assert active[1] == pytest.approx(2.0)
    assert active[2] == 1.0
    assert planner._active_streams([(3.0, 3.0)]) == [1.0]


def test_speeds_come_from_decode_prefill_and_cold_loads() -> None:
    # Alone on the node: 99 tokens after the first in 3.3 s = 30 tokens/s; 600 prompt tokens
    # read in 1 s (TTFT 1 s + the first token); one cold request took 6 s more to start.
    nodes = (
        NodeFacts("a", 32 * GiB, 2, (planner.ModelFacts("m:1", 4 * GiB),), ("m:1",)),
        NodeFacts("b", 16 * GiB, 2, (planner.ModelFacts("m:1", 4 * GiB),)),
    )
    first = 1 / 30
    requests = [
        req(
            100.0 * i,
            latency=1 + first + 3.3,
            ttft=1 + first,
            prompt_tokens=600,
            completion_tokens=100,
        )
        for i in range(5)
    ]
    requests.append(
        req(
            600.0,
            latency=7 + first + 3.3,
            ttft=7 + first,
            prompt_tokens=600,
            completion_tokens=100,
            thermal=40.0,
        )
    )
    requests.append(
        req(
            700.0,
            node_id="b",
            latency=1 + 2 / 15 + 6.6,
            ttft=1 + 2 / 15,
            prompt_tokens=300,
            completion_tokens=100,
        )
    )
    build = planner.build_trace(requests)
    speeds = planner.learn_speeds(build, nodes)
    a = speeds.learned[("a", "m:1")]
    assert a.decode == pytest.approx(30.0)
    assert a.prefill == pytest.approx(600.0)
    assert a.load_seconds == pytest.approx(6.0)
    assert a.samples == 6
    b = speeds.speed("b", "m:1", 4 * GiB)
    assert b.decode == pytest.approx(15.0) and b.source == "measured"
    assert b.load_seconds == pytest.approx(4 * GiB / (4 * GiB / 6.0))  # a's load rate
    # A model nobody ran: the fleet's speed per byte, scaled by the node's speed.
    unseen = speeds.speed("b", "big:1", 16 * GiB)
    assert unseen.source == "estimated"
    assert unseen.decode == pytest.approx(speeds.decode_bytes * speeds.node_speed["b"] / (16 * GiB))
    assert speeds.node_speed["a"] > 1.0 > speeds.node_speed["b"]


def test_overlapping_streams_are_corrected_for_contention() -> None:
    from herd.sim.costs import CONTENTION

    nodes = (NodeFacts("a", 32 * GiB, 4, (planner.ModelFacts("m:1", 4 * GiB),), ("m:1",)),)
    # Two requests decoding side by side for their whole lives at 20 tokens/s each.
    requests = [req(0.0, latency=5.05, ttft=0.05, prompt_tokens=10, completion_tokens=101)] * 2
    speeds = planner.learn_speeds(planner.build_trace(requests), nodes)
    decode = speeds.learned[("a", "m:1")].decode
    assert decode == pytest.approx(20.0 * (1 + CONTENTION))


# --- changes ----------------------------------------------------------------------------------


def test_changes_parse_from_their_cli_spelling() -> None:
    parse = planner.parse_change
    assert parse("add-node", "rtx-4090") == AddNode(preset="rtx-4090")
    assert parse("add-node", "copy:studio") == AddNode(copy_of="studio")
    assert parse("remove-node", "mini") == RemoveNode("mini")
    assert parse("pin", "studio:llama3.1:8b") == Pin("studio", "llama3.1:8b")
    assert parse("pin", "studio:llama3") == Pin("studio", "llama3:latest")
    assert parse("unload", "mini:qwen:7b") == Unload("mini", "qwen:7b")
    assert parse("slots", "mini=2") == SetSlots("mini", 2)
    assert parse("slots", "*=8") == SetSlots("*", 8)
    assert parse("set", "slots=3") == SetSlots("*", 3)
    assert parse("set", "vram_fallback=true") == SetSubstitution(True)
    assert parse("set", "vram_fallback=off") == SetSubstitution(False)
    for change in (
        AddNode(preset="cpu-64"),
        AddNode(copy_of="x"),
        Pin("a", "b:1"),
        SetSlots("*", 2),
    ):
        assert planner.change_from_json(planner.change_as_json(change)) == change
    assert planner.change_from_json({"kind": "set", "value": "vram_fallback=true"}) == (
        SetSubstitution(True)
    )
    bad = {
        ("add-node", "gpu"): "unknown preset 'gpu'; presets are mac-mini-16",
        ("add-node", "copy:"): "needs a node name",
        ("pin", "studio"): "pin takes NODE:MODEL",
        ("unload", ":m:1"): "unload takes NODE:MODEL",
        ("slots", "mini=0"): "slots must be between 1 and 64, got 0",
        ("slots", "mini=x"): "slots must be a whole number, got 'x'",
        ("set", "vram_fallback=maybe"): "vram_fallback must be true or false, got 'maybe'",
        ("set", "auto_pull=true"): "unknown setting 'auto_pull'",
        ("set", "slots"): "set takes NAME=VALUE",
        ("drain", "x"): "unknown change 'drain'",
    }
    for (kind, value), message in bad.items():
        with pytest.raises(PlanError, match=message.replace("*", r"\*")):
            parse(kind, value)
    with pytest.raises(PlanError, match="a change is"):
        planner.change_from_json({"kind": "pin"})


def small_fleet() -> tuple[planner.PlannedFleet, planner.Speeds]:
    nodes = (
        NodeFacts(
            "big",
            64 * GiB,
            4,
            (planner.ModelFacts("huge:70b", 40 * GiB), planner.ModelFacts("m:8b", 5 * GiB)),
            ("huge:70b",),
        ),
        NodeFacts("mini", 16 * GiB, 2, (planner.ModelFacts("m:8b", 5 * GiB),), ("m:8b",)),
    )
    speeds = planner.learn_speeds(planner.build_trace([]), nodes)
    return planner.build_fleet(nodes, speeds, False), speeds


def test_changes_apply_to_the_fleet_in_order() -> None:
    fleet, speeds = small_fleet()
    apply = planner.apply_changes
    gpu = apply(fleet, [AddNode(preset="rtx-4090")], speeds).node("rtx-4090")
    assert gpu is not None and gpu.loaded == () and gpu.slots == 4
    assert [m.facts.name for m in gpu.models] == ["m:8b"]  # 40 GiB doesn't fit in 24
    assert gpu.models[0].speed.source == "preset"
    copies = apply(fleet, [AddNode(copy_of="mini"), AddNode(copy_of="mini")], speeds)
    assert [n.node_id for n in copies.nodes] == ["big", "mini", "mini-copy", "mini-copy-2"]
    assert copies.nodes[2].models == fleet.nodes[1].models
    assert [n.node_id for n in apply(fleet, [RemoveNode("big")], speeds).nodes] == ["mini"]
    # Pinning puts the model there (a speed estimated for that node) and loads it, pushing
    # out what no longer fits; unloading takes it off the node.
    pinned = apply(fleet, [Pin("big", "m:8b")], speeds).node("big")
    assert pinned is not None and pinned.loaded == ("m:8b", "huge:70b")
    crowded = apply(fleet, [SetSlots("*", 1), Unload("big", "huge:70b")], speeds)
    assert crowded.node("big").loaded == () and [n.slots for n in crowded.nodes] == [1, 1]  # type: ignore[union-attr]
    assert apply(fleet, [SetSubstitution(True)], speeds).substitution is True
    errors: dict[Change, str] = {
        RemoveNode("gone"): "remove gone: no node 'gone' \\(nodes: big, mini\\)",
        Pin("mini", "huge:70b"): "huge:70b needs 40.0 GiB, mini has 14.4 GiB for models",
        Pin("mini", "other:1b"): "no node has 'other:1b' \\(models: huge:70b, m:8b\\)",
        Unload("mini", "huge:70b"): "unload huge:70b from mini: mini has m:8b",
        AddNode(copy_of="nobody"): "add a copy of nobody: no node 'nobody'",
    }
    for change, message in errors.items():
        with pytest.raises(PlanError, match=message):
            apply(fleet, [change], speeds)
    with pytest.raises(PlanError, match="at most 16 changes"):
        apply(fleet, [SetSlots("*", 2)] * 17, speeds)


def test_a_plan_with_no_nodes_or_no_traffic_says_so() -> None:
    with pytest.raises(PlanError, match="the fleet has no nodes"):
        planner.plan(PlanInputs((), (), 1.0, 0), [])
    nodes = (NodeFacts("a", 16 * GiB, 2, (planner.ModelFacts("m:1", GiB),), ("m:1",)),)
    empty = planner.plan(PlanInputs((), nodes, 1.0, 0), [[RemoveNode("a")]])
    assert empty.replayed == 0 and empty.recorded.requests == 0
    assert math.isnan(empty.baseline.figures.latency_p95)
    assert empty.baseline.figures.as_dict()["latency_p95"] is None
    assert "nothing to replay" in " ".join(empty.notes)
    assert empty.fidelity.matches  # nothing against nothing


def test_the_plan_notes_what_it_cannot_replay() -> None:
    nodes = (
        NodeFacts("a", 16 * GiB, 2, (planner.ModelFacts("m:1", GiB),), ("m:1",)),
        NodeFacts("b", 16 * GiB, 2, (planner.ModelFacts("m:1", GiB),), online=False),
    )
    requests = (req(0.0), req(5.0, node_id="gone"), req(9.0, model="lost:1"))
    result = planner.plan(PlanInputs(requests, nodes, 1.0, 3), [])
    notes = " | ".join(result.notes)
    assert "gone served 1 requests in the window but the router has no report for it" in notes
    assert "b is offline now" in notes
    assert "no node has lost:1 now: its 1 requests fail in every replay" in notes
    assert result.baseline.figures.errors == 1
    assert result.baseline.figures.error_reasons == {"no node has lost:1": 1}


# --- the replay's planner options -------------------------------------------------------------


def test_a_model_no_node_has_fails_at_once() -> None:
    fleet = [SimConfig(name="a", models=(CHAT3,), loaded=("chat:3b",))]
    trace = [Session(10.0, (Turn("nope:1b", 10, 10),))]
    replayed = run_detailed(fleet, trace, "herd")
    (outcome,) = replayed.outcomes
    assert outcome.error == "no node has nope:1b" and outcome.latency == 0.0


def test_substitution_serves_a_loaded_model_of_the_same_kind() -> None:
    cold = attrs.evolve(CHAT8, load_seconds=30.0)
    fleet = [SimConfig(name="a", models=(cold, CHAT3), loaded=("chat:3b",), memory_bytes=32 * GiB)]
    trace = [Session(1.0, (Turn("chat:8b", 100, 10),))]
    off = run_detailed(fleet, trace, "herd", keep_alive=math.inf)
    on = run_detailed(fleet, trace, "herd", keep_alive=math.inf, substitution=True)
    assert off.outcomes[0].cold and off.outcomes[0].served_model is None
    assert not on.outcomes[0].cold and on.outcomes[0].served_model == "chat:3b"
    assert on.outcomes[0].latency < 30.0 < off.outcomes[0].latency


def test_a_replay_can_be_abandoned() -> None:
    fleet = [SimConfig(name="a", models=(CHAT3,), loaded=("chat:3b",))]
    trace = [Session(float(i), (Turn("chat:3b", 10, 10),)) for i in range(10)]
    calls = []

    def abandon() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(ReplayAbandoned, match="stopped after 3 requests"):
        run_detailed(fleet, trace, "herd", abandon=abandon)
    nodes = (NodeFacts("a", 16 * GiB, 2, (planner.ModelFacts("m:1", GiB),), ("m:1",)),)
    with pytest.raises(planner.PlanAbandoned):
        planner.plan(PlanInputs((req(0.0),), nodes, 1.0, 1), [], abandon=lambda: True)


# --- the API ----------------------------------------------------------------------------------


@pytest.fixture
async def small_router(tmp_path: Path) -> AsyncIterator[tuple[Fleet, httpx.AsyncClient]]:
    specs = [SPECS[0], SPECS[2]]
    async with (
        running_fleet(tmp_path, specs) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=30, trust_env=False) as client,
    ):
        for index in range(6):
            body = {
                "model": "chat:3b",
                "messages": [{"role": "user", "content": f"q{index}"}],
                "options": {"num_predict": 2},
                "stream": False,
            }
            assert (await client.post("/api/chat", json=body)).status_code == 200
        # A trace is recorded just after its answer's last byte has gone out.
        await wait_until(lambda: len(fleet.router.state.traces) == 6)
        yield fleet, client


async def test_the_api_plans_on_the_routers_own_traffic(
    small_router: tuple[Fleet, httpx.AsyncClient],
) -> None:
    _, client = small_router
    options = (await client.get("/dashboard/api/plan/options")).json()
    assert [n["node_id"] for n in options["nodes"]] == ["fast", "slow"]
    assert {"name": "chat:3b", "size_bytes": 2 * GiB, "loaded": True} in options["nodes"][0][
        "models"
    ]
    assert "rtx-4090" in [p["name"] for p in options["presets"]]
    assert options["models"] == ["chat:3b", "chat:8b", "embed:v1"]
    assert options["limits"]["max_requests"] == plan_api.MAX_REQUESTS
    assert any("thermal throttling" in text for text in options["model_limits"])
    body = {"hours": 1, "changes": [{"kind": "remove-node", "value": "fast"}]}
    answer = await client.post("/dashboard/api/plan", json=body)
    assert answer.status_code == 200, answer.text
    plan = answer.json()
    assert plan["window"]["requests_replayed"] == 6
    assert plan["recorded"]["completed"] == plan["baseline"]["figures"]["completed"] == 6
    assert plan["scenarios"][0]["label"] == "remove fast"
    assert [n["node_id"] for n in plan["scenarios"][0]["fleet"]] == ["slow"]
    assert plan["scenarios"][0]["figures"]["per_node"] == {"slow": 6}
    assert plan["limits"] and plan["fidelity"]["rule"] == planner.FIDELITY_RULE
    several = {"hours": 24, "scenarios": [[], [{"kind": "set", "value": "slots=1"}]]}
    answer = await client.post("/dashboard/api/plan", json=several)
    assert [s["label"] for s in answer.json()["scenarios"]] == ["no change", "1 slot on every node"]


async def test_the_api_refuses_bad_plans_naming_the_value(
    small_router: tuple[Fleet, httpx.AsyncClient],
) -> None:
    _, client = small_router
    bad = [
        ({"hours": 0}, "'hours' must be more than 0 and at most 168, got 0"),
        ({"hours": "1"}, "'hours' must be a number of hours, got '1'"),
        ({"changes": [{"kind": "pin", "value": "fast:nope:1b"}]}, "no node has 'nope:1b'"),
        ({"changes": [{"kind": "add-node", "value": "gpu"}]}, "unknown preset 'gpu'"),
        ({"changes": [{"kind": "remove-node", "value": "x"}]}, "no node 'x'"),
        ({"changes": "x"}, "a list of lists of changes"),
        ({"scenarios": [[]] * 5}, "at most 4 scenarios"),
        ({"changes": [], "scenarios": []}, "not both"),
        ({"hour": 1}, "unknown field\\(s\\) hour"),
    ]
    for body, message in bad:
        answer = await client.post("/dashboard/api/plan", json=body)
        assert answer.status_code == 400, (body, answer.text)
        assert message.replace("\\", "") in answer.json()["error"], answer.text


async def test_one_plan_at_a_time_and_within_its_budget(
    small_router: tuple[Fleet, httpx.AsyncClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real time: the plan's worker thread is held inside its store read by an event."""
    _, client = small_router
    inside, release = threading.Event(), threading.Event()
    read = sources.read_window
    ended: list[str] = []
    plan = planner.plan

    def held(*args: Any) -> Any:
        inside.set()
        release.wait(20)
        return read(*args)

    def recorded_plan(*args: Any, **kwargs: Any) -> planner.Plan:
        try:
            return plan(*args, **kwargs)
        except planner.PlanAbandoned:
            ended.append("abandoned")
            raise

    monkeypatch.setattr(sources, "read_window", held)
    monkeypatch.setattr(planner, "plan", recorded_plan)
    monkeypatch.setattr(plan_api, "WAIT_SECONDS", 0.0)
    answers: list[httpx.Response] = []

    async def first() -> None:
        answers.append(await client.post("/dashboard/api/plan", json={"hours": 1}))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        assert await trio.to_thread.run_sync(inside.wait, 20)
        busy = await client.post("/dashboard/api/plan", json={"hours": 1})
        release.set()
    assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
    assert "a plan is already running" in busy.json()["error"]
    assert answers[0].status_code == 200
    # A client that leaves stops its plan; the next plan waits for it to stop, then runs.
    inside.clear()
    release.clear()
    monkeypatch.setattr(plan_api, "WAIT_SECONDS", 20.0)
    stopped = threading.Event()  # the router has seen the client leave

    class WatchedStop(threading.Event):
        def set(self) -> None:
            super().set()
            stopped.set()

    monkeypatch.setattr(plan_api, "threading", types.SimpleNamespace(Event=WatchedStop))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        assert await trio.to_thread.run_sync(inside.wait, 20)
        nursery.cancel_scope.cancel()
    assert await trio.to_thread.run_sync(stopped.wait, 20)  # only then may the plan go on
    monkeypatch.setattr(sources, "read_window", read)
    release.set()
    again = await client.post("/dashboard/api/plan", json={"hours": 1})
    assert again.status_code == 200, again.text
    assert ended == ["abandoned"]
    # Over budget: stopped, and a 503 that says so.
    monkeypatch.setattr(plan_api, "BUDGET_SECONDS", -1.0)
    over = await client.post("/dashboard/api/plan", json={"hours": 1})
    assert over.status_code == 503
    assert "took more than its budget of -1 s" in over.json()["error"]


def test_the_docs_name_every_preset_and_the_rule() -> None:
    text = (Path(__file__).parent.parent / "docs" / "planner.md").read_text()
    for preset in planner.PRESETS.values():
        assert f"`{preset.name}` | {preset.title} |" in text
        assert f"{preset.bandwidth / 1e9:g} GB/s" in text and f"| {preset.slots} |" in text
    assert "within 25% or 0.25 s" in text and planner.FIDELITY_SHARE == 0.25
    assert f"{plan_api.MAX_REQUESTS:,}" in text and f"{plan_api.BUDGET_SECONDS:g} seconds" in text


async def test_the_cli_reads_a_live_routers_reports(
    small_router: tuple[Fleet, httpx.AsyncClient],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fleet, client = small_router
    assert fleet.router.store is not None
    await fleet.router.store.flush()
    argv = ["plan", "--data-dir", str(tmp_path), "--router", fleet.url, "--hours", "1", "--json"]
    assert await trio.to_thread.run_sync(cli.main, [*argv, "--add-node", "mac-mini-16"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["window"]["requests_replayed"] == 6
    assert [n["node_id"] for n in shown["scenarios"][0]["fleet"]] == ["fast", "slow", "mac-mini-16"]
    # The Planner tab has its own address, as the other tabs do.
    moved = await client.get("/dashboard/planner")
    assert moved.status_code == 302 and moved.headers["location"].endswith("/dashboard#planner")
