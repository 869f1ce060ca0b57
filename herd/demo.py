"""``herd demo``: a router with a simulated fleet, so herd can be seen working without Ollama.

Three simulated Ollama servers (one big Apple-silicon machine whose GPU working set is
modelled, two small ones, different models, realistic load times and token rates) join a real
router over real sockets, each through its own node agent. With ``--traffic`` a steady mixed
load (chat in both API families, embeddings, a few cold loads) runs through the router, so
``/fleet/status``, ``herd status`` and the traces show routing as it happens. It prints each
simulated node with the port its Ollama answers on (a real Ollama API: ``curl
http://127.0.0.1:PORT/api/ps``). The demo router is not advertised by mDNS unless asked
(``herd demo --mdns``): real nodes on the LAN would join it.
"""

from __future__ import annotations

import logging
import random
import tempfile

import httpx
import trio

from herd.config import RouterConfig
from herd.http.service import Router
from herd.node.agent import AgentConfig, NodeAgent
from herd.sim import SimConfig, SimModel, SimOllama, run_sim

log = logging.getLogger("herd.demo")

GiB = 2**30

LLAMA_70B = SimModel(
    "llama3.3:70b",
    size_bytes=40 * GiB,
    parameter_size="70B",
    context_length=8192,
    load_seconds=8.0,
    tokens_per_second=12.0,
)
QWEN_7B = SimModel(
    "qwen2.5:7b",
    size_bytes=5 * GiB,
    family="qwen2",
    parameter_size="7B",
    load_seconds=3.0,
    tokens_per_second=40.0,
)
LLAMA_3B = SimModel(
    "llama3.2:3b", size_bytes=2 * GiB, parameter_size="3B", load_seconds=1.5, tokens_per_second=70.0
)
PHI_14B = SimModel(
    "phi4:14b",
    size_bytes=9 * GiB,
    family="phi3",
    parameter_size="14B",
    load_seconds=4.0,
    tokens_per_second=25.0,
)
EMBED = SimModel(
    "nomic-embed-text:latest",
    size_bytes=300_000_000,
    family="nomic-bert",
    parameter_size="137M",
    embedding=True,
    embedding_dim=768,
    load_seconds=0.5,
)

DEMO_FLEET = (
    SimConfig(
        name="studio",
        models=(LLAMA_70B, QWEN_7B, EMBED),
        loaded=("llama3.3:70b", "nomic-embed-text:latest"),
        memory_bytes=64 * GiB,
        vram_bytes=48 * GiB,  # Apple silicon: Metal's working set, 3/4 of 64 GiB
        unified_memory=True,
        parallel=4,
    ),
    SimConfig(
        name="laptop-a",
        models=(LLAMA_3B, QWEN_7B),
        loaded=("llama3.2:3b",),
        memory_bytes=16 * GiB,
        parallel=2,
    ),
    SimConfig(
        name="laptop-b",
        models=(LLAMA_3B, PHI_14B, EMBED),
        loaded=("phi4:14b",),
        memory_bytes=24 * GiB,
        parallel=2,
    ),
)


async def serve_simulated_node(
    spec: SimConfig,
    router_url: str,
    heartbeat_interval: float = 2.0,
    *,
    task_status: trio.TaskStatus[SimOllama] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One simulated Ollama and the node agent that reports it, until cancelled."""
    async with run_sim(spec) as sim, trio.open_nursery() as nursery:
        agent = NodeAgent(
            AgentConfig(
                router_url=router_url,
                ollama_url=sim.url,
                node_id=spec.name,
                heartbeat_interval=heartbeat_interval,
                parallel_slots=spec.parallel,
            ),
            system=sim.system_reading,
            accelerators=sim.read_accelerators,
        )
        await nursery.start(agent.run)
        task_status.started(sim)


async def traffic(url: str, seed: int = 7) -> None:
    """A steady, bounded mixed load through the router."""
    rng = random.Random(seed)
    limiter = trio.CapacityLimiter(6)
    mix = [
        ("/api/chat", "llama3.2:3b"),
        ("/api/chat", "llama3.3:70b"),
        ("/v1/chat/completions", "qwen2.5:7b"),
        ("/v1/chat/completions", "llama3.2:3b"),
        ("/api/chat", "phi4:14b"),
        ("/api/embed", "nomic-embed-text"),
    ]
    async with httpx.AsyncClient(base_url=url, timeout=120, trust_env=False) as client:

        async def one(path: str, model: str) -> None:
            async with limiter:
                if path == "/api/embed":
                    body: dict[str, object] = {"model": model, "input": ["demo text"]}
                else:
                    body = {
                        "model": model,
                        "stream": True,
                        "messages": [{"role": "user", "content": "tell me something"}],
                        "metadata": {"tags": ["demo"]},
                    }
                    if path.startswith("/v1/"):
                        body["max_tokens"] = rng.randint(10, 60)
                    else:
                        body["options"] = {"num_predict": rng.randint(10, 60)}
                try:
                    async with client.stream("POST", path, json=body) as response:
                        async for _ in response.aiter_raw():
                            pass
                except httpx.HTTPError as exc:
                    log.warning("demo request failed: %s", exc)

        async with trio.open_nursery() as nursery:
            while True:
                path, model = rng.choice(mix)
                nursery.start_soon(one, path, model)
                await trio.sleep(rng.uniform(0.2, 1.0))


def node_line(spec: SimConfig, url: str) -> str:
    """One simulated node as the demo prints it: name, its Ollama's URL, memory, hot models."""
    hot = ", ".join(spec.loaded) or "none"
    return (
        f"    {spec.name:<9} simulated Ollama on {url}  "
        f"({spec.memory_bytes // GiB} GiB, loaded: {hot})"
    )


async def run_demo(
    host: str,
    port: int,
    with_traffic: bool,
    mdns: bool = False,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the demo until cancelled; ``task_status.started`` gets the router's URL."""
    with tempfile.TemporaryDirectory(prefix="herd-demo-") as data_dir:
        config = RouterConfig(
            host=host, port=port, data_dir=data_dir, heartbeat_interval=2.0, mdns=mdns
        )
        async with Router(config) as router, trio.open_nursery() as nursery:
            sims: list[SimOllama] = []
            for spec in DEMO_FLEET:
                sims.append(await nursery.start(serve_simulated_node, spec, router.url, 2.0))
            await router.wait_nodes(len(DEMO_FLEET))
            print(f"\nherd demo: router on {router.url} with {len(DEMO_FLEET)} simulated nodes")
            for spec, sim in zip(DEMO_FLEET, sims, strict=True):
                print(node_line(spec, sim.url))
            print(f"  dashboard: {router.url}/dashboard")
            print(f"  status:  herd status --url {router.url}")
            print(
                f"  chat:    curl {router.url}/api/chat -d "
                '\'{"model": "llama3.2:3b", "messages": '
                '[{"role": "user", "content": "hi"}]}\''
            )
            print(f'  openai:  OpenAI(base_url="{router.url}/v1", api_key="x")')
            print("  Ctrl-C to stop\n", flush=True)
            if with_traffic:
                nursery.start_soon(traffic, router.url)
            task_status.started(router.url)
