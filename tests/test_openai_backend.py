"""The Ollama face a node puts on an OpenAI-compatible server (``--backend openai``): thinking and
tool calls carried both ways, in-band failures never passed on as a whole answer, every read of
the server bounded.

First the translation, pure and synchronous; then the real path: a fake OpenAI-compatible server
(a real HTTP server on loopback, :class:`FakeOpenAI`) behind a node agent in ``--backend openai``
mode behind the router, driven with the OpenAI, Anthropic and Ollama APIs."""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import anthropic
import attrs
import httpx
import openai
import pytest
import trio
from openai.types.chat import ChatCompletionToolParam

from herd.config import NodeConfig, RouterConfig
from herd.core.bodies import LINE_LIMIT, MiB
from herd.core.errors import BadRequest, NodeBadStatus
from herd.http.service import Router
from herd.node.backend import OllamaBackend
from herd.node.openai_backend import (
    MAX_TOOL_CALLS,
    StreamTranslator,
    messages_to_openai,
    openai_request,
    think_to_openai,
    whole_answer,
)
from herd.node.service import Node
from herd.node.upstream import backend_client
from herd.server import serve_app
from tests.conftest import in_thread, wait_until

Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


def data(event: dict[str, Any] | str) -> bytes:
    return b"data: " + (event if isinstance(event, str) else json.dumps(event)).encode() + b"\n\n"


def delta(**fields: Any) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": fields}]}


def call_fragment(index: int, **fields: Any) -> dict[str, Any]:
    return delta(tool_calls=[{"index": index, **fields}])


