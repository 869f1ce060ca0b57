"""OpenAI Responses ⇄ Ollama translation, checked field by field, event by event, and through
the OpenAI SDK's own parser (its transport answers with what the translator made). Pure and
synchronous, like the module; the store too."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import openai
import pytest

from herd.core.api import responses as rs
from herd.core.api.shaping import ROUTES, InferenceRequest, shape
from herd.core.errors import BadRequest
from herd.core.responses_store import MAX_RESPONSES, ResponseStore, StoredResponse

ROUTE = ROUTES["/v1/responses"]
IMAGE = "data:image/png;base64,QUJD"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
CLOCK = {"type": "function", "name": "get_time", "parameters": {"type": "object"}}


def shaped(body: dict[str, Any], previous: StoredResponse | None = None) -> InferenceRequest:
    return shape(ROUTE, {"model": "m", **body}, previous=previous)


def sdk(payload: bytes, content_type: str) -> openai.OpenAI:
    """An OpenAI client whose transport answers every request with ``payload`` (through httpx2,
    the SDK's HTTP client)."""

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=payload, headers={"content-type": content_type})

    return openai.OpenAI(
        base_url="http://test/v1",
        api_key="x",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(answer)),
    )


def events(stream: bytes) -> list[dict[str, Any]]:
    """The SSE stream parsed: each ``event:`` line must name its data's ``type``."""
    out = []
    for block in stream.decode().split("\n\n"):
        if not block:
            continue
        head, data = block.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert head == f"event: {payload['type']}"
        out.append(payload)
    return out


# --- the request --------------------------------------------------------------------------


def test_every_input_item_type_maps_onto_ollama_messages() -> None:
    request = shaped(
        {
            "instructions": "Be brief.",
            "input": [
                {"role": "developer", "content": "Answer in French."},
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is"},
                        {"type": "input_text", "text": "this?"},
                        {"type": "input_image", "image_url": IMAGE, "detail": "auto"},
                    ],
                },
                {
                    "type": "reasoning",
                    "id": "rs_1",
                    "summary": [{"type": "summary_text", "text": "a summary"}],
                    "content": [{"type": "reasoning_text", "text": "a cat, I think"}],
                    "encrypted_content": "opaque",
                },
                {
                    "type": "message",
                    "role": "assistant",
                    "id": "msg_1",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}],
                },
                {"type": "function_call", "call_id": "c1", "name": "look", "arguments": '{"x":1}'},
                {"type": "function_call", "call_id": "c2", "name": "zoom", "arguments": {}},
                {"type": "function_call_output", "call_id": "c1", "output": "a cat"},
                {
                    "type": "function_call_output",
                    "call_id": "c2",
                    "output": [
                        {"type": "input_text", "text": "closer"},
                        {"type": "input_image", "image_url": IMAGE},
                    ],
                },
                {"type": "reasoning", "summary": [{"type": "summary_text", "text": "only"}]},
                # A model's malformed call, sent back: kept, not refused.
                {"type": "function_call", "call_id": "c3", "name": "look", "arguments": "{oops"},
                {"type": "function_call_output", "call_id": "c3", "output": "still a cat"},
                {"type": "reasoning", "summary": [{"type": "summary_text", "text": "dropped"}]},
                {"role": "user", "content": "And now?"},
            ],
        }
    )
    assert request.upstream_body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "What is\nthis?", "images": ["QUJD"]},
        {
            "role": "assistant",
            "content": "Let me look.",
            "thinking": "a cat, I think",  # the reasoning text wins over the summary
            "tool_calls": [
                {"function": {"name": "look", "arguments": {"x": 1}}},
                {"function": {"name": "zoom", "arguments": {}}},
            ],
        },
        {"role": "tool", "content": "a cat", "tool_name": "look"},
        {"role": "tool", "content": "closer", "images": ["QUJD"], "tool_name": "zoom"},
        {
            "role": "assistant",
            "content": "",
            "thinking": "only",
            "tool_calls": [{"function": {"name": "look", "arguments": {"_raw": "{oops"}}}],
        },
        {"role": "tool", "content": "still a cat", "tool_name": "look"},
        {"role": "user", "content": "And now?"},  # the reasoning before a user turn is dropped
    ]
    native = request.native
    assert isinstance(native, rs.ResponsesRequest)
    # The conversation kept for the store: normalised items, without the instructions.
    assert native.conversation[0] == {
        "type": "message",
        "role": "developer",
        "content": "Answer in French.",
    }
    assert native.conversation[3] == {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "Let me look."}],
    }
    assert native.conversation[5]["arguments"] == "{}"  # an object, as JSON text
    assert native.conversation[-1] == {"type": "message", "role": "user", "content": "And now?"}
    assert len(native.conversation) == 13


