"""Stream events from templates (herd.core.api.templates) are byte for byte the events dumped
whole: for every translator's per-token event, with texts that need escaping."""

from __future__ import annotations

import json

import pytest

from herd.core.api import anthropic, openai_compat, responses
from herd.core.api.templates import Template, hole

TEXTS = [
    "tok ",
    "",
    'quote " and \\ backslash',
    "line\nbreak\ttab\x00nul",
    "naïve 日本 🐑",
    "\ue000",
]
DUMP = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


@pytest.mark.parametrize("text", TEXTS)
def test_a_template_renders_what_a_dump_would(text: str) -> None:
    template = Template.of(
        {"a": 1, "b": {"c": hole(0), "d": [hole(1)]}, "e": None}, DUMP, 2, head=b"<", tail=b">"
    )
    expected = "<" + DUMP({"a": 1, "b": {"c": text, "d": [7]}, "e": None}) + ">"
    assert template.render(text, 7) == expected.encode()


def test_a_hole_must_be_there_once() -> None:
    with pytest.raises(ValueError, match="hole 1"):
        Template.of({"a": hole(0)}, DUMP, 2, head=b"", tail=b"")
    with pytest.raises(ValueError, match="hole 0"):
        Template.of({"a": hole(0), "b": hole(0)}, DUMP, 1, head=b"", tail=b"")


@pytest.mark.parametrize("usage", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_openai_text_deltas(text: str, usage: bool) -> None:
    translator = openai_compat.ChatStreamTranslator(
        request_id="r1", created=5, model="m:latest", include_usage=usage
    )
    for field in ("content", "reasoning"):
        assert translator._text(field, text) == translator._delta({field: text})


@pytest.mark.parametrize("text", TEXTS)
def test_anthropic_text_deltas(text: str) -> None:
    for index in (0, 3):
        payload = {
            "type": "content_block_delta",
            "index": index,
            "delta": {"type": "text_delta", "text": text},
        }
        expected = anthropic.sse("content_block_delta", payload)
        assert anthropic._TEXT_DELTA.render(index, text) == expected


def test_responses_text_deltas() -> None:
    chunks = [{"message": {"role": "assistant", "content": text}, "done": False} for text in TEXTS]
    chunks.insert(2, {"message": {"role": "assistant", "thinking": 'hmm "x"'}, "done": False})
    stream = responses.stream_translator(_request(), "rq", 9, "m:latest")
    events = b"".join(stream.feed(chunk) for chunk in chunks)
    for raw in events.split(b"\n\n"):
        if not raw:
            continue
        head, data = raw.split(b"\ndata: ")
        payload = json.loads(data)
        # Each event is exactly the dump of what it says.
        assert raw + b"\n\n" == responses._sse(payload)
        assert head == b"event: " + payload["type"].encode()
    deltas = [
        json.loads(raw.split(b"\ndata: ")[1]) for raw in events.split(b"\n\n") if b"delta" in raw
    ]
    assert [d["delta"] for d in deltas if d["type"] == "response.output_text.delta"] == [
        t for t in TEXTS if t
    ]
    numbers = [
        json.loads(raw.split(b"\ndata: ")[1])["sequence_number"]
        for raw in events.split(b"\n\n")
        if raw
    ]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def _request() -> object:
    from herd.core.api.shaping import ROUTES, shape

    return shape(
        ROUTES["/v1/responses"], {"model": "m", "input": "hi", "stream": True}, None, None, None
    )
