"""Anthropic Messages ⇄ Ollama translation, checked field by field, event by event, and through
the anthropic SDK's own parser (its transport answers with what the translators made)."""

from __future__ import annotations

import itertools
import json
from typing import Any

import anthropic
import httpx
import pytest

from herd.core.api import anthropic as am
from herd.core.api import chat, shaping
from herd.core.errors import BadRequest

USER: anthropic.types.MessageParam = {"role": "user", "content": "hi"}
WEATHER: dict[str, Any] = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
CLOCK: dict[str, Any] = {"name": "clock", "input_schema": {"type": "object", "properties": {}}}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 16, "messages": [USER], **fields}


def shaped(**fields: Any) -> tuple[dict[str, Any], am.Native]:
    upstream, native = am.shape(body(**fields))
    assert isinstance(native, am.Native)
    return upstream, native


def sdk(payload: bytes, content_type: str) -> anthropic.Anthropic:
    """An Anthropic client whose transport answers every request with ``payload``."""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=payload, headers={"content-type": content_type})

    return anthropic.Anthropic(
        base_url="http://test",
        api_key="x",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(answer)),
    )


def events(stream: bytes) -> list[tuple[str, dict[str, Any]]]:
    """An Anthropic SSE stream as (event name, data) pairs; each data's type is its name."""
    out = []
    for raw in stream.decode().split("\n\n"):
        if not raw:
            continue
        name_line, data_line = raw.split("\n")
        name = name_line.removeprefix("event: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        out.append((name, data))
    assert stream.endswith(b"\n\n")
    return out


def kinds(stream: bytes) -> list[str]:
    """Each event's name, with its block index and delta type where it has them."""
    out = []
    for name, data in events(stream):
        label = name
        if "index" in data:
            label += f"[{data['index']}]"
        if name == "content_block_start":
            label += ":" + data["content_block"]["type"]
        if name == "content_block_delta":
            label += ":" + data["delta"]["type"]
        out.append(label)
    return out


# --- requests -----------------------------------------------------------------------------


def test_every_block_type_maps_onto_ollama_messages() -> None:
    upstream, native = am.shape(
        {
            "model": "m",
            "max_tokens": 100,
            "system": [
                {"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "be kind"},
            ],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is"},
                        {"type": "text", "text": "this?", "cache_control": {"type": "ephemeral"}},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "QUJD"},
                        },
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "a cat?", "signature": "sig"},
                        {"type": "redacted_thinking", "data": "opaque"},
                        {"type": "text", "text": "Let me look."},
                        {"type": "tool_use", "id": "tu_1", "name": "look", "input": {"x": 1}},
                        {"type": "tool_use", "id": "tu_2", "name": "zoom", "input": {}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "tu_1", "content": "a cat"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "tu_2",
                            "is_error": True,
                            "content": [
                                {"type": "text", "text": "too far"},
                                {
                                    "type": "image",
                                    "source": {
                                        "type": "base64",
                                        "media_type": "image/jpeg",
                                        "data": "REVG",
                                    },
                                },
                            ],
                        },
                        {"type": "text", "text": "so?"},
                    ],
                },
                {"role": "assistant", "content": "A cat."},
            ],
            "tools": [WEATHER, {**CLOCK, "type": "custom", "cache_control": {"type": "x"}}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 40,
            "stop_sequences": ["END", "STOP", "END"],
            "thinking": {"type": "enabled", "budget_tokens": 2048},
            "metadata": {"user_id": "u1"},
            "keep_alive": "10m",
            "stream": True,
            "service_tier": "auto",  # unknown here: ignored
        }
    )
    assert upstream == {
        "messages": [
            {"role": "system", "content": "be brief\nbe kind"},
            {"role": "user", "content": "what is\nthis?", "images": ["QUJD"]},
            {
                "role": "assistant",
                "content": "Let me look.",
                "thinking": "a cat?",
                "tool_calls": [
                    {"function": {"name": "look", "arguments": {"x": 1}}},
                    {"function": {"name": "zoom", "arguments": {}}},
                ],
            },
            {"role": "tool", "content": "a cat", "tool_name": "look"},
            {"role": "tool", "content": "Error: too far", "images": ["REVG"], "tool_name": "zoom"},
            {"role": "user", "content": "so?"},
            {"role": "assistant", "content": "A cat."},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parameters": WEATHER["input_schema"],
                },
            },
            {
                "type": "function",
                "function": {"name": "clock", "parameters": CLOCK["input_schema"]},
            },
        ],
        "options": {"temperature": 0.5, "top_p": 0.9, "top_k": 40, "num_predict": 100},
        "think": True,
        "keep_alive": "10m",
    }
    # Stop sequences stay with the router (see the module docstring), once each.
    assert native.stop_sequences == ("END", "STOP")
    assert native.input_tokens == am.estimate_input_tokens(upstream) > 0