def test_fields_map_onto_ollama_options_think_and_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    request = shaped(
        {
            "input": "Hello",
            "temperature": 0.3,
            "top_p": 0.9,
            "max_output_tokens": 40,
            "reasoning": {"effort": "high", "summary": "auto"},
            "text": {"format": {"type": "json_schema", "name": "s", "schema": schema}},
            "keep_alive": "5m",
            "options": {"seed": 4, "temperature": 1.0},
            "store": False,
            "parallel_tool_calls": False,
            "truncation": "auto",
            "user": "u1",
            "metadata": {"team": "a"},
            "include": ["reasoning.encrypted_content"],
            "prompt_cache_key": "k",
            "stream": True,
        }
    )
    body = request.upstream_body
    assert body == {
        "messages": [{"role": "user", "content": "Hello"}],
        "options": {"seed": 4, "temperature": 0.3, "top_p": 0.9, "num_predict": 40},
        "think": "high",
        "format": schema,
        "keep_alive": "5m",
        "stream": True,
    }
    assert request.stream is True and request.model == "m:latest"
    native = request.native
    assert isinstance(native, rs.ResponsesRequest)
    assert native.store is False
    assert native.echo == {
        "instructions": None,
        "tools": [],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "temperature": 0.3,
        "top_p": 0.9,
        "max_output_tokens": 40,
        "previous_response_id": None,
        "store": False,
        "text": {"format": {"type": "json_schema", "name": "s", "schema": schema}},
        "reasoning": {"effort": "high", "summary": "auto"},
        "truncation": "auto",
        "user": "u1",
        "metadata": {"team": "a"},
    }


@pytest.mark.parametrize(
    ("fields", "think", "fmt"),
    [
        ({"reasoning": {"effort": "minimal"}}, "low", None),
        ({"reasoning": {"effort": "none"}}, False, None),
        ({"reasoning": {"summary": "concise"}}, None, None),
        ({"text": {"format": {"type": "json_object"}}}, None, "json"),
        ({"text": {"format": {"type": "text"}, "verbosity": "low"}}, None, None),
        ({"text": {}}, None, None),
    ],
)
def test_reasoning_effort_and_text_formats(
    fields: dict[str, Any], think: object, fmt: object
) -> None:
    body = shaped({"input": "x", **fields}).upstream_body
    assert body.get("think") == think
    assert body.get("format") == fmt
    # Defaults: a request is stored, streamed upstream, kept loaded.
    assert body["stream"] is True and body["keep_alive"] == -1


def test_function_tools_and_tool_choice() -> None:
    both = [WEATHER, {**CLOCK, "strict": True}]
    body = shaped({"input": "x", "tools": both}).upstream_body
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": WEATHER["parameters"],
                "description": "Weather for a city",
            },
        },
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    ]
    native = shaped({"input": "x", "tools": both, "tool_choice": "required"}).native
    assert native.echo["tool_choice"] == "required"
    assert [t["strict"] for t in native.echo["tools"]] == [None, True]
    assert "tools" not in shaped({"input": "x", "tools": both, "tool_choice": "none"}).upstream_body
    named = shaped(
        {"input": "x", "tools": both, "tool_choice": {"type": "function", "name": "get_time"}}
    )
    assert [t["function"]["name"] for t in named.upstream_body["tools"]] == ["get_time"]
    assert named.native.echo["tool_choice"] == {"type": "function", "name": "get_time"}
    allowed = shaped(
        {
            "input": "x",
            "tools": both,
            "tool_choice": {
                "type": "allowed_tools",
                "mode": "auto",
                "tools": [{"type": "function", "name": "get_weather"}],
            },
        }
    )
    assert [t["function"]["name"] for t in allowed.upstream_body["tools"]] == ["get_weather"]


