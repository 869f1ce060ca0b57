"""Several routers in front of one fleet: throughput, added latency and the shared counts' cost.

Processes on 127.0.0.1: a private redis-server (the shared state store), 1, 2 or 3 routers
(``herd --state``), one simulated Ollama with one node agent per router, and this load
generator, which spreads its requests round-robin over the routers (as a balancer would). Each
case runs the same request mix; the figures are throughput, latency p50/p99, the latency added
over the simulated node answered directly, and each request's router CPU (user + system time
read from ``/proc/<pid>/stat`` for every router, divided by the requests served). The first
two rows are one router without and with ``--state``: their CPU ratio is what the shared counts
(a slot script, a pipelined release, the load publication) cost per request.

On a small machine (2 cores) the routers, the node and the load generator share the CPU, so
throughput can't grow with more routers here: read the CPU per request and the added latency.

    python bench/scale_out.py            # full run (a few minutes on 2 cores)
    python bench/scale_out.py --quick    # fewer requests, for a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.engines import free_port, redis_server  # noqa: E402 (the repository's root first)

MODEL = "bench:latest"
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "benchmark"}],
    "stream": True,
    "options": {"num_predict": 20},
}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def serve_backend(router_urls: list[str], url_file: str) -> None:
    """Child process: one fast simulated Ollama, one node agent per router."""
    from herd.node.agent import AgentConfig, NodeAgent
    from herd.sim import SimConfig, SimModel, run_sim

    spec = SimConfig(
        name="bench", models=(SimModel(MODEL, size_bytes=2**30),), loaded=(MODEL,), parallel=64
    )
    async with run_sim(spec) as sim, trio.open_nursery() as nursery:
        for url in router_urls:
            config = AgentConfig(
                router_url=url, ollama_url=sim.url, node_id="bench", parallel_slots=64
            )
            await nursery.start(NodeAgent(config).run)
        await trio.Path(url_file).write_text(sim.url)
        await trio.sleep_forever()


async def wait_ready(urls: Sequence[str], nodes: int = 1) -> None:
    """Until every router answers and has ``nodes`` nodes online."""
    async with httpx.AsyncClient(trust_env=False) as client:
        with trio.fail_after(60):
            for url in urls:
                while True:
                    try:
                        status = (await client.get(url + "/fleet/status")).json()
                        if status["fleet"]["nodes_online"] >= nodes:
                            break
                    except (httpx.HTTPError, KeyError, ValueError):
                        pass
                    await trio.sleep(0.1)


async def measure(urls: Sequence[str], total: int, concurrency: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    body = json.dumps(BODY).encode()
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(limits=limits, trust_env=False, timeout=60) as client:
        sent = 0

        async def worker() -> None:
            nonlocal sent
            while sent < total:
                url = urls[sent % len(urls)]
                sent += 1
                start = time.perf_counter()
                async with client.stream("POST", url + "/api/chat", content=body) as response:
                    async for _ in response.aiter_raw():
                        pass
                    if response.status_code != 200:
                        raise RuntimeError(f"{url}: {response.status_code}")
                latencies.append(time.perf_counter() - start)

        for url in urls:  # warm each router's pool
            await client.post(url + "/api/chat", content=body)
        began = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        elapsed = time.perf_counter() - began
    return latencies, len(latencies) / elapsed


@contextlib.contextmanager
def routers_and_node(count: int, state: str | None) -> Iterator[tuple[list[str], list[int], str]]:
    """``count`` routers (sharing ``state`` if given) and the simulated node; yields (router
    URLs, router pids, the node's own URL)."""
    ports = [free_port() for _ in range(count)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FLEET_LOG_LEVEL": "WARNING", "FLEET_MDNS": "false"}
        processes = []
        for i, port in enumerate(ports):
            argv = [sys.executable, "-m", "herd", "--host", "127.0.0.1", "--port", str(port)]
            argv += ["--data-dir", f"{tmp}/r{i}"] + (["--state", state] if state else [])
            processes.append(subprocess.Popen(argv, env=env, cwd=ROOT))
        url_file = f"{tmp}/node-url"
        node: subprocess.Popen[bytes] | None = None
        try:
            trio.run(wait_ready, urls, 0)  # the routers listen before the node dials them
            node = subprocess.Popen(
                [sys.executable, __file__, "--backend", url_file, *urls], env=env, cwd=ROOT
            )
            trio.run(wait_ready, urls)
            yield urls, [p.pid for p in processes], Path(url_file).read_text().strip()
        finally:
            for process in (node, *processes):
                if process is not None:
                    process.terminate()
                    process.wait(timeout=20)


def run_case(
    count: int, state: str | None, total: int, concurrency: int
) -> tuple[float, float, float, float, float]:
    """(requests/s, p50, p99, added p50, router CPU ms per request)."""
    with routers_and_node(count, state) as (urls, pids, node_url):
        direct, _ = trio.run(measure, [node_url], total // 2, concurrency)
        before = sum(cpu_seconds(pid) for pid in pids)
        latencies, rps = trio.run(measure, urls, total, concurrency)
        cpu = sum(cpu_seconds(pid) for pid in pids) - before
    p50 = statistics.median(latencies)
    added = p50 - statistics.median(direct)
    return rps, p50, percentile(latencies, 0.99), added, cpu / len(latencies) * 1000


def main(quick: bool, concurrency: int) -> None:
    total = 300 if quick else 1500
    with tempfile.TemporaryDirectory() as scratch, redis_server(Path(scratch)) as state:
        cases = [(1, None), (1, state), (2, state), (3, state)]
        header = (
            f"{'routers':<18} {'req/s':>7} {'p50':>9} {'p99':>9} {'added p50':>10} "
            f"{'CPU/req':>9} {'req/s vs 1':>10}"
        )
        print(f"{total} streamed chats of 20 tokens, {concurrency} at a time, round-robin")
        print(header)
        print("-" * len(header))
        results = []
        for count, url in cases:
            results.append(run_case(count, url, total, concurrency))
            rps, p50, p99, added, cpu = results[-1]
            name = f"{count} {'--state' if url else 'alone'}"
            print(
                f"{name:<18} {rps:>7.0f} {p50 * 1000:>7.2f}ms {p99 * 1000:>7.2f}ms "
                f"{added * 1000:>8.2f}ms {cpu:>7.2f}ms {rps / results[0][0]:>10.2f}"
            )
        alone, shared = results[0][4], results[1][4]
        print(
            f"shared counts: {shared - alone:+.2f} ms of router CPU per request "
            f"({shared / alone:.2f}x one router alone)"
        )


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--backend":
        trio.run(serve_backend, sys.argv[3:], sys.argv[2])
        sys.exit(0)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    main(args.quick, args.concurrency)
