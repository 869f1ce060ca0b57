"""The placement policy on its own: values in, a decision out (no router, no HTTP, no clock).

Context protection, opt-in substitution, fallbacks and virtual names, each shown on a small
fleet; the decision reports the counters it wants added and the lines it wants logged.
"""

from __future__ import annotations

import random

import attrs

from herd.core.api.shaping import ROUTES, InferenceRequest, shape
from herd.core.models import FleetSnapshot
from herd.core.policy.placement import Situation, choose, next_choice
from herd.core.scoring import History, ScoringSettings
from tests.test_scoring import GiB, node

SMALL, BIG = "llama3.2:3b", "qwen2.5:7b"


def situation(*nodes: object, affinity: dict[str, tuple[str, int]] | None = None) -> Situation:
    found = affinity or {}
    return Situation(
        fleet=FleetSnapshot(nodes=nodes),  # type: ignore[arg-type]
        history=History(),
        now=100.0,
        scoring=ScoringSettings(),
        rng=random.Random(0),
        affinity=found.get,
    )


def chat(model: str, **body: object) -> InferenceRequest:
    return shape(
        ROUTES["/api/chat"],
        {"model": model, "messages": [{"role": "user", "content": "hi"}], **body},
    )


NONE: frozenset[str] = frozenset()


def test_a_window_that_holds_the_request_has_num_ctx_stripped() -> None:
    fleet = situation(node("a", loaded=(SMALL,), context=8192))
    made = choose(chat(SMALL, options={"num_ctx": 4096}), SMALL, NONE, fleet)
    assert made.choice is not None and made.choice.context_action == "stripped"
    assert "num_ctx" not in made.choice.body.get("options", {})
    assert made.events == ("context_stripped",)


def test_a_window_too_small_ends_where_a_loaded_copy_fits() -> None:
    fleet = situation(
        node("small-window", loaded=(SMALL,), context=2048, free=30 * GiB),
        node("big-window", loaded=(SMALL,), context=16384, free=2 * GiB),
    )
    made = choose(chat(SMALL, options={"num_ctx": 8192}), SMALL, NONE, fleet)
    assert made.choice is not None
    assert (made.choice.node_id, made.choice.model) == ("big-window", SMALL)
    assert "num_ctx" not in made.choice.body.get("options", {})
    assert made.choice.substitution is None


def test_with_substitution_a_window_too_small_upgrades_to_another_loaded_model() -> None:
    fleet = situation(
        node("only", loaded=(SMALL,), available=(SMALL,), context=2048),
        node("other", loaded=(BIG,), available=(BIG,), context=32768),
    )
    request = chat(SMALL, options={"num_ctx": 8192})
    made = choose(request, SMALL, NONE, fleet, substitute=True)
    assert made.choice is not None
    assert (made.choice.node_id, made.choice.model) == ("other", BIG)
    assert (made.choice.context_action, made.choice.substitution) == ("upgraded", "context")
    assert made.events == ("context_upgraded",)
    strict = choose(request, SMALL, NONE, fleet, substitute=False)
    assert strict.choice is not None and strict.choice.context_action == "passthrough"


def test_nothing_loaded_fits_passes_num_ctx_through_and_says_so() -> None:
    fleet = situation(node("a", loaded=(SMALL,), context=2048))
    made = choose(chat(SMALL, options={"num_ctx": 8192}), SMALL, NONE, fleet)
    assert made.choice is not None and made.choice.context_action == "passthrough"
    assert made.choice.body["options"]["num_ctx"] == 8192
    assert made.events == ("context_passthrough",)
    assert "8192 tokens of context" in made.notes[0]


def test_without_context_protection_the_body_is_left_alone() -> None:
    fleet = situation(node("a", loaded=(SMALL,), context=8192))
    fleet = Situation(
        fleet.fleet, fleet.history, fleet.now, fleet.scoring, fleet.rng, context_protection=False
    )
    made = choose(chat(SMALL, options={"num_ctx": 4096}), SMALL, NONE, fleet)
    assert made.choice is not None and made.choice.context_action is None
    assert made.choice.body["options"]["num_ctx"] == 4096 and made.events == ()