def test_a_codex_shaped_request() -> None:
    """What Codex sends with ``wire_api = "responses"``: instructions, developer and user
    messages of input_text parts, a reasoning item it got back (encrypted content, no text),
    function tools, hints herd ignores, store false, a stream."""
    shell = {
        "type": "function",
        "name": "shell",
        "description": "Runs a shell command",
        "strict": False,
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "array", "items": {"type": "string"}}},
            "required": ["command"],
            "additionalProperties": False,
        },
    }
    request = shaped(
        {
            "instructions": "You are a coding agent.",
            "input": [
                {
                    "type": "message",
                    "role": "developer",
                    "content": [{"type": "input_text", "text": "<permissions>"}],
                },
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "list the files"}],
                },
                {
                    "type": "reasoning",
                    "id": "rs_9",
                    "summary": [],
                    "content": None,
                    "encrypted_content": "gAAAA",
                },
                {
                    "type": "function_call",
                    "name": "shell",
                    "arguments": '{"command":["ls"]}',
                    "call_id": "call_9",
                },
                {"type": "function_call_output", "call_id": "call_9", "output": "README.md"},
            ],
            "tools": [shell],
            "tool_choice": "auto",
            "parallel_tool_calls": False,
            "reasoning": {"effort": "medium", "summary": "auto"},
            "store": False,
            "stream": True,
            "include": ["reasoning.encrypted_content"],
            "prompt_cache_key": "0199",
            "text": {"verbosity": "medium"},
        }
    )
    body = request.upstream_body
    assert body["messages"] == [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "system", "content": "<permissions>"},
        {"role": "user", "content": "list the files"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "shell", "arguments": {"command": ["ls"]}}}],
        },
        {"role": "tool", "content": "README.md", "tool_name": "shell"},
    ]
    assert body["think"] == "medium" and body["tools"][0]["function"]["name"] == "shell"
    assert request.stream is True and request.native.store is False
    assert request.native.echo["text"] == {"verbosity": "medium", "format": {"type": "text"}}
    # Not streamed unless asked: the route's default.
    assert shaped({"input": "x"}).stream is False


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"input": "x", "model": None}, "model", "'model'"),
        ({}, "input", "'input'"),
        ({"input": 3}, "input", "'input'"),
        ({"input": []}, "input", "'input'"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input", "input[0].role"),
        ({"input": [7]}, "input", "input[0] must be an object"),
        ({"input": [{"content": "x"}]}, "input", "unsupported input item type None"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input",
            "input[0].content[0]: unsupported content part 'input_file'",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
            "input",
            "needs 'text'",
        ),
        ({"input": [{"role": "user", "content": 5}]}, "input", "input[0].content"),
        (
            {
                "input": [
                    {
                        "role": "user",
                        "content": [{"type": "input_image", "image_url": "https://x/cat.png"}],
                    }
                ]
            },
            "input",
            "data: URLs",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f1"}]}]},
            "input",
            "file_id",
        ),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "input",
            "needs 'call_id'",
        ),
        (
            {"input": [{"type": "function_call", "call_id": "c", "arguments": "{}"}]},
            "input",
            "needs 'name'",
        ),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": 5}]},
            "input",
            "arguments must be JSON text",
        ),
        ({"input": ["a bare string"]}, "input", "input[0] must be an object"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input", "call_id"),
        (
            {
                "input": [
                    {"type": "function_call_output", "call_id": "c", "output": [{"type": "x"}]}
                ]
            },
            "input",
            "input[0].output[0]: unsupported content part 'x'",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input", "previous_response_id"),
        ({"input": [{"type": "web_search_call", "id": "w"}]}, "input", "'web_search_call'"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools", "'web_search'"),
        ({"input": "x", "tools": [{"type": "file_search"}]}, "tools", "'file_search'"),
        ({"input": "x", "tools": {"type": "function"}}, "tools", "'tools' must be a list"),
        ({"input": "x", "tools": [{"type": "function"}]}, "tools", "needs 'name'"),
        (
            {"input": "x", "tools": [{"type": "function", "name": "f", "parameters": []}]},
            "tools",
            "parameters",
        ),
        (
            {"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "g"}},
            "tool_choice",
            "'g'",
        ),
        ({"input": "x", "tool_choice": "sometimes"}, "tool_choice", "sometimes"),
        ({"input": "x", "tool_choice": {"type": "file_search"}}, "tool_choice", "file_search"),
        ({"input": "x", "temperature": "hot"}, "temperature", "'temperature'"),
        ({"input": "x", "top_p": True}, "top_p", "'top_p'"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "'max_output_tokens'"),
        ({"input": "x", "max_output_tokens": 2.5}, "max_output_tokens", "'max_output_tokens'"),
        ({"input": "x", "text": "json"}, "text", "'text'"),
        ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format", "'xml'"),
        (
            {"input": "x", "text": {"format": {"type": "json_schema", "name": "s"}}},
            "text.format",
            "schema",
        ),
        ({"input": "x", "reasoning": "high"}, "reasoning", "'reasoning'"),
        ({"input": "x", "reasoning": {"effort": "max"}}, "reasoning.effort", "'max'"),
        ({"input": "x", "reasoning": {"summary": "long"}}, "reasoning.summary", "'long'"),
        ({"input": "x", "store": "yes"}, "store", "'store'"),
        ({"input": "x", "parallel_tool_calls": 1}, "parallel_tool_calls", "parallel_tool_calls"),
        ({"input": "x", "truncation": "middle"}, "truncation", "'middle'"),
        ({"input": "x", "instructions": ["a"]}, "instructions", "'instructions'"),
        ({"input": "x", "user": 5}, "user", "'user'"),
        ({"input": "x", "metadata": ["a"]}, "metadata", "'metadata'"),
        ({"input": "x", "options": 1}, "options", "'options'"),
        ({"input": "x", "background": True}, "background", "background"),
        ({"input": "x", "conversation": "conv_1"}, "conversation", "previous_response_id"),
        ({"input": "x", "prompt": {"id": "p"}}, "prompt", "prompt"),
        ({"input": "x", "previous_response_id": 5}, "previous_response_id", "response id"),
        (
            {"input": "x", "previous_response_id": "resp_gone"},
            "previous_response_id",
            "'resp_gone' is not stored on this router",
        ),
        ({"input": [user("x")] * (rs.MAX_INPUT_ITEMS + 1)}, "input", "too many input items"),
    ],
)
def test_bad_requests_name_the_field(body: dict[str, Any], param: str, fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        shape(ROUTE, {"model": "m", **body})
    assert info.value.param == param
    assert fragment in info.value.message


def stored(conversation: list[dict[str, Any]], response_id: str = "resp_a") -> StoredResponse:
    return StoredResponse(
        id=response_id, response={"id": response_id}, conversation=tuple(conversation)
    )


def test_a_previous_response_is_prepended_without_its_instructions() -> None:
    earlier = stored(
        [
            {"type": "message", "role": "user", "content": "Weather in Paris?"},
            {
                "id": "fc_1",
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city":"Paris"}',
                "status": "completed",
            },
        ]
    )
    request = shaped(
        {
            "instructions": "Be brief.",
            "previous_response_id": "resp_a",
            "input": [{"type": "function_call_output", "call_id": "call_1", "output": "sunny"}],
        },
        previous=earlier,
    )
    assert request.upstream_body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},  # named across turns
    ]
    native = request.native
    assert native.echo["previous_response_id"] == "resp_a"
    assert [item["type"] for item in native.conversation] == [
        "message",
        "function_call",
        "function_call_output",
    ]
    # The handler found nothing (or something else) for the id: a 400 that says why.
    for previous in (None, stored([], "resp_other")):
        with pytest.raises(BadRequest) as info:
            shaped({"previous_response_id": "resp_a", "input": "x"}, previous=previous)
        message = info.value.message
        assert "'resp_a' is not stored on this router" in message
        assert f"the last {MAX_RESPONSES} responses" in message
        assert "in memory, not on disk" in message and "evicted" in message


def test_too_many_items_with_the_previous_chain() -> None:
    earlier = stored([user("x")] * rs.MAX_INPUT_ITEMS)
    with pytest.raises(BadRequest, match="with the previous responses"):
        shaped({"previous_response_id": "resp_a", "input": "one more"}, previous=earlier)


# --- the whole answer ---------------------------------------------------------------------

ANSWER = {
    "model": "m",
    "message": {
        "role": "assistant",
        "thinking": "Paris, probably.",
        "content": "Let me check.",
        "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "own_id", "function": {"name": "get_time", "arguments": {}}},
        ],
    },
    "done": True,
    "done_reason": "stop",
    "prompt_eval_count": 11,
    "eval_count": 7,
}


