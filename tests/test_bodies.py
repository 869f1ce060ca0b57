"""The pure pieces of every bounded read (herd.core.bodies): a body collected up to its limit,
a stream split into lines of at most a limit, compressed bytes inflated in bounded pieces and
counted inflated, an error body's message. Plain synchronous tests."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterable

import pytest

from herd.core.bodies import (
    PIECE,
    Collector,
    Inflater,
    JsonLines,
    LineSplitter,
    error_text,
    size_text,
)
from herd.core.errors import NodeBadStatus

TEXT = b"".join(b"line %d of a stream\n" % n for n in range(5_000))  # over one PIECE


def inflate(encoding: str, body: bytes, step: int) -> list[bytes]:
    inflater = Inflater(encoding, "the backend")
    pieces = [p for i in range(0, len(body), step) for p in inflater.feed(body[i : i + step])]
    inflater.end()
    return pieces


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("identity", TEXT),
        ("", TEXT),
        ("gzip", gzip.compress(TEXT)),
        ("GZIP ", gzip.compress(TEXT)),
        ("x-gzip", gzip.compress(TEXT)),
        ("deflate", zlib.compress(TEXT)),  # zlib-wrapped, as RFC 9110 says
        ("deflate", raw_deflate(TEXT)),  # raw, as some servers send
        ("gzip, identity", gzip.compress(TEXT)),
    ],
)
@pytest.mark.parametrize("step", [1, 7, 4096, 10**6])
def test_a_body_is_its_content_in_bounded_pieces(encoding: str, body: bytes, step: int) -> None:
    pieces = inflate(encoding, body, step)
    assert b"".join(pieces) == TEXT
    assert max(len(p) for p in pieces) <= max(PIECE, step if encoding in ("", "identity") else 0)


def test_a_gzip_bomb_comes_out_in_pieces_however_it_is_packed() -> None:
    bomb = gzip.compress(b" " * (64 * 2**20), compresslevel=9)
    assert len(bomb) < 128 * 1024
    inflater = Inflater("gzip", "the backend")
    sizes = [len(p) for p in inflater.feed(bomb)]  # one chunk holding the whole bomb
    assert sum(sizes) == 64 * 2**20 and max(sizes) == PIECE
    # Collected with a limit, it fails at the limit, having kept no more than that.
    body = Collector(2**20, "the backend", "an answer")
    with pytest.raises(NodeBadStatus, match="the backend sent an answer over the 1 MiB limit"):
        collect(body, Inflater("gzip", "the backend").feed(bomb))
    assert len(body.value()) <= 2**20


def collect(body: Collector, pieces: Iterable[bytes]) -> None:
    for piece in pieces:
        body.add(piece)


def test_several_gzip_members_are_one_body() -> None:
    body = gzip.compress(b"first ") + gzip.compress(b"second")
    assert b"".join(inflate("gzip", body, 5)) == b"first second"


@pytest.mark.parametrize(
    ("encoding", "body", "message"),
    [
        ("gzip", gzip.compress(TEXT)[:-100], "ends before its compressed stream does"),
        ("gzip", b"not gzip at all", "corrupt gzip body"),
        ("deflate", zlib.compress(b"x") + b"more", "bytes after its end"),
    ],
)
def test_a_broken_compressed_body_fails_clearly(encoding: str, body: bytes, message: str) -> None:
    with pytest.raises(NodeBadStatus, match=message):
        inflate(encoding, body, 1000)


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, deflate", "compress"])
def test_an_encoding_herd_does_not_read_is_refused(encoding: str) -> None:
    with pytest.raises(NodeBadStatus, match=f"the backend sent a {encoding}-encoded answer"):
        Inflater(encoding, "the backend")


def test_lines_are_split_with_a_limit_per_line() -> None:
    splitter = LineSplitter(10, "node n1")
    assert splitter.feed(b"ab") == []
    assert splitter.feed(b"c\nde\r\n\nf") == [b"abc", b"de\r", b""]
    assert splitter.feed(b"ghij") == []
    assert splitter.rest() == b"fghij"
    assert splitter.feed(b"\n" + b"x" * 10 + b"\n") == [b"fghij", b"x" * 10]
    assert splitter.rest() == b""
    with pytest.raises(NodeBadStatus, match="node n1 sent a line over the 10 bytes limit"):
        splitter.feed(b"y" * 11 + b"\n")


@pytest.mark.parametrize(
    "pieces",
    [
        [b"x" * 6, b"x" * 5],  # a line growing past the limit, no newline yet
        [b"x" * 6, b"x" * 5 + b"\n"],  # ... and ending in the piece that passes it
        [b"ok\n" + b"x" * 11],  # an unterminated tail already over it
    ],
)
def test_a_line_over_the_limit_fails_as_soon_as_it_is_seen(pieces: list[bytes]) -> None:
    with pytest.raises(NodeBadStatus, match="the backend sent a line over the 10 bytes limit"):
        split(LineSplitter(10, "the backend"), pieces)


def split(splitter: LineSplitter, pieces: list[bytes]) -> None:
    for piece in pieces:
        splitter.feed(piece)


def test_a_collector_keeps_up_to_its_limit() -> None:
    body = Collector(5, "node n1", "a model description", status=200)
    body.add(b"12")
    body.add(b"345")
    assert body.value() == b"12345"
    with pytest.raises(NodeBadStatus, match="over the 5 bytes limit") as caught:
        body.add(b"6")
    assert caught.value.upstream_status == 200
    assert size_text(64 * 1024) == "64 KiB" and size_text(8 * 2**20) == "8 MiB"


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b'{"error": "model not found"}', "model not found"),
        (b'{"error": {"message": "context too long", "type": "x"}}', "context too long"),
        (b'{"object": "error", "message": "vLLM says no", "code": 400}', "vLLM says no"),
        (b"  <html>bad gateway</html>  ", "<html>bad gateway</html>"),
        (b"x" * 1000, "x" * 300),
    ],
)
def test_an_error_body_gives_its_message(raw: bytes, text: str) -> None:
    assert error_text(raw) == text


def test_ndjson_objects_one_line_at_a_time_within_the_limit() -> None:
    """JsonLines, under the pull, create and push streams and the dashboard's benchmarks:
    objects however the bytes are cut, odd lines skipped, the last line read without its
    newline, and a line past the limit refused as it grows."""
    lines = JsonLines("node n", limit=64)
    read = [
        *lines.feed(b'{"a": 1}\n\n[1, 2]\nnot json\n{"b"'),
        *lines.feed(b': 2}\n{"c": 3}'),
        *lines.end(),
    ]
    assert read == [{"a": 1}, {"b": 2}, {"c": 3}]
    growing = JsonLines("node n", limit=64)
    assert growing.feed(b'{"ok": 1}\n' + b"x" * 60) == [{"ok": 1}]
    with pytest.raises(NodeBadStatus, match="node n sent a line over the 64 bytes limit"):
        growing.feed(b"x" * 5)
    assert JsonLines("node n").end() == []
