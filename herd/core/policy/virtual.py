"""Virtual model names: ids no Ollama has (``claude-sonnet-4-5``, ``gpt-5-codex``) mapped onto
models the fleet does have. Pure: no I/O, no clock.

Rules
-----
- A real model wins: a name some node lists is never treated as virtual.
- An operator's alias (``--model-alias PATTERN=MODEL[,MODEL...]``, the settings file, the
  dashboard) maps an exact name or a glob pattern (``claude-*haiku*``, case-insensitive) to an
  ordered list of candidate models. The first alias whose pattern matches is used.
- With ``agent_defaults`` on (the default), names coding agents ask for work with zero
  configuration on any fleet with a chat model (vision models included), by size tier:
  ``*haiku*``, ``*mini*``, ``*nano*`` → the small third of the fleet's chat models (smallest
  first); ``*opus*``, ``*codex*`` → the large third (largest first); every other
  ``claude-*``, ``gpt-*``, ``o<digit>*`` → the middle (closest to the median first). Within a
  tier, tool-capable models go first when the request offers tools, then coding models
  (``coder``, ``codestral``, ``devstral`` in the name); a request with images takes only
  vision models. Operator aliases are checked first, so any default can be overridden;
  ``agent_defaults`` off removes them all.
- A resolution is a list of *groups* of candidates. The router serves the first group that
  has a candidate loaded somewhere it can run (no cold load while a good candidate is hot),
  else cold-loads the group's first; then the next group. An operator alias is one group; a
  tier is its band, then the rest of the fleet's chat models (so something always answers).
"""

from __future__ import annotations

import fnmatch
import statistics
from collections.abc import Iterable, Mapping

import attrs

from herd.core.models import FleetSnapshot, NodeStatus
from herd.core.policy.models import (
    CHAT,
    VISION,
    can_serve,
    capabilities,
    category,
    parameter_billions,
)

SMALL, MID, LARGE = "small", "mid", "large"
CODER_HINTS = ("coder", "codestral", "devstral", "code")
# (pattern, tier): the defaults for coding agents, checked in order.
AGENT_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("claude-*haiku*", SMALL),
    ("claude-*opus*", LARGE),
    ("claude-*", MID),
    ("gpt-*codex*", LARGE),
    ("gpt-*mini*", SMALL),
    ("gpt-*nano*", SMALL),
    ("gpt-*", MID),
    ("o[0-9]*", MID),
)
MAX_ALIASES = 100
MAX_CANDIDATES = 20


@attrs.frozen
class Alias:
    pattern: str  # an exact name or a glob (fnmatch), matched case-insensitively
    candidates: tuple[str, ...]

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name.lower(), self.pattern.lower())


@attrs.frozen
class Resolution:
    name: str  # what the client asked for
    rule: str  # the pattern that matched
    groups: tuple[tuple[str, ...], ...]  # candidates, see the module docstring

    @property
    def candidates(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)


def parse_alias(text: str) -> Alias:
    """``PATTERN=MODEL[,MODEL...]`` (the flag's and the env's form). Raises ValueError."""
    pattern, sep, models = text.partition("=")
    names = tuple(m.strip() for m in models.split(",") if m.strip())
    if not sep or not pattern.strip() or not names:
        raise ValueError(
            f"a model alias looks like 'claude-*=qwen3-coder:30b,llama3.2:3b', got {text!r}"
        )
    return Alias(pattern.strip(), names)


def check_aliases(value: object) -> dict[str, list[str]]:
    """The settings form (``{pattern: [model, ...]}``), checked. Raises ValueError naming
    the problem."""
    if not isinstance(value, dict):
        raise ValueError("model_aliases must be an object of pattern: [model, ...]")
    if len(value) > MAX_ALIASES:
        raise ValueError(f"at most {MAX_ALIASES} model aliases, got {len(value)}")
    checked: dict[str, list[str]] = {}
    for pattern, models in value.items():
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError("a model alias pattern must be a non-empty string")
        if (
            not isinstance(models, list)
            or not models
            or not all(isinstance(m, str) and m.strip() for m in models)
        ):
            raise ValueError(f"model alias {pattern!r} must map to a non-empty list of names")
        if len(models) > MAX_CANDIDATES:
            raise ValueError(f"model alias {pattern!r} has over {MAX_CANDIDATES} candidates")
        checked[pattern.strip()] = [m.strip() for m in models]
    return checked


