"""OpenAI ⇄ Ollama translation, checked field by field and through the OpenAI SDK's own parser."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall

from herd.core.api import openai_compat as oc
from herd.core.errors import BadRequest

CHUNKS = [
    {"model": "m", "message": {"role": "assistant", "content": "Hel"}, "done": False},
    {"model": "m", "message": {"role": "assistant", "content": "lo"}, "done": False},
    {
        "model": "m",
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 7,
        "eval_count": 2,
    },
]


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


def test_chat_request_fields() -> None:
    body = oc.chat_request_to_ollama(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is"},
                        {"type": "text", "text": "this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "look", "arguments": '{"x": 1}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "a cat"},
            ],
            "temperature": 0.5,
            "top_p": 0.9,
            "seed": 1,
            "stop": "END",
            "max_completion_tokens": 9,
            "presence_penalty": 0.1,
            "frequency_penalty": 0.2,
            "response_format": {"type": "json_object"},
            "tools": [{"type": "function", "function": {"name": "look", "parameters": {}}}],
            "tool_choice": "auto",
            "stream": True,
            "keep_alive": "10m",
            "n": 1,
        }
    )
    # The model is set per attempt, and text is always streamed upstream (see shaping).
    assert "model" not in body and "stream" not in body
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    assert body["messages"][1] == {"role": "user", "content": "what is\nthis?", "images": ["QUJD"]}
    assert body["messages"][2]["tool_calls"] == [
        {"function": {"name": "look", "arguments": {"x": 1}}}
    ]
    assert body["messages"][3] == {"role": "tool", "content": "a cat", "tool_name": "look"}
    assert body["options"] == {
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 1,
        "stop": ["END"],
        "num_predict": 9,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
    }
    assert body["format"] == "json"
    assert body["tools"][0]["function"]["name"] == "look"
    assert body["keep_alive"] == "10m"
    assert "tool_choice" not in body and "n" not in body


def test_json_schema_and_tool_choice_none() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body = oc.chat_request_to_ollama(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "s", "schema": schema},
            },
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "none",
        }
    )
    assert body["format"] == schema
    assert "tools" not in body


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "'model'"),
        ({"model": "m", "messages": "hi"}, "'messages'"),
        ({"model": "m", "messages": []}, "'messages'"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0]"),
        (
            {
                "model": "m",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}
                        ],
                    }
                ],
            },
            "data: URLs",
        ),
        (
            {
                "model": "m",
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}],
                    }
                ],
            },
            "not valid JSON",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
            "'max_tokens'",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            "'temperature'",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [1]}, "'stop'"),
    ],
)
def test_bad_chat_requests_name_the_problem(body: dict[str, Any], fragment: str) -> None:
    with pytest.raises(BadRequest, match=None) as info:
        oc.chat_request_to_ollama(body)
    assert fragment in info.value.message


def test_completion_and_embedding_requests() -> None:
    body = oc.completion_request_to_ollama(
        {"model": "m", "prompt": ["once"], "suffix": "end", "max_tokens": 3}
    )
    assert body == {  # stream: set by shaping (always true upstream for text)
        "model": "m",
        "prompt": "once",
        "suffix": "end",
        "options": {"num_predict": 3},
    }
    assert oc.embeddings_request_to_ollama(
        {"model": "e", "input": ["a", "b"], "dimensions": 4}
    ) == {"model": "e", "input": ["a", "b"], "dimensions": 4}
    with pytest.raises(BadRequest, match="token id"):
        oc.embeddings_request_to_ollama({"model": "e", "input": [[1, 2]]})
    with pytest.raises(BadRequest, match="'prompt'"):
        oc.completion_request_to_ollama({"model": "m", "prompt": ["a", "b"]})


def test_whole_chat_response_parses_in_the_sdk() -> None:
    resp = {
        "model": "m",
        "message": {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "look", "arguments": {"x": 1}}}],
        },
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 5,
        "eval_count": 3,
    }
    payload = oc.chat_response_to_openai(resp, request_id="r1", created=1, model="m")
    with sdk(json.dumps(payload).encode(), "application/json") as client:
        completion = client.chat.completions.create(model="m", messages=[])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert call.function.name == "look"
    assert json.loads(call.function.arguments) == {"x": 1}
    assert completion.usage is not None and completion.usage.total_tokens == 8


def test_length_finish_reason() -> None:
    resp = {"message": {"content": "abc"}, "done_reason": "length", "eval_count": 3}
    payload = oc.chat_response_to_openai(resp, request_id="r", created=1, model="m")
    assert payload["choices"][0]["finish_reason"] == "length"


def test_chat_stream_parses_in_the_sdk_with_usage() -> None:
    translator = oc.ChatStreamTranslator(request_id="r2", created=1, model="m", include_usage=True)
    stream = b"".join(translator.feed(c) for c in CHUNKS) + translator.done()
    assert translator.finished and translator.completion_tokens == 2
    with sdk(stream, "text/event-stream") as client:
        chunks = list(client.chat.completions.create(model="m", messages=[], stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 7


def test_chat_stream_tool_calls() -> None:
    translator = oc.ChatStreamTranslator(request_id="r3", created=1, model="m", include_usage=False)
    stream = translator.feed(
        {
            "message": {
                "content": "",
                "tool_calls": [
                    {"function": {"name": "a", "arguments": {"q": 1}}},
                    {"function": {"name": "b", "arguments": {}}},
                ],
            },
            "done": False,
        }
    )
    stream += translator.feed({"message": {"content": ""}, "done": True, "done_reason": "stop"})
    stream += translator.done()
    with sdk(stream, "text/event-stream") as client:
        chunks = list(client.chat.completions.create(model="m", messages=[], stream=True))
    calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert [(t.index, t.function.name) for t in calls] == [(0, "a"), (1, "b")]  # type: ignore[union-attr]
    assert len({t.id for t in calls}) == 2
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_stream_error_event_then_done() -> None:
    translator = oc.ChatStreamTranslator(request_id="r", created=1, model="m", include_usage=False)
    out = translator.feed(CHUNKS[0]) + translator.error("node broke")
    events = [e for e in out.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["message"] == "node broke"
    with (
        sdk(out, "text/event-stream") as client,
        pytest.raises(openai.APIError, match="node broke"),
    ):
        list(client.chat.completions.create(model="m", messages=[], stream=True))


def test_completion_stream_and_embeddings_in_the_sdk() -> None:
    translator = oc.CompletionStreamTranslator(
        request_id="r", created=1, model="m", include_usage=False
    )
    stream = b"".join(
        translator.feed(c)
        for c in [
            {"response": "on", "done": False},
            {"response": "ce", "done": False},
            {"response": "", "done": True, "done_reason": "length", "eval_count": 2},
        ]
    )
    with sdk(stream + translator.done(), "text/event-stream") as client:
        chunks = list(client.completions.create(model="m", prompt="x", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "once"
    assert chunks[-1].choices[0].finish_reason == "length"
    payload = oc.embed_response_to_openai(
        {"embeddings": [[0.1, 0.2]], "prompt_eval_count": 2}, model="e"
    )
    with sdk(json.dumps(payload).encode(), "application/json") as client:
        result = client.embeddings.create(model="e", input="x")
    assert result.data[0].embedding == [0.1, 0.2]
    assert result.usage.prompt_tokens == 2


def test_prompt_estimate_is_robust() -> None:
    assert oc.estimate_prompt_tokens({"messages": [{"content": "x" * 400}]}) == 100
    assert oc.estimate_prompt_tokens({"messages": [{"content": [{"text": "abcd"}]}]}) == 1
    assert oc.estimate_prompt_tokens({"prompt": 5, "messages": "oddity"}) == 1
    assert oc.estimate_prompt_tokens({}) == 0
