"""Settings an operator may change while the router runs (the dashboard's toggles).

They persist in ``<data-dir>/settings.json``: a change through the API is written there and
read back at the next start. With a PostgreSQL store (``--store postgresql://``) they persist in
the store instead (``router_settings``), one copy for every router on it; ``settings.json`` is
then read only while the store has none saved yet (:mod:`herd.http.saved_settings`). Values
given by an embedding program are the defaults what was saved overrides; a flag or environment
variable for the same setting (``--auto-pull``, ``--vram-fallback``) beats them at start.

Every value is checked here, whoever sets it (the file, the API, the start flags): its type
and its range. A bad one is refused with a
:class:`~herd.core.errors.BadRequest` naming the rule.

Defaults are what a careful user expects: the model asked for or an error. Substitution
(``vram_fallback``) and pulling unknown names (``auto_pull``) are opt-in.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import attrs

from herd.core.errors import BadRequest
from herd.core.policy import virtual

log = logging.getLogger("herd.router")

SETTINGS_FILE = "settings.json"


@attrs.define
class RuntimeSettings:
    # A model on no node is pulled to the best node (by the router's pull service), then
    # served. Off: an unknown model is a 404 at once, as in Ollama.
    auto_pull: bool = False
    # Opt-in substitution: when no model the request named is loaded where it could run, serve
    # an already-loaded model of the same category instead of cold-loading one.
    vram_fallback: bool = False
    # Strip num_ctx that would reload a loaded model; move to a loaded larger window (another
    # model only when substitution is allowed).
    context_protection: bool = True
    image_generation: bool = True
    transcription: bool = True
    # In-flight requests with no byte relayed for this long are reaped (seconds).
    stale_timeout: float = 600.0
    # A node:model with this many requests waiting warms the model on the runner-up node.
    prewarm_queue_depth: int = 4
    # How long one node's pre-warm of one model is remembered (no repeat inside it), seconds.
    prewarm_cooldown: float = 120.0
    # Virtual model names (herd.core.policy.virtual): operator aliases, pattern -> candidates, and
    # the zero-configuration tiers for coding agents' model ids (claude-*, gpt-*).
    model_aliases: dict[str, list[str]] = attrs.field(factory=dict)
    agent_defaults: bool = True


# (minimum, maximum) of each number; the reaper samples every stale_timeout/4, so a tiny one
# would spin it and reap healthy streams.
RANGES: dict[str, tuple[float, float]] = {
    "stale_timeout": (5.0, 86400.0),
    "prewarm_queue_depth": (1, 10_000),
    "prewarm_cooldown": (0.0, 86400.0),
}


def _check(name: str, value: Any) -> Any:
    field = attrs.fields_dict(RuntimeSettings).get(name)
    if field is None:
        known = ", ".join(attrs.fields_dict(RuntimeSettings))
        raise BadRequest(f"unknown setting '{name}'; settings are: {known}", param=name)
    if name == "model_aliases":
        try:
            return virtual.check_aliases(value)
        except ValueError as exc:
            raise BadRequest(f"setting 'model_aliases': {exc}", param=name) from exc
    if field.type in (bool, "bool"):
        if not isinstance(value, bool):
            raise BadRequest(f"setting '{name}' must be true or false, got {value!r}", param=name)
        return value
    integer = field.type in (int, "int")
    kind = "a whole number" if integer else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or (integer and value != int(value))
    ):
        raise BadRequest(f"setting '{name}' must be {kind}, got {value!r}", param=name)
    low, high = RANGES[name]
    if not low <= value <= high:
        raise BadRequest(
            f"setting '{name}' must be between {low:g} and {high:g}, got {value!r}", param=name
        )
    return int(value) if integer else float(value)


def updated(settings: RuntimeSettings, changes: dict[str, Any]) -> RuntimeSettings:
    """A copy of ``settings`` with ``changes`` applied. Raises BadRequest naming a bad key or
    value."""
    checked = {name: _check(name, value) for name, value in changes.items()}
    return attrs.evolve(settings, **checked)


def from_saved(saved: object, defaults: RuntimeSettings, where: str) -> RuntimeSettings:
    """``defaults`` with the settings saved in ``where`` (decoded JSON) applied; saved values
    that break a rule are ignored with a warning naming ``where`` and the rule."""
    if saved is None:
        return defaults
    if not isinstance(saved, dict):
        log.warning("ignoring the settings in %s: not a JSON object", where)
        return defaults
    try:
        return updated(defaults, saved)
    except BadRequest as exc:
        log.warning("ignoring the settings in %s: %s", where, exc)
        return defaults


def load_settings(data_dir: Path, defaults: RuntimeSettings) -> RuntimeSettings:
    path = data_dir / SETTINGS_FILE
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return defaults
    except ValueError as exc:
        log.warning("ignoring the settings in %s: %s", path, exc)
        return defaults
    return from_saved(saved, defaults, str(path))


def save_settings(data_dir: Path, settings: RuntimeSettings) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / SETTINGS_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(attrs.asdict(settings), indent=2))
    os.replace(temporary, path)