def test_whole_answer_is_the_sdk_response() -> None:
    request = shaped({"input": "Weather?", "instructions": "Be brief.", "tools": [WEATHER, CLOCK]})
    payload, outcome = rs.whole_answer(request, ANSWER, "r1", 1_700_000_000, "llama3.2:3b")
    assert payload["id"] == "resp_r1" and payload["object"] == "response"
    assert payload["status"] == "completed" and payload["incomplete_details"] is None
    assert payload["output"] == [
        {
            "id": "rs_r1_0",
            "type": "reasoning",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "Paris, probably."}],
            "status": "completed",
        },
        {
            "id": "msg_r1_1",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}],
        },
        {
            "id": "fc_r1_2",
            "type": "function_call",
            "call_id": "call_r1_0",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
            "status": "completed",
        },
        {
            "id": "fc_r1_3",
            "type": "function_call",
            "call_id": "own_id",
            "name": "get_time",
            "arguments": "{}",
            "status": "completed",
        },
    ]
    assert payload["usage"] == {
        "input_tokens": 11,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 7,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 18,
    }
    assert isinstance(outcome, StoredResponse) and outcome.id == "resp_r1"
    assert outcome.response is payload
    assert outcome.conversation == (
        {"type": "message", "role": "user", "content": "Weather?"},
        *payload["output"],
    )
    with sdk(json.dumps(payload).encode(), "application/json") as client:
        response = client.responses.create(model="m", input="Weather?")
    assert response.output_text == "Let me check."
    assert response.model == "llama3.2:3b" and response.created_at == 1_700_000_000
    assert response.instructions == "Be brief."
    assert [t.name for t in response.tools] == ["get_weather", "get_time"]  # type: ignore[union-attr]
    calls = [item for item in response.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert response.usage is not None and response.usage.total_tokens == 18
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.error is None
    assert response.model_extra is not None  # the SDK's Response declares no store field
    assert response.model_extra["store"] is True


def test_length_is_incomplete_and_store_false_keeps_nothing() -> None:
    request = shaped({"input": "Count.", "max_output_tokens": 3, "store": False})
    data = {"message": {"content": "1 2 3"}, "done_reason": "length", "eval_count": 3}
    payload, outcome = rs.whole_answer(request, data, "r2", 1, "m")
    assert outcome is None
    assert payload["status"] == "incomplete"
    assert payload["incomplete_details"] == {"reason": "max_output_tokens"}
    assert payload["output"][0]["status"] == "incomplete"
    assert payload["max_output_tokens"] == 3 and payload["store"] is False
    with sdk(json.dumps(payload).encode(), "application/json") as client:
        response = client.responses.create(model="m", input="Count.")
    assert response.status == "incomplete" and response.output_text == "1 2 3"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"


def test_an_empty_answer_is_an_empty_message() -> None:
    payload, _ = rs.whole_answer(shaped({"input": "x"}), {"message": {}}, "r3", 1, "m")
    assert payload["output"] == [
        {
            "id": "msg_r3_0",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "", "annotations": []}],
        }
    ]


