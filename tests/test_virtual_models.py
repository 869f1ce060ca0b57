"""Virtual model names: coding agents' model ids and operator aliases mapped onto fleet models.
Pure resolution first, then a real router with simulated nodes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from herd.cli import flags_of, router_config, serve_parser
from herd.config import RouterConfig
from herd.core.errors import BadRequest
from herd.core.models import (
    AvailableModel,
    FleetSnapshot,
    LoadedModel,
    NodeReport,
    NodeSnapshot,
    NodeStatus,
)
from herd.core.policy import virtual
from herd.sim import SimConfig, SimModel
from herd.state.settings import RuntimeSettings, save_settings, updated
from tests.conftest import EMBED, GiB, running_fleet, wait_until


def fleet_of(*models: tuple[str, str], loaded: tuple[str, ...] = ()) -> FleetSnapshot:
    report = NodeReport(
        node_id="n",
        available_models=tuple(AvailableModel(n, parameter_size=p) for n, p in models),
        loaded_models=tuple(LoadedModel(n) for n in loaded),
    )
    return FleetSnapshot((NodeSnapshot(report, NodeStatus.ONLINE, 0.0),))


SIX = fleet_of(
    ("tiny:1b", "1B"),
    ("small:3b", "3B"),
    ("qwen2.5-coder:7b", "7B"),
    ("mid:8b", "8B"),
    ("big:32b", "32B"),
    ("huge:70b", "70B"),
    ("nomic-embed-text:latest", "137M"),
)


def test_agent_ids_resolve_by_size_tier() -> None:
    def first(name: str) -> tuple[str, ...]:
        resolution = virtual.resolve(name, SIX, (), agent_defaults=True)
        assert resolution is not None, name
        return resolution.groups[0]

    assert first("claude-3-5-haiku-latest") == ("tiny:1b", "small:3b")
    assert first("claude-opus-4-1") == ("huge:70b", "big:32b")
    assert first("gpt-5-codex") == ("huge:70b", "big:32b")
    assert first("gpt-5-mini") == ("tiny:1b", "small:3b")
    # The middle keeps clear of the ends, coding models first.
    assert first("claude-sonnet-4-5:latest") == ("qwen2.5-coder:7b", "mid:8b")
    assert first("o3") == ("qwen2.5-coder:7b", "mid:8b")
    # After its band, the rest of the chat models, so something always answers; never an
    # embedding model.
    everything = virtual.resolve("claude-sonnet-4-5", SIX, (), True)
    assert everything is not None and len(everything.candidates) == 6
    assert "nomic-embed-text:latest" not in everything.candidates
    # Not a virtual name: a real model, an unmatched name, the defaults off, no chat model.
    assert virtual.resolve("mid:8b", SIX, (), True) is None
    assert virtual.resolve("mistral:7b", SIX, (), True) is None
    assert virtual.resolve("claude-opus-4-1", SIX, (), False) is None
    assert (
        virtual.resolve("claude-x", fleet_of(("nomic-embed-text:latest", "137M")), (), True) is None
    )
    # One chat model: every tier is it.
    solo = fleet_of(("only:3b", "3B"))
    for name in ("claude-haiku", "claude-opus", "gpt-4o"):
        resolution = virtual.resolve(name, solo, (), True)
        assert resolution is not None and resolution.candidates == ("only:3b",)


def test_operator_aliases_come_first_and_are_checked() -> None:
    aliases = (
        virtual.parse_alias("claude-*=big:32b,mid:8b"),
        virtual.parse_alias("MyCoder=tiny:1b"),
    )
    resolution = virtual.resolve("claude-3-5-haiku", SIX, aliases, True)
    assert resolution is not None and resolution.groups == (("big:32b", "mid:8b"),)
    assert resolution.rule == "claude-*"
    mine = virtual.resolve("mycoder:latest", SIX, aliases, False)  # case-insensitive
    assert mine is not None and mine.candidates == ("tiny:1b",)
    with pytest.raises(ValueError, match="looks like"):
        virtual.parse_alias("claude-*")
    settings = updated(RuntimeSettings(), {"model_aliases": {"gpt-*": ["mid:8b"]}})
    assert settings.model_aliases == {"gpt-*": ["mid:8b"]}
    bad_aliases: tuple[object, ...] = ({"gpt-*": []}, {"gpt-*": "mid:8b"}, ["gpt-*"], {"": ["x"]})
    for bad in bad_aliases:
        with pytest.raises(BadRequest, match="model_aliases"):
            updated(RuntimeSettings(), {"model_aliases": bad})
    entries = dict(virtual.listed(aliases, True))
    assert entries["claude-*"] == ("big:32b", "mid:8b") and entries["gpt-*codex*"] == (
        "(large tier)",
    )


SMALL = SimModel("llama3.2:1b", size_bytes=GiB, parameter_size="1B")
CODER = SimModel("qwen2.5-coder:7b", size_bytes=5 * GiB, family="qwen2", parameter_size="7B")
LARGE = SimModel("qwen2.5:32b", size_bytes=20 * GiB, family="qwen2", parameter_size="32B")


def specs() -> list[SimConfig]:
    return [
        SimConfig(
            name="alpha",
            models=(SMALL, CODER, LARGE, EMBED),
            loaded=("llama3.2:1b",),
            memory_bytes=64 * GiB,
        )
    ]


def chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


async def test_agent_model_ids_are_served_by_fleet_models(tmp_path: Path) -> None:
    async with (
        running_fleet(tmp_path, specs()) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=30, trust_env=False) as client,
    ):
        haiku = await client.post("/v1/chat/completions", json=chat("claude-3-5-haiku-latest"))
        assert haiku.status_code == 200
        assert haiku.json()["model"] == "llama3.2:1b" == haiku.headers["x-herd-model"]
        opus = await client.post("/v1/chat/completions", json=chat("claude-opus-4-1"))
        assert opus.json()["model"] == "qwen2.5:32b"
        # Codex's model id: the large tier (here the 32B, hot since the last request).
        codex = await client.post("/v1/chat/completions", json=chat("gpt-5-codex"))
        assert codex.json()["model"] == "qwen2.5:32b"
        await wait_until(lambda: len(fleet.router.state.traces) == 3)
        first = fleet.router.state.traces[0]
        assert first.original_model == "claude-3-5-haiku-latest"
        assert (first.model, first.substitution) == ("llama3.2:1b", "alias")
        # Listed as virtual entries.
        models = (await client.get("/v1/models")).json()["data"]
        listed = {m["id"]: m for m in models}
        assert listed["claude-*haiku*"]["virtual"] is True
        assert "qwen2.5:32b" in listed and not listed["qwen2.5:32b"].get("virtual")
        tags = {m["name"]: m for m in (await client.get("/api/tags")).json()["models"]}
        assert tags["gpt-*codex*"]["virtual"] is True
        one = await client.get("/v1/models/claude-sonnet-4-5")
        assert one.status_code == 200 and one.json()["virtual"] is True


async def test_aliases_from_settings_and_turning_the_defaults_off(tmp_path: Path) -> None:
    settings = RuntimeSettings(model_aliases={"team-coder": ["qwen2.5-coder:7b", "llama3.2:1b"]})
    async with (
        running_fleet(tmp_path, specs(), settings) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=30, trust_env=False) as client,
    ):
        # llama3.2:1b is hot, the coder cold: the alias's hot candidate serves.
        hot = await client.post("/api/chat", json={**chat("team-coder"), "stream": False})
        assert hot.json()["model"] == "llama3.2:1b"
        assert hot.headers["x-herd-fallback"] == "false"  # an alias candidate, as configured
        changed = await client.post(
            "/dashboard/api/settings",
            json={"agent_defaults": False, "model_aliases": {"claude-*": ["qwen2.5:32b"]}},
        )
        assert changed.status_code == 200, changed.text
        aliased = await client.post("/v1/chat/completions", json=chat("claude-opus-4-1"))
        assert aliased.json()["model"] == "qwen2.5:32b"
        off = await client.post("/v1/chat/completions", json=chat("gpt-5-codex"))
        assert off.status_code == 404
        # An alias to models no node has is as unknown as the name.
        await client.post("/dashboard/api/settings", json={"model_aliases": {"x-*": ["nope:1b"]}})
        gone = await client.post("/v1/chat/completions", json=chat("x-model"))
        assert gone.status_code == 404


async def test_claude_code_and_codex_ids_through_their_own_apis(tmp_path: Path) -> None:
    import anthropic
    import openai

    from tests.conftest import in_thread

    async with running_fleet(tmp_path, specs()) as fleet:
        with anthropic.Anthropic(base_url=fleet.url, api_key="x", max_retries=0) as claude:
            message = await in_thread(
                lambda: claude.messages.create(
                    model="claude-sonnet-4-5-20250929",
                    max_tokens=64,
                    messages=[{"role": "user", "content": "hi"}],
                )
            )
        assert message.model == "qwen2.5-coder:7b"  # the mid tier, coding model first
        with openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0) as codex:
            response = await in_thread(
                lambda: codex.responses.create(model="gpt-5-codex", input="hi")
            )
        assert response.model == "qwen2.5:32b" and response.output_text
        await wait_until(lambda: len(fleet.router.state.traces) == 2)
        asked = [(t.original_model, t.model) for t in fleet.router.state.traces]
        assert asked == [
            ("claude-sonnet-4-5-20250929", "qwen2.5-coder:7b"),  # exactly as asked
            ("gpt-5-codex", "qwen2.5:32b"),
        ]


def config_from(tmp_path: Path, argv: list[str], environ: dict[str, str]) -> RouterConfig:
    """The router's configuration as ``herd ARGV`` builds it in that environment."""
    argv = ["--data-dir", str(tmp_path), *argv]
    return router_config(flags_of(serve_parser("herd", "router").parse_args(argv)), environ)


