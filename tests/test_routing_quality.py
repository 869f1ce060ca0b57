"""Routing quality: conversation affinity, eviction cost, the baselines and the virtual fleet
the routing benchmark replays traces on.

The last tests replay a small seeded trace on virtual time and check herd against
least-connections; they assert on simulated seconds, which don't depend on the machine.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import openai
import pytest
import trio
import trio.testing

from herd.core.models import (
    AvailableModel,
    BackendInfo,
    FleetSnapshot,
    LoadedModel,
    MemoryInfo,
    ModelLoad,
    NodeReport,
    NodeSnapshot,
    NodeStatus,
)
from herd.core.policy.conversation import LOOKBACK, continuation_keys, prefix_keys
from herd.core.scoring import History, RouteRequest, ScoringSettings, score
from herd.core.scoring.baselines import RoundRobin, least_connections, uniform
from herd.core.scoring.engine import evictions
from herd.http.relay import RelayResult
from herd.plan.replay import Session, Turn, run
from herd.sim.server import SimConfig, SimModel
from herd.sim.virtual import VirtualNode
from herd.state.affinity import AffinityTable
from herd.state.history import LatencyHistory
from tests.conftest import in_thread, running_fleet, wait_until

GiB = 2**30
S = ScoringSettings()
M = "llama3.1:8b"


def snapshot(
    node_id: str,
    *,
    loaded: tuple[tuple[str, int], ...] = (),
    available: tuple[tuple[str, int], ...] = ((M, 5 * GiB),),
    total: int = 32 * GiB,
    free: int = 24 * GiB,
    load: dict[str, ModelLoad] | None = None,
    slots: int = 2,
) -> NodeSnapshot:
    return NodeSnapshot(
        report=NodeReport(
            node_id=node_id,
            backend=BackendInfo(url=f"http://{node_id}", healthy=True),
            memory=MemoryInfo(total_bytes=total, available_bytes=free),
            loaded_models=tuple(LoadedModel(n, size, size, 8192) for n, size in loaded),
            available_models=tuple(AvailableModel(n, size) for n, size in available),
            parallel_slots=slots,
        ),
        status=NodeStatus.ONLINE,
        last_seen=0.0,
        load=load or {},
    )


def decide(*nodes: NodeSnapshot, request: RouteRequest, now: float = 1000.0) -> list[str]:
    decision = score(request, FleetSnapshot(nodes), History(), now, S, random.Random(0))
    return [c.node_id for c in decision.ranked]


# --- conversation keys ------------------------------------------------------------------


def test_prefix_keys_name_each_prefix_and_the_next_turn_finds_the_last_prompt() -> None:
    system = {"role": "system", "content": "be brief"}
    first = [system, {"role": "user", "content": "hi"}]
    second = [*first, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}]
    keys_first, keys_second = prefix_keys(first), prefix_keys(second)
    assert keys_second[: len(keys_first)] == keys_first  # a chain: prefixes share keys
    assert len(set(keys_second)) == len(keys_second)
    earlier = continuation_keys(second, keys_second)
    assert earlier[0] == keys_second[-1]  # a repeat of the same prompt, first
    assert keys_first[-1] in earlier  # the previous turn's prompt
    # A prefix of only system messages is no conversation: many chats share it.
    assert keys_first[0] not in earlier
    other = [system, {"role": "user", "content": "something else"}]
    assert keys_first[-1] not in continuation_keys(other, prefix_keys(other))
    # Order of keys inside a message doesn't matter; content does.
    assert prefix_keys([{"content": "x", "role": "user"}]) == prefix_keys(
        [{"role": "user", "content": "x"}]
    )
    long = [{"role": "user", "content": str(i)} for i in range(20)]
    assert len(continuation_keys(long, prefix_keys(long))) == LOOKBACK


def test_affinity_table_is_bounded_and_per_model() -> None:
    table = AffinityTable(capacity=2)
    table.remember("a", "n1", M, 100)
    table.remember("b", "n2", M, 200)
    assert table.find(["x", "a"], M) is not None
    assert table.find(["a"], "other:1b") is None
    table.remember("c", "n3", M, 300)  # "b" was least recently used: dropped
    assert table.find(["b"], M) is None
    found = table.find(["c", "a"], M)
    assert found is not None and (found.node_id, found.tokens) == ("n3", 300)
    assert len(table) == 2


# --- conversation affinity in the scorer -------------------------------------------------


def test_affinity_prefers_the_node_holding_the_prefix_and_yields_to_load() -> None:
    hot = ((M, 5 * GiB),)
    a = snapshot("a", loaded=hot)
    b = snapshot("b", loaded=hot)
    turn = RouteRequest(model=M, affinity_node="b", affinity_tokens=4000)
    assert decide(a, b, request=turn)[0] == "b"
    points = score(turn, FleetSnapshot((a, b)), History(), 0.0, S, random.Random(0))
    assert points.ranked[0].breakdown["affinity"] == S.affinity_max > 0
    # A short prefix saves little: fewer points.
    short = RouteRequest(model=M, affinity_node="b", affinity_tokens=S.affinity_full_tokens // 4)
    ranked = score(short, FleetSnapshot((a, b)), History(), 0.0, S, random.Random(0)).ranked
    assert 0 < ranked[0].breakdown["affinity"] < S.affinity_max
    # The model left the node: its cache went with it, no points.
    gone = snapshot("b")
    ranked = score(turn, FleetSnapshot((a, gone)), History(), 0.0, S, random.Random(0)).ranked
    assert all(c.breakdown["affinity"] == 0 for c in ranked)
    # Affinity yields to load: a queued node loses the conversation to an idle peer.
    busy = snapshot("b", loaded=hot, load={M: ModelLoad(pending=4, in_flight=2)})
    assert decide(a, busy, request=turn)[0] == "a"


# --- eviction cost ----------------------------------------------------------------------


def test_a_cold_load_may_evict_and_pays_for_what_it_pushes_out() -> None:
    other, big = "qwen2.5:14b", "qwen2.5:32b"
    request = RouteRequest(model=M)
    # 4 GiB free, the model needs 5: the idle 14B model would be evicted.
    crowded = snapshot(
        "crowded",
        loaded=((other, 9 * GiB),),
        available=((M, 5 * GiB), (other, 9 * GiB)),
        total=16 * GiB,
        free=4 * GiB,
    )
    assert evictions(request, crowded) == (other,)
    roomy = snapshot("roomy", free=12 * GiB, total=16 * GiB)
    assert evictions(request, roomy) == ()
    # It is a candidate (the backend evicts), but the node with room wins.
    assert decide(crowded, roomy, request=request) == ["roomy", "crowded"]

    def cost(load: ModelLoad | None) -> float:
        node = snapshot(
            "n",
            loaded=((other, 9 * GiB),),
            available=((M, 5 * GiB),),
            total=16 * GiB,
            free=4 * GiB,
            load={other: load} if load else None,
        )
        ranked = score(request, FleetSnapshot((node,)), History(), 1000.0, S, random.Random(0))
        return ranked.ranked[0].breakdown["eviction"]

    idle = cost(None)
    long_ago = cost(ModelLoad(last_used=1000.0 - S.eviction_recent_s - 1))
    recent = cost(ModelLoad(last_used=990.0))
    busy = cost(ModelLoad(in_flight=1, last_used=999.0))
    assert 0 >= idle == long_ago > recent > busy >= -S.eviction_max
    # Idle models go first, then the least recently used.
    two = snapshot(
        "two",
        loaded=(("x:1b", 2 * GiB), ("y:1b", 2 * GiB), ("z:1b", 2 * GiB)),
        available=((M, 5 * GiB),),
        total=16 * GiB,
        free=1 * GiB,
        load={
            "x:1b": ModelLoad(in_flight=1, last_used=5.0),
            "y:1b": ModelLoad(last_used=50.0),
            "z:1b": ModelLoad(last_used=10.0),
        },
    )
    assert evictions(request, two) == ("z:1b", "y:1b")
    # Bigger than free memory and every loaded model together: eliminated, with the numbers.
    decision = score(
        RouteRequest(model=big),
        FleetSnapshot(
            (snapshot("tiny", available=((big, 20 * GiB),), total=16 * GiB, free=4 * GiB),)
        ),
        History(),
        0.0,
        S,
        random.Random(0),
    )
    assert decision.eliminated[0].reason == "needs 20.0 GiB free, has 4.0 GiB"
    held = snapshot(
        "held",
        loaded=((other, 9 * GiB),),
        available=((big, 20 * GiB),),
        total=16 * GiB,
        free=4 * GiB,
    )
    reason = score(
        RouteRequest(model=big), FleetSnapshot((held,)), History(), 0.0, S, random.Random(0)
    )
    assert (
        reason.eliminated[0].reason
        == "needs 20.0 GiB free, has 4.0 GiB (+9.0 GiB in loaded models)"
    )


# --- baselines --------------------------------------------------------------------------


def test_baselines_pick_only_eligible_nodes() -> None:
    a = snapshot("a", load={M: ModelLoad(in_flight=3)})
    b = snapshot("b", load={M: ModelLoad(in_flight=1)})
    missing = snapshot("c", available=())
    fleet = FleetSnapshot((a, b, missing))
    request = RouteRequest(model=M)
    rng = random.Random(0)
    rr = RoundRobin()
    assert [rr.pick(request, fleet, rng) for _ in range(4)] == ["a", "b", "a", "b"]
    assert least_connections(request, fleet, rng) == "b"
    assert {uniform(request, fleet, rng) for _ in range(50)} == {"a", "b"}
    nobody = RouteRequest(model="absent:1b")
    assert least_connections(nobody, fleet, rng) is None
    assert rr.pick(nobody, fleet, rng) is None


# --- the virtual fleet ------------------------------------------------------------------

SMALL = SimModel(
    "small:1b",
    size_bytes=6 * GiB,
    load_seconds=3.0,
    tokens_per_second=10,
    prefill_tokens_per_second=100,
)
OTHER = SimModel("other:1b", size_bytes=6 * GiB, load_seconds=3.0, tokens_per_second=10)


async def test_virtual_node_loads_evicts_and_reuses_its_prompt_cache(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = VirtualNode(SimConfig(name="v", models=(SMALL, OTHER), memory_bytes=10 * GiB))
    start = trio.current_time()
    first = await node.serve("small:1b", 200, ["k1"], 20)
    # Cold: 3 s load + 200 tokens at 100/s + 20 tokens at 10/s.
    assert first.cold and first.ttft == pytest.approx(5.0) and first.total == pytest.approx(7.0)
    again = await node.serve("small:1b", 300, ["k2", "k1"], 10)
    # Hot, and the earlier 200-token prompt is cached: only 100 tokens of prefill.
    assert not again.cold and again.cached_tokens == 200 and again.ttft == pytest.approx(1.0)
    # 9 GiB usable: loading the other model evicts the idle one (and its cache).
    await node.serve("other:1b", 0, [], 1)
    assert node.loaded() == ["other:1b"] and node.evictions == 1
    back = await node.serve("small:1b", 300, ["k3", "k2"], 1)
    assert back.cold and back.cached_tokens == 0
    assert trio.current_time() - start == pytest.approx(7 + 2 + 3.1 + 6.1)
    # A busy model isn't evicted: the load waits until it is idle.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.serve, "small:1b", 0, [], 50)  # 5 s of decoding
        await trio.testing.wait_all_tasks_blocked()
        began = trio.current_time()
        loaded = await node.serve("other:1b", 0, [], 1)
        assert loaded.cold and trio.current_time() - began == pytest.approx(5 + 3 + 0.1)
    report = node.report(trio.current_time())
    assert [m.name for m in report.loaded_models] == ["other:1b"]
    assert report.memory.available_bytes == 3 * GiB


def test_herd_beats_least_connections_on_a_small_trace() -> None:
    """Two fast nodes and two slow ones; the model is hot on one fast node. A burst, then
    conversations. herd keeps to hot, fast nodes and reuses caches; least-connections spreads
    the work over the slow ones and cold-loads everywhere."""
    chat = SimModel(
        "chat:8b",
        size_bytes=5 * GiB,
        load_seconds=5.0,
        tokens_per_second=40,
        prefill_tokens_per_second=500,
    )
    fleet = [
        SimConfig(
            name="fast-1",
            models=(chat,),
            loaded=("chat:8b",),
            speed=2.0,
            parallel=4,
            memory_bytes=64 * GiB,
        ),
        SimConfig(name="fast-2", models=(chat,), speed=2.0, parallel=4, memory_bytes=64 * GiB),
        SimConfig(name="slow-1", models=(chat,), speed=0.5, parallel=1, memory_bytes=16 * GiB),
        SimConfig(name="slow-2", models=(chat,), speed=0.5, parallel=1, memory_bytes=16 * GiB),
    ]
    rng = random.Random(3)
    trace = []
    for c in range(24):
        messages: list[dict[str, str]] = []
        turns = []
        tokens = 0
        for t in range(4):
            messages.append({"role": "user", "content": f"{c}/{t}"})
            tokens += 300
            turns.append(
                Turn(
                    "chat:8b",
                    tokens,
                    rng.randint(100, 300),
                    messages=tuple(messages),
                    think=rng.uniform(2, 10) if t else 0.0,
                )
            )
            messages.append({"role": "assistant", "content": f"{c}/{t}"})
            tokens += 200
        trace.append(Session(rng.uniform(0, 60), tuple(turns)))
    herd = run(fleet, trace, "herd", seed=3)
    baseline = run(fleet, trace, "least-connections", seed=3)
    assert herd.requests == baseline.requests == 96
    assert herd.errors <= baseline.errors
    assert herd.p95 * 1.5 < baseline.p95
    assert herd.cold_loads <= baseline.cold_loads
    assert herd.cached_share > baseline.cached_share
    # Affinity yields to load: no node takes every continuing turn.
    assert herd.conversation_share < 0.8


# --- conversation affinity through the router, with the OpenAI client --------------------


async def test_a_conversation_returns_to_the_node_holding_its_prompt(tmp_path: Path) -> None:
    model = SimModel("chat:8b", size_bytes=5 * GiB, prefill_tokens_per_second=1e6)
    specs = [
        SimConfig(name=name, models=(model,), loaded=("chat:8b",), memory_bytes=32 * GiB)
        for name in ("alpha", "beta", "gamma")
    ]
    async with running_fleet(tmp_path, specs) as fleet:
        with openai.OpenAI(
            base_url=fleet.url + "/v1", api_key="not-needed", max_retries=0
        ) as client:

            def turn(messages: list[dict[str, str]]) -> tuple[str, str]:
                raw = client.chat.completions.with_raw_response.create(
                    model="chat:8b",
                    messages=messages,  # type: ignore[arg-type]
                )
                answer = raw.parse().choices[0].message.content or ""
                return raw.headers["x-herd-node"], answer

            history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"}]
            first, answer = await in_thread(lambda: turn(history))
            for question in ("b", "c", "d"):
                history += [
                    {"role": "assistant", "content": answer},
                    {"role": "user", "content": question},
                ]
                node, answer = await in_thread(functools.partial(turn, list(history)))
                assert node == first  # every turn back to the node that holds the prompt
        # The simulated backend found the earlier prompt in its cache each time.
        assert fleet.sims[first].prompt_cache_hits == 3
        await wait_until(lambda: len(fleet.router.state.traces) == 4)
        later = list(fleet.router.state.traces)[1:]
        assert all(t.scores_breakdown and t.scores_breakdown["affinity"] > 0 for t in later)
        # A new conversation with the same system prompt is not tied to that node.
        assert not fleet.router.state.affinity.find(
            continuation_keys(history[:1], prefix_keys(history[:1])), "chat:8b"
        )


def test_history_learns_speed_per_model_and_each_models_typical_time() -> None:
    history = LatencyHistory()
    # "big" runs only the 70B model, slowly in tokens/s; that alone says nothing of its speed.
    history.record("big", "70b", 40_000.0, 8.0)
    assert history.node_speed == {"big": 1.0}
    # Two nodes run the 8B: "fast" twice the rate of "slow".
    history.record("fast", "8b", 2_000.0, 60.0)
    history.record("slow", "8b", 4_000.0, 30.0)
    history.record("big", "8b", 2_800.0, 45.0)
    assert history.node_speed["fast"] > history.node_speed["big"] > history.node_speed["slow"]
    # The 8B's typical time is normalised to speed 1.0: the median of p75 x speed.
    typical = history.model_p75_ms["8b"]
    assert 2_000.0 < typical < 4_000.0
    view = history.view()
    assert view.model_p75_ms is history.model_p75_ms  # no copy per request


def test_embeddings_teach_the_router_a_nodes_speed_too() -> None:
    """An embedding generates nothing; the speed it read its input at is what it reports."""
    chat = RelayResult(complete=True, prompt_tokens=10, completion_tokens=50, eval_seconds=2.0)
    assert chat.tokens_per_second == 25.0
    embed = RelayResult(complete=True, prompt_tokens=800, total_seconds=1.5, load_seconds=0.5)
    assert embed.tokens_per_second == 800.0
    loading = RelayResult(complete=True, prompt_tokens=8, total_seconds=0.5, load_seconds=0.5)
    assert loading.tokens_per_second is None  # all of it was the load
    assert RelayResult(complete=True).tokens_per_second is None
