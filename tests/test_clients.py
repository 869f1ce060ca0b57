"""The real OpenAI and Ollama Python clients against a running router with two simulated nodes."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import httpx2
import ollama
import openai
import pytest
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionToolParam,
)

from tests.conftest import Fleet, in_thread

TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture
def oai(fleet: Fleet) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fleet.url + "/v1", api_key="not-needed", max_retries=0) as c:
        yield c


@pytest.fixture
def oll(fleet: Fleet) -> Iterator[ollama.Client]:
    with ollama.Client(host=fleet.url) as c:
        yield c


async def test_openai_chat_not_streaming_lands_on_the_hot_node(
    fleet: Fleet, oai: openai.OpenAI
) -> None:
    def call() -> tuple[ChatCompletion, httpx2.Headers]:
        raw = oai.chat.completions.with_raw_response.create(
            model="llama3.2:3b",
            messages=[{"role": "user", "content": "Hello there"}],
            temperature=0.2,
            seed=7,
            stop=["\n\n"],
            max_tokens=5,
        )
        return raw.parse(), raw.headers

    completion, headers = await in_thread(call)
    assert headers["x-herd-node"] == "alpha"  # llama3.2:3b is loaded on alpha only
    assert headers["x-herd-model"] == "llama3.2:3b"
    assert headers["x-herd-retries"] == "0"
    assert headers["x-herd-fallback"] == "false"
    assert headers["x-herd-request-id"]
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"  # max_tokens=5 was reached
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert completion.usage.prompt_tokens > 0
    # The backend saw the OpenAI fields as Ollama options.
    path, body = fleet.sims["alpha"].requests[-1]
    assert path == "/api/chat"
    assert body["options"]["temperature"] == 0.2
    assert body["options"]["seed"] == 7
    assert body["options"]["stop"] == ["\n\n"]
    assert body["options"]["num_predict"] == 5
    assert body["keep_alive"] == -1


async def test_openai_chat_streaming_with_usage(fleet: Fleet, oai: openai.OpenAI) -> None:
    def call() -> list[ChatCompletionChunk]:
        stream = oai.chat.completions.create(
            model="qwen2.5:7b",
            messages=[{"role": "user", "content": "Stream please"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        return list(stream)

    chunks = await in_thread(call)
    first = chunks[0]
    assert first.choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) >= 5
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0
    assert fleet.sims["beta"].requests[-1][0] == "/api/chat"  # qwen is hot on beta


async def test_openai_tools_round_trip(fleet: Fleet, oai: openai.OpenAI) -> None:
    def call() -> ChatCompletion:
        return oai.chat.completions.create(
            model="llama3.2:3b",
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "user", "content": "And in Rome?"},
            ],
            tools=TOOLS,
        )

    completion = await in_thread(call)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    tool_call = choice.message.tool_calls[0]
    assert isinstance(tool_call, ChatCompletionMessageFunctionToolCall)
    assert tool_call.function.name == "get_weather"
    json.loads(tool_call.function.arguments)
    _, body = fleet.sims["alpha"].requests[-1]
    assert body["tools"][0]["function"]["name"] == "get_weather"
    assert body["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


async def test_openai_completions_and_embeddings(fleet: Fleet, oai: openai.OpenAI) -> None:
    client = oai
    completion = await in_thread(
        lambda: client.completions.create(
            model="llama3.2:3b", prompt="Once upon a time", max_tokens=4
        )
    )
    assert completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    streamed = await in_thread(
        lambda: list(client.completions.create(model="llama3.2:3b", prompt="Once", stream=True))
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices)
    embedding = await in_thread(
        lambda: client.embeddings.create(model="nomic-embed-text", input=["one", "two"])
    )
    assert len(embedding.data) == 2
    assert len(embedding.data[0].embedding) == 8


async def test_openai_models_and_unknown_model(fleet: Fleet, oai: openai.OpenAI) -> None:
    client = oai
    models = await in_thread(lambda: client.models.list())
    ids = {m.id for m in models.data}
    assert {"llama3.2:3b", "qwen2.5:7b", "nomic-embed-text:latest"} <= ids
    model = await in_thread(lambda: client.models.retrieve("qwen2.5:7b"))
    assert model.id == "qwen2.5:7b"
    with pytest.raises(openai.NotFoundError) as info:
        await in_thread(
            lambda: client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "hi"}]
            )
        )
    assert info.value.status_code == 404
    assert "no-such-model" in info.value.message
    with pytest.raises(openai.NotFoundError):
        await in_thread(lambda: client.models.retrieve("no-such-model"))


async def test_ollama_chat_and_generate(fleet: Fleet, oll: ollama.Client) -> None:
    client = oll
    reply = await in_thread(
        lambda: client.chat(
            model="llama3.2:3b", messages=[{"role": "user", "content": "Hi"}], stream=False
        )
    )
    assert reply.message.content
    assert reply.done and reply.eval_count and reply.eval_count > 0
    parts = await in_thread(
        lambda: list(
            client.chat(
                model="qwen2.5:7b", messages=[{"role": "user", "content": "Hi"}], stream=True
            )
        )
    )
    assert parts[-1].done is True
    assert "".join(p.message.content or "" for p in parts)
    generated = await in_thread(lambda: client.generate(model="llama3.2:3b", prompt="Why?"))
    assert generated.response and generated.done
    streamed = await in_thread(
        lambda: list(client.generate(model="llama3.2:3b", prompt="Why?", stream=True))
    )
    assert streamed[-1].done and len(streamed) > 2


async def test_ollama_embeddings_both_shapes(fleet: Fleet, oll: ollama.Client) -> None:
    client = oll
    embedded = await in_thread(lambda: client.embed(model="nomic-embed-text", input="hello"))
    assert len(embedded.embeddings) == 1 and len(embedded.embeddings[0]) == 8
    legacy = await in_thread(lambda: client.embeddings(model="nomic-embed-text", prompt="hello"))
    assert len(legacy.embedding) == 8
    assert list(legacy.embedding) == list(embedded.embeddings[0])


async def test_ollama_listing_endpoints(
    fleet: Fleet, client: httpx.AsyncClient, oll: ollama.Client
) -> None:
    listed = await in_thread(lambda: oll.list())
    names = {m.model for m in listed.models}
    assert {"llama3.2:3b", "qwen2.5:7b", "nomic-embed-text:latest"} <= names
    tags = (await client.get("/api/tags")).json()["models"]
    nodes = {m["name"]: sorted(m["nodes"]) for m in tags}
    assert nodes["llama3.2:3b"] == ["alpha", "beta"]
    assert nodes["nomic-embed-text:latest"] == ["alpha"]
    running = await in_thread(lambda: oll.ps())
    assert {m.model for m in running.models} == {"llama3.2:3b", "qwen2.5:7b"}
    ps = (await client.get("/api/ps")).json()["models"]
    assert {(m["name"], m["node"]) for m in ps} == {
        ("llama3.2:3b", "alpha"),
        ("qwen2.5:7b", "beta"),
    }
    shown = await in_thread(lambda: oll.show("qwen2.5:7b"))
    assert shown.details is not None and shown.details.family == "qwen2"
    version = (await client.get("/api/version")).json()
    assert version["version"] and version["herd_version"]
    root = await client.get("/")
    assert root.text == "herd is running"


async def test_model_on_only_one_node(fleet: Fleet, client: httpx.AsyncClient) -> None:
    response = await client.post("/api/embed", json={"model": "nomic-embed-text", "input": "x"})
    assert response.status_code == 200
    assert response.headers["x-herd-node"] == "alpha"


async def test_ollama_unknown_model_is_404(fleet: Fleet, oll: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        await in_thread(
            lambda: oll.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        )
    assert info.value.status_code == 404
    assert "no-such-model" in info.value.error


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/api/chat", "ollama"),
        ("/api/generate", "ollama"),
        ("/api/embed", "ollama"),
        ("/v1/chat/completions", "openai"),
        ("/v1/embeddings", "openai"),
    ],
)
async def test_malformed_json_is_400_in_the_callers_shape(
    client: httpx.AsyncClient, path: str, shape: str
) -> None:
    response = await client.post(
        path,
        content=b'{"model": "llama3.2:3b", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    message = error if shape == "ollama" else error["message"]
    assert "malformed JSON" in message
    if shape == "openai":
        assert error["type"] == "invalid_request_error"
        assert set(error) == {"message", "type", "param", "code"}


async def test_missing_model_field_is_named(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/chat", json={"messages": []})
    assert response.status_code == 400
    assert "'model'" in response.json()["error"]
    response = await client.post("/v1/chat/completions", json={"model": "llama3.2:3b"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"


async def test_unknown_path_is_404_json(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert "nothing-here" in response.json()["error"]["message"]
    response = await client.get("/api/nothing-here")
    assert response.status_code == 404
    assert "nothing-here" in response.json()["error"]


async def test_oversized_body_is_413(
    tmp_path: object, fleet: Fleet, client: httpx.AsyncClient
) -> None:
    limit = fleet.router.config.max_body_bytes
    response = await client.post("/api/chat", content=b"x" * (limit + 1))
    assert response.status_code == 413
    assert "limit" in response.json()["error"]