def test_a_whole_answer_is_what_the_stream_would_end_with() -> None:
    """A whole answer is built by the stream's translator with no events rendered: its
    response and what it stores are those of the same answer streamed, event for event."""
    for body, data in (
        ({"input": "Weather?", "tools": [WEATHER, CLOCK]}, ANSWER),
        (
            {"input": "Count.", "max_output_tokens": 3},
            {"message": {"content": "1 2 3"}, "done_reason": "length"},
        ),
        ({"input": "x", "store": False}, {"message": {}}),
    ):
        request = shaped(body)
        payload, outcome = rs.whole_answer(request, data, "r9", 7, "m")
        loud = rs.stream_translator(request, "r9", 7, "m")
        assert isinstance(loud, rs.ResponsesStreamTranslator)
        assert loud.feed({**data, "done": True}).startswith(b"event: response.created")
        assert payload == loud.response
        assert outcome == loud.outcome


# --- the stream ---------------------------------------------------------------------------

CHUNKS: list[dict[str, Any]] = [
    {"message": {"role": "assistant", "content": "", "thinking": "Hm"}, "done": False},
    {"message": {"role": "assistant", "content": "", "thinking": "m."}, "done": False},
    {"message": {"role": "assistant", "content": "Hel"}, "done": False},
    {"message": {"role": "assistant", "content": "lo"}, "done": False},
    {
        "message": {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
        },
        "done": False,
    },
    {
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 9,
        "eval_count": 5,
    },
]


