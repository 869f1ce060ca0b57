"""The OpenAI SDK's ``client.responses`` against a running router with a simulated node: real
HTTP on loopback, the router's own store, what the backend was sent."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseOutputItemAddedEvent,
)

from herd.sim import SimConfig, SimModel
from tests.conftest import LLAMA_3B, Fleet, in_thread, running_fleet

THINKER = SimModel("qwen3:8b", family="qwen3", parameter_size="8B", thinking=True)
WEATHER: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
    },
}


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    spec = SimConfig(name="alpha", models=(LLAMA_3B, THINKER), loaded=("llama3.2:3b", "qwen3:8b"))
    async with running_fleet(tmp_path, [spec]) as fleet:
        yield fleet


@pytest.fixture
def oai(fleet: Fleet) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fleet.url + "/v1", api_key="not-needed", max_retries=0) as c:
        yield c


def sent(fleet: Fleet) -> dict[str, Any]:
    """The body of the backend's last request (an ``/api/chat``)."""
    path, body = fleet.sims["alpha"].requests[-1]
    assert path == "/api/chat"
    return body


async def test_create_gives_text_usage_and_the_served_model(
    fleet: Fleet, oai: openai.OpenAI
) -> None:
    raw = await in_thread(
        lambda: oai.responses.with_raw_response.create(
            model="llama3.2:3b",
            input="Hello there",
            instructions="Be brief.",
            temperature=0.2,
            metadata={"team": "docs"},
        )
    )
    response = raw.parse()
    assert raw.headers["x-herd-node"] == "alpha"
    assert response.id == "resp_" + raw.headers["x-herd-request-id"]
    assert response.status == "completed" and response.error is None
    assert response.model == "llama3.2:3b"
    assert len(response.output_text.split()) == 12  # the simulated node's default answer
    assert response.usage is not None
    assert response.usage.output_tokens == 12 and response.usage.input_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + 12
    assert response.instructions == "Be brief." and response.temperature == 0.2
    assert response.metadata == {"team": "docs"}
    assert response.model_extra is not None  # the SDK's Response declares no store field
    assert response.model_extra["store"] is True
    body = sent(fleet)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
    ]
    assert body["options"] == {"temperature": 0.2}
    assert body["stream"] is True and body["keep_alive"] == -1
    # max_output_tokens reached: incomplete, as OpenAI reports it.
    short = await in_thread(
        lambda: oai.responses.create(model="llama3.2:3b", input="Count", max_output_tokens=5)
    )
    assert short.status == "incomplete"
    assert short.incomplete_details is not None
    assert short.incomplete_details.reason == "max_output_tokens"
    assert len(short.output_text.split()) == 5 and sent(fleet)["options"]["num_predict"] == 5


async def test_a_stream_runs_to_response_completed(fleet: Fleet, oai: openai.OpenAI) -> None:
    events = await in_thread(
        lambda: list(
            oai.responses.create(
                model="qwen3:8b",
                input="Think first",
                reasoning={"effort": "high"},
                stream=True,
            )
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response  # type: ignore[union-attr]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and text == final.output_text
    thinking = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert thinking.split() == ["hmm", "let", "me", "weigh", "which", "path", "the", "herd"]
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.usage is not None and final.usage.output_tokens > 0
    assert final.model == "qwen3:8b" and final.reasoning.effort == "high"  # type: ignore[union-attr]
    assert sent(fleet)["think"] is True  # a level only for models that take levels
    # Streamed and stored: the stored copy is the completed response.
    again = await in_thread(lambda: oai.responses.retrieve(final.id))
    assert again.output_text == final.output_text and again.status == "completed"


async def test_a_function_call_round_trip(fleet: Fleet, oai: openai.OpenAI) -> None:
    first = await in_thread(
        lambda: oai.responses.create(
            model="llama3.2:3b",
            input="Weather in Paris?",
            tools=[WEATHER],  # type: ignore[list-item]
            store=False,
        )
    )
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.status == "completed"
    arguments = json.loads(call.arguments)
    assert isinstance(arguments["city"], str) and arguments["unit"] in ("c", "f")
    assert sent(fleet)["tools"][0]["function"]["name"] == "get_weather"
    # Without the store (as Codex does): the whole conversation goes back as input items.
    history: list[Any] = [
        {"role": "user", "content": "Weather in Paris?"},
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21"},
    ]
    final = await in_thread(
        lambda: oai.responses.create(
            model="llama3.2:3b",
            input=history,
            tools=[WEATHER],  # type: ignore[list-item]
            store=False,
        )
    )
    assert final.output_text and [i.type for i in final.output] == ["message"]
    messages = sent(fleet)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": arguments}}
    ]
    assert messages[2] == {"role": "tool", "content": "sunny, 21", "tool_name": "get_weather"}


async def test_a_streamed_function_call_round_trip(fleet: Fleet, oai: openai.OpenAI) -> None:
    """As Codex runs a turn: streamed, the call's arguments arrive as deltas that add up to the
    completed item, and the next streamed turn (the call and its output as input items)
    answers in text."""
    events = await in_thread(
        lambda: list(
            oai.responses.create(
                model="llama3.2:3b",
                input="Weather in Paris?",
                tools=[WEATHER],  # type: ignore[list-item]
                store=False,
                stream=True,
            )
        )
    )
    assert isinstance(events[0], ResponseCreatedEvent)
    last = events[-1]
    assert isinstance(last, ResponseCompletedEvent)
    added = [e.item.type for e in events if isinstance(e, ResponseOutputItemAddedEvent)]
    assert added == ["function_call"]
    deltas = "".join(
        e.delta for e in events if isinstance(e, ResponseFunctionCallArgumentsDeltaEvent)
    )
    (done,) = [e for e in events if isinstance(e, ResponseFunctionCallArgumentsDoneEvent)]
    assert deltas == done.arguments
    (call,) = [i for i in last.response.output if isinstance(i, ResponseFunctionToolCall)]
    assert call.arguments == done.arguments and call.name == "get_weather"
    arguments = json.loads(call.arguments)
    assert isinstance(arguments["city"], str) and arguments["unit"] in ("c", "f")
    history: list[Any] = [
        {"role": "user", "content": "Weather in Paris?"},
        *[item.model_dump(exclude_none=True) for item in last.response.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21"},
    ]
    answer = await in_thread(
        lambda: list(
            oai.responses.create(
                model="llama3.2:3b",
                input=history,
                tools=[WEATHER],  # type: ignore[list-item]
                store=False,
                stream=True,
            )
        )
    )
    completed = answer[-1]
    assert isinstance(completed, ResponseCompletedEvent) and completed.response.output_text
    assert [item.type for item in completed.response.output] == ["message"]
    assert [m["role"] for m in sent(fleet)["messages"]] == ["user", "assistant", "tool"]


APPLY_PATCH = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Apply a patch to the workspace.",
    "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"},
}


