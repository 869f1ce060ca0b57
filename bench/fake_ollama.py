"""A fast fake Ollama for the overhead benchmark: answers from pre-rendered bytes, parses little.

One process, trio and raw sockets (no HTTP library), on 127.0.0.1. It speaks enough of
Ollama for a herd node agent to report it (``/api/version``, ``/api/tags``, ``/api/ps``,
``/api/show``) and answers chat in each API shape a client of the bench asks for, so the bare
pass-through proxies can relay the same kind of answer herd translates:

- ``POST /api/chat``: NDJSON (chunked) when the body says ``"stream": true``, else one JSON
  object; ``options.num_predict`` tokens (at least 1).
- ``POST /v1/chat/completions``, ``/v1/messages``, ``/v1/responses``: the OpenAI, Anthropic and
  Responses answers (SSE when streamed), ``max_tokens`` / ``max_output_tokens`` tokens.

A streamed answer is written ``--tokens-per-write`` tokens at a time (one HTTP chunk each),
``--gap-ms`` apart, so that a relay reads one write per read (a real model is far slower than
a loopback socket; without the gap every stream would arrive in a few big reads).

    python bench/fake_ollama.py --port-file PATH [--tokens-per-write 1] [--gap-ms 2]

The port it listens on is written to ``--port-file`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import cache

import trio

MODEL = "bench:latest"
CREATED = "2026-12-01T00:00:00.000000000Z"
GiB = 2**30
READ = 65536


def _json(data: object) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _plain(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + content_type
        + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


STATIC = {
    ("GET", "/api/version"): _plain("200 OK", _json({"version": "0.12.6"})),
    ("GET", "/api/tags"): _plain(
        "200 OK",
        _json(
            {
                "models": [
                    {
                        "name": MODEL,
                        "model": MODEL,
                        "modified_at": CREATED,
                        "size": 2 * GiB,
                        "digest": "b" * 64,
                        "details": {
                            "family": "llama",
                            "parameter_size": "3B",
                            "quantization_level": "Q4_K_M",
                        },
                    }
                ]
            }
        ),
    ),
    ("GET", "/api/ps"): _plain(
        "200 OK",
        _json(
            {
                "models": [
                    {
                        "name": MODEL,
                        "model": MODEL,
                        "size": 2 * GiB,
                        "size_vram": 2 * GiB,
                        "context_length": 8192,
                        "expires_at": "2318-01-01T00:00:00Z",
                    }
                ]
            }
        ),
    ),
    ("POST", "/api/show"): _plain(
        "200 OK",
        _json({"capabilities": ["completion", "tools"], "model_info": {}, "details": {}}),
    ),
    ("GET", "/"): _plain("200 OK", b"Ollama is running", b"text/plain"),
}
NOT_FOUND = _plain("404 Not Found", _json({"error": "not found"}))
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# --- the answers, one function per API shape: (pieces of a stream, a whole answer) ---------


def _ollama(tokens: int) -> tuple[list[bytes], bytes]:
    line = _json(
        {
            "model": MODEL,
            "created_at": CREATED,
            "message": {"role": "assistant", "content": "tok "},
            "done": False,
        }
    )
    stats = {
        "done_reason": "stop",
        "total_duration": 12_000_000,
        "load_duration": 1_000_000,
        "prompt_eval_count": 12,
        "prompt_eval_duration": 2_000_000,
        "eval_count": tokens,
        "eval_duration": 9_000_000,
    }
    final = _json(
        {
            "model": MODEL,
            "created_at": CREATED,
            "message": {"role": "assistant", "content": ""},
            "done": True,
            **stats,
        }
    )
    whole = _json(
        {
            "model": MODEL,
            "created_at": CREATED,
            "message": {"role": "assistant", "content": "tok " * tokens},
            "done": True,
            **stats,
        }
    )
    return [line + b"\n"] * tokens + [final + b"\n"], whole


def _sse(data: object, event: str | None = None) -> bytes:
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + _json(data) + b"\n\n"


def _openai(tokens: int) -> tuple[list[bytes], bytes]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
    piece = _sse({**base, "choices": [{"index": 0, "delta": {"content": "tok "}}]})
    last = _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    whole = _json(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "tok " * tokens},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": tokens,
                "total_tokens": 12 + tokens,
            },
        }
    )
    return [piece] * tokens + [last + b"data: [DONE]\n\n"], whole


def _anthropic(tokens: int) -> tuple[list[bytes], bytes]:
    message: dict[str, object] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": 12, "output_tokens": 0},
    }
    first = _sse({"type": "message_start", "message": message}, "message_start") + _sse(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        "content_block_start",
    )
    delta = {"type": "content_block_delta", "index": 0}
    piece = _sse({**delta, "delta": {"type": "text_delta", "text": "tok "}}, "content_block_delta")
    end = (
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        + _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": tokens},
            },
            "message_delta",
        )
        + _sse({"type": "message_stop"}, "message_stop")
    )
    whole = _json(
        {
            **message,
            "content": [{"type": "text", "text": "tok " * tokens}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 12, "output_tokens": tokens},
        }
    )
    return [first + piece] + [piece] * (tokens - 1) + [end], whole


def _responses(tokens: int) -> tuple[list[bytes], bytes]:
    item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress"}
    response = {"id": "resp_1", "object": "response", "model": MODEL, "status": "in_progress"}
    first = (
        _sse({"type": "response.created", "response": response}, "response.created")
        + _sse({"type": "response.output_item.added", "item": item}, "response.output_item.added")
    )  # fmt: skip
    piece = _sse(
        {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "tok "},
        "response.output_text.delta",
    )
    text = "tok " * tokens
    done_item = {**item, "status": "completed", "content": [{"type": "output_text", "text": text}]}
    end = _sse(
        {"type": "response.output_text.done", "item_id": "msg_1", "text": text},
        "response.output_text.done",
    ) + _sse(
        {
            "type": "response.completed",
            "response": {**response, "status": "completed", "output": [done_item]},
        },
        "response.completed",
    )
    whole = _json({**response, "status": "completed", "output": [done_item]})
    return [first + piece] + [piece] * (tokens - 1) + [end], whole


SHAPES = {
    "/api/chat": (_ollama, b"application/x-ndjson"),
    "/v1/chat/completions": (_openai, b"text/event-stream"),
    "/v1/messages": (_anthropic, b"text/event-stream"),
    "/v1/responses": (_responses, b"text/event-stream"),
}


@cache
def answer(path: str, tokens: int, stream: bool, per_write: int) -> tuple[bytes, list[bytes]]:
    """The head and the writes of one answer (pre-rendered once per shape)."""
    render, content_type = SHAPES[path]
    pieces, whole = render(tokens)
    if not stream:
        return _plain("200 OK", whole), []
    writes = [_chunk(b"".join(pieces[i : i + per_write])) for i in range(0, len(pieces), per_write)]
    writes[-1] += b"0\r\n\r\n"
    return CHUNKED_HEAD % content_type, writes


def _tokens(body: dict[str, object]) -> int:
    options = body.get("options")
    for value in (
        options.get("num_predict") if isinstance(options, dict) else None,
        body.get("max_tokens"),
        body.get("max_output_tokens"),
    ):
        if isinstance(value, int) and value > 0:
            return value
    return 1


async def serve_connection(stream: trio.SocketStream, per_write: int, gap: float) -> None:
    buffer = b""
    try:
        while True:
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(READ)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, path, _ = lines[0].decode("latin-1").split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                data = await stream.receive_some(READ)
                if not data:
                    return
                buffer += data
            raw, buffer = buffer[:length], buffer[length:]
            static = STATIC.get((method, path))
            if static is not None:
                await stream.send_all(static)
                continue
            if method != "POST" or path not in SHAPES:
                await stream.send_all(NOT_FOUND)
                continue
            body = json.loads(raw)
            head_bytes, writes = answer(path, _tokens(body), body.get("stream") is True, per_write)
            if not writes:
                await stream.send_all(head_bytes)
                continue
            await stream.send_all(head_bytes + writes[0])
            for write in writes[1:]:
                if gap:
                    await trio.sleep(gap)
                await stream.send_all(write)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
        return
    finally:
        await stream.aclose()


async def main(port_file: str, per_write: int, gap: float) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=1024)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:

        async def handler(stream: trio.SocketStream) -> None:
            await serve_connection(stream, per_write, gap)

        nursery.start_soon(trio.serve_listeners, handler, listeners)
        await trio.Path(port_file).write_text(str(port))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--tokens-per-write", type=int, default=1)
    parser.add_argument("--gap-ms", type=float, default=2.0)
    args = parser.parse_args()
    try:
        trio.run(main, args.port_file, args.tokens_per_write, args.gap_ms / 1000)
    except KeyboardInterrupt:
        sys.exit(0)
