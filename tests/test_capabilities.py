"""Capabilities come from the backend (/api/show), not from names: a request with images goes
only to vision models, one with tools prefers tool-capable ones, and the listings say which is
which."""

from __future__ import annotations

from pathlib import Path

import httpx

from herd.sim import SimConfig, SimModel
from herd.state.settings import RuntimeSettings
from tests.conftest import GiB, running_fleet, wait_until

# A vision model whose name says nothing about vision (gemma3 is one).
GEMMA = SimModel("gemma3:4b", size_bytes=3 * GiB, family="gemma3", parameter_size="4B", vision=True)
GEMMA_BIG = SimModel(
    "gemma3:12b", size_bytes=8 * GiB, family="gemma3", parameter_size="12B", vision=True
)
TEXT = SimModel("llama3.2:3b", size_bytes=2 * GiB, parameter_size="3B")
NO_TOOLS = SimModel("phi3:2b", size_bytes=GiB, family="phi3", parameter_size="2B", tools=False)
MID = SimModel("qwen2.5:7b", size_bytes=5 * GiB, family="qwen2", parameter_size="7B")
BIG = SimModel("qwen2.5:14b", size_bytes=9 * GiB, family="qwen2", parameter_size="14B")
IMAGE = "iVBORw0KGgo="  # the bytes don't matter to the sim


def specs() -> list[SimConfig]:
    return [
        SimConfig(
            name="alpha",
            models=(GEMMA, GEMMA_BIG, TEXT, NO_TOOLS, MID, BIG),
            loaded=("llama3.2:3b", "gemma3:4b", "phi3:2b"),
            memory_bytes=64 * GiB,
        )
    ]


async def test_capabilities_are_read_and_listed(tmp_path: Path) -> None:
    async with (
        running_fleet(tmp_path, specs()) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=30, trust_env=False) as client,
    ):
        await wait_until(
            lambda: all(m.capabilities for m in fleet.router.fleet.nodes[0].report.available_models)
        )
        tags = {m["name"]: m for m in (await client.get("/api/tags")).json()["models"]}
        assert "vision" in tags["gemma3:4b"]["capabilities"]
        assert "vision" not in tags["llama3.2:3b"]["capabilities"]
        assert "tools" not in tags["phi3:2b"]["capabilities"]
        models = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
        assert "vision" in models["gemma3:12b"]["capabilities"]


async def test_images_go_only_to_vision_models_and_tools_prefer_tool_models(
    tmp_path: Path,
) -> None:
    settings = RuntimeSettings(vram_fallback=True)
    async with (
        running_fleet(tmp_path, specs(), settings) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=30, trust_env=False) as client,
    ):
        await wait_until(
            lambda: all(m.capabilities for m in fleet.router.fleet.nodes[0].report.available_models)
        )
        # gemma3:12b is cold; with substitution on, a loaded *vision* model stands in for an
        # image request (gemma3:4b), never the loaded text models.
        look = {
            "model": "gemma3:12b",
            "stream": False,
            "messages": [{"role": "user", "content": "what is this?", "images": [IMAGE]}],
        }
        reply = await client.post("/api/chat", json=look)
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "gemma3:4b"
        # A virtual name with images: the tier keeps to vision models.
        agent = await client.post(
            "/v1/chat/completions",
            json={
                "model": "claude-3-5-haiku",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is this?"},
                            {
                                "type": "image_url",
                                "image_url": {"url": f"data:image/png;base64,{IMAGE}"},
                            },
                        ],
                    }
                ],
            },
        )
        assert agent.status_code == 200, agent.text
        assert agent.json()["model"].startswith("gemma3")
        # The small tier is phi3 (2B, no tools) then llama3.2 (3B), both hot: without tools
        # the smallest serves; with tools, the tool-capable one.
        plain = await client.post(
            "/v1/chat/completions",
            json={"model": "claude-3-5-haiku", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert plain.json()["model"] == "phi3:2b"
        tool = {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
        }
        tooled = await client.post(
            "/v1/chat/completions",
            json={
                "model": "claude-3-5-haiku",
                "tools": [tool],
                "messages": [{"role": "user", "content": "call f"}],
            },
        )
        assert tooled.json()["model"] == "llama3.2:3b"