async def test_a_custom_tool_round_trip_as_codex_sends_it(fleet: Fleet, oai: openai.OpenAI) -> None:
    first = await in_thread(
        lambda: oai.responses.create(
            model="llama3.2:3b",
            input="Fix the bug.",
            tools=[APPLY_PATCH],  # type: ignore[list-item]
            store=False,
        )
    )
    (call,) = [item for item in first.output if item.type == "custom_tool_call"]
    assert call.name == "apply_patch" and isinstance(call.input, str) and call.input
    # The model saw a function with one string parameter, the grammar in its description.
    offered = sent(fleet)["tools"][0]["function"]
    assert offered["name"] == "apply_patch" and offered["parameters"]["required"] == ["input"]
    assert "start: /.+/" in offered["parameters"]["properties"]["input"]["description"]
    history: list[Any] = [
        {"role": "user", "content": "Fix the bug."},
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "Done!"},
    ]
    final = await in_thread(
        lambda: oai.responses.create(
            model="llama3.2:3b",
            input=history,
            tools=[APPLY_PATCH],  # type: ignore[list-item]
            store=False,
        )
    )
    assert final.output_text
    messages = sent(fleet)["messages"]
    assert messages[1]["tool_calls"] == [
        {"function": {"name": "apply_patch", "arguments": {"input": call.input}}}
    ]
    assert messages[2] == {"role": "tool", "content": "Done!", "tool_name": "apply_patch"}


async def test_previous_response_id_continues_the_conversation(
    fleet: Fleet, oai: openai.OpenAI
) -> None:
    first = await in_thread(
        lambda: oai.responses.create(
            model="llama3.2:3b", input="My name is Ada.", instructions="Be kind."
        )
    )
    second = await in_thread(
        lambda: oai.responses.create(
            model="llama3.2:3b", input="What is my name?", previous_response_id=first.id
        )
    )
    assert second.previous_response_id == first.id
    assert sent(fleet)["messages"] == [  # the first turn, without its instructions
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    await in_thread(
        lambda: oai.responses.create(
            model="llama3.2:3b",
            input="And again?",
            previous_response_id=second.id,
            instructions="Be brief.",
        )
    )
    assert [(m["role"], m["content"]) for m in sent(fleet)["messages"]] == [
        ("system", "Be brief."),
        ("user", "My name is Ada."),
        ("assistant", first.output_text),
        ("user", "What is my name?"),
        ("assistant", second.output_text),
        ("user", "And again?"),
    ]
    # A tool call answered by id: the call's name comes from the stored turn.
    asked = await in_thread(
        lambda: oai.responses.create(
            model="llama3.2:3b",
            input="Weather in Oslo?",
            tools=[WEATHER],  # type: ignore[list-item]
        )
    )
    (call,) = [item for item in asked.output if item.type == "function_call"]
    answered = await in_thread(
        lambda: oai.responses.create(
            model="llama3.2:3b",
            previous_response_id=asked.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "snow"}],
            tools=[WEATHER],  # type: ignore[list-item]
        )
    )
    assert answered.output_text
    assert sent(fleet)["messages"][-1] == {
        "role": "tool",
        "content": "snow",
        "tool_name": "get_weather",
    }
    stored = await in_thread(lambda: oai.responses.retrieve(first.id))
    assert stored.id == first.id and stored.output_text == first.output_text


