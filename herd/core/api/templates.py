"""JSON written once with holes, filled in per event: the fixed part of a streamed answer.

A streamed answer repeats one event shape per token (the same id, model and nesting), differing
in a field or two: the text, a block index, a sequence number. Dumping the whole object for each
token is most of what a translator costs per chunk. A :class:`Template` dumps the shape once with
a marker where each varying value goes; per event it joins the fixed bytes with the dumped
values. The bytes are exactly those of dumping the filled object with the same encoder (the
same keys in the same order): the translators' tests compare the two.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

Dump = Callable[[Any], str]


def hole(index: int) -> str:
    """The marker for the ``index``-th value of a template (a string no JSON text of ours has:
    private-use characters around it)."""
    return f"\ue000herd-hole-{index}\ue000"


@attrs.frozen
class Template:
    """Fixed bytes between the holes (one more part than holes)."""

    parts: tuple[bytes, ...]
    dump: Dump = attrs.field(eq=False)

    @classmethod
    def of(
        cls, payload: Mapping[str, Any], dump: Dump, holes: int, *, head: bytes, tail: bytes
    ) -> Template:
        """``payload`` with ``hole(0)`` ... ``hole(holes - 1)`` as values, each once; every
        rendering is ``head + dump(filled payload) + tail``. Raises ValueError if a hole is
        missing or repeated."""
        rest = dump(payload)
        parts = []
        for index in range(holes):
            marker = dump(hole(index))
            if rest.count(marker) != 1:
                raise ValueError(f"template hole {index} must appear once")
            before, _, rest = rest.partition(marker)
            parts.append(before.encode())
        parts.append(rest.encode())
        parts[0] = head + parts[0]
        parts[-1] += tail
        return cls(tuple(parts), dump)

    def render(self, *values: Any) -> bytes:
        """The event with ``values`` in the holes, in order."""
        parts = self.parts
        out = [parts[0]]
        dump = self.dump
        for value, part in zip(values, parts[1:], strict=True):
            out.append(dump(value).encode())
            out.append(part)
        return b"".join(out)
