"""Hostile input: Hypothesis throws malformed, truncated, wrong-typed, huge and non-UTF-8 input at
every endpoint of a live router, and junk at the nodes' socket. Nothing may answer 500, crash,
hang, or leave a request counted; the router keeps serving."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import open_websocket_url

from herd.core.models import NodeReport
from herd.core.wire import report_to_json
from tests.conftest import LLAMA_3B, Fleet, running_fleet, two_node_specs, wait_until

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

    def __init__(self, url: str, fleet: Fleet, token: trio.lowlevel.TrioToken) -> None:
        self.url, self.fleet, self.token = url, fleet, token

    def __repr__(self) -> str:
        return f"Live({self.url})"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A router with two simulated nodes, in its own thread, for synchronous Hypothesis tests."""
    box: dict[str, Any] = {}
    ready, stop = threading.Event(), threading.Event()

    async def main() -> None:
        path = tmp_path_factory.mktemp("fuzz")
        # The registry lets the last test pull a model back: the fuzzing may delete any.
        specs = [attrs.evolve(spec, registry=(LLAMA_3B,)) for spec in two_node_specs()]
        async with running_fleet(Path(path), specs, queue_timeout=0.5) as fleet:
            fleet.router.state.settings.auto_pull = False
            box["fleet"] = fleet
            box["token"] = trio.lowlevel.current_trio_token()
            ready.set()
            await trio.to_thread.run_sync(stop.wait)

    thread = threading.Thread(target=lambda: trio.run(main), daemon=True)
    thread.start()
    assert ready.wait(30), "the router did not start"
    yield Live(box["fleet"].url, box["fleet"], box["token"])
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
    url = live.url
    if "model" not in body:
        body["model"] = model
    with httpx.Client(base_url=url, timeout=20, trust_env=False) as client:
        raw = json.dumps(body, allow_nan=True).encode()
        check(client.post(path, content=raw, headers={"content-type": "application/json"}))


def _json_object(body: bytes) -> bool:
    """Is ``body`` a JSON object by the standard library's reading (which is laxer than the
    router's: it takes NaN)?"""
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False


def _truncated(data: st.DataObject) -> bytes:
    """A valid request body cut short at any byte."""
    body = json.dumps(data.draw(bodies, label="body"), allow_nan=True).encode()
    return body[: data.draw(st.integers(0, max(0, len(body) - 1)), label="cut")]


raw_bodies = st.one_of(
    st.binary(max_size=300),  # anything, mostly not UTF-8
    st.text(max_size=100).map(lambda t: t.encode("utf-16")),  # UTF-16 (with a BOM)
    st.sampled_from(
        [
            b"",
            b"null",
            b"[]",
            b'"just a string"',
            b"1e999999",
            b'{"model": "\\ud800"}',  # a lone surrogate escape
            b'{"model": "llama3.2:3b", "messages": [' + b"[" * 10_000 + b"]" * 10_000 + b"]}",
            b'{"model": "llama3.2:3b", "model": "qwen2.5:7b", "messages": []}',  # duplicate key
            b'{"model": "llama3.2:3b", "messages": [], "options": {"num_ctx": -5}}',
            b'{"model": "llama3.2:3b", "prompt": "x", "options": {"num_predict": NaN}}',
            b'\xef\xbb\xbf{"model": "llama3.2:3b", "messages": []}',  # a UTF-8 BOM
        ]
    ),
)


@FUZZ
@given(
    path=st.sampled_from(POST_PATHS),
    data=st.data(),
    content_type=st.sampled_from(
        ["application/json", "text/plain", "application/x-www-form-urlencoded", ""]
    ),
)
def test_raw_truncated_and_non_utf8_bodies(
    live: Live, path: str, data: st.DataObject, content_type: str
) -> None:
    url = live.url
    body = data.draw(raw_bodies, label="raw") if data.draw(st.booleans()) else _truncated(data)
    headers = {"content-type": content_type} if content_type else {}
    with httpx.Client(base_url=url, timeout=20, trust_env=False) as client:
        response = client.post(path, content=body, headers=headers)
        check(response)
        if path in ("/api/chat", "/v1/chat/completions") and not _json_object(body):
            assert response.status_code == 400, response.text  # named as such


@FUZZ
@given(
    path=st.sampled_from(GET_PATHS),
    query=st.dictionaries(
        st.sampled_from(["hours", "limit", "model", "node", "key", "x"]),
        st.text(max_size=12) | st.integers(-(2**40), 2**40).map(str),
        max_size=3,
    ),
)
def test_query_strings_of_any_shape(live: Live, path: str, query: dict[str, str]) -> None:
    url = live.url
    with httpx.Client(base_url=url, timeout=20, trust_env=False) as client:
        check(client.get(path, params=query))


def test_after_the_fuzzing_nothing_is_left_counted(live: Live) -> None:
    """Runs after the fuzz tests above (same module, file order): every counter is back to
    zero and the router still routes."""
    url, fleet = live.url, live.fleet
    with httpx.Client(base_url=url, timeout=20, trust_env=False) as client:
        # The fuzzing may have deleted it (delete is among the endpoints): pull it back.
        pulled = client.post("/api/pull", json={"model": "llama3.2:3b", "stream": False})
        assert pulled.status_code == 200, pulled.text
        ok = client.post(
            "/api/chat",
            json={
                "model": "llama3.2:3b",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": False,
            },
        )
        assert ok.status_code == 200, ok.text

    # The router finishes its books just after the reply (the per-client count last of all):
    # wait for that in its own thread.
    def settled() -> bool:
        return fleet.counters_idle() and fleet.router.state.in_progress_by_client == {}

    trio.from_thread.run(wait_until, settled, trio_token=live.token)


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
