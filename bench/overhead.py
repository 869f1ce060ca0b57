"""Router overhead: the same requests sent straight to a simulated Ollama and through herd.

Three processes on 127.0.0.1: the simulated backend (with its node agent), the router, and this
load generator. For each scenario the same request mix runs direct, then through the router;
the figures are the added latency (p50, p99) and the throughput ratio router/direct.

The OpenAI path has no direct twin on an Ollama backend, so its baseline is the equivalent
Ollama-native request sent direct: the figure includes translation (NDJSON→SSE) as well as routing.

    python bench/overhead.py                 # full run (a few minutes on 2 cores)
    python bench/overhead.py --quick         # fewer requests, for a smoke run
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
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

MODEL = "bench:latest"
PROMPT = [{"role": "user", "content": "benchmark"}]


@dataclass
class Scenario:
    name: str
    path: str  # through the router
    direct_path: str  # straight to the backend
    stream: bool
    concurrency: int

    def body(self, chunks: int, direct: bool) -> dict[str, object]:
        openai = self.path.startswith("/v1/") and not direct
        body: dict[str, object] = {"model": MODEL, "messages": PROMPT, "stream": self.stream}
        if openai:
            body["max_tokens"] = chunks
        else:
            body["options"] = {"num_predict": chunks}
        return body


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(
    url: str, scenario: Scenario, total: int, chunks: int, direct: bool
) -> tuple[list[float], float]:
    latencies: list[float] = []
    path = scenario.direct_path if direct else scenario.path
    body = json.dumps(scenario.body(chunks, direct)).encode()
    limits = httpx.Limits(max_connections=scenario.concurrency * 2)
    async with httpx.AsyncClient(
        base_url=url, limits=limits, trust_env=False, timeout=60
    ) as client:
        remaining = total

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                async with client.stream("POST", path, content=body) as response:
                    async for _ in response.aiter_raw():
                        pass
                    if response.status_code != 200:
                        raise RuntimeError(f"{path}: {response.status_code}")
                latencies.append(time.perf_counter() - start)

        # warm the connection pool
        for _ in range(scenario.concurrency):
            await client.post(path, content=body)
        began = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(scenario.concurrency):
                nursery.start_soon(worker)
        elapsed = time.perf_counter() - began
    return latencies, len(latencies) / elapsed


def scenarios() -> list[Scenario]:
    out = []
    for concurrency in (1, 16):
        for stream in (False, True):
            out.append(
                Scenario(
                    f"ollama {'stream' if stream else 'whole '} c={concurrency}",
                    "/api/chat",
                    "/api/chat",
                    stream,
                    concurrency,
                )
            )
            out.append(
                Scenario(
                    f"openai {'stream' if stream else 'whole '} c={concurrency}",
                    "/v1/chat/completions",
                    "/api/chat",
                    stream,
                    concurrency,
                )
            )
    return out


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


async def serve_backend(router_url: str, port_file: str) -> None:
    """Child process: one fast simulated Ollama plus its node agent."""
    from herd.node.agent import AgentConfig, NodeAgent
    from herd.sim import SimConfig, SimModel, run_sim

    spec = SimConfig(
        name="bench", models=(SimModel(MODEL, size_bytes=2**30),), loaded=(MODEL,), parallel=64
    )
    async with run_sim(spec) as sim, trio.open_nursery() as nursery:
        agent = NodeAgent(
            AgentConfig(
                router_url=router_url, ollama_url=sim.url, node_id="bench", parallel_slots=64
            )
        )
        await nursery.start(agent.run)
        await trio.Path(port_file).write_text(sim.url)
        await trio.sleep_forever()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run_all(router_url: str, backend_url_file: str, quick: bool, chunks: int) -> None:
    await wait_ready(router_url, 1)
    backend_url = (await trio.Path(backend_url_file).read_text()).strip()
    print(f"router {router_url}  backend {backend_url}  tokens per response {chunks}")
    header = (
        f"{'scenario':<22} {'direct p50':>10} {'router p50':>10} {'added p50':>10} "
        f"{'added p99':>10} {'rps direct':>10} {'rps router':>10} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for scenario in scenarios():
        total = (100 if quick else 400) * (2 if scenario.concurrency > 1 else 1)
        d_lat, d_rps = await measure(backend_url, scenario, total, chunks, True)
        r_lat, r_rps = await measure(router_url, scenario, total, chunks, False)
        d50, r50 = statistics.median(d_lat), statistics.median(r_lat)
        added99 = percentile(r_lat, 0.99) - percentile(d_lat, 0.99)
        print(
            f"{scenario.name:<22} {d50 * 1000:>8.2f}ms {r50 * 1000:>8.2f}ms "
            f"{(r50 - d50) * 1000:>8.2f}ms {added99 * 1000:>8.2f}ms "
            f"{d_rps:>10.0f} {r_rps:>10.0f} {r_rps / d_rps:>6.2f}"
        )


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


def main(quick: bool, chunks: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        url_file = str(Path(scratch) / "backend-url")
        with router_and_backend(__file__, "--backend", url_file) as (router_url, _):
            trio.run(run_all, router_url, url_file, quick, chunks)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--backend":
        trio.run(serve_backend, sys.argv[2], sys.argv[3])
        sys.exit(0)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--chunks", type=int, default=50, help="tokens per response")
    args = parser.parse_args()
    main(args.quick, args.chunks)
