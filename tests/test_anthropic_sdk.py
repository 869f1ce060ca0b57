"""The official anthropic SDK against a running router with simulated Ollama nodes (real HTTP on
loopback): Messages, streamed and not, tools, thinking, stop sequences, count_tokens, errors and
API keys."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import trio
import trio.testing

from herd.core import traces
from herd.core.api import anthropic as am
from herd.sim import SimConfig, SimModel
from tests.conftest import LLAMA_3B, Fleet, GiB, in_thread, running_fleet, wait_until

THINKER = SimModel("qwen3:8b", size_bytes=5 * GiB, family="qwen3", thinking=True)
SLOW = SimModel("slow:latest", size_bytes=1 * GiB, tokens_per_second=1.0)  # virtual time
WEATHER: anthropic.types.ToolParam = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer"},
        },
        "required": ["city"],
    },
}
HELLO: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Hello there"}]
BETA_HELLO: list[anthropic.types.beta.BetaMessageParam] = [
    {"role": "user", "content": "Hello there"}
]


def specs() -> list[SimConfig]:
    return [
        SimConfig(
            name="alpha",
            models=(LLAMA_3B, THINKER, SLOW),
            loaded=("llama3.2:3b", "qwen3:8b", "slow:latest"),
        )
    ]


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    async with running_fleet(tmp_path, specs()) as fleet:
        yield fleet


@pytest.fixture
def sdk(fleet: Fleet) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=fleet.url, api_key="x", max_retries=0) as client:
        yield client


def upstream(fleet: Fleet) -> dict[str, Any]:
    """The last body the simulated node was sent, on /api/chat."""
    path, body = fleet.sims["alpha"].requests[-1]
    assert path == "/api/chat"
    return body


def text_of(message: anthropic.types.Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


async def test_create_text_with_usage_and_the_served_model(
    fleet: Fleet, sdk: anthropic.Anthropic
) -> None:
    def call() -> tuple[anthropic.types.Message, httpx.Headers]:
        raw = sdk.messages.with_raw_response.create(
            model="llama3.2:3b",
            max_tokens=5,
            system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            messages=HELLO,
            temperature=0.2,
            top_k=40,
            metadata={"user_id": "someone"},
        )
        return raw.parse(), raw.headers

    message, headers = await in_thread(call)
    assert headers["x-herd-node"] == "alpha" and headers["content-type"] == "application/json"
    assert message.type == "message" and message.role == "assistant"
    assert message.id == f"msg_{headers['x-herd-request-id']}"
    assert message.model == "llama3.2:3b"  # the model that served
    assert [b.type for b in message.content] == ["text"]
    assert text_of(message) == "the herd moves across quiet "
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    # The node's own counts: 5 tokens made; the prompt in the sim's words (a word a token
    # and four a message: "Be brief." + "Hello there").
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 5)
    body = upstream(fleet)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
    ]
    assert body["options"] == {"temperature": 0.2, "top_k": 40, "num_predict": 5}
    assert body["stream"] is True and body["keep_alive"] == -1
    assert body["think"] is False  # no thinking asked for: Anthropic's default
    assert "metadata" not in body and "stop" not in body["options"]


async def test_stream_text_and_final_message(fleet: Fleet, sdk: anthropic.Anthropic) -> None:
    def call() -> tuple[list[str], list[str], anthropic.types.Message]:
        with sdk.messages.stream(model="llama3.2:3b", max_tokens=6, messages=HELLO) as stream:
            names: list[str] = []
            pieces: list[str] = []
            for event in stream:
                names.append(event.type)
                if event.type == "text":
                    pieces.append(event.text)
            return names, pieces, stream.get_final_message()

    names, pieces, final = await in_thread(call)
    assert "".join(pieces) == "the herd moves across quiet hills "
    assert pieces == ["the ", "herd ", "moves ", "across ", "quiet ", "hills "]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert text_of(final) == "".join(pieces)
    assert final.stop_reason == "max_tokens"
    # message_start carries herd's estimate; message_delta the node's real count, which wins.
    _, native = am.shape({"model": "m", "max_tokens": 6, "messages": HELLO})
    assert native.input_tokens == 3  # "Hello there": 11 characters
    assert (final.usage.input_tokens, final.usage.output_tokens) == (6, 6)
    assert upstream(fleet)["stream"] is True


async def test_the_beta_path_reaches_the_route(fleet: Fleet, sdk: anthropic.Anthropic) -> None:
    """Claude Code calls ``/v1/messages?beta=true`` (the SDK's beta namespace does too)."""
    message = await in_thread(
        lambda: sdk.beta.messages.create(
            model="llama3.2:3b", max_tokens=3, messages=BETA_HELLO, betas=["some-beta-2025-01-01"]
        )
    )
    assert message.content[0].type == "text" and message.content[0].text == "the herd moves "
    counted = await in_thread(
        lambda: sdk.beta.messages.count_tokens(model="llama3.2:3b", messages=BETA_HELLO)
    )
    assert counted.input_tokens == 3
    async with httpx.AsyncClient(base_url=fleet.url, trust_env=False) as client:
        with trio.fail_after(10):
            reply = await client.post(
                "/v1/messages?beta=true",
                json={"model": "llama3.2:3b", "max_tokens": 2, "messages": HELLO},
                headers={"anthropic-version": "2023-06-01", "anthropic-beta": "x"},
            )
    assert reply.status_code == 200 and reply.json()["content"][0]["text"] == "the herd "


async def test_a_tool_round_trip(fleet: Fleet, sdk: anthropic.Anthropic) -> None:
    asked: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Weather in Paris?"}]
    first = await in_thread(
        lambda: sdk.messages.create(
            model="llama3.2:3b", max_tokens=50, messages=asked, tools=[WEATHER]
        )
    )
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["tool_use"]
    call = first.content[0]
    assert call.type == "tool_use" and call.name == "get_weather" and call.id
    # Shaped by the schema: every property, typed, the enum respected.
    assert list(call.input) == ["city", "unit", "days"]
    arguments: dict[str, Any] = call.input
    assert isinstance(arguments["city"], str) and arguments["unit"] in ("celsius", "fahrenheit")
    assert isinstance(arguments["days"], int)
    offered = upstream(fleet)["tools"]
    assert offered == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": WEATHER["input_schema"],
            },
        }
    ]
    answered: list[anthropic.types.MessageParam] = [
        *asked,
        {"role": "assistant", "content": first.content},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21 C"}],
        },
    ]
    final = await in_thread(
        lambda: sdk.messages.create(
            model="llama3.2:3b", max_tokens=4, messages=answered, tools=[WEATHER]
        )
    )
    assert text_of(final) == "the herd moves across "
    assert final.stop_reason == "max_tokens"
    sent = upstream(fleet)["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": arguments}}],
    }
    assert sent[2] == {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"}


async def test_a_streamed_tool_call(fleet: Fleet, sdk: anthropic.Anthropic) -> None:
    def call() -> tuple[list[str], anthropic.types.Message]:
        with sdk.messages.stream(
            model="llama3.2:3b",
            max_tokens=50,
            messages=[{"role": "user", "content": "Weather in Rome?"}],
            tools=[WEATHER],
            tool_choice={"type": "tool", "name": "get_weather"},
        ) as stream:
            partial = [e.partial_json for e in stream if e.type == "input_json"]
            return partial, stream.get_final_message()

    partial, final = await in_thread(call)
    assert final.stop_reason == "tool_use"
    block = final.content[0]
    assert block.type == "tool_use" and block.name == "get_weather"
    assert json.loads("".join(partial)) == block.input
    assert set(block.input) == {"city", "unit", "days"}


async def test_thinking_blocks_and_deltas(fleet: Fleet, sdk: anthropic.Anthropic) -> None:
    thinking: anthropic.types.ThinkingConfigParam = {"type": "enabled", "budget_tokens": 1024}
    message = await in_thread(
        lambda: sdk.messages.create(
            model="qwen3:8b", max_tokens=12, messages=HELLO, thinking=thinking
        )
    )
    assert upstream(fleet)["think"] is True
    assert [b.type for b in message.content] == ["thinking", "text"]
    block = message.content[0]
    assert block.type == "thinking"
    assert block.thinking == "hmm let me weigh which path the herd "  # 8 sim tokens
    assert block.signature == ""
    assert text_of(message) == "the herd moves across "  # the 4 tokens left of 12

    def stream() -> tuple[list[str], list[str], anthropic.types.Message]:
        with sdk.messages.stream(
            model="qwen3:8b", max_tokens=10, messages=HELLO, thinking=thinking
        ) as events:
            deltas: list[str] = []
            order: list[str] = []
            for event in events:
                if event.type == "content_block_start":
                    order.append(event.content_block.type)
                elif event.type == "thinking":
                    deltas.append(event.thinking)
            return deltas, order, events.get_final_message()

    deltas, order, final = await in_thread(stream)
    assert order == ["thinking", "text"]
    assert deltas == ["hmm ", "let ", "me ", "weigh ", "which ", "path ", "the ", "herd "]
    assert final.content[0].type == "thinking"
    assert final.content[0].thinking == "".join(deltas)
    assert text_of(final) == "the herd "
    off = await in_thread(
        lambda: sdk.messages.create(
            model="qwen3:8b", max_tokens=3, messages=HELLO, thinking={"type": "disabled"}
        )
    )
    assert upstream(fleet)["think"] is False
    assert [b.type for b in off.content] == ["text"]
    adaptive = await in_thread(
        lambda: sdk.messages.create(
            model="qwen3:8b", max_tokens=9, messages=HELLO, thinking={"type": "adaptive"}
        )
    )
    assert "think" not in upstream(fleet)  # the model's default: this one thinks
    assert [b.type for b in adaptive.content] == ["thinking", "text"]


async def test_stop_sequences(fleet: Fleet, sdk: anthropic.Anthropic) -> None:
    message = await in_thread(
        lambda: sdk.messages.create(
            model="llama3.2:3b", max_tokens=50, messages=HELLO, stop_sequences=["hills", "quiet"]
        )
    )
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "quiet"
    assert text_of(message) == "the herd moves across "
    assert "stop" not in upstream(fleet)["options"]  # herd watches for them itself

    def stream() -> tuple[str, anthropic.types.Message]:
        with sdk.messages.stream(
            model="llama3.2:3b", max_tokens=50, messages=HELLO, stop_sequences=["s qu"]
        ) as events:
            return "".join(events.text_stream), events.get_final_message()

    text, final = await in_thread(stream)
    assert text == text_of(final) == "the herd moves acros"
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "s qu"


@pytest.fixture
def io_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 20 ms of real idleness (loopback I/O in flight is
    never taken for "everyone is asleep"): the slow model makes a token a virtual second."""
    return trio.testing.MockClock(autojump_threshold=0.02)


async def test_a_stop_sequence_stops_the_backend(
    tmp_path: Path, io_clock: trio.testing.MockClock
) -> None:
    """On a match the router closes the node's stream (the backend stops generating) and
    counts the answer complete, with the tokens it read."""
    async with running_fleet(tmp_path, specs()) as fleet:
        sim = fleet.sims["alpha"]
        request = {
            "model": "slow",
            "max_tokens": 1000,  # 1000 virtual seconds, unless stopped
            "stream": True,
            "stop_sequences": ["quiet"],
            "messages": HELLO,
        }
        async with httpx.AsyncClient(base_url=fleet.url, trust_env=False, timeout=None) as client:
            with trio.fail_after(60):
                reply = await client.post("/v1/messages", json=request)
                await wait_until(lambda: sim.open_streams == 0)
                await wait_until(lambda: bool(fleet.router.state.traces))
    assert trio.current_time() < 60
    assert reply.headers["content-type"].startswith("text/event-stream")
    names = [line[7:] for line in reply.text.splitlines() if line.startswith("event: ")]
    assert names[-2:] == ["message_delta", "message_stop"]
    data = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: ")]
    assert data[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "quiet"}
    assert data[-2]["usage"] == {"output_tokens": 5}  # the, herd, moves, across, quiet
    assert sim.disconnects == 1  # the node's stream was closed before its end
    trace = fleet.router.state.traces[-1]
    assert trace.status == traces.COMPLETED and trace.completion_tokens == 5
    assert trace.original_format == "anthropic"


async def test_count_tokens(fleet: Fleet, sdk: anthropic.Anthropic) -> None:
    system = "You are a weather bot."
    messages: list[anthropic.types.MessageParam] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check."},
    ]
    counted = await in_thread(
        lambda: sdk.messages.count_tokens(
            model="llama3.2:3b", system=system, messages=messages, tools=[WEATHER]
        )
    )
    expected = am.count_tokens(
        {"model": "m", "system": system, "messages": messages, "tools": [WEATHER]}
    )["input_tokens"]
    assert counted.input_tokens == expected
    assert expected > len(system + "Weather in Paris?Let me check.") // 4  # tools count too
    with pytest.raises(anthropic.BadRequestError, match="'messages'"):
        await in_thread(lambda: sdk.messages.count_tokens(model="llama3.2:3b", messages=[]))


async def test_errors_in_anthropics_shape(fleet: Fleet, sdk: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        await in_thread(
            lambda: sdk.messages.create(model="no-such-model", max_tokens=5, messages=HELLO)
        )
    assert missing.value.status_code == 404
    assert "no-such-model" in missing.value.message
    assert missing.value.body == {
        "type": "error",
        "error": {
            "type": "not_found_error",
            "message": "model 'no-such-model:latest' not found on any node",
        },
    }

    def streamed_missing() -> None:
        with sdk.messages.stream(model="no-such-model", max_tokens=5, messages=HELLO) as s:
            s.get_final_message()

    with pytest.raises(anthropic.NotFoundError, match="no-such-model"):
        await in_thread(streamed_missing)
    with pytest.raises(anthropic.BadRequestError, match="'max_tokens' must be a positive") as bad:
        await in_thread(
            lambda: sdk.messages.create(model="llama3.2:3b", max_tokens=0, messages=HELLO)
        )
    error_body: Any = bad.value.body
    assert error_body["error"]["type"] == "invalid_request_error"
    url_image: list[anthropic.types.MessageParam] = [
        {
            "role": "user",
            "content": [{"type": "image", "source": {"type": "url", "url": "https://x/a.png"}}],
        }
    ]
    with pytest.raises(anthropic.BadRequestError, match="the router fetches no URLs"):
        await in_thread(
            lambda: sdk.messages.create(model="llama3.2:3b", max_tokens=5, messages=url_image)
        )
    # A backend's own refusal (thinking asked of a model that can't) comes back as a 400.
    with pytest.raises(anthropic.BadRequestError, match="does not support thinking"):
        await in_thread(
            lambda: sdk.messages.create(
                model="llama3.2:3b",
                max_tokens=5,
                messages=HELLO,
                thinking={"type": "enabled", "budget_tokens": 1024},
            )
        )


@contextlib.contextmanager
def keyed(url: str, key: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=url, api_key=key, max_retries=0) as client:
        yield client


async def test_an_api_key_is_taken_from_x_api_key(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, specs(), api_keys=("k",)) as fleet:
        with keyed(fleet.url, "wrong") as wrong:
            with pytest.raises(anthropic.AuthenticationError) as refused:
                await in_thread(
                    lambda: wrong.messages.create(model="llama3.2:3b", max_tokens=2, messages=HELLO)
                )
            error_body: Any = refused.value.body
            assert error_body["error"]["type"] == "authentication_error"
            with pytest.raises(anthropic.AuthenticationError):
                await in_thread(
                    lambda: wrong.messages.count_tokens(model="llama3.2:3b", messages=HELLO)
                )
        with keyed(fleet.url, "k") as right:
            message = await in_thread(
                lambda: right.messages.create(model="llama3.2:3b", max_tokens=2, messages=HELLO)
            )
            assert text_of(message) == "the herd "
            counted = await in_thread(
                lambda: right.messages.count_tokens(model="llama3.2:3b", messages=HELLO)
            )
            assert counted.input_tokens == 3


async def test_a_node_failing_mid_answer(fleet: Fleet, sdk: anthropic.Anthropic) -> None:
    """After the first byte the router can't retry: a stream ends with an ``error`` event (the
    SDK raises it), a whole answer is a 500 ``api_error`` in Anthropic's shape."""
    sim = fleet.sims["alpha"]
    sim.fail("die_mid_stream", times=1, after_chunks=3)
    pieces: list[str] = []

    def streamed() -> None:
        with sdk.messages.stream(model="llama3.2:3b", max_tokens=20, messages=HELLO) as events:
            pieces.extend(events.text_stream)

    with pytest.raises(anthropic.APIStatusError, match="node alpha broke the stream") as cut:
        await in_thread(streamed)
    assert pieces == ["the ", "herd ", "moves "]  # what came before the break
    error_body: Any = cut.value.body
    assert error_body["type"] == "error" and error_body["error"]["type"] == "api_error"
    sim.fail("die_mid_stream", times=1, after_chunks=3)
    with pytest.raises(anthropic.InternalServerError, match="node alpha broke the stream") as broke:
        await in_thread(
            lambda: sdk.messages.create(model="llama3.2:3b", max_tokens=20, messages=HELLO)
        )
    assert broke.value.status_code == 500
    error_body = broke.value.body
    assert error_body["type"] == "error" and error_body["error"]["type"] == "api_error"


