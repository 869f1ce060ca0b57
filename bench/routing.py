"""Routing quality: herd's scorer against round-robin, least-connections and random.

    python bench/routing.py [--seed N] [--minutes M]

Replays one fixed, seeded trace on a heterogeneous simulated fleet (``herd.sim.virtual``: the
simulator's nodes on a virtual clock, so a quarter of an hour of traffic takes seconds) once per
policy, and prints latency, time to first token, cold loads, evictions, errors and placement
spread per policy, with ratios against least-connections. Then the same trace on a second fleet
whose machines have their accelerators modelled (a gaming PC with 64 GiB of RAM and a 24 GiB
GPU, Macs with their GPU working sets, CPU-only boxes), placed by herd as it is (memory judged
where models run, spills priced) and by herd judging memory by RAM alone, as it did before it
read accelerators. Everything is in-process; nothing touches the network. The traces and the
fleets are described in docs/performance.md.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from herd.core.models import KIND_EMBED
from herd.plan.replay import POLICIES, Session, Summary, Turn, run
from herd.sim.server import SimConfig, SimModel

GiB = 2**30


def model(name: str, gib: float, decode: float, prefill: float, **extra: object) -> SimModel:
    """A model whose cold load takes 1 s plus 0.8 s per GiB (an SSD and a runner start)."""
    return SimModel(
        name=name,
        size_bytes=int(gib * GiB),
        load_seconds=round(1.0 + 0.8 * gib, 2),
        tokens_per_second=decode,
        prefill_tokens_per_second=prefill,
        context_length=8192,
        **extra,  # type: ignore[arg-type]
    )


# Decode and prefill rates at speed 1.0 (an M-series "Pro" class machine).
MODELS = {
    m.name: m
    for m in (
        model("llama3.2:3b", 2.0, 80, 1200),
        model("llama3.1:8b", 4.9, 40, 600),
        model("qwen2.5:14b", 9.0, 22, 320),
        model("qwen2.5:32b", 19.9, 10, 150),
        model("llama3.3:70b", 42.0, 5, 70),
        model("nomic-embed-text", 0.3, 0, 4000, embedding=True),
    )
}
CHAT = ("llama3.2:3b", "llama3.1:8b", "qwen2.5:14b", "qwen2.5:32b", "llama3.3:70b")
POPULARITY = (0.30, 0.35, 0.18, 0.12, 0.05)  # of chat requests, per model in CHAT


def node(
    name: str,
    gib: int,
    speed: float,
    slots: int,
    models: tuple[str, ...],
    loaded: tuple[str, ...],
    vram_gib: float | None = None,
    unified: bool = False,
) -> SimConfig:
    """A machine; ``vram_gib`` its GPU's memory (with ``unified``, the working set within its
    RAM; 0: CPU only; None: memory not split, as in the first fleet)."""
    return SimConfig(
        name=name,
        memory_bytes=gib * GiB,
        speed=speed,
        parallel=slots,
        models=tuple(MODELS[m] for m in models),
        loaded=loaded,
        vram_bytes=None if vram_gib is None else int(vram_gib * GiB),
        unified_memory=unified,
    )


ALL = tuple(MODELS)
NO_70B = tuple(m for m in ALL if m != "llama3.3:70b")
SMALL = ("llama3.2:3b", "llama3.1:8b", "qwen2.5:14b", "nomic-embed-text")
TINY = ("llama3.2:3b", "nomic-embed-text")

FLEET = (
    # Apple silicon, 192 GiB unified memory: holds anything, fast.
    node("studio", 192, 2.0, 4, ALL, ("llama3.3:70b", "qwen2.5:32b")),
    # A gaming PC's 24 GiB GPU: the fastest for what fits in its VRAM.
    node("gaming-pc", 24, 2.5, 4, NO_70B, ("llama3.1:8b",)),
    node("macbook-pro", 36, 1.0, 2, NO_70B, ("llama3.2:3b",)),
    node("mac-mini", 16, 0.6, 2, SMALL, ("llama3.2:3b",)),
    # CPU-only machines: plenty of RAM, a tenth of the speed.
    node("nuc", 32, 0.15, 2, SMALL, ()),
    node("old-laptop", 16, 0.1, 1, TINY, ()),
)


# The same machines with their accelerators: the gaming PC has 64 GiB of RAM beside its 24 GiB
# GPU (and every model on disk), the Macs' GPUs may use Metal's working set (2/3 of RAM up to
# 36 GiB, 3/4 above), the small boxes have no GPU.
GPU_FLEET = (
    node("studio", 192, 2.0, 4, ALL, ("llama3.3:70b", "qwen2.5:32b"), 144, unified=True),
    node("gaming-pc", 64, 2.5, 4, ALL, ("llama3.1:8b",), 24),
    node("macbook-pro", 36, 1.0, 2, NO_70B, ("llama3.2:3b",), 24, unified=True),
    node("mac-mini", 16, 0.6, 2, SMALL, ("llama3.2:3b",), 10.6, unified=True),
    node("nuc", 32, 0.15, 2, SMALL, (), 0),
    node("old-laptop", 16, 0.1, 1, TINY, (), 0),
)


def chat_model(rng: random.Random) -> str:
    return rng.choices(CHAT, weights=POPULARITY)[0]


def conversation(rng: random.Random, index: int, start: float) -> Session:
    """A multi-turn chat: a shared system prompt, 2-8 turns, think time between them."""
    name = chat_model(rng)
    system = rng.randrange(3)
    messages: list[dict[str, str]] = [{"role": "system", "content": f"system prompt {system}"}]
    tokens = 300
    turns = []
    for turn in range(rng.randint(2, 8)):
        asked = rng.randint(40, 400)
        messages.append({"role": "user", "content": f"c{index} question {turn}"})
        tokens += asked
        answer = rng.randint(80, 500)
        turns.append(
            Turn(
                model=name,
                prompt_tokens=tokens,
                output_tokens=answer,
                messages=tuple(messages),
                think=0.0 if turn == 0 else rng.uniform(5, 40),
            )
        )
        messages.append({"role": "assistant", "content": f"c{index} answer {turn}"})
        tokens += answer
    return Session(start, tuple(turns))


def one_shot(rng: random.Random, index: int, start: float, name: str | None = None) -> Session:
    """One chat request with a long document (summaries, extraction)."""
    name = name or chat_model(rng)
    return Session(
        start,
        (
            Turn(
                model=name,
                prompt_tokens=rng.randint(200, 3000),
                output_tokens=rng.randint(50, 400),
                messages=({"role": "user", "content": f"document {index}"},),
            ),
        ),
    )


def embedding(rng: random.Random, start: float) -> Session:
    """A batch of 8-32 chunks of ~200 tokens for a vector index."""
    batch = rng.randint(8, 32)
    return Session(
        start,
        (
            Turn(
                model="nomic-embed-text",
                prompt_tokens=batch * 200,
                output_tokens=0,
                kind=KIND_EMBED,
            ),
        ),
    )


def make_trace(seed: int, minutes: float, load: float = 1.0) -> tuple[Session, ...]:
    """The mixed trace: conversations, one-shot documents and embedding batches as Poisson
    arrivals, plus a burst every 3 minutes of 30 one-shot requests for one model in 10 s."""
    rng = random.Random(seed)
    horizon = minutes * 60
    sessions: list[Session] = []

    def arrivals(per_second: float) -> list[float]:
        times, t = [], rng.expovariate(per_second)
        while t < horizon:
            times.append(t)
            t += rng.expovariate(per_second)
        return times

    for index, t in enumerate(arrivals(load / 12)):
        sessions.append(conversation(rng, index, t))
    for index, t in enumerate(arrivals(load / 6)):
        sessions.append(one_shot(rng, index, t))
    for t in arrivals(load / 4):
        sessions.append(embedding(rng, t))
    burst_at = 90.0
    while burst_at < horizon:
        name = rng.choice(CHAT[:3])
        for index in range(30):
            sessions.append(one_shot(rng, 10_000 + index, burst_at + rng.uniform(0, 10), name))
        burst_at += 180.0
    sessions.sort(key=lambda s: s.start)
    return tuple(sessions)


def table(results: list[Summary], base: str = "least-connections") -> str:
    """One line per result, with p95 and mean ratios against the result named ``base``."""
    baseline = next(r for r in results if r.policy == base)
    head = (
        f"{'policy':<18} {'requests':>8} {'errors':>6} {'mean s':>7} {'p95 s':>7} "
        f"{'TTFT s':>7} {'TTFT p95':>8} {'cold':>5} {'evict':>5} {'spill':>5} {'cache':>6} "
        f"{'worst node':>10} {'worst conv':>10} {'p95 ratio':>9} {'mean ratio':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.policy:<18} {r.requests:>8} {r.errors:>6} {r.mean:>7.2f} {r.p95:>7.2f} "
            f"{r.ttft_mean:>7.2f} {r.ttft_p95:>8.2f} {r.cold_loads:>5} {r.evictions:>5} "
            f"{r.spilled:>5} "
            f"{r.cached_share:>6.1%} {r.worst_share:>10.1%} {r.conversation_share:>10.1%} "
            f"{baseline.p95 / r.p95:>8.2f}x {baseline.mean / r.mean:>9.2f}x"
        )
    lines.append(f"(ratios: {base}'s p95 and mean over each policy's; above 1 is better)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--load", type=float, default=1.0, help="arrival-rate multiplier")
    parser.add_argument(
        "--sweep",
        type=int,
        default=10,
        help="also compare herd and least-connections on "
        "this many more seeds at half and full load (0: skip)",
    )
    args = parser.parse_args()
    trace = make_trace(args.seed, args.minutes, args.load)
    turns = sum(len(s.turns) for s in trace)
    print(
        f"fleet: {len(FLEET)} nodes; trace: seed {args.seed}, {args.minutes:g} min, "
        f"{len(trace)} sessions, {turns} requests"
    )
    results = [run(FLEET, trace, policy, seed=args.seed) for policy in POLICIES]
    print(table(results))
    print("\nshare of requests per node:")
    for r in results:
        spread = " ".join(f"{name}={share:.0%}" for name, share in r.share.items())
        print(f"  {r.policy:<18} {spread}")
    print(f"\nGPU fleet ({len(GPU_FLEET)} nodes, accelerators modelled), the same trace:")
    placed = [
        ("herd", run(GPU_FLEET, trace, "herd", seed=args.seed)),
        ("herd, RAM only", run(GPU_FLEET, trace, "herd", seed=args.seed, ram_only=True)),
        ("least-connections", run(GPU_FLEET, trace, "least-connections", seed=args.seed)),
    ]
    print(table([attrs.evolve(r, policy=name) for name, r in placed], base="herd, RAM only"))
    print("\nshare of requests per node:")
    for name, r in placed:
        spread = " ".join(f"{node}={share:.0%}" for node, share in r.share.items())
        print(f"  {name:<18} {spread}")
    if args.sweep:
        sweep(range(args.seed, args.seed + args.sweep), args.minutes)
        sweep_gpu(range(args.seed, args.seed + args.sweep), args.minutes)


def sweep(seeds: range, minutes: float) -> None:
    """herd vs least-connections over many traces: is the first result typical?"""
    ratios, extra_errors = [], 0
    for seed in seeds:
        for load in (0.5, 1.0):
            trace = make_trace(seed, minutes, load)
            herd = run(FLEET, trace, "herd", seed=seed)
            base = run(FLEET, trace, "least-connections", seed=seed)
            ratios.append(base.p95 / herd.p95)
            extra_errors += max(0, herd.errors - base.errors)
    mean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(
        f"\nsweep: seeds {seeds.start}-{seeds.stop - 1} at load 0.5 and 1.0 ({len(ratios)} "
        f"traces): p95 vs least-connections geometric mean {mean:.2f}x, worst {min(ratios):.2f}x, "
        f"best {max(ratios):.2f}x; errors herd had beyond least-connections, summed: {extra_errors}"
    )


def sweep_gpu(seeds: range, minutes: float) -> None:
    """Spill-aware against RAM-only placement on the GPU fleet over many traces."""
    ratios, errors, ram_errors = [], 0, 0
    for seed in seeds:
        for load in (0.5, 1.0):
            trace = make_trace(seed, minutes, load)
            aware = run(GPU_FLEET, trace, "herd", seed=seed)
            blind = run(GPU_FLEET, trace, "herd", seed=seed, ram_only=True)
            ratios.append(blind.p95 / aware.p95)
            errors += aware.errors
            ram_errors += blind.errors
    mean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(
        f"\nGPU fleet sweep: seeds {seeds.start}-{seeds.stop - 1} at load 0.5 and 1.0 "
        f"({len(ratios)} traces): p95 of RAM-only placement over spill-aware, geometric mean "
        f"{mean:.2f}x, worst {min(ratios):.2f}x, best {max(ratios):.2f}x; errors, summed: "
        f"spill-aware {errors}, RAM-only {ram_errors}"
    )


if __name__ == "__main__":
    main()