def test_text_before_a_tool_result_stays_before_it() -> None:
    upstream, _ = shaped(
        messages=[
            USER,
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "here:"},
                    {"type": "tool_result", "tool_use_id": "t"},
                ],
            },
            {"role": "user", "content": []},
        ]
    )
    assert upstream["messages"][2:] == [
        {"role": "user", "content": "here:"},
        {"role": "tool", "content": "", "tool_name": "f"},
        {"role": "user", "content": ""},
    ]


@pytest.mark.parametrize(
    ("system", "first"),
    [
        ("be brief", {"role": "system", "content": "be brief"}),
        (
            [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            {"role": "system", "content": "a\nb"},
        ),
        ("", {"role": "user", "content": "hi"}),
        ([], {"role": "user", "content": "hi"}),
        (None, {"role": "user", "content": "hi"}),
    ],
)
def test_system_forms(system: Any, first: dict[str, Any]) -> None:
    upstream, _ = shaped(system=system)
    assert upstream["messages"][0] == first


@pytest.mark.parametrize(
    ("choice", "offered"),
    [
        (None, ["get_weather", "clock"]),
        ({"type": "auto"}, ["get_weather", "clock"]),
        ({"type": "any"}, ["get_weather", "clock"]),
        ({"type": "tool", "name": "clock"}, ["clock"]),
        ({"type": "none"}, []),
    ],
)
def test_tool_choice_forms(choice: Any, offered: list[str]) -> None:
    upstream, _ = shaped(tools=[WEATHER, CLOCK], tool_choice=choice)
    assert [t["function"]["name"] for t in upstream.get("tools", [])] == offered
    assert "tool_choice" not in upstream


@pytest.mark.parametrize(
    ("thinking", "think"),
    [
        ({"type": "enabled", "budget_tokens": 1024}, True),
        ({"type": "disabled"}, False),
        ({"type": "adaptive"}, None),  # the model's default
        (None, False),  # Anthropic's default: no thinking
    ],
)
def test_thinking_forms(thinking: Any, think: bool | None) -> None:
    upstream, _ = shaped(thinking=thinking)
    assert upstream.get("think") == think
    assert ("think" in upstream) is (think is not None)


def test_output_format_is_ollamas_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    upstream, _ = shaped(output_config={"format": {"type": "json_schema", "schema": schema}})
    assert upstream["format"] == schema
    upstream, _ = shaped(output_config={"effort": "low"})
    assert "format" not in upstream


def _blocks(*content: Any, role: str = "user") -> dict[str, Any]:
    return {"messages": [{"role": role, "content": list(content)}]}


IMAGE_URL = {"type": "image", "source": {"type": "url", "url": "https://x/cat.png"}}


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"model": None}, "model", "missing required field 'model'"),
        ({"max_tokens": None}, "max_tokens", "missing required field 'max_tokens'"),
        ({"max_tokens": 0}, "max_tokens", "'max_tokens' must be a positive integer, got 0"),
        ({"max_tokens": "9"}, "max_tokens", "'max_tokens' must be a positive integer"),
        ({"max_tokens": True}, "max_tokens", "'max_tokens' must be a positive integer"),
        ({"messages": []}, "messages", "'messages' must be a non-empty list"),
        ({"messages": ["hi"]}, "messages", "messages[0] must be an object"),
        (
            {"messages": [{"role": "system", "content": "x"}]},
            "messages",
            "messages[0].role must be 'user' or 'assistant', got 'system'",
        ),
        ({"messages": [{"role": "user", "content": 5}]}, "messages", "messages[0].content must"),
        (_blocks({"text": "x"}), "messages", "messages[0].content[0] must be a content block"),
        (_blocks({"type": "text"}), "messages", "messages[0].content[0]: a text block needs"),
        (_blocks(IMAGE_URL), "messages", "image source type 'url' is not supported"),
        (
            _blocks({"type": "image", "source": {"type": "file", "file_id": "f"}}),
            "messages",
            "image source type 'file' is not supported",
        ),
        (
            _blocks({"type": "image", "source": {"type": "base64", "data": "QQ=="}}),
            "messages",
            "needs its 'media_type'",
        ),
        (
            _blocks({"type": "document", "source": {"type": "text", "data": "x"}}),
            "messages",
            "messages[0].content[0]: content block type 'document' is not supported",
        ),
        (
            _blocks({"type": "tool_use", "id": "t", "name": "f", "input": {}}),
            "messages",
            "messages[0].content[0]: tool_use blocks can't be in user messages",
        ),
        (
            _blocks({"type": "tool_result", "tool_use_id": "t"}, role="assistant"),
            "messages",
            "tool_result blocks can't be in assistant messages",
        ),
        (
            _blocks({"type": "image", "source": {}}, role="assistant"),
            "messages",
            "image blocks can't be in assistant messages",
        ),
        (
            _blocks({"type": "tool_result", "tool_use_id": "nope", "content": "x"}),
            "messages",
            "tool_result for 'nope', which no earlier tool_use block has",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t", "name": "f"}],
                    },
                    _blocks(
                        {
                            "type": "tool_result",
                            "tool_use_id": "t",
                            "content": [{"type": "document"}],
                        }
                    )["messages"][0],
                ]
            },
            "messages",
            "messages[1].content[0].content[0]: a tool_result may hold text and image blocks, "
            "not 'document'",
        ),
        (
            _blocks({"type": "tool_use", "id": "t", "name": "f", "input": []}, role="assistant"),
            "messages",
            "a tool_use block's 'input' must be an object",
        ),
        ({"system": [{"type": "image"}]}, "system", "system[0] must be a text block, got 'image'"),
        ({"system": 3}, "system", "'system' must be a string or a list of text blocks"),
        ({"tools": {}}, "tools", "'tools' must be a list"),
        ({"tools": [{"name": "f"}]}, "tools", "tools[0].input_schema must be a JSON schema"),
        (
            {"tools": [{"type": "bash_20250124", "name": "bash"}]},
            "tools",
            "tools[0]: tool type 'bash_20250124' is one of Anthropic's own tools",
        ),
        ({"tools": [{"input_schema": {}}]}, "tools", "tools[0] needs a 'name'"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "clock"}},
            "tool_choice",
            "names tool 'clock', which is not in 'tools'",
        ),
        ({"tool_choice": "auto"}, "tool_choice", "'tool_choice' must be an object"),
        ({"thinking": {"type": "on"}}, "thinking", "'thinking' must be an object with type"),
        (
            {"thinking": {"type": "enabled"}},
            "thinking",
            "'thinking.budget_tokens' must be a positive integer, got None",
        ),
        ({"temperature": "hot"}, "temperature", "'temperature' must be a non-negative number"),
        ({"top_p": -1}, "top_p", "'top_p' must be a non-negative number"),
        ({"top_k": 1.5}, "top_k", "'top_k' must be a non-negative integer"),
        ({"stop_sequences": "END"}, "stop_sequences", "a list of non-empty strings"),
        ({"stop_sequences": [""]}, "stop_sequences", "a list of non-empty strings"),
        ({"stop_sequences": ["x" * 513]}, "stop_sequences", "at most 64 sequences of at most 512"),
        ({"output_config": {"format": {"type": "json"}}}, "output_config", "type json_schema"),
    ],
)
def test_bad_requests_name_the_field(fields: dict[str, Any], param: str, fragment: str) -> None:
    request = {k: v for k, v in body(**fields).items() if v is not None}
    with pytest.raises(BadRequest) as info:
        am.shape(request)
    assert fragment in info.value.message
    assert info.value.param == param
    assert info.value.status == 400