async def test_an_unknown_previous_response_id_is_a_400_that_says_why(
    fleet: Fleet, oai: openai.OpenAI
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await in_thread(
            lambda: oai.responses.create(
                model="llama3.2:3b", input="Hi", previous_response_id="resp_never_made"
            )
        )
    assert info.value.status_code == 400
    assert "'resp_never_made' is not stored on this router" in info.value.message
    assert "in memory, not on disk" in info.value.message
    assert info.value.param == "previous_response_id"
    # Evicted: the router keeps the last N; with N = 1 the first is gone after a second.
    fleet.router.state.responses.max_responses = 1
    first = await in_thread(lambda: oai.responses.create(model="llama3.2:3b", input="one"))
    await in_thread(lambda: oai.responses.create(model="llama3.2:3b", input="two"))
    with pytest.raises(openai.BadRequestError, match="has been evicted"):
        await in_thread(
            lambda: oai.responses.create(
                model="llama3.2:3b", input="three", previous_response_id=first.id
            )
        )
    with pytest.raises(openai.NotFoundError):
        await in_thread(lambda: oai.responses.retrieve(first.id))


async def test_store_false_stores_nothing(fleet: Fleet, oai: openai.OpenAI) -> None:
    response = await in_thread(
        lambda: oai.responses.create(model="llama3.2:3b", input="Forget me", store=False)
    )
    assert response.model_extra is not None  # the SDK's Response declares no store field
    assert response.model_extra["store"] is False and response.output_text
    with pytest.raises(openai.NotFoundError) as info:
        await in_thread(lambda: oai.responses.retrieve(response.id))
    assert response.id in info.value.message
    with pytest.raises(openai.BadRequestError):
        await in_thread(
            lambda: oai.responses.create(
                model="llama3.2:3b", input="Hi", previous_response_id=response.id
            )
        )
    assert len(fleet.router.state.responses) == 0


async def test_text_format_json_schema(fleet: Fleet, oai: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    response = await in_thread(
        lambda: oai.responses.create(
            model="llama3.2:3b",
            input="Who routes?",
            text={"format": {"type": "json_schema", "name": "answer", "schema": schema}},
        )
    )
    assert json.loads(response.output_text) == {"answer": "herd"}
    assert sent(fleet)["format"] == schema
    assert response.text is not None and response.text.format.type == "json_schema"  # type: ignore[union-attr]


async def test_errors_in_the_sdks_terms(fleet: Fleet, oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        await in_thread(lambda: oai.responses.create(model="no-such-model", input="hi"))
    assert "no-such-model" in missing.value.message
    with pytest.raises(openai.BadRequestError) as tool:
        await in_thread(
            lambda: oai.responses.create(
                model="llama3.2:3b", input="hi", tools=[{"type": "web_search"}]
            )
        )
    assert "'web_search' is not supported" in tool.value.message
    assert tool.value.param == "tools"
    # A backend that breaks mid-stream: response.failed, and nothing stored.
    fleet.sims["alpha"].fail("die_mid_stream", times=1, after_chunks=3)
    events = await in_thread(
        lambda: list(oai.responses.create(model="llama3.2:3b", input="Go", stream=True))
    )
    assert events[0].type == "response.created" and events[-1].type == "response.failed"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error is not None
    assert "alpha" in failed.error.message
    with pytest.raises(openai.NotFoundError):
        await in_thread(lambda: oai.responses.retrieve(failed.id))


async def test_a_stored_response_belongs_to_the_key_that_made_it(tmp_path: Path) -> None:
    """On a router with API keys, one key's stored responses are not another's: continuing or
    reading one with another key is as if it had never been stored."""
    spec = SimConfig(name="alpha", models=(LLAMA_3B,), loaded=("llama3.2:3b",))
    async with running_fleet(tmp_path, [spec], api_keys=("key-a", "key-b")) as fleet:
        url = fleet.url + "/v1"
        with (
            openai.OpenAI(base_url=url, api_key="key-a", max_retries=0) as alice,
            openai.OpenAI(base_url=url, api_key="key-b", max_retries=0) as bob,
        ):
            first = await in_thread(lambda: alice.responses.create(model="llama3.2:3b", input="hi"))
            with pytest.raises(openai.BadRequestError, match="is not stored on this router"):
                await in_thread(
                    lambda: bob.responses.create(
                        model="llama3.2:3b", input="and?", previous_response_id=first.id
                    )
                )
            with pytest.raises(openai.NotFoundError):
                await in_thread(lambda: bob.responses.retrieve(first.id))
            again = await in_thread(lambda: alice.responses.retrieve(first.id))
            assert again.id == first.id
            follow = await in_thread(
                lambda: alice.responses.create(
                    model="llama3.2:3b", input="and?", previous_response_id=first.id
                )
            )
            assert follow.previous_response_id == first.id
