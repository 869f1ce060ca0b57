"""Recorded requests to a replay trace (:mod:`herd.plan.planner`, step 1): which requests
are turns of one conversation, when each is sent, with how many tokens."""

from __future__ import annotations

import bisect
import collections
import statistics
from collections.abc import Sequence

import attrs

from herd.core.models import KIND_EMBED, KIND_TEXT
from herd.plan.inputs import RecordedRequest
from herd.plan.replay import Session, Turn

REPLAYED_KINDS = (KIND_TEXT, KIND_EMBED)
DEFAULT_PROMPT_TOKENS = 200
DEFAULT_COMPLETION_TOKENS = 200
FOLLOW_WINDOW_S = 3600.0  # a continuation is looked for among turns that ended this recently
FOLLOW_CANDIDATES = 256  # ... the most recent of them


@attrs.frozen
class TraceBuild:
    sessions: tuple[Session, ...]
    requests: tuple[RecordedRequest, ...]  # the ones replayed, oldest first
    conversations: int  # sessions of more than one turn
    skipped: dict[str, int]  # reason -> requests left out
    # index in ``requests`` -> prompt tokens the node's prompt cache most likely held
    cached: dict[int, int]


def asked_model(request: RecordedRequest) -> str:
    """The model to replay the request for: the one asked for when a substitution served
    another (the replay decides substitution itself), else the one that served."""
    if request.substitution == "vram" and request.original_model:
        return request.original_model
    return request.model


def build_trace(requests: Sequence[RecordedRequest]) -> TraceBuild:
    """The replay trace of ``requests``; see the module doc (1)."""
    ordered = sorted(requests, key=lambda r: r.arrival)
    skipped: collections.Counter[str] = collections.Counter()
    kept: list[RecordedRequest] = []
    for request in ordered:
        if request.kind in REPLAYED_KINDS:
            kept.append(request)
        else:
            skipped[f"{request.kind} requests (not replayed)"] += 1
    if not kept:
        return TraceBuild((), (), 0, dict(skipped), {})
    prompts, completions = _token_medians(kept)
    start = kept[0].arrival
    # Per session: its turns' requests. Tails: (node, model, tags) -> (end of the session's
    # last turn, session), sorted by end; at most the last FOLLOW_CANDIDATES are looked at.
    members: list[list[int]] = []
    tails: dict[tuple[str, str, tuple[str, ...]], list[tuple[float, int]]] = (
        collections.defaultdict(list)
    )
    cached: dict[int, int] = {}

    def tokens(r: RecordedRequest) -> int:
        return r.prompt_tokens if r.prompt_tokens else prompts.get(r.model, DEFAULT_PROMPT_TOKENS)

    for index, request in enumerate(kept):
        session: int | None = None
        text = request.node_id is not None and request.kind == KIND_TEXT
        key = (str(request.node_id), request.model, request.tags)
        if text and request.affinity > 0:
            ends = tails[key]
            del ends[: bisect.bisect_left(ends, (request.arrival - FOLLOW_WINDOW_S, -1))]
            # Best: the latest whose prompt and answer this prompt holds; failing that (a
            # backend that counts only uncached tokens), the latest.
            newest = bisect.bisect_right(ends, (request.arrival + 1e-6, len(members)))
            chosen = newest - 1 if newest else None
            for position in range(newest - 1, max(-1, newest - 1 - FOLLOW_CANDIDATES), -1):
                last = kept[members[ends[position][1]][-1]]
                if tokens(request) - tokens(last) - (last.completion_tokens or 0) >= 0:
                    chosen = position
                    break
            if chosen is not None:
                session = ends.pop(chosen)[1]
                cached[index] = tokens(kept[members[session][-1]])
        if session is None:
            session = len(members)
            members.append([])
        members[session].append(index)
        if text:
            bisect.insort(tails[key], (request.arrival + request.latency, session))

    sessions = []
    for number, indices in enumerate(members):
        turns = []
        messages: list[dict[str, str]] = [{"role": "system", "content": f"session {number}"}]
        previous: RecordedRequest | None = None
        for turn, index in enumerate(indices):
            request = kept[index]
            think = 0.0
            if previous is not None:
                think = max(0.0, request.arrival - (previous.arrival + previous.latency))
            embed = request.kind == KIND_EMBED
            if not embed:
                messages.append({"role": "user", "content": f"session {number} turn {turn}"})
            output = 0
            if not embed:
                output = request.completion_tokens or completions.get(
                    request.model, DEFAULT_COMPLETION_TOKENS
                )
            turns.append(
                Turn(
                    model=asked_model(request),
                    prompt_tokens=tokens(request),
                    output_tokens=output,
                    kind=request.kind,
                    messages=tuple(messages) if not embed else (),
                    think=think,
                )
            )
            if not embed:
                messages.append({"role": "assistant", "content": f"session {number} {turn}"})
            previous = request
        first = kept[indices[0]]
        sessions.append(Session(first.arrival - start, tuple(turns)))
    sessions.sort(key=lambda s: s.start)
    return TraceBuild(
        sessions=tuple(sessions),
        requests=tuple(kept),
        conversations=sum(1 for m in members if len(m) > 1),
        skipped=dict(skipped),
        cached=cached,
    )


def _token_medians(requests: Sequence[RecordedRequest]) -> tuple[dict[str, int], dict[str, int]]:
    prompts: dict[str, list[int]] = collections.defaultdict(list)
    completions: dict[str, list[int]] = collections.defaultdict(list)
    for r in requests:
        if r.prompt_tokens:
            prompts[r.model].append(r.prompt_tokens)
        if r.completion_tokens:
            completions[r.model].append(r.completion_tokens)
    return (
        {m: int(statistics.median(v)) for m, v in prompts.items()},
        {m: int(statistics.median(v)) for m, v in completions.items()},
    )