async def test_an_agent_session_stays_on_the_node_holding_its_prompt(tmp_path: Path) -> None:
    """Each turn of a Messages conversation (a growing prompt with a stable prefix) goes to
    the node whose prompt cache holds the earlier turns, though both have the model hot."""
    from herd.sim import SimConfig
    from tests.conftest import LLAMA_3B, running_fleet

    specs = [
        SimConfig(name=name, models=(LLAMA_3B,), loaded=("llama3.2:3b",))
        for name in ("alpha", "beta")
    ]
    async with running_fleet(tmp_path, specs) as fleet:
        with anthropic.Anthropic(base_url=fleet.url, api_key="x", max_retries=0) as client:
            messages: list[Any] = [{"role": "user", "content": "Read this file and fix it."}]
            served: list[str] = []
            for turn in range(4):
                sent = list(messages)
                reply = await in_thread(
                    lambda sent=sent: client.messages.with_raw_response.create(  # type: ignore[misc]
                        model="llama3.2:3b",
                        max_tokens=32,
                        system="You are a coder.",
                        messages=sent,
                    )
                )
                served.append(reply.headers["x-herd-node"])
                message = reply.parse()
                messages += [
                    {"role": "assistant", "content": message.content[0].text},  # type: ignore[union-attr]
                    {"role": "user", "content": f"Now step {turn + 2}."},
                ]
        assert len(set(served)) == 1, served
        holder = fleet.sims[served[0]]
        assert holder.prompt_cache_hits >= 3


