"""Hostile input: Hypothesis throws malformed, truncated, wrong-typed, huge and non-UTF-8 input at
every endpoint of a live router, and junk at the nodes' socket. Nothing may answer 500, crash,
hang, or leave a request counted; the router keeps serving."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import open_websocket_url

from herd.models import NodeReport
from herd.wire import report_to_json
from tests.conftest import Fleet, running_fleet, two_node_specs

POST_PATHS = [
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/api/show",
    "/api/pull",
    "/api/generate-image",
    "/v1/images/generations",
    "/dashboard/api/settings",
    "/dashboard/api/benchmarks",
    "/dashboard/api/pull",
    "/dashboard/api/delete",
]
GET_PATHS = [
    "/api/tags",
    "/api/ps",
    "/api/version",
    "/v1/models",
    "/fleet/status",
    "/dashboard/api/traces",
    "/dashboard/api/trends",
    "/dashboard/api/health",
    "/metrics",
    "/v1/models/x",
    "/api/image-models",
]
KEYS = [
    "model",
    "messages",
    "prompt",
    "input",
    "stream",
    "options",
    "tools",
    "format",
    "keep_alive",
    "metadata",
    "fallback_models",
    "max_tokens",
    "stop",
    "name",
    "node_id",
    "width",
    "height",
    "steps",
    "seed",
    "size",
    "n",
    "response_format",
    "auto_pull",
    "stale_timeout",
    "results",
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
bodies = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), json_values, max_size=8)
models = st.sampled_from(["llama3.2:3b", "qwen2.5:7b", "nomic-embed-text", "", "x" * 300])


class Live:
    """The running router (with a short repr: Hypothesis prints its arguments)."""

    def __init__(self, url: str, fleet: Fleet) -> None:
        self.url, self.fleet = url, fleet

    def __iter__(self) -> Iterator[Any]:
        return iter((self.url, self.fleet))

    def __repr__(self) -> str:
        return f"Live({self.url})"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A router with two simulated nodes, in its own thread, for synchronous Hypothesis tests."""
    box: dict[str, Any] = {}
    ready, stop = threading.Event(), threading.Event()

    async def main() -> None:
        path = tmp_path_factory.mktemp("fuzz")
        async with running_fleet(Path(path), two_node_specs(), queue_timeout=0.5) as fleet:
            fleet.router.state.settings.auto_pull = False
            box["fleet"] = fleet
            ready.set()
            await trio.to_thread.run_sync(stop.wait)

    thread = threading.Thread(target=lambda: trio.run(main), daemon=True)
    thread.start()
    assert ready.wait(30), "the router did not start"
    yield Live(box["fleet"].url, box["fleet"])
    stop.set()
    thread.join(30)


def check(response: httpx.Response) -> None:
    assert response.status_code < 500 or response.status_code in (502, 503), (
        response.status_code,
        response.text[:300],
    )
    if response.status_code >= 400 and response.headers.get("content-type", "").startswith(
        "application/json"
    ):
        error = response.json()["error"]
        assert error if isinstance(error, str) else error["message"]


FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(path=st.sampled_from(POST_PATHS), body=bodies, model=models)
def test_json_bodies_of_any_shape(live: Live, path: str, body: dict[str, Any], model: str) -> None:
    url, _ = live
    if "model" not in body:
        body["model"] = model
    with httpx.Client(base_url=url, timeout=20, trust_env=False) as client:
        raw = json.dumps(body, allow_nan=True).encode()
        check(client.post(path, content=raw, headers={"content-type": "application/json"}))


async def test_junk_on_the_fleet_socket(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, two_node_specs()) as fleet:
        ws_url = fleet.url.replace("http://", "ws://") + "/fleet/ws"
        junk: list[str | bytes] = [
            "not json",
            b"\xff\xfe\x00binary",
            "[1, 2, 3]",
            '{"type": "heartbeat"}',
            '{"type": "heartbeat", "node": {"node_id": 5}}',
            '{"type": "heartbeat", "node": {"node_id": "x", "in_flight": -3, '
            '"memory": {"total_bytes": "lots"}}}',
            '{"type": "heartbeat", "node": {"node_id": "x", "surprise": true}}',
            '{"type": "who-knows"}',
            "[" * 50_000 + "]" * 50_000,
            "x" * (5 * 2**20),
            '{"type": "heartbeat", "node": {"node_id": "x", "cpu": {"percent": NaN}}}',
        ]
        with trio.fail_after(20):
            async with open_websocket_url(ws_url, max_message_size=2**24) as ws:
                for message in junk:
                    await ws.send_message(message)
                    reply = json.loads(await ws.get_message())
                    assert reply["type"] == "error" and reply["message"]
                # After all that, a good heartbeat is still accepted.
                await ws.send_message(report_to_json(NodeReport(node_id="survivor")))
                assert json.loads(await ws.get_message())["type"] == "ack"
            # A second socket can't speak for a node another socket registered as.
            async with open_websocket_url(ws_url) as ws:
                await ws.send_message(report_to_json(NodeReport(node_id="first")))
                assert json.loads(await ws.get_message())["type"] == "ack"
                await ws.send_message(report_to_json(NodeReport(node_id="alpha")))
                reply = json.loads(await ws.get_message())
                assert reply["type"] == "error" and "belongs to node 'first'" in reply["message"]
        async with httpx.AsyncClient(base_url=fleet.url, trust_env=False) as client:
            assert (await client.get("/fleet/status")).status_code == 200