def virtual_options(config: RouterConfig) -> dict[str, Any]:
    return {"model_aliases": config.model_aliases, "agent_defaults": config.agent_defaults}


async def test_aliases_and_agent_defaults_from_flags_and_environment_route_requests(
    tmp_path: Path,
) -> None:
    # A saved setting the flags must beat at start.
    save_settings(tmp_path, RuntimeSettings(model_aliases={"team-coder": ["llama3.2:1b"]}))
    flags = config_from(
        tmp_path,
        [
            "--model-alias",
            "team-coder=qwen2.5-coder:7b",
            "--model-alias",
            "claude-*haiku*=qwen2.5:32b",
            "--agent-defaults",
            "false",
        ],
        {},
    )
    async with (
        running_fleet(tmp_path, specs(), **virtual_options(flags)) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=30, trust_env=False) as client,
    ):
        coder = await client.post("/api/chat", json={**chat("team-coder"), "stream": False})
        assert coder.status_code == 200, coder.text
        assert coder.json()["model"] == "qwen2.5-coder:7b" == coder.headers["x-herd-model"]
        # The alias beats the small tier a haiku id would otherwise get (llama3.2:1b).
        haiku = await client.post("/v1/chat/completions", json=chat("claude-3-5-haiku-latest"))
        assert haiku.json()["model"] == "qwen2.5:32b"
        # Agent defaults off: an agent id with no alias is as unknown as any name.
        codex = await client.post("/v1/chat/completions", json=chat("gpt-5-codex"))
        assert codex.status_code == 404
        assert "gpt-5-codex" in codex.json()["error"]["message"]
        await wait_until(lambda: len(fleet.router.state.traces) == 3)
        asked = [(t.original_model, t.model, t.substitution) for t in fleet.router.state.traces]
        assert asked[:2] == [
            ("team-coder", "qwen2.5-coder:7b", "alias"),
            ("claude-3-5-haiku-latest", "qwen2.5:32b", "alias"),
        ]
        listed = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
        assert listed["team-coder"]["virtual"] is True
        assert "gpt-*codex*" not in listed

    environ = {
        "FLEET_MODEL_ALIASES": "team-coder=llama3.2:1b,qwen2.5-coder:7b;claude-*=llama3.2:1b",
        "FLEET_AGENT_DEFAULTS": "on",
    }
    env = config_from(tmp_path / "env", [], environ)
    assert env.model_aliases == ("team-coder=llama3.2:1b,qwen2.5-coder:7b", "claude-*=llama3.2:1b")
    async with (
        running_fleet(tmp_path / "env", specs(), **virtual_options(env)) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=30, trust_env=False) as client,
    ):
        # Opus is the large tier by default (qwen2.5:32b); the alias sends it to the 1B.
        opus = await client.post("/v1/chat/completions", json=chat("claude-opus-4-1"))
        assert opus.json()["model"] == "llama3.2:1b"
        team = await client.post("/api/chat", json={**chat("team-coder"), "stream": False})
        assert team.json()["model"] == "llama3.2:1b"  # the hot candidate of the two
        codex = await client.post("/v1/chat/completions", json=chat("gpt-5-codex"))
        assert codex.json()["model"] == "qwen2.5:32b"  # agent defaults on: the large tier
        await wait_until(lambda: len(fleet.router.state.traces) == 3)
        served = [(t.original_model, t.model) for t in fleet.router.state.traces]
        assert served == [
            ("claude-opus-4-1", "llama3.2:1b"),
            ("team-coder", "llama3.2:1b"),
            ("gpt-5-codex", "qwen2.5:32b"),
        ]
