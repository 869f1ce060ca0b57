"""httpx's streaming iterators, typed as what they are.

``httpx.Response.aiter_lines()`` and ``aiter_raw()`` return async generators, but httpx annotates
them as plain ``AsyncIterator``, which has no ``aclose``: ``contextlib.aclosing`` (how a test
closes a body it leaves early, before trio's finalizer would) does not take that type. These
return the very same object, checked to be a generator.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import httpx


def aiter_lines(response: httpx.Response) -> AsyncGenerator[str, None]:
    """``response.aiter_lines()``, for ``contextlib.aclosing``."""
    lines = response.aiter_lines()
    assert isinstance(lines, AsyncGenerator)
    return lines


def aiter_raw(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    """``response.aiter_raw()``, for ``contextlib.aclosing``."""
    chunks = response.aiter_raw()
    assert isinstance(chunks, AsyncGenerator)
    return chunks
