"""herd's stream under hypercorn (herd.server.OrderedSends): a response head of known length
goes out with its body, in one send."""

from __future__ import annotations

from typing import Any

import trio

from herd.server import OrderedSends


class Recording:
    """Stands in for a socket stream; records each send."""

    def __init__(self) -> None:
        self.socket: Any = None
        self.sends: list[bytes] = []
        self.eof = False

    async def send_all(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.sends.append(bytes(data))

    async def send_eof(self) -> None:
        self.eof = True


HEAD = b"HTTP/1.1 200 \r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"


def sends(stream: Recording) -> OrderedSends:
    return OrderedSends(stream)  # type: ignore[arg-type]


async def test_a_head_of_known_length_goes_with_its_body() -> None:
    raw = Recording()
    stream = sends(raw)
    await stream.send_all(HEAD)
    assert raw.sends == []
    await stream.send_all(b"{}")
    await stream.send_all(b"")  # the end of a body of known length: nothing to send
    assert raw.sends == [HEAD + b"{}"]


async def test_a_held_head_goes_out_at_the_end_of_a_head_answer_or_at_eof() -> None:
    raw = Recording()
    stream = sends(raw)
    await stream.send_all(HEAD)
    await stream.send_all(b"")  # HEAD: no body follows
    assert raw.sends == [HEAD]
    await stream.send_all(HEAD)
    await stream.send_eof()
    assert raw.sends == [HEAD, HEAD]
    assert raw.eof


async def test_other_heads_go_at_once() -> None:
    raw = Recording()
    stream = sends(raw)
    chunked = b"HTTP/1.1 200 \r\ntransfer-encoding: chunked\r\n\r\n"
    empty = b"HTTP/1.1 204 \r\ncontent-length: 0\r\n\r\n"
    informational = b"HTTP/1.1 100 \r\ncontent-length: 9\r\n\r\n"
    for head in (chunked, empty, informational):
        await stream.send_all(head)
    assert raw.sends == [chunked, empty, informational]
