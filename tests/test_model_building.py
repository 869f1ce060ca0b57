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


async def sim_models(url: str) -> set[str]:
    """What a simulated backend has on disk, asked over HTTP as a node agent would ask."""
    async with httpx.AsyncClient(base_url=url, trust_env=False) as direct:
        return {m["name"] for m in (await direct.get("/api/tags")).json()["models"]}


async def test_node_id_sends_model_building_to_that_node_and_an_unknown_one_is_404(
    tmp_path: Path,
) -> None:
    # Both nodes have qwen: without node_id, copy and push would go to either (or both).
    async with (
        running_fleet(tmp_path, specs()) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=30, trust_env=False) as client,
    ):
        alpha, beta = fleet.sims["alpha"], fleet.sims["beta"]
        # /api/copy with node_id: only there, though both nodes have the source.
        copied = await client.post(
            "/api/copy",
            json={"source": "qwen2.5:7b", "destination": "beta-qwen", "node_id": "beta"},
        )
        assert copied.status_code == 200, copied.text
        assert copied.json()["copied"] == ["beta"]
        assert "beta-qwen:latest" in await sim_models(beta.url)
        assert "beta-qwen:latest" not in await sim_models(alpha.url)
        # ... and where the source isn't: 404 naming the node.
        absent = await client.post(
            "/api/copy",
            json={"source": "beta-qwen", "destination": "x", "node_id": "alpha"},
        )
        assert absent.status_code == 404
        assert absent.json() == {"error": "model 'beta-qwen:latest' not found on node 'alpha'"}
        # /api/create with node_id: on that node, for each of the two.
        for name in ("alpha", "beta"):
            made = await client.post(
                "/api/create",
                json={"model": f"made-{name}", "from": "qwen2.5:7b", "node_id": name},
            )
            assert made.status_code == 200 and made.headers["x-herd-node"] == name
            assert json.loads(made.text.splitlines()[-1]) == {"status": "success", "node": name}
        assert "made-beta:latest" in await sim_models(beta.url)
        assert "made-beta:latest" not in await sim_models(alpha.url)
        assert "made-alpha:latest" in await sim_models(alpha.url)
        # /api/push with node_id: from that node only.
        pushed = await client.post(
            "/api/push", json={"model": "qwen2.5:7b", "stream": False, "node_id": "beta"}
        )
        assert pushed.status_code == 200 and pushed.headers["x-herd-node"] == "beta"
        assert (alpha.pushes, beta.pushes) == (0, 1)
        # Blobs take ?node_id= (their body is the blob); a create from them follows them.
        weights = b"GGUF" + bytes(range(256)) * 16
        digest = "sha256:" + hashlib.sha256(weights).hexdigest()
        uploaded = await client.post(f"/api/blobs/{digest}?node_id=beta", content=weights)
        assert uploaded.status_code == 201 and uploaded.headers["x-herd-node"] == "beta"
        assert digest in beta.blobs and digest not in alpha.blobs
        there = await client.head(f"/api/blobs/{digest}", params={"node_id": "beta"})
        assert there.status_code == 200
        not_there = await client.head(f"/api/blobs/{digest}", params={"node_id": "alpha"})
        assert not_there.status_code == 404 and not_there.headers["x-herd-node"] == "alpha"
        built = await client.post(
            "/api/create",
            json={"model": "from-blob", "files": {"m.gguf": digest}, "stream": False},
        )
        assert built.status_code == 200 and built.headers["x-herd-node"] == "beta"

        # An unknown node: 404 in Ollama's shape ({"error": ...}), naming it; nothing is sent.
        before = {name: len(sim.seen) for name, sim in fleet.sims.items()}
        unknown = [
            await client.post(
                "/api/copy", json={"source": "qwen2.5:7b", "destination": "y", "node_id": "nobody"}
            ),
            await client.post(
                "/api/create", json={"model": "z", "from": "qwen2.5:7b", "node_id": "nobody"}
            ),
            await client.post("/api/push", json={"model": "qwen2.5:7b", "node_id": "nobody"}),
            await client.post(f"/api/blobs/{digest}?node_id=nobody", content=weights),
        ]
        for answer in unknown:
            assert answer.status_code == 404, answer.request.url
            assert answer.headers["content-type"] == "application/json"
            assert answer.json() == {"error": "no node named 'nobody'"}
        head = await client.head(f"/api/blobs/{digest}", params={"node_id": "nobody"})
        assert head.status_code == 404
        # A node_id that isn't a string: 400 naming the field.
        wrong = await client.post("/api/push", json={"model": "qwen2.5:7b", "node_id": 7})
        assert wrong.status_code == 400
        assert wrong.json() == {"error": "field 'node_id' must be a string"}
        probes = {"/api/version", "/api/ps", "/api/tags", "/api/show"}  # the agents' own
        for name, sim in fleet.sims.items():
            sent = [path for _, path, _ in list(sim.seen)[before[name] :] if path not in probes]
            assert sent == [], name
