"""Telling cancellation apart from failure.

Trio raises :class:`trio.Cancelled` in every task under a cancelled scope; when those tasks are
in a nursery (httpcore connects through one), the Cancelled errors arrive wrapped in a
:class:`BaseExceptionGroup`. Code that decides "did the node fail, or did we stop waiting?"
must read both as cancellation.
"""

from __future__ import annotations

import trio


def is_cancellation(exc: BaseException | None) -> bool:
    """``exc`` is a :class:`trio.Cancelled`, or a group (nested or not) holding only those."""
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(is_cancellation(inner) for inner in exc.exceptions)
    return False
