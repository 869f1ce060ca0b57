"""The one attempt loop: try the best node, and on a node failure the next, within bounds.

Used alike by text (chat, generate, embeddings: :mod:`herd.transport.dispatch`) and media jobs
(images, speech-to-text: :mod:`herd.transport.media`). The caller supplies two functions:
``choose`` (the next target given what was tried, or None when nothing is eligible now: a pure
placement decision) and ``attempt`` (the I/O: take a slot, send, wait for the first byte or the
answer). The loop owns the rules:

- An attempt that raises :class:`~herd.core.errors.NodeError` (connect error, timeout, 5xx, a
  broken connection, the node lacking the model) excludes its node and the request is chosen
  again, up to ``max_retries`` retries; each retry is counted (``retries_total``) and logged.
- When retries are exhausted, or nothing is eligible after a failure, the last node error is
  raised: every node that could serve has failed this request, so it says why, without waiting.
- When nothing is eligible and nothing has failed yet, the loop waits for the fleet to change
  (a heartbeat, a node joining, a slot freeing) until ``deadline``, then asks ``gone`` whether
  the request has become impossible (its model left the fleet: raise that error) and chooses
  again. At the deadline it raises ``no_node(attempts)``.

Cancellation (the client left, the request's nursery cancelled) passes through untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import attrs
import trio

from herd.core.errors import HerdError, NodeError
from herd.core.scoring import RouteDecision
from herd.state.state import RouterState

log = logging.getLogger("herd.proxy")

T = TypeVar("T")
C = TypeVar("C")


@attrs.define(eq=False)
class Attempts:
    """What the request has tried so far (for traces and errors)."""

    tries: int = 0  # attempts made (the first one and every retry)
    retries: int = 0
    last_node: str | None = None
    excluded: list[str] = attrs.field(factory=list)
    last_error: HerdError | None = None
    last_decision: RouteDecision | None = None
    virtual_rule: str | None = None  # the rule a virtual model name resolved by

    def excluded_nodes(self) -> frozenset[str]:
        return frozenset(self.excluded)


@attrs.frozen
class Target(Generic[C]):
    """A chosen attempt: the node it goes to, what to log, and the caller's own choice."""

    node_id: str
    what: str  # e.g. the model, for the retry log line
    choice: C


async def run_attempts(
    state: RouterState,
    attempts: Attempts,
    *,
    max_retries: int,
    deadline: float,
    choose: Callable[[Attempts], Target[C] | None],
    attempt: Callable[[C], Awaitable[T]],
    no_node: Callable[[Attempts], HerdError],
    gone: Callable[[], HerdError | None] = lambda: None,
) -> T:
    """Run attempts until one succeeds; see the module docstring."""
    while True:
        while attempts.tries <= max_retries:
            target = choose(attempts)
            if target is None:
                break
            if attempts.tries:
                attempts.retries += 1
                state.retries_total += 1
                log.info(
                    "retrying %s on %s after: %s",
                    target.what,
                    target.node_id,
                    attempts.last_error.message if attempts.last_error else "",
                )
            attempts.tries += 1
            attempts.last_node = target.node_id
            try:
                return await attempt(target.choice)
            except NodeError as exc:
                attempts.last_error = exc
                attempts.excluded.append(target.node_id)
        if attempts.last_error is not None:
            raise attempts.last_error
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            raise no_node(attempts)
        with trio.move_on_after(remaining):
            await state.wait_fleet_changed()
        impossible = gone()
        if impossible is not None:
            raise impossible
