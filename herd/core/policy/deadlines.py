"""How long to wait for a node, from what the router expects of it. Pure: no I/O, no clock.

**First byte.** A hot model's first token comes after the prompt's prefill; a cold one's after
its load too. With the node's learned rates (prefill tokens per second for the model, load
bytes per second for the node) the wait is :data:`FIRST_BYTE_FLOOR` plus :data:`SAFETY` times
the expected time, never more than the configured maximum (``--first-byte-timeout``). A
prefill rate not learned yet is taken as :data:`SLOW_PREFILL` (a CPU reading a big model), so
a short prompt to a hot model is given seconds and a long one minutes. A cold load whose speed
isn't known yet (the node's first) gets the maximum: a big cold load is never cut for being
slow in a way the node has always been.

**A stall mid-stream.** A stream that has produced nothing for :data:`STALL_TOKENS` of the
model's usual token intervals (at least :data:`STALL_FLOOR`, at most ``stale_timeout``) is
reaped. Parallel requests can legitimately hold decoding back while another prompt is read,
which is what the floor allows for.
"""

from __future__ import annotations

FIRST_BYTE_FLOOR = 20.0  # seconds, whatever the estimate: scheduling, a short prefill
SAFETY = 3.0  # times the expected time
SLOW_PREFILL = 20.0  # prompt tokens per second assumed before a node:model's rate is known
STALL_TOKENS = 200.0
STALL_FLOOR = 60.0  # seconds


def first_byte_budget(
    *,
    maximum: float,
    hot: bool,
    prompt_tokens: int,
    prefill_tokens_per_second: float | None,
    model_bytes: int,
    load_bytes_per_second: float | None,
) -> float:
    """Seconds to wait for the first byte of one attempt (see the module docstring)."""
    expected = 0.0
    if not hot:
        if not load_bytes_per_second or load_bytes_per_second <= 0 or model_bytes <= 0:
            return maximum
        expected += model_bytes / load_bytes_per_second
    rate = prefill_tokens_per_second
    expected += max(0, prompt_tokens) / (rate if rate and rate > 0 else SLOW_PREFILL)
    return min(maximum, FIRST_BYTE_FLOOR + SAFETY * expected)


def stall_budget(*, maximum: float, tokens_per_second: float | None) -> float:
    """Seconds a stream may go without a chunk before it is reaped."""
    if not tokens_per_second or tokens_per_second <= 0:
        return maximum
    return min(maximum, max(STALL_FLOOR, STALL_TOKENS / tokens_per_second))