# --- stop sequences -----------------------------------------------------------------------


def scan(sequences: tuple[str, ...], pieces: list[str]) -> tuple[list[str], str | None]:
    """What a scanner lets out after each piece (then its flush, if nothing matched)."""
    scanner = am.StopScanner(sequences)
    out = []
    for piece in pieces:
        text, matched = scanner.feed(piece)
        out.append(text)
        if matched is not None:
            return out, matched
    out.append(scanner.flush())
    return out, None


def test_a_sequence_split_across_chunks_is_caught() -> None:
    out, matched = scan(("quiet",), ["the herd q", "ui", "et hills"])
    assert matched == "quiet"
    assert out == ["the herd ", "", ""]  # "q", then "qui" held back; never sent


def test_nothing_matched_gives_all_text_back_holding_only_what_could_match() -> None:
    out, matched = scan(("quiet",), ["the herd q", "uo", "te qui"])
    assert matched is None
    assert out == ["the herd ", "quo", "te ", "qui"]  # the last piece comes with the flush
    out, matched = scan(("quiet",), ["abc", "def"])
    assert out == ["abc", "def", ""]


def test_several_sequences_the_one_finished_first_wins() -> None:
    assert scan(("hills", "herd"), ["the herd moves across quiet hills"]) == (["the "], "herd")
    # "xyz" would start first, but "y" is complete first: the model would have stopped there.
    assert scan(("xyz", "y"), ["axyz"]) == (["ax"], "y")
    # Two ending at one place: the longer one is cut away.
    assert scan(("bc", "abc"), ["zab", "cd"]) == (["z", ""], "abc")
    # A sequence inside the held-back text of another.
    assert scan(("abcd", "bc"), ["xab", "ce"]) == (["x", "a"], "bc")


