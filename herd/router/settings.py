"""Settings an operator may change while the router runs (the dashboard's toggles).

They persist in ``<data-dir>/settings.json``: a change through the API is written there and
read back at the next start. Values given by an embedding program are the defaults the file
overrides.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import attrs

from herd.errors import BadRequest

log = logging.getLogger("herd.router")

SETTINGS_FILE = "settings.json"


@attrs.define
class RuntimeSettings:
    # A model on no node is pulled to the best node, then served.
    auto_pull: bool = True
    # Serve an already-loaded model of the same category instead of cold-loading the one asked.
    vram_fallback: bool = True
    # Strip num_ctx that would reload a loaded model; upgrade to a loaded larger window.
    context_protection: bool = True
    image_generation: bool = True
    transcription: bool = True
    # In-flight requests with no byte relayed for this long are reaped (seconds). Must exceed
    # the first-byte timeout, which covers cold loads.
    stale_timeout: float = 600.0
    # A node:model with this many requests waiting warms the model on the runner-up node.
    prewarm_queue_depth: int = 4
    # How long one node's pre-warm of one model is remembered (no repeat inside it), seconds.
    prewarm_cooldown: float = 120.0


def _check(name: str, value: Any) -> Any:
    field = attrs.fields_dict(RuntimeSettings).get(name)
    if field is None:
        known = ", ".join(attrs.fields_dict(RuntimeSettings))
        raise BadRequest(f"unknown setting '{name}'; settings are: {known}", param=name)
    if field.type in (bool, "bool"):
        if not isinstance(value, bool):
            raise BadRequest(f"setting '{name}' must be true or false, got {value!r}", param=name)
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise BadRequest(
            f"setting '{name}' must be a non-negative number, got {value!r}", param=name
        )
    return int(value) if field.type in (int, "int") else float(value)


def updated(settings: RuntimeSettings, changes: dict[str, Any]) -> RuntimeSettings:
    """A copy of ``settings`` with ``changes`` applied. Raises BadRequest naming a bad key."""
    checked = {name: _check(name, value) for name, value in changes.items()}
    return attrs.evolve(settings, **checked)


def load_settings(data_dir: Path, defaults: RuntimeSettings) -> RuntimeSettings:
    path = data_dir / SETTINGS_FILE
    try:
        saved = json.loads(path.read_text())
        return updated(defaults, saved if isinstance(saved, dict) else {})
    except FileNotFoundError:
        return defaults
    except (ValueError, BadRequest) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return defaults


def save_settings(data_dir: Path, settings: RuntimeSettings) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / SETTINGS_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(attrs.asdict(settings), indent=2))
    os.replace(temporary, path)
