"""The router's lines for an operator, on a real router with simulated nodes: a node's backend
going down and coming back (one line each, from heartbeats), one access line per request however
long its stream, and the JSONL formatter writing a record's structured fields."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest
import trio

from herd.logs import ACCESS_LOGGER, JsonLines, fields
from tests.conftest import running_fleet, two_node_specs


async def test_the_router_logs_a_backend_going_down_and_coming_back_once_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="herd.router")
    async with running_fleet(tmp_path, two_node_specs()) as fleet:
        record = fleet.router.state.registry.get

        async def heartbeats_until(healthy: bool, count: int) -> None:
            """``count`` more heartbeats from alpha, the last saying ``healthy``."""
            stats = fleet.router.state.registry.statistics
            for _ in range(count):
                seen = stats().heartbeats
                fleet.agents["alpha"].wake()
                while stats().heartbeats == seen:
                    await fleet.router.state.wait_fleet_changed()
            alpha = record("alpha")
            assert alpha is not None and alpha.report.backend.healthy is healthy

        with trio.fail_after(20):
            fleet.sims["alpha"].fail_probes("http500")
            await heartbeats_until(healthy=False, count=3)
            fleet.sims["alpha"].clear_probe_failure()
            await heartbeats_until(healthy=True, count=3)
    about_alpha = [
        r for r in caplog.records if r.name == "herd.router" and "alpha: backend" in r.message
    ]
    down, back = about_alpha  # one each, however many heartbeats said so
    assert down.levelno == logging.WARNING
    assert down.message.startswith("node alpha: backend down: " + fleet.sims["alpha"].url)
    assert "HTTP 500" in down.message
    assert back.levelno == logging.INFO and back.message == "node alpha: backend is back"
    assert not [r for r in caplog.records if "beta: backend" in r.message]


async def test_one_access_line_per_request_not_per_chunk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    async with (
        running_fleet(tmp_path, two_node_specs()) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=10, trust_env=False) as client,
    ):
        chunks = 0
        body = {
            "model": "llama3.2:3b",
            "messages": [{"role": "user", "content": "a long answer please"}],
            "options": {"num_predict": 60},
        }
        async with client.stream("POST", "/api/chat", json=body) as streamed:
            async for _ in streamed.aiter_lines():
                chunks += 1
        missing = await client.post(
            "/v1/chat/completions",
            json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
        )
        with trio.fail_after(5):
            while len(fleet.router.state.traces) < 2:
                await trio.testing.wait_all_tasks_blocked()
    assert chunks > 50 and missing.status_code == 404
    lines = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    assert len(lines) == 2
    ok, failed = lines
    assert ok.levelno == logging.INFO
    assert ok.message.startswith(streamed.headers["x-herd-request-id"] + " llama3.2:3b -> ")
    assert " completed 200, " in ok.message and ok.message.endswith(" tok/s")
    assert ok.extra["node"] == streamed.headers["x-herd-node"]  # type: ignore[attr-defined]
    assert ok.extra["tokens_per_second"] > 0  # type: ignore[attr-defined]
    assert failed.message.startswith(
        missing.headers["x-herd-request-id"] + " no-such-model:latest -> "
    )
    assert " on -: failed 404, " in failed.message and failed.message.endswith(", - tok/s")
    assert "not found on any node" in failed.extra["error"]  # type: ignore[attr-defined]


def test_the_jsonl_formatter_writes_a_records_fields_as_keys() -> None:
    record = logging.LogRecord("herd.access", logging.INFO, __file__, 1, "id %s", ("x",), None)
    for key, value in fields(request_id="x", ms=12.5, node=None, message="not this").items():
        setattr(record, key, value)
    line = json.loads(JsonLines().format(record))
    assert line["message"] == "id x" and line["logger"] == "herd.access"
    assert line["request_id"] == "x" and line["ms"] == 12.5 and line["node"] is None
    plain = logging.LogRecord("herd", logging.INFO, __file__, 1, "plain", None, None)
    assert set(json.loads(JsonLines().format(plain))) == {"ts", "level", "logger", "message"}


async def test_a_model_asked_for_while_a_backend_is_down_says_so(tmp_path: Path) -> None:
    """beta's backend has never answered, so nobody knows what models it has: a request for a
    model no node lists is still a 404 at once (it may be a typo), but it says beta's backend
    is down instead of only "not found"."""
    dead = "http://127.0.0.1:1"  # nothing listens on port 1 of loopback
    async with (
        running_fleet(
            tmp_path, two_node_specs(), agent_options={"beta": {"ollama_url": dead}}
        ) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=10, trust_env=False) as client,
    ):
        beta = fleet.router.state.registry.get("beta")
        assert beta is not None and not beta.report.backend.healthy
        answer = await client.post("/api/generate", json={"model": "qwen3:8b", "prompt": "x"})
        assert answer.status_code == 404
        message = answer.json()["error"]
        assert "model 'qwen3:8b' not found on any node" in message
        assert "beta's backend is down" in message and "models are not known yet" in message
        assert "alpha" not in message  # alpha answered: its lists are known
        served = await client.post(
            "/api/generate", json={"model": "llama3.2:3b", "prompt": "x", "stream": False}
        )
        assert served.status_code == 200