def test_substitution_happens_only_when_the_caller_allows_it() -> None:
    # BIG is only on disk; SMALL (same category) is loaded elsewhere.
    fleet = situation(
        node("cold", available=(BIG,), size=5 * GiB),
        node("hot", loaded=(SMALL,), available=(SMALL,)),
    )
    request = chat(BIG)
    strict = next_choice(request, NONE, fleet, substitute=False)
    assert strict.choice is not None and (strict.choice.node_id, strict.choice.model) == (
        "cold",
        BIG,
    )
    assert strict.choice.substitution is None
    allowed = next_choice(request, NONE, fleet, substitute=True)
    assert allowed.choice is not None
    assert (allowed.choice.node_id, allowed.choice.model) == ("hot", SMALL)
    assert allowed.choice.substitution == "vram"
    assert any("not cold-loading" in note for note in allowed.notes)


def test_a_named_model_hot_anywhere_beats_substitution() -> None:
    fleet = situation(node("a", loaded=(BIG,), available=(BIG,)), node("b", loaded=(SMALL,)))
    made = next_choice(chat(BIG), NONE, fleet, substitute=True)
    assert made.choice is not None and made.choice.model == BIG and made.choice.hot


def test_fallback_models_are_tried_in_order_and_exclusions_hold() -> None:
    fleet = situation(node("a", available=(SMALL,)), node("b", available=(BIG,)))
    request = chat("missing:latest", fallback_models=[BIG, SMALL])
    first = next_choice(request, NONE, fleet, substitute=False)
    assert first.choice is not None and first.choice.model == BIG
    after_b_failed = next_choice(request, frozenset({"b"}), fleet, substitute=False)
    assert after_b_failed.choice is not None
    assert (after_b_failed.choice.node_id, after_b_failed.choice.model) == ("a", SMALL)
    nothing = next_choice(request, frozenset({"a", "b"}), fleet, substitute=False)
    assert nothing.choice is None
    assert nothing.decision is not None and nothing.decision.eliminated


def test_a_virtual_name_tries_its_groups_in_order_hot_before_cold() -> None:
    fleet = situation(
        node("a", available=(SMALL,)),
        node("b", loaded=(BIG,), available=(BIG,)),
        node("c", loaded=(SMALL,), available=(SMALL,)),
    )
    request = chat("coder")
    first_group = next_choice(
        attrs.evolve(request, groups=((SMALL, BIG), ("other:latest",))),
        frozenset({"c"}),
        fleet,
        substitute=False,
    )
    # SMALL could only load cold on a; BIG is hot on b: the group's hot candidate wins.
    assert first_group.choice is not None and first_group.choice.hot
    assert (first_group.choice.node_id, first_group.choice.model) == ("b", BIG)
    cold_first = next_choice(
        attrs.evolve(request, groups=((SMALL,), (BIG,))), frozenset({"c"}), fleet, substitute=False
    )
    # Group 1 can run (cold on a): a later group's hot model doesn't jump the tier.
    assert cold_first.choice is not None
    assert (cold_first.choice.node_id, cold_first.choice.model) == ("a", SMALL)
    nothing = next_choice(
        attrs.evolve(request, groups=(("other:latest",),)), NONE, fleet, substitute=False
    )
    assert nothing.choice is None


def test_the_affinity_lookup_reaches_the_scorer() -> None:
    twins = (node("a", loaded=(SMALL,)), node("b", loaded=(SMALL,)))
    request = chat(SMALL)
    assert request.earlier_keys  # a chat has a prompt key chain
    for holder in ("a", "b"):
        fleet = situation(*twins, affinity={SMALL: (holder, 2000)})
        made = next_choice(request, NONE, fleet, substitute=False)
        assert made.choice is not None and made.choice.node_id == holder