# What llama-server streams for a thinking model that calls a tool: the thinking as
# reasoning_content deltas, then the call in fragments (id and name first, then the JSON
# arguments in pieces), the finish reason, the usage, [DONE].
THINK_AND_CALL: list[dict[str, Any] | str] = [
    delta(role="assistant", content=None, reasoning_content="Weather needs "),
    delta(reasoning_content="a tool."),
    call_fragment(
        0, id="call_w1", type="function", function={"name": "get_weather", "arguments": ""}
    ),
    call_fragment(0, function={"arguments": '{"city": '}),
    call_fragment(0, function={"arguments": '"Paris"}'}),
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    {"choices": [], "usage": {"prompt_tokens": 31, "completion_tokens": 9}},
    "[DONE]",
]
WHOLE_THINK_AND_CALL = {
    "object": "chat.completion",
    "choices": [
        {
            "index": 0,
            "finish_reason": "tool_calls",
            "message": {
                "role": "assistant",
                "content": None,
                "reasoning_content": "Weather needs a tool.",
                "tool_calls": [
                    {
                        "id": "call_w1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
        }
    ],
    "usage": {"prompt_tokens": 31, "completion_tokens": 9},
}
CALL = {"id": "call_w1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def translate(events: list[dict[str, Any] | str], chat: bool = True) -> list[dict[str, Any]]:
    translator = StreamTranslator("m:latest", chat, started=0.0)
    out: list[bytes] = []
    for line in b"".join(data(e) for e in events).split(b"\n"):
        out += translator.line(line)
        if translator.finished:
            break
    out += translator.end()
    return [json.loads(line) for line in out]


# ---------------------------------------------------------------------------------------------
# The translation, pure
# ---------------------------------------------------------------------------------------------


def test_streamed_thinking_and_tool_call_fragments_become_ollama_chunks() -> None:
    chunks = translate(THINK_AND_CALL)
    assert [c["message"].get("thinking") for c in chunks[:2]] == ["Weather needs ", "a tool."]
    assert all(c["message"]["content"] == "" and not c["done"] for c in chunks[:2])
    # The calls, whole, on a chunk of their own; then done with the server's counts.
    assert chunks[2]["message"]["tool_calls"] == [CALL] and not chunks[2]["done"]
    assert chunks[3]["done"] and chunks[3]["done_reason"] == "stop"
    assert (chunks[3]["prompt_eval_count"], chunks[3]["eval_count"]) == (31, 9)
    assert len(chunks) == 4


def test_vllm_reasoning_and_interleaved_calls_are_carried() -> None:
    chunks = translate(
        [
            # vLLM names it "reasoning"; one that sends both names sends the text twice.
            delta(reasoning="Two cities.", reasoning_content="Two cities."),
            delta(content="Checking."),
            call_fragment(0, id="a", function={"name": "get_weather", "arguments": '{"ci'}),
            call_fragment(1, id="b", function={"name": "get_weather", "arguments": "{}"}),
            call_fragment(0, function={"name": "get_weather", "arguments": 'ty": "Oslo"}'}),
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        ]
    )
    assert chunks[0]["message"] == {"role": "assistant", "content": "", "thinking": "Two cities."}
    assert chunks[1]["message"] == {"role": "assistant", "content": "Checking."}
    # A name sent again whole is not doubled; empty arguments are {}.
    assert chunks[2]["message"]["tool_calls"] == [
        {"id": "a", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        {"id": "b", "function": {"name": "get_weather", "arguments": {}}},
    ]
    assert chunks[-1]["done"]


def test_a_null_error_field_is_no_error() -> None:
    chunks = translate([{**delta(content="Hi"), "error": None}, "[DONE]"])
    assert chunks[0]["message"]["content"] == "Hi" and chunks[-1]["done"]


def test_arguments_that_are_not_a_json_object_are_kept_not_dropped() -> None:
    chunks = translate(
        [call_fragment(0, function={"name": "f", "arguments": "{not json"}), "[DONE]"]
    )
    assert chunks[0]["message"]["tool_calls"] == [
        {"function": {"name": "f", "arguments": "{not json"}}
    ]


def test_generate_streams_text() -> None:
    chunks = translate(
        [
            {"choices": [{"index": 0, "text": "Once"}]},
            {"choices": [{"index": 0, "text": " upon", "finish_reason": "length"}]},
            "[DONE]",
        ],
        chat=False,
    )
    assert [c.get("response") for c in chunks] == ["Once", " upon", ""]
    assert chunks[-1]["done_reason"] == "length"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        # llama-server's in-band error line, and an error object where a chunk should be.
        (
            [data(delta(content="Hel")), b'error: {"code": 500, "message": "out of memory"}\n'],
            "the backend failed mid-stream: out of memory",
        ),
        (
            [data({"error": {"message": "KV cache full", "type": "server_error"}})],
            "the backend failed mid-stream: KV cache full",
        ),
        ([b"event: error\n", data({"message": "boom"})], "failed mid-stream: boom"),
        ([data(delta(content="Hel")), b"data: {trunc\n"], "a stream event that is not JSON"),
        # The stream ended with neither a finish reason nor [DONE]: cut short, not whole.
        ([data(delta(content="Hel"))], "ended the stream before it was done"),
    ],
)
def test_a_failed_or_short_stream_is_an_error_not_an_answer(
    lines: list[bytes], message: str
) -> None:
    with pytest.raises(NodeBadStatus, match=message):
        read_through(b"".join(lines))


def read_through(stream: bytes) -> None:
    translator = StreamTranslator("m:latest", True, started=0.0)
    for line in stream.split(b"\n"):
        translator.line(line)
    translator.end()


def test_tool_calls_are_bounded_in_size_and_number() -> None:
    piece = "x" * MiB
    long = [call_fragment(0, function={"name": "f", "arguments": piece})] * (LINE_LIMIT // MiB + 1)
    with pytest.raises(NodeBadStatus, match="sent tool calls over the 8 MiB limit"):
        feed_events(long)
    many = [call_fragment(index, function={"name": "f"}) for index in range(MAX_TOOL_CALLS + 1)]
    with pytest.raises(NodeBadStatus, match=f"over {MAX_TOOL_CALLS} tool calls"):
        feed_events(many)


def feed_events(events: list[dict[str, Any]]) -> None:
    translator = StreamTranslator("m:latest", True, started=0.0)
    for event in events:
        translator.event(event)


def test_a_whole_answer_carries_thinking_and_tool_calls() -> None:
    answer = json.loads(
        whole_answer(json.dumps(WHOLE_THINK_AND_CALL).encode(), "m:latest", 0.0, True)
    )
    assert answer["message"] == {
        "role": "assistant",
        "content": "",
        "thinking": "Weather needs a tool.",
        "tool_calls": [CALL],
    }
    assert answer["done"] and answer["eval_count"] == 9
    with pytest.raises(NodeBadStatus, match="answer is not JSON"):
        whole_answer(b"<html>", "m:latest", 0.0, True)


def test_tool_turns_go_out_with_ids_and_json_string_arguments() -> None:
    messages = messages_to_openai(
        [
            {"role": "user", "content": "Weather in Paris and Oslo?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    {"id": "own", "function": {"name": "get_time", "arguments": {}}},
                ],
            },
            # Answered out of order, by name (Ollama's tool_name), as the router sends them.
            {"role": "tool", "content": "09:00", "tool_name": "get_time"},
            {"role": "tool", "content": "18 C", "tool_name": "get_weather"},
        ]
    )
    calls = messages[1]["tool_calls"]
    assert calls == [
        {
            "id": "call_1_0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {"id": "own", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    assert messages[2] == {"role": "tool", "content": "09:00", "tool_call_id": "own"}
    assert messages[3] == {"role": "tool", "content": "18 C", "tool_call_id": "call_1_0"}
    with pytest.raises(BadRequest, match=r"messages\[0\].tool_calls must be a list of objects"):
        messages_to_openai([{"role": "assistant", "tool_calls": ["nope"]}])


@pytest.mark.parametrize(
    ("think", "fields"),
    [
        (None, {}),
        (True, {"chat_template_kwargs": {"enable_thinking": True}}),
        (False, {"chat_template_kwargs": {"enable_thinking": False}}),
        ("high", {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "high"}),
    ],
)
def test_think_goes_out_as_the_servers_document_it(think: Any, fields: dict[str, Any]) -> None:
    assert think_to_openai(think) == fields
    body = {"model": "m", "messages": [], **({} if think is None else {"think": think})}
    _, request, _ = openai_request("m", body, chat=True)
    assert {k: request[k] for k in fields} == fields


def test_a_think_value_ollama_does_not_take_is_refused() -> None:
    with pytest.raises(BadRequest, match="field 'think' must be true, false"):
        think_to_openai("maximum")


# ---------------------------------------------------------------------------------------------
# The real path: a fake OpenAI-compatible server behind a node behind the router
# ---------------------------------------------------------------------------------------------

Answer = Callable[[dict[str, Any], Send], Awaitable[None]]


async def respond(send: Send, status: int, body: bytes, *headers: tuple[bytes, bytes]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body})


async def respond_in_pieces(
    send: Send, body: bytes, *headers: tuple[bytes, bytes], piece: int = MiB, status: int = 200
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    for start in range(0, len(body), piece):
        await send(
            {"type": "http.response.body", "body": body[start : start + piece], "more_body": True}
        )
    await send({"type": "http.response.body", "body": b""})


async def lifespan(scope: Scope, receive: Receive, send: Send) -> None:
    while scope["type"] == "lifespan":
        event = (await receive())["type"]
        await send({"type": f"{event}.complete"})
        if event == "lifespan.shutdown":
            return


SSE = (b"content-type", b"text/event-stream")
JSON = (b"content-type", b"application/json")
GZIP = (b"content-encoding", b"gzip")


async def think_and_call(body: dict[str, Any], send: Send) -> None:
    """The scripted thinking-and-tool-call answer, streamed or whole as asked."""
    if body.get("stream"):
        await respond_in_pieces(send, b"".join(data(e) for e in THINK_AND_CALL), SSE, piece=40)
    else:
        await respond(send, 200, json.dumps(WHOLE_THINK_AND_CALL).encode(), JSON)


@attrs.define(eq=False)
class FakeOpenAI:
    """An OpenAI-compatible server as llama-server is one: ``/v1/models`` lists model ``m``,
    ``/props`` gives the context and slots, ``/v1/chat/completions`` answers with ``chat``
    (scripted per test). Every request is kept: (path, headers, JSON body)."""

    chat: Answer = think_and_call
    requests: list[tuple[str, dict[str, str], Any]] = attrs.field(factory=list)
    url: str = ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await lifespan(scope, receive, send)
            return
        raw, more = b"", True
        while more:
            message = await receive()
            raw += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        body = json.loads(raw) if raw else None
        self.requests.append((scope["path"], headers, body))
        if scope["path"] == "/v1/models":
            models = {"object": "list", "data": [{"id": "m", "object": "model"}]}
            await respond(send, 200, json.dumps(models).encode(), JSON)
        elif scope["path"] == "/props":
            props = {"default_generation_settings": {"n_ctx": 4096}, "total_slots": 2}
            await respond(send, 200, json.dumps(props).encode(), JSON)
        elif scope["path"] == "/v1/chat/completions":
            await self.chat(body or {}, send)
        else:
            await respond(send, 404, b'{"error": {"message": "not here"}}', JSON)

    def chats(self) -> list[dict[str, Any]]:
        return [body for path, _, body in self.requests if path == "/v1/chat/completions"]


@contextlib.asynccontextmanager
async def openai_node(
    tmp_path: Path, fake: FakeOpenAI, **node_options: Any
) -> AsyncIterator[tuple[Router, Node]]:
    """The router, and a node for ``fake`` (served here): in ``--backend openai`` mode
    unless ``node_options`` say otherwise."""
    config = RouterConfig(
        host="127.0.0.1", port=0, data_dir=str(tmp_path / "router"), max_retries=0
    )
    options: dict[str, Any] = {"backend": "openai", "node_id": "oa", **node_options}
    with trio.fail_after(60):
        async with Router(config) as router, trio.open_nursery() as nursery:
            fake.url = await nursery.start(serve_app, fake, "127.0.0.1", 0)
            node = Node(
                NodeConfig(
                    router_url=router.url,
                    ollama_url=fake.url,
                    host="127.0.0.1",
                    port=0,
                    data_dir=str(tmp_path / "node"),
                    **options,
                )
            )
            await nursery.start(node.run)
            await router.wait_nodes(1)
            yield router, node
            nursery.cancel_scope.cancel()


def ndjson(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


WEATHER_TOOL: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


async def test_thinking_and_tool_calls_reach_ollama_clients(tmp_path: Path) -> None:
    backend = FakeOpenAI()
    async with (
        openai_node(tmp_path, backend) as (router, _),
        httpx.AsyncClient(base_url=router.url, timeout=30, trust_env=False) as client,
    ):
        body = {"model": "m", "messages": ASK, "tools": [WEATHER_TOOL], "think": True}
        streamed = ndjson((await client.post("/api/chat", json=body)).text)
        thinking = "".join(c["message"].get("thinking", "") for c in streamed)
        assert thinking == "Weather needs a tool."
        calls = [call for c in streamed for call in c["message"].get("tool_calls", [])]
        assert calls == [CALL]
        assert streamed[-1]["done"] and streamed[-1]["eval_count"] == 9
        whole = (await client.post("/api/chat", json={**body, "stream": False})).json()
        assert whole["message"]["thinking"] == "Weather needs a tool."
        assert whole["message"]["tool_calls"] == [CALL]
        # Sent on as the server documents: the tools as they are, think as the template's
        # switch; and no compression asked for, of the probes and the chats alike.
        sent = backend.chats()[-1]
        assert sent["tools"] == [WEATHER_TOOL]
        assert sent["chat_template_kwargs"] == {"enable_thinking": True}
        assert sent["stream"] is True  # the router streams from its nodes
        assert {h.get("accept-encoding") for _, h, _ in backend.requests} == {"identity"}


async def test_a_tool_round_trip_through_the_anthropic_api(tmp_path: Path) -> None:
    backend = FakeOpenAI()
    tool: anthropic.types.ToolParam = {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    ask: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Weather in Paris?"}]
    async with openai_node(tmp_path, backend) as (router, _):
        with anthropic.Anthropic(base_url=router.url, api_key="x", max_retries=0) as sdk:

            def stream() -> anthropic.types.Message:
                with sdk.messages.stream(
                    model="m",
                    max_tokens=256,
                    messages=ask,
                    tools=[tool],
                    thinking={"type": "enabled", "budget_tokens": 1024},
                ) as events:
                    return events.get_final_message()

            first = await in_thread(stream)
            kinds = [block.type for block in first.content]
            assert kinds == ["thinking", "tool_use"]
            assert first.content[0].type == "thinking"
            assert first.content[0].thinking == "Weather needs a tool."
            use = first.content[1]
            assert use.type == "tool_use" and use.name == "get_weather"
            assert use.input == {"city": "Paris"}
            assert first.stop_reason == "tool_use"
            # The second turn: the tool's result goes back to the server with the id of the
            # call it answers.
            second: list[anthropic.types.MessageParam] = [
                *ask,
                {"role": "assistant", "content": [use.model_dump()]},  # type: ignore[list-item]
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C"}],
                },
            ]
            await in_thread(
                lambda: sdk.messages.create(
                    model="m", max_tokens=256, messages=second, tools=[tool]
                )
            )
    sent = backend.chats()[-1]
    assert sent["chat_template_kwargs"] == {"enable_thinking": False}  # none asked: none
    assistant, result = sent["messages"][-2:]
    (call,) = assistant["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert result == {"role": "tool", "content": "18 C", "tool_call_id": call["id"]}


async def test_thinking_and_tool_calls_reach_openai_clients(tmp_path: Path) -> None:
    backend = FakeOpenAI()
    async with openai_node(tmp_path, backend) as (router, _):
        with openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0) as sdk:

            def stream() -> tuple[str, dict[int, dict[str, str]]]:
                reasoning, calls = "", dict[int, dict[str, str]]()
                for chunk in sdk.chat.completions.create(
                    model="m",
                    messages=[{"role": "user", "content": "Weather in Paris?"}],
                    tools=[WEATHER_TOOL],
                    stream=True,
                ):
                    if chunk.choices:
                        part = chunk.choices[0].delta
                        reasoning += (part.model_extra or {}).get("reasoning") or ""
                        for call in part.tool_calls or []:
                            slot = calls.setdefault(call.index, {"name": "", "arguments": ""})
                            assert call.function is not None
                            slot["name"] += call.function.name or ""
                            slot["arguments"] += call.function.arguments or ""
                return reasoning, calls

            reasoning, calls = await in_thread(stream)
    assert reasoning == "Weather needs a tool."
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}


# What the server sends, and what each API's client must be told instead of a whole answer.


async def endless_line(body: dict[str, Any], send: Send) -> None:
    """One SSE line past the line limit (it ends, but too late)."""
    await respond_in_pieces(send, b"data: " + b"x" * (LINE_LIMIT + 1) + b"\n\n", SSE)


@functools.cache
def line_bomb() -> bytes:
    """64 MiB of one line, in about 64 KiB of gzip."""
    return gzip.compress(b"data: " + b" " * (64 * MiB), compresslevel=9)


async def gzip_bomb_line(body: dict[str, Any], send: Send) -> None:
    """A gzip bomb of one line, though no compression was asked for."""
    await respond(send, 200, line_bomb(), SSE, GZIP)


async def gzipped_answer(body: dict[str, Any], send: Send) -> None:
    """The scripted answer, honestly, but gzip-compressed though nobody asked."""
    await respond(send, 200, gzip.compress(b"".join(data(e) for e in THINK_AND_CALL)), SSE, GZIP)


async def huge_error(body: dict[str, Any], send: Send) -> None:
    """A 500 with an 8 MiB error page."""
    page = b"<html>" + b"x" * (8 * MiB)
    await respond_in_pieces(send, page, (b"content-type", b"text/html"), status=500)


async def huge_client_error(body: dict[str, Any], send: Send) -> None:
    """A 400 whose message comes first and then 8 MiB of padding."""
    error = {"error": {"message": "context too long", "type": "invalid_request_error"}}
    padded = json.dumps(error).encode()[:-1] + b', "padding": "' + b"p" * (8 * MiB) + b'"}'
    await send({"type": "http.response.start", "status": 400, "headers": [JSON]})
    await send({"type": "http.response.body", "body": padded})


async def gzip_bomb_answer(body: dict[str, Any], send: Send) -> None:
    """A non-streamed answer that inflates past the answer limit."""
    answer = b'{"choices": [{"message": {"content": "' + b"a" * (65 * MiB) + b'"}}]}'
    await respond(send, 200, gzip.compress(answer, compresslevel=1), JSON, GZIP)


async def broken_off(body: dict[str, Any], send: Send) -> None:
    """Half an answer, then the end of the body: no finish reason, no [DONE]."""
    await respond(send, 200, data(delta(content="The weather is")), SSE)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (endless_line, "the backend sent a line over the 8 MiB limit"),
        (gzip_bomb_line, "the backend sent a line over the 8 MiB limit"),
        (broken_off, "the backend ended the stream before it was done"),
    ],
)
async def test_a_stream_past_its_limits_ends_with_a_clear_error(
    tmp_path: Path, answer: Answer, message: str
) -> None:
    backend = FakeOpenAI(chat=answer)
    body = {"model": "m", "messages": ASK}
    async with (
        openai_node(tmp_path, backend) as (router, _),
        httpx.AsyncClient(base_url=router.url, timeout=60, trust_env=False) as client,
    ):
        streamed = ndjson((await client.post("/api/chat", json=body)).text)
        assert message in streamed[-1]["error"]
        assert not any(c.get("done") for c in streamed)
        whole = await client.post("/api/chat", json={**body, "stream": False})
        assert whole.status_code == 502 and message in whole.json()["error"]
        sse = await client.post("/v1/chat/completions", json={**body, "stream": True})
        assert message in sse.text and sse.text.rstrip().endswith("data: [DONE]")
        messages = await client.post("/v1/messages", json={**body, "max_tokens": 64})
        assert messages.status_code >= 500 and message in messages.json()["error"]["message"]
        await wait_until(lambda: router.state.queues.statistics().in_flight == 0)


async def test_a_compressed_answer_is_read_inflated(tmp_path: Path) -> None:
    backend = FakeOpenAI(chat=gzipped_answer)
    async with (
        openai_node(tmp_path, backend) as (router, _),
        httpx.AsyncClient(base_url=router.url, timeout=30, trust_env=False) as client,
    ):
        body = {"model": "m", "messages": ASK, "stream": False}
        whole = (await client.post("/api/chat", json=body)).json()
        assert whole["message"]["thinking"] == "Weather needs a tool."
        assert whole["message"]["tool_calls"] == [CALL]


@pytest.mark.parametrize(
    ("answer", "status", "message"),
    [
        (huge_error, 502, "backend answered 500: <html>xxxx"),
        (huge_client_error, 400, "context too long"),
    ],
)
async def test_an_error_body_over_the_limit_is_cut_to_its_message(
    tmp_path: Path, answer: Answer, status: int, message: str
) -> None:
    backend = FakeOpenAI(chat=answer)
    async with (
        openai_node(tmp_path, backend) as (router, _),
        httpx.AsyncClient(base_url=router.url, timeout=30, trust_env=False) as client,
    ):
        reply = await client.post("/api/chat", json={"model": "m", "messages": ASK})
        assert reply.status_code == status
        assert message in reply.json()["error"]
        assert len(reply.text) < 1000  # a short detail, not 8 MiB


async def test_a_whole_answer_over_the_limit_fails_clearly(tmp_path: Path) -> None:
    """Straight to the node's Ollama face (the router always streams): a non-streamed answer
    that inflates past 64 MiB is a 502 naming the limit."""
    backend = FakeOpenAI(chat=gzip_bomb_answer)
    async with (
        openai_node(tmp_path, backend) as (_, node),
        httpx.AsyncClient(base_url=f"{node.url}/backend", timeout=60, trust_env=False) as client,
    ):
        body = {"model": "m", "messages": ASK, "stream": False}
        reply = await client.post("/api/chat", json=body)
        assert reply.status_code == 502
        assert reply.json() == {"error": "the backend sent an answer over the 64 MiB limit"}
        # The node's face answers whole answers too, thinking and calls included.
        backend.chat = think_and_call
        whole = (await client.post("/api/chat", json=body)).json()
        assert whole["message"]["thinking"] == "Weather needs a tool."
        assert whole["message"]["tool_calls"] == [CALL]


async def test_an_ollama_probe_answer_over_the_limit_is_a_failed_probe() -> None:
    """The node's reads of Ollama are bounded too: a gzip bomb for /api/tags."""
    bomb = gzip.compress(b'{"models": ["' + b" " * (16 * MiB) + b'"]}', compresslevel=9)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await lifespan(scope, receive, send)
            return
        if scope["path"] == "/api/tags":
            await respond(send, 200, bomb, JSON, GZIP)
        else:
            await respond(send, 200, b'{"version": "0.12.0", "models": []}', JSON)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, backend_client() as client:
            url = await nursery.start(serve_app, app, "127.0.0.1", 0)
            state = await OllamaBackend(url, client).probe()
            nursery.cancel_scope.cancel()
    assert not state.info.healthy
    assert state.info.error == f"{url}: the backend sent a /api/tags answer over the 8 MiB limit"


async def test_the_lan_proxy_asks_the_backend_for_no_compression(tmp_path: Path) -> None:
    """Whatever the caller asked for: the proxy passes bytes on, nothing here inflates them."""
    backend = FakeOpenAI()
    async with openai_node(
        tmp_path, backend, backend="ollama", node_id="lan", lan_proxy="always"
    ) as (_, node):
        async with httpx.AsyncClient(trust_env=False) as client:
            reply = await client.get(
                f"{node.url}/backend/v1/models", headers={"Accept-Encoding": "gzip, br"}
            )
    assert reply.status_code == 200
    (proxied,) = [headers for path, headers, _ in backend.requests if path == "/v1/models"]
    assert proxied["accept-encoding"] == "identity"