def streamed(
    chunks: list[dict[str, Any]], body: dict[str, Any] | None = None
) -> tuple[bytes, rs.ResponsesStreamTranslator]:
    request = shaped(body or {"input": "Hi", "stream": True})
    translator = rs.stream_translator(request, "r4", 5, "qwen2.5:7b")
    assert isinstance(translator, rs.ResponsesStreamTranslator)
    out = b"".join(translator.feed(c) for c in chunks)
    return out + translator.done(), translator


def test_stream_event_order_indices_and_sequence_numbers() -> None:
    stream, translator = streamed(CHUNKS)
    parsed = events(stream)
    assert [(e["type"], e.get("output_index")) for e in parsed] == [
        ("response.created", None),
        ("response.in_progress", None),
        ("response.output_item.added", 0),
        ("response.content_part.added", 0),
        ("response.reasoning_text.delta", 0),
        ("response.reasoning_text.delta", 0),
        ("response.reasoning_text.done", 0),
        ("response.content_part.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.content_part.added", 1),
        ("response.output_text.delta", 1),
        ("response.output_text.delta", 1),
        ("response.output_text.done", 1),
        ("response.content_part.done", 1),
        ("response.output_item.done", 1),
        ("response.output_item.added", 2),
        ("response.function_call_arguments.delta", 2),
        ("response.function_call_arguments.done", 2),
        ("response.output_item.done", 2),
        ("response.completed", None),
    ]
    assert [e["sequence_number"] for e in parsed] == list(range(len(parsed)))
    assert parsed[0]["response"]["status"] == "in_progress"
    assert parsed[0]["response"]["output"] == [] and parsed[0]["response"]["usage"] is None
    assert parsed[2]["item"] == {
        "id": "rs_r4_0",
        "type": "reasoning",
        "summary": [],
        "content": [],
        "status": "in_progress",
    }
    assert [e["delta"] for e in parsed[4:6]] == ["Hm", "m."]
    assert parsed[6]["text"] == "Hmm."
    assert {e["item_id"] for e in parsed[3:8]} == {"rs_r4_0"}
    assert {e["item_id"] for e in parsed[10:15]} == {"msg_r4_1"}
    assert all(e["content_index"] == 0 for e in parsed[10:15])
    assert parsed[10]["part"] == {"type": "output_text", "text": "", "annotations": []}
    assert [e["delta"] for e in parsed[11:13]] == ["Hel", "lo"]
    assert parsed[13]["text"] == "Hello"
    assert parsed[16]["item"]["arguments"] == "" and parsed[16]["item"]["name"] == "get_weather"
    assert parsed[17]["delta"] == '{"city":"Oslo"}' == parsed[18]["arguments"]
    assert parsed[19]["item"]["status"] == "completed"
    final = parsed[-1]["response"]
    assert final["status"] == "completed" and final["model"] == "qwen2.5:7b"
    assert [i["type"] for i in final["output"]] == ["reasoning", "message", "function_call"]
    assert final["output"][1]["content"][0]["text"] == "Hello"
    assert final["usage"]["input_tokens"] == 9 and final["usage"]["output_tokens"] == 5
    assert translator.finished and translator.response == final
    assert isinstance(translator.outcome, StoredResponse)
    assert translator.outcome.conversation[-3:] == tuple(final["output"])
    assert not stream.endswith(b"[DONE]\n\n")


def test_the_stream_parses_in_the_sdk() -> None:
    stream, _ = streamed(CHUNKS)
    with sdk(stream, "text/event-stream") as client:
        parsed = list(client.responses.create(model="m", input="Hi", stream=True))
        with client.responses.stream(model="m", input="Hi") as helper:
            final = helper.get_final_response()
    assert parsed[-1].type == "response.completed"
    text = "".join(e.delta for e in parsed if e.type == "response.output_text.delta")
    assert text == "Hello"
    reasoning = "".join(e.delta for e in parsed if e.type == "response.reasoning_text.delta")
    assert reasoning == "Hmm."
    # The SDK's own accumulator builds the same response from the events.
    assert final.output_text == "Hello"
    assert [i.type for i in final.output] == ["reasoning", "message", "function_call"]
    assert final.usage is not None and final.usage.total_tokens == 14


