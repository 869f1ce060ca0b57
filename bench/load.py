"""Load and soak: many concurrent streams through the router, then long mixed traffic.

    python bench/load.py                      # 1,000 concurrent streams
    python bench/load.py --streams 2000       # more
    python bench/load.py --soak-minutes 30    # then 30 minutes of mixed traffic

Three kinds of process on 127.0.0.1: the router (``herd``), one process with four simulated
Ollama nodes and their node agents, and this load generator. Streams come from four loopback
addresses (127.0.0.1-4), as four clients would, so the router's per-client cap (512 requests in
progress) is not what is measured.

The streams part holds ``--streams`` streaming chats open at once (each 20 tokens at 4 tokens/s,
about five seconds) and counts every one that does not end with a complete, well-formed answer
as an error. The soak part runs a steady mix for ``--soak-minutes``: streaming and whole chats
through the Ollama and OpenAI APIs, embeddings, and bad requests (malformed JSON, unknown models),
which must get their 4xx. It prints the router's resident memory (RSS) at the start and end of
each part, and the soak's peak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import httpx
import psutil
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


async def wait_ready(url: str, nodes: int) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        with trio.fail_after(30):
            while True:
                try:
                    status = (await client.get(url + "/fleet/status")).json()
                    if status["fleet"]["nodes_online"] >= nodes:
                        return
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                await trio.sleep(0.1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def router_and_backend(script: str, flag: str, *extra: str) -> Iterator[tuple[str, int]]:
    """Start a router (``herd``) on a free loopback port and ``script flag ROUTER_URL extra...``
    (the simulated nodes) beside it, both with a throwaway data directory and no mDNS; yield
    (router URL, router pid); stop both on the way out."""
    port = free_port()
    router_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "FLEET_DATA_DIR": tmp,
            "FLEET_LOG_LEVEL": "WARNING",
            "FLEET_MDNS": "false",
        }
        router = subprocess.Popen(
            [sys.executable, "-m", "herd", "--host", "127.0.0.1", "--port", str(port)], env=env
        )
        backend = subprocess.Popen([sys.executable, script, flag, router_url, *extra], env=env)
        try:
            yield router_url, router.pid
        finally:
            for process in (backend, router):
                process.terminate()
                process.wait(timeout=10)


MODEL = "load:latest"
EMBED = "load-embed:latest"
NODES = 4
SLOTS = 300  # per node: enough that 1,000 streams run at once, not queue
SOURCES = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")


async def serve_backends(router_url: str) -> None:
    """Child process: four simulated Ollama nodes and their agents."""
    from herd.demo import serve_simulated_node
    from herd.sim import SimConfig, SimModel

    models = (
        SimModel(MODEL, size_bytes=2**30, tokens_per_second=4.0),
        SimModel(EMBED, size_bytes=2**28, embedding=True),
    )
    async with trio.open_nursery() as nursery:
        for index in range(NODES):
            spec = SimConfig(
                name=f"load-{index}",
                models=models,
                loaded=(MODEL, EMBED),
                parallel=SLOTS,
                memory_bytes=64 * 2**30,
            )
            await nursery.start(serve_simulated_node, spec, router_url)


@attrs.define
class Tally:
    ok: int = 0
    errors: int = 0
    expected_errors: int = 0
    problems: dict[str, int] = attrs.field(factory=dict)

    def problem(self, what: str) -> None:
        self.errors += 1
        self.problems[what] = self.problems.get(what, 0) + 1


def clients(url: str, per_client: int) -> list[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
    return [
        httpx.AsyncClient(
            base_url=url,
            transport=httpx.AsyncHTTPTransport(local_address=address, limits=limits),
            timeout=httpx.Timeout(120.0),
            trust_env=False,
        )
        for address in SOURCES
    ]


async def one_stream(client: httpx.AsyncClient, tally: Tally, tokens: int = 20) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "load"}],
        "options": {"num_predict": tokens},
    }
    try:
        async with client.stream("POST", "/api/chat", json=body) as response:
            lines = [line async for line in response.aiter_lines() if line]
        if response.status_code != 200:
            tally.problem(f"status {response.status_code}")
        elif not lines or not json.loads(lines[-1]).get("done") or len(lines) != tokens + 1:
            tally.problem("incomplete stream")
        else:
            tally.ok += 1
    except httpx.HTTPError as exc:
        tally.problem(type(exc).__name__)


def rss_mib(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


async def streams_part(url: str, router_pid: int, count: int) -> None:
    tally = Tally()
    pool = clients(url, count // len(SOURCES) + 1)
    before = rss_mib(router_pid)
    peak = before
    started = time.perf_counter()

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mib(router_pid))
            await trio.sleep(0.25)

    async with trio.open_nursery() as outer:
        outer.start_soon(sample)
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(one_stream, pool[index % len(pool)], tally)
        outer.cancel_scope.cancel()
    elapsed = time.perf_counter() - started
    for client in pool:
        await client.aclose()
    after = rss_mib(router_pid)
    print(
        f"{count} concurrent streams: {tally.ok} complete, {tally.errors} errors "
        f"{tally.problems or ''} in {elapsed:.1f} s; router RSS {before:.0f} MiB before, "
        f"{peak:.0f} MiB peak, {after:.0f} MiB after"
    )


async def soak_part(url: str, router_pid: int, minutes: float, workers: int = 32) -> None:
    tally = Tally()
    rng = random.Random(1)
    pool = clients(url, workers)
    deadline = trio.current_time() + minutes * 60
    samples: list[tuple[float, float]] = [(0.0, rss_mib(router_pid))]
    start = trio.current_time()

    async def request(client: httpx.AsyncClient) -> None:
        kind = rng.random()
        if kind < 0.35:
            await one_stream(client, tally, tokens=rng.randint(1, 8))
            return
        if kind < 0.6:
            path, body, want = (
                "/v1/chat/completions",
                {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "soak " * rng.randint(1, 200)}],
                    "max_tokens": rng.randint(1, 8),
                },
                200,
            )
        elif kind < 0.85:
            path, body, want = "/api/embed", {"model": EMBED, "input": ["a", "b"]}, 200
        elif kind < 0.93:
            path, body, want = "/api/chat", {"model": "absent:1b", "messages": []}, 404
        else:
            path, body, want = "/v1/chat/completions", None, 400
        try:
            if body is None:
                response = await client.post(path, content=b'{"model": ')
            else:
                response = await client.post(path, json=body)
        except httpx.HTTPError as exc:
            tally.problem(type(exc).__name__)
            return
        if response.status_code != want:
            tally.problem(f"{path} {response.status_code}")
        elif want == 200:
            tally.ok += 1
        else:
            tally.expected_errors += 1

    async def worker(client: httpx.AsyncClient) -> None:
        while trio.current_time() < deadline:
            await request(client)

    async def sampler() -> None:
        while trio.current_time() < deadline:
            await trio.sleep(30)
            samples.append((trio.current_time() - start, rss_mib(router_pid)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler)
        for index in range(workers):
            nursery.start_soon(worker, pool[index % len(pool)])
    for client in pool:
        await client.aclose()
    samples.append((trio.current_time() - start, rss_mib(router_pid)))
    total = tally.ok + tally.errors + tally.expected_errors
    rate = total / (minutes * 60)
    print(
        f"soak {minutes:g} min, {workers} workers: {total} requests ({rate:.0f}/s), "
        f"{tally.ok} ok, {tally.expected_errors} expected 4xx, {tally.errors} errors "
        f"{tally.problems or ''}"
    )
    first, last = samples[0][1], samples[-1][1]
    peak = max(rss for _, rss in samples)
    quarter = samples[len(samples) // 4][1]
    print(
        f"router RSS: {first:.0f} MiB at start, {quarter:.0f} MiB after a quarter, "
        f"{last:.0f} MiB at the end, {peak:.0f} MiB peak"
    )


async def run(
    router_url: str, router_pid: int, streams: int, soak_minutes: float, workers: int
) -> None:
    await wait_ready(router_url, NODES)
    if streams:
        await streams_part(router_url, router_pid, streams)
    if soak_minutes:
        await soak_part(router_url, router_pid, soak_minutes, workers)


def concurrent_streams(streams: int, soak_minutes: float = 0.0, workers: int = 32) -> None:
    """Start the router and the backends, run the parts, stop everything."""
    with router_and_backend(__file__, "--backends") as (router_url, router_pid):
        trio.run(run, router_url, router_pid, streams, soak_minutes, workers)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--backends":
        trio.run(serve_backends, sys.argv[2])
        sys.exit(0)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--soak-minutes", type=float, default=0.0)
    parser.add_argument("--soak-workers", type=int, default=32, help="requests kept in flight")
    args = parser.parse_args()
    concurrent_streams(args.streams, args.soak_minutes, args.soak_workers)
