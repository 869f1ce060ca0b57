"""The model asked for, or the next one asked for, or an error: never a silent substitute.

Real router, simulated nodes on loopback, the real OpenAI SDK where a user would use it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
import trio
import trio.testing

from herd.sim import SimConfig, SimModel
from herd.state.settings import RuntimeSettings
from tests.conftest import (
    EMBED,
    LLAMA_3B,
    QWEN_7B,
    Fleet,
    GiB,
    in_thread,
    running_fleet,
    wait_until,
)

MISTRAL = SimModel("mistral:7b", size_bytes=4 * GiB, family="llama", parameter_size="7B")
PHI = SimModel("phi4:14b", size_bytes=8 * GiB, family="phi3", parameter_size="14B")


def chat(model: str, **extra: object) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        **extra,
    }


def demo_like() -> list[SimConfig]:
    """llama hot on both nodes; qwen and mistral only on disk."""
    return [
        SimConfig(name="alpha", models=(LLAMA_3B, QWEN_7B, EMBED), loaded=("llama3.2:3b",)),
        SimConfig(name="beta", models=(LLAMA_3B, MISTRAL, PHI), loaded=("llama3.2:3b",)),
    ]


@contextlib.asynccontextmanager
async def fleet_and_client(
    tmp_path: Path, settings: RuntimeSettings | None = None
) -> AsyncIterator[tuple[Fleet, httpx.AsyncClient]]:
    async with (
        running_fleet(tmp_path, demo_like(), settings) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=30, trust_env=False) as client,
    ):
        yield fleet, client


async def test_a_model_on_disk_is_served_itself_not_a_loaded_one(tmp_path: Path) -> None:
    async with fleet_and_client(tmp_path) as (fleet, client):
        for _ in range(3):
            reply = await client.post("/api/chat", json=chat("qwen2.5:7b"))
            assert reply.status_code == 200
            assert reply.headers["x-herd-model"] == "qwen2.5:7b"
            assert reply.headers["x-herd-fallback"] == "false"
            assert reply.json()["model"] == "qwen2.5:7b"
        assert fleet.sims["alpha"].cold_loads == 1  # loaded once, then hot
        # The OpenAI SDK (which never shows X-Herd headers) sees it in the model field.
        with openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0) as sdk:
            answer = await in_thread(
                lambda: sdk.chat.completions.create(
                    model="mistral:7b", messages=[{"role": "user", "content": "hi"}]
                )
            )
        assert answer.model == "mistral:7b"
        await wait_until(lambda: len(fleet.router.state.traces) == 4)
        assert all(t.substitution is None for t in fleet.router.state.traces)


async def test_a_typo_is_a_404_at_once_naming_the_closest_models(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fleet_and_client(tmp_path) as (fleet, client):
        start = trio.current_time()
        ollama = await client.post("/api/chat", json=chat("llama3.2:3bb"))
        assert trio.current_time() - start < 1  # not after the 30 s queue timeout
        assert ollama.status_code == 404
        assert ollama.json()["error"] == (
            "model 'llama3.2:3bb' not found on any node; did you mean llama3.2:3b?"
        )
        assert ollama.headers["x-herd-retries"] == "0"
        typo = await client.post("/v1/chat/completions", json=chat("qwen2.5:7"))
        error = typo.json()["error"]
        assert typo.status_code == 404 and error["code"] == "model_not_found"
        assert "did you mean qwen2.5:7b" in error["message"] and error["param"] == "model"
        # A name like nothing in the fleet gets no suggestion, and nothing is pulled.
        unknown = await client.post("/api/generate", json={"model": "zzz", "prompt": "x"})
        assert unknown.json()["error"] == "model 'zzz:latest' not found on any node"
        assert sum(sim.pulls for sim in fleet.sims.values()) == 0
        # The OpenAI SDK raises its NotFoundError.
        with (
            openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0) as sdk,
            pytest.raises(openai.NotFoundError, match=r"did you mean llama3\.2:3b"),
        ):
            await in_thread(
                lambda: sdk.chat.completions.create(
                    model="llama3.2:3bb", messages=[{"role": "user", "content": "hi"}]
                )
            )


async def test_fallback_models_are_tried_in_order_and_nothing_else(tmp_path: Path) -> None:
    async with fleet_and_client(tmp_path) as (fleet, client):
        reply = await client.post(
            "/api/chat", json=chat("gone:70b", fallback_models=["also-gone", "mistral:7b"])
        )
        assert reply.status_code == 200
        assert reply.headers["x-herd-model"] == "mistral:7b"  # cold, but named: not llama
        assert reply.headers["x-herd-fallback"] == "true"
        # Nothing named exists: 404, though llama is hot everywhere.
        none = await client.post("/api/chat", json=chat("gone:70b", fallback_models=["nope"]))
        assert none.status_code == 404
        await wait_until(lambda: len(fleet.router.state.traces) == 2)
        first = fleet.router.state.traces[0]
        assert (first.original_model, first.model, first.substitution) == (
            "gone:70b",
            "mistral:7b",
            "fallback_models",
        )


async def test_substitution_is_opt_in_after_the_named_models_and_refusable(
    tmp_path: Path,
) -> None:
    settings = RuntimeSettings(vram_fallback=True)
    async with fleet_and_client(tmp_path, settings) as (fleet, client):
        # A hot fallback the client named beats any stand-in.
        hot_named = await client.post(
            "/api/chat", json=chat("mistral:7b", fallback_models=["llama3.2:3b"])
        )
        assert hot_named.headers["x-herd-model"] == "llama3.2:3b"
        # Nothing named is loaded: a loaded model of the same category stands in, flagged.
        stand_in = await client.post(
            "/api/chat", json=chat("mistral:7b", fallback_models=["phi4:14b"])
        )
        assert stand_in.headers["x-herd-model"] == "llama3.2:3b"
        assert stand_in.headers["x-herd-fallback"] == "true"
        assert stand_in.json()["model"] == "llama3.2:3b"
        assert fleet.sims["beta"].cold_loads == 0
        # The request refuses it: by header, then by body field. The named model is loaded.
        by_header = await client.post(
            "/api/chat", json=chat("mistral:7b"), headers={"X-Herd-Allow-Substitution": "false"}
        )
        assert by_header.headers["x-herd-model"] == "mistral:7b"
        by_body = await client.post("/api/chat", json=chat("phi4:14b", allow_substitution=False))
        assert by_body.headers["x-herd-model"] == "phi4:14b"
        assert "allow_substitution" not in fleet.sims["beta"].requests[-1][1]  # ours, stripped
        bad = await client.post("/api/chat", json=chat("phi4:14b", allow_substitution="no"))
        assert bad.status_code == 400 and "allow_substitution" in bad.json()["error"]
        # A model no node has is never "substituted": it is a 404.
        unknown = await client.post("/api/chat", json=chat("mistral:8x7b"))
        assert unknown.status_code == 404
        # An embedding model is never replaced by a chat model.
        embedded = await client.post("/api/embed", json={"model": "nomic-embed-text", "input": "x"})
        assert embedded.headers["x-herd-model"] == "nomic-embed-text:latest"
        await wait_until(lambda: len(fleet.router.state.traces) == 6)  # the 400 is not traced
        substitutions = [t.substitution for t in fleet.router.state.traces]
        assert substitutions.count("vram") == 1
        assert fleet.router.state.events["vram_fallbacks"] == 1


async def test_context_protection_never_moves_to_another_model_by_default(
    tmp_path: Path,
) -> None:
    long_qwen = SimModel("qwen2.5:7b", size_bytes=5 * GiB, family="qwen2", context_length=32768)
    specs = [
        SimConfig(name="alpha", models=(LLAMA_3B,), loaded=("llama3.2:3b",)),
        SimConfig(name="beta", models=(long_qwen,), loaded=("qwen2.5:7b",)),
    ]
    async with (
        running_fleet(tmp_path, specs) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=30, trust_env=False) as client,
    ):
        reply = await client.post("/api/chat", json=chat("llama3.2:3b", options={"num_ctx": 16384}))
        assert reply.headers["x-herd-model"] == "llama3.2:3b"  # passed through, not qwen
        assert fleet.sims["alpha"].requests[-1][1]["options"] == {"num_ctx": 16384}
