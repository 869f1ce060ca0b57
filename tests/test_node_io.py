"""What the router sends to nodes and how it reads what they send back: the fleet token only to
herd's own node agents, every read bounded, compressed answers refused, a non-streamed
request judged by its first token. Real router; simulated nodes and a rogue backend, both real
HTTP servers on loopback."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
import trio.testing

from herd.config import NodeConfig
from herd.http.service import Router
from herd.node.agent import AgentConfig, NodeAgent
from herd.node.service import Node
from herd.server import serve_app
from herd.sim import SimConfig, SimModel, run_sim
from herd.transport.bodies import LINE_LIMIT, SHOW_LIMIT
from tests.conftest import LLAMA_3B, GiB, running_fleet, wait_until

Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

MODEL = {"name": "m:latest", "model": "m:latest", "size": GiB, "details": {"family": "llama"}}


@attrs.define(eq=False)
class RogueBackend:
    """Ollama's read API, honestly; whatever ``answers`` says for everything else: a handler
    per (method, path) that gets ``send``."""

    answers: dict[tuple[str, str], Callable[[Send], Awaitable[None]]] = attrs.field(factory=dict)
    url: str = ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = (await receive())["type"]
                await send({"type": f"{event}.complete"})
                if event == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        key = (scope["method"], scope["path"])
        if key in self.answers:
            await self.answers[key](send)
            return
        body: Any = {
            "/api/version": {"version": "0.12.0"},
            "/api/ps": {"models": []},
            "/api/tags": {"models": [MODEL]},
        }.get(scope["path"], {"error": "not here"})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})


@contextlib.asynccontextmanager
async def rogue_node(router: Router, backend: RogueBackend) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        backend.url = await nursery.start(serve_app, backend, "127.0.0.1", 0)
        agent = NodeAgent(
            AgentConfig(router_url=router.url, ollama_url=backend.url, node_id="rogue")
        )
        await nursery.start(agent.run)
        with trio.fail_after(10):
            await router.wait_nodes(1)
        yield
        nursery.cancel_scope.cancel()


async def test_the_fleet_token_goes_to_node_agents_never_to_backends(tmp_path: Path) -> None:
    async with (
        running_fleet(
            tmp_path, [SimConfig(name="solo", models=(LLAMA_3B,))], auth_token="t0k"
        ) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=30, trust_env=False) as client,
    ):
        body = {"model": "llama3.2:3b", "messages": [{"role": "user", "content": "hi"}]}
        assert (await client.post("/api/chat", json=body)).status_code == 200
        assert (await client.post("/api/show", json={"model": "llama3.2:3b"})).status_code == 200
        seen = fleet.sims["solo"].seen
        assert {path for _, path, _ in seen} >= {"/api/chat", "/api/show", "/api/tags"}
        assert not [headers for _, _, headers in seen if "authorization" in headers]
        # No compression asked for: the router relays bytes and reads bodies raw.
        chats = [headers for _, path, headers in seen if path == "/api/chat"]
        assert chats[-1]["accept-encoding"] == "identity"


TOKEN = "fleet-t0ken-never-for-backends"
KEY = "sk-client-key-stops-at-the-router"


async def test_neither_the_fleet_token_nor_a_client_key_reaches_a_backend(
    tmp_path: Path,
) -> None:
    """One node whose backend the router calls directly, one behind its node's LAN proxy (the
    router presents the fleet token there; the node strips it). Every kind of call a client can
    cause, with the client's API key sent both ways clients send it: no backend sees either."""
    direct = SimConfig(name="direct", models=(LLAMA_3B,), loaded=("llama3.2:3b",))
    behind = SimConfig(name="lan", models=(LLAMA_3B,), loaded=("llama3.2:3b",))
    async with (
        running_fleet(tmp_path, [direct], auth_token=TOKEN, api_keys=(KEY,)) as fleet,
        run_sim(behind) as lan_sim,
        trio.open_nursery() as nursery,
    ):
        node = Node(
            NodeConfig(
                router_url=fleet.url,
                ollama_url=lan_sim.url,
                node_id="lan",
                host="127.0.0.1",
                port=0,
                data_dir=str(tmp_path / "node"),
                lan_proxy="always",
                auth_token=TOKEN,
            )
        )
        await nursery.start(node.run)
        with trio.fail_after(10):
            await fleet.router.wait_nodes(2)
        lan = fleet.router.fleet.node("lan")
        assert lan is not None and lan.report.backend.proxied
        assert lan.report.backend.url == f"{node.url}/backend"
        sims = {"direct": fleet.sims["direct"], "lan": lan_sim}
        bearer = {"Authorization": f"Bearer {KEY}"}
        weights = b"GGUF" + bytes(range(256))
        digest = "sha256:" + hashlib.sha256(weights).hexdigest()
        hello = [{"role": "user", "content": "hi"}]
        async with httpx.AsyncClient(
            base_url=fleet.url, timeout=30, trust_env=False, headers=bearer
        ) as client:
            for name in sims:
                on = {"metadata": {"node": name}}
                calls = [
                    client.post(
                        "/api/chat",
                        json={"model": "llama3.2:3b", "messages": hello, "stream": False, **on},
                    ),
                    client.post(
                        "/api/generate", json={"model": "llama3.2:3b", "prompt": "x", **on}
                    ),
                    client.post(
                        "/v1/chat/completions",
                        json={"model": "llama3.2:3b", "messages": hello, **on},
                    ),
                    client.post(
                        "/v1/messages",
                        json={"model": "llama3.2:3b", "max_tokens": 8, "messages": hello},
                        headers={"Authorization": "", "X-Api-Key": KEY},
                    ),
                    client.post(
                        "/api/copy",
                        json={"source": "llama3.2:3b", "destination": "mine", "node_id": name},
                    ),
                    client.post(f"/api/blobs/{digest}?node_id={name}", content=weights),
                    client.head(f"/api/blobs/{digest}?node_id={name}"),
                    client.post(
                        "/api/create",
                        json={"model": "built", "files": {"m.gguf": digest}, "node_id": name},
                    ),
                    client.post("/api/push", json={"model": "mine", "node_id": name}),
                    client.request(
                        "DELETE", "/api/delete", json={"model": "mine", "node_id": name}
                    ),
                ]
                for call in calls:
                    answer = await call
                    assert answer.status_code < 300, (name, answer.request.url, answer.text)
            # Fanned out to every holder: a load, then an unload.
            load = await client.post("/api/chat", json={"model": "llama3.2:3b", "messages": []})
            assert sorted(load.headers["x-herd-node"].split(",")) == ["direct", "lan"]
            shown = await client.post("/api/show", json={"model": "llama3.2:3b"})
            assert shown.status_code == 200
            unload = await client.post(
                "/api/generate", json={"model": "llama3.2:3b", "keep_alive": 0, "stream": False}
            )
            assert sorted(unload.headers["x-herd-node"].split(",")) == ["direct", "lan"]
        for name, sim in sims.items():
            paths = {(method, path) for method, path, _ in sim.seen}
            assert {
                ("POST", "/api/chat"),
                ("POST", "/api/copy"),
                ("HEAD", f"/api/blobs/{digest}"),
            } <= paths, name
            leaked = [
                (method, path, header)
                for method, path, headers in sim.seen
                for header, value in headers.items()
                if TOKEN in value or KEY in value or header in ("authorization", "x-api-key")
            ]
            assert leaked == [], name
        # The proxy itself is for the fleet: without the token it refuses. A caller that has
        # the token gets through, but its keys stop at the proxy too.
        async with httpx.AsyncClient(base_url=node.url or "", trust_env=False) as stranger:
            assert (await stranger.get("/backend/api/tags")).status_code == 401
            fleet_member = {"Authorization": f"Bearer {TOKEN}", "X-Api-Key": KEY}
            via_proxy = await stranger.get("/backend/api/tags", headers=fleet_member)
            assert via_proxy.status_code == 200
            method, path, headers = lan_sim.seen[-1]
            assert (method, path) == ("GET", "/api/tags")
            assert "x-api-key" not in headers and "authorization" not in headers
        nursery.cancel_scope.cancel()