def test_a_match_at_once_and_after_it_nothing() -> None:
    scanner = am.StopScanner(("STOP",))
    assert scanner.feed("STOP and more") == ("", "STOP")
    assert scanner.feed("later") == ("", "STOP")
    assert am.StopScanner(()).feed("any text") == ("any text", None)


@pytest.mark.parametrize(
    "sequences", [("quiet",), ("s a", "hill"), ("moves across", "oves"), ("zzz",), ("e",)]
)
def test_any_chunking_gives_what_the_whole_text_gives(sequences: tuple[str, ...]) -> None:
    text = "the herd moves across quiet hills"
    whole = am.StopScanner(sequences)
    expected, matched = whole.feed(text)
    expected += whole.flush() if matched is None else ""
    for cuts in itertools.combinations(range(1, len(text)), 2):
        pieces = [text[: cuts[0]], text[cuts[0] : cuts[1]], text[cuts[1] :]]
        out, found = scan(sequences, pieces)
        assert ("".join(out), found) == (expected, matched), pieces


# --- whole answers ------------------------------------------------------------------------


def answer(done_reason: str = "stop", **message: Any) -> dict[str, Any]:
    """A folded Ollama answer with ``message``'s fields."""
    return {
        "model": "m",
        "message": {"role": "assistant", "content": "", **message},
        "done": True,
        "done_reason": done_reason,
        "prompt_eval_count": 11,
        "eval_count": 7,
    }


class Request:
    def __init__(self, native: am.Native) -> None:
        self.native = native


def whole(data: dict[str, Any], stops: tuple[str, ...] = ()) -> dict[str, Any]:
    payload, kept = am.whole_answer(Request(am.Native(stops)), data, "r1", 0, "m:latest")
    assert kept is None
    return payload


def test_whole_answer_with_thinking_text_and_a_tool_call_parses_in_the_sdk() -> None:
    payload = whole(
        answer(
            thinking="hmm",
            content="Checking.",
            tool_calls=[
                {"id": "c9", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
            ],
        )
    )
    assert payload == {
        "id": "msg_r1",
        "type": "message",
        "role": "assistant",
        "model": "m:latest",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": ""},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "c9", "name": "get_weather", "input": {"city": "Oslo"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 11, "output_tokens": 7},
    }
    with sdk(json.dumps(payload).encode(), "application/json") as client:
        message = client.messages.create(model="m", max_tokens=5, messages=[USER])
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    tool = message.content[2]
    assert tool.type == "tool_use" and tool.input == {"city": "Oslo"}
    assert message.usage.input_tokens == 11 and message.usage.output_tokens == 7


@pytest.mark.parametrize(
    ("data", "reason", "texts"),
    [
        (answer(content="abc"), "end_turn", ["abc"]),
        (answer(content="abc", done_reason="length"), "max_tokens", ["abc"]),
        (answer(content=""), "end_turn", []),
    ],
)
def test_whole_answer_stop_reasons(data: dict[str, Any], reason: str, texts: list[str]) -> None:
    payload = whole(data)
    assert payload["stop_reason"] == reason and payload["stop_sequence"] is None
    assert [b["text"] for b in payload["content"]] == texts


def test_whole_answer_cut_at_a_stop_sequence() -> None:
    data = answer(
        content="the herd moves across quiet hills",
        done_reason="length",
        tool_calls=[{"function": {"name": "f", "arguments": {}}}],
    )
    payload = whole(data, ("hills", "quiet"))
    assert payload["content"] == [{"type": "text", "text": "the herd moves across "}]
    assert payload["stop_reason"] == "stop_sequence" and payload["stop_sequence"] == "quiet"
    payload = whole(answer(content="the herd"), ("quiet",))
    assert payload["content"] == [{"type": "text", "text": "the herd"}]
    assert payload["stop_reason"] == "end_turn"


# --- streams ------------------------------------------------------------------------------


def line(done: bool = False, **message: Any) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "model": "m",
        "message": {"role": "assistant", "content": "", **message},
    }
    chunk["done"] = done
    if done:
        chunk.update(done_reason="stop", prompt_eval_count=21, eval_count=9)
    return chunk


