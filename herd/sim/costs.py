"""The simulated machine's costs: how long loads, prefill and decoding take, and what a
backend's prompt cache saves. Pure functions and one small cache class, shared by the HTTP
simulator (:mod:`herd.sim.server`) and the in-process virtual fleet (:mod:`herd.sim.virtual`),
so both model a node the same way.

The model, kept deliberately simple:

- A cold load takes the model's ``load_seconds`` (set it proportional to the size), whatever
  the node's compute speed: it is disk and memory bandwidth.
- Prefill runs at ``prefill_tokens_per_second x speed`` over the prompt tokens the prompt cache
  doesn't already hold.
- Decoding runs at ``tokens_per_second x speed`` for one stream; ``k`` streams at once share the
  machine, each getting ``1 / (1 + CONTENTION x (k - 1))`` of it (batching gains some
  throughput, never all of it).
- A pull downloads the model's bytes at the node's ``pull_bytes_per_second`` (its link to the
  registry), from where an interrupted pull stopped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import attrs

CONTENTION = 0.35  # how much each extra concurrent stream slows the others
CACHED_PROMPTS = 8  # prompts a backend keeps per loaded model (its slots' KV caches)


def concurrency_share(active: int) -> float:
    """Share of one stream's speed each of ``active`` concurrent streams gets."""
    return 1.0 / (1.0 + CONTENTION * max(0, active - 1))


def prefill_seconds(tokens: int, tokens_per_second: float, speed: float) -> float:
    """Time to process ``tokens`` prompt tokens; 0 when the rate is unset (0)."""
    if tokens <= 0 or tokens_per_second <= 0:
        return 0.0
    return tokens / (tokens_per_second * max(speed, 1e-6))


def decode_seconds(tokens: int, tokens_per_second: float, speed: float, active: int) -> float:
    """Time to generate ``tokens`` with ``active`` streams sharing the node; 0 when unset."""
    if tokens <= 0 or tokens_per_second <= 0:
        return 0.0
    return tokens / (tokens_per_second * max(speed, 1e-6) * concurrency_share(active))


def pull_seconds(remaining_bytes: int, bytes_per_second: float) -> float:
    """Time to download ``remaining_bytes``; 0 when the rate is unset (0)."""
    if remaining_bytes <= 0 or bytes_per_second <= 0:
        return 0.0
    return remaining_bytes / bytes_per_second


@attrs.define(eq=False)
class PromptCache:
    """Per loaded model, the last few prompts processed (by prefix key, see
    :func:`herd.core.policy.conversation.prefix_keys`) and their length in tokens."""

    per_model: int = CACHED_PROMPTS
    _prompts: dict[str, OrderedDict[str, int]] = attrs.field(factory=dict)

    def cached_tokens(self, model: str, keys: Sequence[str]) -> int:
        """Tokens of the longest cached prefix among ``keys`` (longest first), else 0."""
        prompts = self._prompts.get(model)
        if not prompts:
            return 0
        for key in keys:
            tokens = prompts.get(key)
            if tokens is not None:
                prompts.move_to_end(key)
                return tokens
        return 0

    def remember(self, model: str, key: str, tokens: int) -> None:
        prompts = self._prompts.setdefault(model, OrderedDict())
        prompts[key] = tokens
        prompts.move_to_end(key)
        while len(prompts) > self.per_model:
            prompts.popitem(last=False)

    def drop(self, model: str) -> None:
        """The model left memory: its KV caches went with it."""
        self._prompts.pop(model, None)