def gzip_bomb() -> bytes:
    return gzip.compress(b" " * (64 * 2**20), compresslevel=9)  # 64 MiB in about 64 KiB


async def answer(send: Send, status: int, body: bytes, *headers: tuple[bytes, bytes]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body})


async def test_oversized_and_compressed_answers_are_refused_not_read(tmp_path: Path) -> None:
    bomb = gzip_bomb()
    assert len(bomb) < 128 * 1024
    backend = RogueBackend()
    backend.answers[("POST", "/api/show")] = lambda send: answer(
        send, 200, bomb, (b"content-encoding", b"gzip")
    )
    backend.answers[("POST", "/api/chat")] = lambda send: answer(
        send,
        500,
        b"x" * (8 * 2**20),  # an 8 MiB error page
    )
    backend.answers[("POST", "/api/generate")] = lambda send: answer(
        send, 200, bomb, (b"content-encoding", b"gzip")
    )
    config_dir = tmp_path
    from herd.config import RouterConfig

    config = RouterConfig(host="127.0.0.1", port=0, data_dir=str(config_dir), max_retries=0)
    async with (
        Router(config) as router,
        rogue_node(router, backend),
        httpx.AsyncClient(base_url=router.url, timeout=30, trust_env=False) as client,
    ):
        show = await client.post("/api/show", json={"model": "m"})
        assert show.status_code == 502
        assert "gzip-encoded" in show.json()["error"]
        chat = await client.post(
            "/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert chat.status_code == 502
        assert len(chat.json()["error"]) < 500  # a short detail, not 8 MiB
        generate = await client.post("/api/generate", json={"model": "m", "prompt": "x"})
        assert generate.status_code == 502
        assert "gzip-encoded" in generate.json()["error"]
        # The router is fine and its books are balanced.
        assert router.state.queues.statistics().in_flight == 0


async def test_a_show_answer_over_the_limit_fails_clearly(tmp_path: Path) -> None:
    backend = RogueBackend()
    huge = b'{"modelfile": "' + b"x" * (SHOW_LIMIT + 1) + b'"}'
    backend.answers[("POST", "/api/show")] = lambda send: answer(send, 200, huge)
    from herd.config import RouterConfig

    async with (
        Router(RouterConfig(host="127.0.0.1", port=0, data_dir=str(tmp_path))) as router,
        rogue_node(router, backend),
        httpx.AsyncClient(base_url=router.url, timeout=30, trust_env=False) as client,
    ):
        show = await client.post("/api/show", json={"model": "m"})
        assert show.status_code == 502
        assert "over the 32 MiB limit" in show.json()["error"]


async def test_a_stream_line_without_end_is_cut_at_the_line_limit(tmp_path: Path) -> None:
    async def endless_line(send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-ndjson")],
            }
        )
        chunk = b"x" * 2**20
        for _ in range(LINE_LIMIT // len(chunk) + 2):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"\n"})

    backend = RogueBackend()
    backend.answers[("POST", "/api/chat")] = endless_line
    from herd.config import RouterConfig

    async with (
        Router(RouterConfig(host="127.0.0.1", port=0, data_dir=str(tmp_path))) as router,
        rogue_node(router, backend),
        httpx.AsyncClient(base_url=router.url, timeout=30, trust_env=False) as client,
    ):
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        reply = await client.post("/v1/chat/completions", json=body)
        assert "over" in reply.text and "[DONE]" in reply.text
        whole = await client.post("/api/chat", json={**body, "stream": False})
        assert whole.status_code == 502 and "line over" in whole.json()["error"]


SLOW = SimModel("slow:latest", size_bytes=GiB, tokens_per_second=1.0)


async def test_a_non_streamed_request_is_judged_by_its_first_token_and_run_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    specs = [
        SimConfig(name="alpha", models=(SLOW,), loaded=("slow:latest",)),
        SimConfig(name="beta", models=(SLOW,), loaded=("slow:latest",)),
    ]
    async with (
        running_fleet(tmp_path, specs, first_byte_timeout=3.0) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=None, trust_env=False) as client,
    ):
        # Ten tokens at one a second: ten seconds of generation, first token after one.
        for path, body in (
            ("/api/generate", {"prompt": "x"}),
            ("/api/chat", {"messages": [{"role": "user", "content": "x"}]}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ):
            start = trio.current_time()
            reply = await client.post(
                path,
                json={"model": "slow", "stream": False, "options": {"num_predict": 10}, **body},
            )
            assert reply.status_code == 200, reply.text
            assert reply.headers["x-herd-retries"] == "0"
            assert 10 <= trio.current_time() - start < 11
        served = sum(len(sim.requests) for sim in fleet.sims.values())
        assert served == 3  # each ran once, on one node
        # A node that sends nothing at all is abandoned after the first-byte timeout, its
        # request closed, and the work goes to the other node: the attempt is known dead.
        fleet.sims["alpha"].fail("hang", times=1)
        fleet.sims["beta"].fail("hang", times=1)
        reply = await client.post(
            "/api/generate", json={"model": "slow", "prompt": "x", "stream": False}
        )
        assert reply.status_code == 504
        assert reply.headers["x-herd-retries"] == "1"
        assert "no first byte within 3 s" in reply.json()["error"]
        await wait_until(lambda: all(sim.open_streams == 0 for sim in fleet.sims.values()))


THINKER = SimModel("thinker:8b", size_bytes=GiB, thinking=True, thinking_tokens=3)


async def test_non_streamed_answers_are_what_ollama_would_send(tmp_path: Path) -> None:
    spec = SimConfig(name="solo", models=(THINKER,), loaded=("thinker:8b",), default_tokens=4)
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city", "days"],
            },
        },
    }
    async with (
        running_fleet(tmp_path, [spec]) as fleet,
        httpx.AsyncClient(base_url=fleet.url, timeout=30, trust_env=False) as client,
    ):
        message = [{"role": "user", "content": "hi"}]
        streamed = await client.post("/api/chat", json={"model": "thinker:8b", "messages": message})
        lines = [json.loads(line) for line in streamed.text.splitlines()]
        whole = (
            await client.post(
                "/api/chat", json={"model": "thinker:8b", "messages": message, "stream": False}
            )
        ).json()
        assert whole["done"] is True and whole["done_reason"] == "stop"
        assert whole["message"]["content"] == "".join(
            line["message"].get("content", "") for line in lines
        )
        assert whole["message"]["thinking"] == "".join(
            line["message"].get("thinking", "") for line in lines
        )
        assert whole["eval_count"] == lines[-1]["eval_count"]
        called = (
            await client.post(
                "/api/chat",
                json={"model": "thinker:8b", "messages": message, "tools": [tool], "stream": False},
            )
        ).json()
        (call,) = called["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        arguments = call["function"]["arguments"]
        assert isinstance(arguments["city"], str) and isinstance(arguments["days"], int)
        generated = (
            await client.post(
                "/api/generate", json={"model": "thinker:8b", "prompt": "x", "stream": False}
            )
        ).json()
        assert generated["response"] and generated["thinking"]
