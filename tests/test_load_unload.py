"""Ollama's load and unload requests reach every node that holds the model (Open WebUI sends
``keep_alive: 0`` with no messages to unload), and ``/api/ps`` lists what is loaded: each model
once, naming every node it is loaded on."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import httpx
import ollama

from herd.sim import SimConfig, SimModel
from tests.conftest import LLAMA_3B, QWEN_7B, GiB, in_thread, running_fleet


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


# A model made from another (FROM llama3.2:3b): its details name the parent.
PARENTED = SimModel("my-llama:latest", size_bytes=2 * GiB, parent_model="llama3.2:3b")


async def test_ps_lists_each_loaded_model_once_naming_every_node(tmp_path: Path) -> None:
    specs = [
        # Loaded for ever on alpha; for ten minutes on beta.
        SimConfig(name="alpha", models=(PARENTED, QWEN_7B), loaded=("my-llama:latest",)),
        SimConfig(
            name="beta",
            models=(PARENTED, QWEN_7B),
            loaded=("my-llama:latest", "qwen2.5:7b"),
            loaded_keep_alive="10m",
        ),
    ]
    async with (
        running_fleet(tmp_path, specs) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=30, trust_env=False) as client,
    ):
        # The node agent read the parent from its backend's /api/tags.
        alpha = fleet.router.fleet.node("alpha")
        assert alpha is not None
        listed = alpha.available("my-llama:latest")
        assert listed is not None and listed.parent_model == "llama3.2:3b"
        ps = (await client.get("/api/ps")).json()["models"]
        now = time.time()
        assert [m["name"] for m in ps] == ["my-llama:latest", "qwen2.5:7b"]  # once each
        mine, qwen = ps
        copies = {c["node"]: c for c in mine["nodes"]}
        assert sorted(copies) == ["alpha", "beta"]
        # The entry's own fields are the copy that stays longest: alpha's, kept for ever,
        # which Ollama prints as a date some 290 years out.
        assert mine["node"] == "alpha"
        assert mine["expires_at"] == copies["alpha"]["expires_at"]
        assert timestamp(mine["expires_at"]).year >= 2300
        # beta's copy goes in ten minutes (wall clock, as Ollama says it).
        assert 500 < timestamp(copies["beta"]["expires_at"]).timestamp() - now <= 601
        assert mine["details"]["parent_model"] == "llama3.2:3b"
        assert mine["details"]["family"] == "llama"
        assert qwen["node"] == "beta" and [c["node"] for c in qwen["nodes"]] == ["beta"]
        assert qwen["details"]["parent_model"] == ""
        assert 500 < timestamp(qwen["expires_at"]).timestamp() - now <= 601
        # Ollama's own client reads it as a list of running models with real times.
        with ollama.Client(host=fleet.url) as oll:
            running = await in_thread(lambda: oll.ps())
        by_name = {m.model: m for m in running.models}
        assert sorted(by_name) == ["my-llama:latest", "qwen2.5:7b"]
        first = by_name["my-llama:latest"]
        assert first.expires_at is not None and first.expires_at.year >= 2300
        assert first.details is not None and first.details.parent_model == "llama3.2:3b"


def timestamp(text: str) -> dt.datetime:
    """An RFC 3339 time as Ollama writes it, with its zone (``Z`` or an offset)."""
    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert parsed.tzinfo is not None, text
    return parsed