def translator(stops: tuple[str, ...] = (), input_tokens: int = 4) -> chat.StreamTranslator:
    return am.stream_translator(Request(am.Native(stops, input_tokens)), "r2", 0, "m:latest")


def feed_all(stream: chat.StreamTranslator, chunks: list[dict[str, Any]]) -> bytes:
    out = b""
    for chunk in chunks:
        out += stream.feed(chunk)
        if stream.stopped:
            break
    return out + stream.done()


TOOL_CALL = {"id": "c1", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
FULL_STREAM = [
    line(thinking="hmm "),
    line(thinking="yes"),
    line(content="Hel"),
    line(content="lo"),
    line(tool_calls=[TOOL_CALL]),
    line(done=True),
]


def test_stream_event_sequence() -> None:
    stream = translator()
    out = feed_all(stream, FULL_STREAM)
    assert stream.finished and not stream.stopped
    assert kinds(out) == [
        "message_start",
        "ping",
        "content_block_start[0]:thinking",
        "content_block_delta[0]:thinking_delta",
        "content_block_delta[0]:thinking_delta",
        "content_block_delta[0]:signature_delta",
        "content_block_stop[0]",
        "content_block_start[1]:text",
        "content_block_delta[1]:text_delta",
        "content_block_delta[1]:text_delta",
        "content_block_stop[1]",
        "content_block_start[2]:tool_use",
        "content_block_delta[2]:input_json_delta",
        "content_block_stop[2]",
        "message_delta",
        "message_stop",
    ]
    parsed = dict(events(out)[:1])
    assert parsed["message_start"]["message"] == {
        "id": "msg_r2",
        "type": "message",
        "role": "assistant",
        "model": "m:latest",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 4, "output_tokens": 0},  # the estimate
    }
    final = events(out)[-2][1]
    assert final == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"input_tokens": 21, "output_tokens": 9},  # Ollama's own counts
    }
    tool_start = events(out)[11][1]
    assert tool_start["content_block"] == {
        "type": "tool_use",
        "id": "c1",
        "name": "get_weather",
        "input": {},
    }
    assert json.loads(events(out)[12][1]["delta"]["partial_json"]) == {"city": "Oslo"}
    assert stream.done() == b"" and stream.feed(line(content="more")) == b""


def test_stream_parses_in_the_sdk() -> None:
    out = feed_all(translator(), FULL_STREAM)
    with (
        sdk(out, "text/event-stream") as client,
        client.messages.stream(model="m", max_tokens=5, messages=[USER]) as stream,
    ):
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text == "Hello"
    assert message.id == "msg_r2" and message.model == "m:latest"
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    thinking, _, tool = message.content
    assert thinking.type == "thinking" and thinking.thinking == "hmm yes"
    assert tool.type == "tool_use" and tool.input == {"city": "Oslo"} and tool.id == "c1"
    assert message.stop_reason == "tool_use"
    assert message.usage.input_tokens == 21 and message.usage.output_tokens == 9


def test_stream_stops_at_a_stop_sequence_split_across_chunks() -> None:
    stream = translator(("quiet",))
    chunks = [
        line(content="the herd q"),
        line(content="ui"),
        line(content="et hills"),
        line(done=True),
    ]
    out = b""
    for chunk in chunks[:2]:
        out += stream.feed(chunk)
    assert not stream.stopped
    out += stream.feed(chunks[2])
    assert stream.stopped and not stream.finished
    assert stream.feed(chunks[3]) == b"" and stream.done() == b""
    assert kinds(out) == [
        "message_start",
        "ping",
        "content_block_start[0]:text",
        "content_block_delta[0]:text_delta",
        "content_block_stop[0]",
        "message_delta",
        "message_stop",
    ]
    parsed = events(out)
    assert parsed[3][1]["delta"]["text"] == "the herd "
    assert parsed[5][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "stop_sequence", "stop_sequence": "quiet"},
        "usage": {"output_tokens": 3},  # the lines read: no final chunk came
    }
    with (
        sdk(out, "text/event-stream") as client,
        client.messages.stream(model="m", max_tokens=5, messages=[USER]) as sdk_stream,
    ):
        message = sdk_stream.get_final_message()
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "quiet"
    assert message.content[0].type == "text" and message.content[0].text == "the herd "
    assert message.usage.input_tokens == 4  # the estimate stands


