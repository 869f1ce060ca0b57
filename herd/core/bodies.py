"""Reading a peer's body with a limit, sans I/O: the limits, and the three pieces every reader
is built from. The router reads its nodes with them (:mod:`herd.transport.bodies`), a node its
backend (:mod:`herd.node.upstream`); the I/O loop around them is each side's own.

Rules:

- Nothing a peer sends is held without a bound. A whole body is collected up to its limit
  (:class:`Collector`), a stream is split into lines of at most :data:`LINE_LIMIT`
  (:class:`LineSplitter`); past a limit the read fails with
  :class:`~herd.core.errors.NodeBadStatus` naming who sent what and the limit, e.g. ``the
  backend sent a line over the 8 MiB limit``.
- Compressed bytes are counted inflated. :class:`Inflater` turns a ``gzip`` or ``deflate``
  body into its content in pieces of at most :data:`PIECE` bytes however the input is packed, so
  a gzip bomb costs no more than the limit it runs into (zlib's ``max_length``). An encoding it
  can't read (``br``, ``zstd``, two stacked) is refused, never passed on as if it were content.
  The router asks its nodes for no compression and refuses any; a node asks its backend for none
  too, but reads one that compresses anyway.
- An error body is wanted only for its message: :func:`error_text` takes it from Ollama's and
  OpenAI's shapes, at most :data:`DETAIL_CHARS` of it.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from typing import Any

import attrs

from herd.core.errors import NodeBadStatus

KiB = 1024
MiB = 2**20
ERROR_BODY_LIMIT = 64 * KiB  # an error answer: only its message is wanted
DETAIL_CHARS = 300  # of an error's text, in a message to the client
PROBE_LIMIT = 8 * MiB  # a backend's lists and properties (/api/tags, /v1/models, /props)
SHOW_LIMIT = 32 * MiB  # /api/show (verbose answers carry the tokenizer)
ANSWER_LIMIT = 64 * MiB  # one non-streamed answer (a chat reply, an image, a transcript)
EMBED_LIMIT = 256 * MiB  # embeddings of a large batch
LINE_LIMIT = 8 * MiB  # one line of a stream (NDJSON, or SSE from an OpenAI-compatible server)
PIECE = 64 * KiB  # the most one step of inflating yields


def size_text(limit: int) -> str:
    """``8 MiB``, ``64 KiB``, ``100 bytes``."""
    if limit >= MiB and limit % MiB == 0:
        return f"{limit // MiB} MiB"
    if limit >= KiB and limit % KiB == 0:
        return f"{limit // KiB} KiB"
    return f"{limit} bytes"


def over_limit(source: str, what: str, limit: int, status: int = 200) -> NodeBadStatus:
    """The error for ``source`` (``node gpu-1``, ``the backend``) sending ``what`` (``an
    answer``, ``a line``) past ``limit`` bytes."""
    return NodeBadStatus(
        f"{source} sent {what} over the {size_text(limit)} limit", upstream_status=status
    )


@attrs.define
class Collector:
    """A whole body, at most ``limit`` bytes: :meth:`add` each piece, then :meth:`value`.
    :meth:`add` raises :class:`NodeBadStatus` past the limit (nothing past it is kept)."""

    limit: int
    source: str
    what: str
    status: int = 200
    size: int = 0
    _parts: list[bytes] = attrs.field(factory=list)

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise over_limit(self.source, self.what, self.limit, self.status)
        self._parts.append(data)

    def value(self) -> bytes:
        return b"".join(self._parts)


@attrs.define
class LineSplitter:
    """A byte stream → its lines (without the ``\\n``; a ``\\r`` before it is kept), each at
    most ``limit`` bytes. :meth:`feed` returns the lines a piece completes and raises
    :class:`NodeBadStatus` as soon as the line being read is over the limit; :meth:`rest` is
    the last line, unterminated (empty if the stream ended with ``\\n``). A long line is kept
    as a list of pieces, joined once: no copying per piece."""

    limit: int
    source: str
    _parts: list[bytes] = attrs.field(factory=list)
    _size: int = 0

    def feed(self, data: bytes) -> list[bytes]:
        if b"\n" not in data:
            self._size += len(data)
            self._check(self._size)
            if data:
                self._parts.append(data)
            return []
        head, *middle, tail = data.split(b"\n")
        self._check(self._size + len(head))
        lines = [b"".join(self._parts) + head, *middle]
        for line in middle:
            self._check(len(line))
        self._check(len(tail))
        self._parts = [tail] if tail else []
        self._size = len(tail)
        return lines

    def rest(self) -> bytes:
        return b"".join(self._parts)

    def _check(self, size: int) -> None:
        if size > self.limit:
            raise over_limit(self.source, "a line", self.limit)


@attrs.define
class JsonLines:
    """An NDJSON stream → its JSON objects, one per line, each line at most ``limit`` bytes
    (see :class:`LineSplitter`). :meth:`feed` returns the objects a piece completes,
    :meth:`end` the last line's, read without its newline. Blank lines and lines that aren't a
    JSON object are skipped (a progress stream's odd line is not worth failing it for)."""

    source: str
    limit: int = LINE_LIMIT
    _lines: LineSplitter | None = None

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        if self._lines is None:
            self._lines = LineSplitter(self.limit, self.source)
        return [o for o in map(_json_object, self._lines.feed(data)) if o is not None]

    def end(self) -> list[dict[str, Any]]:
        last = _json_object(self._lines.rest()) if self._lines is not None else None
        return [last] if last is not None else []


def _json_object(raw: bytes) -> dict[str, Any] | None:
    if not raw.strip():
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _zlib_wrapped(data: bytes) -> bool:
    """Does a ``deflate`` body start with a zlib header (as RFC 9110 says it should), rather
    than raw deflate (as some servers send)?"""
    return len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0


GZIP_WBITS = zlib.MAX_WBITS | 16


def _lowered(value: str) -> str:
    return value.strip().lower()


@attrs.define
class Inflater:
    """A body in its ``Content-Encoding`` → its content, in pieces of at most :data:`PIECE`
    bytes. ``identity`` (or none) passes through; ``gzip`` (several members too) and
    ``deflate`` (zlib-wrapped or raw) are inflated step by step. Raises
    :class:`NodeBadStatus` for any other encoding (at construction), for a corrupt body, and
    for one that ends before its compressed stream does (:meth:`end`)."""

    encoding: str = attrs.field(converter=_lowered)
    source: str = "the peer"
    _inflate: zlib._Decompress | None = attrs.field(default=None, init=False)
    _head: bytes = attrs.field(default=b"", init=False)  # of a deflate body, until it's told

    def __attrs_post_init__(self) -> None:
        tokens = [t.strip() for t in self.encoding.split(",") if t.strip() not in ("", "identity")]
        if len(tokens) > 1 or (tokens and tokens[0] not in ("gzip", "x-gzip", "deflate")):
            raise NodeBadStatus(
                f"{self.source} sent a {self.encoding}-encoded answer, which herd does not read"
            )
        self.encoding = tokens[0] if tokens else "identity"

    @property
    def identity(self) -> bool:
        return self.encoding == "identity"

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The content in ``data`` (the next bytes of the body), piece by piece."""
        if self.identity:
            if data:
                yield data
            return
        if not data:
            return
        if self._inflate is None:
            wbits = GZIP_WBITS
            if self.encoding == "deflate":
                data = self._head = self._head + data
                if len(data) < 2:
                    return  # too little to tell zlib-wrapped from raw
                wbits = zlib.MAX_WBITS if _zlib_wrapped(data) else -zlib.MAX_WBITS
            self._inflate = zlib.decompressobj(wbits)
        pending = data
        while True:
            inflate = self._inflate
            if inflate.eof and pending:
                if self.encoding == "deflate":
                    raise self._corrupt("bytes after its end")
                inflate = self._inflate = zlib.decompressobj(GZIP_WBITS)  # the next member
            try:
                piece = inflate.decompress(pending, PIECE)
            except zlib.error as exc:
                raise self._corrupt(str(exc)) from exc
            pending = inflate.unused_data if inflate.eof else inflate.unconsumed_tail
            if piece:
                yield piece
            if not pending and (inflate.eof or len(piece) < PIECE):
                return  # all input taken, and no output held back

    def end(self) -> None:
        """The body is over: raises if its compressed stream is not."""
        if (self._inflate is not None and not self._inflate.eof) or (
            self._inflate is None and self._head
        ):
            raise self._corrupt("it ends before its compressed stream does")

    def _corrupt(self, detail: str) -> NodeBadStatus:
        return NodeBadStatus(f"{self.source} sent a corrupt {self.encoding} body: {detail}")


def error_text(raw: bytes) -> str:
    """The message of an error body: ``{"error": ...}`` (Ollama), ``{"error": {"message":
    ...}}`` (OpenAI), ``{"message": ...}`` (vLLM's ``{"object": "error"}``), or the start of
    the text."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        if isinstance(message, str):
            return message[:DETAIL_CHARS]
        if isinstance(error, str):
            return error[:DETAIL_CHARS]
        if isinstance(data.get("message"), str):
            return str(data["message"])[:DETAIL_CHARS]
    return raw[:DETAIL_CHARS].decode("utf-8", "replace").strip()
