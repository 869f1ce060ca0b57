"""The simulated Ollama speaks Ollama's API and fails on demand."""

from __future__ import annotations

import contextlib
import json

import httpx
import pytest
import trio

from herd.sim import SimConfig, SimModel, run_sim
from tests.streams import aiter_lines

GiB = 2**30
SMALL = SimModel("small:latest", size_bytes=4 * GiB, load_seconds=30.0)
OTHER = SimModel("other:latest", size_bytes=4 * GiB, load_seconds=5.0)
EMBED = SimModel("embed:latest", embedding=True, embedding_dim=4)
CONFIG = SimConfig(name="s", models=(SMALL, OTHER, EMBED), memory_bytes=6 * GiB)
QUICK = SimConfig(
    name="q",
    models=(SimModel("small:latest"), SimModel("other:latest"), EMBED),
    registry=(SimModel("fresh:latest"), SimModel("x:latest")),
)


async def test_cold_load_takes_load_seconds_of_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # No client timeout: on the virtual clock it would fire before the 30 s load ends.
    async with run_sim(CONFIG) as sim, httpx.AsyncClient(base_url=sim.url, timeout=None) as client:
        start = trio.current_time()
        response = await client.post(
            "/api/generate", json={"model": "small", "prompt": "hi", "stream": False}
        )
        assert response.status_code == 200
        assert trio.current_time() - start == pytest.approx(30.0, abs=0.01)
        assert response.json()["load_duration"] == 30_000_000_000
        assert sim.cold_loads == 1
        start = trio.current_time()
        await client.post("/api/generate", json={"model": "small", "prompt": "hi", "stream": False})
        assert trio.current_time() - start == pytest.approx(0.0, abs=0.01)
        # A second model doesn't fit beside the first: least recently used goes.
        await client.post("/api/generate", json={"model": "other", "prompt": "x", "stream": False})
        assert sim.loaded_models == ["other:latest"]
        ps = (await client.get("/api/ps")).json()["models"]
        assert [m["name"] for m in ps] == ["other:latest"]


async def test_ollama_shapes() -> None:
    with trio.fail_after(10):
        async with run_sim(QUICK) as sim, httpx.AsyncClient(base_url=sim.url) as client:
            lines = [
                json.loads(line)
                for line in (
                    await client.post(
                        "/api/chat",
                        json={
                            "model": "small",
                            "messages": [{"role": "user", "content": "hi there"}],
                            "options": {"num_predict": 3},
                        },
                    )
                ).text.splitlines()
            ]
            assert [line["done"] for line in lines] == [False, False, False, True]
            assert lines[0]["message"]["role"] == "assistant"
            assert lines[-1]["done_reason"] == "length"
            assert lines[-1]["eval_count"] == 3
            assert lines[-1]["prompt_eval_count"] > 0
            tools = (
                await client.post(
                    "/api/chat",
                    json={
                        "model": "small",
                        "stream": False,
                        "messages": [{"role": "user", "content": "call f"}],
                        "tools": [{"type": "function", "function": {"name": "f"}}],
                    },
                )
            ).json()
            assert tools["message"]["tool_calls"][0]["function"]["name"] == "f"
            fmt = (
                await client.post(
                    "/api/generate",
                    json={"model": "small", "prompt": "x", "format": "json", "stream": False},
                )
            ).json()
            json.loads(fmt["response"])
            embed = (
                await client.post("/api/embed", json={"model": "embed", "input": ["a", "b"]})
            ).json()
            assert len(embed["embeddings"]) == 2 and len(embed["embeddings"][0]) == 4
            legacy = (
                await client.post("/api/embeddings", json={"model": "embed", "prompt": "a"})
            ).json()
            assert legacy["embedding"] == embed["embeddings"][0]
            tags = (await client.get("/api/tags")).json()["models"]
            assert {t["name"] for t in tags} == {"small:latest", "other:latest", "embed:latest"}
            show = (await client.post("/api/show", json={"model": "embed"})).json()
            assert show["capabilities"] == ["embedding"]
            assert (await client.get("/api/version")).json() == {"version": "0.12.0"}
            missing = await client.post("/api/chat", json={"model": "nope", "messages": []})
            assert missing.status_code == 404 and "nope" in missing.json()["error"]
            bad = await client.post("/api/chat", content=b"{")
            assert bad.status_code == 400
            wrong = await client.post("/api/chat", json={"model": "embed", "messages": []})
            assert wrong.status_code == 400


async def test_pull_and_delete() -> None:
    with trio.fail_after(10):
        async with run_sim(QUICK) as sim, httpx.AsyncClient(base_url=sim.url) as client:
            lines = (await client.post("/api/pull", json={"name": "fresh"})).text.splitlines()
            assert json.loads(lines[-1]) == {"status": "success"}
            names = {t["name"] for t in (await client.get("/api/tags")).json()["models"]}
            assert "fresh:latest" in names
            quiet = await client.post("/api/pull", json={"model": "x", "stream": False})
            assert quiet.json() == {"status": "success"}
            assert (
                await client.request("DELETE", "/api/delete", json={"model": "fresh"})
            ).status_code == 200
            assert (
                await client.request("DELETE", "/api/delete", json={"model": "fresh"})
            ).status_code == 404
            assert len(sim.requests) == 0  # pulls and deletes are not inference
            unknown = await client.post("/api/pull", json={"model": "nowhere", "stream": False})
            assert unknown.status_code == 500 and "does not exist" in unknown.json()["error"]
            streamed = (await client.post("/api/pull", json={"model": "nowhere"})).text
            assert "does not exist" in streamed.splitlines()[-1]


async def test_failure_modes() -> None:
    with trio.fail_after(10):
        async with run_sim(QUICK) as sim, httpx.AsyncClient(base_url=sim.url) as client:
            sim.fail("http500", times=1)  # (QUICK models load at once)
            assert (
                await client.post("/api/embed", json={"model": "embed", "input": "a"})
            ).status_code == 500
            assert (
                await client.post("/api/embed", json={"model": "embed", "input": "a"})
            ).status_code == 200
            sim.fail("hang", times=1)
            with trio.move_on_after(1):
                await client.post("/api/generate", json={"model": "small", "prompt": "x"})
            with trio.fail_after(5):
                while sim.open_streams:
                    await trio.testing.wait_all_tasks_blocked(0.002)
            assert sim.disconnects == 1
            sim.fail("die_mid_stream", times=1, after_chunks=1)
            async with client.stream(
                "POST", "/api/generate", json={"model": "small", "prompt": "x"}
            ) as response:
                async with contextlib.aclosing(aiter_lines(response)) as lines:
                    with pytest.raises(httpx.RemoteProtocolError):
                        async for _ in lines:
                            pass
            with pytest.raises(ValueError, match="unknown failure mode"):
                sim.fail("explode")
            sim.fail("refuse")
            await sim.closed.wait()  # the listener and the pooled connection are gone
            with pytest.raises(httpx.ConnectError):
                await client.get("/api/version")
            sim.clear_failure()
            await sim.listening.wait()
            assert (await client.get("/api/version")).status_code == 200