def test_held_back_text_comes_out_before_the_end_and_before_a_tool_call() -> None:
    out = feed_all(
        translator(("quiet",)),
        [line(content="so q"), line(tool_calls=[TOOL_CALL]), line(done=True)],
    )
    texts = [
        d["delta"]["text"] for n, d in events(out) if d.get("delta", {}).get("type") == "text_delta"
    ]
    assert texts == ["so ", "q"]
    assert kinds(out)[2:8] == [
        "content_block_start[0]:text",
        "content_block_delta[0]:text_delta",
        "content_block_delta[0]:text_delta",
        "content_block_stop[0]",
        "content_block_start[1]:tool_use",
        "content_block_delta[1]:input_json_delta",
    ]
    out = feed_all(translator(("quiet",)), [line(content="a qui"), line(done=True)])
    texts = [
        d["delta"]["text"] for n, d in events(out) if d.get("delta", {}).get("type") == "text_delta"
    ]
    assert texts == ["a ", "qui"]
    assert events(out)[-2][1]["delta"]["stop_reason"] == "end_turn"


def test_a_stream_of_nothing_and_a_length_stop() -> None:
    final = line(done=True)
    final["done_reason"] = "length"
    out = feed_all(translator(), [final])
    assert kinds(out) == ["message_start", "ping", "message_delta", "message_stop"]
    assert events(out)[2][1]["delta"]["stop_reason"] == "max_tokens"


def test_stream_error_mid_way() -> None:
    stream = translator()
    out = stream.feed(line(content="Hel")) + stream.error("node broke")
    assert events(out)[-1] == (
        "error",
        {"type": "error", "error": {"type": "api_error", "message": "node broke"}},
    )
    assert am.stream_error("cut") == (
        b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"cut"}}\n\n'
    )
    with (
        sdk(out, "text/event-stream") as client,
        pytest.raises(anthropic.APIStatusError, match="node broke"),
        client.messages.stream(model="m", max_tokens=5, messages=[USER]) as sdk_stream,
    ):
        sdk_stream.get_final_message()


# --- count_tokens -------------------------------------------------------------------------


def test_count_tokens_is_four_characters_a_token_over_everything_sent() -> None:
    counted = {
        "model": "m",
        "system": "s" * 8,  # 8
        "messages": [
            {"role": "user", "content": "u" * 10},  # 10
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "t" * 4, "signature": ""},  # 4
                    {"type": "tool_use", "id": "x", "name": "f", "input": {}},
                ],
            },
        ],
        "tools": [CLOCK],
    }
    calls = len('[{"function":{"name":"f","arguments":{}}}]')
    tools = len(
        json.dumps(
            [chat.Tool("clock", "", CLOCK["input_schema"]).to_ollama()], separators=(",", ":")
        )
    )
    expected = (8 + 10 + 4 + calls + tools + 3) // 4
    assert am.count_tokens(counted) == {"input_tokens": expected}
    # No max_tokens needed; the same as a message_start's estimate for the same body.
    _, native = am.shape({**counted, "max_tokens": 5})
    assert native.input_tokens == expected
    assert am.count_tokens({"model": "m", "messages": [{"role": "user", "content": "abcde"}]}) == {
        "input_tokens": 2
    }


def test_count_tokens_checks_the_body() -> None:
    with pytest.raises(BadRequest, match="'messages'"):
        am.count_tokens({"model": "m"})
    with pytest.raises(BadRequest, match="'document'"):
        am.count_tokens(
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "document"}]}]}
        )


def test_shaping_keeps_this_modules_view_of_the_request() -> None:
    route = shaping.ROUTES["/v1/messages"]
    request = shaping.shape(route, body(stop_sequences=["X"], metadata={"user_id": "u"}))
    assert request.stream is False  # Messages answers whole unless asked to stream
    assert request.native == am.Native(("X",), 1)  # "hi": 2 characters, rounded up
    assert request.upstream_body == {
        "messages": [{"role": "user", "content": "hi"}],
        "options": {"num_predict": 16},
        "think": False,
        "stream": True,  # always, upstream (see shaping)
        "keep_alive": -1,
    }
    assert shaping.shape(route, body(stream=True)).stream is True
