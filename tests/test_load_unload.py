"""Ollama's load and unload requests reach every node that holds the model (Open WebUI sends
``keep_alive: 0`` with no messages to unload)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from herd.sim import SimConfig
from tests.conftest import LLAMA_3B, QWEN_7B, running_fleet


def specs() -> list[SimConfig]:
    return [
        SimConfig(name="alpha", models=(LLAMA_3B, QWEN_7B), loaded=("llama3.2:3b",)),
        SimConfig(name="beta", models=(LLAMA_3B, QWEN_7B), loaded=("llama3.2:3b",)),
    ]


async def test_unload_and_load_reach_every_node_that_holds_the_model(tmp_path: Path) -> None:
    async with (
        running_fleet(tmp_path, specs()) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=30, trust_env=False) as client,
    ):
        # Load of a loaded model: every holder refreshes it.
        load = await client.post("/api/chat", json={"model": "llama3.2:3b", "messages": []})
        assert load.status_code == 200
        assert sorted(load.headers["x-herd-node"].split(",")) == ["alpha", "beta"]
        line = json.loads(load.text)
        assert line["done"] is True and line["done_reason"] == "load"
        # Unload: both nodes let it go.
        unload = await client.post(
            "/api/generate", json={"model": "llama3.2:3b", "keep_alive": 0, "stream": False}
        )
        assert unload.status_code == 200 and unload.json()["done_reason"] == "unload"
        assert sorted(unload.headers["x-herd-node"].split(",")) == ["alpha", "beta"]
        assert all("llama3.2:3b" not in sim.loaded_models for sim in fleet.sims.values())
        # Unloading what is loaded nowhere: Ollama's answer, no node called.
        before = sum(len(sim.requests) for sim in fleet.sims.values())
        again = await client.post(
            "/api/chat", json={"model": "qwen2.5:7b", "messages": [], "keep_alive": "0s"}
        )
        assert again.status_code == 200
        assert json.loads(again.text)["done_reason"] == "unload"
        assert sum(len(sim.requests) for sim in fleet.sims.values()) == before
        # Loading what is loaded nowhere: routed to one node, which loads it.
        cold = await client.post("/api/generate", json={"model": "qwen2.5:7b", "stream": False})
        assert cold.status_code == 200 and cold.json()["done_reason"] == "load"
        assert "," not in cold.headers["x-herd-node"]
        node = cold.headers["x-herd-node"]
        assert "qwen2.5:7b" in fleet.sims[node].loaded_models
        # A model no node has: 404 as for any request.
        missing = await client.post("/api/generate", json={"model": "nope", "keep_alive": 0})
        assert missing.status_code == 404