def test_a_stream_cut_by_length_ends_incomplete() -> None:
    stream, translator = streamed(
        [
            {"message": {"content": "one two"}, "done": False},
            {"message": {"content": ""}, "done": True, "done_reason": "length", "eval_count": 2},
        ]
    )
    parsed = events(stream)
    assert parsed[-1]["type"] == "response.incomplete"
    assert parsed[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert parsed[-2]["item"]["status"] == "incomplete"
    assert translator.finished


def test_an_empty_stream_still_sends_a_message() -> None:
    stream, _ = streamed([{"message": {"content": ""}, "done": True, "done_reason": "stop"}])
    kinds = [e["type"] for e in events(stream)]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]


def test_a_failure_mid_stream_is_response_failed() -> None:
    stream, translator = streamed(CHUNKS[2:3])
    stream += translator.error("node alpha broke the stream")
    parsed = events(stream)
    assert [e["sequence_number"] for e in parsed] == list(range(len(parsed)))
    failed = parsed[-1]
    assert failed["type"] == "response.failed"
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {
        "code": "server_error",
        "message": "node alpha broke the stream",
    }
    assert failed["response"]["output"][0]["status"] == "incomplete"
    assert failed["response"]["output"][0]["content"][0]["text"] == "Hel"
    assert not translator.finished and translator.outcome is None
    with sdk(stream, "text/event-stream") as client:
        last = list(client.responses.create(model="m", input="Hi", stream=True))[-1]
    assert last.type == "response.failed"
    assert last.response.error is not None
    assert last.response.error.message == "node alpha broke the stream"


def test_a_failure_before_any_chunk_still_starts_the_stream() -> None:
    request = shaped({"input": "Hi", "stream": True})
    translator = rs.stream_translator(request, "r5", 1, "m")
    kinds = [e["type"] for e in events(translator.error("no"))]
    assert kinds == ["response.created", "response.in_progress", "response.failed"]


def test_the_routers_own_cut_is_an_error_event() -> None:
    block = rs.stream_error("reaped: no token for 60 s")
    assert block.startswith(b"event: error\ndata: ")
    assert json.loads(block.split(b"data: ", 1)[1]) == {
        "type": "error",
        "code": "server_error",
        "message": "reaped: no token for 60 s",
        "param": None,
    }
    with sdk(block, "text/event-stream") as client:
        (event,) = list(client.responses.create(model="m", input="Hi", stream=True))
    assert event.type == "error" and event.message == "reaped: no token for 60 s"


# --- the store ----------------------------------------------------------------------------


def entry(response_id: str, text: str = "") -> StoredResponse:
    return StoredResponse(
        id=response_id,
        response={"id": response_id},
        conversation=({"type": "message", "role": "user", "content": text},),
    )


def test_the_store_keeps_the_most_recently_used_by_count() -> None:
    store = ResponseStore(max_responses=2)
    assert store.put(entry("a")) and store.put(entry("b"))
    assert store.get("a") is not None  # a is now the most recently used
    store.put(entry("c"))
    assert store.get("b") is None and len(store) == 2
    assert store.get("a") is not None and store.get("c") is not None
    assert store.get(None) is None and store.get(5) is None


def test_the_store_keeps_under_its_byte_limit() -> None:
    size = ResponseStore()
    size.put(entry("a", "x" * 100))
    one = size.size
    assert one > 100
    store = ResponseStore(max_bytes=2 * one + 10)
    for name in ("a", "b", "c"):
        store.put(entry(name, "x" * 100))
    assert len(store) == 2 and store.size == 2 * one and store.get("a") is None
    store.put(entry("b", "y" * 100))  # the same id again replaces, without counting twice
    assert len(store) == 2 and store.size == 2 * one
    assert store.get("b").conversation[0]["content"] == "y" * 100  # type: ignore[union-attr]
    # One response over the whole limit is not kept, and evicts nothing.
    assert not store.put(entry("huge", "z" * (3 * one)))
    assert store.get("huge") is None and len(store) == 2