async def test_a_base64_image_reaches_a_vision_model_and_a_big_body_is_a_413(
    tmp_path: Path,
) -> None:
    seer = SimModel("gemma3:4b", size_bytes=3 * GiB, family="gemma3", vision=True)
    spec = SimConfig(name="alpha", models=(LLAMA_3B, seer), loaded=("llama3.2:3b", "gemma3:4b"))
    picture = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(200))).decode()
    asked: list[anthropic.types.MessageParam] = [
        {
            "role": "user",
            "content": [
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": picture},
                },
                {"type": "text", "text": "What is this?"},
            ],
        }
    ]
    async with running_fleet(tmp_path, [spec], max_body_bytes=64 * 1024) as fleet:
        with keyed(fleet.url, "x") as sdk:
            message = await in_thread(
                lambda: sdk.messages.create(model="gemma3:4b", max_tokens=5, messages=asked)
            )
            assert message.model == "gemma3:4b" and text_of(message)
            path, body = fleet.sims["alpha"].requests[-1]
            assert path == "/api/chat"
            (user,) = body["messages"]
            assert user["images"] == [picture] and user["content"] == "What is this?"
            huge: list[anthropic.types.MessageParam] = [{"role": "user", "content": "x" * 100_000}]
            with pytest.raises(anthropic.RequestTooLargeError) as refused:
                await in_thread(
                    lambda: sdk.messages.create(model="llama3.2:3b", max_tokens=5, messages=huge)
                )
            error_body: Any = refused.value.body
            assert refused.value.status_code == 413
            assert error_body["type"] == "error"
            assert error_body["error"]["type"] == "request_too_large"
