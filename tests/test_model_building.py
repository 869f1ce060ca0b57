"""Ollama's model-building endpoints through the router: /api/copy, /api/create, /api/push and
the blob uploads /api/create uses, each sent to the node that has (or gets) the model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import ollama

from herd.sim import SimConfig
from tests.conftest import LLAMA_3B, QWEN_7B, in_thread, running_fleet


def specs() -> list[SimConfig]:
    return [
        SimConfig(name="alpha", models=(LLAMA_3B, QWEN_7B)),
        SimConfig(name="beta", models=(QWEN_7B,)),
    ]


async def test_copy_create_push_and_blobs(tmp_path: Path) -> None:
    async with (
        running_fleet(tmp_path, specs()) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=30, trust_env=False) as client,
    ):
        # Copy: on every node that has the source; the new name is listed at once.
        copied = await client.post(
            "/api/copy", json={"source": "qwen2.5:7b", "destination": "my-qwen"}
        )
        assert copied.status_code == 200, copied.text
        assert sorted(copied.json()["copied"]) == ["alpha", "beta"]
        tags = {m["name"]: m["nodes"] for m in (await client.get("/api/tags")).json()["models"]}
        assert sorted(tags["my-qwen:latest"]) == ["alpha", "beta"]
        missing = await client.post("/api/copy", json={"source": "nope", "destination": "x"})
        assert missing.status_code == 404 and "nope" in missing.json()["error"]
        # Create from a model: on a node that has it; progress streams as Ollama's.
        made = await client.post("/api/create", json={"model": "mini", "from": "llama3.2:3b"})
        lines = [json.loads(line) for line in made.text.splitlines()]
        assert lines[-1] == {"status": "success", "node": "alpha"}
        assert made.headers["x-herd-node"] == "alpha"
        # Blobs then a create from them: both on the same node.
        weights = b"GGUF" + bytes(range(256)) * 64
        digest = "sha256:" + hashlib.sha256(weights).hexdigest()
        assert (await client.head(f"/api/blobs/{digest}")).status_code == 404
        uploaded = await client.post(f"/api/blobs/{digest}", content=weights)
        assert uploaded.status_code == 201
        holder = uploaded.headers["x-herd-node"]
        assert digest in fleet.sims[holder].blobs
        assert (await client.head(f"/api/blobs/{digest}")).status_code == 200
        wrong = await client.post(f"/api/blobs/sha256:{'0' * 64}", content=weights)
        assert wrong.status_code == 400 and "digest" in wrong.json()["error"]
        built = await client.post(
            "/api/create",
            json={"model": "from-gguf", "files": {"model.gguf": digest}, "stream": False},
        )
        assert built.status_code == 200 and built.json()["status"] == "success"
        assert built.headers["x-herd-node"] == holder
        # Push: from the node that has the model.
        pushed = await client.post("/api/push", json={"model": "mini", "stream": False})
        assert pushed.status_code == 200 and pushed.headers["x-herd-node"] == "alpha"
        assert fleet.sims["alpha"].pushes == 1
        nowhere = await client.post("/api/push", json={"model": "ghost"})
        assert nowhere.status_code == 404
        # The Ollama client does the same through its own calls.
        with ollama.Client(host=fleet.url) as oll:
            await in_thread(lambda: oll.copy("llama3.2:3b", "llama-copy"))
            listed = await in_thread(lambda: oll.list())
        assert "llama-copy:latest" in {m.model for m in listed.models}
