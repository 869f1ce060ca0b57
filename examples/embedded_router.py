"""Run herd's router inside your own Trio program, with two simulated Ollama nodes behind it.

python examples/embedded_router.py
"""

from __future__ import annotations

import httpx
import trio

import herd
from herd.node.agent import AgentConfig, NodeAgent
from herd.sim import SimConfig, SimModel, run_sim

GiB = 2**30
NODES = [("desk", "llama3.2:3b"), ("laptop", "qwen2.5:0.5b")]


async def main() -> None:
    config = herd.RouterConfig(host="127.0.0.1", port=0)
    async with herd.Router(config) as router:
        async with trio.open_nursery() as nursery:
            for name, model in NODES:
                spec = SimConfig(
                    name=name, models=(SimModel(model, size_bytes=2 * GiB),), loaded=(model,)
                )
                sim = await nursery.start(serve_sim, spec)
                agent = NodeAgent(AgentConfig(router_url=router.url, ollama_url=sim, node_id=name))
                await nursery.start(agent.run)
            await router.wait_nodes(len(NODES))
            print("router at", router.url)
            for node in router.fleet.nodes:
                print(node.node_id, node.status.value, [m.name for m in node.report.loaded_models])
            async with httpx.AsyncClient(base_url=router.url, trust_env=False) as client:
                for _, model in NODES:
                    response = await client.post(
                        "/api/generate", json={"model": model, "prompt": "hello", "stream": False}
                    )
                    print(
                        model,
                        "served by",
                        response.headers["x-herd-node"],
                        "->",
                        response.json()["response"],
                    )
            nursery.cancel_scope.cancel()


async def serve_sim(
    config: SimConfig, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    async with run_sim(config) as sim:
        task_status.started(sim.url)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
