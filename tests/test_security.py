"""API keys and the fleet token, against a running router."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import openai
import pytest

from herd.security import key_ok, presented_key
from tests.conftest import in_thread, running_fleet, two_node_specs

KEY = "sk-herd-test-1234"


async def test_api_keys_guard_every_endpoint_but_liveness_and_the_page(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with (
        running_fleet(tmp_path, two_node_specs(), api_keys=(KEY, "other")) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=10, trust_env=False) as client,
    ):
        body = {
            "model": "llama3.2:3b",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": False,
        }
        for path in (
            "/api/tags",
            "/fleet/status",
            "/metrics",
            "/dashboard/api/overview",
            "/dashboard/events",
        ):
            response = await client.get(path)
            assert response.status_code == 401, path
        ollama_shape = await client.post("/api/chat", json=body)
        assert ollama_shape.status_code == 401
        assert "API key" in ollama_shape.json()["error"]
        openai_shape = await client.post("/v1/chat/completions", json=body)
        assert openai_shape.json()["error"]["type"] == "authentication_error"
        wrong = await client.post("/api/chat", json=body, headers={"Authorization": "Bearer no"})
        assert wrong.status_code == 401
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-Api-Key": "other"}):
            ok = await client.post("/api/chat", json=body, headers=headers)
            assert ok.status_code == 200
        assert (await client.get("/")).status_code == 200
        assert (await client.get("/dashboard")).status_code == 200
        assert (await client.get(f"/dashboard/api/overview?key={KEY}")).status_code == 200
        # The OpenAI SDK's api_key is exactly what the router wants.
        with openai.OpenAI(base_url=fleet.url + "/v1", api_key=KEY, max_retries=0) as sdk:
            reply = await in_thread(
                lambda: sdk.chat.completions.create(
                    model="llama3.2:3b", messages=[{"role": "user", "content": "hi"}]
                )
            )
            assert reply.choices[0].message.content
        with (
            openai.OpenAI(base_url=fleet.url + "/v1", api_key="wrong", max_retries=0) as sdk,
            pytest.raises(openai.AuthenticationError),
        ):
            await in_thread(lambda: sdk.models.list())
    # herd never logs a key (the test's own HTTP client logs its URLs; those don't count).
    herd_lines = [r.getMessage() for r in caplog.records if r.name.startswith("herd")]
    assert herd_lines and not any("sk-herd" in line for line in herd_lines)


def test_key_extraction_and_comparison() -> None:
    def scope(headers: list[tuple[bytes, bytes]], query: bytes = b"") -> dict[str, object]:
        return {"headers": headers, "query_string": query}

    assert presented_key(scope([(b"authorization", b"Bearer abc")])) == "abc"
    assert presented_key(scope([(b"x-api-key", b" abc ")])) == "abc"
    assert presented_key(scope([], b"key=abc&hours=24")) == "abc"
    assert presented_key(scope([(b"authorization", b"Basic abc")])) is None
    assert key_ok(("a", "b"), "b") and not key_ok(("a",), None) and not key_ok(("a",), "ab")


async def test_limits_answer_in_the_callers_shape(tmp_path: Path) -> None:
    from herd.proxy import handler

    async with (
        running_fleet(tmp_path, two_node_specs()) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=10, trust_env=False) as client,
    ):
        many = [{"role": "user", "content": "x"}] * 10_001
        response = await client.post("/api/chat", json={"model": "llama3.2:3b", "messages": many})
        assert response.status_code == 400 and "too many messages" in response.json()["error"]
        # One client with too much in flight gets 429 (the limit lowered for the test).
        original = handler.PER_CLIENT_LIMIT
        handler.PER_CLIENT_LIMIT = 0
        try:
            limited = await client.post(
                "/v1/chat/completions",
                json={"model": "llama3.2:3b", "messages": [{"role": "user", "content": "x"}]},
            )
        finally:
            handler.PER_CLIENT_LIMIT = original
        assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
        assert limited.json()["error"]["type"] == "rate_limit_error"
        huge_header = await client.get("/api/tags", headers={"X-Big": "x" * 100_000})
        assert huge_header.status_code in (400, 431)
        assert (await client.get("/api/tags")).status_code == 200  # still serving