def aliases_from(settings: Mapping[str, list[str]]) -> tuple[Alias, ...]:
    return tuple(Alias(pattern, tuple(models)) for pattern, models in settings.items())


def fleet_chat_models(
    fleet: FleetSnapshot, needs: frozenset[str] = frozenset()
) -> tuple[dict[str, float], set[str]]:
    """Every chat model (vision models chat too) a reachable node lists that can do what the
    request ``needs``, with its size in billions of parameters; and those known to take
    tools."""
    sizes: dict[str, float] = {}
    tools: set[str] = set()
    for node in fleet.nodes:
        if node.status is NodeStatus.OFFLINE:
            continue
        names = {m.name for m in node.report.loaded_models} | {
            m.name for m in node.report.available_models
        }
        for name in names:
            if name in sizes or category(node, name) not in (CHAT, VISION):
                continue
            if not can_serve(node, name, needs):
                continue
            sizes[name] = parameter_billions(node, name)
            if "tools" in capabilities(node, name):
                tools.add(name)
    return sizes, tools


def _coder_first(names: Iterable[str], tools: set[str] | None = None) -> list[str]:
    """Tool-capable models first (when the request offers tools), then coding models."""
    ordered = list(names)
    return sorted(
        ordered,
        key=lambda n: (
            tools is not None and n not in tools,
            not any(h in n.lower() for h in CODER_HINTS),
        ),
    )


def tier_groups(
    tier: str, sizes: Mapping[str, float], tools: set[str] | None = None
) -> tuple[tuple[str, ...], ...]:
    """A tier's band of the fleet's chat models, then the rest (see the module docstring)."""
    if not sizes:
        return ()
    ascending = sorted(sizes, key=lambda n: (sizes[n], n))
    third = max(1, len(ascending) // 3)
    if tier == SMALL:
        band = ascending[:third]
    elif tier == LARGE:
        band = list(reversed(ascending[-third:]))
    else:
        median = statistics.median(sizes.values())
        band = sorted(ascending, key=lambda n: (abs(sizes[n] - median), n))[:third]
        if len(ascending) > 2:  # the middle third keeps clear of both ends
            band = [n for n in band if n not in (ascending[0], ascending[-1])] or band
    band = _coder_first(band, tools)
    rest = [n for n in sorted(ascending, key=lambda n: (-sizes[n], n)) if n not in band]
    return (tuple(band), tuple(rest)) if rest else (tuple(band),)


def resolve(
    name: str,
    fleet: FleetSnapshot,
    aliases: tuple[Alias, ...],
    agent_defaults: bool,
    *,
    needs: frozenset[str] = frozenset(),
    prefer_tools: bool = False,
) -> Resolution | None:
    """The candidates for ``name`` if it is a virtual name; None if it isn't one (a model some
    node lists, or a name no rule matches). A tier takes only models that can do what the
    request ``needs`` (images: vision), tool-capable ones first if ``prefer_tools``."""
    for node in fleet.nodes:
        if node.has_model(name):
            return None
    for alias in aliases:
        if alias.matches(name) or alias.matches(name.removesuffix(":latest")):
            return Resolution(name, alias.pattern, (alias.candidates,))
    if agent_defaults:
        bare = name.removesuffix(":latest")
        for pattern, tier in AGENT_DEFAULTS:
            if fnmatch.fnmatchcase(bare.lower(), pattern):
                sizes, tools = fleet_chat_models(fleet, needs)
                groups = tier_groups(tier, sizes, tools if prefer_tools else None)
                return Resolution(name, pattern, groups) if groups else None
    return None


def listed(aliases: tuple[Alias, ...], agent_defaults: bool) -> list[tuple[str, tuple[str, ...]]]:
    """The virtual entries ``/v1/models`` and ``/api/tags`` list: each pattern, with its
    candidates (a tier for the defaults)."""
    entries = [(a.pattern, a.candidates) for a in aliases]
    if agent_defaults:
        shown = {a.pattern for a in aliases}
        entries += [(p, (f"({tier} tier)",)) for p, tier in AGENT_DEFAULTS if p not in shown]
    return entries
